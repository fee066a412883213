"""CUDA backend: mx.fast.cuda_kernel wrappers over cuda_src/ (NVRTC inside MLX).

Kernels (cuda_src/):
  attention_fwd_ws    Hopper (sm_90) forward, warp-specialised (TMA producer warpgroup, two consumer
                      warpgroups), for the calls without extras beyond causal/windows (cuda_fwd_ws.py)
  attention_fwd_wgmma Hopper (sm_90) forward on warpgroup MMA (fp16/bf16, Dqk = Dv in {64, 128}),
                      128 query rows per block, ping-pong schedule without block masks: every other call
  attention_bwd_wgmma Hopper fused backward on warpgroup MMA (same cases), 128 keys per block
  attention_fwd_mma2  tensor-core forward (fp16/bf16, head dims <= 128), 32 query rows per warp
  attention_fwd_mma   tensor-core forward (fp16/bf16, any head dim), 16 query rows per warp
  attention_fwd_decode  fp16/bf16 decode (few query rows per KV head): tensor
                      cores, cp.async-pipelined K/V, optionally split over keys ...
  attention_fwd_simt  fp32-arithmetic forward: float32 inputs (and 16-bit decode
                      with head dims not multiples of 8), likewise split ...
  attention_combine   ... whose partial results this merges by lse
  attention_bwd_mma   tensor-core fused backward (fp16/bf16), dQ by atomics
  attention_bwd_delta delta = rowsum(dO * O) - dlse, the row term both tensor-core backwards read
  attention_bwd_simt  fp32-arithmetic fused backward (float32 inputs)

Every kernel receives the same inputs: q, k, v, the optional arrays (a
one-element placeholder where absent, so one source serves every feature
set), an int32 and a float32 parameter block (cuda_src/attention_common.cuh
names their slots). Feature flags, head dims and tile sizes are template
arguments, so each combination is compiled once by MLX and cached; sequence
lengths and head counts are runtime values and cost no recompilation.

Per-batch key ranges (key_start / key_len) are native (NATIVE_KEY_RANGES): every
attention kernel above narrows its key-tile loop (forward, decode splits) or
skips its key block (backward) to the batch row's range, and the shared logit
rules drop the keys of partly covered tiles; no mask is formed.

Nothing CUDA-specific is imported at module import time.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re

import mlx.core as mx

from .._sources import read_source
from .._spec import AttentionInputs, AttentionSpec
from . import cuda_host as _host

# The kernels read inputs.key_start / key_len (dispatch.fold_key_ranges is not applied).
NATIVE_KEY_RANGES = True
# Head dims the kernels take (the contract's: MLA's 576 / 512). Past 256, the
# tensor-core kernels split the output columns over blocks (_column_chunk).
HEAD_DIM_LIMITS = (576, 512)

# Shared memory one block may use on sm_80/sm_90 (227 KiB, less some headroom).
_MAX_SMEM = 220 * 1024
# About four blocks per SM of an H100/H200 (132 SMs): decode splits keys until
# there are that many, so enough K/V loads are in flight to fill memory bandwidth.
_TARGET_BLOCKS = 528

ATTENTION_HEADERS = ("attention_common.cuh", "mma.cuh", "attention_simt.cuh", "attention_fwd_mma.cuh",
                     "attention_bwd_mma.cuh")
# The headers each kernel body calls into; kernel_headers() adds what they
# #include. A body missing here gets every attention header. The compile test
# (tests/test_cuda_specific.py) builds each kernel with exactly this text.
_KERNEL_ROOTS = {
    "attention_fwd_mma": ("attention_fwd_mma.cuh",),
    "attention_fwd_mma2": ("attention_fwd_mma.cuh",),
    "attention_fwd_wgmma": ("attention_fwd_wgmma.cuh",),
    "attention_fwd_ws": ("attention_fwd_ws.cuh",),
    "attention_bwd_wgmma": ("attention_bwd_wgmma.cuh",),
    "attention_bwd_ws": ("attention_bwd_ws.cuh",),
    "attention_bwd_delta": ("attention_bwd_delta.cuh",),
    "attention_fwd_simt": ("attention_simt.cuh",),
    "attention_fwd_decode": ("attention_decode.cuh",),
    "attention_combine": ("attention_simt.cuh",),
    "attention_bwd_simt": ("attention_simt.cuh",),
    # attention_bwd_mma.cuh uses load_tile and block_tile_live of attention_fwd_mma.cuh.
    "attention_bwd_mma": ("attention_fwd_mma.cuh", "attention_bwd_mma.cuh"),
    "matmul": ("matmul.cuh",),
    "matmul_wgmma": ("matmul_wgmma.cuh",),
    "matmul_wgmma_ws": ("matmul_wgmma_ws.cuh",),
    "matmul_wgmma_ws_sk": ("matmul_wgmma_ws.cuh",),
    "matmul_wgmma_wa": ("matmul_wgmma_wa.cuh",),
    "matmul_wgmma_wa_sk": ("matmul_wgmma_wa_sk.cuh",),
    "matmul_gemv": ("matmul_gemv.cuh",),
    "fp8_quantize_rows": ("fp8_quantize_rows.cuh",),
    # flash_attention_quantized (cuda_quant.py)
    "attention_quant_fwd": ("attention_quant.cuh",),
    "attention_quant_bwd": ("attention_quant.cuh",),
    "attention_quant_fwd_mma": ("attention_quant_mma.cuh",),
    "attention_quant_decode": ("attention_quant_decode.cuh",),
}
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


@functools.lru_cache(maxsize=None)
def _read(name: str) -> str:
    return read_source("cuda_src", name)


@functools.lru_cache(maxsize=None)
def kernel_headers(body: str) -> tuple:
    """The .cuh files kernel `body` needs, each after the ones it includes."""
    roots = _KERNEL_ROOTS.get(body)
    if roots is None:
        return ATTENTION_HEADERS
    order = []

    def visit(name):
        if name not in order:
            for dep in _LOCAL_INCLUDE.findall(_read(name)):
                visit(dep)
            order.append(name)

    for root in roots:
        visit(root)
    return tuple(order)

# String and character literals (kept verbatim), then comments with the
# blanks around them and runs of blanks (each one space, or none at a line end).
_LEXEME = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''
                     r'|[ \t]*//[^\n]*|[ \t]*/\*.*?\*/[ \t]*|[ \t]+', re.S)


def _strip_lexeme(m) -> str:
    text = m.group(0)
    if text[0] in "\"'":
        return text
    if text.lstrip().startswith("//"):
        if text.rstrip().endswith("\\"):
            raise ValueError(f"line comment continued by a backslash: {text!r}")
        return ""
    return " "


def _minify(text: str) -> str:
    """Drop comments, blank lines and indentation; code, literals and # lines stay."""
    lines = []
    for line in _LEXEME.sub(_strip_lexeme, text).split("\n"):
        line = line.strip()
        # An empty line ending a backslash-continued one is kept: it ends the directive.
        if line or (lines and lines[-1].endswith("\\")):
            lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _header(names=ATTENTION_HEADERS) -> str:
    """The .cuh files as one header: NVRTC sees no include path for them.

    MLX rebuilds and hashes a kernel's whole source (its header included) at
    every launch, so each kernel gets only the headers it needs (see
    kernel_headers), without comments or indentation.
    """
    text = "\n".join(_read(name) for name in names)
    return _minify(re.sub(r'^\s*(#pragma once|#include\s+"[^"]+")\s*$', "", text, flags=re.M))


# Where the headers go as files (see _header_include); MLX_FLASH_CUDA_INLINE_HEADERS=1
# hands MLX the whole text instead.
_HEADER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mlx_flash", "cuda")


@functools.lru_cache(maxsize=None)
def _header_include(names: tuple) -> str:
    """The kernel header MLX gets: one `#include` of the minified text, saved once.

    MLX assembles a kernel's source (header included) at every call and hashes
    it at every launch; 20-37 KB of header made that a large part of a
    decode call's host time. NVRTC reads an included file itself, so the
    source MLX handles per call shrinks to a line. The file is named by the
    hash of its text and the line repeats that hash, so MLX's caches (keyed
    by the source text) can never pair an old binary with new text. Where the
    file cannot be written (read-only home), or where
    MLX_FLASH_CUDA_INLINE_HEADERS=1, the text goes inline as before.
    """
    import hashlib
    import tempfile

    text = _header(names)
    if os.environ.get("MLX_FLASH_CUDA_INLINE_HEADERS", "0") == "1":
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = os.path.join(_HEADER_CACHE, f"mlx_flash_{digest}.cuh")
    try:
        if not os.path.exists(path):
            os.makedirs(_HEADER_CACHE, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=_HEADER_CACHE, delete=False, suffix=".tmp") as f:
                f.write(text)
            os.replace(f.name, path)  # atomic: another process never reads half a file
    except OSError:
        return text
    if '"' in path or "\\" in path or not os.path.isabs(path) or not _nvrtc_reads_includes():
        return text
    return f'// mlx_flash header {digest}\n#include "{path}"\n'


@functools.lru_cache(maxsize=None)
def _nvrtc_reads_includes() -> bool:
    """Whether MLX's NVRTC compiles a kernel whose header #includes a file by
    absolute path: checked once per process on a one-line kernel (its binary
    is cached by MLX like any other), so a toolchain that cannot read files
    keeps the inline headers instead of failing every kernel."""
    import tempfile

    try:
        os.makedirs(_HEADER_CACHE, exist_ok=True)
        probe = os.path.join(_HEADER_CACHE, "mlx_flash_include_probe.cuh")
        if not os.path.exists(probe):
            with tempfile.NamedTemporaryFile("w", dir=_HEADER_CACHE, delete=False, suffix=".tmp") as f:
                f.write("__device__ inline float mlx_flash_probe_twice(float x) { return 2.f * x; }\n")
            os.replace(f.name, probe)
        kernel = mx.fast.cuda_kernel(
            name="mlx_flash_include_probe", input_names=["x"], output_names=["y"],
            source="y[0] = mlx_flash_probe_twice(x[0]);", header=f'#include "{probe}"\n')
        (y,) = kernel(inputs=[mx.array([1.5], mx.float32)], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                      output_shapes=[(1,)], output_dtypes=[mx.float32], stream=mx.gpu)
        return y.item() == 3.0
    except Exception:  # any failure (compile, launch): inline headers, as before
        return False


@functools.lru_cache(maxsize=None)
def _kernel(body: str, inputs: tuple, outputs: tuple, smem: int, headers=None, row_contiguous=True,
            constants: str = ""):
    """The kernel object of cuda_src/<body>.cu. row_contiguous=False: MLX passes
    inputs as they are (views included) and the kernel reads them through the
    `<name>_strides` parameters its source names (cuda_quant's caches).
    constants: template constants written into the source (_template_source),
    one kernel object per instance, called without `template`."""
    import hashlib

    name = f"mlx_flash_{body}"
    if constants:
        name += "_" + hashlib.sha256(constants.encode()).hexdigest()[:16]
    spec = (name, list(inputs), list(outputs), constants + _read(body + ".cu"),
            _header_include(tuple(headers or kernel_headers(body))), row_contiguous, smem)
    kernel = mx.fast.cuda_kernel(
        name=spec[0], input_names=spec[1], output_names=spec[2], source=spec[3], header=spec[4],
        ensure_row_contiguous=spec[5], shared_memory=spec[6],
    )
    _host.KERNEL_SPECS[id(kernel)] = spec  # what a recorded launch of it is rebuilt from (cuda_host.py)
    return kernel


# uint8: the fp8 codes of matmul2d's kernels (cuda_matmul writes its templates here too).
_CUDA_TYPE_NAMES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.bool_: "bool",
                    mx.uint8: "uint8_t"}


def _template_source(template) -> str:
    """The lines MLX writes for `template` at the top of a kernel body, written
    once: a call then hands MLX no template arguments to convert and format
    (about a microsecond of a decode call's host time)."""
    lines = []
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {_CUDA_TYPE_NAMES[value]};")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Shared-memory sizes, as the kernels lay them out (must match the .cuh files).

def _round16(x: int) -> int:
    return (x + 15) // 16 * 16


def _mma_fwd_smem(d: int, dv: int, nw: int, bn: int) -> int:
    return 2 * (16 * nw * (_round16(d) + 8) + bn * (_round16(d) + 8) + bn * (_round16(dv) + 8))


def _simt_fwd_smem(d: int, dv: int, warps: int) -> int:
    return 4 * (32 * (d + 1) + 32 * dv + warps * d)


def _simt_bwd_smem(d: int, dv: int, warps: int, nch: int = 1) -> int:
    """simt_bwd_smem of attention_simt.cuh (nch column chunks of dK/dQ and dV)."""
    per_warp = 4 * 32 * ((d + 1) + (dv + 1) + (-(-d // nch) + 1) + (-(-dv // nch) + 1))
    return warps * per_warp + 4 * (d + 2 * dv + 32 * warps)


# Widest O accumulator (columns) one warp of the forward kernels keeps in
# registers: a 16-row tile of 256 float columns is 128 registers a thread.
_MAX_ACC_COLUMNS = 256


def _column_chunk(dv: int) -> int:
    """V/O columns one forward block owns: all of them up to 256; past that
    equal chunks (multiples of 8, for 16-byte copies), one block each."""
    if dv <= _MAX_ACC_COLUMNS:
        return dv
    chunks = -(-dv // _MAX_ACC_COLUMNS)
    return -(-(-(-dv // chunks)) // 8) * 8


def _mma_bwd_chunks(d: int, dv: int) -> int:
    """Column chunks of the tensor-core backward: one up to 256 accumulator
    columns (a warp's dK and dV, 16 keys x D + DV: head dims <= 128), else the
    fewest whose chunks (DC + DVC columns) stay within 192, which ptxas keeps
    in registers beside the chunk's S^T, dP^T and softcap fragments."""
    if _round16(d) + _round16(dv) <= _MAX_ACC_COLUMNS:
        return 1
    nch = 2
    while _round16(-(-d // nch)) + _round16(-(-dv // nch)) > 192:
        nch += 1
    return nch


def _mma_bwd_smem(d: int, dv: int, bm: int, bn: int) -> int:
    dp, dvp = _round16(d) + 8, _round16(dv) + 8
    # K, V, dK staging reuse; Q, dO tiles; dS tile; lse and delta rows.
    return 2 * (bn * dp + bn * dvp + bm * dp + bm * dvp + bn * (bm + 8)) + 4 * 2 * bm


# ---------------------------------------------------------------------------
# Inputs common to every attention kernel.

# Per-batch key ranges (key_start, key_len), last so that a kernel body written
# without them still lines up; read only by instances with KEY_RANGE.
_KEY_RANGE_INPUTS = ("kstart", "klen")
_ATTN_INPUTS = ("q", "k", "v", "mask", "alibi", "sinks", "bmask", "cu_q", "cu_k", "ip", "fp") + _KEY_RANGE_INPUTS


# MLX's CUDA allocator (0.32.x, allocator.cpp) serves every array of at most
# 8 bytes from one managed-memory pool advised AccessedBy the GPU: the pool's
# pages stay in host memory, where the CPU writes small arrays (scalars),
# and every GPU read of them crosses PCIe. A kernel whose blocks start by
# reading such an array (the scale in `fp`, the splits in `ns`) waits on it:
# session 16 measured the 4-bit decode kernel at Nk 512 taking 46 us with
# them there and 15 us without (Nsight Compute, H100), and at Nk 32768 64-68
# against 35 us. So const_array pads every array to more than 8 bytes (the
# values a kernel reads come first; the padding is zeros) and, where the
# default device is a GPU, makes it there, in device memory.
_SMALL_POOL_BYTES = 8


def _past_small_pool(values: tuple, dtype) -> list:
    """`values`, then zeros until they span more than the small pool's 8 bytes."""
    vals = list(values)
    while len(vals) * dtype.size <= _SMALL_POOL_BYTES:
        vals.append(0)
    return vals


@functools.lru_cache(maxsize=4096)
def const_array(values: tuple, dtype) -> mx.array:
    """A small constant array, made once per value and kept, in device memory.

    MLX's CUDA allocator hands host-written arrays to the GPU through
    unified memory: a fresh one per call costs a page migration on first
    GPU touch (tens of microseconds each), more than a decode kernel runs;
    and arrays of at most 8 bytes share a pool that stays in host memory
    (above). The array holds `values`, then zeros until it spans more than 8 bytes.
    """
    host = mx.array(_past_small_pool(values, dtype), dtype=dtype)
    if mx.default_device() != mx.gpu:
        mx.eval(host)
        return host
    # Made by a GPU op, so MLX allocates it on the GPU stream: device memory (cudaMallocAsync), never migrated.
    zeros = mx.zeros(host.shape, dtype, stream=mx.gpu)
    array = mx.logical_or(zeros, host) if dtype == mx.bool_ else zeros + host
    mx.eval(array)
    return array


@functools.lru_cache(maxsize=4096)
def length_array(values: tuple, dtype) -> mx.array:
    """A small constant that changes with the key count (the int parameter
    block, which holds seqlen_k), written by the host: no GPU op, no eval.

    const_array's device copy is evaluated at once, and an eval waits for
    all the work queued on the stream. A generation loop builds step t + 1
    while step t runs (mx.async_eval, as mlx-lm's generate_step) and every
    step's first layer meets a new key count, so that wait serialised the
    host and the GPU once a step: on an H100 a 32-layer decode step (GQA
    32:8, 8K keys, tools/cuda_new_length_probe.py) took 3.78 ms against
    mx.fast's 2.88, and 2.80 with this block host-written
    (benchmarks/results/cuda_new_length_probe_nvidia_h100_s27c.json). The
    GPU's first read of a new block pages it over, once a length; the block
    spans more than the small pool's 8 bytes as const_array's do."""
    return mx.array(_past_small_pool(values, dtype), dtype=dtype)


def out_of_small_pool(x, stream=None):
    """`x` as a view of a device array of more than 8 bytes, where `x` itself has 8 bytes or less (a caller's
    per-tensor matmul scale): such arrays sit in MLX's host-resident small pool (above), and a kernel's warps
    reading them would each wait on PCIe. The copy is one more small op a call; larger arrays and None pass
    as they are. Not for arguments of calls the C++ replay records (a computed input refuses the record)."""
    if x is None or x.nbytes > _SMALL_POOL_BYTES:
        return x
    padded = mx.concatenate([x.reshape(-1), mx.zeros((16,), x.dtype, stream=stream)], stream=stream)
    return padded[:x.size].reshape(x.shape)


def _placeholder(dtype):
    return const_array((0,), dtype)


@functools.lru_cache(maxsize=None)
def _placeholders() -> tuple:
    """Stand-ins for absent mask, alibi, sinks, bmask, cu_q, cu_k (in that order)."""
    return tuple(_placeholder(d) for d in (mx.bool_, mx.float32, mx.float32, mx.bool_, mx.int32, mx.int32))


_NO_DIMS = (1, 1, 1, 1)


def _params(spec: AttentionSpec, inputs: AttentionInputs):
    """int32 and float32 parameter blocks (slots of attention_common.cuh)."""
    mask_dims = inputs.mask.shape if inputs.mask is not None else _NO_DIMS
    bm_dims = inputs.block_mask.shape if inputs.block_mask is not None else _NO_DIMS
    return _param_arrays(spec, mask_dims, bm_dims)


@functools.lru_cache(maxsize=4096)
def _param_arrays(spec: AttentionSpec, mask_dims: tuple, bm_dims: tuple):
    """_params' arrays, found by one lookup per call (building and hashing the
    17-slot tuple for const_array cost more than the rest of the lookup). The
    int block holds the key count: length_array's, never waiting on the GPU."""
    fp = (spec.scale, spec.softcap if spec.softcap else 1.0)
    return length_array(_int_params(spec, mask_dims, bm_dims), mx.int32), const_array(fp, mx.float32)


# Where the int block holds seqlen_k (attention_common.cuh's slots).
_IP_SEQLEN_K = 4


def _int_params(spec: AttentionSpec, mask_dims: tuple, bm_dims: tuple) -> tuple:
    """The int parameter block's values (slot _IP_SEQLEN_K: the key count)."""
    return (spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_q, spec.seqlen_k,
            spec.window_left, spec.window_right, spec.block_q, spec.block_k) + tuple(mask_dims) + tuple(bm_dims)


def _has_optional_arrays(inputs: AttentionInputs) -> bool:
    return not (inputs.mask is None and inputs.alibi is None and inputs.sinks is None and inputs.block_mask is None
                and inputs.cu_seqlens_q is None and inputs.key_start is None)


def _forward_inputs(q, k, v, spec: AttentionSpec, inputs: AttentionInputs) -> list:
    """_common_inputs + _key_range_inputs: every forward kernel's inputs."""
    if _has_optional_arrays(inputs):
        return _common_inputs(q, k, v, spec, inputs) + _key_range_inputs(inputs)
    # The usual decode call: no optional arrays, every slot a placeholder.
    ip, fp = _param_arrays(spec, _NO_DIMS, _NO_DIMS)
    mask, alibi, sinks, bmask, cu_q, cu_k = _placeholders()
    return [q, k, v, mask, alibi, sinks, bmask, cu_q, cu_k, ip, fp, cu_q, cu_q]


def _common_inputs(q, k, v, spec: AttentionSpec, inputs: AttentionInputs):
    ip, fp = _params(spec, inputs)
    mask, alibi, sinks, bmask, cu_q, cu_k = _placeholders()
    # A caller's array of 8 bytes or less here (key ranges or cu_seqlens at batch 1-2, sinks or ALiBi of one or
    # two heads) stays in MLX's host-resident small pool: a padded copy (out_of_small_pool) would be an input
    # computed in the call, which the C++ replay refuses (csrc/cuda_host.cpp, classify), putting those calls
    # back on the Python path's 16-46 us of host cost. Which costs more is not measured yet (docs/cuda_decode.md,
    # session 16).
    return [
        q, k, v,
        inputs.mask if inputs.mask is not None else mask,
        inputs.alibi if inputs.alibi is not None else alibi,
        inputs.sinks if inputs.sinks is not None else sinks,
        inputs.block_mask if inputs.block_mask is not None else bmask,
        inputs.cu_seqlens_q if inputs.cu_seqlens_q is not None else cu_q,
        inputs.cu_seqlens_k if inputs.cu_seqlens_k is not None else cu_k,
        ip, fp,
    ]


def _key_range_inputs(inputs: AttentionInputs) -> list:
    """key_start and key_len (int32 [B]), or placeholders where the call has none."""
    if inputs.key_start is None:
        return [_placeholder(mx.int32)] * 2
    return [inputs.key_start, inputs.key_len]  # at batch 1-2 in the small pool: see _common_inputs


def _feature_template(spec: AttentionSpec, inputs: AttentionInputs, with_sinks=True):
    return list(_features(spec, inputs.mask.dtype if inputs.mask is not None else mx.bool_, with_sinks))


_SEQLEN_K = AttentionSpec._fields.index("seqlen_k")
_MAX_SEQLEN_K = AttentionSpec._fields.index("max_seqlen_k")


@functools.lru_cache(maxsize=1024)
def _without_keys(spec: AttentionSpec) -> AttentionSpec:
    """`spec` with seqlen_k and max_seqlen_k zeroed: the key of what a call's key
    count does not change (templates, the decode plan's tiles, the decode
    launch of one plan). A growing KV cache (generation: every step's first
    layer meets a new length) then finds those in caches and works out only
    what depends on the length (the parameter block, the split count). Built
    by slicing (_replace costs ~3 us); once per spec."""
    return AttentionSpec._make(spec[:_SEQLEN_K] + (0,) + spec[_SEQLEN_K + 1:_MAX_SEQLEN_K] + (0,)
                               + spec[_MAX_SEQLEN_K + 1:])


@functools.lru_cache(maxsize=1024)
def _forward_template(spec: AttentionSpec, mask_dtype) -> tuple:
    """The forward kernels' common template arguments: features and head dims
    (the same for every key count: looked up by _without_keys at a new one)."""
    return _forward_template_of(_without_keys(spec), mask_dtype)


@functools.lru_cache(maxsize=1024)
def _forward_template_of(spec: AttentionSpec, mask_dtype) -> tuple:
    """_forward_template of a spec without key counts (nothing here reads them)."""
    return _features(spec, mask_dtype, True) + (("D", spec.head_dim_qk), ("DV", spec.head_dim_v))


_MASK_KINDS = {"none": 0, "bool": 1, "additive": 2}


@functools.lru_cache(maxsize=1024)
def _features(spec: AttentionSpec, mask_dtype, with_sinks: bool) -> tuple:
    return (
        ("T", spec.dtype), ("MT", mask_dtype),
        ("SOFTCAP", spec.softcap > 0), ("ALIBI", spec.has_alibi), ("MASK_KIND", _MASK_KINDS[spec.mask_kind]),
        ("WINDOW", spec.has_window), ("BLOCK_MASK", spec.has_block_mask),
        ("VARLEN", spec.varlen), ("KEY_RANGE", spec.has_key_range),
    ) + ((("SINKS", spec.has_sinks),) if with_sinks else ())


def _max_q(spec: AttentionSpec) -> int:
    return spec.max_seqlen_q if spec.varlen else spec.seqlen_q


def _max_k(spec: AttentionSpec) -> int:
    return spec.max_seqlen_k if spec.varlen else spec.seqlen_k


def _uses_mma(spec: AttentionSpec) -> bool:
    """Tensor cores for fp16/bf16 unless the call is decode-like (few rows per KV head)."""
    return spec.dtype in (mx.float16, mx.bfloat16) and _max_q(spec) * spec.group_size > 16 and not _packs_rows(spec)


def _packs_rows(spec: AttentionSpec) -> bool:
    """Wide heads with few queries and many query heads per KV head (MLA's
    absorbed decode: 1-4 queries, 16-128 heads, one latent KV head) run on the
    decode kernel, whose 16-row tiles pack (query, head) pairs, where that
    reads each K/V tile at most half as often as 64-query tiles per head do."""
    if max(spec.head_dim_qk, spec.head_dim_v) <= 256:
        return False
    nq, group = _max_q(spec), spec.group_size
    return 2 * math.ceil(nq * group / 16) <= group * math.ceil(nq / 64)


def _mma_fwd_tiles(spec: AttentionSpec):
    """(warps, key tile) of the mma forward for this head dim."""
    if max(spec.head_dim_qk, spec.head_dim_v) > 128:
        return 4, 32
    return _FWD_WARPS, 64


@functools.lru_cache(maxsize=None)
def compute_capability():
    """(major, minor) of the CUDA GPU, or None where MLX reports none (no
    CUDA GPU: the CPU machines that run the kernels in emulation)."""
    try:
        info = mx.device_info(mx.gpu)
        return int(info["compute_capability_major"]), int(info["compute_capability_minor"])
    except Exception:  # noqa: BLE001 (no such query in this MLX, or no GPU)
        return None


def _is_hopper() -> bool:
    """True on sm_90 (H100/H200), the only architecture with wgmma."""
    return compute_capability() == (9, 0)


def require_capability(setting: str, needed: tuple, what: str):
    """An opt-in setting whose instructions the GPU lacks: a ValueError
    naming it, instead of NVRTC's compile error at the first call. Nothing
    is checked where no GPU reports a capability (emulation)."""
    cc = compute_capability()
    if cc is not None and cc < needed:
        raise ValueError(f"{setting}: {what} needs compute capability {needed[0]}.{needed[1]} or later; "
                         f"this GPU is {cc[0]}.{cc[1]} (unset it)")


_WGMMA = os.environ.get("MLX_FLASH_CUDA_WGMMA", "1") == "1"
_WGMMA_BWD = os.environ.get("MLX_FLASH_CUDA_WGMMA_BWD", "1") == "1"


def _env_choice(name: str, default: int, allowed: tuple) -> int:
    value = os.environ.get(name, str(default))
    if value not in tuple(str(a) for a in allowed):
        raise ValueError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    return int(value)


# Key tile of the Hopper forward, and its schedule: 3 stages = the ping-pong
# schedule (attention_fwd_wgmma.cuh), used without block masks; 2 = in step.
_WGMMA_BN = _env_choice("MLX_FLASH_CUDA_WGMMA_BN", 128, (64, 128))
_WGMMA_STAGES = _env_choice("MLX_FLASH_CUDA_WGMMA_STAGES", 3, (2, 3))


def _uses_wgmma(spec: AttentionSpec, backward: bool = False) -> bool:
    """The Hopper kernels: fp16/bf16, Dqk = Dv in {64, 128}, on sm_90."""
    return ((_WGMMA_BWD if backward else _WGMMA) and _uses_mma(spec) and spec.head_dim_qk == spec.head_dim_v
            and spec.head_dim_qk in (64, 128) and _is_hopper())


def _uses_ws(spec: AttentionSpec) -> bool:
    """Hopper calls the warp-specialised forward may take (cuda_fwd_ws.serves
    decides): the wgmma kernel's, and the wide heads (96, 192, 256, 192 / 128)
    that would otherwise run on attention_fwd_mma."""
    return _WGMMA and _uses_mma(spec) and _is_hopper()


# Warps of the mma forward for head dims <= 128, and whether each warp takes
# two 16-row tiles (attention_fwd_mma2) instead of one.
_FWD_WARPS = int(os.environ.get("MLX_FLASH_CUDA_FWD_WARPS", "4"))
_FWD_TWO_TILES = os.environ.get("MLX_FLASH_CUDA_FWD_TWO_TILES", "1") == "1"


# ---------------------------------------------------------------------------
# Forward.

@functools.lru_cache(maxsize=None)
def _fwd_ws():
    """cuda_fwd_ws, imported on first use (it imports this module), then one
    cached call instead of an import statement per forward call."""
    from . import cuda_fwd_ws

    return cuda_fwd_ws


def attention_forward(q, k, v, spec: AttentionSpec, inputs: AttentionInputs, stream):
    lse_shape = tuple(q.shape[:-1])
    out_shape = lse_shape + (spec.head_dim_v,)
    mma = _uses_mma(spec)  # False: decode-like or float32 (the Hopper kernels are tensor-core kernels too)
    if mma and _WGMMA and _is_hopper():  # _uses_ws(spec), _uses_mma known
        cuda_fwd_ws = _fwd_ws()  # the warp-specialised kernel serves the calls without extras
        if cuda_fwd_ws.serves(spec):
            # Before the other kernels' argument lists: this launch takes none of them.
            return cuda_fwd_ws.forward(q, k, v, spec, out_shape, lse_shape, stream)
    args = _forward_inputs(q, k, v, spec, inputs)
    template = list(_forward_template(spec, inputs.mask.dtype if inputs.mask is not None else mx.bool_))
    if not mma:
        return _forward_simt(args, template, spec, out_shape, lse_shape, stream)
    if _uses_wgmma(spec):
        bn, stages, row_blocks, kernel = _wgmma_fwd_config(spec, _WGMMA_BN, _WGMMA_STAGES)
        template += [("BN", bn), ("STAGES", stages)]
        grid, threads = (row_blocks * 256, spec.heads_q, spec.batch), (256, 1, 1)
    else:
        nw, bn, blocks, tiles, kernel = _mma_fwd_config(spec)
        template += list(tiles)
        grid, threads = (blocks * 32 * nw, spec.heads_q, spec.batch), (32 * nw, 1, 1)
    shapes, dtypes = [out_shape, lse_shape], [spec.dtype, mx.float32]
    outputs = kernel(inputs=args, template=template, grid=grid, threadgroup=threads, output_shapes=shapes,
                     output_dtypes=dtypes, stream=stream)
    if _host.RECORDING is not None and _host.PREFILL:  # cuda_host.py replays the call (the default)
        _host.note_launch(kernel, args, outputs, stream, template, grid, threads, shapes, dtypes, None)
    return outputs[0], outputs[1]


@functools.lru_cache(maxsize=1024)
def _wgmma_fwd_config(spec: AttentionSpec, bn: int, stages: int):
    """(key tile, stages, row blocks, kernel) of the Hopper forward (128 query rows per block)."""
    stages = 2 if spec.has_block_mask else stages  # the ping-pong schedule has no tile skipping
    smem = 2 * (128 * spec.head_dim_qk + 2 * stages * bn * spec.head_dim_qk) + 1024  # wgmma_fwd_smem
    kernel = _kernel("attention_fwd_wgmma", _ATTN_INPUTS, ("out", "lse"), smem)
    return bn, stages, math.ceil(_max_q(spec) / 128), kernel


@functools.lru_cache(maxsize=1024)
def _mma_fwd_config(spec: AttentionSpec):
    """(warps, key tile, blocks along x, tile template, kernel) of the tensor-core
    forward; past 256 V columns each row block is DVC-column chunks, one block each."""
    nw, bn = _mma_fwd_tiles(spec)
    # Two 16-row tiles per warp (attention_fwd_mma2) for head dims <= 128.
    two_tiles = _FWD_TWO_TILES and max(spec.head_dim_qk, spec.head_dim_v) <= 128
    if two_tiles:
        bn = 32
    dvc = spec.head_dim_v if two_tiles else _column_chunk(spec.head_dim_v)
    rows_per_block = 16 * nw * (2 if two_tiles else 1)
    smem = 2 * (rows_per_block * (_round16(spec.head_dim_qk) + 8)) + _mma_fwd_smem(spec.head_dim_qk, dvc, 0, bn)
    body = "attention_fwd_mma2" if two_tiles else "attention_fwd_mma"
    kernel = _kernel(body, _ATTN_INPUTS, ("out", "lse"), smem)
    tiles = (("NW", nw), ("BN", bn)) + (() if two_tiles else (("DVC", dvc),))
    blocks = math.ceil(_max_q(spec) / rows_per_block) * math.ceil(spec.head_dim_v / dvc)
    return nw, bn, blocks, tiles, kernel


# Shared memory of one SM of an H100/H200 (228 KiB; the driver keeps 1 KiB per block).
_SM_SMEM = 228 * 1024
_SMS = 132
_MAX_SPLITS = 128  # kMaxSplits of attention_simt.cuh (attention_combine), kDecodeMaxSplits of attention_decode.cuh
# Tile shape of the decode kernel, normally chosen per head dim by _decode_config;
# tools/cuda_decode_check.py sets these to compare variants on the GPU.
DECODE_TUNING: dict = {}
_DECODE_PLAN_KEYS = ("nw", "bn", "stages", "splits", "waves", "tiles", "bulk", "kr", "pool")


def _parse_decode_plan(text: str) -> dict:
    """MLX_FLASH_CUDA_DECODE_PLAN, e.g. "nw=2,stages=4,kr=1": launch-plan
    defaults under DECODE_TUNING (for A/B runs on the GPU machine)."""
    plan = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = item.partition("=")
        if name not in _DECODE_PLAN_KEYS or not value.strip().isdigit():
            raise ValueError(f"MLX_FLASH_CUDA_DECODE_PLAN: expected name=integer items with names in "
                             f"{', '.join(_DECODE_PLAN_KEYS)}, got {item!r}")
        plan[name] = int(value)
    return plan


# The launch plan's measured defaults over the formulas of _decode_config and
# _decode_plan, under the environment's plan: keys as the mma's M where a
# block's rows fit 8 (KR) and the ticket pool (no zero fills). H200 sweep,
# GQA 32:8 and 32:4, 32K keys: 10% less GPU time per call than either alone
# or neither (docs/cuda_decode.md). Options: bulk (bulk-copy K/V stream),
# nw / bn / stages (tiles), splits / waves / tiles (split count).
_DECODE_DEFAULTS: dict = {"kr": 1, "pool": 1}
_DECODE_PLAN_ENV = _parse_decode_plan(os.environ.get("MLX_FLASH_CUDA_DECODE_PLAN", ""))
_DECODE_BASE_TUNING = tuple(sorted({**_DECODE_DEFAULTS, **_DECODE_PLAN_ENV}.items()))


def _decode_tuning() -> tuple:
    """DECODE_TUNING over MLX_FLASH_CUDA_DECODE_PLAN over the defaults, as a cache key."""
    if not DECODE_TUNING:
        return _DECODE_BASE_TUNING
    return tuple(sorted({**_DECODE_DEFAULTS, **_DECODE_PLAN_ENV, **DECODE_TUNING}.items()))


def _decode_kr(spec: AttentionSpec, tuning: tuple, bn: int) -> bool:
    """attention_fwd_decode's KR form: at most 8 rows per KV head, 16-key
    tiles, whole V rows (no column chunks), head dims <= 256."""
    return (bool(dict(tuning).get("kr", 0)) and _max_q(spec) * spec.group_size <= 8 and bn == 16
            and max(spec.head_dim_qk, spec.head_dim_v) <= 256)


def _decode_smem(d: int, dv: int, nw: int, bn: int, stages: int) -> int:
    """decode_fwd_smem of attention_decode.cuh: Q tile, then per warp a ring of K + V tiles."""
    return 2 * (16 * (_round16(d) + 8) + nw * stages * bn * (_round16(d) + 8 + _round16(dv) + 8))


def _decode_config(spec: AttentionSpec, tuning: tuple):
    """(warps, keys per warp tile, pipeline stages) of attention_fwd_decode: three
    stages where two blocks still fit an SM (head dims <= 128), else two. Wide
    heads (one block per SM, K rows of up to 576 dims): two warps, three stages."""
    return _decode_tiles(spec.head_dim_qk, _column_chunk(spec.head_dim_v), tuning)


@functools.lru_cache(maxsize=256)
def _decode_tiles(d: int, dv: int, tuning: tuple):
    """_decode_config of head dims (d, dv chunk): the same for every key count."""
    tuning = dict(tuning)
    wide = _decode_smem(d, dv, 4, 16, 2) > _SM_SMEM - 1024
    nw, bn = tuning.get("nw", 2 if wide else 4), tuning.get("bn", 16)
    if wide:
        stages = tuning.get("stages", 3 if _decode_smem(d, dv, nw, bn, 3) <= _SM_SMEM - 1024 else 2)
    else:
        stages = tuning.get("stages", 3 if _decode_smem(d, dv, nw, bn, 3) <= _SM_SMEM // 2 - 1024 else 2)
    return nw, bn, stages


def _effective_keys(spec: AttentionSpec) -> int:
    """Keys one query row can see at most (a left window bounds them)."""
    return _keys_seen(spec, _max_k(spec))


def _keys_seen(spec: AttentionSpec, keys: int) -> int:
    """_effective_keys of the spec with `keys` keys."""
    if spec.window_left >= 0:
        right = spec.window_right if spec.window_right >= 0 else keys
        keys = min(keys, spec.window_left + right + _max_q(spec))
    return max(keys, 1)


def decode_plan(spec: AttentionSpec):
    """Launch shape of attention_fwd_decode: (warps, keys per warp tile, stages,
    shared memory bytes, blocks along x per KV head (16-row blocks times V
    column chunks), key splits)."""
    return _decode_plan(spec, _decode_tuning())


@functools.lru_cache(maxsize=1024)
def _decode_plan(spec: AttentionSpec, tuning: tuple):
    """decode_plan, cached per spec (and per tuning override, for the variant sweep).
    Only the split count depends on the key count: the rest comes from
    _decode_plan_base, once per spec without key counts (a new cache length
    costs the few integer operations below)."""
    base = _decode_plan_base(_without_keys(spec), tuning)
    return base[:5] + (_decode_splits(base, _effective_keys(spec)),)


def _decode_splits(base: tuple, keys: int) -> int:
    """The split count of _decode_plan for `keys` effective keys, from its _decode_plan_base."""
    nw, bn, _, _, _, cap, tiles, forced = base
    if forced is None:
        splits = max(1, min(cap, math.ceil(keys / (tiles * nw * bn))))
    else:
        splits = max(1, min(_MAX_SPLITS, forced, math.ceil(keys / (nw * bn))))
    # The kernel rounds each split's keys up to whole rounds of nw tiles: drop splits left empty.
    chunk = math.ceil(math.ceil(keys / splits) / (nw * bn)) * nw * bn
    return math.ceil(keys / chunk)


# The largest key count a key-count family reaches (the int block holds seqlen_k as an int32).
_MAX_KEY_COUNT = 2 ** 31 - 1


def _decode_splits_until(base: tuple, keys: int) -> int:
    """The effective key count up to which _decode_splits(base, .) keeps the
    value it has at `keys` (>= 1): the first count where one of its steps
    (the first split count, a split's keys, their rounding to whole rounds of
    warp tiles, the final count) would change. Never past the true end; where
    steps change and the result does not (two ranges of one split count),
    short of it."""
    nw, bn, _, _, _, cap, tiles, forced = base
    u = nw * bn
    step, top = (tiles * u, cap) if forced is None else (u, min(_MAX_SPLITS, forced))
    first = -(-keys // step)
    end = first * step if first < top else _MAX_KEY_COUNT  # the first count grows with keys until it reaches top
    splits = max(1, min(top, first))
    per_split = -(-keys // splits)
    chunk = -(-per_split // u) * u  # a split's keys in whole rounds: the same while keys <= chunk * splits
    return min(end, chunk * splits, -(-keys // chunk) * chunk)  # the last: the final count ceil(keys / chunk)


def key_count_end(spec: AttentionSpec, end: int) -> int:
    """The largest key count from spec.seqlen_k on whose _keys_seen is at most
    `end` (keys seen follow the key count up to a two-sided window's bound,
    then stay there: past it, every count)."""
    if spec.window_left >= 0 and spec.window_right >= 0 and end >= spec.window_left + spec.window_right + _max_q(spec):
        return _MAX_KEY_COUNT
    return max(end, spec.seqlen_k)


def note_key_range(block, spec: AttentionSpec, key_range) -> None:
    """Tell the C++ replay, while it records a decode launch, that the launch serves every key count of
    `key_range()` ((lo, hi): decode_key_range or cuda_quant's) but for the int block `block`, which it
    writes anew per count. Only for specs without a mask, block mask, key ranges or packed sequences
    (the int block is then _int_params without their dims); nothing is worked out with the families off."""
    if _host.KEY_COUNTS:
        _host.note_key_count(block, _past_small_pool(_int_params(spec, _NO_DIMS, _NO_DIMS), mx.int32),
                             _IP_SEQLEN_K, *key_range())


def decode_key_range(spec: AttentionSpec, tuning: tuple) -> tuple:
    """(lo, hi): the key counts from the spec's own (lo) to hi whose decode
    launch is this one's in all but the int block's seqlen_k: the same split
    count (grid, SPLIT, the ws shape; the rest of the plan does not read the
    key count). csrc/cuda_host.cpp replays a recorded decode call at any key
    count of its range (a KV cache growing by one key a step keeps one record
    for 64-1024 steps); the spec must be one the int block fully describes
    (not varlen, no mask, block mask or key ranges, whose shapes or values
    follow the key count)."""
    base = _decode_plan_base(_without_keys(spec), tuning)
    return spec.seqlen_k, key_count_end(spec, _decode_splits_until(base, _effective_keys(spec)))


@functools.lru_cache(maxsize=1024)
def _decode_plan_base(spec: AttentionSpec, tuning: tuple):
    """What _decode_plan takes from the spec but its key counts (the caller
    zeroes them; nothing here reads them): (warps, keys per warp tile, stages,
    shared memory, row blocks, the split cap the SMs set, warp tiles a split
    gets at least, the "splits" option or None)."""
    nw, bn, stages = _decode_config(spec, tuning)
    dvc = _column_chunk(spec.head_dim_v)
    smem = _decode_smem(spec.head_dim_qk, dvc, nw, bn, stages)
    rows = 8 if _decode_kr(spec, tuning, bn) else 16  # a block's rows
    row_blocks = math.ceil(_max_q(spec) * spec.group_size / rows) * math.ceil(spec.head_dim_v / dvc)
    base_blocks = row_blocks * spec.batch * spec.heads_kv
    # Blocks for half of what every SM could hold at once (about one a SM),
    # each warp still getting at least two tiles: every split costs its
    # partial's stores and the merge's reads, and calls queued together (a
    # model's layers) fill the GPU between them (H200, GQA 32:4, 32K keys:
    # 32 splits = 128 blocks beat 64 by 20-35% per call in a 32-call step).
    per_sm = max(1, min(4, _SM_SMEM // (smem + 1024)))
    options = dict(tuning)
    waves = options.get("waves", 50) / 100  # percent of the SMs' resident blocks
    tiles = options.get("tiles", 2)
    cap = min(_MAX_SPLITS, int(_SMS * per_sm * waves) // base_blocks)
    return nw, bn, stages, smem, row_blocks, cap, tiles, options.get("splits")


def _forward_simt(args, template, spec: AttentionSpec, out_shape, lse_shape, stream):
    """Forward for decode-like 16-bit calls (attention_fwd_decode, one launch:
    its last block per row group merges the key splits) and for float32 inputs
    or head dims that are not multiples of 8 (attention_fwd_simt, keys split
    over blocks and the splits merged by attention_combine)."""
    d, dv = spec.head_dim_qk, spec.head_dim_v
    if spec.dtype != mx.float32 and d % 8 == 0 and dv % 8 == 0:
        kernel, used, pool, grid, threads, shapes, dtypes, init = _decode_launch(spec, args[3].dtype, lse_shape)
        inputs = list(used(args))
        if pool:
            inputs.append(_ticket_region(stream))
        outputs = kernel(inputs=inputs, grid=grid, threadgroup=threads, output_shapes=shapes,
                         output_dtypes=dtypes, init_value=init, stream=stream)
        if _host.RECORDING is not None:  # a call cuda_host.py will replay: note the launch
            _host.note_launch(kernel, inputs, outputs, stream, None, grid, threads, shapes, dtypes, init)
            if not (spec.varlen or spec.has_key_range or spec.has_block_mask or spec.mask_kind != "none"):
                note_key_range(args[9], spec, lambda: decode_key_range(spec, _decode_tuning()))
        return outputs[0], outputs[1]
    rows = math.prod(lse_shape)
    warps, row_blocks, splits, kernel = _simt_fwd_config(spec)
    template = template + [("W", warps), ("SPLITS", splits)]
    grid = (row_blocks * 32 * warps, splits, spec.batch * spec.heads_kv)
    threads = 32 * warps
    if splits == 1:
        shapes = [out_shape, lse_shape, (1,), (1,)]
    else:
        shapes = [(1,), (1,), (splits, rows, dv), (splits, rows)]
    out, lse, part_o, part_lse = kernel(
        inputs=args, template=template, grid=grid, threadgroup=(threads, 1, 1),
        output_shapes=shapes, output_dtypes=[spec.dtype, mx.float32, mx.float32, mx.float32],
        stream=stream,
    )
    if splits == 1:
        return out, lse
    combine = _kernel("attention_combine", ("part_o", "part_lse", "sinks", "ip", "ns"), ("out", "lse"), 0)
    out, lse = combine(
        inputs=[part_o, part_lse, args[5], args[9], const_array((splits,), mx.int32)],
        template=[("T", spec.dtype), ("DV", dv), ("SINKS", spec.has_sinks), ("VARLEN", spec.varlen)],
        grid=(rows * 128, 1, 1), threadgroup=(128, 1, 1),
        output_shapes=[out_shape, lse_shape], output_dtypes=[spec.dtype, mx.float32],
        stream=stream,
    )
    return out, lse


# Ticket pool of split decode calls (the "pool" plan option): each call takes
# the next of _TICKET_REGIONS regions of a zeroed uint32 array of its stream,
# and its groups' last blocks set their tickets back to 0, so no output needs
# MLX's zero fill (three fill nodes a call). A region serves again
# _TICKET_REGIONS calls later on that stream; MLX's CUDA graphs hold fewer
# than 255 nodes and the graphs of one stream run one after the other, so two
# calls never hold one region at once.
_TICKET_REGIONS = 1024
_TICKET_REGION_WORDS = 1024  # row groups a call may have on the pool (more: ws zero-filled)
_TICKET_POOLS: dict = {}  # stream -> [the array, its region views (made on first use), the call count]


def _ticket_region(stream) -> mx.array:
    """The stream's next ticket region (views made with the pool, all at once:
    no graph node or eval per call)."""
    pool = _TICKET_POOLS.get(stream)
    if pool is None:
        array = mx.zeros((_TICKET_REGIONS * _TICKET_REGION_WORDS,), mx.uint32, stream=stream)
        views = [array[i * _TICKET_REGION_WORDS:(i + 1) * _TICKET_REGION_WORDS] for i in range(_TICKET_REGIONS)]
        mx.eval(array, *views)
        pool = _TICKET_POOLS[stream] = [array, views, 0]
    calls = pool[2]
    pool[2] = calls + 1  # csrc/cuda_host.cpp's TicketPool::next does the same on a replayed call
    region = pool[1][calls % _TICKET_REGIONS]
    if _host.RECORDING is not None:
        _host.note_ticket_region(pool, region)
    return region


def _decode_ws_words(groups: int, splits: int, nc: int, rows: int, dv: int) -> int:
    """decode_ws_words of attention_decode.cuh: tickets, part_lse, part_o (float32 words)."""
    pad4 = lambda x: -(-x // 4) * 4  # noqa: E731
    return pad4(groups) + pad4(splits * nc * rows) + splits * rows * dv


def _decode_launch(spec: AttentionSpec, mask_dtype, lse_shape: tuple):
    """Everything of an attention_fwd_decode launch but its inputs: (kernel
    (template constants in its source), the getter of the inputs it takes
    from _forward_inputs' list, grid, threadgroup, output shapes, output
    dtypes, init value)."""
    return _decode_launch_cached(spec, mask_dtype, lse_shape, _decode_tuning())


@functools.lru_cache(maxsize=1024)
def _decode_launch_cached(spec: AttentionSpec, mask_dtype, lse_shape: tuple, tuning: tuple):
    """_decode_launch, built once per call shape (a decode call then costs one
    lookup here). A new shape (a growing KV cache meets one a step) works out
    its plan; the rest, the same for every key count of one plan, comes from
    _decode_launch_of_plan's cache. The kernel object is looked up here, not
    kept there: this cache is the one the CUDA emulation clears."""
    plan = _decode_plan(spec, tuning)
    names, smem, source, used, pool, grid, threads, shapes, dtypes, init = _decode_launch_of_plan(
        _without_keys(spec), mask_dtype, lse_shape, tuning, plan)
    kernel = _kernel("attention_fwd_decode", names, ("out", "lse", "ws"), smem, None, True, source)
    return kernel, used, pool, grid, threads, shapes, dtypes, init


@functools.lru_cache(maxsize=1024)
def _decode_launch_of_plan(spec: AttentionSpec, mask_dtype, lse_shape: tuple, tuning: tuple, plan: tuple):
    """What an attention_fwd_decode launch takes but its kernel object and
    inputs: (input names, shared memory, template source, the getter of its
    inputs from _forward_inputs' list, pool, grid, threadgroup, output
    shapes, output dtypes, init value). A function of the plan and of the
    spec without its key count (the caller zeroes seqlen_k / max_seqlen_k:
    nothing here reads them)."""
    nw, bn, stages, smem, row_blocks, splits = plan
    dv, dvc = spec.head_dim_v, _column_chunk(spec.head_dim_v)
    # Bulk (TMA) copies of whole K/V rows: 16-key tiles of whole rows only.
    bulk = bool(dict(tuning).get("bulk", 0)) and bn == 16 and dvc == dv
    if bulk:
        require_capability("MLX_FLASH_CUDA_DECODE_PLAN bulk=1 (or DECODE_TUNING['bulk'])", (9, 0),
                           "the bulk copy of K/V rows (cp.async.bulk with mbarriers)")
    template = list(_forward_template(spec, mask_dtype)) + [
        ("NW", nw), ("BN", bn), ("STAGES", stages), ("SPLIT", splits > 1), ("DVC", dvc), ("BULK", bulk),
        ("KR", _decode_kr(spec, tuning, bn))]
    groups = row_blocks * spec.batch * spec.heads_kv
    grid = (row_blocks * 32 * nw, splits, spec.batch * spec.heads_kv)
    out_shape = lse_shape + (dv,)
    pool = splits > 1 and bool(dict(tuning).get("pool", 0)) and groups <= _TICKET_REGION_WORDS
    if splits == 1:
        ws, init = 1, None
    else:
        # Zero-filled (unless the tickets come from the pool): the tickets that
        # pick each row group's merging block start at 0.
        ws, init = _decode_ws_words(groups, splits, -(-dv // dvc), math.prod(lse_shape), dv), None if pool else 0.0
    # Only the inputs the instance reads go to MLX (each costs host time per
    # call); the absent optional ones are null pointers the features never read.
    present = {"mask": spec.mask_kind != "none", "alibi": spec.has_alibi, "sinks": spec.has_sinks,
               "bmask": spec.has_block_mask, "cu_q": spec.varlen, "cu_k": spec.varlen,
               "kstart": spec.has_key_range, "klen": spec.has_key_range}
    used = [i for i, name in enumerate(_ATTN_INPUTS) if present.get(name, True)]
    present["tk"] = pool
    absent = "".join(f"  constexpr decltype(nullptr) {name} = nullptr;\n" for name in _ATTN_INPUTS + ("tk",)
                     if not present.get(name, True))
    names = tuple(_ATTN_INPUTS[i] for i in used) + (("tk",) if pool else ())
    return (names, smem, _template_source(template) + absent, operator.itemgetter(*used), pool, grid,
            (32 * nw, 1, 1), [out_shape, lse_shape, (ws,)], [spec.dtype, mx.float32, mx.float32], init)


@functools.lru_cache(maxsize=1024)
def _simt_fwd_config(spec: AttentionSpec):
    """(warps, row blocks, key splits, kernel) of the fp32-arithmetic forward."""
    warps = 8 if _max_q(spec) * spec.group_size <= 8 else 4
    row_blocks = math.ceil(_max_q(spec) * spec.group_size / warps)
    base_blocks = row_blocks * spec.batch * spec.heads_kv
    splits = max(1, min(64, _TARGET_BLOCKS // base_blocks, math.ceil(_max_k(spec) / 256)))
    smem = _simt_fwd_smem(spec.head_dim_qk, spec.head_dim_v, warps)
    kernel = _kernel("attention_fwd_simt", _ATTN_INPUTS, ("out", "lse", "part_o", "part_lse"), smem)
    return warps, row_blocks, splits, kernel


# ---------------------------------------------------------------------------
# Backward.

_BWD_SIMT_INPUTS = ("q", "k", "v", "mask", "alibi", "bmask", "cu_q", "cu_k", "ip", "fp", "dout", "lse", "o",
                    "dlse") + _KEY_RANGE_INPUTS
_BWD_MMA_INPUTS = ("q", "k", "v", "mask", "alibi", "bmask", "cu_q", "cu_k", "ip", "fp", "dout", "lse",
                   "delta") + _KEY_RANGE_INPUTS
_MMA_BWD_WARPS = 4
# Hopper backward's dV: 0 = issued after dS^T is packed and stored; 1 = as
# soon as P^T and dS^T are formed, so it runs under those stores and the
# barrier before dQ (attention_bwd_wgmma.cuh, DV_EARLY; the same bits).
# Opt-in: on an H100 (session 24, backward alone) 4 % faster at (2,16,4096,128),
# 7 % slower at (1,16,8192,128) fp16 (docs/cuda.md, "The dQ remedies on a card").
_BWD_DV_EARLY = _env_choice("MLX_FLASH_BWD_DV_EARLY", 0, (0, 1))
# Hopper backward's dQ atomics: 0 = float2 (the default); 1 = float4 after a
# lane exchange, half as many (attention_bwd_wgmma.cuh, DQ_V4): on an H100 the
# float2 atomics filled the LSU queue and held each warp at its tile boundary
# (session 23, Nsight). The same adds. Opt-in: on an H100 (session 24) it was
# 10 % slower at (1,16,8192,128) dense than the float2 atomics.
_BWD_DQ_V4 = _env_choice("MLX_FLASH_BWD_DQ_V4", 0, (0, 1))
# Hopper backward's block order: 0 = a head's key blocks adjacent (they share
# its Q and dO in L2); 1 = key block by key block over the heads, so under
# causal or a window the longest blocks (the first key blocks, which see the
# most query tiles) start first. Unset (-1): 1 with a window or causal and
# at least _BWD_HEADS_FIRST_KEYS keys, else 0. H200 fp16 fwd+bwd, causal
# (benchmarks/results/cuda_bwd_nvidia_h200*.json): 3.18 -> 3.00 and 3.185 ->
# 3.19 ms at (1,16,8192,128), 2.21 -> 2.00 and 2.15 -> 2.05 ms at
# (2,16,4096,128); at (4,16,1024,64) 0.58 -> 0.66 ms (8 key blocks a head:
# no long tail to shorten), so short sequences keep the adjacent order.
_BWD_HEADS_FIRST = _env_choice("MLX_FLASH_BWD_HEADS_FIRST", -1, (-1, 0, 1))
_BWD_HEADS_FIRST_KEYS = 4096


def _bwd_heads_first(spec: AttentionSpec) -> bool:
    if _BWD_HEADS_FIRST == -1:
        return spec.has_window and _max_k(spec) >= _BWD_HEADS_FIRST_KEYS
    return bool(_BWD_HEADS_FIRST)


# Warp-specialised Hopper backward (attention_bwd_ws.cuh: a producer warp
# streams Q, dO, lse and delta through a ring of _BWD_WS_STAGES buffers, the two
# consumer warpgroups never wait on their own loads): 1 = every call it serves
# (_bwd_ws_serves); -1 = those at head dim 128 with at least _BWD_WS_KEYS keys;
# 0 (default) = none. Opt-in: with its dQ writer it was 5% faster than
# attention_bwd_wgmma in the one H200 run that timed it (backward alone,
# (1,16,8192,128) fp16 dense: 3.79 against 3.99 ms,
# benchmarks/results/cuda_bwd_nvidia_h200_s8_round_b.json), within run-to-run
# noise, and causal, 4096 keys and bf16 were not timed on it.
_BWD_WS = _env_choice("MLX_FLASH_BWD_WS", 0, (-1, 0, 1))
_BWD_WS_KEYS = 4096
# Its dQ: 0 = float2 atomics from the consumers; 1 (default) = staged in shared
# memory by the consumers and added by warp 9 with bulk async reductions (as
# FlashAttention 3 does), which takes the atomics off the consumers' path
# (H200, (1,16,8192,128) fp16 dense: 3.79 ms against 5.00 with the atomics).
_BWD_WS_DQ = _env_choice("MLX_FLASH_BWD_WS_DQ", 1, (0, 1))
# Ring buffers: 3 fit shared memory at D 128 (195 KiB) beside the rest; with
# the dQ staging (34 KiB at D 128), 2.
_BWD_WS_STAGES = {False: 3, True: 2}


def _bwd_ws_serves(spec: AttentionSpec) -> bool:
    """The calls attention_bwd_ws takes (see _BWD_WS): fp16/bf16 on Hopper,
    Dqk = Dv in {64, 128}, dense batches, causal / window rules only (sinks
    too: the backward reads their effect through lse alone)."""
    if _BWD_WS == 0 or (_BWD_WS == -1 and (spec.head_dim_qk != 128 or _max_k(spec) < _BWD_WS_KEYS)):
        return False
    return (_uses_wgmma(spec, backward=True) and spec.head_dim_qk in (64, 128)
            and spec.softcap == 0 and not spec.has_alibi and spec.mask_kind == "none"
            and not spec.has_block_mask and not spec.varlen and not spec.has_key_range)


def _bwd_ws_kernel(dqw: bool):
    # One kernel object for both head dims: shared memory of D 128, the larger.
    return _kernel("attention_bwd_ws", ("q", "k", "v", "ip", "fp", "dout", "lse", "delta"),
                   ("dq_acc", "dk", "dv"), _bwd_ws_smem(128, _BWD_WS_STAGES[dqw], dqw))


def _bwd_ws_smem(d: int, stages: int, dqw: bool = False) -> int:
    """bwd_ws_smem of attention_bwd_ws.cuh: K, V, STAGES buffers of Q, dO, lse
    and delta, dS^T and P^T, 2 STAGES + 2 mbarriers, with dqw the dQ staging
    (64 rows of D + 8 floats, 16 bytes for its alignment), alignment slack."""
    return (2 * (2 * 128 * d + stages * 2 * 64 * d + 2 * 128 * 64) + stages * 2 * 64 * 4 + (stages * 2 + 2) * 8
            + (64 * (d + 8) * 4 + 16 if dqw else 0) + 1024)


def _backward_ws(q, k, v, lse, dout, delta, spec: AttentionSpec, inputs: AttentionInputs, stream):
    ip, fp = _params(spec, inputs)
    dqw = bool(_BWD_WS_DQ)
    stages = _BWD_WS_STAGES[dqw]
    kernel = _bwd_ws_kernel(dqw)
    return kernel(
        inputs=[q, k, v, ip, fp, dout, lse, delta],
        template=[("BF16", spec.dtype == mx.bfloat16), ("D", spec.head_dim_qk), ("WINDOW", spec.has_window),
                  ("STAGES", stages), ("HEADS_FIRST", _bwd_heads_first(spec)), ("DQW", dqw)],
        grid=(math.ceil(_max_k(spec) / 128) * 384, 1, spec.batch * spec.heads_kv), threadgroup=(384, 1, 1),
        output_shapes=[tuple(q.shape), tuple(k.shape), tuple(v.shape)],
        output_dtypes=[mx.float32, spec.dtype, spec.dtype],
        init_value=0.0, stream=stream,
    )


def attention_backward(q, k, v, out, lse, dout, dlse, spec: AttentionSpec, inputs: AttentionInputs, stream,
                       own_output=True):
    # delta = dO . O from out whatever own_output says (dispatch.py; docs/cuda.md, Known limits).
    common = _common_inputs(q, k, v, spec, inputs)
    args = common[:5] + common[6:] + [dout, lse]  # no sinks: their gradient is formed in attention.py
    template = _feature_template(spec, inputs, with_sinks=False) + [
        ("D", spec.head_dim_qk), ("DV", spec.head_dim_v)]
    mma = _uses_mma(spec)
    if mma and _bwd_ws_serves(spec):
        delta = _bwd_delta(dout, out, dlse, spec, stream)
        dq_acc, dk, dv = _backward_ws(q, k, v, lse, dout, delta, spec, inputs, stream)
    elif mma:
        delta = _bwd_delta(dout, out, dlse, spec, stream)
        if _uses_wgmma(spec, backward=True):
            key_blocks, kernel = _wgmma_bwd_config(spec)
            nw, nch, extra = 8, 1, [("HEADS_FIRST", _bwd_heads_first(spec)), ("DV_EARLY", bool(_BWD_DV_EARLY)),
                                 ("DQ_V4", bool(_BWD_DQ_V4))]
        else:
            nw, nch, key_blocks, kernel = _mma_bwd_config(spec)
            extra = [("NW", nw), ("NCH", nch)]
        dq_acc, dk, dv = kernel(
            inputs=args + [delta] + _key_range_inputs(inputs), template=template + extra,
            grid=(key_blocks * 32 * nw, nch, spec.batch * spec.heads_kv), threadgroup=(32 * nw, 1, 1),
            output_shapes=[tuple(q.shape), tuple(k.shape), tuple(v.shape)],
            output_dtypes=[mx.float32, spec.dtype, spec.dtype],
            init_value=0.0, stream=stream,
        )
    else:
        # Scalar path; delta is formed in the kernel (see attention_bwd_simt).
        args = args + [out, dlse if dlse is not None else _placeholder(mx.float32)] + _key_range_inputs(inputs)
        warps, nch, key_blocks, kernel = _simt_bwd_config(spec)
        dq_acc, dk, dv = kernel(
            inputs=args, template=template + [("W", warps), ("HAS_DLSE", dlse is not None), ("NCH", nch)],
            grid=(key_blocks * 32 * warps, nch, spec.batch * spec.heads_kv), threadgroup=(32 * warps, 1, 1),
            output_shapes=[tuple(q.shape), tuple(k.shape), tuple(v.shape)],
            output_dtypes=[mx.float32, spec.dtype, spec.dtype],
            init_value=0.0, stream=stream,
        )
    dq = dq_acc if spec.dtype == mx.float32 else dq_acc.astype(spec.dtype, stream=stream)
    return dq, dk, dv


_DELTA_THREADS = 256


def _bwd_delta(dout, out, dlse, spec: AttentionSpec, stream):
    """delta_i = dO_i . O_i - dlse_i (float32, out's shape without its last
    axis): one row reduction, as in FlashAttention-2, by attention_bwd_delta
    in one launch (was four MLX ops through float32 copies of dO and O)."""
    dv = spec.head_dim_v
    rows = math.prod(out.shape[:-1])
    if dout.shape != out.shape or out.shape[-1] != dv:
        raise ValueError(f"attention backward: dout shape {tuple(dout.shape)} must match out {tuple(out.shape)} "
                         f"(last axis {dv})")
    has_dlse = dlse is not None
    if has_dlse:
        if math.prod(dlse.shape) != rows:
            raise ValueError(f"attention backward: dlse shape {tuple(dlse.shape)} must match {tuple(out.shape[:-1])}")
        dlse = dlse.astype(mx.float32, stream=stream)
    per_block = _DELTA_THREADS // _delta_threads_per_row(dv)
    # _kernel is looked up per call (it caches the object): a kernel held here
    # would outlive a test's stand-in for _kernel (tests/test_cuda_host.py).
    kernel = _kernel("attention_bwd_delta", ("dout", "out", "dlse", "n"), ("delta",), 0)
    (delta,) = kernel(
        inputs=[dout, out, dlse if has_dlse else _placeholder(mx.float32), const_array((rows,), mx.int32)],
        template=[("T", spec.dtype), ("DV", dv), ("HAS_DLSE", has_dlse)],
        grid=(max(1, -(-rows // per_block)) * _DELTA_THREADS, 1, 1), threadgroup=(_DELTA_THREADS, 1, 1),
        output_shapes=[tuple(out.shape[:-1])], output_dtypes=[mx.float32], stream=stream)
    return delta


def _delta_threads_per_row(dv: int) -> int:
    """DeltaShape<DV>::kTpr of attention_bwd_delta.cuh: 8 up to 64 columns, 16 up
    to 128, else 32, for 16-byte chunks; 32 where Dv is not a multiple of 8."""
    if dv % 8:
        return 32
    chunks = dv // 8
    return 32 if chunks > 16 else 16 if chunks > 8 else 8


def _wgmma_bwd_smem(d: int) -> int:
    """wgmma_bwd_smem of attention_bwd_wgmma.cuh: K, V, two stages of Q and dO,
    dS^T and P^T, lse and delta, and alignment slack."""
    return 2 * (2 * 128 * d + 4 * 64 * d + 2 * 128 * 64) + 4 * 4 * 64 + 1024


@functools.lru_cache(maxsize=1024)
def _wgmma_bwd_config(spec: AttentionSpec):
    """(key blocks, kernel) of the Hopper backward: 128 keys and 8 warps per block."""
    smem = _wgmma_bwd_smem(spec.head_dim_qk)
    kernel = _kernel("attention_bwd_wgmma", _BWD_MMA_INPUTS, ("dq_acc", "dk", "dv"), smem)
    return math.ceil(_max_k(spec) / 128), kernel


@functools.lru_cache(maxsize=1024)
def _mma_bwd_config(spec: AttentionSpec):
    """(warps, column chunks, key blocks, kernel) of the tensor-core backward:
    64 keys and 64-row query tiles a block (16 keys a warp); in column chunks,
    32 and 32 where the full K, V, Q, dO tiles of 64 do not fit shared memory
    (141 KB at 576/512 for 32) or softcap's fragments would spill registers."""
    d, dv = spec.head_dim_qk, spec.head_dim_v
    nch = _mma_bwd_chunks(d, dv)
    fits = _mma_bwd_smem(d, dv, 16 * _MMA_BWD_WARPS, 16 * _MMA_BWD_WARPS) <= _MAX_SMEM
    nw = _MMA_BWD_WARPS if nch == 1 or (fits and not spec.softcap) else 2
    smem = _mma_bwd_smem(d, dv, 16 * nw, 16 * nw)
    kernel = _kernel("attention_bwd_mma", _BWD_MMA_INPUTS, ("dq_acc", "dk", "dv"), smem)
    key_blocks = math.ceil(_max_k(spec) / (16 * nw))
    return nw, nch, key_blocks, kernel


@functools.lru_cache(maxsize=1024)
def _simt_bwd_config(spec: AttentionSpec):
    """(warps, column chunks, key blocks, kernel) of the fp32-arithmetic backward:
    wide heads split dK/dQ and dV columns over blocks until one warp fits."""
    d, dv = spec.head_dim_qk, spec.head_dim_v
    nch = 1
    while _simt_bwd_smem(d, dv, 1, nch) > _MAX_SMEM:
        nch += 1
    warps = max([w for w in (1, 2, 3, 4) if _simt_bwd_smem(d, dv, w, nch) <= _MAX_SMEM - 4096] or [1])
    smem = _simt_bwd_smem(d, dv, warps, nch)
    kernel = _kernel("attention_bwd_simt", _BWD_SIMT_INPUTS, ("dq_acc", "dk", "dv"), smem)
    key_blocks = math.ceil(_max_k(spec) / (32 * warps))
    return warps, nch, key_blocks, kernel


# ---------------------------------------------------------------------------
# matmul2d lives in its own module (cuda_matmul.py); the backend interface is here.

def matmul2d(a, b, a_scale, b_scale, spec, stream):
    from .cuda_matmul import matmul2d as _matmul2d

    return _matmul2d(a, b, a_scale, b_scale, spec, stream)


# ---------------------------------------------------------------------------
# Attention over a quantized KV cache lives in its own module (cuda_quant.py).

@functools.lru_cache(maxsize=None)
def _quant():
    """cuda_quant, imported on first use (it imports this module; an import
    statement per call cost ~1 us of a decode call)."""
    from . import cuda_quant

    return cuda_quant


def quantized_attention_forward(q, k, v, qspec, inputs, stream):
    return _quant().quantized_attention_forward(q, k, v, qspec, inputs, stream)


def quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs, stream):
    return _quant().quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs, stream)
