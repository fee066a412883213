"""The bound the native fp8 wgmma route is tested against
(tests/fp8_wgmma_bound.py), checked on the CPU against a model of a correct
kernel: every product of two finite fp8 codes (K = 1, where the kernel's sum
is exact) and short sums, fp32 sums scaled in fp32 and rounded once to the
output dtype, as the kernel's epilogue does. A correct kernel must pass for
every seed; before issue 15's fix the bound gave float16 results no room for
the absolute rounding of float16's subnormals and this test failed. Faults a
kernel could have must still fail: fp8 subnormal inputs or float16 subnormal
outputs flushed to zero, a product dropped."""

import mlx.core as mx
import numpy as np
import pytest

from fp8_wgmma_bound import every_code_case, finite_codes, fp8_accumulation_excess
from helpers import rng
from mlx_flash import fp8

FP8_PAIRS = [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e4m3"), ("e5m2", "e5m2")]
NUMPY_OUT = {mx.float32: np.float32, mx.float16: np.float16}


def correct_kernel(a64, b64, sa, sb, transpose_b, out_dtype):
    """What a kernel that sums in fp32 returns: sum (exact in float64 for these
    few fp8 products, then rounded to fp32), times the row scale, times the
    column scale, in fp32, rounded once to out_dtype."""
    bk = b64.T if transpose_b else b64
    v = (a64 @ bk).astype(np.float32) * sa * sb
    return v.astype(NUMPY_OUT[out_dtype]).astype(np.float64)


def case(ka, kb, K, transpose_b):
    _, _, a64, b64, sa, sb = every_code_case(rng("fp8-bound", ka, kb, K, transpose_b), ka, kb, K, transpose_b)
    return a64, b64, sa, sb


@pytest.mark.parametrize("out_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("K", [1, 2, 31, 33])
@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("ka,kb", FP8_PAIRS)
def test_correct_kernel_within_bound(ka, kb, transpose_b, K, out_dtype):
    a64, b64, sa, sb = case(ka, kb, K, transpose_b)
    got = correct_kernel(a64, b64, sa, sb, transpose_b, out_dtype)
    excess, _ = fp8_accumulation_excess(got, a64, b64, sa, sb, transpose_b, out_dtype)
    assert np.all(excess <= 0), f"{np.sum(excess > 0)} correctly rounded outputs rejected"
    if out_dtype == mx.float16 and K == 1:
        # Every product of two codes (the smallest ones included) reaches
        # float16's subnormal range, where the floor is needed; longer sums
        # reach it only for some seeds.
        tiny = np.abs(got[got != 0])
        assert np.min(tiny) < 2.0 ** -14


def test_every_product_of_two_codes_is_reached():
    """K = 1: out[i, j] = a[i] * b[j] over every pair of finite codes."""
    for ka, kb in FP8_PAIRS:
        a, b, *_ = every_code_case(rng("fp8-bound-codes", ka, kb), ka, kb, 1, True)
        assert set(np.unique(np.array(a))) == set(finite_codes(ka).tolist())
        assert set(np.unique(np.array(b))) == set(finite_codes(kb).tolist())


@pytest.mark.parametrize("out_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("ka,kb", [("e4m3", "e5m2"), ("e5m2", "e5m2")])
def test_bound_rejects_flushed_fp8_subnormals(ka, kb, out_dtype):
    a64, b64, sa, sb = case(ka, kb, 1, True)
    subnormal_b = np.abs(b64) < fp8.decode_table(kb)[0x04 if kb == "e5m2" else 0x08]
    assert subnormal_b.any() and np.any(b64[subnormal_b] != 0)
    got = correct_kernel(a64, np.where(subnormal_b, 0.0, b64), sa, sb, True, out_dtype)
    excess, _ = fp8_accumulation_excess(got, a64, b64, sa, sb, True, out_dtype)
    assert np.any(excess > 0)


def test_bound_rejects_flushed_float16_subnormals():
    a64, b64, sa, sb = case("e5m2", "e5m2", 1, True)
    got = correct_kernel(a64, b64, sa, sb, True, mx.float16)
    flushed = np.where(np.abs(got) < 2.0 ** -14, 0.0, got)
    assert np.any(flushed != got)
    excess, _ = fp8_accumulation_excess(flushed, a64, b64, sa, sb, True, mx.float16)
    assert np.any(excess > 0)


@pytest.mark.parametrize("out_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("K", [2, 33])
def test_bound_rejects_a_dropped_product(K, out_dtype):
    """The last K term of every product missing (a K tail read as zero)."""
    a64, b64, sa, sb = case("e4m3", "e4m3", K, True)
    got = correct_kernel(a64[:, :-1], b64[:, :-1], sa, sb, True, out_dtype)
    excess, _ = fp8_accumulation_excess(got, a64, b64, sa, sb, True, out_dtype)
    assert np.mean(excess > 0) > 0.3


def test_bound_rejects_non_finite_outputs():
    a64, b64, sa, sb = case("e4m3", "e5m2", 1, True)
    got = correct_kernel(a64, b64, sa, sb, True, mx.float32)
    got[5, 7] = np.nan
    excess, _ = fp8_accumulation_excess(got, a64, b64, sa, sb, True, mx.float32)
    assert excess[5, 7] == np.inf and np.sum(excess > 0) == 1
