"""matmul2d's CUDA kernels run on the CPU through the CUDA emulation
(tests/cuda_emu), against float64 of the dequantized operands, outputs
poisoned with NaN. The backend's own wrapper (cuda_matmul.matmul2d) pads and
launches as on a GPU; only mx.fast.cuda_kernel is swapped.

  gemv   the few-rows kernel (cuda_src/matmul_gemv.cuh): fragment layout and
         k order, edge rows, the cross-warp sum;
  wgmma  the Hopper GEMM (cuda_src/matmul_wgmma.cuh), exact and native fp8,
         its inline PTX run by the Hopper emulation (tests/cuda_emu/ptx_asm.py,
         hopper_emu.cuh): descriptors and swizzle, K tails, the stage ring,
         promotion, the epilogue's scales and rounding; the tensor cores' own
         fp8 rounding only as a model, on request (harness.FP8_ACCUM_BITS).

The GPU run of tests/test_matmul_cuda_routes.py checks the same on the device.
"""

import mlx.core as mx
import numpy as np
import pytest

from cuda_emu import harness
from helpers import rng
from test_matmul import assert_close, make_operand, reference

pytestmark = [pytest.mark.usefixtures("cpu_default_device"),
              pytest.mark.skipif(harness.unavailable_reason() is not None,
                                 reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "POISON", float("nan"))


# Few-rows plans (W, RT, U, max blocks, STAGES): the default (register loads),
# cp.async rings (short and long, several row tiles), and a capped grid whose
# blocks sweep several row groups (the ring restarts per group).
# Each also with the whole-sector layout (seventh entry 1, the default's).
# (16, 2, 1, 0, 0, 1, 1): sixteen warps a block (K split sixteen ways; launch bounds 1).
GEMV_PLANS = [None, (2, 1, 1, 0, 3), (2, 2, 1, 1, 2), (1, 4, 2, 2, 0, 2), (8, 1, 4, 0, 0, 2), (2, 1, 1, 0, 3, 0, 1),
              (2, 2, 1, 1, 2, 0, 1), (1, 4, 2, 2, 0, 2, 1), (16, 2, 1, 0, 0, 1, 1)]


@pytest.mark.parametrize("plan", GEMV_PLANS, ids=lambda p: "default" if p is None else "_".join(map(str, p)))
@pytest.mark.parametrize("M,K,N,ka,kb", [(1, 45, 17, "float16", "e4m3"), (9, 160, 33, "bfloat16", "e5m2"),
                                         (3, 208, 20, "float16", "float16"), (16, 96, 18, "bfloat16", "bfloat16"),
                                         (5, 1, 3, "float16", "e4m3"), (8, 2100, 9, "float16", "e5m2")])
def test_gemv_kernel_emulated(M, K, N, ka, kb, plan):
    from mlx_flash.backends import cuda_matmul

    gen = rng("gemv-emu", M, K, N, ka, kb)
    a, _, a64 = make_operand(gen, (2, M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    sa = gen.uniform(0.5, 2, (2, M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2, (1, N)).astype(np.float32)
    from mlx_flash._matmul_spec import validate_matmul

    spec, a3, b3, sa3, sb3, lead = validate_matmul(a, b, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                                                   transpose_b=True, out_dtype=mx.float32)
    with harness.patched_cuda_kernel():
        out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="gemv", plan=plan)
        mx.eval(out)
    assert_close(out.reshape(2, M, N), reference(a64, b64, sa, sb, transpose_b=True), mx.float32, K)


# Per-tensor scales (a's also per batch), alone and beside per-row / per-column
# ones, on the few-rows kernel (matmul2d hands it padded copies of scales of 8
# bytes or less: cuda.out_of_small_pool). Plans: the default, a ring, a capped
# grid whose blocks sweep several row groups, 16 warps.
@pytest.mark.parametrize("plan", [None, (2, 1, 1, 0, 3), (1, 4, 2, 2, 0, 2), (16, 2, 1, 0, 0, 1, 1)],
                         ids=lambda p: "default" if p is None else "_".join(map(str, p)))
@pytest.mark.parametrize("a_shape,b_shape", [((), ()), ((2, 1, 1), (1, 1)), ((2, 5, 1), ()), ((), (1, 70))],
                         ids=["tensor", "batch_tensor", "rows_tensor", "tensor_cols"])
def test_gemv_per_tensor_scales_emulated(a_shape, b_shape, plan):
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    M, K, N = 5, 96, 70
    gen = rng("gemv-emu-scales", a_shape, b_shape)
    a, _, a64 = make_operand(gen, (2, M, K), "float16")
    b, b_fmt, b64 = make_operand(gen, (N, K), "e4m3")
    sa = gen.uniform(0.5, 2, a_shape).astype(np.float32)
    sb = gen.uniform(0.5, 2, b_shape).astype(np.float32)

    def run(sa, sb):
        spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                                                    transpose_b=True, out_dtype=mx.float32)
        with harness.patched_cuda_kernel():
            out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="gemv", plan=plan)
            mx.eval(out)
        return np.array(out).reshape(2, M, N)

    out = run(sa, sb)
    assert_close(mx.array(out), reference(a64, b64, sa, sb, transpose_b=True), mx.float32, K)
    if not b_shape:  # a NaN per-tensor b scale reaches every output
        assert np.all(np.isnan(run(sa, np.float32(np.nan))))


# The Hopper GEMM (cuda_src/matmul_wgmma.cuh) on the emulated wgmma
# (tests/cuda_emu/hopper_emu.cuh: descriptors, 128-byte swizzle, late execution
# at wgmma_wait), loads by cp.async (patched_cuda_kernel: no tensor maps). Operands hold every
# finite fp8 code, the smallest multiplied together, at short and long K (K
# tails inside a k32 / k16 step, more stages than the ring holds, the promotion
# of native fp8 sums), both b layouts; M and N cross tile edges. The emulated tensor cores
# sum in fp32, so both routes must be fp32-exact here; float16 results must be
# the fp32 result rounded once, subnormals included (issue 15).
@pytest.mark.parametrize("route,plan,ka,kb,K,transpose_b", [
    ("wgmma_fp8", None, "e4m3", "e5m2", 1, False),     # issue 15's case, default plan (promotion every 2 stages)
    ("wgmma_fp8", (128, 6, 1), "e5m2", "e5m2", 33, True),
    ("wgmma_fp8", (256, 4, 0), "e5m2", "e4m3", 700, False),  # 6 stages through a ring of 4
    ("wgmma_fp8", (128, 4, 1), "e4m3", "e4m3", 300, True),
    ("wgmma", None, "e4m3", "e5m2", 31, False),         # exact route: fp8 decoded, [K, N] b read MN-major
    ("wgmma", None, "e5m2", "e4m3", 300, True),          # 5 stages of 64 K through a ring of 4
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_wgmma_kernel_emulated(route, plan, ka, kb, K, transpose_b):
    from fp8_wgmma_bound import every_code_case
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    a, b, a64, b64, sa, sb = every_code_case(rng("wgmma-emu", route, plan, ka, kb, K, transpose_b), ka, kb, K,
                                             transpose_b)
    want = reference(a64, b64, sa, sb, transpose_b=transpose_b)
    results = {}
    for out_dtype in (mx.float32, mx.float16):
        spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt=ka, b_fmt=kb, a_scale=mx.array(sa),
                                                    b_scale=mx.array(sb), transpose_b=transpose_b,
                                                    out_dtype=out_dtype)
        with harness.patched_cuda_kernel():
            out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route=route, plan=plan)
            mx.eval(out)
        assert_close(out[0], want, out_dtype, K)
        results[out_dtype] = np.array(out[0].astype(mx.float32))
    # float16 results are the float32 ones rounded once, subnormals included.
    assert np.array_equal(results[mx.float16], results[mx.float32].astype(np.float16).astype(np.float32))



def test_fast_accumulation_routes_to_the_native_kernel_emulated(monkeypatch):
    """The public option on an (emulated) Hopper: fast_accumulation=True picks
    the native fp8 kernel by itself (no forced route, no process-wide switch)
    and the default call the exact one; both run here (the emulated tensor
    cores sum in fp32, so both are fp32-exact)."""
    from fp8_wgmma_bound import every_code_case
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda, cuda_matmul

    monkeypatch.setattr(cuda, "_is_hopper", lambda: True)
    monkeypatch.setattr(cuda_matmul, "_FP8_NATIVE", False)
    a, b, a64, b64, sa, sb = every_code_case(rng("fast-accumulation-emu"), "e4m3", "e5m2", 67, True)
    want = reference(a64, b64, sa, sb, transpose_b=True)
    for fast, route in ((True, "wgmma_fp8"), (False, "wgmma")):
        spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt="e4m3", b_fmt="e5m2", a_scale=mx.array(sa),
                                                    b_scale=mx.array(sb), transpose_b=True, out_dtype=mx.float32,
                                                    fast_accumulation=fast)
        assert cuda_matmul.route_of(a3, b3, spec) == route
        with harness.patched_cuda_kernel():
            out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu)
            mx.eval(out)
        assert_close(out[0], want, mx.float32, 67)


def _half_spacing(v, dtype):
    """Half the spacing of float16 / bfloat16 values at v (float64): the most
    a round-to-nearest of v to that dtype can err."""
    mantissa, min_exp = {mx.float16: (10, -14), mx.bfloat16: (7, -126)}[dtype]
    _, e = np.frexp(np.abs(v))
    return np.ldexp(0.5, np.maximum(e - 1, min_exp) - mantissa)


# FP8Linear's opt-in direct path (MLX_FLASH_FP8LINEAR_PATH=direct): the gemv
# kernel over the layer's own arrays (x [..., K], weight [N, K], scale [N, 1]
# or [1, 1]; no reshapes), emulated: against float64 of the dequantized
# weight, bit-identical to the same kernel reached through matmul2d, and its
# gradients (matmul2d's vjp) equal to the matmul2d path's.
@pytest.mark.parametrize("shape,N,dtype,bias,per_channel", [
    ((1, 48), 17, mx.float16, True, True), ((2, 3, 160), 33, mx.bfloat16, False, True),
    ((16, 32), 9, mx.float16, True, False), ((1, 1, 2048), 40, mx.bfloat16, True, True)])
@pytest.mark.parametrize("wide", ["0", "1"])
def test_fp8linear_direct_path_emulated(shape, N, dtype, bias, per_channel, wide, monkeypatch):
    """wide "1": MLX_FLASH_CUDA_GEMV_WIDE's sixteen-warp plan (every N here is small)."""
    import mlx.nn as nn

    import mlx_flash.nn as fnn
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "GEMV_WIDE", wide)
    monkeypatch.setattr(cuda_matmul, "sm_count", lambda: 132)

    gen = rng("fp8linear-direct", shape, N, str(dtype), bias, per_channel)
    K = shape[-1]
    lin = nn.Linear(K, N, bias=bias)
    lin.weight = mx.array(gen.standard_normal((N, K)).astype(np.float32) * 0.1)
    if bias:
        lin.bias = mx.array(gen.standard_normal((N,)).astype(np.float32)).astype(dtype)
    layer = fnn.FP8Linear.from_linear(lin, per_channel=per_channel)
    x = mx.array(gen.standard_normal(shape).astype(np.float32)).astype(dtype)
    assert cuda_matmul.linear_few_rows_supported(x, layer.weight)
    args = (x, layer.weight, layer.scale) + ((layer.bias,) if bias else ())
    loss = lambda f: lambda inp: mx.sum(f(inp).astype(mx.float32) ** 2)  # noqa: E731
    with harness.patched_cuda_kernel():
        cuda_matmul._linear_launch.cache_clear()
        fnn._direct_function.cache_clear()
        direct = fnn._direct_function("e4m3", bias)
        y = direct(*args)
        g = mx.grad(loss(lambda inp: direct(inp, *args[1:])))(x)
        mx.eval(y, g)
        # The same kernel through matmul2d (route gemv, the default plan) on the emulation.
        spec_out = cuda_matmul.matmul(x.reshape(-1, K), layer.weight, b_fmt="e4m3",
                                      b_scale=layer.scale.reshape(-1) if per_channel else layer.scale.reshape(()),
                                      transpose_b=True, stream=mx.cpu, route="gemv").reshape(y.shape)
        if bias:
            spec_out = spec_out + layer.bias.astype(dtype)
        mx.eval(spec_out)
    cuda_matmul._linear_launch.cache_clear()
    fnn._direct_function.cache_clear()
    assert y.shape == shape[:-1] + (N,) and y.dtype == dtype
    assert np.array_equal(np.array(y.astype(mx.float32)), np.array(spec_out.astype(mx.float32)))
    w64 = np.array(layer.dequantized_weight(), dtype=np.float64)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w64.T
    if not bias:
        assert_close(y, ref, dtype, K)
    else:  # the bias is added after the product's rounding, as the matmul2d path and nn.Linear in dtype do
        # So y is rounded twice to dtype, as the plain materialised
        # (x @ W^T) + bias in dtype is: each element within twice the worst
        # those two roundings can err (half a spacing of the product, half a
        # spacing of the sum) plus fp32 accumulation. (The plain computation's
        # own largest error on these few elements is a sample, not a bound: a
        # seed, 557064597, put ours at 2.04x it at N 9.)
        out = ref + np.array(layer.bias.astype(mx.float32), dtype=np.float64)
        bound = 2 * (_half_spacing(ref, dtype) + _half_spacing(out, dtype)) + 1e-5 * np.abs(out).max()
        assert np.all(np.abs(np.array(y.astype(mx.float32), dtype=np.float64) - out) <= bound)
    # Gradient: the matmul2d path's own (CPU backend).
    monkeypatch.setattr(fnn, "_COMPILE", "0")
    g_ref = mx.grad(loss(layer))(x)
    np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(g_ref.astype(mx.float32)), rtol=1e-2,
                               atol=1e-2 * float(mx.abs(g_ref.astype(mx.float32)).max()))


def test_fp8linear_direct_path_support_checks():
    from mlx_flash.backends import cuda_matmul

    w = mx.zeros((8, 32), mx.uint8)
    ok = cuda_matmul.linear_few_rows_supported
    assert ok(mx.zeros((1, 32), mx.float16), w) and ok(mx.zeros((2, 8, 32), mx.bfloat16), w)
    assert not ok(mx.zeros((17, 32), mx.float16), w)      # more rows than the few-rows kernel takes
    assert not ok(mx.zeros((1, 32), mx.float32), w)       # float32: matmul2d's float32 route
    assert not ok(mx.zeros((1, 24), mx.float16), mx.zeros((8, 24), mx.uint8))  # K not a multiple of 16
    assert not ok(mx.zeros((0, 32), mx.float16), w)
    with pytest.raises(ValueError, match="scale"):
        cuda_matmul.linear_few_rows(mx.zeros((1, 32), mx.float16), w, mx.ones((3, 1)), "e4m3")


# Hopper's fp8 wgmma sums truncate (matmul_wgmma.cuh explains); the emulation
# models that on request (harness.FP8_ACCUM_BITS, hopper_emu.cuh), and
# tools/fp8_accum_model.py is the same model in numpy, fitted to the card.
@pytest.mark.parametrize("plan,K,bits", [((128, 4, 1), 700, 13), ((128, 4, 2), 520, 13), ((256, 4, 0), 300, 13),
                                         ((128, 4, 1), 260, 14), ((128, 6, 2, True, True), 600, 13),
                                         ((128, 6, -1, True, True), 700, 13), ((128, 6, -2, True, True), 330, 13),
                                         ((192, 5, -1, True, True), 200, 14)],
                         ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_native_promotion_matches_the_accumulation_model_emulated(plan, K, bits, monkeypatch):
    """Under the model, the emulated native kernel is bit-identical to the
    numpy model with the plan's promotion interval (sums restarted every
    PROMOTE stages of 128 K, or every -PROMOTE instructions on the
    warp-specialised kernel, added to fp32 registers in order; a K tail's
    zero-filled instructions included), and within the route's tested bound."""
    import os
    import sys

    from fp8_wgmma_bound import assert_within_fp8_accumulation
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import fp8_accum_model

    monkeypatch.setattr(harness, "FP8_ACCUM_BITS", bits)
    gen = rng("fp8-accum-model", plan, K, bits)
    M, N = 70, 40
    a = mx.to_fp8(mx.array(gen.standard_normal((M, K)).astype(np.float32)))
    b = mx.to_fp8(mx.array(gen.standard_normal((N, K)).astype(np.float32)))
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                out_dtype=mx.float32)
    # Warp-specialised plans (five entries) need TMA: the emulated H200.
    with harness.patched_hopper() if len(plan) > 4 else harness.patched_cuda_kernel():
        out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_fp8", plan=plan)
        mx.eval(out)
    model = fp8_accum_model.native(np.array(a), np.array(b), plan[2], bits)
    got = np.array(out[0])
    assert np.array_equal(got, model), np.abs(got - model).max()
    a64, b64 = fp8_accum_model.E4M3[np.array(a)], fp8_accum_model.E4M3[np.array(b)]
    assert not np.array_equal(got, (a64 @ b64.T).astype(np.float32))  # the model did truncate
    assert_within_fp8_accumulation(out[0], a64, b64, None, None, True, mx.float32)


# The TMA-loading GEMM plans, and the warp-specialised persistent kernel (the
# default route on Hopper: a TMA producer warpgroup, two consumer warpgroups,
# an mbarrier stage ring), on the emulated H200 (harness.patched_hopper: TMA
# with the emulation's tensor maps, 3 SMs, so persistent blocks take several
# tiles). Every finite fp8 code in the operands, M and N across tile edges.
@pytest.mark.parametrize("route,plan,ka,kb,K,transpose_b", [
    ("wgmma", (256, 4, 0, True), "float16", "float16", 200, False),        # TMA, [K, N] b read MN-major
    ("wgmma", (256, 4, 0, True, True), "bfloat16", "bfloat16", 300, True),  # ws, the 16-bit default
    ("wgmma", (256, 4, 0, True, True), "e4m3", "e5m2", 130, False),  # ws exact fp8: decoded first, then 16-bit
    ("wgmma_fp8", (128, 6, 1, True), "e4m3", "e4m3", 300, True),             # native, TMA
    ("wgmma_fp8", (128, 6, 2, True, True), "e5m2", "e4m3", 700, True),       # native ws, the default to session 17
    ("wgmma_fp8", None, "e4m3", "e5m2", 700, True),                         # native ws, the default plan (BN 192)
    ("wgmma_fp8", (256, 4, 0, True, True), "e4m3", "e5m2", 33, False),       # native ws, b transposed first
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_wgmma_tma_and_ws_kernels_emulated(route, plan, ka, kb, K, transpose_b):
    from fp8_wgmma_bound import every_code_case
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    gen = rng("wgmma-tma-emu", route, plan, ka, kb, K, transpose_b)
    if ka.startswith("e"):
        a, b, a64, b64, sa, sb = every_code_case(gen, ka, kb, K, transpose_b)
        a_fmt, b_fmt = ka, kb
    else:
        M, N = 130, 260
        a, a_fmt, a64 = make_operand(gen, (M, K), ka)
        b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
        sa, sb = None, None
    want = reference(a64, b64, sa, sb, transpose_b=transpose_b)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt,
                                                a_scale=None if sa is None else mx.array(sa),
                                                b_scale=None if sb is None else mx.array(sb),
                                                transpose_b=transpose_b, out_dtype=mx.float32)
    harness.LAUNCHES.clear()
    with harness.patched_hopper():
        out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route=route, plan=plan)
        mx.eval(out)
    kernel = "mlx_flash_matmul_wgmma_ws" if plan is None or len(plan) > 4 else "mlx_flash_matmul_wgmma"
    assert kernel in [name for name, _ in harness.LAUNCHES], list(harness.LAUNCHES)
    assert_close(out[0], want, mx.float32, K)


# FP8Linear's prefill product on the warp-specialised kernel: a 16-bit a times
# [N, K] fp8 codes decoded inside the kernel (matmul_wgmma_ws.cuh, RAW slots of
# codes; cuda_matmul.CVT_RAW_SLOTS), never through an fp16 copy of the weight.
# Every finite code of b's format occurs; K runs the stage ring and the raw
# slots round several times and ends mid-stage; M, N cross tile edges; scales
# per column of b (and per tensor), outputs in 16-bit and float32.
# early: TMA writes land at issue (harness.TMA_EARLY), so a load into a stage
# or slot still being read (by the tensor cores, by the decoders) fails.
@pytest.mark.parametrize("ka,kb,K,plan,raw,scale,out,early", [
    ("float16", "e4m3", 700, (256, 4, 0, True, True), 2, "cols", "float32", False),  # the default plan and slots
    ("float16", "e4m3", 700, (256, 4, 0, True, True), 2, "cols", "float32", True),
    ("bfloat16", "e5m2", 520, (256, 4, 0, True, True), 2, "cols", "bfloat16", False),
    ("float16", "e5m2", 33, (256, 4, 0, True, True), 1, "tensor", "float16", False),  # one slot
    ("bfloat16", "e4m3", 1100, (256, 3, 0, True, True), 4, None, "float32", True),    # four slots, three stages
    ("float16", "e4m3", 450, (128, 6, 0, True, True), 3, "cols", "float16", False),  # BN 128
    ("bfloat16", "e5m2", 400, (128, 5, 0, True, True), 2, "cols", "float32", True),  # BN 128, early
    ("e4m3", "e4m3", 300, (256, 4, 0, True, True), 2, "cols", "float32", False),     # exact fp8 x fp8: a decoded first
    ("float16", "e4m3", 200, None, 2, "cols", "float16", False),  # the default route at 133 rows: this kernel
], ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_ws_fp8_weight_decoded_in_kernel_emulated(ka, kb, K, plan, raw, scale, out, early, monkeypatch):
    from fp8_wgmma_bound import downscaling, every_code_rows, rows_needed
    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "CVT_RAW_SLOTS", raw)
    monkeypatch.setattr(harness, "TMA_EARLY", early)
    gen = rng("ws-raw-emu", ka, kb, K, plan, raw, scale, out, early)
    M, N = 133, max(rows_needed(kb, K), 256) + 9
    if ka.startswith("e"):
        a_codes = every_code_rows(gen, ka, max(M, rows_needed(ka, K)), K)
        a, a_fmt, a64 = mx.array(a_codes), ka, fp8.decode_table(ka)[a_codes].astype(np.float64)
        M = a64.shape[0]
    else:
        a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b_codes = every_code_rows(gen, kb, N, K)
    b, b64 = mx.array(b_codes), fp8.decode_table(kb)[b_codes].astype(np.float64)
    sb = None
    if scale == "cols":
        sb = downscaling(b64, 1, gen).reshape(1, N)
    elif scale == "tensor":
        sb = np.array([[0.75 * 2.0 ** -8]], np.float32)
    if out != "float32" and sb is None:
        sb = downscaling(b64, None, gen).reshape(1, 1)
    want = reference(a64, b64, None, sb, transpose_b=True)
    out_dtype = getattr(mx, out)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt=a_fmt, b_fmt=kb, a_scale=None,
                                                b_scale=None if sb is None else mx.array(sb),
                                                transpose_b=True, out_dtype=out_dtype)
    harness.LAUNCHES.clear()
    with harness.patched_hopper():
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma", plan=plan)
        mx.eval(got)
    ws = [t for name, t in harness.LAUNCHES if name == "mlx_flash_matmul_wgmma_ws"]
    assert len(ws) == 1 and ws[0]["RAW"] == raw and ws[0]["FB"] == (1 if kb == "e4m3" else 2), list(harness.LAUNCHES)
    assert_close(got[0], want, out_dtype, K)


@pytest.mark.parametrize("plan", [(256, 4, 0, True, True), None], ids=["ws", "default"])
@pytest.mark.parametrize("off", ["slots", "rows"])
def test_ws_fp8_weight_decode_first_when_slots_are_off_emulated(plan, off, monkeypatch):
    """CVT_RAW_SLOTS = 0 (MLX_FLASH_CUDA_CVT_RAW=0), or as many rows of a as
    CVT_RAW_MAX_ROWS: b decoded by a pass first, the 16-bit kernel after it;
    the same result. The default route then keeps the warp-specialised kernel
    for 512 rows and more (CVT_WS_MIN_ROWS): at 130 it takes the kernel that
    decodes in shared memory."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, *(("CVT_RAW_SLOTS", 0) if off == "slots" else ("CVT_RAW_MAX_ROWS", 130)))
    gen = rng("ws-raw-off-emu", plan, off)
    a, _, a64 = make_operand(gen, (130, 200), "float16")
    b, _, b64 = make_operand(gen, (140, 200), "e4m3")
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt="e4m3", transpose_b=True, out_dtype=mx.float32)
    harness.LAUNCHES.clear()
    with harness.patched_hopper():
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma", plan=plan)
        mx.eval(got)
    ws = [t for name, t in harness.LAUNCHES if name == "mlx_flash_matmul_wgmma_ws"]
    if plan is None:
        assert not ws and "mlx_flash_matmul_wgmma" in [name for name, _ in harness.LAUNCHES]
    else:
        assert len(ws) == 1 and ws[0]["RAW"] == 0 and ws[0]["FB"] == 0
    assert_close(got[0], reference(a64, b64, transpose_b=True), mx.float32, 200)


# Session 10's card run (-n 6, under load) found the test's NaN poison in the
# bottom-right tile of these shapes on the ws plans below, in this order of
# calls (a 16-bit dtype after the other, fp8 e5m2 after e4m3; scales on both
# sides; a float32 output first). Here the same tile geometry (M, N, so the
# same last unit and block, K shortened) on the emulated H200's 132 SMs, so
# that blocks == units as on the card: every tile must be stored (the outputs
# start as NaN). docs/matmul.md ("The ws NaN of session 10") has the analysis;
# tools/ws_matmul_nan_probe.py is the card-side probe.
@pytest.mark.parametrize("family,plan", [("16", (256, 4, 0, True, True)), ("16", (128, 6, 0, True, True)),
                                         ("fp8", (128, 6, 2, True, True)), ("fp8", (192, 5, 2, True, True))],
                         ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else v)
def test_ws_session10_nan_shapes_emulated(family, plan):
    from fp8_wgmma_bound import assert_within_fp8_accumulation
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    if family == "16":
        calls = [("float16", "float16", 1, 1, 1, True), ("bfloat16", "bfloat16", 1, 1, 1, True),
                 ("bfloat16", "bfloat16", 300, 40, 513, True), ("float16", "float16", 300, 24, 513, False)]
    else:
        calls = [("e4m3", "e4m3", 1, 1, 1, True), ("e5m2", "e4m3", 1, 1, 1, True),
                 ("e5m2", "e4m3", 300, 136, 258, True), ("e5m2", "e4m3", 257, 256, 384, True)]
    gen = rng("ws-s10-nan", family, plan)
    with harness.patched_hopper(sm_count=132):
        for ka, kb, M, K, N, transpose_b in calls:
            a, a_fmt, a64 = make_operand(gen, (M, K), ka)
            b, b_fmt, b64 = make_operand(gen, (N, K) if transpose_b else (K, N), kb)
            sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
            sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
            spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa),
                                                        b_scale=mx.array(sb), transpose_b=transpose_b,
                                                        out_dtype=mx.float32)
            harness.LAUNCHES.clear()
            out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma" if family == "16" else "wgmma_fp8",
                                       plan=plan)
            mx.eval(out)
            assert "mlx_flash_matmul_wgmma_ws" in [name for name, _ in harness.LAUNCHES]
            if family == "16":
                assert_close(out[0], reference(a64, b64, sa, sb, transpose_b=transpose_b), mx.float32, K)
            else:
                assert_within_fp8_accumulation(out[0], a64, b64, sa, sb, True, mx.float32)


class _ReachedKernel(Exception):
    """Raised by a stand-in for cuda._kernel: the wrapper got past its checks."""


@pytest.mark.parametrize("cc,raises", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_native_fp8_opt_in_names_the_capability_it_needs(cc, raises, monkeypatch):
    """MLX_FLASH_CUDA_NATIVE_FP8=1 on a GPU without fp8 mma.sync (before sm_89):
    a ValueError naming the setting and both capabilities, before NVRTC is
    asked to compile m16n8k32 e4m3 (its compile error named neither). Where
    the GPU has it, or where one operand is a float (no fp8 mma), the wrapper
    goes on to make its kernel (the emulation cannot compile the fp8 mma:
    tests/test_cuda_non_hopper_compile.py compiles it with nvcc for sm_89)."""
    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_matmul

    def reached(*args, **kwargs):
        raise _ReachedKernel

    monkeypatch.setattr(cuda_matmul, "_NATIVE_FP8", True)
    monkeypatch.setattr(cuda_backend, "compute_capability", lambda: cc)
    monkeypatch.setattr(cuda_backend, "_kernel", reached)
    gen = rng("native-fp8-cc", cc)
    a, a_fmt, _ = make_operand(gen, (19, 40), "e4m3")
    b, b_fmt, _ = make_operand(gen, (40, 23), "e5m2")
    f = mx.array(gen.standard_normal((19, 40)).astype(np.float16))
    if raises:
        with pytest.raises(ValueError, match=rf"MLX_FLASH_CUDA_NATIVE_FP8=1.*8\.9 or later.*is {cc[0]}\.{cc[1]}"):
            cuda_matmul.matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt, route="mma")
    else:
        with pytest.raises(_ReachedKernel):
            cuda_matmul.matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt, route="mma")
    with pytest.raises(_ReachedKernel):
        cuda_matmul.matmul(f, b, b_fmt=b_fmt, route="mma")


# FP8Linear's product on the kernel with the weight as wgmma's A operand
# (matmul_wgmma_wa.cuh, route "wgmma_wa"): out^T = W x^T, the fp8 codes
# decoded straight into the A registers (the 64-byte swizzled code tile, the
# quad's pair selection, the two fragment sets alternating between half stages),
# the epilogue's pairing of neighbour rows by shuffle. Every finite code of
# b's format occurs; K runs the stage ring round several times and ends
# mid-stage; M crosses token tiles (BT 128 / 256), N weight-row tiles and is
# not a multiple of 16; scales per row of a and per column of b, per tensor,
# none; outputs 16-bit and float32; batched a with a shared and a batched b.
# early: TMA writes land at issue (harness.TMA_EARLY), so a load into a stage
# whose products or decoding still read it fails.
@pytest.mark.parametrize("ka,kb,K,plan,scale,out,early,batch", [
    ("float16", "e4m3", 700, (128, 8), "rows_cols", "float32", False, 1),
    ("float16", "e4m3", 700, (128, 3), "cols", "float16", True, 1),
    ("bfloat16", "e5m2", 520, (256, 5), "cols", "bfloat16", False, 1),
    ("bfloat16", "e4m3", 1100, (256, 2), None, "float32", True, 1),   # two stages: a refill behind each product
    ("bfloat16", "e4m3", 1100, (256, 2), None, "float32", False, 1),
    ("float16", "e5m2", 320, (128, 2), "cols", "float16", False, 1),
    ("float16", "e4m3", 1100, (256, 5), None, "float32", False, 1),
    ("float16", "e4m3", 64, (128, 4), "cols", "float16", True, 1),    # one stage a tile: the end's release
    ("float16", "e5m2", 33, (128, 2), "tensor", "float16", False, 1),
    ("bfloat16", "e4m3", 200, None, "rows_cols", "bfloat16", False, 2),   # shared b, the default plan
    ("float16", "e5m2", 150, (128, 4), "cols", "float32", True, -2),      # batched b
], ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_wa_fp8_weight_as_a_operand_emulated(ka, kb, K, plan, scale, out, early, batch, monkeypatch):
    from fp8_wgmma_bound import downscaling, every_code_rows
    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(harness, "TMA_EARLY", early)
    gen = rng("wa-emu", ka, kb, K, plan, scale, out, early, batch)
    nb = abs(batch)
    M, N = 133 if plan is None or plan[0] == 128 else 270, 141
    a, _, a64 = make_operand(gen, (nb, M, K), ka)
    b_codes = np.stack([every_code_rows(gen, kb, N, K) for _ in range(nb if batch < 0 else 1)])
    b, b64 = mx.array(b_codes if batch < 0 else b_codes[0]), fp8.decode_table(kb)[b_codes].astype(np.float64)
    sa = sb = None
    if scale in ("cols", "rows_cols"):
        sb = downscaling(np.abs(b64).max(axis=0), 1, gen).reshape(1, N)
    if scale == "rows_cols":
        sa = gen.uniform(0.5, 2, (nb, M, 1)).astype(np.float32)
    if scale == "tensor":
        sb = np.array([[0.75 * 2.0 ** -8]], np.float32)
    if out != "float32" and sb is None:
        sb = downscaling(b64, None, gen).reshape(1, 1)
    want = reference(a64, b64, sa, sb, transpose_b=True)
    out_dtype = getattr(mx, out)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt=kb, a_scale=None if sa is None else mx.array(sa),
                                                b_scale=None if sb is None else mx.array(sb),
                                                transpose_b=True, out_dtype=out_dtype)
    harness.LAUNCHES.clear()
    with harness.patched_hopper():
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_wa", plan=plan)
        mx.eval(got)
    wa = [t for name, t in harness.LAUNCHES if name == "mlx_flash_matmul_wgmma_wa"]
    assert len(wa) == 1 and wa[0]["FB"] == (1 if kb == "e4m3" else 2), list(harness.LAUNCHES)
    assert (wa[0]["BT"], wa[0]["STAGES"]) == tuple(plan or cuda_matmul.wa_plan(M))
    assert_close(got.reshape(want.shape), want, out_dtype, K)


@pytest.mark.parametrize("wa", [True, False], ids=["wa_on", "wa_off"])
@pytest.mark.parametrize("M,ka,kb", [(133, "float16", "e4m3"), (20, "bfloat16", "e5m2"), (140, "e4m3", "e4m3"),
                                     (9, "float16", "e4m3")])
def test_fp8_weight_routing_to_the_weight_as_a_kernel_emulated(wa, M, ka, kb, monkeypatch):
    """cuda_matmul.FP8W_WA (MLX_FLASH_CUDA_FP8W_WA): a 16-bit a of more than
    GEMV_MAX_ROWS rows times [N, K] fp8 codes goes to the weight-as-A kernel;
    an fp8 a (the exact fp8 x fp8 route) and few rows (the few-rows kernel)
    keep their routes; with it off, the kernels of session 19."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "FP8W_WA", wa)
    gen = rng("wa-route-emu", wa, M, ka, kb)
    K, N = 200, 150
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, _, b64 = make_operand(gen, (N, K), kb)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt=a_fmt, b_fmt=kb, transpose_b=True, out_dtype=mx.float32)
    harness.LAUNCHES.clear()
    with harness.patched_hopper():
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu)
        mx.eval(got)
    names = [name for name, _ in harness.LAUNCHES]
    takes = wa and a_fmt is None and M > cuda_matmul.GEMV_MAX_ROWS
    assert ("mlx_flash_matmul_wgmma_wa" in names) == takes, names
    assert_close(got[0], reference(a64, b64, transpose_b=True), mx.float32, K)


@pytest.mark.parametrize("nan_scale", [False, True])
def test_fp8_weight_with_an_empty_inner_dimension_emulated(nan_scale):
    """K = 0 on the Hopper routes (a tensor map cannot describe it): zeros
    times the scales, so a NaN scale gives NaN, as the kernels apply them."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    a = mx.ones((20, 0), mx.float16)
    b = mx.zeros((30, 0), mx.uint8)
    sb = np.full((1, 30), np.nan if nan_scale else 0.5, np.float32)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt="e4m3", b_scale=mx.array(sb), transpose_b=True)
    with harness.patched_hopper():
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu)
        mx.eval(got)
    assert got.shape == (1, 20, 30) and got.dtype == mx.float16
    assert np.all(np.isnan(np.array(got))) if nan_scale else np.all(np.array(got) == 0)


# Stream-K on the weight-as-A kernel (three emulated SMs): every tile whole
# (0), every tile shared, the last partial wave's and one full wave's tiles
# shared beside data-parallel ones, one tile cut over all three blocks, and
# runs of no k-step (fewer k-steps than blocks). The sums equal float64's;
# the tickets are back at 0 after the call (the pool region serves again).
@pytest.mark.parametrize("M,N,K,sk", [
    (133, 141, 700, 0),    # 4 tiles, whole
    (133, 141, 700, 4),    # 4 tiles over 3 blocks: each cut
    (133, 500, 300, 5),    # 8 tiles: 5 shared, 3 whole (one a block)
    (20, 100, 700, 1),     # 1 tile of 11 k-steps: runs of 3, 4, 4
    (20, 100, 100, 1),     # 1 tile of 2 k-steps: block 0 has none
    (20, 100, 64, 1),      # 1 tile of 1 k-step: one block takes it whole
    (20, 200, 700, None),  # the default on four SMs: 2 tiles, each split between two blocks
    (20, 100, 100, (1, 4)),  # 1 tile of 2 k-steps on four SMs: two blocks, not four (the card's NaN of s23)
    (17, 200, 300, (2, 16)),  # 2 tiles of 5 k-steps on sixteen SMs: ten blocks, one k-step each
    (20, 200, 1100, "splits4"),  # the policy with WA_SK_SPLITS 4 on eight SMs: 2 tiles of 18 k-steps, 4 blocks each
], ids=lambda v: str(v))
def test_wa_stream_k_emulated(M, N, K, sk, monkeypatch):
    from fp8_wgmma_bound import downscaling, every_code_rows
    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    gen = rng("wa-sk-emu", M, N, K, sk)
    a, _, a64 = make_operand(gen, (1, M, K), "bfloat16")
    codes = every_code_rows(gen, "e4m3", N, K)
    b, b64 = mx.array(codes), fp8.decode_table("e4m3")[codes].astype(np.float64)
    sb = downscaling(np.abs(b64), 1, gen).reshape(1, N)
    want = reference(a64, b64, None, sb, transpose_b=True)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt="e4m3", b_scale=mx.array(sb), transpose_b=True,
                                                out_dtype=mx.float32)
    # sk: the forced count (three SMs), (count, SMs), None for the default on four, or "splits4": the
    # policy splitting each tile four ways (the ordered sum of more than two blocks) on eight.
    monkeypatch.setattr(cuda_matmul, "WA_SK", True)
    if sk == "splits4":
        monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 4)
        assert cuda_matmul.wa_stream_k_tiles(2, 18, 8) == (2, 8)
        sk, sms = None, 8
    elif sk is None:
        assert cuda_matmul.wa_stream_k_tiles(2, 11, 4) == (2, 4)
        sms = 4
    else:
        sk, sms = (sk, 3) if not isinstance(sk, tuple) else sk
    plan = (128, 3) if sk is None else (128, 3, sk)
    with harness.patched_hopper(sm_count=sms):
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_wa", plan=plan)
        mx.eval(got)
        kernel = cuda_matmul._kernel_object("matmul_wgmma_wa_sk", cuda_matmul._WA_SK_INPUTS,
                                            cuda_matmul._WA_SK_OUTPUTS, cuda_matmul.wa_smem(128, 3))
        tickets = kernel.inputs_after["tickets"]
    assert_close(got.reshape(want.shape), want, mx.float32, K)
    assert not np.any(tickets), "every ticket set back to 0"


@pytest.mark.parametrize("out", ["float32", "bfloat16"])
def test_wa_stream_k_form_with_whole_tiles_matches_the_default_kernel_emulated(out, monkeypatch):
    """The default route runs the weight-as-A kernel text a card has run
    (matmul_wgmma_wa.cuh); its stream-K form (matmul_wgmma_wa_sk.cuh, taken
    only where stream-K tiles are) gives the same bits with every tile whole
    (the same products in the same order), and a close sum where tiles are
    cut (a + b of two runs)."""
    from fp8_wgmma_bound import downscaling, every_code_rows
    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "WA_SK", False)
    gen = rng("wa-sk-vs-default", out)
    M, N, K = 133, 141, 700
    a, _, a64 = make_operand(gen, (1, M, K), "float16")
    codes = every_code_rows(gen, "e4m3", N, K)
    b, b64 = mx.array(codes), fp8.decode_table("e4m3")[codes].astype(np.float64)
    sb = downscaling(b64, 1, gen).reshape(1, N)
    out_dtype = getattr(mx, out)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt="e4m3", b_scale=mx.array(sb), transpose_b=True,
                                                out_dtype=out_dtype)
    got, names = {}, {}
    with harness.patched_hopper(sm_count=3):
        for plan in ((128, 3), (128, 3, 0), (128, 3, 4)):
            harness.LAUNCHES.clear()
            got[plan] = np.array(cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_wa",
                                                      plan=plan).astype(mx.float32))
            names[plan] = [name for name, _ in harness.LAUNCHES if name.startswith("mlx_flash_matmul_wgmma_wa")]
    assert names == {(128, 3): ["mlx_flash_matmul_wgmma_wa"], (128, 3, 0): ["mlx_flash_matmul_wgmma_wa_sk"],
                     (128, 3, 4): ["mlx_flash_matmul_wgmma_wa_sk"]}, names
    assert np.array_equal(got[(128, 3)], got[(128, 3, 0)]), "whole tiles: the default kernel's bits"
    want = reference(a64, b64, None, sb, transpose_b=True)
    for plan in got:
        assert_close(mx.array(got[plan]).reshape(want.shape).astype(out_dtype), want, out_dtype, K)


# Session 26: 192-token tiles (m64n192 products, 96 sums a thread), which
# only the weight-as-A kernel's stream-K form has. Every finite code of b's
# format; M crosses 192-token tiles and ends inside one, N is not a multiple
# of 16, K ends mid-stage; whole tiles (the stream-K form with 0 stream-K
# tiles, as the route takes it), a two-stage ring, and 192-token tiles cut by
# stream-K (three SMs); beside them 128 / 256-token plans on both forms.
# Against float64; the launch names the kernel, BT and the stages.
@pytest.mark.parametrize("ka,kb,M,K,plan,scale,out", [
    ("float16", "e4m3", 400, 700, (192, 3), "rows_cols", "float32"),
    ("bfloat16", "e5m2", 200, 300, (192, 2), "cols", "bfloat16"),
    ("bfloat16", "e4m3", 400, 700, (192, 3, 4), "cols", "float32"),
    ("float16", "e5m2", 133, 520, (128, 3), "cols", "float16"),
    ("float16", "e4m3", 270, 520, (256, 3, 0), None, "float32"),
], ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_wa_tile_heights_emulated(ka, kb, M, K, plan, scale, out, monkeypatch):
    from fp8_wgmma_bound import downscaling, every_code_rows
    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    gen = rng("wa-bt-emu", ka, kb, M, K, plan, scale, out)
    N = 141
    a, _, a64 = make_operand(gen, (1, M, K), ka)
    codes = every_code_rows(gen, kb, N, K)
    b, b64 = mx.array(codes), fp8.decode_table(kb)[codes].astype(np.float64)
    sa = gen.uniform(0.5, 2, (1, M, 1)).astype(np.float32) if scale == "rows_cols" else None
    sb = downscaling(b64, 1, gen).reshape(1, N) if scale else None
    if out != "float32" and sb is None:
        sb = downscaling(b64, None, gen).reshape(1, 1)
    want = reference(a64, b64, sa, sb, transpose_b=True)
    out_dtype = getattr(mx, out)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, b_fmt=kb, a_scale=None if sa is None else mx.array(sa),
                                                b_scale=None if sb is None else mx.array(sb),
                                                transpose_b=True, out_dtype=out_dtype)
    monkeypatch.setattr(cuda_matmul, "WA_SK", True)
    harness.LAUNCHES.clear()
    with harness.patched_hopper(sm_count=3):
        got = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_wa", plan=plan)
        mx.eval(got)
    launches = [(name, t) for name, t in harness.LAUNCHES if name.startswith("mlx_flash_matmul_wgmma_wa")]
    # Whole tiles of 128 / 256 tokens run session 20's kernel text; 192 and forced counts the stream-K form.
    kernel = "mlx_flash_matmul_wgmma_wa" + ("" if plan == (128, 3) else "_sk")
    assert [name for name, _ in launches] == [kernel], launches
    assert (launches[0][1]["BT"], launches[0][1]["STAGES"]) == plan[:2], launches
    assert_close(got.reshape(want.shape), want, out_dtype, K)


def test_wa_tile_height_choice(monkeypatch):
    """wa_plan(M, N, K, SMs) on 132 SMs: without WA_TILE_FIT the rows' plan
    (WA_PLANS) everywhere. With it, below WA_WIDE_MIN_ROWS rows the rows'
    plan; from one wave of BT 256 tiles on, the height of least waves x
    WA_TILE_COST; below a wave, 128-token tiles where they fill at most a
    wave and K <= WA_NARROW_MAX_K (the H100 timings of parts s26b / s26d
    behind each case in the comments: GPU time of a call alone, us)."""
    import math

    from mlx_flash.backends import cuda_matmul

    plan = cuda_matmul.wa_plan
    narrow, wide = cuda_matmul.WA_PLANS["narrow"], cuda_matmul.WA_PLANS["wide"]
    monkeypatch.setattr(cuda_matmul, "WA_TILE_FIT", False)
    assert plan(2048, 3072, 3072, 132) == plan(2048) == wide and plan(512, 3072, 3072, 132) == wide
    monkeypatch.setattr(cuda_matmul, "WA_TILE_FIT", True)
    # from a wave on
    assert plan(2048, 3072, 3072, 132) == (192, 6)   # 3B q / o: 264 tiles in 2 waves, not 192 in 2 (70 vs 86)
    assert plan(2048, 3072, 8192, 132) == (192, 6)   # 3B down (161 vs 188)
    assert plan(1536, 3072, 3072, 132) == (192, 6)
    assert plan(2048, 4096, 4096, 132) == wide       # 8B q / o: 2 full waves (110 vs 126 at BT 192)
    assert plan(2048, 8192, 3072, 132) == wide       # 3B gate / up: 3.9 waves (167 vs 189)
    assert plan(2048, 14336, 4096, 132) == wide
    # below a wave
    assert plan(512, 3072, 3072, 132) == narrow      # 96 whole tiles of 128 (29.5 against 32.4 split)
    assert plan(2048, 1024, 3072, 132) == narrow     # 3B k / v (30.4 against 34.4)
    assert plan(512, 4096, 4096, 132) == narrow      # 8B q / o (37.3 against 39.2)
    assert plan(512, 3072, 8192, 132) == wide        # K above WA_NARROW_MAX_K: split (57.5 against 65.6)
    assert plan(512, 4096, 14336, 132) == wide
    assert plan(1024, 3072, 3072, 132) == wide       # 192 tiles of 128: more than a wave
    assert plan(512, 8192, 3072, 132) == wide        # 128 tiles of 256: under a wave, 256 of 128 over it
    assert plan(200, 3072, 3072, 132) == narrow == plan(200)
    for m in range(256, 8192, 97):  # from a wave on: never more waves x cost than BT 256's
        for n in (1024, 3072, 4096, 8192, 14336):
            tiles = {h: math.ceil(m / h) * math.ceil(n / 128) for h in (128, 192, 256)}
            if tiles[256] >= 132:
                bt = plan(m, n, 4096, 132)[0]
                waves = {h: math.ceil(t / 132) for h, t in tiles.items()}
                assert waves[bt] * cuda_matmul.WA_TILE_COST[bt] <= waves[256], (m, n, bt)


def test_wa_stream_k_choice(monkeypatch):
    """wa_stream_k_tiles on 132 SMs (k-steps of 64 K): (shared tiles, blocks).
    Below half a wave each tile split between WA_SK_SPLITS blocks at most;
    with WA_SK_WAVES, from one wave on, shared where whole tiles leave a
    partial wave that costs WA_SK_MIN_GAIN k-steps or more, a tile cut once
    at most; none with MLX_FLASH_CUDA_FP8W_WA_SK=0."""
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "WA_SK", False)
    assert cuda_matmul.wa_stream_k_tiles(64, 64, 132) == (0, 64)
    monkeypatch.setattr(cuda_matmul, "WA_SK", True)
    pick = cuda_matmul.wa_stream_k_tiles
    # The defaults (session 24): tiles split in two below half a wave, nothing shared from one wave on.
    monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 2)
    monkeypatch.setattr(cuda_matmul, "WA_SK_WAVES", False)
    assert pick(64, 64, 132) == (64, 128) and pick(16, 64, 132) == (16, 32)
    assert pick(224, 64, 132) == (0, 132) and pick(448, 64, 132) == (0, 132)
    # Session 21's plan, sharing from one wave on too (WA_SK_WAVES):
    monkeypatch.setattr(cuda_matmul, "WA_SK_WAVES", True)
    assert pick(64, 64, 132) == (64, 128)     # 512 x 4096 x 4096 at BT 256: each tile split in two
    assert pick(64, 224, 132) == (64, 128)    # 512 x 14336 x 4096
    assert pick(32, 64, 132) == (32, 64)      # 128 rows at BT 128
    assert pick(100, 64, 132) == (0, 100)     # over half a wave: a run shorter than a tile would cut one twice
    assert pick(128, 64, 132) == (0, 128)     # 1024 x 4096: 0.97 of a wave
    assert pick(224, 64, 132) == (224, 132)   # 512 x 4096 x 14336: 1.7 waves, all shared
    assert pick(448, 64, 132) == (132 + 52, 132)  # 3.4 waves: one full wave and the partial one shared
    assert pick(512, 64, 132) == (116 + 132, 132)  # 3.88 waves: 7 k-steps of 256 to gain
    assert pick(264, 64, 132) == (0, 132)     # whole waves
    assert pick(64, 64, 132, batch=2) == (0, 64)
    assert pick(3, 4, 132) == (0, 3)          # too few k-steps to gain WA_SK_MIN_GAIN
    # the gain threshold itself: 2 waves of 4 k-steps against ceil(133 * 4 / 132) = 5
    assert pick(133, cuda_matmul.WA_SK_MIN_GAIN, 132) == (0, 132)
    # More blocks a tile below half a wave (WA_SK_SPLITS): as many as the SMs hold, each run WA_SK_MIN_GAIN
    # k-steps or more; from one wave on, nothing shared without WA_SK_WAVES.
    monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 8)
    assert pick(16, 64, 132) == (16, 128)     # 512 x 4096 x 1024 at BT 256: each tile split eight ways
    assert pick(64, 64, 132) == (64, 128)     # two ways: as many as 132 SMs hold
    assert pick(2, 20, 132) == (2, 10)        # five ways: runs of 4 k-steps
    assert pick(2, 7, 132) == (0, 2)          # under 2 x WA_SK_MIN_GAIN k-steps: whole
    assert pick(448, 64, 132) == (132 + 52, 132)
    monkeypatch.setattr(cuda_matmul, "WA_SK_WAVES", False)
    assert pick(448, 64, 132) == (0, 132)
    assert pick(224, 64, 132) == (0, 132)
    assert pick(16, 64, 132) == (16, 128)
    monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 2)
    monkeypatch.setattr(cuda_matmul, "WA_SK_WAVES", True)
    for units in range(1, 700):  # a run of at least a tile (or exactly half one): no tile cut twice
        for ktiles in (8, 13, 64):
            sk, blocks = pick(units, ktiles, 132)
            # runs of sk * ktiles / blocks k-steps: a tile or more (sk >= blocks), or half one (blocks = 2 sk)
            assert sk == 0 or sk >= blocks or blocks == 2 * sk, (units, ktiles)
    monkeypatch.setattr(cuda_matmul, "WA_SK_SPLITS", 8)
    for units in range(1, 67):  # below half a wave: s whole runs a tile, each of WA_SK_MIN_GAIN k-steps or more
        for ktiles in (8, 13, 64, 224):
            sk, blocks = pick(units, ktiles, 132)
            if sk:
                assert sk == units and blocks % units == 0 and 2 <= blocks // units <= 8 and blocks <= 132
                assert ktiles // (blocks // units) >= cuda_matmul.WA_SK_MIN_GAIN, (units, ktiles)


def test_native_stream_k_choice(monkeypatch):
    """native_stream_k_tiles on 132 SMs (k-steps of 128 K, 128 x 192 tiles):
    (shared tiles, blocks). By default tiles split in two below half a wave;
    with NATIVE_SK_PARTIAL also every tile shared over every SM between half
    a wave and one, where a block gains NATIVE_SK_MIN_GAIN k-steps; never a
    block without a k-step in its run; none with
    MLX_FLASH_CUDA_FP8_NATIVE_SK=0 or a batch."""
    import math

    from mlx_flash.backends import cuda_matmul

    pick = cuda_matmul.native_stream_k_tiles
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK", True)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_SPLITS", 2)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_PARTIAL", False)
    assert pick(24, 32, 132) == (24, 48)      # an 8B Llama's k / v at 512 tokens (512 x 4096 x 1024)
    assert pick(88, 112, 132) == (0, 88)      # its down projection (512 x 14336 x 4096): over half a wave
    assert pick(1200, 32, 132) == (0, 132)    # gate / up at 2048 tokens: many waves
    assert pick(24, 3, 132) == (0, 24)        # under 2 x NATIVE_SK_MIN_GAIN k-steps: whole
    assert pick(24, 32, 132, batch=2) == (0, 24)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_SPLITS", 4)
    assert pick(24, 32, 132) == (24, 96) and pick(40, 32, 132) == (40, 120)  # as many ways as 132 SMs hold
    assert pick(2, 5, 132) == (2, 4)          # two ways: runs of NATIVE_SK_MIN_GAIN k-steps or more
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_SPLITS", 2)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK_PARTIAL", True)
    assert pick(88, 112, 132) == (88, 132)    # runs of 74.7 k-steps instead of 112
    assert pick(130, 32, 132) == (0, 130)     # 31.5 k-steps a block: under NATIVE_SK_MIN_GAIN to gain
    assert pick(24, 32, 132) == (24, 48)      # below half a wave: still split in two
    for units in range(1, 132):
        for ktiles in (1, 2, 3, 8, 33, 112):
            sk, blocks = pick(units, ktiles, 132)
            if sk:  # every block's run holds a k-step; a cut saves NATIVE_SK_MIN_GAIN of them
                assert sk == units and sk * ktiles >= blocks, (units, ktiles)
                assert ktiles - math.ceil(sk * ktiles / blocks) >= cuda_matmul.NATIVE_SK_MIN_GAIN, (units, ktiles)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK", False)
    assert pick(24, 32, 132) == (0, 24)


def _native_sk_model(a_codes, b_codes, M, N, K, bn, promote, bits, sk, blocks, fmts):
    """The native kernel's stream-K sums under the accumulation model
    (tools/fp8_accum_model.py): stream_k.cuh's schedule replayed in numpy.
    A tile whole is the model over all of K; a tile cut between blocks is
    each run's model (the tile's promotion intervals, a run's first stage
    starting one) added in float32, two as a + b, more in the blocks' order."""
    import fp8_accum_model

    ktiles, tiles_m, tiles_n = -(-K // 128), -(-M // 128), -(-N // bn)
    steps = sk * ktiles
    begin = [g * steps // blocks for g in range(blocks + 1)]
    partial = {}

    def chunk(k0, k1, every):  # the model over k-steps [k0, k1), every row and column
        cols = slice(128 * k0, min(128 * k1, K))
        return fp8_accum_model.native(a_codes[:, cols], b_codes[:, cols], every, bits, a_fmt=fmts[0], b_fmt=fmts[1])

    def run(k0, k1):
        if (k0, k1) not in partial:
            if promote > 0:
                # Intervals of `promote` stages of the tile (a run's first stage starts one), each a
                # tensor-core sum added in order to float32 sums.
                total, k = np.zeros((M, N), np.float32), k0
                while k < k1:
                    end = min(k1, (k // promote + 1) * promote)
                    total, k = (total + chunk(k, end, 0)).astype(np.float32), end
                partial[k0, k1] = total
            else:
                partial[k0, k1] = chunk(k0, k1, promote)
        return partial[k0, k1]

    out = np.full((M, N), np.nan, np.float32)
    for unit in range(tiles_m * tiles_n):
        # matmul_wgmma_ws.cuh's grouped order (kWgGroupM = 8 tile rows sweep the columns together).
        group, in_group = divmod(unit, 8 * tiles_n)
        rows_in = min(tiles_m - 8 * group, 8)
        m0, n0 = (8 * group + in_group % rows_in) * 128, (in_group // rows_in) * bn
        if unit < sk:
            lo, hi = unit * ktiles, unit * ktiles + ktiles
            runs = [run(max(begin[g], lo) - lo, min(begin[g + 1], hi) - lo)
                    for g in range(blocks) if max(begin[g], lo) < min(begin[g + 1], hi)]
            total = runs[0]
            for r in runs[1:]:  # (two: a + b, whichever block adds)
                total = (total + r).astype(np.float32)
        else:
            total = run(0, ktiles)
        out[m0:m0 + 128, n0:n0 + bn] = total[m0:m0 + 128, n0:n0 + bn]
    return out


# Stream-K on the native fp8 kernel (matmul_wgmma_ws.cuh with SK): every tile
# whole (0), tiles cut between two blocks, shared tiles beside whole ones,
# one tile cut over three blocks (an ordered sum), fewer k-steps than SMs,
# the policy's splits in two and in four and its partial-wave sharing;
# promotion every stage (128 K), every instruction and none. Under the tensor
# cores' accumulation model the emulated kernel equals the schedule's numpy
# model bit for bit; the tickets are back at 0 after the call.
@pytest.mark.parametrize("M,N,K,promote,sk", [
    (133, 141, 700, 1, 0),        # 2 tiles whole
    (133, 141, 700, 1, 2),        # 2 tiles of 6 k-steps over 3 blocks: each cut in two
    (133, 500, 300, 1, 3),        # 6 tiles: 3 shared (runs of 3 k-steps), 3 whole
    (20, 100, 1300, 1, 1),        # 1 tile of 11 k-steps: runs of 3, 4, 4 (an ordered sum of three)
    (20, 100, 200, 1, 1),         # 1 tile of 2 k-steps: two blocks, not three
    (20, 100, 100, 1, 1),         # 1 tile of 1 k-step: one block takes it whole
    (133, 141, 700, 0, 2),        # no promotion: each run's sum in the tensor cores
    (133, 141, 450, -1, 2),       # promotion every instruction
    (20, 200, 1100, 1, None),     # the policy on four SMs: 2 tiles split in two
    (20, 200, 1100, 1, "splits4"),   # NATIVE_SK_SPLITS 4 on eight SMs: 2 tiles, 4 blocks each
    (300, 150, 1100, 1, "partial"),  # NATIVE_SK_PARTIAL on four SMs: 3 tiles of 9 k-steps over 4 blocks
], ids=lambda v: str(v))
def test_native_stream_k_emulated(M, N, K, promote, sk, monkeypatch):
    import os
    import sys

    from fp8_wgmma_bound import assert_within_fp8_accumulation
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    gen = rng("native-sk-emu", M, N, K, promote, sk)
    a = mx.to_fp8(mx.array(gen.standard_normal((M, K)).astype(np.float32)))
    b = mx.to_fp8(mx.array(gen.standard_normal((N, K)).astype(np.float32)))
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, b, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                out_dtype=mx.float32)
    monkeypatch.setattr(cuda_matmul, "NATIVE_SK", True)
    monkeypatch.setattr(harness, "FP8_ACCUM_BITS", 13)
    ktiles, units = -(-K // 128), -(-M // 128) * -(-N // 192)
    if sk == "splits4":
        monkeypatch.setattr(cuda_matmul, "NATIVE_SK_SPLITS", 4)
        sms = 8
    elif sk == "partial":
        monkeypatch.setattr(cuda_matmul, "NATIVE_SK_PARTIAL", True)
        sms = 4
    else:
        sms = 4 if sk is None else 3
    if isinstance(sk, str) or sk is None:
        want = {None: (2, 4), "splits4": (2, 8), "partial": (3, 4)}[sk]
        sk, blocks = cuda_matmul.native_stream_k_tiles(units, ktiles, sms)
        assert (sk, blocks) == want, (sk, blocks)
        plan = (192, 3, promote, True, True)
    else:
        blocks = min(sms, sk * ktiles) if sk else min(units, sms)
        plan = (192, 3, promote, True, True, False, sk)
    harness.LAUNCHES.clear()
    with harness.patched_hopper(sm_count=sms):
        out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_fp8", plan=plan)
        mx.eval(out)
        names = [name for name, _ in harness.LAUNCHES if name.startswith("mlx_flash_matmul_wgmma_ws")]
        assert names == ["mlx_flash_matmul_wgmma_ws" + ("_sk" if sk else "")], names
        if sk:
            kernel = cuda_matmul._kernel_object("matmul_wgmma_ws_sk", cuda_matmul._WA_SK_INPUTS,
                                                cuda_matmul._WA_SK_OUTPUTS, cuda_matmul.ws_smem(192, 3))
            assert not np.any(kernel.inputs_after["tickets"]), "every ticket set back to 0"
    model = _native_sk_model(np.array(a), np.array(b), M, N, K, 192, promote, 13, sk, blocks, ("e4m3", "e4m3"))
    got = np.array(out[0])
    assert np.array_equal(got, model), np.abs(got - model).max()
    import fp8_accum_model
    a64, b64 = fp8_accum_model.E4M3[np.array(a)], fp8_accum_model.E4M3[np.array(b)]
    assert_within_fp8_accumulation(out[0], a64, b64, None, None, True, mx.float32)
