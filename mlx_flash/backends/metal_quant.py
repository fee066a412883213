"""Metal kernels of flash_attention_quantized: mx.fast.metal_kernel wrappers
over metal_src/attention_quant.h (see that header for the design).

Call flow:
  forward:  prefill (>= TILE_MIN_ROWS packed rows per kv head):
              quant_attention_fwd_tiled -> out, lse
            decode (fewer rows): quant_attention_fwd -> out, lse, or with few
              row blocks and long keys split over keys: partials merged by
              quant_attention_combine
  backward: prefill: quant_attention_dq_tiled -> dq   (k and v are constants)
            decode: quant_attention_dq -> dq, or split over keys: fp32
              partial dq per split, summed

Static choices (dtypes, head dims, bits, group size, rows per threadgroup,
feature bits) are template arguments; sizes, window bounds, mask strides,
scale and softcap travel in two small parameter arrays. The kernel
constructor is metal.py's factory, so tests run this exact code through the
MSL emulation harness (tests/metal_emu).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from .. import _sources
from . import metal_buffers
from .._spec import AttentionInputs

# Feature bits: keep in sync with mlxq::QFeature in metal_src/attention_quant.h.
QF_MASK_BOOL = 1
QF_MASK_ADD = 2
QF_WINDOW = 4
QF_SOFTCAP = 8
QF_ALIBI = 16
QF_SINKS = 32
QF_SPLIT = 64

# Packed rows (query heads of a GQA group x queries) per streaming
# threadgroup: each dequantized key serves this many rows. Registers per lane
# grow with rows * D / 32 (q, o, and in the backward dO and dq), so at most
# 8; fewer (a power of 2) when G * Nq is smaller, so that MHA decode does not
# reduce 7 empty rows per key.
ROWS = 8
NSG = 4  # simdgroups streaming keys in one threadgroup

# Decode split: aim at this many threadgroups, each split at least this many keys.
SPLIT_TARGET_GROUPS = 256
SPLIT_MIN_KEYS = 64

# Prefill: packed rows (G * Nq) from which the tiled kernel (32 rows per
# threadgroup, K/V tiles in threadgroup memory, simdgroup_matrix products)
# replaces the streaming one (8 rows per threadgroup, registers only).
TILE_MIN_ROWS = 32
TILE_NSG = 4
# Threadgroup memory the tiled kernel aims at (of the 32 KiB a threadgroup
# may use): one fp32 K-or-V tile plus the logits of every simdgroup.
_TILE_BUDGET = 24 * 1024

_MIN_DEVICE_ELEMS = metal_buffers.MIN_DEVICE_ELEMS  # smaller inputs are passed in the constant address space

_ARGS = "threadgroup_position_in_grid, simdgroup_index_in_threadgroup, thread_index_in_simdgroup"
_QUANT = ("kw", "ks", "kb", "vw", "vs", "vb")
# The caches are read through their strides (ensure_row_contiguous=False):
# mlx-lm hands over [..., :offset, :] slices, which a copy would double the
# bytes a decode step moves. Every other input is made contiguous here.
_STRIDES = (
    "const mlxq::QStrides ksd = mlxq::make_strides(kw_strides, ks_strides, kb_strides);\n"
    "const mlxq::QStrides vsd = mlxq::make_strides(vw_strides, vs_strides, vb_strides);\n"
)

_BODIES = {
    "quant_attention_fwd": dict(
        inputs=("q",) + _QUANT + ("mask", "alibi", "sinks", "iparams", "fparams"),
        outputs=("out", "lse", "o_part", "ml_part"),
        source=(
            "threadgroup float tg_stats[NSG * R * 2];\n"
            "threadgroup float tg_out[R * DV];\n"
            "mlxq::quant_attention_forward<T, ST, MT, DQK, DV, BITS, GS, R, NSG>(FEAT, q, kw, ks, kb, vw, vs, vb, ksd, vsd,\n"
            "    mask, alibi, sinks, iparams, fparams, out, lse, o_part, ml_part, tg_stats, tg_out, " + _ARGS + ");\n"
        ),
    ),
    "quant_attention_fwd_tiled": dict(
        inputs=("q",) + _QUANT + ("mask", "alibi", "sinks", "iparams", "fparams"),
        outputs=("out", "lse"),
        source=(
            "threadgroup float kv_tile[BK * mlxq::qtile_ld(DQK > DV ? DQK : DV)];\n"
            "threadgroup float logit_tile[NSG * 8 * BK];\n"
            "threadgroup int tg_flag[1];\n"
            "mlxq::quant_attention_forward_tiled<T, ST, MT, DQK, DV, BITS, GS, BK, NSG>(FEAT, q, kw, ks, kb, vw,\n"
            "    vs, vb, ksd, vsd, mask, alibi, sinks, iparams, fparams, out, lse, kv_tile, logit_tile, tg_flag, " + _ARGS + ");\n"
        ),
    ),
    "quant_attention_dq_tiled": dict(
        inputs=("q",) + _QUANT + ("dout", "lse", "delta", "mask", "alibi", "iparams", "fparams"),
        outputs=("dq",),
        source=(
            "threadgroup float kv_tile[BK * mlxq::qtile_ld(DQK > DV ? DQK : DV)];\n"
            "threadgroup float logit_tile[NSG * 8 * BK];\n"
            "threadgroup float ds_tile[NSG * 8 * BK];\n"
            "threadgroup int tg_flag[1];\n"
            "mlxq::quant_attention_backward_dq_tiled<T, ST, MT, DQK, DV, BITS, GS, BK, NSG>(FEAT, q, kw, ks, kb,\n"
            "    vw, vs, vb, ksd, vsd, dout, lse, delta, mask, alibi, iparams, fparams, dq, kv_tile, logit_tile, ds_tile,\n"
            "    tg_flag, " + _ARGS + ");\n"
        ),
    ),
    "quant_attention_combine": dict(
        inputs=("o_part", "ml_part", "sinks", "iparams", "fparams"),
        outputs=("out", "lse"),
        source=(
            "mlxq::quant_attention_combine<T, DV>(FEAT, o_part, ml_part, sinks, iparams, fparams, out, lse,\n"
            "    threadgroup_position_in_grid, thread_index_in_simdgroup);\n"
        ),
    ),
    "quant_attention_dq": dict(
        inputs=("q",) + _QUANT + ("dout", "lse", "delta", "mask", "alibi", "iparams", "fparams"),
        outputs=("dq", "dq_part"),
        source=(
            "threadgroup float tg_dq[R * DQK];\n"
            "mlxq::quant_attention_backward_dq<T, ST, MT, DQK, DV, BITS, GS, R, NSG>(FEAT, q, kw, ks, kb, vw, vs,\n"
            "    vb, ksd, vsd, dout, lse, delta, mask, alibi, iparams, fparams, dq, dq_part, tg_dq, " + _ARGS + ");\n"
        ),
    ),
}


def _metal():
    """backends.metal (imported on first use: it imports this module at its end)."""
    global _METAL_MODULE
    if _METAL_MODULE is None:
        from . import metal

        _METAL_MODULE = metal
    return _METAL_MODULE


_METAL_MODULE = None


def _factory():
    return _metal()._factory()  # its factory: mx.fast.metal_kernel, or the tests' harness


def _poison() -> bool:
    return _metal().POISON_OUTPUTS


@functools.lru_cache(maxsize=None)
def _build(factory, name: str):
    body = _BODIES[name]
    source = (_STRIDES if "kw" in body["inputs"] else "") + body["source"]
    return factory(
        name=f"mlxf_{name}", input_names=list(body["inputs"]), output_names=list(body["outputs"]),
        source=source, header=_sources.metal_source("attention_quant.h"), ensure_row_contiguous=False,
    )


def _features(spec) -> int:
    feat = 0
    if spec.mask_kind == "bool":
        feat |= QF_MASK_BOOL
    elif spec.mask_kind == "additive":
        feat |= QF_MASK_ADD
    if spec.has_window:
        feat |= QF_WINDOW
    if spec.softcap:
        feat |= QF_SOFTCAP
    if spec.has_alibi:
        feat |= QF_ALIBI
    if spec.has_sinks:
        feat |= QF_SINKS
    return feat


def _int_params(spec, inputs, keys_per_split=0, num_splits=1) -> mx.array:
    return _int_param_array(spec, _mask_shape(inputs.mask), keys_per_split, num_splits)


def _int_param_array(spec, mask_shape, keys_per_split, num_splits) -> mx.array:
    # Layout: mlxq::QIntParam.
    values = (spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_q, spec.seqlen_k,
              spec.window_left, spec.window_right, *metal_buffers.broadcast_strides("mask", mask_shape), keys_per_split, num_splits)
    return metal_buffers.int_params(values)


def _float_params(spec) -> mx.array:
    return metal_buffers.float_params((spec.scale, spec.softcap or 0.0))


def _device_buffer(a):
    """A contiguous input of at least 8 elements (smaller ones would arrive
    in the constant address space; kernels index explicitly, so padding is fine)."""
    if metal_buffers.is_constant(a):  # placeholders and parameters: contiguous already
        return a
    if a.size >= _MIN_DEVICE_ELEMS:
        return mx.contiguous(a)
    flat = a.reshape(-1)
    return mx.concatenate([flat, mx.zeros((_MIN_DEVICE_ELEMS - flat.size,), dtype=a.dtype)])


def _cache_buffer(a):
    """A cache array as is (any strides), unless it has fewer than 8 elements:
    then it is padded along N (rank and row layout kept) so that MLX passes
    it in the device address space."""
    if a.size >= _MIN_DEVICE_ELEMS:
        return a
    return mx.concatenate([mx.contiguous(a), mx.zeros((*a.shape[:2], _MIN_DEVICE_ELEMS, a.shape[3]), a.dtype)], axis=2)


def _optional(a, dtype):
    return metal_buffers.placeholder(dtype) if a is None else _device_buffer(a)


def _rows(spec) -> int:
    """Packed rows per streaming threadgroup: the power of 2 >= G * Nq, at most ROWS."""
    return min(ROWS, 1 << max(0, spec.group_size * spec.seqlen_q - 1).bit_length())


def _row_blocks(spec) -> int:
    return -(-spec.group_size * spec.seqlen_q // _rows(spec))


def _splits(spec):
    """(num_splits, keys_per_split): split the keys when the row blocks alone
    would leave most of the GPU idle (decode)."""
    groups = spec.batch * spec.heads_kv * _row_blocks(spec)
    want = min(-(-SPLIT_TARGET_GROUPS // groups), -(-spec.seqlen_k // SPLIT_MIN_KEYS))
    if want < 2:
        return 1, 0
    per = -(-spec.seqlen_k // want)
    return -(-spec.seqlen_k // per), per


def _check_dims(spec):
    for name, d in (("q/k head dim", spec.head_dim_qk), ("v head dim", spec.head_dim_v)):
        if d % 32:
            # Cannot happen for mx.quantize'd triples (D is a multiple of group_size >= 32).
            raise ValueError(f"flash_attention_quantized (Metal): {name} must be a multiple of 32, got {d}")


def _call(name, ins, template, grid, output_shapes, output_dtypes, stream, threadgroup):
    quant = range(1, 7) if "kw" in _BODIES[name]["inputs"] else ()  # q, then the six cache arrays
    return _build(_factory(), name)(
        inputs=[_cache_buffer(a) if i in quant else _device_buffer(a) for i, a in enumerate(ins)],
        template=template, grid=grid, threadgroup=threadgroup,
        output_shapes=output_shapes, output_dtypes=output_dtypes,
        init_value=float("nan") if _poison() else None, stream=stream,
    )


def _static_template(q, k, qspec, mask):
    return _template(qspec, q.dtype, k[1].dtype, mask.dtype)


def _template(qspec, dtype, scale_dtype, mask_dtype):
    spec = qspec.attention
    return [("T", dtype), ("ST", scale_dtype), ("MT", mask_dtype), ("DQK", spec.head_dim_qk),
            ("DV", spec.head_dim_v), ("BITS", qspec.bits), ("GS", qspec.group_size), ("R", _rows(spec)), ("NSG", NSG)]


def tile_keys(head_dim_qk: int, head_dim_v: int) -> int:
    """Keys per tile of the tiled forward: 32, or 16 where that does not fit the budget."""
    ld = max(head_dim_qk, head_dim_v) + 4  # mirrors mlxq::qtile_ld
    # the dq kernel also keeps dS: 2 logit-sized arrays
    return 32 if (32 * ld + 2 * TILE_NSG * 8 * 32) * 4 <= _TILE_BUDGET else 16


def _tiled(qspec, q, k, mask, feat):
    """(template, tile row blocks) of the tiled kernels."""
    spec = qspec.attention
    template = [t for t in _static_template(q, k, qspec, mask) if t[0] not in ("R", "NSG")] + [
        ("BK", tile_keys(spec.head_dim_qk, spec.head_dim_v)), ("NSG", TILE_NSG), ("FEAT", feat)]
    return template, -(-spec.group_size * spec.seqlen_q // (8 * TILE_NSG))


def _use_tiles(spec) -> bool:
    return spec.group_size * spec.seqlen_q >= TILE_MIN_ROWS


def _tiled_forward(q, k, v, qspec, inputs, stream, out_shape):
    spec = qspec.attention
    mask = _optional(inputs.mask, mx.float32)
    alibi, sinks = _optional(inputs.alibi, mx.float32), _optional(inputs.sinks, mx.float32)
    template, blocks = _tiled(qspec, q, k, mask, _features(spec))
    return _call(
        "quant_attention_fwd_tiled", [q, *k, *v, mask, alibi, sinks, _int_params(spec, inputs), _float_params(spec)],
        template, grid=(32 * TILE_NSG * blocks, spec.batch * spec.heads_kv, 1), threadgroup=(32 * TILE_NSG, 1, 1),
        output_shapes=[out_shape, out_shape[:3]], output_dtypes=[q.dtype, mx.float32], stream=stream,
    )


def quantized_attention_forward(q, k, v, qspec, inputs: AttentionInputs, stream):
    """(out, lse) from the (data, scales, biases) triples k, v; see dispatch.py."""
    spec = qspec.attention
    _check_dims(spec)
    out_shape = [spec.batch, spec.heads_q, spec.seqlen_q, spec.head_dim_v]
    lse_shape = out_shape[:3]
    if math.prod(lse_shape) == 0:
        return mx.zeros(out_shape, q.dtype), mx.full(lse_shape, -mx.inf, mx.float32)
    if _use_tiles(spec):
        out, lse = _tiled_forward(q, k, v, qspec, inputs, stream, out_shape)
        return out, lse
    mask = _optional(inputs.mask, mx.float32)
    alibi, sinks = _optional(inputs.alibi, mx.float32), _optional(inputs.sinks, mx.float32)
    forward, combine, iparams, fparams = _streaming_plan(qspec, q.dtype, k[1].dtype, mask.dtype,
                                                         _mask_shape(inputs.mask))
    out, lse, o_part, ml_part = _call("quant_attention_fwd", [q, *k, *v, mask, alibi, sinks, iparams, fparams],
                                      stream=stream, **forward)
    if combine is None:
        return out, lse
    return _call("quant_attention_combine", [o_part, ml_part, sinks, iparams, fparams], stream=stream, **combine)


def _mask_shape(mask):
    return None if mask is None else tuple(mask.shape)


@functools.lru_cache(maxsize=512)
def _streaming_plan(qspec, dtype, scale_dtype, mask_dtype, mask_shape):
    """(forward launch, combine launch or None, iparams, fparams) of the
    streaming forward: all but the arrays depends only on these arguments, and
    a decode step repeats them once per layer, so they are worked out once
    (ROWS, NSG and the SPLIT_* constants are read then: a tool that changes
    them calls `_streaming_plan.cache_clear()`)."""
    spec = qspec.attention
    out_shape = [spec.batch, spec.heads_q, spec.seqlen_q, spec.head_dim_v]
    lse_shape = out_shape[:3]
    feat = _features(spec)
    splits, per = _splits(spec)
    if splits > 1:
        feat |= QF_SPLIT
    iparams = _int_param_array(spec, mask_shape, per, splits)
    rows = math.prod(lse_shape)
    # The unused outputs of each mode are minimal placeholders.
    part_shapes = [[splits, rows, spec.head_dim_v], [splits, rows, 2]] if splits > 1 else [[8], [8]]
    shapes = ([out_shape, lse_shape] if splits == 1 else [[8], [8]]) + part_shapes
    forward = dict(template=_template(qspec, dtype, scale_dtype, mask_dtype) + [("FEAT", feat)],
                   grid=(32 * NSG * _row_blocks(spec), spec.batch * spec.heads_kv, splits),
                   threadgroup=(32 * NSG, 1, 1), output_shapes=shapes,
                   output_dtypes=[dtype, mx.float32, mx.float32, mx.float32])
    combine = None if splits == 1 else dict(
        template=[("T", dtype), ("DV", spec.head_dim_v), ("FEAT", feat)], grid=(32 * rows, 1, 1),
        threadgroup=(32, 1, 1), output_shapes=[out_shape, lse_shape], output_dtypes=[dtype, mx.float32])
    return forward, combine, iparams, _float_params(spec)


def quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs: AttentionInputs, stream):
    """dq of the quantized op (k, v constants); delta = dO . O - dlse."""
    spec = qspec.attention
    _check_dims(spec)
    if q.size == 0:
        return mx.zeros(q.shape, q.dtype)
    feat = _features(spec) & ~QF_SINKS  # the saved lse already holds the sinks
    mask = _optional(inputs.mask, mx.float32)
    alibi = _optional(inputs.alibi, mx.float32)
    ins = [q, *k, *v, dout.astype(q.dtype), lse, delta.astype(mx.float32), mask, alibi,
           _int_params(spec, inputs), _float_params(spec)]
    if _use_tiles(spec):
        template, blocks = _tiled(qspec, q, k, mask, feat)
        (dq,) = _call("quant_attention_dq_tiled", ins, template,
                      grid=(32 * TILE_NSG * blocks, spec.batch * spec.heads_kv, 1),
                      threadgroup=(32 * TILE_NSG, 1, 1), output_shapes=[list(q.shape)], output_dtypes=[q.dtype],
                      stream=stream)
        return dq
    splits, per = _splits(spec)
    if splits > 1:
        feat |= QF_SPLIT
        ins[-2] = _int_params(spec, inputs, per, splits)
    rows = math.prod(lse.shape)
    dq, dq_part = _call(
        "quant_attention_dq", ins,
        _static_template(q, k, qspec, mask) + [("FEAT", feat)],
        grid=(32 * NSG * _row_blocks(spec), spec.batch * spec.heads_kv, splits), threadgroup=(32 * NSG, 1, 1),
        output_shapes=[list(q.shape) if splits == 1 else [8], [splits, rows, spec.head_dim_qk] if splits > 1 else [8]],
        output_dtypes=[q.dtype, mx.float32], stream=stream,
    )
    if splits > 1:
        dq = mx.sum(dq_part, axis=0, stream=stream).reshape(q.shape).astype(q.dtype, stream=stream)
    return dq
