"""matmul2d: values against float64 of the dequantized operands, every
operand type, odd shapes, batching, transpose_b, scales, gradients, errors.

Forward tests run per backend (conftest.py `backend` fixture); gradients go
through the op's vjp, which is backend-independent, and run on the CPU.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash import fp8
import helpers
import matmul_backends
from matmul_backends import matmul

# References are MLX computations on the default device: keep them on the CPU
# (see conftest.cpu_default_device); kernels get their device explicitly.
pytestmark = pytest.mark.usefixtures("cpu_default_device")

TYPES = ("float32", "float16", "bfloat16", "e4m3", "e5m2")


@pytest.fixture(params=matmul_backends.ALL)
def backend(request):
    """Each backend name (overrides conftest's: metal_emu here needs only the harness)."""
    reason = matmul_backends.skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param
CPU = mx.Device(mx.cpu)


def make_operand(rng, shape, kind, spread=1.0):
    """(array as passed to matmul2d, fmt, float64 value it stands for)."""
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    if kind in ("e4m3", "e5m2"):
        codes = fp8.encode(mx.array(x), kind)
        return codes, kind, fp8.decode_table(kind)[np.array(codes)].astype(np.float64)
    arr = mx.array(x).astype(getattr(mx, kind))
    return arr, None, np.array(arr.astype(mx.float32)).astype(np.float64)


def reference(a64, b64, sa=None, sb=None, transpose_b=False):
    a64 = a64 if sa is None else a64 * np.array(sa, dtype=np.float64)
    b64 = np.swapaxes(b64, -1, -2) if transpose_b else b64
    out = a64 @ b64
    return out if sb is None else out * np.array(sb, dtype=np.float64)


def default_out_dtype(ka, kb):
    floats = [k for k in (ka, kb) if k not in ("e4m3", "e5m2")]
    return getattr(mx, floats[0]) if len(set(floats)) == 1 else mx.float32


def assert_close(out, ref, out_dtype, k):
    out = np.array(out.astype(mx.float32)).astype(np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    scale = np.max(np.abs(ref)) + 1e-30
    if out_dtype == mx.float32:
        # fp32 accumulation of K products: well under 1e-4 relative.
        tol = 1e-6 * np.sqrt(max(k, 1)) + 1e-7
        assert np.max(np.abs(out - ref)) / scale < tol
    else:
        # No worse than twice the rounding of the exact result to out_dtype
        # (what the plain materialised product in that dtype at best gives),
        # plus the fp32 accumulation error.
        rounded = np.array(mx.array(ref.astype(np.float32)).astype(out_dtype).astype(mx.float32), dtype=np.float64)
        plain_err = np.abs(rounded - ref)
        assert np.all(np.abs(out - ref) <= 2 * plain_err + 1e-5 * scale)


@pytest.mark.parametrize("ka,kb", list(itertools.product(TYPES, TYPES)))
def test_every_operand_type_combination(backend, ka, kb):
    rng = helpers.rng("every-operand-type", ka, kb)  # the session seed (str hashes differ per process)
    M, K, N = 19, 45, 37
    a, a_fmt, a64 = make_operand(rng, (M, K), ka)
    b, b_fmt, b64 = make_operand(rng, (K, N), kb)
    out = matmul(backend, a, b, a_fmt=a_fmt, b_fmt=b_fmt)
    assert out.dtype == default_out_dtype(ka, kb)
    assert_close(out, reference(a64, b64), out.dtype, K)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 7, 129), (7, 129, 1), (129, 7, 1000), (1000, 129, 7),
                                   (13, 1000, 17), (200, 300, 1100)])
@pytest.mark.parametrize("ka,kb", [("float32", "float32"), ("float16", "e4m3"), ("bfloat16", "e5m2")])
def test_odd_shapes(backend, M, K, N, ka, kb):
    if backend == "metal_emu" and M * N * K > 2e6:
        pytest.skip("large shape: too slow through the emulator")
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    a, a_fmt, a64 = make_operand(rng, (M, K), ka)
    b, b_fmt, b64 = make_operand(rng, (N, K), kb)
    out = matmul(backend, a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=True)
    assert_close(out, reference(a64, b64, transpose_b=True), out.dtype, K)


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("b_batched", [False, True])
@pytest.mark.parametrize("ka,kb", [("float32", "float32"), ("float16", "e4m3"), ("e5m2", "bfloat16"),
                                   ("e4m3", "e4m3")])
def test_batched(backend, transpose_b, b_batched, ka, kb):
    rng = np.random.default_rng(3)
    lead, M, K, N = (2, 3), 9, 33, 21
    a, a_fmt, a64 = make_operand(rng, lead + (M, K), ka)
    b_shape = (N, K) if transpose_b else (K, N)
    b, b_fmt, b64 = make_operand(rng, (lead + b_shape) if b_batched else b_shape, kb)
    out = matmul(backend, a, b, a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=transpose_b)
    assert out.shape == lead + (M, N)
    assert_close(out, reference(a64, b64, transpose_b=transpose_b), out.dtype, K)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("b_batched", [False, True])
@pytest.mark.parametrize("kind", ["e4m3", "e5m2", "float16", "bfloat16"])
def test_few_rows(backend, M, transpose_b, b_batched, kind):
    """Decode-time shapes (the CPU's GEMV path) with scales and half output."""
    rng = np.random.default_rng(M)
    K, N = 531, 77
    a, _, a64 = make_operand(rng, (2, M, K), "bfloat16")
    b_shape = (N, K) if transpose_b else (K, N)
    b, b_fmt, b64 = make_operand(rng, ((2,) + b_shape) if b_batched else b_shape, kind)
    sa = mx.array(rng.uniform(0.5, 2, (2, M, 1)).astype(np.float32))
    sb = mx.array(rng.uniform(0.5, 2, (1, N)).astype(np.float32))
    out = matmul(backend, a, b, b_fmt=b_fmt, a_scale=sa, b_scale=sb, transpose_b=transpose_b)
    out_dtype = default_out_dtype("bfloat16", kind)
    assert out.dtype == out_dtype
    assert_close(out, reference(a64, b64, np.array(sa), np.array(sb), transpose_b), out_dtype, K)


@pytest.mark.parametrize("M", [2, 20])
def test_many_batched_products(backend, M):
    """Many small independent products (the CPU runs one per thread)."""
    rng = np.random.default_rng(11)
    a, _, a64 = make_operand(rng, (7, M, 30), "float16")
    b, _, b64 = make_operand(rng, (7, 30, 19), "e5m2")
    sa = mx.array(rng.uniform(0.5, 2, (7, M, 1)).astype(np.float32))
    out = matmul(backend, a, b, b_fmt="e5m2", a_scale=sa)
    assert_close(out, reference(a64, b64, np.array(sa)), mx.float16, 30)


@pytest.mark.parametrize("a_scale_shape", [None, (), (11, 1), (4, 11, 1), (1, 1)])
@pytest.mark.parametrize("b_scale_shape", [None, (), (1, 23)])
def test_scales(backend, a_scale_shape, b_scale_shape):
    rng = np.random.default_rng(4)
    a, a_fmt, a64 = make_operand(rng, (4, 11, 40), "e4m3")
    b, b_fmt, b64 = make_operand(rng, (23, 40), "e5m2")
    sa = None if a_scale_shape is None else mx.array(rng.uniform(0.5, 2, a_scale_shape).astype(np.float32))
    sb = None if b_scale_shape is None else mx.array(rng.uniform(0.5, 2, b_scale_shape).astype(np.float32))
    out = matmul(backend, a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=sa, b_scale=sb, transpose_b=True)
    ref = reference(a64, b64, None if sa is None else np.array(sa), None if sb is None else np.array(sb), True)
    assert_close(out, ref, mx.float32, 40)


@pytest.mark.parametrize("out_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_out_dtype(backend, out_dtype):
    rng = np.random.default_rng(5)
    a, _, a64 = make_operand(rng, (17, 50), "bfloat16")
    b, _, b64 = make_operand(rng, (50, 31), "e4m3")
    out = matmul(backend, a, b, b_fmt="e4m3", b_scale=0.25, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert_close(out, reference(a64, b64, sb=0.25), out_dtype, 50)


def test_large_values_and_long_rows_in_half_output(backend):
    """fp32 accumulation: a float16 result whose partial sums overflow fp16."""
    if backend == "metal_emu":
        pytest.skip("covered by the smaller shapes")
    rng = np.random.default_rng(6)
    a, _, a64 = make_operand(rng, (1700, 64), "float16", spread=30.0)
    b, _, b64 = make_operand(rng, (64, 40), "e5m2", spread=30.0)
    out = matmul(backend, a, b, b_fmt="e5m2", b_scale=mx.array(1 / 64.0))
    assert_close(out, reference(a64, b64, sb=1 / 64.0), mx.float16, 64)


def test_empty_inner_dimension(backend):
    out = matmul(backend, mx.ones((3, 0)), mx.ones((0, 5)))
    assert out.shape == (3, 5) and np.all(np.array(out) == 0)


def test_fp8_matches_dequantize_then_matmul():
    """The fused kernel equals dequantize() followed by a float product."""
    rng = np.random.default_rng(7)
    w = mx.array(rng.standard_normal((48, 64)).astype(np.float32))
    x = mx.array(rng.standard_normal((5, 64)).astype(np.float32))
    data, scale = fp8.quantize(w, axis=0)  # per output channel: [48, 1]
    fused = mlx_flash.matmul2d(x, data, b_fmt="e4m3", b_scale=scale.T, transpose_b=True, stream=CPU)
    plain = x @ fp8.dequantize(data, scale, "e4m3").T
    np.testing.assert_allclose(np.array(fused), np.array(plain), rtol=1e-5, atol=1e-5)


def test_inside_compile():
    rng = np.random.default_rng(8)
    a = mx.array(rng.standard_normal((6, 20)).astype(np.float32))
    b, _, b64 = make_operand(rng, (20, 9), "e4m3")
    f = mx.compile(lambda x: mlx_flash.matmul2d(x, b, b_fmt="e4m3", stream=CPU) * 2)
    np.testing.assert_allclose(np.array(f(a)), 2 * np.array(a, dtype=np.float64) @ b64, rtol=1e-5, atol=1e-5)


# ---- gradients --------------------------------------------------------------

GRAD_CASES = [
    # (a kind, b kind, transpose_b, batched a, batched b, a_scale shape, b_scale shape)
    ("float32", "float32", False, False, False, None, None),
    ("float32", "float32", True, True, True, None, None),
    ("float16", "e4m3", True, True, False, None, (1, 13)),
    ("bfloat16", "e5m2", False, False, False, (), ()),
    ("e4m3", "float32", False, True, False, (3, 7, 1), (1, 13)),
    ("e5m2", "float32", True, False, False, (7, 1), ()),
    ("float32", "float16", True, True, True, (3, 7, 1), (1, 13)),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients(case):
    ka, kb, tb, a_batched, b_batched, sa_shape, sb_shape = case
    rng = np.random.default_rng(9)
    M, K, N = 7, 29, 13
    a, a_fmt, a64 = make_operand(rng, ((3,) if a_batched else ()) + (M, K), ka)
    b, b_fmt, b64 = make_operand(rng, ((3,) if b_batched else ()) + ((N, K) if tb else (K, N)), kb)
    sa = None if sa_shape is None else mx.array(rng.uniform(0.5, 2, sa_shape).astype(np.float32))
    sb = None if sb_shape is None else mx.array(rng.uniform(0.5, 2, sb_shape).astype(np.float32))
    out_shape = ((3,) if a_batched else ()) + (M, N)
    g = rng.standard_normal(out_shape)
    g_mx = mx.array(g.astype(np.float32))

    def loss(a, b):
        out = mlx_flash.matmul2d(a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=sa, b_scale=sb, transpose_b=tb,
                                 out_dtype=mx.float32, stream=CPU)
        return mx.sum(out * g_mx)

    da, db = mx.grad(loss, argnums=(0, 1))(a, b)
    sa64 = 1.0 if sa is None else np.array(sa, dtype=np.float64)
    sb64 = 1.0 if sb is None else np.array(sb, dtype=np.float64)
    bt = np.swapaxes(b64, -1, -2) if tb else b64  # [.., K, N]
    gs = g * sb64  # d loss / d (A' @ B) where A' = a * sa
    if a_fmt is None:
        da_ref = (gs @ np.swapaxes(bt, -1, -2)) * sa64
        assert da.dtype == a.dtype and da.shape == a.shape
        assert_grad(da, da_ref)
    else:
        assert np.all(np.array(da) == 0)
    if b_fmt is None:
        db_ref = np.swapaxes(a64 * sa64, -1, -2) @ gs
        if not b_batched and db_ref.ndim == 3:
            db_ref = db_ref.sum(0)
        db_ref = np.swapaxes(db_ref, -1, -2) if tb else db_ref
        assert db.dtype == b.dtype and db.shape == b.shape
        assert_grad(db, db_ref)
    else:
        assert np.all(np.array(db) == 0)


def assert_grad(x, ref):
    tol = 1e-5 if x.dtype == mx.float32 else 1e-2  # half dtypes: rounding of the stored gradient
    x = np.array(x.astype(mx.float32)).astype(np.float64)
    rel = np.max(np.abs(x - ref)) / np.max(np.abs(ref))
    assert rel < tol, rel


def test_gradient_through_fp8_weight_chain():
    """Two fp8 layers: the activations' gradient flows through both."""
    rng = np.random.default_rng(10)
    w1, s1 = fp8.quantize(mx.array(rng.standard_normal((16, 8)).astype(np.float32)), axis=0)
    w2, s2 = fp8.quantize(mx.array(rng.standard_normal((4, 16)).astype(np.float32)), axis=0)
    x = mx.array(rng.standard_normal((5, 8)).astype(np.float32))

    def f(x, op):
        h = op(x, w1, s1)
        return mx.sum(mx.tanh(op(mx.tanh(h), w2, s2)))

    fused = lambda x, w, s: mlx_flash.matmul2d(x, w, b_fmt="e4m3", b_scale=s.T, transpose_b=True, stream=CPU)
    plain = lambda x, w, s: x @ fp8.dequantize(w, s, "e4m3").T
    np.testing.assert_allclose(np.array(mx.grad(f)(x, fused)), np.array(mx.grad(f)(x, plain)), rtol=1e-4, atol=1e-5)


# ---- bad input ----------------------------------------------------------------


def _bad(**kw):
    base = dict(a=mx.ones((4, 8)), b=mx.ones((8, 3)))
    base.update(kw)
    a, b = base.pop("a"), base.pop("b")
    return lambda: mlx_flash.matmul2d(a, b, stream=CPU, **base)


@pytest.mark.parametrize("call,error,words", [
    (_bad(b=mx.ones((7, 3))), ValueError, "inner dimensions"),
    (_bad(b=mx.ones((3, 7)), transpose_b=True), ValueError, "inner dimensions"),
    (_bad(b=mx.zeros((8, 3), dtype=mx.uint8)), TypeError, "b_fmt"),
    (_bad(a=mx.zeros((4, 8), dtype=mx.uint8)), TypeError, "a_fmt"),
    (_bad(b_fmt="e4m3"), TypeError, "b_fmt"),
    (_bad(b=mx.zeros((8, 3), dtype=mx.uint8), b_fmt="e3m4"), ValueError, "b_fmt"),
    (_bad(a=mx.ones((4, 8), dtype=mx.int32)), TypeError, "a:"),
    (_bad(a_scale=mx.ones((8, 1))), ValueError, "a_scale"),
    (_bad(a_scale=mx.ones((1, 4))), ValueError, "a_scale"),
    (_bad(b_scale=mx.ones((3, 1))), ValueError, "b_scale"),
    (_bad(b_scale=mx.ones((1, 4))), ValueError, "b_scale"),
    (_bad(b_scale=mx.ones((1, 3), dtype=mx.int32)), TypeError, "b_scale"),
    (_bad(a_scale="2"), TypeError, "a_scale"),
    (_bad(a=mx.ones((2, 4, 8)), b=mx.ones((3, 8, 3))), ValueError, "batch"),
    (_bad(a=mx.ones((8,))), ValueError, "a:"),
    (_bad(out_dtype=mx.int32), TypeError, "out_dtype"),
    (_bad(transpose_b=1), TypeError, "transpose_b"),
    (_bad(fast_accumulation=1), TypeError, "fast_accumulation"),
    (_bad(fast_accumulation=True), ValueError, "fast_accumulation"),  # float operands: no such accumulation
    (_bad(b=mx.zeros((8, 3), dtype=mx.uint8), b_fmt="e4m3", fast_accumulation=True), ValueError,
     "fast_accumulation"),  # fp8 weight, float activations: neither
])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("side", ["a", "b", "weight"])
def test_every_fp8_code_decodes_exactly_in_the_kernel(backend, fmt, side):
    """A product by 1.0 returns each code's value, inf and NaN included."""
    codes = mx.arange(256).astype(mx.uint8)
    one = mx.ones((1, 1), dtype=mx.float32)
    if side == "a":
        out = matmul(backend, codes.reshape(256, 1), one, a_fmt=fmt)[:, 0]
    elif side == "b":
        out = matmul(backend, one, codes.reshape(1, 256), b_fmt=fmt)[0]
    else:  # one token through an [N, K] weight whose row n is (code n, 0, ..., 0)
        weight = mx.concatenate([codes.reshape(256, 1), mx.zeros((256, 15), dtype=mx.uint8)], axis=1)
        out = matmul(backend, mx.ones((1, 16)), weight, b_fmt=fmt, transpose_b=True)[0]
    got = np.array(out)
    want = fp8.decode_table(fmt)
    if fmt == "e4m3":
        assert np.array_equal(np.isnan(want), np.isnan(np.array(mx.from_fp8(codes, mx.float32))))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    keep = ~np.isnan(want)
    assert np.array_equal(got[keep], want[keep])  # exact (a sum from 0 turns -0 into +0)


@pytest.mark.parametrize("ka,kb", [("e4m3", "e4m3"), ("e5m2", "e4m3")])
def test_fast_accumulation_is_exact_where_the_backend_has_no_fast_one(backend, ka, kb):
    """fast_accumulation=True only allows the tensor cores' fp8 sums (CUDA on
    Hopper); on this backend the product stays fp32-exact: bit-identical to the
    default call, and within the float64 reference's fp32 tolerance."""
    gen = helpers.rng("fast-accumulation", ka, kb)
    M, K, N = 17, 113, 9
    a, a_fmt, a64 = make_operand(gen, (M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    args = dict(a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), transpose_b=True, out_dtype=mx.float32)
    fast = matmul(backend, a, b, fast_accumulation=True, **args)
    if backend == "cuda" and _cuda_route(a, b, fast_accumulation=True, **args) == "wgmma_fp8":
        from fp8_wgmma_bound import assert_within_fp8_accumulation

        # Hopper: the call took the tensor cores' fp8 sums, as allowed.
        assert_within_fp8_accumulation(fast, a64, b64, sa, None, True, mx.float32)
        return
    plain = matmul(backend, a, b, **args)
    assert np.array_equal(np.array(fast), np.array(plain))
    assert_close(fast, reference(a64, b64, sa, None, transpose_b=True), mx.float32, K)


def _cuda_route(a, b, **kw):
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    spec, a3, b3, *_ = validate_matmul(a, b, **kw)
    return cuda_matmul.route_of(a3, b3, spec)


def test_metal_wrapper_builds_through_the_factory():
    """The Metal wrapper's launch, recorded by a stand-in factory (runs anywhere)."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import metal_matmul

    calls = []

    def factory(**kw):
        calls.append(("build", kw["name"], tuple(kw["input_names"]), kw["ensure_row_contiguous"]))
        assert "matmul2d_tile" in kw["source"] and "MLXF_METAL_MATMUL_H" in kw["header"]

        def kernel(**launch):
            calls.append(("launch", launch["grid"], launch["threadgroup"], tuple(launch["template"])))
            return [mx.zeros(launch["output_shapes"][0], dtype=launch["output_dtypes"][0])]

        return kernel

    spec, a3, b3, sa, sb, _ = validate_matmul(mx.ones((2, 33, 8), dtype=mx.float16),
                                              mx.zeros((65, 8), dtype=mx.uint8), b_fmt="e5m2",
                                              b_scale=mx.ones((1, 65)), transpose_b=True)
    previous = metal_matmul.set_kernel_factory(factory)
    try:
        for _ in range(2):
            out = metal_matmul.matmul2d(a3, b3, sa, sb, spec, None)
    finally:
        metal_matmul.set_kernel_factory(previous)
    assert out.shape == (2, 33, 65) and out.dtype == mx.float16
    assert [c[0] for c in calls] == ["build", "launch", "launch"]  # cached per factory
    _, grid, tg, template = calls[1]
    assert grid == (3 * 128, 2, 2) and tg == (128, 1, 1)
    assert template == (("T_OUT", mx.float16), ("A_FMT", 0), ("B_FMT", 2), ("TRANSPOSE_B", True), ("TILE", 32))
    params = np.array(metal_matmul.params_array(spec, sa, sb))
    assert list(params[:7]) == [33, 65, 8, 0, 0, 0, 1]
