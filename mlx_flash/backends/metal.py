"""Metal backend: mx.fast.metal_kernel wrappers over metal_src/attention_*.h.

Each kernel body is one call into a template of the headers (the same
templates attention.metal instantiates for the metallib). Static choices
(dtype, head dims, tile sizes, feature bits) are template arguments, so MLX
compiles one specialisation per configuration; sizes, strides, window bounds,
scale and softcap travel in two small parameter arrays, so a new sequence
length does not recompile.

Call flow:
  forward:  attention_fwd                    -> out, lse
            (few queries, long keys: attention_fwd split over keys, then
             attention_combine merges the partials by their lse)
  backward: attention_bwd_delta (dO . O - dlse) -> attention_bwd_dkdv -> dk, dv
            attention_bwd_dq                      -> dq

The kernel constructor is a module-level factory (default
`mx.fast.metal_kernel`); tests swap in the MSL emulation harness with
`set_kernel_factory` and run this exact code on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import mlx.core as mx

from .. import _sources
from . import metal_buffers
from .._spec import AttentionInputs, AttentionSpec
# Tile sizes: Python mirrors of the headers' constexpr rules (docs/metal.md).
from .metal_tiles import Tiles, d_blocks, fwd_q_in_tg, fwd_tg_bytes, tile_sizes  # noqa: F401

_HEADERS = ("attention_common.h", "attention_fwd.h", "attention_bwd.h")

# Feature bits: keep in sync with mlxf::Feature in metal_src/attention_common.h.
FEAT_MASK_BOOL = 1
FEAT_MASK_ADD = 2
FEAT_WINDOW = 4
FEAT_SOFTCAP = 8
FEAT_ALIBI = 16
FEAT_SINKS = 32
FEAT_BLOCK_MASK = 64
FEAT_VARLEN = 128
FEAT_SPLIT = 256
FEAT_PACK_GQA = 512
FEAT_KEY_RANGE = 1024

# Head dims the kernels take (dispatch.py): MLA's Dqk 576 / Dv 512. Past 256
# columns the forward splits O's columns, and dQ's, over threadgroups
# (d_blocks), so no thread holds more than 32 fragments of either.
HEAD_DIM_LIMITS = (576, 512)
# The quantized-KV kernels (metal_quant.py) stay at 256: their tiled
# prefill kernel's threadgroup tile outgrows 32 KiB past that.
QUANTIZED_HEAD_DIM_LIMITS = (256, 256)
# The kernels read key_start / key_len and skip the key tiles outside each
# batch entry's range (dispatch.fold_key_ranges leaves them alone).
NATIVE_KEY_RANGES = True

# Inputs with fewer elements than this are passed by MLX in the `constant`
# address space; the kernels take `device` pointers, so tiny arrays are padded.
_MIN_DEVICE_ELEMS = metal_buffers.MIN_DEVICE_ELEMS

# Decode path: at most this many query rows (one simdgroup), split over keys.
_DECODE_MAX_Q = 8
# Decode splits the keys until there are about this many threadgroups per GPU
# core (a few per core hide each other's memory latency).
_DECODE_GROUPS_PER_CORE = 4
# GPU cores when MLX does not say (mx.metal.device_info() has no core count in
# MLX 0.32): 10, the base M1/M2/M3/M4 chips' 8-10. Pro/Max chips (14-40
# cores) then get fewer splits than they could use, never too many for a
# small chip.
DEFAULT_GPU_CORES = 10
_DECODE_MAX_SPLITS = 32

# Simdgroups (8 rows each) per threadgroup of the backward's delta kernel.
_DELTA_NSG = 4

# Poison outputs with NaN before a kernel runs (tests: catches unwritten elements).
POISON_OUTPUTS = False

_kernel_factory = None


def _default_factory():
    return mx.fast.metal_kernel


def set_kernel_factory(factory):
    """Use `factory` (same signature as mx.fast.metal_kernel) to build kernels.

    Returns the previous factory (None stands for mx.fast.metal_kernel)."""
    global _kernel_factory
    previous = _kernel_factory
    _kernel_factory = factory
    return previous


def _factory():
    return _kernel_factory if _kernel_factory is not None else _default_factory()


def header_text() -> str:
    """The MSL header every kernel body calls into (metal_src/attention_*.h)."""
    return "\n".join(_sources.metal_source(name) for name in _HEADERS)


# ---- kernel bodies: one call each into the header templates ----
_TG_ARGS = "threadgroup_position_in_grid, simdgroup_index_in_threadgroup, thread_index_in_simdgroup"

_BODIES = {
    "attention_fwd": dict(
        inputs=("q", "k", "v", "mask", "alibi", "sinks", "block_mask", "cu_q", "cu_k", "key_start", "key_len",
                "iparams", "fparams"),
        outputs=("out", "lse"),
        source=(
            "threadgroup T smem[mlxf::fwd_tile_elems(DQK, DV, NSG, BK, sizeof(T))];\n"
            "threadgroup int flags[NSG];\n"
            "mlxf::attention_forward<T, DQK, DV, NSG, BK>(FEAT, q, k, v, mask, alibi, sinks, block_mask,\n"
            "    cu_q, cu_k, key_start, key_len, iparams, fparams, out, lse, smem, flags, " + _TG_ARGS + ");\n"
        ),
    ),
    "attention_combine": dict(
        inputs=("o_part", "lse_part", "sinks", "iparams", "fparams"),
        outputs=("out", "lse"),
        source=(
            "mlxf::attention_combine<T, DV>(FEAT, o_part, lse_part, sinks, iparams, fparams, out, lse,\n"
            "    threadgroup_position_in_grid, thread_index_in_simdgroup);\n"
        ),
    ),
    "attention_bwd_delta": dict(
        inputs=("out", "dout", "dlse", "iparams", "fparams"),
        outputs=("delta",),
        source=(
            "mlxf::attention_bwd_delta<T, DV, NSG>(FEAT, HAS_DLSE, out, dout, dlse, iparams, fparams, delta,\n"
            "    " + _TG_ARGS + ");\n"
        ),
    ),
    "attention_bwd_dkdv": dict(
        inputs=("q", "k", "v", "dout", "lse", "delta", "mask", "alibi", "block_mask", "cu_q", "cu_k",
                "key_start", "key_len", "iparams", "fparams"),
        outputs=("dk", "dv"),
        source=(
            "threadgroup T smem[mlxf::dkdv_tile_elems(DQK, DV, NSG, BQB, sizeof(T))];\n"
            "threadgroup float row_stats[2 * BQB];\n"
            "threadgroup int flags[NSG];\n"
            "mlxf::attention_bwd_dkdv<T, DQK, DV, NSG, BQB>(FEAT, q, k, v, dout, lse, delta, mask, alibi,\n"
            "    block_mask, cu_q, cu_k, key_start, key_len, iparams, fparams, dk, dv, smem, row_stats, flags,\n"
            "    " + _TG_ARGS + ");\n"
        ),
    ),
    "attention_bwd_dq": dict(
        inputs=("q", "k", "v", "dout", "lse", "delta", "mask", "alibi", "block_mask", "cu_q", "cu_k",
                "key_start", "key_len", "iparams", "fparams"),
        outputs=("dq",),
        source=(
            "threadgroup T smem[mlxf::dq_tile_elems(DQK, DV, NSG, BK, sizeof(T))];\n"
            "threadgroup int flags[NSG];\n"
            "mlxf::attention_bwd_dq<T, DQK, DV, NSG, BK>(FEAT, q, k, v, dout, lse, delta, mask, alibi,\n"
            "    block_mask, cu_q, cu_k, key_start, key_len, iparams, fparams, dq, smem, flags, " + _TG_ARGS + ");\n"
        ),
    ),
}


@functools.lru_cache(maxsize=None)
def _build(factory, name: str):
    body = _BODIES[name]
    return factory(
        name=f"mlxf_{name}", input_names=list(body["inputs"]), output_names=list(body["outputs"]),
        source=body["source"], header=header_text(), ensure_row_contiguous=True,
    )


def _kernel(name: str):
    """The kernel `name`, built once per factory (template arguments pick the
    specialisation at call time; MLX caches each compiled one)."""
    return _build(_factory(), name)


# ---- host-side parameters ----
def _features(spec: AttentionSpec) -> int:
    feat = 0
    if spec.mask_kind == "bool":
        feat |= FEAT_MASK_BOOL
    elif spec.mask_kind == "additive":
        feat |= FEAT_MASK_ADD
    if spec.has_window:
        feat |= FEAT_WINDOW
    if spec.softcap:
        feat |= FEAT_SOFTCAP
    if spec.has_alibi:
        feat |= FEAT_ALIBI
    if spec.has_sinks:
        feat |= FEAT_SINKS
    if spec.has_block_mask:
        feat |= FEAT_BLOCK_MASK
    if spec.varlen:
        feat |= FEAT_VARLEN
    if spec.has_key_range:
        feat |= FEAT_KEY_RANGE
    return feat


def _int_params(spec: AttentionSpec, inputs: AttentionInputs, tiles_per_split=0, num_splits=1) -> mx.array:
    return _int_param_array(spec, _shape(inputs.mask), _shape(inputs.block_mask), tiles_per_split, num_splits)


def _int_param_array(spec: AttentionSpec, mask_shape, block_mask_shape, tiles_per_split, num_splits) -> mx.array:
    # Layout: mlxf::IntParam.
    values = (
        spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_q, spec.seqlen_k,
        spec.window_left, spec.window_right, spec.block_q, spec.block_k,
        *metal_buffers.broadcast_strides("mask", mask_shape),
        *metal_buffers.broadcast_strides("block_mask", block_mask_shape),
        tiles_per_split, num_splits,
    )
    return metal_buffers.int_params(values)


def _float_params(spec: AttentionSpec) -> mx.array:
    # Layout: mlxf::FloatParam, padded to the device-buffer minimum.
    return metal_buffers.float_params((spec.scale, spec.softcap))


def _device_buffer(a):
    """`a` as MLX will pass it in the `device` address space (>= 8 elements).
    Kernels index with explicit offsets, so a flattened, padded copy is fine."""
    if a.size >= _MIN_DEVICE_ELEMS:
        return a
    flat = a.reshape(-1)
    return mx.concatenate([flat, mx.zeros((_MIN_DEVICE_ELEMS - flat.size,), dtype=a.dtype)])


def _optional(a, dtype):
    """An optional input, or a placeholder of `dtype` that the kernel never reads."""
    if a is None:
        return metal_buffers.placeholder(dtype)
    return _device_buffer(a)


def _common_inputs(inputs: AttentionInputs):
    """mask, alibi, block_mask, cu_q, cu_k, key_start, key_len in kernel order
    (placeholders where absent)."""
    if (inputs.mask is None and inputs.alibi is None and inputs.block_mask is None and inputs.cu_seqlens_q is None
            and inputs.cu_seqlens_k is None and inputs.key_start is None and inputs.key_len is None):
        return _no_inputs()  # the usual call: the same seven placeholders
    return (
        _optional(inputs.mask, mx.float32),
        _optional(inputs.alibi, mx.float32),
        _optional(inputs.block_mask, mx.bool_),
        _optional(inputs.cu_seqlens_q, mx.int32),
        _optional(inputs.cu_seqlens_k, mx.int32),
        _optional(inputs.key_start, mx.int32),
        _optional(inputs.key_len, mx.int32),
    )


@functools.lru_cache(maxsize=1)
def _no_inputs():
    """_common_inputs of a call without optional arrays."""
    f32, i32 = metal_buffers.placeholder(mx.float32), metal_buffers.placeholder(mx.int32)
    return (f32, f32, metal_buffers.placeholder(mx.bool_), i32, i32, i32, i32)


def _max_len_q(spec):
    return spec.max_seqlen_q if spec.varlen else spec.seqlen_q


def _max_len_k(spec):
    return spec.max_seqlen_k if spec.varlen else spec.seqlen_k


def _call(name, ins, template, grid, threadgroup, output_shapes, output_dtypes, stream):
    if min(grid) == 0:
        # Grids follow the output extents: an empty grid means empty outputs
        # (e.g. Nq = 0), which Metal cannot dispatch.
        return [mx.zeros(shape, dtype=dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
    return _kernel(name)(
        inputs=[_device_buffer(a) for a in ins], template=template, grid=grid, threadgroup=threadgroup,
        output_shapes=output_shapes, output_dtypes=output_dtypes,
        init_value=float("nan") if POISON_OUTPUTS else None, stream=stream,
    )


@dataclass(frozen=True)
class _Launch:
    """How the forward covers the rows: `nsg` simdgroups of 8 rows per
    threadgroup, `row_blocks` x `heads` threadgroups per batch entry, times
    `v_blocks` blocks of Dv columns, and `splits` key splits of
    `tiles_per_split` tiles (decode only; the kernel shares out the tiles
    that hold valid keys, the same way without a key range)."""

    nsg: int
    rows: int
    heads: int
    splits: int = 1
    tiles_per_split: int = 0
    pack_gqa: bool = False
    v_blocks: int = 1

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // (8 * self.nsg))


@functools.lru_cache(maxsize=1)
def gpu_core_count() -> int:
    """The Apple GPU's core count as MLX reports it, else DEFAULT_GPU_CORES."""
    try:
        if not mx.metal.is_available():  # e.g. the emulation on Linux
            return DEFAULT_GPU_CORES
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:
        return DEFAULT_GPU_CORES
    for key, value in info.items():
        if "core" in key and isinstance(value, int) and value > 0:
            return value
    return DEFAULT_GPU_CORES


def _forward_launch(spec: AttentionSpec, tiles: Tiles, gpu_cores: int = DEFAULT_GPU_CORES) -> _Launch:
    """The plain forward, or for few query rows the decode path: a few rows
    leave most of the GPU idle, so the keys are split over threadgroups
    (flash-decoding) and merged by lse. Decode packs the query heads of a GQA
    group into one threadgroup's rows, so each K/V tile is loaded once per
    group (dense layout, no block mask: its skipping depends on the head)."""
    v_blocks = d_blocks(spec.head_dim_v)
    plain = _Launch(nsg=tiles.fwd_nsg, rows=_max_len_q(spec), heads=spec.heads_q, v_blocks=v_blocks)
    if not 0 < _max_len_q(spec) <= _DECODE_MAX_Q:
        return plain
    pack = spec.group_size > 1 and not spec.varlen and not spec.has_block_mask
    rows = spec.group_size * spec.seqlen_q if pack else _max_len_q(spec)
    heads = spec.heads_kv if pack else spec.heads_q
    nsg = min(4, max(1, -(-rows // 8)))
    n_tiles = -(-_max_len_k(spec) // tiles.fwd_bk)
    groups = spec.batch * heads * -(-rows // (8 * nsg)) * v_blocks
    target = _DECODE_GROUPS_PER_CORE * gpu_cores
    splits = min(n_tiles, _DECODE_MAX_SPLITS, max(1, -(-target // groups)))
    if splits < 2:
        return plain
    per_split = -(-n_tiles // splits)
    return _Launch(nsg=nsg, rows=rows, heads=heads, splits=-(-n_tiles // per_split),
                   tiles_per_split=per_split, pack_gqa=pack, v_blocks=v_blocks)


# Causal forwards use key tiles no wider than the 32-row query block: with
# 64-key tiles, every second query block's diagonal tile holds 32 keys that
# lie wholly past its last row, which it would load and multiply for nothing
# (counted: tools/metal_counts.py, D = 64 causal).
_CAUSAL_MAX_FWD_BK = 32


def forward_tiles(spec: AttentionSpec, itemsize: int) -> Tiles:
    """The forward's tiles for this call (tile_sizes, narrowed for causal)."""
    tiles = tile_sizes(spec.head_dim_qk, spec.head_dim_v, itemsize)
    if spec.causal and tiles.fwd_bk > _CAUSAL_MAX_FWD_BK:
        tiles = dataclasses.replace(tiles, fwd_bk=_CAUSAL_MAX_FWD_BK)
    return tiles


@dataclass(frozen=True)
class _Dispatch:
    """One kernel launch of a call, all but its input arrays (see _forward_plan)."""

    name: str
    template: tuple
    grid: tuple
    threadgroup: tuple
    output_shapes: tuple
    output_dtypes: tuple

    def __call__(self, ins, stream):
        return _call(self.name, ins, list(self.template), self.grid, self.threadgroup,
                     [list(s) for s in self.output_shapes], list(self.output_dtypes), stream)


def _shape(a):
    return None if a is None else tuple(a.shape)


@functools.lru_cache(maxsize=512)
def _forward_plan(spec: AttentionSpec, dtype, q_batch: int, q_rows: int, mask_shape, block_mask_shape,
                  gpu_cores: int):
    """(forward launch, combine launch or None, iparams, fparams) of a forward
    call: everything but its arrays depends only on these arguments, and a
    decode step repeats them once per layer, so they are worked out once.
    The module's tuning constants (_DECODE_*, _CAUSAL_MAX_FWD_BK) are read
    when a configuration is first planned: a tool that changes them clears
    the plans (`_forward_plan.cache_clear()`)."""
    tiles = forward_tiles(spec, dtype.size)
    feat = _features(spec)
    out_shape = (q_batch, spec.heads_q, q_rows, spec.head_dim_v)  # varlen: [1, H, total, Dv]
    lse_shape = out_shape[:3]
    launch = _forward_launch(spec, tiles, gpu_cores)
    decode = launch.splits > 1
    if decode:
        feat |= FEAT_SPLIT | (FEAT_PACK_GQA if launch.pack_gqa else 0)
        shapes, out_dtypes = ((launch.splits,) + out_shape, (launch.splits,) + lse_shape), (mx.float32,) * 2
    else:
        shapes, out_dtypes = (out_shape, lse_shape), (dtype, mx.float32)
    iparams = _int_param_array(spec, mask_shape, block_mask_shape, launch.tiles_per_split, launch.splits)
    forward = _Dispatch(
        "attention_fwd", (("T", dtype), ("DQK", spec.head_dim_qk), ("DV", spec.head_dim_v), ("NSG", launch.nsg),
                          ("BK", tiles.fwd_bk), ("FEAT", feat)),
        (32 * launch.nsg * launch.row_blocks, spec.batch * launch.heads, launch.splits * launch.v_blocks),
        (32 * launch.nsg, 1, 1), shapes, out_dtypes)
    combine = None
    if decode:
        rows = math.prod(lse_shape)
        combine = _Dispatch("attention_combine", (("T", dtype), ("DV", spec.head_dim_v), ("FEAT", feat)),
                            (32 * rows, 1, 1), (32, 1, 1), (out_shape, lse_shape), (dtype, mx.float32))
    return forward, combine, iparams, _float_params(spec)


def attention_forward(q, k, v, spec: AttentionSpec, inputs: AttentionInputs, stream):
    forward, combine, iparams, fparams = _forward_plan(spec, q.dtype, q.shape[0], q.shape[2], _shape(inputs.mask),
                                                       _shape(inputs.block_mask), gpu_core_count())
    mask, alibi, block_mask, cu_q, cu_k, key_start, key_len = _common_inputs(inputs)
    sinks = _optional(inputs.sinks, mx.float32)
    out, lse = forward([q, k, v, mask, alibi, sinks, block_mask, cu_q, cu_k, key_start, key_len, iparams, fparams],
                       stream)
    if combine is None:
        return out, lse
    return combine([out, lse, sinks, iparams, fparams], stream)


@functools.lru_cache(maxsize=512)
def _backward_plan(spec: AttentionSpec, dtype, q_shape, k_shape, v_shape, lse_shape, has_dlse: bool, mask_shape,
                   block_mask_shape):
    """(delta, dK/dV and dQ launches, iparams, fparams) of a backward call (see _forward_plan)."""
    tiles = tile_sizes(spec.head_dim_qk, spec.head_dim_v, dtype.size)
    feat = _features(spec) & ~FEAT_SINKS  # the saved lse already holds the sinks
    rows = math.prod(lse_shape)
    nsg = _DELTA_NSG
    delta = _Dispatch(
        "attention_bwd_delta", (("T", dtype), ("DV", spec.head_dim_v), ("NSG", nsg), ("HAS_DLSE", has_dlse),
                                ("FEAT", feat)),
        (32 * nsg * -(-rows // (8 * nsg)), 1, 1), (32 * nsg, 1, 1), (lse_shape,), (mx.float32,))
    dims = (("T", dtype), ("DQK", spec.head_dim_qk), ("DV", spec.head_dim_v))
    nsg = tiles.dkdv_nsg
    dkdv = _Dispatch(
        "attention_bwd_dkdv", dims + (("NSG", nsg), ("BQB", tiles.dkdv_bq), ("FEAT", feat)),
        (32 * nsg * -(-_max_len_k(spec) // (8 * nsg)), spec.batch * spec.heads_kv, 1), (32 * nsg, 1, 1),
        (k_shape, v_shape), (dtype, dtype))
    nsg = tiles.fwd_nsg
    dq = _Dispatch(
        "attention_bwd_dq", dims + (("NSG", nsg), ("BK", tiles.dq_bk), ("FEAT", feat)),
        (32 * nsg * -(-_max_len_q(spec) // (8 * nsg)), spec.batch * spec.heads_q, d_blocks(spec.head_dim_qk)),
        (32 * nsg, 1, 1), (q_shape,), (dtype,))
    iparams = _int_param_array(spec, mask_shape, block_mask_shape, 0, 1)
    return delta, dkdv, dq, iparams, _float_params(spec)


def attention_backward(q, k, v, out, lse, dout, dlse, spec: AttentionSpec, inputs: AttentionInputs, stream,
                       own_output=True):
    # delta = dO . O from out whatever own_output says (dispatch.py).
    delta_launch, dkdv, dq_launch, iparams, fparams = _backward_plan(
        spec, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(lse.shape), dlse is not None,
        _shape(inputs.mask), _shape(inputs.block_mask))
    mask, alibi, block_mask, cu_q, cu_k, key_start, key_len = _common_inputs(inputs)
    dout = dout.astype(q.dtype)
    (delta,) = delta_launch([out, dout, _optional(dlse, mx.float32), iparams, fparams], stream)
    grad_inputs = [q, k, v, dout, lse, delta, mask, alibi, block_mask, cu_q, cu_k, key_start, key_len,
                   iparams, fparams]
    dk, dv = dkdv(grad_inputs, stream)
    (dq,) = dq_launch(grad_inputs, stream)
    return dq, dk, dv

# matmul2d's Metal wrapper lives in its own module; the backend interface is per module.
from .metal_matmul import matmul2d  # noqa: E402,F401

# flash_attention_quantized's Metal kernels live in their own module (metal_src/attention_quant.h).
from .metal_quant import quantized_attention_backward, quantized_attention_forward  # noqa: E402,F401
