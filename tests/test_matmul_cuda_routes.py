"""matmul2d's CUDA kernel routes, each forced (cuda_matmul.matmul2d(route=...)),
against float64 of the dequantized operands, outputs poisoned with NaN:

  wgmma      the Hopper kernel (matmul_wgmma.cuh) on 16-bit wgmma, fp8 codes
             decoded in shared memory: every operand pair, both b layouts,
             every tile plan, edge tiles in M, N and K (odd sizes, K = 1),
             batches, scales; fp32-exact like every other route;
  wgmma_fp8  the same kernel on native fp8 wgmma (opt-in): within the bound
             its 13-bit tensor-core sums allow, 2^-8 * (|a| @ |b|), plus the
             output's rounding (tests/fp8_wgmma_bound.py); every product of
             two fp8 codes, short K (1, 2, 31, 33), memory around the
             operands poisoned;
  gemv   the few-rows kernel (matmul_gemv.cuh): 1..16 rows, odd N and K,
         fp8 and 16-bit weights, batched weights, scales.

Run on a CUDA GPU (wgmma cases on sm_90 only); skipped cleanly elsewhere.
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash

from fp8_wgmma_bound import assert_within_fp8_accumulation, every_code_case
from helpers import rng
from test_matmul import assert_close, make_operand, reference

pytestmark = [pytest.mark.usefixtures("cpu_default_device"),
              pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                                 reason="no CUDA GPU visible to MLX")]
GPU = mx.Device(mx.gpu)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "POISON", float("nan"))


def needs_hopper():
    from mlx_flash.backends import cuda

    if not cuda._is_hopper():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")


def run_route(route, a, b, *, a_fmt=None, b_fmt=None, a_scale=None, b_scale=None, transpose_b=False,
              out_dtype=None, plan=None):
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    spec, a3, b3, sa, sb, lead = validate_matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=a_scale, b_scale=b_scale,
                                                 transpose_b=transpose_b, out_dtype=out_dtype)
    assert route.startswith("wgmma") or cuda_matmul.route_of(a3, b3, spec) == route
    out = cuda_matmul.matmul2d(a3, b3, sa, sb, spec, GPU, route=route, plan=plan)
    mx.eval(out)
    return out.reshape(*lead, spec.M, spec.N)


WG_KINDS = [("float16", "float16"), ("bfloat16", "bfloat16"), ("e4m3", "e4m3"), ("e4m3", "e5m2"),
            ("e5m2", "e4m3"), ("e5m2", "e5m2"), ("float16", "e4m3"), ("bfloat16", "e5m2"), ("e4m3", "bfloat16"),
            ("e5m2", "float16")]
FP8_PAIRS = [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e4m3"), ("e5m2", "e5m2")]


@pytest.mark.parametrize("ka,kb", WG_KINDS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (130, 200, 70), (129, 1, 513), (300, 129, 258), (17, 1000, 33)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_matches_float64(ka, kb, M, K, N, transpose_b):
    needs_hopper()
    gen = rng("wgmma", ka, kb, M, K, N, transpose_b)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    for out_dtype in (mx.float32, None):
        out = run_route("wgmma", a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=transpose_b, out_dtype=out_dtype)
        assert_close(out, reference(a64, b64, sa, sb, transpose_b=transpose_b), out.dtype, K)


def xdist_group(name):
    """Cases of one group run on one pytest-xdist worker (with --dist loadgroup),
    which then compiles their kernels once; no mark without xdist."""
    return pytest.mark.xdist_group(name) if importlib.util.find_spec("xdist") else pytest.mark.skipif(False, reason="")


# One pytest-xdist worker runs every TMA case.
TMA = xdist_group("tma")


@TMA
@pytest.mark.parametrize("ka,kb", [("float16", "float16"), ("bfloat16", "bfloat16"), ("e4m3", "e5m2")])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (130, 200, 70), (300, 1000, 513)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_tma_loads(ka, kb, M, K, N, transpose_b):
    """Stage tiles by TMA (tensor maps encoded on the host, addresses set per
    block on the device), for the 16-bit and the native fp8 kernel."""
    needs_hopper()
    gen = rng("wgmma-tma", ka, kb, M, K, N, transpose_b)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    if a_fmt:
        out = run_route("wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), transpose_b=transpose_b,
                        out_dtype=mx.float32, plan=(128, 6, 1, True))
        assert_within_fp8_accumulation(out, a64, b64, sa, None, transpose_b, mx.float32)
    else:
        out = run_route("wgmma", a, b, a_scale=mx.array(sa), transpose_b=transpose_b, out_dtype=mx.float32,
                        plan=(256, 4, 0, True))
        assert_close(out, reference(a64, b64, sa, None, transpose_b=transpose_b), mx.float32, K)


# Every tile plan of the exact kernel, on a product long in K.
PLANS = [(256, 4, 0), (128, 6, 0), (128, 4, 0), pytest.param((256, 4, 0, True), marks=TMA)]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"bn{p[0]}_st{p[1]}{'_tma' if len(p) > 3 else ''}")
@pytest.mark.parametrize("ka,kb", [("float16", "float16"), ("e4m3", "e4m3"), ("bfloat16", "e4m3")])
def test_cuda_wgmma_plans_long_k(plan, ka, kb):
    needs_hopper()
    if len(plan) > 3 and ka != kb:
        pytest.skip("TMA loads operands used as stored")
    gen = rng("wgmma-plan", plan, ka, kb)
    M, K, N = 257, 4096, 384
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    out = run_route("wgmma", a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=True, out_dtype=mx.float32, plan=plan)
    assert_close(out, reference(a64, b64, transpose_b=True), mx.float32, K)


NATIVE_PLANS = [(128, 6, 1), (128, 4, 1), (128, 6, 2), (256, 4, 0), pytest.param((128, 6, 1, True), marks=TMA),
                pytest.param((128, 6, 2, True), marks=TMA)]


@pytest.mark.parametrize("ka,kb", [pytest.param(*p, marks=xdist_group(f"native_default-{p[0]}-{p[1]}"))
                                   for p in FP8_PAIRS])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (130, 200, 70), (129, 1, 513), (300, 1000, 258)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_fp8_native_within_bound(ka, kb, M, K, N, transpose_b):
    needs_hopper()
    gen = rng("wgmma-fp8", ka, kb, M, K, N, transpose_b)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    for out_dtype in (mx.float32, mx.float16):
        out = run_route("wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=transpose_b, out_dtype=out_dtype)
        assert_within_fp8_accumulation(out, a64, b64, sa, sb, transpose_b, out_dtype)



@pytest.mark.parametrize("ka,kb", FP8_PAIRS)
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_fast_accumulation_takes_the_native_route(ka, kb, transpose_b):
    """matmul2d(..., fast_accumulation=True), the public way to the native fp8
    kernel: routed there on Hopper without the process-wide switch, within
    the fp8 accumulation bound; the default call stays on the exact route."""
    needs_hopper()
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    gen = rng("fast-accumulation", ka, kb, transpose_b)
    M, K, N = 257, 1000, 130
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    args = dict(a_fmt=a_fmt, b_fmt=b_fmt, b_scale=mx.array(sb), transpose_b=transpose_b, out_dtype=mx.float16)
    routes = {}
    for fast in (False, True):
        spec, a3, b3, *_ = validate_matmul(a, b, fast_accumulation=fast, **args)
        routes[fast] = cuda_matmul.route_of(a3, b3, spec)
    assert routes == {False: "wgmma_fp8" if cuda_matmul._FP8_NATIVE else "wgmma", True: "wgmma_fp8"}
    out = mlx_flash.matmul2d(a, b, fast_accumulation=True, stream=GPU, **args)
    assert_within_fp8_accumulation(out, a64, b64, None, sb, transpose_b, mx.float16)


# Both fp8 routes on operands holding every finite code of their format, the
# smallest multiplied together (float16 results down to its subnormals), short
# K (each padded to the k32 / k16 step inside one 128-K stage), both b layouts,
# M and N crossing tile edges. The native route by TMA (the default plan) and
# by cp.async; the exact route must be fp32-exact as everywhere.
# (name, route, plan); each (route, plan, pair) is one xdist group, sharing its kernels.
ROUTE_PLANS = [("native_default", "wgmma_fp8", None), ("native_cp_async", "wgmma_fp8", (128, 6, 1)),
               ("exact", "wgmma", None)]
ROUTE_PAIRS = [pytest.param(route, plan, ka, kb, id=f"{name}-{ka}-{kb}", marks=xdist_group(f"{name}-{ka}-{kb}"))
               for name, route, plan in ROUTE_PLANS for ka, kb in FP8_PAIRS]


@pytest.mark.parametrize("route,plan,ka,kb", ROUTE_PAIRS)
@pytest.mark.parametrize("K", [1, 2, 31, 33])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_fp8_every_code_short_k(route, plan, ka, kb, K, transpose_b):
    needs_hopper()
    a, b, a64, b64, sa, sb = every_code_case(rng("wgmma-fp8-codes", ka, kb, K, transpose_b), ka, kb, K, transpose_b)
    # The exact route's float16 results are checked elsewhere (test_cuda_wgmma_matches_float64).
    results = {}
    for out_dtype in (mx.float32, mx.float16) if route == "wgmma_fp8" else (mx.float32,):
        out = run_route(route, a, b, a_fmt=ka, b_fmt=kb, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=transpose_b, out_dtype=out_dtype, plan=plan)
        if route == "wgmma":
            assert_close(out, reference(a64, b64, sa, sb, transpose_b=transpose_b), out_dtype, K)
        else:
            rel = assert_within_fp8_accumulation(out, a64, b64, sa, sb, transpose_b, out_dtype)
            print(f"{route} {plan} {ka} x {kb} K={K} {out_dtype}: max error / max |result| = {rel:.3g}")
        results[out_dtype] = np.array(out.astype(mx.float32))
    if mx.float16 in results:
        # The same sums, rounded once to float16 (subnormals included) by the epilogue.
        assert np.array_equal(results[mx.float16], results[mx.float32].astype(np.float16).astype(np.float32))


NAN_CODE = 0x7F  # NaN in e4m3 and in e5m2


def poisoned_tail_view(codes: np.ndarray, poison: int, extra: int = 4096) -> mx.array:
    """`codes` as the front of a larger buffer whose remaining bytes are the
    NaN code: a kernel reading past the operand's end makes NaN outputs. A
    leading slice is row-contiguous, so MLX hands the kernel the buffer itself."""
    flat = np.full(codes.size + extra, poison, dtype=np.uint8)
    flat[:codes.size] = codes.ravel()
    return mx.array(flat)[:codes.size].reshape(codes.shape)


@pytest.mark.parametrize("route,plan,ka,kb", ROUTE_PAIRS)
@pytest.mark.parametrize("M,K,N", [(129, 32, 48), (1, 16, 16), (130, 144, 272)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_fp8_poisoned_memory_around_operands(route, plan, ka, kb, M, K, N, transpose_b):
    """K and N multiples of 16, so the wrapper pads nothing and the kernel reads
    a and b in place (the native route copies a [K, N] b transposed first);
    every byte after each operand is a NaN code."""
    needs_hopper()
    gen = rng("wgmma-fp8-poison", ka, kb, M, K, N, transpose_b)
    a, _, a64 = make_operand(gen, (M, K), ka)
    b, _, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    a = poisoned_tail_view(np.array(a), NAN_CODE)
    b = poisoned_tail_view(np.array(b), NAN_CODE)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    out = run_route(route, a, b, a_fmt=ka, b_fmt=kb, a_scale=mx.array(sa), b_scale=mx.array(sb),
                    transpose_b=transpose_b, out_dtype=mx.float32, plan=plan)
    if route == "wgmma":
        assert_close(out, reference(a64, b64, sa, sb, transpose_b=transpose_b), mx.float32, K)
    else:
        assert_within_fp8_accumulation(out, a64, b64, sa, sb, transpose_b, mx.float32)


@pytest.mark.parametrize("plan", NATIVE_PLANS, ids=lambda p: f"bn{p[0]}_st{p[1]}_pr{p[2]}{'_tma' if len(p) > 3 else ''}")
def test_cuda_wgmma_fp8_native_plans_long_k(plan):
    needs_hopper()
    gen = rng("wgmma-fp8-plan", plan)
    M, K, N = 257, 8192, 384
    a, a_fmt, a64 = make_operand(gen, (M, K), "e4m3")
    b, b_fmt, b64 = make_operand(gen, (N, K), "e4m3")
    out = run_route("wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=True, out_dtype=mx.float32, plan=plan)
    rel = assert_within_fp8_accumulation(out, a64, b64, None, None, True, mx.float32)
    print(f"native fp8 plan {plan}: max error / max |result| = {rel:.3g}")


@pytest.mark.parametrize("b_batched", [False, True])
@pytest.mark.parametrize("scales", ["tensor", "rows_cols", "batched_rows"])
def test_cuda_wgmma_batched_and_scales(b_batched, scales):
    needs_hopper()
    gen = rng("wgmma-batch", b_batched, scales)
    lead, M, K, N = (3,), 140, 96, 272
    for ka, kb in (("float16", "e4m3"), ("e4m3", "e5m2"), ("bfloat16", "bfloat16"), ("e5m2", "float16")):
        a, a_fmt, a64 = make_operand(gen, lead + (M, K), ka)
        b, b_fmt, b64 = make_operand(gen, (lead if b_batched else ()) + (N, K), kb)
        if scales == "tensor":
            sa, sb = np.float32(1.5), np.float32(0.25)
        elif scales == "rows_cols":
            sa, sb = gen.uniform(0.5, 2, (M, 1)).astype(np.float32), gen.uniform(0.5, 2, (1, N)).astype(np.float32)
        else:
            sa, sb = gen.uniform(0.5, 2, lead + (M, 1)).astype(np.float32), None
        out = run_route("wgmma", a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=True,
                        a_scale=mx.array(sa), b_scale=None if sb is None else mx.array(sb))
        assert_close(out, reference(a64, b64, sa, sb, transpose_b=True), out.dtype, K)


@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("ka,kb", [("float16", "e4m3"), ("bfloat16", "e5m2"), ("float16", "float16"),
                                   ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("K,N", [(1, 1), (45, 17), (1000, 129), (4096, 520)])
def test_cuda_gemv_matches_float64(M, ka, kb, K, N):
    gen = rng("gemv", M, ka, kb, K, N)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    for out_dtype in (mx.float32, None):
        out = run_route("gemv", a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=True, out_dtype=out_dtype)
        assert_close(out, reference(a64, b64, sa, sb, transpose_b=True), out.dtype, K)


# The warp-specialised persistent kernel (matmul_wgmma_ws.cuh), forced by a
# plan with its fifth entry set: 16-bit operands both b layouts (exact), fp8
# pairs on native fp8 wgmma (within the accumulation bound), odd shapes, more
# tiles than SMs (blocks sweep several tiles, the stage ring runs on across
# them), batches and scales. A sixth entry True alternates two accumulator
# sets between the native sums' promotion intervals; a negative third entry
# promotes every one or two k32 instructions.
WS_16 = [(256, 4, 0, True, True), (128, 6, 0, True, True)]
WS_FP8 = [(128, 6, 2, True, True), (192, 5, 2, True, True), (192, 5, 4, True, True), (128, 7, 4, True, True, True),
          (128, 6, -1, True, True), (128, 6, -2, True, True), (192, 5, -1, True, True), (128, 6, 1, True, True),
          (192, 5, 1, True, True)]
WS = xdist_group("ws")


def ws_id(plan):
    return f"bn{plan[0]}_st{plan[1]}_pr{plan[2]}" + ("_acc2" if len(plan) > 5 and plan[5] else "")


def ws_plans(plans, kind):
    """One xdist group per plan: its cases share a worker, which compiles each
    of the plan's kernels once, and the plans spread over the workers."""
    return [pytest.param(p, id=ws_id(p), marks=xdist_group(f"ws-{kind}-{ws_id(p)}")) for p in plans]


@pytest.mark.parametrize("plan", ws_plans(WS_16, "16"))
@pytest.mark.parametrize("ka", ["float16", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (130, 200, 70), (300, 1000, 513), (2000, 136, 2100)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_ws_16bit_matches_float64(plan, ka, M, K, N, transpose_b):
    needs_hopper()
    gen = rng("wgmma-ws", plan, ka, M, K, N, transpose_b)
    a, _, a64 = make_operand(gen, (M, K), ka)
    b, _, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), ka)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    for out_dtype in (mx.float32, None):
        out = run_route("wgmma", a, b, a_scale=mx.array(sa), b_scale=mx.array(sb), transpose_b=transpose_b,
                        out_dtype=out_dtype, plan=plan)
        assert_close(out, reference(a64, b64, sa, sb, transpose_b=transpose_b), out.dtype, K)


@pytest.mark.parametrize("plan", ws_plans(WS_FP8, "fp8"))
@pytest.mark.parametrize("ka,kb", [("e4m3", "e4m3"), ("e5m2", "e4m3")])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (129, 1, 513), (300, 1000, 258), (257, 4096, 384),
                                   (2000, 256, 2100)])
def test_cuda_wgmma_ws_fp8_native_within_bound(plan, ka, kb, M, K, N):
    needs_hopper()
    gen = rng("wgmma-ws-fp8", plan, ka, kb, M, K, N)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    for out_dtype in (mx.float32, mx.float16):
        out = run_route("wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=True, out_dtype=out_dtype, plan=plan)
        assert_within_fp8_accumulation(out, a64, b64, sa, sb, True, out_dtype)


# Session 10 (H200, the route suite at -n 6 beside another GPU process) had
# NaN poison in the bottom-right tile of these cases on these plans; run alone
# they passed. Here the same calls (same plans, order, scales, float32 output
# first) repeated while a second GPU stream of this process keeps large
# matmuls queued, so that the kernels share the card as they did there.
# Cause and discriminating probe: docs/matmul.md ("The ws NaN of session 10"),
# tools/ws_matmul_nan_probe.py.
@pytest.mark.parametrize("family,plan", [("16", WS_16[0]), ("16", WS_16[1]), ("fp8", WS_FP8[0]), ("fp8", WS_FP8[1])],
                         ids=lambda v: ws_id(v) if isinstance(v, tuple) else v)
def test_cuda_wgmma_ws_session10_cases_under_load(family, plan):
    needs_hopper()
    if family == "16":
        calls = [("float16", "float16", 1, 1, 1, True), ("bfloat16", "bfloat16", 1, 1, 1, True),
                 ("float16", "float16", 300, 1000, 513, True), ("bfloat16", "bfloat16", 300, 1000, 513, False)]
    else:
        calls = [("e4m3", "e4m3", 1, 1, 1, True), ("e5m2", "e4m3", 1, 1, 1, True),
                 ("e4m3", "e4m3", 300, 1000, 258, True), ("e5m2", "e4m3", 257, 4096, 384, True)]
    busy = mx.new_stream(mx.gpu)
    big = mx.random.normal((4096, 4096), stream=busy).astype(mx.float16, stream=busy)
    gen = rng("wgmma-ws-s10-load", family, plan)
    for _ in range(6):
        for ka, kb, M, K, N, transpose_b in calls:
            a, a_fmt, a64 = make_operand(gen, (M, K), ka)
            b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
            sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
            sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
            for out_dtype in (mx.float32, None if family == "16" else mx.float16):
                mx.async_eval(mx.matmul(big, big, stream=busy))  # the neighbour's work, not waited for
                out = run_route("wgmma" if family == "16" else "wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt,
                                a_scale=mx.array(sa), b_scale=mx.array(sb), transpose_b=transpose_b,
                                out_dtype=out_dtype, plan=plan)
                if family == "16":
                    assert_close(out, reference(a64, b64, sa, sb, transpose_b=transpose_b), out.dtype, K)
                else:
                    assert_within_fp8_accumulation(out, a64, b64, sa, sb, True, out_dtype)
    mx.synchronize(busy)


@WS
@pytest.mark.parametrize("ka,kb", [("float16", "e4m3"), ("bfloat16", "e5m2"), ("e4m3", "e5m2"), ("e5m2", "bfloat16")])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (130, 200, 70), (300, 1000, 513)])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_cuda_wgmma_ws_exact_fp8_decoded_first(ka, kb, M, K, N, transpose_b):
    """The exact route with a warp-specialised plan: fp8 operands decoded to
    16-bit first (exact), then the 16-bit kernel: fp32-exact as every route."""
    needs_hopper()
    gen = rng("wgmma-ws-cvt", ka, kb, M, K, N, transpose_b)
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
    sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    out = run_route("wgmma", a, b, a_fmt=a_fmt, b_fmt=b_fmt, b_scale=mx.array(sb), transpose_b=transpose_b,
                    out_dtype=mx.float32, plan=WS_16[0])
    assert_close(out, reference(a64, b64, None, sb, transpose_b=transpose_b), mx.float32, K)


# FP8Linear's prefill product: a 16-bit a times [N, K] fp8 codes decoded inside
# the warp-specialised kernel (cuda_matmul.CVT_RAW_SLOTS slots of codes). The
# decoded values and the 16-bit products are those of the decode-first pass
# (CVT_RAW_SLOTS = 0), so the two outputs must agree bit for bit, and both
# match float64. Every finite code of b's format; M, N, K across tile edges,
# K = 1 and K long enough to round the stage ring and the slots many times.
@WS
@pytest.mark.parametrize("plan,raw", [((256, 4, 0, True, True), 2), ((256, 4, 0, True, True), 1),
                                      ((256, 3, 0, True, True), 3), ((128, 6, 0, True, True), 2)],
                         ids=lambda v: ws_id(v) if isinstance(v, tuple) else f"raw{v}")
@pytest.mark.parametrize("ka,kb", [("float16", "e4m3"), ("bfloat16", "e5m2"), ("bfloat16", "e4m3")])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (600, 4096, 1030), (2000, 136, 2100), (130, 1000, 300)])
def test_cuda_wgmma_ws_fp8_weight_decoded_in_kernel(plan, raw, ka, kb, M, K, N, monkeypatch):
    from fp8_wgmma_bound import downscaling, every_code_rows, rows_needed
    from mlx_flash import fp8
    from mlx_flash.backends import cuda_matmul

    needs_hopper()
    gen = rng("wgmma-ws-raw", plan, raw, ka, kb, M, K, N)
    N = max(N, rows_needed(kb, K))
    a, _, a64 = make_operand(gen, (M, K), ka)
    codes = every_code_rows(gen, kb, N, K)
    b, b64 = mx.array(codes), fp8.decode_table(kb)[codes].astype(np.float64)
    sb = downscaling(b64, 1, gen).reshape(1, N)
    want = reference(a64, b64, None, sb, transpose_b=True)
    outs = {}
    monkeypatch.setattr(cuda_matmul, "CVT_RAW_MAX_ROWS", 1 << 30)  # the kernel's decode at every M here
    for slots in (raw, 0):
        monkeypatch.setattr(cuda_matmul, "CVT_RAW_SLOTS", slots)
        for out_dtype in (mx.float32, None):
            out = run_route("wgmma", a, b, b_fmt=kb, b_scale=mx.array(sb), transpose_b=True, out_dtype=out_dtype,
                            plan=plan)
            assert_close(out, want, out.dtype, K)
            outs[slots, out_dtype] = np.array(out.astype(mx.float32))
    for out_dtype in (mx.float32, None):
        assert np.array_equal(outs[raw, out_dtype], outs[0, out_dtype], equal_nan=True)


# FP8Linear's product on the weight-as-A kernel (matmul_wgmma_wa.cuh, route
# "wgmma_wa"): out^T = W x^T, the codes decoded straight into wgmma's A
# registers. Against float64 with every finite code of b's format; M, N, K
# across tile edges (K = 1, K long enough to round the ring many times), both
# token tiles and a two-stage ring; per-row a and per-column b scales, outputs
# float32 and 16-bit; and against session 19's route for it (decoded in shared
# memory below 1024 rows, by a pass first from there) within the float32 sums'
# rounding (a different order of the same products).
@WS
@pytest.mark.parametrize("plan", [None, (128, 8), (256, 5), (128, 2)],
                         ids=lambda v: "default" if v is None else "bt{}_st{}".format(*v))
@pytest.mark.parametrize("ka,kb", [("float16", "e4m3"), ("bfloat16", "e5m2"), ("bfloat16", "e4m3")])
@pytest.mark.parametrize("M,K,N", [(17, 1, 1), (600, 4096, 1030), (2000, 136, 2100), (130, 1000, 300),
                                   (1100, 520, 260)])
def test_cuda_wgmma_wa_fp8_weight_as_a_operand(plan, ka, kb, M, K, N):
    from fp8_wgmma_bound import downscaling, every_code_rows, rows_needed

    from mlx_flash import fp8

    needs_hopper()
    gen = rng("wgmma-wa", plan, ka, kb, M, K, N)
    N = max(N, rows_needed(kb, K))
    a, _, a64 = make_operand(gen, (M, K), ka)
    codes = every_code_rows(gen, kb, N, K)
    b, b64 = mx.array(codes), fp8.decode_table(kb)[codes].astype(np.float64)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = downscaling(b64, 1, gen).reshape(1, N)
    want = reference(a64, b64, sa, sb, transpose_b=True)
    for out_dtype in (mx.float32, None):
        out = run_route("wgmma_wa", a, b, b_fmt=kb, a_scale=mx.array(sa), b_scale=mx.array(sb), transpose_b=True,
                        out_dtype=out_dtype, plan=plan)
        if out.dtype == mx.float32:
            out_f32 = out
        assert_close(out, want, out.dtype, K)
    before = run_route("wgmma", a, b, b_fmt=kb, a_scale=mx.array(sa), b_scale=mx.array(sb), transpose_b=True,
                       out_dtype=mx.float32)
    assert_close(out_f32, np.array(before).astype(np.float64), mx.float32, K)


# Stream-K on the weight-as-A kernel (cuda_matmul.wa_stream_k_tiles) on the
# card's SMs: the shapes it was made for (64 tiles at 512 x 4096; 224 at
# 512 x 14336 wide: all shared; 448 at 1024 x 14336: a wave and the partial
# one shared beside whole tiles) and odd ones, forced on and off. Against
# float64; the same bits on a second call (the last block to arrive sums the
# cut tile's partials in the blocks' order, whichever it is); the tickets
# back at 0. "off" runs the stream-K form (matmul_wgmma_wa_sk.cuh) with
# every tile whole: the default kernel's bits (matmul_wgmma_wa.cuh).
# "splits8": the plan with WA_SK_SPLITS 8 (below half a wave, each tile's
# k-steps split between up to eight blocks, summed in their order).
@WS
@pytest.mark.parametrize("M,K,N", [(512, 4096, 4096), (512, 1024, 14336), (1024, 512, 14336), (300, 2100, 1030),
                                   (17, 3000, 200), (512, 4096, 1024)])
@pytest.mark.parametrize("sk", ["auto", "off", "all", "splits8"])
def test_cuda_wgmma_wa_stream_k(M, K, N, sk, monkeypatch):
    import math

    from fp8_wgmma_bound import downscaling, every_code_rows

    from mlx_flash import fp8
    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_matmul

    needs_hopper()
    monkeypatch.setattr(cuda_matmul, "WA_SK", True)  # "auto": wa_stream_k_tiles' plan, as with the switch on
    if sk == "splits8":
        monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 8)
    gen = rng("wgmma-wa-sk", M, K, N, sk)
    a, _, a64 = make_operand(gen, (M, K), "bfloat16")
    codes = every_code_rows(gen, "e4m3", N, K)
    b, b64 = mx.array(codes), fp8.decode_table("e4m3")[codes].astype(np.float64)
    sb = downscaling(b64, 1, gen).reshape(1, N)
    bt = cuda_matmul.wa_plan(M)[0]
    units = math.ceil(M / bt) * math.ceil(N / 128)
    plan = cuda_matmul.wa_plan(M) + ({"off": (0,), "all": (min(units, 1024),)}.get(sk, ()))
    want = reference(a64, b64, None, sb, transpose_b=True)
    outs = [run_route("wgmma_wa", a, b, b_fmt="e4m3", b_scale=mx.array(sb), transpose_b=True,
                      out_dtype=mx.float32, plan=plan) for _ in range(2)]
    assert_close(outs[0], want, mx.float32, K)
    assert np.array_equal(np.array(outs[0]), np.array(outs[1])), "stream-K sums in a fixed order"
    if sk == "off":
        with monkeypatch.context() as m:
            m.setattr(cuda_matmul, "WA_SK", False)
            default = run_route("wgmma_wa", a, b, b_fmt="e4m3", b_scale=mx.array(sb), transpose_b=True,
                                out_dtype=mx.float32, plan=cuda_matmul.wa_plan(M))
        assert np.array_equal(np.array(outs[0]), np.array(default)), "whole tiles: the default kernel's bits"
    mx.synchronize()
    pool = cuda_backend._TICKET_POOLS.get(GPU)
    assert pool is None or not np.any(np.array(pool[0])), "every ticket set back to 0"


# Session 29: stream-K on the native fp8 kernel (matmul_wgmma_ws.cuh with SK,
# cuda_matmul.native_stream_k_tiles) on the card's SMs: an 8B Llama's k / v
# projection at 512 tokens (24 tiles: split in two), its down projection (88
# tiles of 112 k-steps: shared over every SM with NATIVE_SK_PARTIAL) and odd
# shapes; the policy ("auto"), every tile whole ("off": the bits of the kernel
# without SK), every tile shared over every SM ("all"), splits in four.
# Within the native bound against float64, per-row and per-column scales; the
# same bits on a second call; the tickets back at 0.
@WS
@pytest.mark.parametrize("M,K,N", [(512, 4096, 1024), (512, 14336, 4096), (300, 2100, 1030), (17, 3000, 200),
                                   (1000, 700, 5000)])
@pytest.mark.parametrize("sk", ["auto", "off", "all", "splits4", "partial"])
def test_cuda_wgmma_fp8_native_stream_k(M, K, N, sk, monkeypatch):
    import math

    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_matmul

    needs_hopper()
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK", True)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_SPLITS", 4 if sk == "splits4" else 2)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_PARTIAL", sk == "partial")
    gen = rng("wgmma-native-sk", M, K, N, sk)
    a = mx.to_fp8(mx.array(gen.standard_normal((M, K)).astype(np.float32)))
    b = mx.to_fp8(mx.array(gen.standard_normal((N, K)).astype(np.float32)))
    a64 = np.array(mx.from_fp8(a, dtype=mx.float32)).astype(np.float64)
    b64 = np.array(mx.from_fp8(b, dtype=mx.float32)).astype(np.float64)
    sa = gen.uniform(0.5, 2, (M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2, (1, N)).astype(np.float32)
    plan = cuda_matmul.WS_PLANS["native"]
    units = math.ceil(M / 128) * math.ceil(N / plan[0])
    plan = plan + (False, {"off": 0, "all": units}[sk]) if sk in ("off", "all") else plan
    run = lambda p: run_route("wgmma_fp8", a, b, a_fmt="e4m3", b_fmt="e4m3", a_scale=mx.array(sa),  # noqa: E731
                              b_scale=mx.array(sb), transpose_b=True, out_dtype=mx.float32, plan=p)
    outs = [run(plan) for _ in range(2)]
    assert_within_fp8_accumulation(outs[0], a64, b64, sa, sb, True, mx.float32)
    assert np.array_equal(np.array(outs[0]), np.array(outs[1])), "stream-K sums in a fixed order"
    if sk == "off":
        with monkeypatch.context() as m:
            m.setattr(cuda_matmul, "NATIVE_SK", False)
            whole = run(cuda_matmul.WS_PLANS["native"])
        assert np.array_equal(np.array(outs[0]), np.array(whole)), "whole tiles: the kernel's bits without SK"
    mx.synchronize()
    pool = cuda_backend._TICKET_POOLS.get(GPU)
    assert pool is None or not np.any(np.array(pool[0])), "every ticket set back to 0"


# Session 26: 192-token tiles (only the stream-K form of the weight-as-A
# kernel has them) and the tile fit's plans on the card: against float64 with
# every finite code, outputs float32 and 16-bit; 192-token tiles whole, on a
# two-stage ring, and cut by stream-K over every SM; 128 / 256-token tiles
# beside them; and the default plan where the fit picks 192 (3B Llama's
# 2048 x 3072 x 3072, two full waves of 264 tiles) and 128 (500 x 1000 x 300:
# 12 tiles of 128 below a wave, each split in two).
@WS
@pytest.mark.parametrize("plan", [(192, 6), (192, 2), (192, 6, "all"), (128, 8), (256, 5), (256, 5, "all"), None],
                         ids=lambda v: "default" if v is None else "_".join(map(str, v)))
@pytest.mark.parametrize("ka,kb,M,K,N", [("bfloat16", "e4m3", 2048, 3072, 3072), ("float16", "e5m2", 500, 1000, 300),
                                         ("float16", "e4m3", 1100, 136, 2100)])
def test_cuda_wgmma_wa_tile_heights(plan, ka, kb, M, K, N, monkeypatch):
    import math

    from fp8_wgmma_bound import downscaling, every_code_rows, rows_needed

    from mlx_flash import fp8
    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_matmul

    needs_hopper()
    monkeypatch.setattr(cuda_matmul, "WA_SK", True)
    monkeypatch.setattr(cuda_matmul, "WA_TILE_FIT", True)
    gen = rng("wgmma-wa-bt", plan, ka, kb, M, K, N)
    N = max(N, rows_needed(kb, K))
    a, _, a64 = make_operand(gen, (M, K), ka)
    codes = every_code_rows(gen, kb, N, K)
    b, b64 = mx.array(codes), fp8.decode_table(kb)[codes].astype(np.float64)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    sb = downscaling(b64, 1, gen).reshape(1, N)
    want = reference(a64, b64, sa, sb, transpose_b=True)
    if plan is not None and plan[2:] == ("all",):
        units = math.ceil(M / plan[0]) * math.ceil(N / 128)
        plan = plan[:2] + (min(units, 1024),)
    if plan is None and cuda_matmul.sm_count() == 132 and (M, K) in ((2048, 3072), (500, 1000)):
        assert cuda_matmul.wa_plan(M, N, K, 132)[0] == (192 if M == 2048 else 128)
    for out_dtype in (mx.float32, None):
        out = run_route("wgmma_wa", a, b, b_fmt=kb, a_scale=mx.array(sa), b_scale=mx.array(sb),
                        transpose_b=True, out_dtype=out_dtype, plan=plan)
        assert_close(out, want, out.dtype, K)
    mx.synchronize()
    pool = cuda_backend._TICKET_POOLS.get(GPU)
    assert pool is None or not np.any(np.array(pool[0])), "every ticket set back to 0"


@WS
@pytest.mark.parametrize("b_batched", [False, True])
def test_cuda_wgmma_wa_batched(b_batched):
    """Batches of a over one weight and over a weight per batch element."""
    needs_hopper()
    gen = rng("wgmma-wa-batch", b_batched)
    lead, M, K, N = (3,), 140, 96, 272
    a, _, a64 = make_operand(gen, lead + (M, K), "float16")
    b, _, b64 = make_operand(gen, (lead if b_batched else ()) + (N, K), "e4m3")
    sa = gen.uniform(0.5, 2, lead + (M, 1)).astype(np.float32)
    out = run_route("wgmma_wa", a, b, b_fmt="e4m3", transpose_b=True, a_scale=mx.array(sa), b_scale=0.5,
                    out_dtype=mx.float32)
    assert_close(out, reference(a64, b64, sa, np.float32(0.5), transpose_b=True), mx.float32, K)


@WS
@pytest.mark.parametrize("b_batched", [False, True])
def test_cuda_wgmma_ws_batched_and_scales(b_batched):
    needs_hopper()
    gen = rng("wgmma-ws-batch", b_batched)
    lead, M, K, N = (3,), 140, 96, 272
    a, _, a64 = make_operand(gen, lead + (M, K), "float16")
    b, _, b64 = make_operand(gen, (lead if b_batched else ()) + (N, K), "float16")
    sa = gen.uniform(0.5, 2, lead + (M, 1)).astype(np.float32)
    out = run_route("wgmma", a, b, transpose_b=True, a_scale=mx.array(sa), b_scale=0.5,
                    plan=WS_16[0])
    assert_close(out, reference(a64, b64, sa, np.float32(0.5), transpose_b=True), out.dtype, K)
    a, a_fmt, a64 = make_operand(gen, lead + (M, K), "e4m3")
    b, b_fmt, b64 = make_operand(gen, (lead if b_batched else ()) + (N, K), "e5m2")
    out = run_route("wgmma_fp8", a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=True, a_scale=mx.array(sa),
                    out_dtype=mx.float32, plan=WS_FP8[0])
    assert_within_fp8_accumulation(out, a64, b64, sa, None, True, mx.float32)


# Few-rows plans (cuda_matmul.GEMV_PLAN: W, RT, U, max blocks, STAGES, launch
# bounds): register loads with and without launch bounds, cp.async rings of
# several depths and row tiles, grids capped so that blocks sweep several row
# groups (also per SM).
# A seventh entry 1: the whole-sector weight layout (register loads and cp.async;
# the default plan has it); (8, 1, 4, 0, 0, 2) is MLX_FLASH_CUDA_GEMV_SECTOR=0's.
# (16, 2, 1, 0, 0, 1, 1): sixteen warps a block under launch bounds 1 (512 threads).
GEMV_PLANS = [(8, 1, 8, 0, 0, 2), (8, 1, 4, -1, 0, 2), (8, 1, 4, 0, 0, 0), (8, 2, 2, 0, 0), (8, 1, 1, 0, 4),
              (4, 4, 1, 3, 4), (8, 2, 1, 2, 4), (8, 1, 4, 0, 0, 2), (8, 1, 4, -1, 0, 2, 1), (8, 2, 2, 0, 0, 0, 1),
              (8, 1, 1, 0, 4, 0, 1), (8, 1, 8, 0, 0, 2, 1), (16, 2, 1, 0, 0, 1, 1)]


@pytest.mark.parametrize("plan", GEMV_PLANS, ids=lambda p: "_".join(map(str, p)))
@pytest.mark.parametrize("M", [1, 9, 16])
@pytest.mark.parametrize("K,N", [(45, 17), (1000, 129), (4096, 520)])
def test_cuda_gemv_plans(plan, M, K, N):
    gen = rng("gemv-plan", plan, M, K, N)
    kinds = (("float16", "e4m3"), ("bfloat16", "bfloat16"))
    if plan[2] == 8:  # (8, 1, 8): fp8 weights only (16-bit ones spill at 16 rows)
        kinds = (("float16", "e4m3"), ("bfloat16", "e5m2"))
    for ka, kb in kinds:
        a, a_fmt, a64 = make_operand(gen, (M, K), ka)
        b, b_fmt, b64 = make_operand(gen, (N, K), kb)
        sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
        out = run_route("gemv", a, b, a_fmt=a_fmt, b_fmt=b_fmt, b_scale=mx.array(sb), transpose_b=True,
                        out_dtype=mx.float32, plan=plan)
        assert_close(out, reference(a64, b64, None, sb, transpose_b=True), mx.float32, K)


@pytest.mark.parametrize("b_batched", [False, True])
def test_cuda_gemv_batched(b_batched):
    gen = rng("gemv-batch", b_batched)
    lead, M, K, N = (2, 3), 5, 160, 48
    a, _, a64 = make_operand(gen, lead + (M, K), "float16")
    b, b_fmt, b64 = make_operand(gen, (lead if b_batched else ()) + (N, K), "e4m3")
    sa = gen.uniform(0.5, 2, lead + (M, 1)).astype(np.float32)
    out = run_route("gemv", a, b, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=0.5, transpose_b=True)
    assert_close(out, reference(a64, b64, sa, np.float32(0.5), transpose_b=True), out.dtype, K)
