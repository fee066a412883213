"""What the native fp8 wgmma route (cuda_src/matmul_wgmma.cuh, NATIVE) may
return, and operands that reach every fp8 code, for its tests.

The bound. Hopper's fp8 tensor cores align each k32 group of products to the
largest and keep 13 mantissa bits (truncating), also when adding into their
accumulator; the kernel restarts that sum every 128 or 256 K and adds it to
fp32 registers. So the fp32 sum is within 2^-8 * (|a| @ |b|) (scaled) of the
exact one. Then the result is rounded to out_dtype: relatively (half an ulp,
2^-11 for float16) where the result is normal there, but by up to half the
subnormal spacing in absolute terms below it: float16's subnormals are 2^-24
apart, so a product of two small fp8 values (e5m2 reaches 2^-16, e4m3 2^-9)
can round by 2^-25, far more than any relative allowance of a value that small.
The bound had missed that floor once: a correct kernel then failed the K = 1
tests for about one seed in seven (issue 15).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_flash import fp8
from test_matmul import reference

# Half the spacing of float16's subnormals: the most any float16 rounding
# moves a value below 2^-14 (bfloat16 and float32 share float32's exponent
# range, where the scaled fp8 products here stay normal).
FLOAT16_SUBNORMAL_HALF_SPACING = 2.0 ** -25


def allowed_error(want, absprod, out_dtype):
    """Largest |got - want| the native route may show per element: its
    accumulation bound plus the rounding of the result to out_dtype."""
    accumulation = 2.0 ** -8 * absprod
    if out_dtype == mx.float32:
        return accumulation + 1e-30
    # A generous relative allowance (float16 rounds by 2^-11, bfloat16 by 2^-8
    # relative, of a value that is itself off by `accumulation`) ...
    relative = (2.0 ** -8 if out_dtype == mx.float16 else 2.0 ** -7) * (np.abs(want) + accumulation)
    # ... and float16's absolute floor below its normal range.
    floor = FLOAT16_SUBNORMAL_HALF_SPACING if out_dtype == mx.float16 else 0.0
    return accumulation + relative + floor + 1e-30


def fp8_accumulation_excess(got, a64, b64, sa, sb, transpose_b, out_dtype):
    """(|got - want| - allowed error) per element (<= 0 where within the
    bound), and max error / max |want| for reporting."""
    want = reference(a64, b64, sa, sb, transpose_b=transpose_b)
    absprod = reference(np.abs(a64), np.abs(b64), None if sa is None else np.abs(sa),
                        None if sb is None else np.abs(sb), transpose_b=transpose_b)
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    excess = np.where(np.isfinite(got), err - allowed_error(want, absprod, out_dtype), np.inf)
    return excess, float(np.max(err, initial=0.0) / (np.max(np.abs(want), initial=0.0) + 1e-30))


def assert_within_fp8_accumulation(out, a64, b64, sa, sb, transpose_b, out_dtype):
    """`out` (an mx.array from the native route) is within the bound; returns
    max error / max |want|."""
    got = np.array(out.astype(mx.float32)).astype(np.float64)
    excess, rel = fp8_accumulation_excess(got, a64, b64, sa, sb, transpose_b, out_dtype)
    assert np.all(np.isfinite(got)), f"{np.sum(~np.isfinite(got))} non-finite outputs"
    bad = np.argwhere(excess > 0)
    assert bad.size == 0, (f"{len(bad)} outputs beyond the bound, first at {tuple(bad[0])}: "
                           f"got {got[tuple(bad[0])]!r}, excess {excess[tuple(bad[0])]:.3g}")
    return rel


def finite_codes(fmt: str) -> np.ndarray:
    """Every code of `fmt` that decodes to a finite value (e4m3: 254, e5m2: 248)."""
    return np.nonzero(np.isfinite(fp8.decode_table(fmt)))[0].astype(np.uint8)


def every_code_rows(gen: np.random.Generator, fmt: str, rows: int, K: int) -> np.ndarray:
    """[rows, K] uint8 codes in which every finite code of `fmt` occurs. The
    first ceil(n / K) rows hold them in order of magnitude (row 0 the smallest,
    so the smallest products of two such operands meet in out[0, 0], down to
    fp8's subnormals), each row shuffled along K; after them, codes of
    standard normal values (the distribution of the other tests)."""
    codes = finite_codes(fmt)
    by_magnitude = codes[np.argsort(np.abs(fp8.decode_table(fmt)[codes]), kind="stable")]
    sorted_rows = math.ceil(len(codes) / K)
    assert rows >= sorted_rows, f"{rows} rows cannot hold {len(codes)} codes at K = {K}"
    normal = gen.standard_normal(rows * K - len(codes)).astype(np.float32)
    filler = np.array(fp8.encode(mx.array(normal), fmt))
    out = np.concatenate([by_magnitude, filler]).reshape(rows, K)
    return gen.permuted(out, axis=1).astype(np.uint8)


def rows_needed(fmt: str, K: int) -> int:
    return math.ceil(len(finite_codes(fmt)) / K)


def downscaling(values: np.ndarray, axis: int, gen: np.random.Generator) -> np.ndarray:
    """float32 scales in [0.5, 2) times the power of two that brings each
    slice's largest |value| to at most 1 (slices already below 1 keep their
    size): products stay within float16's range, small ones stay small."""
    peak = np.max(np.abs(values), axis=axis, keepdims=True)
    shift = np.maximum(0.0, np.ceil(np.log2(np.maximum(peak, 1e-30))))
    return (gen.uniform(0.5, 2.0, peak.shape) * np.exp2(-shift)).astype(np.float32)


def every_code_case(gen: np.random.Generator, ka: str, kb: str, K: int, transpose_b: bool):
    """Operands of an fp8 x fp8 product in which every finite code of each
    format occurs (every_code_rows), the smallest ones multiplied together;
    M and N cross a 128-row / 16-column tile edge. Returns (a, b) as uint8
    mx.arrays ([M, K] and [N, K] or [K, N]), their float64 values, and
    per-row / per-column scales (downscaling) that keep float16 results finite."""
    M = max(rows_needed(ka, K), 128) + 3
    N = max(rows_needed(kb, K), 128) + 9
    a = every_code_rows(gen, ka, M, K)
    b_nk = every_code_rows(gen, kb, N, K)
    b = b_nk if transpose_b else np.ascontiguousarray(b_nk.T)
    a64 = fp8.decode_table(ka)[a].astype(np.float64)
    b64 = fp8.decode_table(kb)[b].astype(np.float64)
    sa = downscaling(a64, 1, gen)
    sb = downscaling(b64, 1 if transpose_b else 0, gen).reshape(1, N)
    return mx.array(a), mx.array(b), a64, b64, sa, sb
