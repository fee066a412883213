"""CUDA kernels of `flash_attention_quantized` (cuda_src/attention_quant*.cu).

  attention_quant_fwd      SIMT forward over the (data, scales, biases) triples:
                           RW query rows per warp (a decode step's GQA heads
                           share one warp), keys split over warps so a decode
                           step fills the GPU; a block's 8 warps (8 key chunks
                           of the same rows) merge in shared memory and write
                           one normalised partial result and lse per split ...
  attention_combine        ... which cuda.py's merge kernel combines (with the sinks)
  attention_quant_fwd_mma  tensor-core forward for 16-bit q with enough query rows
                           to fill the GPU without splitting keys (a prefill
                           chunk): 128 rows of one head per block (8 warps:
                           each dequantized K/V tile serves twice the rows of
                           4 warps; 64 rows when that leaves SMs idle), K/V
                           tiles dequantized into shared memory
                           as q's dtype, the next tile's raw words loading
                           while the current one is computed
  attention_quant_bwd      fused dq-only backward (k, v constants), no atomics
  attention_quant_decode   tensor-core decode (attention_quant_decode.cuh): a
                           few rows per KV head (G * Nq <= 8), 16-bit q, 4-/8-bit
                           cache, no mask/ALiBi; codes on mma.sync, scales in
                           fp32; splits merged by the last block in the same
                           launch (one launch per call, no attention_combine)

K and V are dequantized in registers as they stream in: no full-precision
copy exists. Nor a copy of the quantized cache: these kernels are built with
ensure_row_contiguous=False and read the six k/v arrays through their strides
(QuantCache in attention_quant.cuh), so the slices mlx-lm's QuantizedKVCache
returns (`keys[..., :offset, :]` of a preallocated buffer) are read in place;
the other inputs are made dense here (a no-op when they are). Launch plans are cached per QuantSpec like cuda.py's; the kernel
objects come from cuda.py's `_kernel` (per-kernel minified headers).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from .._spec import AttentionInputs
from . import cuda as _cuda

_FWD_INPUTS = ("q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "alibi", "ip", "fp", "ns")
_BWD_INPUTS = ("q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "alibi", "ip", "fp", "lse", "delta", "dout")
_DEC_INPUTS = ("q", "kw", "ks", "kb", "vw", "vs", "vb", "sinks", "ip", "fp", "ns", "tk")
_MMA_INPUTS = ("q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "alibi", "sinks", "ip", "fp")
# Tensor-core forward tile: warps per block (16 query rows each) and keys per
# tile. 8 x 64 holds one staged 32-value chunk of K and of V per thread
# without spills and halves the dequantization per row of 4 warps; chunks too
# small for a block of 8 warps per SM take 4 x 32 (4 x 64 would spill; both
# compiled in tests/test_cuda_quant_emu.py). TUNING "mma_warps" / "mma_bn"
# override for GPU sweeps.
_MMA_WARPS, _MMA_BN = 8, 64
_MMA_SMALL = (4, 32)
_SMS = 132  # H100/H200
_WARPS = 4  # warps per block of the backward (independent warps)
_FWD_WARPS = 8  # warps per block of the split forward: 8 key chunks merged in the block
# Warps to have in flight for a decode step (H100/H200: 132 SMs, 16 warps
# each), so enough quantized rows stream at once to fill memory bandwidth;
# a split keeps at least 4 tiles of 32 keys. TUNING overrides for GPU sweeps
# ("rw", "target_warps", "splits", "mma"; call forward_plan.cache_clear() after).
_TARGET_WARPS = 132 * 16
_MIN_SPLIT_KEYS = 128
TUNING: dict = {}
# Rows per warp at most: 4 keeps every feature combination in registers
# (8 spills with softcap + ALiBi + an additive mask; tests/test_cuda_quant_emu.py).
_MAX_RW = 4


def _kernel(body: str, inputs: tuple, outputs: tuple, smem: int, row_contiguous=True):
    """cuda.py's kernel cache; the headers come from its _KERNEL_ROOTS entry."""
    return _cuda._kernel(body, inputs, outputs, smem, None, row_contiguous)


def _strided_kernel(body: str, inputs: tuple, outputs: tuple, smem: int):
    """A kernel that reads k and v in place (views with any strides)."""
    return _kernel(body, inputs, outputs, smem, row_contiguous=False)


def _dense(x, stream):
    """x row-contiguous for a strided kernel, which indexes everything but k/v densely."""
    return mx.contiguous(x, stream=stream)


def _mma_blocks(spec, warps: int) -> int:
    return spec.batch * spec.heads_q * math.ceil(spec.seqlen_q / (16 * warps))


def mma_tile(qspec) -> tuple:
    """(warps per block, keys per tile) of attention_quant_fwd_mma."""
    nw, bn = (_MMA_WARPS, _MMA_BN) if _mma_blocks(qspec.attention, _MMA_WARPS) >= _SMS else _MMA_SMALL
    return TUNING.get("mma_warps", nw), TUNING.get("mma_bn", bn)


def uses_mma(qspec) -> bool:
    """The tensor-core forward: 16-bit q, head dims <= 128, and at least one
    block of 64 query rows per SM (fewer rows: the split SIMT kernel)."""
    if TUNING:
        return _uses_mma(qspec)
    return _uses_mma_default(qspec)


@functools.lru_cache(maxsize=1024)
def _uses_mma_default(qspec) -> bool:
    """uses_mma without TUNING overrides, once per spec."""
    return _uses_mma(qspec)


def _uses_mma(qspec) -> bool:
    spec = qspec.attention
    if spec.dtype not in (mx.float16, mx.bfloat16) or max(spec.head_dim_qk, spec.head_dim_v) > 128:
        return False
    if "mma" in TUNING:
        return bool(TUNING["mma"])
    return _mma_blocks(spec, _MMA_SMALL[0]) >= _SMS


def _mma_smem(qspec) -> int:
    """attention_quant_fwd_mma's shared memory: the Q tile, two stages of K and V
    tiles (padded rows) and the exact path's P."""
    nw, bn = mma_tile(qspec)
    d, dv = qspec.attention.head_dim_qk, qspec.attention.head_dim_v
    bm = 16 * nw
    return 2 * (bm * (d + 8) + 2 * bn * (d + 8) + 2 * bn * (dv + 8)) + 4 * bm * bn


def fwd_warps() -> int:
    """Warps per block of the split forward (TUNING "fwd_warps" for GPU sweeps)."""
    return TUNING.get("fwd_warps", _FWD_WARPS)


def _rows_per_warp(qspec) -> int:
    """Rows per warp: all of a decode step's rows per KV head (up to _MAX_RW)."""
    spec = qspec.attention
    rows = spec.seqlen_q * spec.group_size
    rw = TUNING.get("rw") or min(_MAX_RW, 1 << max(0, math.ceil(math.log2(max(rows, 1)))))
    return rw


@functools.lru_cache(maxsize=1024)
def forward_plan(qspec):
    """(rows per warp, warp groups per KV head, split blocks per group, shared memory bytes).

    A split block is _FWD_WARPS warps, each one key chunk, merged in the block."""
    spec = qspec.attention
    rw = _rows_per_warp(qspec)
    groups = math.ceil(spec.seqlen_q * spec.group_size / rw)
    nw = fwd_warps()
    base = spec.batch * spec.heads_kv * groups * nw
    keys = _cuda._effective_keys(spec)
    target = TUNING.get("target_warps", _TARGET_WARPS)
    # The fp32 partial results stay under an eighth of the quantized cache's
    # bytes (which a split pass reads anyway): decode splits freely, a prefill
    # chunk (many rows, enough warps already) rarely does.
    cache_bytes = spec.batch * spec.heads_kv * spec.seqlen_k * (spec.head_dim_qk + spec.head_dim_v) * (
        qspec.bits / 8 + 4 / qspec.group_size)
    part_bytes = spec.batch * spec.heads_q * spec.seqlen_q * (spec.head_dim_v + 1) * 4
    splits = max(1, min(math.ceil(target / base), math.ceil(keys / (_MIN_SPLIT_KEYS * nw)),
                        int(cache_bytes // (8 * part_bytes))))
    if "splits" in TUNING:
        splits = TUNING["splits"]
    splits = min(splits, _cuda._MAX_SPLITS)  # attention_combine merges at most this many
    smem = 4 * nw * (rw * (spec.head_dim_qk + spec.head_dim_v + 2)
                             + stage_words(spec.head_dim_v, qspec.bits, qspec.group_size))
    return rw, groups, splits, smem


def stage_keys(dv: int, bits: int, group_size: int) -> int:
    """quant_stage_keys of attention_quant.cuh: V keys a forward warp stages at once."""
    per_key = dv * bits // 8 + 8 * (dv // group_size)
    return 32 if 32 * per_key <= 6144 else 8


def stage_words(dv: int, bits: int, group_size: int) -> int:
    """VStage::FLOATS: 4-byte words of one warp's V stage (raw words, scales, biases)."""
    return stage_keys(dv, bits, group_size) * (dv * bits // 32 + 2 * (dv // group_size))


def _template(qspec, inputs: AttentionInputs, k, v, rw, warps=_WARPS):
    mask_dtype = inputs.mask.dtype if inputs.mask is not None else mx.bool_
    return list(_template_args(qspec, mask_dtype, k[1].dtype, v[1].dtype, rw, warps))


@functools.lru_cache(maxsize=1024)
def _template_args(qspec, mask_dtype, k_scales_dtype, v_scales_dtype, rw, warps) -> tuple:
    """_template's arguments, built once per (spec, dtypes, tile)."""
    spec = qspec.attention
    return (
        ("T", spec.dtype), ("KST", k_scales_dtype), ("VST", v_scales_dtype), ("MT", mask_dtype),
        ("SOFTCAP", spec.softcap > 0), ("ALIBI", spec.has_alibi), ("MASK_KIND", _cuda._MASK_KINDS[spec.mask_kind]),
        ("WINDOW", spec.has_window), ("D", spec.head_dim_qk), ("DV", spec.head_dim_v),
        ("BITS", qspec.bits), ("GS", qspec.group_size), ("W", warps), ("RW", rw),
    )


def _operands(q, k, v, qspec, inputs: AttentionInputs, stream):
    """Inputs of the strided kernels: k and v triples as given, the rest dense."""
    mask, alibi = _cuda._placeholders()[:2]
    if inputs.mask is None and inputs.alibi is None:
        ip, fp = _cuda._param_arrays(qspec.attention, _cuda._NO_DIMS, _cuda._NO_DIMS)
        return [_dense(q, stream), *k, *v, mask, alibi, ip, fp]
    ip, fp = _cuda._params(qspec.attention, inputs)
    mask = _dense(inputs.mask, stream) if inputs.mask is not None else mask
    alibi = _dense(inputs.alibi, stream) if inputs.alibi is not None else alibi
    return [_dense(q, stream), *k, *v, mask, alibi, ip, fp]


def quantized_attention_forward(q, k, v, qspec, inputs: AttentionInputs, stream):
    """(out, lse) from the (data, scales, biases) triples k, v; see dispatch.py."""
    spec = qspec.attention
    if q.size == 0:  # no query rows: nothing to launch (and no plan: its sizes divide by the rows)
        return (mx.zeros(tuple(q.shape[:-1]) + (spec.head_dim_v,), spec.dtype, stream=stream),
                mx.zeros(tuple(q.shape[:-1]), mx.float32, stream=stream))
    if uses_decode(qspec):
        return _forward_decode(q, k, v, qspec, inputs, stream)
    if uses_mma(qspec):
        return _forward_mma(q, k, v, qspec, inputs, stream)
    rw, groups, splits, smem = forward_plan(qspec)
    rows = spec.batch * spec.heads_q * spec.seqlen_q
    dv = spec.head_dim_v
    ns = _cuda.const_array((splits,), mx.int32)
    args = _operands(q, k, v, qspec, inputs, stream)
    kernel = _strided_kernel("attention_quant_fwd", _FWD_INPUTS, ("part_o", "part_lse"), smem)
    part_o, part_lse = kernel(
        inputs=args + [ns], template=_template(qspec, inputs, k, v, rw, fwd_warps()),
        grid=(groups * splits * 32 * fwd_warps(), 1, spec.batch * spec.heads_kv),
        threadgroup=(32 * fwd_warps(), 1, 1),
        output_shapes=[(splits, rows, dv), (splits, rows)], output_dtypes=[mx.float32, mx.float32],
        stream=stream,
    )
    # The splits merge in the attention kernels' own attention_combine (one
    # block per row; same partial layout, lse and non-finite rules).
    sinks = inputs.sinks if inputs.sinks is not None else _cuda._placeholders()[2]
    combine = _kernel("attention_combine", ("part_o", "part_lse", "sinks", "ip", "ns"), ("out", "lse"), 0)
    out, lse = combine(
        inputs=[part_o, part_lse, sinks, args[9], ns],
        template=[("T", spec.dtype), ("DV", dv), ("SINKS", spec.has_sinks), ("VARLEN", False)],
        grid=(rows * 128, 1, 1), threadgroup=(128, 1, 1),
        output_shapes=[tuple(q.shape[:-1]) + (dv,), tuple(q.shape[:-1])], output_dtypes=[spec.dtype, mx.float32],
        stream=stream,
    )
    return out, lse


def backward_plan(qspec):
    """(rows per warp, warp groups per KV head, shared memory bytes) of the backward."""
    spec = qspec.attention
    rw = _rows_per_warp(qspec)
    groups = math.ceil(spec.seqlen_q * spec.group_size / rw)
    return rw, groups, 4 * _WARPS * rw * (spec.head_dim_qk + spec.head_dim_v)


def quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs: AttentionInputs, stream):
    """dq of the quantized op (k, v constants); delta = dO . O - dlse."""
    spec = qspec.attention
    if q.size == 0:
        return mx.zeros(q.shape, spec.dtype, stream=stream)
    rw, groups, smem = backward_plan(qspec)
    kernel = _strided_kernel("attention_quant_bwd", _BWD_INPUTS, ("dq",), smem)
    dense = lambda x: _dense(x, stream)
    (dq,) = kernel(
        inputs=_operands(q, k, v, qspec, inputs, stream) + [
            dense(lse), dense(delta), dense(dout.astype(spec.dtype, stream=stream))],
        template=_template(qspec, inputs, k, v, rw),
        grid=(math.ceil(groups / _WARPS) * 32 * _WARPS, 1, spec.batch * spec.heads_kv),
        threadgroup=(32 * _WARPS, 1, 1),
        output_shapes=[tuple(q.shape)], output_dtypes=[spec.dtype], stream=stream,
    )
    return dq


def _forward_mma(q, k, v, qspec, inputs: AttentionInputs, stream):
    spec = qspec.attention
    sinks = _dense(inputs.sinks, stream) if inputs.sinks is not None else _cuda._placeholders()[2]
    args = _operands(q, k, v, qspec, inputs, stream)
    kernel = _strided_kernel("attention_quant_fwd_mma", _MMA_INPUTS, ("out", "lse"),
                             _mma_smem(qspec))
    nw, bn = mma_tile(qspec)
    template = [x for x in _template(qspec, inputs, k, v, 1) if x[0] not in ("W", "RW")] + [
        ("SINKS", spec.has_sinks), ("NW", nw), ("BN", bn)]
    out, lse = kernel(
        inputs=args[:9] + [sinks] + args[9:], template=template,
        grid=(math.ceil(spec.seqlen_q / (16 * nw)) * 32 * nw, spec.heads_q, spec.batch),
        threadgroup=(32 * nw, 1, 1),
        output_shapes=[tuple(q.shape[:-1]) + (spec.head_dim_v,), tuple(q.shape[:-1])],
        output_dtypes=[spec.dtype, mx.float32], stream=stream,
    )
    return out, lse


# ---- tensor-core decode (attention_quant_decode.cuh) ---------------------------------
# Warps per block (interleaved 16-key tiles of one KV head's split, merged in
# shared memory), each tile's words loaded into registers (one tile in flight
# a warp). Splits: one wave of the blocks that fit an SM (_DEC_RESIDENT_WARPS);
# every split at least _DEC_MIN_TILES tiles per warp.
# Tickets from cuda.py's pool (no zero fill).
# TUNING "dec_warps" / "dec_splits" / "dec_prefetch" (the one-tile prefetch) /
# "dec_blocks_per_sm" / "dec_pool" / "dec_keys_m" / "dec_fold" / "dec_l2pf" /
# "dec_tiles" / "dec_late_scales" / "dec_q_shared" / "decode" override for GPU sweeps (call
# decode_plan.cache_clear() after; the launch cache keys on TUNING itself).
_DEC_WARPS = 4
# Splits: one wave of the blocks that fit an SM. Registers a thread under
# MLX's NVRTC (tools/nvrtc_regs.py --only qdec, sm_90a): D 128 137 (4-bit)
# to 162 (8-bit), 3 blocks of 4 warps an SM; D 256 184 and TILES 2 170-248,
# 2 blocks. Measured with a model's chained step (each layer's query the
# last one's output, so one kernel at a time), 4-bit, GQA 32:8, Nk 32768:
# H100 (benchmarks/results/cuda_quant_decode_chain_nvidia_h100_s15.json)
# 16 splits (one block an SM, sessions 7-14's default) 71.5-71.8 us a call,
# 33 64.0, 49 (3 an SM) 61.4-61.8, 66 82.4, 99 83.3, 132 93.4: a second,
# partial wave costs more than the warps it adds; H200 (..._h200_s15.json)
# 4-bit 16 / 33 / 49 splits 81.2 / 75.3 / 73.9-77.6, 8-bit 106.3 / 96.6 /
# 77.7-83.3. Sessions 7-14 chose one block an SM on steps whose 32 calls
# were independent and ran concurrently (docs/cuda_decode.md, session 14).
# D <= 128 and TILES 1 / D 256 or TILES 2 / 4-bit D <= 128 TILES 1 with Q's fragments in shared memory
# (TUNING "dec_q_shared": 108-110 registers under NVRTC, four 4-warp blocks an SM).
_DEC_RESIDENT_WARPS = {"narrow": 12, "wide": 8, "q_shared": 16}
_DEC_MIN_TILES = 4
_DEC_MAX_SPLITS = 256
# The opt-in shared-memory ring (TUNING "dec_stages" > 0: STAGES slots a warp
# filled by cp.async) was removed in session 12: on the H200 it lost to the
# register path in sessions 7-10 (docs/cuda_decode.md); a leftover setting is
# an error, not silently ignored.
_RING12 = "removed in session 12 (it lost to the register path on the H200 in sessions 7-10)"
_DEC_REMOVED = {
    "dec_stages": f"the shared-memory ring was {_RING12}",
    "dec_ring_debug": f"the shared-memory ring's diagnostics were {_RING12}",
    "dec_ring": "the per-lane cp.async ring was removed in session 16 (no faster than the register path on an "
                "H100: 35.6-37.8 against 35.8-37.2 us a kernel)",
    "dec_release": "the acquire-release merge ticket was removed in session 17 (3002043; on an H100 the kernel "
                   "alone 35.3-35.8 against 35.7-35.8 us, chained 48.8 against 46.5 us a call)",
}
_DEC_PREFETCH = False  # TUNING "dec_prefetch": the register path loads the next tile during the current one
# TUNING "dec_keys_m": S^T = K Q^T (the tile's keys on the mma's M, P^T's
# fragments transposed by movmatrix) with one-LOP3 code conversion. Half the mma and no operand-quad
# copies of S = Q K^T. 2: also K's fp16 codes with their magic kept
# (1024 + c: one op a code pair fewer), the offset (1024 sum(q)) taken out
# in fp32. Not routed: on the H200 (session 8, cuda_quant_decode_nvidia_h200_s8.json)
# 11-14 % fewer instructions but no time outside the run-to-run spread.
_DEC_KEYS_M = 0
# TUNING "dec_fold": the codes of K and V both keep their fp16 magic (1024 + c;
# 4-bit odd positions 1024 + 16 c), so a code costs one LOP3: K's offset
# (1024 sum(q)) leaves in fp32 as KEYS_M 2's does, V's (1024 P') by one more
# mma an m-tile (A = -1024), odd columns / 16 at the end. Scales and biases
# were already outside the per-code work (S per group, P scaled per V group).
# fp16 q only (bf16 keeps its exact codes). Not routed: on the H200
# (session 10, cuda_quant_decode_nvidia_h200_s10.json) 13.5 % fewer
# instructions, no time outside the routed plan's spread (ncu: slower).
_DEC_FOLD = False
# TUNING "dec_l2pf": the register path requests its tile that many tiles
# ahead into L2 (prefetch.global.L2, a 128-byte line a lane of a dense cache's
# segments: one warp instruction a tile at 4-bit D 128), so that more than one tile's bytes a warp are in
# flight (the register path's 4 warps an SM, one tile each, cover a small
# part of DRAM's latency). 0: off. Not routed: on the
# H200 (session 10) L2 hits 16 -> 39 % and no time gained: a tile does not
# wait on DRAM's latency.
_DEC_L2PF = 0
# TUNING "dec_tiles" (issue 16): the register path takes that many of a
# warp's interleaved 16-key tiles an iteration as one softmax step (their
# loads issued together, their S mma chains, code conversions and exps
# independent; max / sum / rescale once per iteration), so that its one warp
# a scheduler has independent instructions while a tile's results are
# pending: session 10 found each warp's chain of dependent steps, not
# instructions or DRAM latency, setting the time. 1: main's loop. The
# register path's S = Q K^T only (no KEYS_M or L2PF); FOLD and the
# one-tile prefetch (dec_prefetch, then TILES tiles ahead) combine with it.
# Not routed: proven in the CPU emulation only, never timed on a card.
_DEC_TILES = 1
# TUNING "dec_late_scales" (template LATE): the register path keeps a tile's
# scales and biases as raw bits until it stages them, converting them there.
# Converted at load (main), the first conversion waits on DRAM right after
# the tile's loads are issued (the end of the iteration, or with
# dec_prefetch the start of the current tile's work), so every iteration
# exposes a whole load latency on its one warp a scheduler (a static
# in-order model of the routed SASS: ~540 of its ~1600 cycles a tile).
# Not routed: never timed on a card.
_DEC_LATE_SCALES = False


def uses_decode(qspec) -> bool:
    """The tensor-core decode kernel: 16-bit q (bf16 only over 4-bit codes,
    whose 128 + code is exact), 4- or 8-bit groups spanning 8 words (4-bit:
    group >= 64), head dims <= 256 (8-bit: Dv <= 128; wider spills), at most 8 (query, head) rows per KV head,
    no mask, ALiBi or block mask. Everything else keeps the kernels above."""
    if "decode" in TUNING:
        return bool(TUNING["decode"]) and _decode_eligible(qspec)
    return _decode_eligible(qspec)


@functools.lru_cache(maxsize=1024)
def _decode_eligible(qspec) -> bool:
    spec = qspec.attention
    bits, gs = qspec.bits, qspec.group_size
    if spec.dtype not in (mx.float16, mx.bfloat16) or bits not in (4, 8) or bits * gs < 256:
        return False
    if spec.dtype == mx.bfloat16 and bits == 8:
        return False
    if max(spec.head_dim_qk, spec.head_dim_v) > 256 or bits * spec.head_dim_v > 1024 or spec.seqlen_q * spec.group_size > 8:
        return False
    return spec.mask_kind == "none" and not spec.has_alibi and not getattr(spec, "has_block_mask", False)


def decode_removed_tuning() -> None:
    """A ValueError naming any TUNING key of a removed decode variant (_DEC_REMOVED)."""
    for key, what in _DEC_REMOVED.items():
        if key in TUNING:
            raise ValueError(f"cuda_quant TUNING[{key!r}]: {what}; remove the key, got {TUNING[key]!r}")


def decode_register_options() -> tuple:
    """(FOLD, L2PF) of a launch: TUNING's "dec_fold" / "dec_l2pf" where given, else _DEC_FOLD / _DEC_L2PF."""
    return bool(TUNING.get("dec_fold", _DEC_FOLD)), int(TUNING.get("dec_l2pf", _DEC_L2PF))


def decode_tiles(qspec, keys_m: int, l2pf: int) -> int:
    """Tiles a warp takes an iteration (TUNING "dec_tiles", else _DEC_TILES): 1 or 2 (4 spills: 4-bit D 128
    under nvcc, 255 registers and 88 bytes); 2 only without KEYS_M or L2PF, head dims
    <= 128 (D 256: 250-255 registers, 8-bit spills), and with the prefetch (dec_prefetch) 4-bit only (8-bit
    with features spills 56 bytes at 255, nvcc and NVRTC); an error naming the setting otherwise."""
    tiles = TUNING.get("dec_tiles", _DEC_TILES)
    if isinstance(tiles, bool) or tiles not in (1, 2):
        raise ValueError(f"cuda_quant TUNING['dec_tiles'] must be 1 or 2, got {tiles!r}")
    head_dim = max(qspec.attention.head_dim_qk, qspec.attention.head_dim_v)
    if tiles > 1 and (keys_m or l2pf or head_dim > 128):
        raise ValueError(f"cuda_quant TUNING['dec_tiles'] = {tiles} is for S = Q K^T at head dims <= 128; "
                         f"dec_keys_m = {keys_m}, dec_l2pf = {l2pf}, head dim {head_dim} were given or routed")
    if tiles > 1 and qspec.bits != 4 and TUNING.get("dec_prefetch", _DEC_PREFETCH):
        raise ValueError(f"cuda_quant TUNING['dec_tiles'] = {tiles} with 'dec_prefetch' is for 4-bit codes "
                         f"({qspec.bits}-bit spills)")
    return int(tiles)


# TUNING "dec_q_shared" (template QSF, issue 16): Q's fragments in the
# warp's shared memory at head dims <= 128 too (as at 256), read once a
# k-step; the 4-bit D 128 instance takes 108 registers under MLX's NVRTC
# (routed 137; bf16 with features 110; 8-bit 146), so the plan fills one
# wave of four blocks an SM (66 splits at GQA 32:8) instead of three.
# Session 16 found the loop (not memory) setting the kernel's time once the
# constant arrays left host memory; more warps an SM is the lever it
# points to. Not routed: on the H100 (session 17, tools/card_round_next.sh t,
# benchmarks/results/cuda_quant_decode_q_shared_nvidia_h100_s17.json) the
# kernel at Nk 32768 took 39.1-39.6 us against routed 35.7-36.5, and the
# chained step ran 1.23x mx.fast against routed 1.42x (8-bit 1.11x / 1.19x):
# the fourth block an SM did not pay for the fragments' shared-memory reads.
_DEC_Q_SHARED = False


def decode_q_shared(qspec) -> bool:
    """QSF: TUNING "dec_q_shared" (else _DEC_Q_SHARED) at head dims <= 128; over 128 Q's fragments are in shared
    memory anyway, and the template keeps False (one instance)."""
    spec = qspec.attention
    return bool(TUNING.get("dec_q_shared", _DEC_Q_SHARED)) and spec.head_dim_qk <= 128


def decode_late_scales() -> bool:
    """LATE (TUNING "dec_late_scales", else _DEC_LATE_SCALES)."""
    return bool(TUNING.get("dec_late_scales", _DEC_LATE_SCALES))


@functools.lru_cache(maxsize=1024)
def decode_plan(qspec):
    """(warps per block, splits per (batch, KV head), shared memory bytes)."""
    nw, smem, rule = _decode_plan_base(qspec)
    return nw, _decode_splits(rule, _cuda._effective_keys(qspec.attention)), smem


def _decode_plan_base(qspec):
    """decode_plan but its split count: (warps, shared memory bytes, the split rule of _decode_splits),
    none of which reads the key count. Not cached itself: decode_plan's cache (which the tests clear
    with TUNING changes) keeps its result per spec, and decode_key_range asks once per record."""
    decode_removed_tuning()
    spec = qspec.attention
    # TILES where it does not apply: the error, before anything is built.
    tiles = decode_tiles(qspec, int(TUNING.get("dec_keys_m", _DEC_KEYS_M)), decode_register_options()[1])
    nw = TUNING.get("dec_warps", _DEC_WARPS)
    pairs = spec.batch * spec.heads_kv
    # Blocks per SM the splits aim for (_DEC_RESIDENT_WARPS's register counts).
    q_shared = decode_q_shared(qspec)
    if q_shared and qspec.bits == 4 and tiles == 1:
        warps_sm = _DEC_RESIDENT_WARPS["q_shared"]
    else:
        warps_sm = _DEC_RESIDENT_WARPS["wide" if spec.head_dim_qk > 128 or tiles > 1 else "narrow"]
    per_sm = TUNING.get("dec_blocks_per_sm", max(1, warps_sm // nw))
    dv, ngv = spec.head_dim_v, spec.head_dim_v // qspec.group_size
    ng = spec.head_dim_qk // qspec.group_size
    # The flag (4 words), each warp's scale stages (QdTile::STAGE floats, one a tile of an iteration), Q's
    # fragments (D > 128 or QSF: 8 bytes a lane a k-step), then red_o [nw][8][dv] (also the last block's
    # [splits][8] weights), red_m, red_l, red_pb.
    qfrag = nw * 256 * (spec.head_dim_qk // 16) if spec.head_dim_qk > 128 or q_shared else 0
    base = 16 + 4 * nw * 32 * (ng + ngv) * tiles + qfrag
    smem = base + 4 * (nw * 8 * dv + 2 * nw * 8 + nw * 8 * ngv)
    rule = ((_SMS * per_sm) // pairs, nw, TUNING.get("dec_splits"), nw * dv)
    return nw, smem, rule


def _decode_splits(rule: tuple, keys: int) -> int:
    """decode_plan's split count for `keys` effective keys; `rule` (the split cap one wave of resident
    blocks sets, warps, the "dec_splits" override or None, the merge's limit) does not read the key count."""
    cap, nw, forced, limit = rule
    # At most one wave of resident blocks (main launched 4 an SM of which 3 fit: 1.33 waves).
    splits = max(1, min(cap, math.ceil(keys / (16 * nw * _DEC_MIN_TILES)), _DEC_MAX_SPLITS))
    if forced is not None:
        splits = forced
    return max(1, min(splits, limit))  # the merge's [splits][8] weights fit red_o


def _decode_splits_until(rule: tuple, keys: int) -> int:
    """The effective key count up to which _decode_splits(rule, .) keeps its value at `keys` (>= 1)."""
    cap, nw, forced, _ = rule
    tile_keys = 16 * nw * _DEC_MIN_TILES
    first = -(-keys // tile_keys)
    if forced is None and first < min(cap, _DEC_MAX_SPLITS):  # the count still follows the keys
        return first * tile_keys
    return _cuda._MAX_KEY_COUNT


def decode_key_range(qspec) -> tuple:
    """(lo, hi): the key counts from the call's own to hi whose decode launch is this one's in all but
    the int block's seqlen_k (the same split count; the rest of the launch does not read the key
    count): csrc/cuda_host.cpp replays the recorded call at each."""
    spec = qspec.attention
    rule = _decode_plan_base(qspec)[2]
    return spec.seqlen_k, _cuda.key_count_end(spec, _decode_splits_until(rule, _cuda._effective_keys(spec)))


def decode_scratch_floats(qspec, splits: int) -> int:
    """Floats of the decode's scratch output: 8 * (Dv + 2) per (batch, KV head, split), then a counter per pair."""
    spec = qspec.attention
    pairs = spec.batch * spec.heads_kv
    return pairs * splits * 8 * (spec.head_dim_v + 2) + pairs


def _decode_pool(qspec) -> bool:
    """Tickets from cuda.py's pool (no zero fill) when the call's pairs fit a region."""
    spec = qspec.attention
    return bool(TUNING.get("dec_pool", True)) and spec.batch * spec.heads_kv <= _cuda._TICKET_REGION_WORDS


@functools.lru_cache(maxsize=1024)
def _decode_launch(qspec, q_shape, k_scales_dtype, v_scales_dtype, tuning):
    """Everything of a decode launch but its inputs, once per (spec, shapes, dtypes, TUNING)."""
    spec = qspec.attention
    decode_removed_tuning()
    nw, splits, smem = decode_plan(qspec)
    pool = _decode_pool(qspec)
    fold, l2pf = decode_register_options()
    template = [("T", spec.dtype), ("KST", k_scales_dtype), ("VST", v_scales_dtype), ("SOFTCAP", spec.softcap > 0),
                ("WINDOW", spec.has_window), ("SINKS", spec.has_sinks), ("D", spec.head_dim_qk),
                ("DV", spec.head_dim_v), ("BITS", qspec.bits), ("GS", qspec.group_size), ("NW", nw),
                ("PF", bool(TUNING.get("dec_prefetch", _DEC_PREFETCH))), ("POOL", pool),
                ("KEYS_M", int(TUNING.get("dec_keys_m", _DEC_KEYS_M))),
                ("FOLD", fold), ("L2PF", l2pf),
                ("TILES", decode_tiles(qspec, int(TUNING.get("dec_keys_m", _DEC_KEYS_M)), l2pf)),
                ("LATE", decode_late_scales()), ("QSF", decode_q_shared(qspec))]
    return dict(
        template=template, grid=(splits * 32 * nw, 1, spec.batch * spec.heads_kv), threadgroup=(32 * nw, 1, 1),
        output_shapes=[tuple(q_shape[:-1]) + (spec.head_dim_v,), tuple(q_shape[:-1]),
                       (decode_scratch_floats(qspec, splits),)],
        output_dtypes=[spec.dtype, mx.float32, mx.float32], init_value=None if pool else 0,
    ), _cuda.const_array((splits,), mx.int32), smem


def _decode_kernel(smem: int):
    """The decode's kernel object."""
    return _cuda._kernel("attention_quant_decode", _DEC_INPUTS, ("out", "lse", "scratch"), smem,
                         _cuda.kernel_headers("attention_quant_decode"), False)


def _forward_decode(q, k, v, qspec, inputs: AttentionInputs, stream):
    launch, ns, smem = _decode_launch(qspec, tuple(q.shape), k[1].dtype, v[1].dtype,
                                      tuple(TUNING.items()) if TUNING else ())
    args = _operands(q, k, v, qspec, inputs, stream)  # q, 6 cache arrays, mask, alibi, ip, fp
    sinks = _dense(inputs.sinks, stream) if inputs.sinks is not None else _cuda._placeholders()[2]
    # The ticket region (read only when the template's POOL is set).
    tk = _cuda._ticket_region(stream)
    kernel = _decode_kernel(smem)
    kernel_inputs = args[:7] + [sinks, args[9], args[10], ns, tk]
    outputs = kernel(inputs=kernel_inputs, stream=stream, **launch)
    if _cuda._host.RECORDING is not None:  # a call cuda_host.py will replay: note the launch
        _cuda._host.note_launch(kernel, kernel_inputs, outputs, stream, **launch)
        # The same launch serves a range of key counts (no mask or ALiBi here: uses_decode).
        _cuda.note_key_range(args[9], qspec.attention, lambda: decode_key_range(qspec))
    return outputs[0], outputs[1]
