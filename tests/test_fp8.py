"""fp8 encode / decode / quantize: bit-exact with MLX for e4m3, IEEE-like e5m2."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import fp8

# References are MLX computations on the default device: keep them on the CPU
# (see conftest.cpu_default_device); kernels get their device explicitly.
pytestmark = pytest.mark.usefixtures("cpu_default_device")


def _e5m2_value(code: int) -> float:
    """E5M2 by its definition (float64), written independently of fp8.py."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 2) & 0x1F, code & 0x3
    if e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m / 4 * 2.0**-14
    return sign * (1 + m / 4) * 2.0 ** (e - 15)


def test_e4m3_decode_matches_mlx_on_all_codes():
    codes = mx.arange(256).astype(mx.uint8)
    ours = np.array(fp8.decode(codes, "e4m3"))
    ref = np.array(mx.from_fp8(codes, mx.float32))
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert fp8.max_finite("e4m3") == 448.0


def test_e5m2_decode_all_codes():
    ours = np.array(fp8.decode(mx.arange(256).astype(mx.uint8), "e5m2"), dtype=np.float64)
    ref = np.array([_e5m2_value(c) for c in range(256)])
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])
    assert fp8.max_finite("e5m2") == 57344.0
    assert ours[0x7C] == math.inf and ours[0xFC] == -math.inf


def _probe_values(table: np.ndarray, rng) -> np.ndarray:
    finite = np.sort(table[np.isfinite(table)].astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2  # ties: round to even
    return np.concatenate([
        finite, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
        rng.standard_normal(20000) * 100, rng.standard_normal(20000) * 1e-3,
        [0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 1e-30],
    ]).astype(np.float32)


def test_e4m3_encode_matches_mlx():
    """Bit-exact with mx.to_fp8 except on NaN, which stays NaN here (0x7F /
    0xFF, sign kept) where mx.to_fp8 gives 448."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    for x in (bits.view(np.float32), _probe_values(fp8.decode_table("e4m3"), rng)):
        ours = np.array(fp8.encode(mx.array(x), "e4m3"))
        ref = np.array(mx.to_fp8(mx.array(x)))
        nan = np.isnan(x)
        assert np.array_equal(ours[~nan], ref[~nan])
        assert np.array_equal(ours[nan], np.where(np.signbit(x[nan]), 0xFF, 0x7F))


def _e5m2_encode_ref(x: np.ndarray) -> np.ndarray:
    """Nearest e5m2 code, ties to the even code, finite values saturating;
    NaN and inf stay NaN and inf."""
    values = np.array([_e5m2_value(c) for c in range(0x7C)])  # finite magnitudes, ascending
    out = np.empty(x.shape, np.uint8)
    for i, v in enumerate(x.astype(np.float64)):
        if np.isnan(v):
            out[i] = 0x7E
            continue
        if np.isinf(v):  # e5m2 has infinities: inf stays inf
            out[i] = 0x7C | (0x80 if v < 0 else 0)
            continue
        mag = min(abs(v), values[-1])
        j = np.searchsorted(values, mag)
        if j < len(values) and values[j] == mag:
            code = j
        else:
            lo, hi = j - 1, j
            dlo, dhi = mag - values[lo], values[hi] - mag
            code = lo if dlo < dhi or (dlo == dhi and lo % 2 == 0) else hi
        out[i] = code | (0x80 if np.signbit(v) else 0)
    return out


def test_e5m2_encode_rounds_to_nearest_even_and_saturates():
    rng = np.random.default_rng(1)
    x = _probe_values(fp8.decode_table("e5m2"), rng)[::3]
    x = np.concatenate([x, [np.nan, 60000.0, 61440.0, 1e9]]).astype(np.float32)
    ours = np.array(fp8.encode(mx.array(x), "e5m2"))
    ref = _e5m2_encode_ref(x)
    nan = np.isnan(x)
    assert np.all(np.isnan(fp8.decode_table("e5m2")[ours[nan]]))
    assert np.array_equal(ours[~nan], ref[~nan])
    assert fp8.decode_table("e5m2")[ours[-1]] == 57344.0  # saturation, not inf


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_quantize_dequantize_round_trip(fmt, axis):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 53)).astype(np.float32) * np.linspace(0.1, 10, 53, dtype=np.float32)
    data, scale = fp8.quantize(mx.array(x), fmt=fmt, axis=axis)
    assert data.dtype == mx.uint8 and data.shape == x.shape and scale.dtype == mx.float32
    expect_shape = {None: (), 0: (37, 1), -1: (1, 53)}[axis]
    assert tuple(scale.shape) == expect_shape
    back = np.array(fp8.dequantize(data, scale, fmt, mx.float32))
    # Relative rounding error of a normal fp8 value: 2^-(mantissa bits + 1).
    rel = 2.0 ** -(4 if fmt == "e4m3" else 3)
    amax = np.max(np.abs(x), axis=None if axis is None else tuple({0: [1], -1: [0]}[axis]), keepdims=axis is not None)
    tiny = amax / fp8.max_finite(fmt) * fp8.decode_table(fmt)[8]  # below the normal range
    assert np.all(np.abs(back - x) <= rel * np.abs(x) + tiny + 1e-12)
    assert np.max(np.abs(back)) <= np.max(np.abs(x)) * (1 + 1e-6)


def test_quantize_all_zero_slices_get_unit_scale():
    x = mx.zeros((3, 4))
    data, scale = fp8.quantize(x, axis=0)
    assert np.all(np.array(scale) == 1.0) and np.all(np.array(data) == 0)


def test_dequantize_dtype():
    data, scale = fp8.quantize(mx.array([1.0, -2.0, 3.5]))
    assert fp8.dequantize(data, scale, "e4m3", mx.bfloat16).dtype == mx.bfloat16


@pytest.mark.parametrize("call", [
    lambda: fp8.quantize(mx.ones((2,)), fmt="e3m4"),
    lambda: fp8.encode(mx.ones((2,)), fmt="fp8"),
    lambda: fp8.decode(mx.ones((2,)), "e4m3"),
    lambda: fp8.quantize(mx.ones((2,), dtype=mx.int32)),
    lambda: fp8.quantize(mx.ones((2, 3)), axis=2),
    lambda: fp8.dequantize(mx.zeros((2,), dtype=mx.uint8), None, "e4m3", mx.int32),
])
def test_bad_arguments(call):
    with pytest.raises((TypeError, ValueError)):
        call()


# ---- non-finite and unusual inputs (issue 13) ---------------------------------

@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_encode_non_finite(fmt):
    x = mx.array(np.array([np.nan, -np.nan, np.inf, -np.inf, 1e9, -1e9, 1.5], np.float32))
    values = fp8.decode_table(fmt)[np.array(fp8.encode(x, fmt))]
    big = fp8.max_finite(fmt)
    assert np.isnan(values[:2]).all()
    want_inf = [np.inf, -np.inf] if fmt == "e5m2" else [big, -big]  # e4m3fn has no inf: saturate like mx.to_fp8
    assert values[2:4].tolist() == want_inf
    assert values[4:].tolist() == [big, -big, 1.5]  # finite overflow saturates in both formats


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_quantize_scales_come_from_finite_values(fmt, axis):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((13, 17)).astype(np.float32) * 3
    clean = x.copy()
    x[2, 3], x[5, 0], x[7, 9], x[0, 16] = np.nan, np.inf, -np.inf, np.nan
    bad = ~np.isfinite(x)
    data, scale = fp8.quantize(mx.array(x), fmt=fmt, axis=axis)
    clean_data, clean_scale = fp8.quantize(mx.array(np.where(bad, 0.0, clean)), fmt=fmt, axis=axis)
    # Scales as if the non-finite entries were not there; the finite entries
    # encode as they would without them.
    np.testing.assert_array_equal(np.array(scale), np.array(clean_scale))
    assert np.array_equal(np.array(data)[~bad], np.array(clean_data)[~bad])
    back = np.array(fp8.dequantize(data, scale, fmt))
    assert np.isnan(back[2, 3]) and np.isnan(back[0, 16])
    s = np.broadcast_to(np.array(scale), x.shape)
    if fmt == "e5m2":
        assert back[5, 0] == np.inf and back[7, 9] == -np.inf
    else:  # saturated to +-448 (times the slice's scale)
        assert back[5, 0] == 448 * s[5, 0] and back[7, 9] == -448 * s[7, 9]
    fin = np.isfinite(x)
    rel = 2.0 ** -(4 if fmt == "e4m3" else 3)
    tiny = np.max(s) / fp8.max_finite(fmt) * fp8.decode_table(fmt)[8]
    assert np.all(np.abs(back[fin] - x[fin]) <= rel * np.abs(x[fin]) + tiny)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_all_non_finite_slices_get_unit_scale(fmt):
    x = np.ones((4, 6), np.float32)
    x[1] = np.nan
    x[2] = np.inf
    x[3, ::2], x[3, 1::2] = np.nan, -np.inf
    data, scale = fp8.quantize(mx.array(x), fmt=fmt, axis=0)
    assert np.array(scale)[:, 0].tolist() == [np.float32(1.0) / np.float32(fp8.max_finite(fmt)), 1.0, 1.0, 1.0]
    back = np.array(fp8.dequantize(data, scale, fmt))
    assert np.isnan(back[1]).all() and np.isnan(back[3, ::2]).all()
    _, whole = fp8.quantize(mx.array(np.full((3, 2), np.nan, np.float32)), fmt=fmt)
    assert float(whole) == 1.0


@pytest.mark.parametrize("axis,scale_shape", [(None, ()), (0, (0, 1)), (-1, (1, 5))])
def test_quantize_empty(axis, scale_shape):
    data, scale = fp8.quantize(mx.zeros((0, 5)), axis=axis)
    assert data.shape == (0, 5) and data.dtype == mx.uint8
    assert tuple(scale.shape) == scale_shape and scale.dtype == mx.float32
    assert np.all(np.array(scale) == 1.0)
    assert fp8.dequantize(data, scale).shape == (0, 5)


@pytest.mark.parametrize("x", [np.array([[1.0, -2.0], [3.5, 0.25]], np.float32), [[1.0, -2.0], [3.5, 0.25]], 2.5,
                               np.array([1.0, 2.0], np.float16)], ids=["numpy", "list", "scalar", "numpy-f16"])
def test_quantize_converts_non_mlx_input(x):
    data, scale = fp8.quantize(x)
    want_data, want_scale = fp8.quantize(mx.array(x))
    assert np.array_equal(np.array(data), np.array(want_data)) and float(scale) == float(want_scale)


@pytest.mark.parametrize("x,named", [("abc", "str"), ({"a": 1}, "dict"), (np.array([1, 2]), "int"),
                                     (mx.array([1, 2]), "int32")])
def test_quantize_bad_input_names_its_type(x, named):
    with pytest.raises(TypeError, match=named):
        fp8.quantize(x)


def test_matmul2d_with_quantized_non_finite_weights():
    """matmul2d over fp8 codes made by quantize: NaN / inf weights give NaN /
    inf exactly where the float product of the dequantized operands does."""
    import mlx_flash

    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 16)).astype(np.float32)
    w[1, 3], w[4, 0] = np.nan, np.inf
    x = rng.standard_normal((5, 16)).astype(np.float32)
    for fmt in ("e4m3", "e5m2"):
        data, scale = fp8.quantize(mx.array(w), fmt=fmt, axis=0)
        got = np.array(mlx_flash.matmul2d(mx.array(x), data, b_fmt=fmt, transpose_b=True, b_scale=scale.T,
                                          out_dtype=mx.float32), np.float64)
        deq = np.array(fp8.dequantize(data, scale, fmt), np.float64)
        with np.errstate(invalid="ignore"):
            want = x.astype(np.float64) @ deq.T
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[:, 1]).all()
        inf = np.isinf(want)
        assert np.array_equal(got[inf], want[inf])
        fin = np.isfinite(want)
        assert np.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
