"""matmul2d on MLX's CUDA backend: mx.fast.cuda_kernel over cuda_src/matmul.cuh.

    out = (dequant(a) * a_scale) @ (dequant(b) * b_scale), fp32 accumulation

Routes (by operand types and shape; `route_of` decides):
  * "gemv" (any sm_80+ GPU): a 16-bit a with at most 16 rows times an [N, K]
    b (transpose_b, fp8 codes or the same 16-bit type): cuda_src/matmul_gemv.cuh,
    bound by reading b once.
  * "wgmma" (Hopper, sm_90): cuda_src/matmul_wgmma.cuh on 16-bit warpgroup
    MMA with fp32 accumulation: fp16/bf16 operands land in shared memory as
    they are, fp8 codes are decoded there exactly (fp8 x fp8 to fp16). Edge
    tiles are predicated in the kernel (zero-filled loads, masked stores).
  * "wgmma_fp8" (Hopper, fp8 x fp8, opt-in: matmul2d(..., fast_accumulation=True)
    per call, or MLX_FLASH_CUDA_FP8_WGMMA=native for every fp8 x fp8 call):
    the same kernel on native fp8 wgmma (k32, twice the 16-bit rate; a [K, N]
    b is transposed once first). Hopper's fp8 tensor cores add with a 13-bit
    mantissa, truncating; the kernel restarts their sums every 128 K and adds
    them in fp32 (two-level accumulation), so the error stays within
    2^-8 * (|a| @ |b|), far below fp8's own rounding (2^-4), but not fp32-exact.
  * "mma" (elsewhere): cuda_src/matmul.cuh,
    m16n8k16 mma.sync with fp8 codes decoded exactly to fp16/bf16 in the
    kernel; or the native fp8 mma (m16n8k32, sm_89+) for fp8 x fp8 with
    MLX_FLASH_CUDA_NATIVE_FP8=1.
  * any float32 operand (or fp16 mixed with bf16): fp8 codes decoded to
    float32 (bit-exact), then MLX's product made float32-exact by operand
    splitting (MLX's CUDA float32 matmul runs in TF32); scales applied after.
The scales factor out of the sum (a per row, b per column), so every route
applies them to the fp32 accumulator.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from . import cuda as _cuda

_WGMMA = os.environ.get("MLX_FLASH_CUDA_MATMUL_WGMMA", "1") == "1"
_FP8_NATIVE = os.environ.get("MLX_FLASH_CUDA_FP8_WGMMA", "exact") == "native"
# Hopper tile plans: (tile width BN, stages, promotion interval in stages of
# 128 K; 0 = the native fp8 sums stay in the tensor core's accumulators).
# "f16": 16-bit operands; "cvt": an fp8 operand decoded in shared memory;
# "native": fp8 x fp8 on fp8 wgmma.
# Fourth entry: stage tiles by TMA (16-bit and native fp8) instead of cp.async
# (H200: +10% fp16, +16% native fp8 at 8192^3); plans fall back to cp.async
# where libcuda's tensor-map encoder is unavailable.
# Fifth entry: the warp-specialised persistent kernel (matmul_wgmma_ws.cuh:
# a TMA producer warpgroup, two consumer warpgroups, mbarrier stage ring;
# TMA plans only). Sixth (native fp8, BN 128, warp-specialised): two
# tensor-core accumulator sets alternating between promotion intervals.
WGMMA_PLANS = {"f16": (256, 4, 0, True), "cvt": (256, 4, 0, False), "native": (128, 6, 2, True)}
# Default plans on the warp-specialised kernel where TMA is available (None:
# WGMMA_PLANS). "cvt" with a b decoded by a pass first only from
# CVT_WS_MIN_ROWS rows of a: below, decoding the whole fp8 weight first costs
# more than the product. A b the kernel decodes itself (CVT_RAW_SLOTS) takes
# the warp-specialised plan at any number of rows.
# H200, 8192^3 (two runs): fp16 528-535 TFLOP/s warp-specialised vs 505-544
# (TMA, one block barrier per stage: even); exact e4m3 x e4m3 562 vs 273 and
# fp16 x e4m3 552 vs 340 (fp8 decoded first, then the 16-bit kernel); native
# e4m3 791 vs 718 (BN 128, promoted every 256 K). Native fp8 on 128 x 192
# tiles since session 18 (H100, `--sections targets`, promotion every 128 K;
# benchmarks/results/matmul_targets_nvidia_h100_s18a.json): BN 192 x 5 stages
# against BN 128 x 6, the default before, took 8 % less time at 4096^3 and
# 18 % less at 8192^3 (docs/matmul.md, "Issue 15's targets in one run").
WS_PLANS = {"f16": (256, 4, 0, True, True), "cvt": (256, 4, 0, True, True), "native": (192, 5, 2, True, True)}
# The opt-in clusters of two blocks (MLX_FLASH_CUDA_MATMUL_CLUSTER=2) were
# removed in session 11 (they never won on the card, and with MLX's CUDA
# graphs they broke the plain kernels launched after them: docs/matmul.md);
# a leftover setting is an error, not silently ignored.
if os.environ.get("MLX_FLASH_CUDA_MATMUL_CLUSTER", "1") != "1":
    raise ValueError("MLX_FLASH_CUDA_MATMUL_CLUSTER: the cluster matmul was removed (session 11); unset it, got "
                     f"{os.environ['MLX_FLASH_CUDA_MATMUL_CLUSTER']!r}")
CVT_WS_MIN_ROWS = 512
# fp8 b codes ([N, K], FP8Linear's weight) on the warp-specialised "cvt" plan:
# decoded inside the kernel, from this many shared-memory slots of codes
# (cuda_src/matmul_wgmma_ws.cuh, RAW) instead of by a decode pass over the
# whole weight first (MLX's from_fp8 into an fp16 copy: on the H100 32 us of a
# 4096^3 product's ~280 us, and the copy's memory). 0 restores the pass.
# Only below CVT_RAW_MAX_ROWS rows of a: the kernel's three decoding warps
# cap it at ~470 TFLOP/s, so from there the pass is faster (H100, session 19,
# `--sections prefill`, matmul_prefill_nvidia_h100_s19b.json: at 128 / 512
# rows the kernel that decodes took 0.74-0.92x the time of the pass, at 2048
# rows 1.26-1.29x; docs/matmul.md, "FP8Linear's prefill").
_CVT_RAW = os.environ.get("MLX_FLASH_CUDA_CVT_RAW", "2")
if _CVT_RAW not in ("0", "1", "2", "3", "4"):
    raise ValueError(f"MLX_FLASH_CUDA_CVT_RAW must be 0 to 4 (slots of fp8 codes; 0: decode first), got {_CVT_RAW!r}")
CVT_RAW_SLOTS = int(_CVT_RAW)
CVT_RAW_MAX_ROWS = 1024
# The same product on the kernel with the weight as wgmma's A operand
# (cuda_src/matmul_wgmma_wa.cuh, route "wgmma_wa": out^T = W x^T, the fp8
# codes decoded straight into the A registers by the warps that issue the
# products; no 16-bit weight tile in shared memory). On Hopper (with TMA) it
# takes every [N, K] fp8 weight times a 16-bit a of GEMV_MAX_ROWS + 1 to
# WA_MAX_ROWS rows (MLX_FLASH_CUDA_FP8W_WA=1, the default; 0 keeps the
# kernels above).
_FP8W_WA = os.environ.get("MLX_FLASH_CUDA_FP8W_WA", "1")
if _FP8W_WA not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_FP8W_WA must be 0 or 1, got {_FP8W_WA!r}")
FP8W_WA = _FP8W_WA == "1"
# Its plans (tokens a tile BT, stages): 128 tokens below WA_WIDE_MIN_ROWS
# rows of a, 256 from there (H100, session 20, `--sections prefill`, runs
# s20b and s20d: at 128 rows BT 128 took 0.54-0.64x the time of BT 256; at
# 512 rows and more BT 256 took 0.68-0.79x that of BT 128, on half the tiles
# at 512 rows: it decodes each weight row for twice the tokens).
# Four half stages in flight instead of two (fragment sets of their own for
# odd stages) were tried in session 20 and not kept: within 4 % of two, and
# at BT 256 wrong on the card (never in the emulation; not understood: the
# registers of in-flight products under pressure are the suspect),
# docs/matmul.md.
WA_PLANS = {"narrow": (128, 8), "wide": (256, 5)}
WA_WIDE_MIN_ROWS = 256
# The tile height fitted to the product (WA_TILE_FIT, on since session 26;
# off: the rows' plan only, session 25's):
# - where BT 256's whole tiles fill a wave of the SMs or more, the height of
#   least waves x WA_TILE_COST, BT 256 on ties: a 3B Llama's 2048 x 3072 x
#   3072 product makes 192 tiles of 256 tokens on 132 SMs (two waves, the
#   second under half full) but 264 of 192 (two full waves of tiles a
#   quarter shorter). WA_TILE_COST is a height's time a tile relative to BT
#   256's (the products shrink with BT, the decode of the codes does not);
# - below a wave, 128-token tiles where they fit one wave and K is at most
#   WA_NARROW_MAX_K: more tiles, each a whole sum, instead of BT 256's tiles
#   split between blocks (whose partial sums cost a round trip through L2).
# H100, parts s26b / s26d (the GPU time of a call alone, 24 products of
# Llamas of 3B and 8B shape at 512-2048 tokens): BT 192 took 0.77-0.81 of
# BT 256's time a tile, BT 128 0.63; with the fit no product took longer
# (beyond 1 %) and ten took 3-28 % less: 2048 x 3072 x 3072 71 us against 86,
# 512 x 3072 x 1024 (k / v) 21 against 29 (BT 128, split in two).
WA_TILE_FIT = True
WA_TILE_PLANS = {256: WA_PLANS["wide"], 192: (192, 6), 128: WA_PLANS["narrow"]}
WA_TILE_COST = {256: 1.0, 192: 0.8, 128: 0.63}
WA_NARROW_MAX_K = 4096
# Up to this many rows of a (inclusive); from more, the decode pass and the
# 16-bit kernel (CVT_RAW_MAX_ROWS). H100, `--sections targets`: at 8192^3 the
# pass's GPU time was 0.87x this kernel's (s19b / s20d against s20c), and its
# wall time with calls queued 0.60x; at 4096^3 the pass took 1.07-1.11x this
# kernel's wall time (s20d, s20e).
WA_MAX_ROWS = 4096
# Stream-K on that kernel (session 21): where its tiles do not fill whole
# waves of the SMs (64 tiles at 512 x 4096 x 4096 on 132 SMs: half the card
# idle; 224 at 512 x 4096 x 14336: 1.7 waves), tiles' k-steps are shared
# between blocks (wa_stream_k_tiles), a tile cut between two blocks finished
# by the later to arrive. Taken when a block would run at least
# WA_SK_MIN_GAIN k-steps (of 64 K) fewer than with whole tiles; the cost is
# one fp32 tile written and one read through L2 per cut, and one batch only.
WA_SK_MIN_GAIN = 4
# On by default since session 24 (MLX_FLASH_CUDA_FP8W_WA_SK=0 keeps every
# tile whole, session 20's schedule): in mlx-lm Llamas of 8B and 3B shape on
# an H100 (prompt tokens/s, FP8Linear / fp16, 512-2048 tokens), splitting in
# two below half a wave gave 0.85-0.95x / 0.86-0.87x where whole tiles gave
# 0.81-0.94x / 0.81-0.87x (benchmarks/results/matmul_llama_prefill_splits_
# nvidia_h100_s24.json): never slower beyond the run's noise, up to 7 %
# faster at 512 tokens. A model's products mostly wait on the one before, so
# a kernel's idle SMs are idle (session 23's wall measure, with the queue
# full of independent products, had it 10-20 % slower).
_FP8W_WA_SK = os.environ.get("MLX_FLASH_CUDA_FP8W_WA_SK", "1")
if _FP8W_WA_SK not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_FP8W_WA_SK must be 0 or 1, got {_FP8W_WA_SK!r}")
WA_SK = _FP8W_WA_SK == "1"
# Below half a wave, the most blocks a tile's k-steps are split between. The
# last block to arrive reads every other block's fp32 partial tile (128 KiB
# at BT 256) one after the other. In the same models 4 and 8 were no better
# than 2 (within 2 %, 8 up to 5 % slower at 512 tokens), though the k / v
# projection alone (512 x 4096 x 1024: 16 tiles on 132 SMs) ran at 0.23x
# MLX's fp16 product by GPU time with whole tiles.
WA_SK_SPLITS = 2
# From one wave on, share the partial wave's tiles and one full wave's
# between all SMs (session 21's plan). Off since session 24: in the models
# above it cost 2-5 % at 1024-2048 tokens against splitting alone.
WA_SK_WAVES = False
# Stream-K on the native fp8 kernel (matmul_wgmma_ws.cuh with SK, session
# 29; opt-in, MLX_FLASH_CUDA_FP8_NATIVE_SK=1, until a card has run it: the
# emulation and ptxas once passed a kernel the card then got wrong, session
# 20; off, every tile whole, the kernel before SK): its 128 x 192
# tiles make 24-88 tiles of the products of an 8B Llama at 512 tokens (its k /
# v projections: 24 on 132 SMs), so quantized activations' products ran at
# 1.04x cuBLAS's fp16 time there against 0.90x at 2048 tokens (H100, s25e).
# Below half a wave each tile is split into NATIVE_SK_SPLITS runs (the
# weight-as-A kernel's rule, measured there in models); a k-step is 128 K
# here, so a run keeps NATIVE_SK_MIN_GAIN x 128 K (the same 256 K as there).
# NATIVE_SK_PARTIAL (off: not yet timed on a card) also shares the tiles of a
# wave between half and whole over every SM (an 8B down projection at 512
# tokens: 88 tiles of 112 k-steps, runs of 75 on 132 SMs).
_FP8_NATIVE_SK = os.environ.get("MLX_FLASH_CUDA_FP8_NATIVE_SK", "0")
if _FP8_NATIVE_SK not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_FP8_NATIVE_SK must be 0 or 1, got {_FP8_NATIVE_SK!r}")
NATIVE_SK = _FP8_NATIVE_SK == "1"
NATIVE_SK_SPLITS = 2
NATIVE_SK_MIN_GAIN = 2
NATIVE_SK_PARTIAL = False
# Shared memory one block may take (sm_90: 227 KiB), less the ws kernel's
# static arrays (tensor-map staging, mbarriers).
_WS_MAX_DYNAMIC_SMEM = 227 * 1024 - 512
# The native fp8 route's promotion interval: MLX_FLASH_CUDA_FP8_PROMOTE_K =
# K values the tensor cores sum (truncating, 13 bits) before the sums go to
# fp32 registers. 128 (PROMOTE 1), the default since session 10: cuBLAS's
# fp8 "fp32 accumulation" (torch._scaled_mm(use_fast_accum=False)) promotes
# there too, and on the H200 our errors equal its to every digit printed
# (benchmarks/results/matmul_cuda_nvidia_h200_s10.json), at 1099 vs 1131
# TFLOP/s for 256 (8192^3). 256 (PROMOTE 2, the plans' literal value below,
# the default before); 64 or 32 (PROMOTE -2 / -1, opt-in, not yet timed:
# every two instructions or every one, the warp-specialised kernel at BN 128
# or 192 only). tools/fp8_accum_model.py models the error of each.
_FP8_PROMOTE_K = os.environ.get("MLX_FLASH_CUDA_FP8_PROMOTE_K", "128")
_PROMOTE_OF_K = {"32": -1, "64": -2, "128": 1, "256": 2}
if _FP8_PROMOTE_K not in _PROMOTE_OF_K:
    raise ValueError(f"MLX_FLASH_CUDA_FP8_PROMOTE_K must be one of 32, 64, 128, 256, got {_FP8_PROMOTE_K!r}")
if _FP8_PROMOTE_K != "256":
    _p = _PROMOTE_OF_K[_FP8_PROMOTE_K]
    WS_PLANS = dict(WS_PLANS, native=WS_PLANS["native"][:2] + (_p,) + WS_PLANS["native"][3:])
    WGMMA_PLANS = dict(WGMMA_PLANS, native=WGMMA_PLANS["native"][:2] + (_p,) + WGMMA_PLANS["native"][3:])
# Decode (gemv) route: at most this many rows of a.
GEMV_MAX_ROWS = 16
# Few-rows kernel plan (matmul_gemv.cuh): (warps per block W, row tiles of 16
# weight rows per warp RT, register chunks per warp U (STAGES = 0), most
# blocks per call (0: one block per group of 16 RT rows; > 0 a cap, < 0 a cap
# of -value blocks per SM; capped blocks sweep the rows), cp.async stages per
# warp STAGES (0: loads into registers), launch bounds: blocks per SM the
# compiler must fit (0: none; 2 or 3: cuda_src/matmul_gemv_bounds<n>.cuh),
# whole-sector layout SECTOR (1: each load instruction reads whole 32-byte
# sectors of the weight rows, gemv_wk in matmul_gemv.cuh; 0 or absent: each
# lane's 32 bytes are one run, read as two half-sector instructions)).
# The whole-sector layout is the default: H200 (benchmarks/results/
# matmul_cuda_nvidia_h200_s7.json, weight bytes against a plain copy's 4225
# GB/s in the same run): M = 16 x a 16384^2 e4m3 weight 0.78 of the copy vs
# 0.57 with the half-sector one (8192^2: 0.66 vs 0.49), M = 1 even (0.88).
# MLX_FLASH_CUDA_GEMV_SECTOR=0 restores the half-sector layout.
GEMV_PLAN = (8, 1, 4, 0, 0, 2, 1)
_GEMV_SECTOR = os.environ.get("MLX_FLASH_CUDA_GEMV_SECTOR", "1")
if _GEMV_SECTOR not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_GEMV_SECTOR must be 0 or 1, got {_GEMV_SECTOR!r}")
if _GEMV_SECTOR == "0":
    GEMV_PLAN = GEMV_PLAN[:6]
# The plan for 9-16 rows of a (two n8 tiles of a per mma, MT = 2) against an
# fp8 weight. Every block reads all M rows of a (from L2) for its 16 RT weight
# rows: at 16 rows that is 2 bytes of a per weight byte with RT = 1, so the L2
# traffic, not the weight stream, bounds the call; RT = 2 halves it. H200
# (benchmarks/results/matmul_cuda_nvidia_h200_s8.json, M = 16, FP8Linear's
# direct call): 8192^2 e4m3 19.7 us (0.79 of a plain copy) vs 21.8 with the
# RT = 1 plan, 4096^2 6.4 vs 8.2 us; through matmul2d 20.6 vs 23.3 (two runs
# agree). 16-bit weights keep GEMV_PLAN (not measured with RT = 2).
# MLX_FLASH_CUDA_GEMV_PLAN_MT2="W,RT,U,MAXBLOCKS,STAGES,BOUNDS,SECTOR" sets it.
GEMV_PLAN_MT2 = (8, 2, 1, 0, 0, 2, 1) if _GEMV_SECTOR == "1" else GEMV_PLAN
_PLAN_MT2 = os.environ.get("MLX_FLASH_CUDA_GEMV_PLAN_MT2")
if _PLAN_MT2:
    try:
        GEMV_PLAN_MT2 = tuple(int(v) for v in _PLAN_MT2.split(","))
    except ValueError:
        raise ValueError(f"MLX_FLASH_CUDA_GEMV_PLAN_MT2 must be comma-separated integers, got {_PLAN_MT2!r}") from None
    if not 5 <= len(GEMV_PLAN_MT2) <= 7:
        raise ValueError(f"MLX_FLASH_CUDA_GEMV_PLAN_MT2 needs 5 to 7 entries, got {_PLAN_MT2!r}")


# Small fp8 weights (opt-in, MLX_FLASH_CUDA_GEMV_WIDE=1; its own plan not yet
# timed on a card. A sixteen-warp plan for every shape, (16, 1, 4, 0, 0, 1, 1),
# was no better than the default in session 13 (H100, weights from DRAM: 0.84
# of the copy against 0.82 at 8192^2 M = 1, slower elsewhere, down to 0.50
# against 0.70 at 4096^2 M = 16;
# benchmarks/results/cuda_matmul_decode_stream_nvidia_h100_s13.json).
# When a plan's row groups give no more blocks than there are SMs
# (N <= 16 RT SMs, e.g. 4096 rows at 9-16 rows of a: 128 blocks of 8 warps on
# 132 SMs), each SM runs one block and each warp waits on K / (128 W) chunks
# in turn: at K 4096 and 8 warps that is 4 round trips to memory for a 16 MB
# weight. Sixteen warps a block (launch bounds 1: 512 threads, 128 registers)
# halve each warp's chain and double the bytes in flight per SM.
GEMV_WIDE = os.environ.get("MLX_FLASH_CUDA_GEMV_WIDE", "0")
if GEMV_WIDE not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_GEMV_WIDE must be 0 or 1, got {GEMV_WIDE!r}")


def gemv_plan(rows: int, fp8_weight: bool = True, N: int = 0) -> tuple:
    """The default few-rows plan for `rows` rows of a against N weight rows
    (N = 0: whatever N)."""
    plan = GEMV_PLAN_MT2 if rows > 8 and fp8_weight else GEMV_PLAN
    if (GEMV_WIDE == "1" and fp8_weight and N and plan[0] == 8 and plan[3] == 0 and plan[4] == 0
            and math.ceil(N / (16 * plan[1])) <= sm_count()):
        plan = (16,) + tuple(plan[1:5]) + (1,) + tuple(plan[6:])
    return plan
# Tests set this to NaN: outputs start poisoned, so an element a kernel never
# writes shows (None: outputs start uninitialised, as they should in use).
POISON = None

_FMT_CODE = {None: 0, "e4m3": 1, "e5m2": 2}
_INPUTS = ("a", "b", "a_scale", "b_scale", "ip")
_WGMMA_INPUTS = _INPUTS + ("tmpl",)
# The weight-as-A kernel's outputs; its stream-K form (matmul_wgmma_wa_sk.cuh, and the native fp8
# kernel's, matmul_wgmma_ws_sk.cu)
# also takes stream-K tickets (a region of the stream's zeroed ticket pool,
# backends/cuda.py) and writes fp32 partial sums.
_WA_OUTPUTS = ("out", "tmaps")
_WA_SK_INPUTS, _WA_SK_OUTPUTS = _WGMMA_INPUTS + ("tickets",), _WA_OUTPUTS + ("part",)
_SMEM = 3 * (128 * 144 + max(128 * 144, 64 * 272))  # matmul_smem() in matmul.cuh
_TILE = 128
# fp8 x fp8 through the native fp8 mma.sync (m16n8k32). On Hopper (sm_90) that
# instruction runs far below the fp16 rate (measured on an H200: 120 vs 200
# TFLOP/s at 8192^3), so by default both operands are decoded to fp16 in the
# kernel instead; set MLX_FLASH_CUDA_NATIVE_FP8=1 on Ada (sm_89) to compare.
_NATIVE_FP8 = os.environ.get("MLX_FLASH_CUDA_NATIVE_FP8", "0") == "1"


def _decode_fp8(x: mx.array, fmt: str, dtype, stream) -> mx.array:
    """fp8 codes to `dtype`, bit-exact (E5M2 is the top byte of an IEEE half)."""
    if fmt == "e5m2":
        return (x.astype(mx.uint16, stream=stream) << 8).view(mx.float16).astype(dtype, stream=stream)
    return mx.from_fp8(x, dtype=dtype, stream=stream)


def _split(x, stream):
    """x = hi + lo with hi a bfloat16 value (exact in TF32) and lo the rest."""
    hi = x.astype(mx.bfloat16, stream=stream).astype(mx.float32, stream=stream)
    return hi, mx.subtract(x, hi, stream=stream)


def _exact_f32_matmul(a, b, stream):
    """A float32 product to float32 accuracy even where MLX's CUDA matmul
    rounds float32 operands to TF32 (10-bit mantissa, ~5e-4 relative):
    split each operand into a bf16-exact high part and a remainder; the
    high x high product is exact in TF32 and the cross terms' TF32 error is
    ~2^-8 smaller than TF32's own."""
    a_hi, a_lo = _split(a, stream)
    b_hi, b_lo = _split(b, stream)
    mm = lambda x, y: mx.matmul(x, y, stream=stream)
    split = mm(a_hi, b_hi) + (mm(a_hi, b_lo) + mm(a_lo, b_hi) + mm(a_lo, b_lo))
    # inf operands (fp8 E5M2 has them) give NaN remainders (inf - inf); there
    # the plain product carries the right inf/NaN.
    plain = mm(a, b)
    return mx.where(mx.isnan(split) & ~mx.isnan(plain), plain, split, stream=stream)


def _float32_route(a, b, a_scale, b_scale, spec, stream):
    a = _decode_fp8(a, spec.a_fmt, mx.float32, stream) if spec.a_fmt else a.astype(mx.float32, stream=stream)
    b = _decode_fp8(b, spec.b_fmt, mx.float32, stream) if spec.b_fmt else b.astype(mx.float32, stream=stream)
    if spec.transpose_b:
        b = b.swapaxes(-1, -2)
    out = _exact_f32_matmul(a, b, stream)
    if a_scale is not None:
        out = out * a_scale
    if b_scale is not None:
        out = out * b_scale
    return out.astype(spec.out_dtype, stream=stream)


def _pad_axis(x, axis, multiple, stream):
    size = x.shape[axis]
    extra = -size % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return mx.pad(x, widths, stream=stream)


def route_of(a, b, spec) -> str:
    """Which kernel family computes this product (see the module docstring)."""
    float_types = {x.dtype for x, fmt in ((a, spec.a_fmt), (b, spec.b_fmt)) if fmt is None}
    if mx.float32 in float_types or len(float_types) > 1:
        return "float32"
    if spec.a_fmt is None and spec.transpose_b and spec.M <= GEMV_MAX_ROWS:
        return "gemv"
    if _WGMMA and _cuda._is_hopper():
        native = _FP8_NATIVE or spec.fast_accumulation  # the process-wide switch, or the call's own
        if native and spec.a_fmt and spec.b_fmt:
            return "wgmma_fp8"
        if FP8W_WA and wa_takes(spec) and spec.M <= WA_MAX_ROWS and _tma_available():
            return "wgmma_wa"
        return "wgmma"
    return "mma"


def in_kernel_b(spec) -> bool:
    """Whether the warp-specialised kernel decodes b's fp8 codes itself
    (CVT_RAW_SLOTS, below CVT_RAW_MAX_ROWS rows of a) rather than a pass first."""
    return spec.b_fmt is not None and spec.transpose_b and CVT_RAW_SLOTS > 0 and spec.M < CVT_RAW_MAX_ROWS


def wa_takes(spec) -> bool:
    """Whether the product has the weight-as-A kernel's shape: a 16-bit a
    times [N, K] fp8 codes (FP8Linear's product)."""
    return spec.a_fmt is None and spec.b_fmt is not None and spec.transpose_b


def wa_plan(M: int, N: int = None, K: int = None, grid: int = None) -> tuple:
    """The weight-as-A kernel's default (BT, stages) for M rows of a: by the
    rows alone (WA_PLANS), or, given the product's N, K and the SMs and with
    WA_TILE_FIT, the tile height fitted to the waves (see WA_TILE_FIT)."""
    plan = WA_PLANS["wide" if M >= WA_WIDE_MIN_ROWS else "narrow"]
    if N is None or plan[0] != 256 or not WA_TILE_FIT:
        return plan
    if K is None or grid is None:
        raise ValueError(f"wa_plan: N needs K and the SM count beside it, got N={N}, K={K}, grid={grid}")
    tiles_n = math.ceil(N / 128)
    if math.ceil(M / 256) * tiles_n < grid:
        fits = K <= WA_NARROW_MAX_K and math.ceil(M / 128) * tiles_n <= grid
        return WA_PLANS["narrow"] if fits else plan
    best, cost = plan, None
    for bt, candidate in WA_TILE_PLANS.items():  # BT 256 first: it keeps ties
        c = math.ceil(math.ceil(M / bt) * tiles_n / grid) * WA_TILE_COST[bt]
        if cost is None or c < cost:
            best, cost = candidate, c
    return best


def stream_k_tiles(units: int, ktiles: int, grid: int, batch: int, *, splits: int, min_gain: int,
                   waves: bool = False, partial: bool = False) -> tuple:
    """(stream-K tiles, blocks) for `units` tiles of `ktiles` k-steps on
    `grid` SMs (cuda_src/stream_k.cuh): the first tiles' k-steps shared evenly
    by the blocks (0: none). Below half a wave, each tile is split into s
    equal runs, s blocks a tile (s up to `splits`, as many as the SMs hold,
    each run `min_gain` k-steps or more): two blocks' sums a + b are the same
    whichever arrives last, more are summed in the blocks' order by the last
    to arrive. With `partial`, between half a wave and one, every tile is
    shared by all SMs where that saves a block `min_gain` k-steps or more.
    From one wave on (only with `waves`), the partial wave's tiles and one
    full wave's are shared by all SMs (a run of at least ktiles k-steps: a
    tile cut once at most)."""
    blocks = min(units, grid)
    if batch != 1 or units % grid == 0:
        return 0, blocks
    if units >= grid:
        if not waves:
            return 0, blocks
        whole = math.ceil(units / grid) * ktiles  # k-steps of the busiest block, whole tiles
        if whole - math.ceil(units * ktiles / grid) < min_gain:
            return 0, blocks
        sk, blocks = units % grid + grid, grid
    elif 2 * units <= grid and ktiles >= 2 * min_gain:
        s = min(splits, grid // units, ktiles // min_gain)
        sk, blocks = units, s * units
    elif partial and 2 * units > grid and ktiles - math.ceil(units * ktiles / grid) >= min_gain:
        sk, blocks = units, grid
    else:
        return 0, blocks
    return (sk, blocks) if _wa_stream_k_fits(sk, ktiles, blocks) else (0, min(units, grid))


def wa_stream_k_tiles(units: int, ktiles: int, grid: int, batch: int = 1) -> tuple:
    """stream_k_tiles of the weight-as-A kernel (k-steps of 64 K): WA_SK's
    rules (WA_SK_SPLITS, WA_SK_MIN_GAIN, WA_SK_WAVES); (0, tiles) without."""
    if not WA_SK:
        return 0, min(units, grid)
    return stream_k_tiles(units, ktiles, grid, batch, splits=WA_SK_SPLITS, min_gain=WA_SK_MIN_GAIN,
                          waves=WA_SK_WAVES)


def native_stream_k_tiles(units: int, ktiles: int, grid: int, batch: int = 1) -> tuple:
    """stream_k_tiles of the native fp8 kernel (k-steps of 128 K): NATIVE_SK's
    rules (NATIVE_SK_SPLITS, NATIVE_SK_MIN_GAIN, NATIVE_SK_PARTIAL); (0,
    tiles) without."""
    if not NATIVE_SK:
        return 0, min(units, grid)
    return stream_k_tiles(units, ktiles, grid, batch, splits=NATIVE_SK_SPLITS, min_gain=NATIVE_SK_MIN_GAIN,
                          partial=NATIVE_SK_PARTIAL)


def _wa_stream_k_fits(sk: int, ktiles: int, grid: int) -> bool:
    """Whether sk stream-K tiles fit a ticket region and the kernel's int
    arithmetic on k-steps ((steps + 1) x grid below 2^31)."""
    return sk <= _cuda._TICKET_REGION_WORDS and (sk * ktiles + 1) * grid < 2 ** 31


def wa_smem(bt: int, stages: int) -> int:
    """matmul_wa_smem() of matmul_wgmma_wa.cuh."""
    return stages * (bt * 128 + 128 * 64) + 1024


def _scale_flags(a_scale, b_scale):
    return (int(a_scale is not None and a_scale.shape[0] > 1), int(a_scale is not None and a_scale.shape[1] > 1),
            int(b_scale is not None and b_scale.shape[-1] > 1))


def _kernel_object(body: str, inputs: tuple, outputs: tuple, smem: int, extra_headers: tuple = ()):
    """mx.fast.cuda_kernel objects made once per kernel (not per call); keyed
    by the factory too, so the CUDA emulation's stand-in gets its own.
    extra_headers follow the kernel's own (launch bounds)."""
    return _cached_kernel(body, inputs, outputs, smem, extra_headers, mx.fast.cuda_kernel)


@functools.lru_cache(maxsize=None)
def _cached_kernel(body, inputs, outputs, smem, extra_headers, factory):
    headers = _cuda.kernel_headers(body) + tuple(extra_headers) if extra_headers else None
    return _cuda._kernel(body, inputs, outputs, smem, headers=headers)


@functools.lru_cache(maxsize=4096)
def _params(values: tuple, dtype=mx.int32):
    """A kernel's small parameter array, made once per value (cuda.const_array)."""
    return _cuda.const_array(values, dtype)


_GEMV_MAX_SMEM = 200 * 1024


def gemv_smem(warps: int, stages: int, row_tiles: int, a_tiles: int, b_bytes: int) -> int:
    """matmul_gemv_smem() of matmul_gemv.cuh."""
    return warps * stages * (row_tiles * 4 + a_tiles * (4 if b_bytes == 1 else 2)) * 32 * 16


def _check_gemv_bounds(plan, warps: int, bounds: int):
    """Launch bounds: matmul_gemv_bounds<n>.cuh, n blocks per SM; 1 is for
    blocks of up to 16 warps (512 threads), 2 and 3 for up to 8."""
    if bounds not in (0, 1, 2, 3):
        raise ValueError(f"gemv plan {plan}: launch bounds must be 0 (none), 1, 2 or 3 blocks per SM, got {bounds}")
    if bounds and warps > (16 if bounds == 1 else 8):
        raise ValueError(f"gemv plan {plan}: launch bounds {bounds} are for at most {16 if bounds == 1 else 8} warps")


def _gemv(a, b, a_scale, b_scale, spec, stream, plan=None):
    """M <= 16 rows of a against an [N, K] b: cuda_src/matmul_gemv.cuh."""
    plan = tuple(plan or gemv_plan(spec.M, spec.b_fmt is not None, spec.N))
    if not 5 <= len(plan) <= 7:
        raise ValueError(f"a gemv plan has 5 to 7 entries (W, RT, U, max blocks, STAGES[, bounds, sector]), got {plan}")
    warps, row_tiles, unroll, max_blocks, stages, bounds, sector = (plan + (0, 0))[:7]
    if sector not in (0, 1):
        raise ValueError(f"gemv plan {plan}: sector must be 0 or 1, got {sector}")
    _check_gemv_bounds(plan, warps, bounds)
    M, N = spec.M, spec.N
    a = _pad_axis(a, 2, 16, stream)
    b = _pad_axis(b, 2, 16, stream)
    ip = _params((M, N, a.shape[2], int(spec.b_batched)) + _scale_flags(a_scale, b_scale))
    a_tiles = 1 if M <= 8 else 2
    if stages:  # as many stages as fit the shared memory (two rows of a take more)
        per_stage = gemv_smem(warps, 1, row_tiles, a_tiles, b.dtype.size)
        stages = max(2, min(stages, _GEMV_MAX_SMEM // per_stage))
    kernel = _kernel_object("matmul_gemv", _INPUTS, ("out",),
                            gemv_smem(warps, stages, row_tiles, a_tiles, b.dtype.size) if stages else 0,
                            (f"matmul_gemv_bounds{bounds}.cuh",) if bounds else ())
    placeholder = _params((0,), mx.float32)
    blocks = math.ceil(N / (16 * row_tiles))
    if max_blocks:
        blocks = min(blocks, max_blocks if max_blocks > 0 else -max_blocks * sm_count())
    (out,) = kernel(
        inputs=[a, b, a_scale if a_scale is not None else placeholder,
                b_scale if b_scale is not None else placeholder, ip],
        template=[("TA", a.dtype), ("TB", b.dtype), ("TO", spec.out_dtype), ("FB", _FMT_CODE[spec.b_fmt]),
                  ("AS", a_scale is not None), ("BS", b_scale is not None), ("MT", a_tiles),
                  ("W", warps), ("RT", row_tiles), ("U", 1 if stages else unroll), ("STAGES", stages),
                  ("BOUNDS", bounds), ("SECTOR", bool(sector))],
        grid=(blocks * 32 * warps, 1, spec.batch), threadgroup=(32 * warps, 1, 1),
        output_shapes=[(spec.batch, M, N)], output_dtypes=[spec.out_dtype], init_value=POISON, stream=stream,
    )
    return out


def wgmma_smem(bn: int, stages: int, convert_a: bool, convert_b: bool) -> int:
    """matmul_wgmma_smem() of matmul_wgmma.cuh."""
    return (stages * (128 * (64 if convert_a else 128) + bn * (64 if convert_b else 128))
            + (2 * 128 * 128 if convert_a else 0) + (2 * bn * 128 if convert_b else 0) + 1024)


@functools.lru_cache(maxsize=None)
def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuInit.restype = ctypes.c_int
    lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
    rc = lib.cuInit(0)
    if rc != 0:
        raise RuntimeError(f"cuInit failed ({rc})")
    return lib


@functools.lru_cache(maxsize=None)
def _tma_available() -> bool:
    """libcuda's tensor-map encoder loads and initialises (else plans use cp.async)."""
    try:
        _libcuda()
        return True
    except (OSError, AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1024)
def tensor_map_template(elem_bytes: int, inner: int, outer: int, box_inner: int, box_outer: int,
                        swizzle: int = 128) -> bytes:
    """A 2-D CUtensorMap (128 bytes) for a row-major [outer][inner] operand with
    128-byte swizzled boxes (swizzle 0: boxes as they are; 64: the 64-byte
    swizzle, for boxes of 64-byte rows) and zero fill; its address is a
    placeholder that each block replaces on the device (cuda_src/tma.cuh)."""
    if swizzle not in (0, 64, 128):
        raise ValueError(f"tensor_map_template: swizzle is 0, 64 or 128, got {swizzle}")
    buf = (ctypes.c_ubyte * 192)()
    base = (ctypes.addressof(buf) + 63) // 64 * 64  # CUtensorMap is 64-byte aligned
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    rc = _libcuda().cuTensorMapEncodeTiled(
        ctypes.c_void_p(base), ctypes.c_int(0 if elem_bytes == 1 else 1), u32(2), ctypes.c_void_p(1 << 20),
        (u64 * 2)(inner, outer), (u64 * 1)(inner * elem_bytes), (u32 * 2)(box_inner, box_outer), (u32 * 2)(1, 1),
        ctypes.c_int(0), ctypes.c_int({0: 0, 64: 2, 128: 3}[swizzle]), ctypes.c_int(2),  # no interleave, swizzle, L2 128B
        ctypes.c_int(0))
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({rc}) for [{outer}][{inner}] x {elem_bytes} bytes, "
                           f"box [{box_outer}][{box_inner}]")
    return bytes((ctypes.c_ubyte * 128).from_address(base))


def _tma_templates(a, b, transpose_b, bn, raw_b=False):
    """Templates for a [M][Kp] and b ([Np][Kp] in boxes of bn rows, or [Kp][Np] read in 64 x 64 boxes), as one
    uint8 input. raw_b: b is [Np][Kp] fp8 codes the kernel decodes, read in unswizzled boxes of a's stage K."""
    return _tma_template_array(a.dtype.size, a.shape[1], a.shape[2], b.dtype.size, b.shape[1], b.shape[2],
                               bool(transpose_b), bn, bool(raw_b))


@functools.lru_cache(maxsize=1024)
def _tma_template_array(ea, M, Kp, eb, b1, b2, transpose_b, bn, raw_b=False):
    """_tma_templates' array, made once per shape: the kernels only read it
    (each block copies it and writes its own addresses into the copy), and a
    fresh host-written array per call costs an evaluation and a page
    migration on first GPU touch (cuda.const_array)."""
    kstep = 128 // ea
    ta = tensor_map_template(ea, Kp, M, kstep, 128)
    if raw_b:
        tb = tensor_map_template(eb, Kp, b1, kstep, bn, swizzle=0)
    elif transpose_b:
        tb = tensor_map_template(eb, Kp, b1, kstep, bn)
    else:
        tb = tensor_map_template(eb, b2, Kp, 64, 64)
    return _cuda.const_array(tuple(ta + tb), mx.uint8)


# Defaults of a Hopper plan's optional entries (TMA, warp-specialised, two accumulator sets).
_PLAN_DEFAULTS = (False, False, False)


def unpack_plan(plan) -> tuple:
    """(BN, stages, promote, tma, ws, acc2) of a Hopper plan of 3 to 6
    entries, the missing ones at their defaults."""
    plan = tuple(plan)
    if not 3 <= len(plan) <= 6:
        raise ValueError(f"a Hopper plan has 3 to 6 entries (BN, stages, promote[, tma, ws, acc2]), got {plan}")
    plan = plan + _PLAN_DEFAULTS[len(plan) - 3:]
    if not all(isinstance(x, bool) for x in plan[3:]):
        # A session 10 plan's sixth entry was the cluster size (2: removed).
        raise ValueError(f"a Hopper plan's tma, ws and acc2 entries are True or False, got {plan} "
                         "(the cluster-size entry was removed in session 11)")
    return plan


def _wgmma(a, b, a_scale, b_scale, spec, stream, plan=None, native=False):
    """Hopper warpgroup-MMA kernel: cuda_src/matmul_wgmma.cuh. A native
    warp-specialised plan may have a seventh entry: a forced count of
    stream-K tiles (0: every tile whole) instead of native_stream_k_tiles'."""
    native = native and spec.a_fmt is not None and spec.b_fmt is not None
    kind = "native" if native else ("cvt" if spec.a_fmt or spec.b_fmt else "f16")
    if plan is None:
        plan = WGMMA_PLANS[kind]
        if WS_PLANS[kind] and (kind != "cvt" or spec.M >= CVT_WS_MIN_ROWS or in_kernel_b(spec)) and _tma_available():
            plan = WS_PLANS[kind]
    plan, sk_tiles = tuple(plan), None
    if len(plan) == 7:
        plan, sk_tiles = plan[:6], plan[6]
        if not (native and plan[0] <= 192 and plan[3] and plan[4] and not plan[5] and plan[2] <= 1
                and type(sk_tiles) is int and sk_tiles >= 0):
            raise ValueError("a Hopper plan's seventh entry (stream-K tiles, an int >= 0) is for the native fp8 "
                             "warp-specialised TMA kernel on BN 128 or 192 with one accumulator set and promotion "
                             f"every stage, instruction or none (promote <= 1), got {plan + (sk_tiles,)} on route "
                             f"{'wgmma_fp8' if native else 'wgmma'}")
    bn, stages, promote, tma, ws, acc2 = unpack_plan(plan)
    if native and promote < 0 and not (promote in (-1, -2) and ws and tma and bn in (128, 192) and not acc2
                                       and _tma_available()):
        raise ValueError(f"Hopper plan {tuple(plan)}: promotion every {-promote} instruction(s) (promote -1 or -2) "
                         "needs the warp-specialised TMA kernel at BN 128 or 192 without acc2 "
                         "(MLX_FLASH_CUDA_FP8_PROMOTE_K 32 or 64 is for the warp-specialised route)")
    transpose_b = spec.transpose_b
    fa, fb = _FMT_CODE[spec.a_fmt], _FMT_CODE[spec.b_fmt]
    raw = 0
    if ws and not native and (fa or fb) and _tma_available():
        # The warp-specialised kernel takes a as stored (16-bit), and b as
        # stored or, [N, K] fp8 codes, decoded inside it (CVT_RAW_SLOTS);
        # other fp8 operands are decoded (exactly) to the 16-bit type first,
        # one pass over each.
        floats = [x.dtype for x, fmt in ((a, spec.a_fmt), (b, spec.b_fmt)) if fmt is None]
        compute = floats[0] if floats else mx.float16
        raw = CVT_RAW_SLOTS if tma and in_kernel_b(spec) else 0
        if fa:
            a = _decode_fp8(a, spec.a_fmt, compute, stream)
        if fb and not raw:
            b = _decode_fp8(b, spec.b_fmt, compute, stream)
        fa = 0
        fb = fb if raw else 0
    if native and not transpose_b:
        # fp8 wgmma reads b K-major only: one transposed copy of b.
        b = mx.contiguous(b.swapaxes(-1, -2), stream=stream)
        transpose_b = True
    M, N = spec.M, spec.N
    a = _pad_axis(a, 2, 16, stream)
    b = _pad_axis(b, 2 if transpose_b else 1, 16, stream)
    b = _pad_axis(b, 1 if transpose_b else 2, 16, stream)
    Kp, Np = a.shape[2], (b.shape[1] if transpose_b else b.shape[2])
    ip = _params((M, Np, Kp, int(spec.b_batched)) + _scale_flags(a_scale, b_scale))
    if b_scale is not None and Np != N and b_scale.shape[-1] > 1:
        b_scale = _pad_axis(b_scale, 2, 16, stream)
    floats = [x.dtype for x, fmt in ((a, spec.a_fmt), (b, spec.b_fmt)) if fmt is None]
    compute = floats[0] if floats else mx.float16
    convert_a, convert_b = bool(fa) and not native, bool(fb) and not native and not raw
    tma = tma and not (convert_a or convert_b) and _tma_available()
    if ws and not tma and bn not in (128, 256):
        bn = 128  # no TMA here: the portable kernel's tile widths
    if ws and tma:
        return _wgmma_ws(a, b, a_scale, b_scale, spec, stream, bn, stages, promote if native else 0, native,
                         transpose_b, ip, Np, fa if native else 0, fb if (native or raw) else 0, acc2 and native,
                         raw, sk_tiles)
    # + 1 KiB: the TMA mbarriers and template staging are static shared memory.
    kernel = _kernel_object("matmul_wgmma", _WGMMA_INPUTS, ("out", "tmaps"),
                            wgmma_smem(bn, stages, convert_a, convert_b))
    placeholder = _params((0,), mx.float32)
    tiles = math.ceil(M / 128) * math.ceil(Np / bn)
    tmpl = _tma_templates(a, b, transpose_b, bn) if tma else _params((0,), mx.uint8)
    (out, _) = kernel(
        inputs=[a, b, a_scale if a_scale is not None else placeholder,
                b_scale if b_scale is not None else placeholder, ip, tmpl],
        template=[("TA", a.dtype), ("TB", b.dtype), ("C", compute), ("TO", spec.out_dtype),
                  ("FA", _FMT_CODE[spec.a_fmt]), ("FB", _FMT_CODE[spec.b_fmt]), ("TRANS_B", transpose_b),
                  ("AS", a_scale is not None), ("BS", b_scale is not None), ("BN", bn), ("STAGES", stages),
                  ("PROMOTE", promote if native else 0), ("NATIVE", native), ("TMA", tma)],
        grid=(tiles * 256, 1, spec.batch), threadgroup=(256, 1, 1),
        output_shapes=[(spec.batch, M, Np), (spec.batch * tiles * 256 if tma else 1,)],
        output_dtypes=[spec.out_dtype, mx.uint8], init_value=POISON, stream=stream,
    )
    return out if Np == N else out[:, :, :N]


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Multiprocessors of device 0 (libcuda), the persistent kernel's grid."""
    value = ctypes.c_int(0)
    device = ctypes.c_int(0)
    lib = _libcuda()
    if lib.cuDeviceGet(ctypes.byref(device), 0) != 0 or lib.cuDeviceGetAttribute(
            ctypes.byref(value), 16, device) != 0:  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        raise RuntimeError("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT) failed")
    return value.value


def ws_smem(bn: int, stages: int, raw: int = 0) -> int:
    """matmul_ws_smem() of matmul_wgmma_ws.cuh."""
    return stages * (128 + bn) * 128 + raw * bn * 64 + 1024


def promote_template(promote: int) -> list:
    """The warp-specialised kernel's promotion as template constants, both
    non-negative: PROMOTE (every that many stages) and PROMOTE_INSTR (every
    that many k32 instructions: the plan's promote -1 / -2). MLX names a
    custom kernel after its template values, and NVRTC's name lookup fails on
    a name holding "-1" (the card said so in session 12), so no template value
    may be negative."""
    return [("PROMOTE", max(promote, 0)), ("PROMOTE_INSTR", max(-promote, 0))]


def _wgmma_ws(a, b, a_scale, b_scale, spec, stream, bn, stages, promote, native, transpose_b, ip, Np, fa, fb,
              acc2=False, raw=0, sk_tiles=None):
    """The warp-specialised persistent Hopper kernel: cuda_src/matmul_wgmma_ws.cuh
    (operands as stored, by TMA; a, b already padded as _wgmma does; raw > 0:
    b's fp8 codes decoded in the kernel from that many slots). Native fp8
    with one accumulator set: stream-K tiles by native_stream_k_tiles, or
    sk_tiles forced (over every SM, no more blocks than their k-steps); where
    there are any, the kernel's stream-K form (matmul_wgmma_ws_sk.cu) runs."""
    if acc2 and not (promote and bn == 128):
        raise ValueError(f"warp-specialised plan: two accumulator sets need BN 128 and promotion, got BN {bn}, "
                         f"promotion {promote}")
    if ws_smem(bn, stages, raw) > _WS_MAX_DYNAMIC_SMEM:
        raise ValueError(f"warp-specialised plan: BN {bn} x {stages} stages" + (f" and {raw} slots of fp8 codes" if raw
                         else "") + f" need {ws_smem(bn, stages, raw)} bytes of shared memory, more than a block's "
                         f"{_WS_MAX_DYNAMIC_SMEM}")
    M = spec.M
    units = math.ceil(M / 128) * math.ceil(Np / bn)
    # Persistent: one block per SM at most (one fits an SM: 384 threads, the
    # stage ring), so every block is resident and takes its share of tiles.
    grid = sm_count()
    blocks = min(units, grid)
    if native and not acc2 and raw == 0 and promote <= 1 and bn <= 192:
        # (Stream-K with promotion every 2 or 4 stages serialised the wgmma, at BN 256 it spilled:
        # matmul_wgmma_ws.cuh.)
        ktiles = math.ceil(a.shape[2] / 128)
        # A forced count takes every SM, but no more blocks than the shared
        # tiles' k-steps: a block of no k-step inside a cut tile's range of
        # blocks would never draw its ticket (wgmma_wa's rule).
        sk, blocks = native_stream_k_tiles(units, ktiles, grid, spec.batch) if sk_tiles is None else (
            sk_tiles, min(grid, sk_tiles * ktiles) if sk_tiles else blocks)
        if not (0 <= sk <= units and _wa_stream_k_fits(sk, ktiles, blocks) and (sk == 0 or spec.batch == 1)):
            raise ValueError(f"native fp8 plan: stream-K tiles from 0 to the {units} tiles (at most "
                             f"{_cuda._TICKET_REGION_WORDS}, k-steps x SMs below 2^31), with one batch, got {sk} "
                             f"(batch {spec.batch}, {ktiles} k-steps a tile)")
        if sk:
            return _wgmma_ws_sk(a, b, a_scale, b_scale, spec, stream, bn, stages, promote, Np, fa, fb, sk, blocks)
    kernel = _kernel_object("matmul_wgmma_ws", _WGMMA_INPUTS, ("out", "tmaps"), ws_smem(bn, stages, raw))
    placeholder = _params((0,), mx.float32)
    (out, _) = kernel(
        inputs=[a, b, a_scale if a_scale is not None else placeholder,
                b_scale if b_scale is not None else placeholder, ip,
                _tma_templates(a, b, transpose_b, bn, raw_b=bool(raw))],
        template=[("TA", a.dtype), ("TB", b.dtype), ("TO", spec.out_dtype),
                  ("FA", fa), ("FB", fb), ("TRANS_B", transpose_b),
                  ("AS", a_scale is not None), ("BS", b_scale is not None), ("BN", bn), ("STAGES", stages)]
        + promote_template(promote) + [("NATIVE", native), ("ACC2", bool(acc2)), ("RAW", raw)],
        grid=(blocks * 384, 1, spec.batch), threadgroup=(384, 1, 1),
        output_shapes=[(spec.batch, M, Np), (spec.batch * blocks * 256,)],
        output_dtypes=[spec.out_dtype, mx.uint8], init_value=POISON, stream=stream,
    )
    return out if Np == spec.N else out[:, :, :spec.N]


def _wgmma_ws_sk(a, b, a_scale, b_scale, spec, stream, bn, stages, promote, Np, fa, fb, sk, blocks):
    """The native fp8 kernel's stream-K form (matmul_wgmma_ws.cuh with SK,
    entry matmul_wgmma_ws_sk.cu): sk stream-K tiles over `blocks` blocks, their
    tickets from the stream's pool and fp32 partial sums in `part` (two
    128 x bn tiles a block: the tiles its run starts and ends in)."""
    M = spec.M
    ip = _params((M, Np, a.shape[2], int(spec.b_batched)) + _scale_flags(a_scale, b_scale) + (sk,))
    kernel = _kernel_object("matmul_wgmma_ws_sk", _WA_SK_INPUTS, _WA_SK_OUTPUTS, ws_smem(bn, stages))
    placeholder = _params((0,), mx.float32)
    (out, _, _) = kernel(
        inputs=[a, b, a_scale if a_scale is not None else placeholder,
                b_scale if b_scale is not None else placeholder, ip,
                _tma_templates(a, b, True, bn), _cuda._ticket_region(stream)],
        template=[("TA", a.dtype), ("TB", b.dtype), ("TO", spec.out_dtype), ("FA", fa), ("FB", fb),
                  ("AS", a_scale is not None), ("BS", b_scale is not None), ("BN", bn), ("STAGES", stages)]
        + promote_template(promote),
        grid=(blocks * 384, 1, spec.batch), threadgroup=(384, 1, 1),
        output_shapes=[(spec.batch, M, Np), (spec.batch * blocks * 256,), (blocks * 2 * 128 * bn,)],
        output_dtypes=[spec.out_dtype, mx.uint8, mx.float32], init_value=POISON, stream=stream,
    )
    return out if Np == spec.N else out[:, :, :spec.N]


def _wgmma_wa(a, b, a_scale, b_scale, spec, stream, plan=None):
    """The weight-as-A Hopper kernel (cuda_src/matmul_wgmma_wa.cuh): a 16-bit a
    [batch, M, K] times [N, K] fp8 codes b; plan (BT, stages) or wa_plan's,
    or (BT, stages, stream-K tiles) to force the count (0: none; more: over
    every SM, or a block a k-step where the shared tiles have fewer k-steps
    than the card has SMs) instead of wa_stream_k_tiles' choice. Where
    stream-K tiles are taken or a count is forced, the kernel's stream-K form
    runs (matmul_wgmma_wa_sk.cuh)."""
    if not wa_takes(spec) or a.dtype not in (mx.float16, mx.bfloat16):
        raise ValueError("route wgmma_wa: a 16-bit a times [N, K] fp8 codes (transpose_b) only, got a "
                         f"{spec.a_fmt or a.dtype}, b {spec.b_fmt or b.dtype}, transpose_b={spec.transpose_b}")
    if not _tma_available():
        raise ValueError("route wgmma_wa needs TMA (a Hopper GPU and a driver with cuTensorMapEncodeTiled)")
    grid = sm_count()
    plan = tuple(wa_plan(spec.M, spec.N, spec.K, grid) if plan is None else plan)
    if len(plan) not in (2, 3) or plan[0] not in (128, 192, 256) or plan[1] < 2:
        raise ValueError("route wgmma_wa: plan (BT, stages[, stream-K tiles]) with BT 128, 192 or 256 and 2 stages "
                         f"or more, got {plan}")
    bt, stages = plan[:2]
    if wa_smem(bt, stages) > _WS_MAX_DYNAMIC_SMEM:
        raise ValueError(f"route wgmma_wa: BT {bt} x {stages} stages need {wa_smem(bt, stages)} bytes of shared "
                         f"memory, more than a block's {_WS_MAX_DYNAMIC_SMEM}")
    M, N = spec.M, spec.N
    # Whole 16-byte chunks: K and N to multiples of 16 (the weight's padded
    # rows are zero codes; their outputs are cut off below).
    a = _pad_axis(a, 2, 16, stream)
    b = _pad_axis(_pad_axis(b, 2, 16, stream), 1, 16, stream)
    Kp, Np = a.shape[2], b.shape[1]
    if b_scale is not None and Np != N and b_scale.shape[-1] > 1:
        b_scale = _pad_axis(b_scale, 2, 16, stream)
    units, ktiles = math.ceil(M / bt) * math.ceil(Np / 128), math.ceil(Kp / 64)
    # Persistent: one block per SM at most. A forced stream-K count plan[2]
    # takes every SM, but no more blocks than the shared tiles' k-steps: a
    # block of no k-step inside a cut tile's range of blocks would never draw
    # its ticket, so no block would finish that tile (NaN on an H100 in
    # session 23: 2 tiles of 47 k-steps over 132 blocks).
    sk, blocks = wa_stream_k_tiles(units, ktiles, grid, spec.batch) if len(plan) == 2 else (
        plan[2], min(grid, plan[2] * ktiles) if plan[2] else min(units, grid))
    if not (0 <= sk <= units and _wa_stream_k_fits(sk, ktiles, blocks) and (sk == 0 or spec.batch == 1)):
        raise ValueError(f"route wgmma_wa: stream-K tiles from 0 to the {units} tiles (at most "
                         f"{_cuda._TICKET_REGION_WORDS}, k-steps x SMs below 2^31), with one batch, got {sk} "
                         f"(batch {spec.batch}, {ktiles} k-steps a tile)")
    placeholder = _params((0,), mx.float32)
    inputs = [a, b, a_scale if a_scale is not None else placeholder, b_scale if b_scale is not None else placeholder]
    template = [("TA", a.dtype), ("TO", spec.out_dtype), ("FB", _FMT_CODE[spec.b_fmt]), ("AS", a_scale is not None),
                ("BS", b_scale is not None), ("BT", bt), ("STAGES", stages)]
    tmpl = _wa_tma_templates(M, Kp, Np, bt)
    launch = dict(template=template, grid=(blocks * 384, 1, spec.batch), threadgroup=(384, 1, 1),
                  init_value=POISON, stream=stream)
    if len(plan) == 2 and sk == 0 and bt != 192:
        # Every tile whole: the kernel text of session 20. Its stream-K form
        # below gives the same bits with 0 stream-K tiles (the same products
        # in the same order); only that form has 192-token tiles.
        ip = _params((M, Np, Kp, int(spec.b_batched)) + _scale_flags(a_scale, b_scale))
        kernel = _kernel_object("matmul_wgmma_wa", _WGMMA_INPUTS, _WA_OUTPUTS, wa_smem(bt, stages))
        (out, _) = kernel(inputs=inputs + [ip, tmpl],
                          output_shapes=[(spec.batch, M, Np), (spec.batch * blocks * 256,)],
                          output_dtypes=[spec.out_dtype, mx.uint8], **launch)
    else:
        ip = _params((M, Np, Kp, int(spec.b_batched)) + _scale_flags(a_scale, b_scale) + (sk,))
        kernel = _kernel_object("matmul_wgmma_wa_sk", _WA_SK_INPUTS, _WA_SK_OUTPUTS, wa_smem(bt, stages))
        (out, _, _) = kernel(
            inputs=inputs + [ip, tmpl, _cuda._ticket_region(stream) if sk else _params((0,), mx.uint32)],
            # part: two fp32 tiles of partial sums a block (the tiles its run starts and ends in).
            output_shapes=[(spec.batch, M, Np), (spec.batch * blocks * 256,), (blocks * 2 * 128 * bt if sk else 1,)],
            output_dtypes=[spec.out_dtype, mx.uint8, mx.float32], **launch)
    return out if Np == N else out[:, :, :N]


@functools.lru_cache(maxsize=1024)
def _wa_tma_templates(M, Kp, Np, bt):
    """The weight-as-A kernel's two tensor-map templates: a [M][Kp] 16-bit in
    [bt][64] boxes (128-byte swizzle), the codes [Np][Kp] in [128][64] boxes
    (64-byte swizzle)."""
    ta = tensor_map_template(2, Kp, M, 64, bt)
    tb = tensor_map_template(1, Kp, Np, 64, 128, swizzle=64)
    return _cuda.const_array(tuple(ta + tb), mx.uint8)


def matmul2d(a, b, a_scale, b_scale, spec, stream, route=None, plan=None):
    """The backend entry (dispatch calls it with the first six); `route` and
    `plan` (a wgmma (BN, stages, promote[, tma]) or a gemv GEMV_PLAN) force a kernel, for tests and benchmarks."""
    route = route or route_of(a, b, spec)
    # A per-tensor scale (4 bytes) out of MLX's host-resident small pool: every output element's thread reads it.
    a_scale, b_scale = _cuda.out_of_small_pool(a_scale, stream), _cuda.out_of_small_pool(b_scale, stream)
    if spec.M == 0 or spec.N == 0:
        return mx.zeros((spec.batch, spec.M, spec.N), dtype=spec.out_dtype, stream=stream)
    if spec.K == 0:
        # An empty sum (no tensor map can describe a K of 0): zeros, times the
        # scales as every kernel applies them (a NaN scale stays NaN).
        out = mx.zeros((spec.batch, spec.M, spec.N), dtype=mx.float32, stream=stream)
        for scale in (a_scale, b_scale):
            if scale is not None:
                out = mx.multiply(out, scale, stream=stream)
        return out.astype(spec.out_dtype, stream=stream)
    if route == "float32":
        return _float32_route(a, b, a_scale, b_scale, spec, stream)
    if route == "gemv":
        return _gemv(a, b, a_scale, b_scale, spec, stream, plan)
    if route in ("wgmma", "wgmma_fp8"):
        return _wgmma(a, b, a_scale, b_scale, spec, stream, plan, native=route == "wgmma_fp8")
    if route == "wgmma_wa":
        return _wgmma_wa(a, b, a_scale, b_scale, spec, stream, plan)
    return _mma(a, b, a_scale, b_scale, spec, stream)


def _mma(a, b, a_scale, b_scale, spec, stream):
    """The portable tensor-core kernel: cuda_src/matmul.cuh."""
    float_types = {x.dtype for x, fmt in ((a, spec.a_fmt), (b, spec.b_fmt)) if fmt is None}
    compute = next(iter(float_types)) if float_types else mx.float16
    M, N, K = spec.M, spec.N, spec.K
    # Every 16-byte chunk wholly inside or outside: K and N to multiples of 16.
    a = _pad_axis(a, 2, 16, stream)
    b = _pad_axis(b, 2 if spec.transpose_b else 1, 16, stream)
    b = _pad_axis(b, 1 if spec.transpose_b else 2, 16, stream)
    Kp, Np = a.shape[2], (b.shape[1] if spec.transpose_b else b.shape[2])
    ip = _params((M, Np, Kp, int(spec.b_batched)) + _scale_flags(a_scale, b_scale))
    if b_scale is not None and Np != N and b_scale.shape[-1] > 1:
        b_scale = _pad_axis(b_scale, 2, 16, stream)
    if _NATIVE_FP8 and spec.a_fmt and spec.b_fmt:
        _cuda.require_capability("MLX_FLASH_CUDA_NATIVE_FP8=1", (8, 9),
                                 "the native fp8 mma.sync (m16n8k32 with e4m3/e5m2 operands)")
    kernel = _cuda._kernel("matmul", _INPUTS, ("out",), _SMEM)
    placeholder = _params((0,), mx.float32)
    (out,) = kernel(
        inputs=[a, b, a_scale if a_scale is not None else placeholder,
                b_scale if b_scale is not None else placeholder, ip],
        template=[("TA", a.dtype), ("TB", b.dtype), ("C", compute), ("TO", spec.out_dtype),
                  ("FA", _FMT_CODE[spec.a_fmt]), ("FB", _FMT_CODE[spec.b_fmt]),
                  ("TRANS_B", spec.transpose_b), ("AS", a_scale is not None), ("BS", b_scale is not None),
                  ("NATIVE_FP8", _NATIVE_FP8)],
        grid=(math.ceil(Np / _TILE) * 256, math.ceil(M / _TILE), spec.batch), threadgroup=(256, 1, 1),
        output_shapes=[(spec.batch, M, Np)], output_dtypes=[spec.out_dtype], init_value=POISON, stream=stream,
    )
    return out if Np == N else out[:, :, :N]


@dataclass(frozen=True)
class _Spec:
    """Stand-in for mlx_flash._matmul_spec.MatmulSpec (same fields) for direct calls."""

    a_fmt: Optional[str]
    b_fmt: Optional[str]
    transpose_b: bool
    out_dtype: mx.Dtype
    batch: int
    M: int
    N: int
    K: int
    b_batched: bool
    # MatmulSpec's too: route_of reads it (without it every fp8 x fp8 call
    # here without a forced route failed with an AttributeError).
    fast_accumulation: bool = False


def matmul(a, b, *, a_fmt=None, b_fmt=None, a_scale=None, b_scale=None, transpose_b=False,
           out_dtype=None, stream=None, route=None, plan=None):
    """2-D convenience entry for benchmarks and tests: a [M, K], b [K, N] (or [N, K])."""
    M, K = a.shape
    N = b.shape[0] if transpose_b else b.shape[1]
    if out_dtype is None:
        floats = [x.dtype for x, f in ((a, a_fmt), (b, b_fmt)) if f is None]
        out_dtype = floats[0] if floats and len(set(floats)) == 1 else mx.float32
    spec = _Spec(a_fmt, b_fmt, transpose_b, out_dtype, 1, M, N, K, False)
    a_s = None if a_scale is None else mx.broadcast_to(mx.array(a_scale, mx.float32).reshape(1, -1, 1), (1, M if mx.array(a_scale).size > 1 else 1, 1))
    b_s = None if b_scale is None else mx.array(b_scale, mx.float32).reshape(1, 1, -1)
    # reshape, not [0]: indexing the batch axis gathers the whole output into
    # a new array (0.42 ms of copying at 8192^2 fp16 on the H200); a reshape
    # of the contiguous [1, M, N] result is free.
    return matmul2d(a[None], b[None], a_s, b_s, spec, stream, route, plan).reshape(M, N)


# ---------------------------------------------------------------------------
# FP8Linear's few-rows call as one kernel node (nn.FP8Linear, opt-in:
# MLX_FLASH_FP8LINEAR_PATH=direct).
#
# A decode step calls each layer once with the same shapes, and generation
# on a fast GPU is bound by host time: graph building plus MLX's evaluation
# loop, which visits every node of the graph (views included). matmul2d's
# graph for `x @ W^T * s` holds reshapes of x, W and the scale, the kernel,
# the custom function's node and the output's reshape; nn.Linear's holds a
# transpose view and one addmm. This entry hands the kernel the caller's own
# arrays (x [..., K] row-contiguous, the weight [N, K], the scale [N, 1] or
# [1, 1]: the kernel reads flat offsets, so no reshape is needed) and declares
# the output [..., N] directly: one node. The template is written into the
# kernel source once per instance (cuda._template_source), so a call hands MLX
# no template arguments to format.

def linear_few_rows_supported(x, weight) -> bool:
    """Whether `linear_few_rows` takes this x ([..., K], 1..GEMV_MAX_ROWS rows of
    fp16/bf16) and weight ([N, K] uint8 fp8 codes, K a multiple of 16: the
    kernel reads whole 16-byte words, and padding would add nodes). Called per
    layer call: few property reads."""
    shape, wshape = x.shape, weight.shape
    if not shape or len(wshape) != 2 or shape[-1] != wshape[1] or shape[-1] % 16 or not wshape[0]:
        return False
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return 0 < rows <= GEMV_MAX_ROWS and x.dtype in _HALF_TYPES and weight.dtype == mx.uint8


_HALF_TYPES = (mx.float16, mx.bfloat16)


@functools.lru_cache(maxsize=256)
def _linear_launch(dtype, fmt: str, per_channel: bool, rows: int, N: int, K: int, plan: tuple, factory):
    """(kernel, ip, placeholder, grid, threadgroup) of one few-rows linear
    instance: made once per shape and kept (keyed by the kernel factory too,
    so the CUDA emulation's stand-in gets its own)."""
    warps, row_tiles, unroll, max_blocks, stages, bounds, sector = (tuple(plan) + (0, 0))[:7]
    if stages:
        raise ValueError(f"gemv plan {plan}: the direct linear path takes register plans only (STAGES 0)")
    _check_gemv_bounds(plan, warps, bounds)
    a_tiles = 1 if rows <= 8 else 2
    template = [("TA", dtype), ("TB", mx.uint8), ("TO", dtype), ("FB", _FMT_CODE[fmt]), ("AS", False),
                ("BS", True), ("MT", a_tiles), ("W", warps), ("RT", row_tiles), ("U", unroll), ("STAGES", 0),
                ("BOUNDS", bounds), ("SECTOR", bool(sector))]
    headers = _cuda.kernel_headers("matmul_gemv") + ((f"matmul_gemv_bounds{bounds}.cuh",) if bounds else ())
    kernel = _cuda._kernel("matmul_gemv", _INPUTS, ("out",), 0, headers=headers,
                           constants=_cuda._template_source(template))
    ip = _params((rows, N, K, 0, 0, 0, int(per_channel)))
    blocks = math.ceil(N / (16 * row_tiles))
    if max_blocks:
        blocks = min(blocks, max_blocks if max_blocks > 0 else -max_blocks * sm_count())
    return kernel, ip, _params((0,), mx.float32), (blocks * 32 * warps, 1, 1), (32 * warps, 1, 1)


def linear_few_rows(x, weight, scale, fmt: str, stream=None, plan=None):
    """`x @ (decode(weight) * scale)^T` in x's dtype as one kernel node:
    x [..., K] (fp16/bf16, at most GEMV_MAX_ROWS rows), weight [N, K] fp8
    codes, scale float32 with N or 1 values (per output channel or per
    tensor). The caller checks `linear_few_rows_supported` first."""
    K = x.shape[-1]
    N = weight.shape[0]
    rows = x.size // K
    if scale.dtype != mx.float32 or scale.size not in (1, N):
        raise ValueError(f"scale: expected float32 with 1 or {N} values, got {scale.dtype} {tuple(scale.shape)}")
    scale = _cuda.out_of_small_pool(scale, stream)
    kernel, ip, placeholder, grid, threads = _linear_launch(x.dtype, fmt, scale.size > 1, rows, N, K,
                                                            tuple(plan or gemv_plan(rows, True, N)), getattr(mx.fast, "cuda_kernel", None))
    (out,) = kernel(inputs=[x, weight, placeholder, scale, ip], grid=grid, threadgroup=threads,
                    output_shapes=[x.shape[:-1] + (N,)], output_dtypes=[x.dtype], init_value=POISON,
                    stream=stream)
    return out


def quantize_rows(x, fmt: str, stream=None):
    """FP8Linear's quantized activations of a 2-D float x [rows, K] as one
    kernel (cuda_src/fp8_quantize_rows.cuh, one block a row): (codes uint8
    [rows, K], scale float32 [rows, 1]), the bits of nn._quantize_activations
    on MLX ops (~20 kernels over the activations there)."""
    from .. import fp8

    fp8._format(fmt)  # a ValueError naming fmt
    if x.ndim != 2 or x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise ValueError(f"x: expected a 2-D float32/float16/bfloat16 array, got {x.ndim}-D {x.dtype}")
    rows, K = x.shape
    if rows == 0 or K == 0:
        return fp8.quantize(x, fmt, axis=0)
    vec = 16 // x.dtype.size  # 16-byte loads where rows are whole loads (rows then start aligned)
    vec = vec if K % vec == 0 else 1
    kernel = _kernel_object("fp8_quantize_rows", ("x", "ip"), ("codes", "scale"), 0)
    codes, scale = kernel(
        inputs=[x, _params((K,))],
        template=[("T", x.dtype), ("VEC", vec), ("FMT", _FMT_CODE[fmt])],
        grid=(rows * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(rows, K), (rows, 1)], output_dtypes=[mx.uint8, mx.float32], init_value=POISON,
        stream=stream,
    )
    return codes, scale
