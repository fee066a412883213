"""fp8 formats held as uint8 codes: encode, decode, quantize, dequantize.

Two formats, named as in the OCP 8-bit floating point spec:

* "e4m3" is E4M3FN: 4 exponent bits (bias 7), 3 mantissa bits, largest
  finite 448, no infinities; 0x7F / 0xFF are NaN. Decoding is bit-exact with
  `mx.from_fp8`, and encoding with `mx.to_fp8` for every non-NaN input
  (`mx.to_fp8` turns NaN into 448; here NaN stays NaN: 0x7F / 0xFF).
* "e5m2": 5 exponent bits (bias 15), 2 mantissa bits, largest finite 57344,
  with infinities (0x7C / 0xFC) and NaNs (exponent 31, mantissa != 0).

Encoding rounds to nearest even and saturates: a finite value beyond the
largest finite one becomes the largest finite value of its sign. NaN encodes
as the format's NaN; +-inf as the format defines it: e4m3 has none and
saturates to +-448 (as `mx.to_fp8`), e5m2 encodes +-inf.

Kernels decode through the same 256-entry tables (`decode_table`), so every
backend agrees bit for bit on what an fp8 operand means.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from ._matmul_spec import FLOAT_DTYPES, FP8_FORMATS


@functools.lru_cache(maxsize=None)
def _format(fmt: str):
    """(exponent bits, mantissa bits, bias, largest finite code, has_inf)."""
    if fmt == "e4m3":
        return 4, 3, 7, 0x7E, False
    if fmt == "e5m2":
        return 5, 2, 15, 0x7B, True
    raise ValueError(f"fmt: expected 'e4m3' or 'e5m2', got {fmt!r}")


def max_finite(fmt: str) -> float:
    """Largest finite value of the format (448 for e4m3, 57344 for e5m2)."""
    return float(decode_table(fmt)[_format(fmt)[3]])


@functools.lru_cache(maxsize=None)
def decode_table(fmt: str) -> np.ndarray:
    """float32 value of each of the 256 codes (NumPy, read-only)."""
    ebits, mbits, bias, _, has_inf = _format(fmt)
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> mbits) & ((1 << ebits) - 1)
    man = codes & ((1 << mbits) - 1)
    normal = (1.0 + man / (1 << mbits)) * np.exp2(exp - bias)
    subnormal = (man / (1 << mbits)) * np.exp2(1 - bias)
    values = sign * np.where(exp == 0, subnormal, normal)
    top = exp == (1 << ebits) - 1
    if has_inf:  # IEEE-like: exponent all ones is inf (mantissa 0) or NaN
        values = np.where(top & (man == 0), sign * np.inf, values)
        values = np.where(top & (man != 0), np.nan, values)
    else:  # E4M3FN: only S.1111.111 is NaN
        values = np.where(top & (man == (1 << mbits) - 1), np.nan, values)
    table = values.astype(np.float32)
    table.flags.writeable = False
    return table


def decode(codes: mx.array, fmt: str = "e4m3", dtype=mx.float32) -> mx.array:
    """Values of fp8 `codes` (uint8) in `dtype`."""
    if not isinstance(codes, mx.array) or codes.dtype != mx.uint8:
        raise TypeError(f"codes: expected a uint8 mx.array of fp8 codes, got {getattr(codes, 'dtype', type(codes))}")
    table = mx.array(decode_table(fmt))
    return mx.take(table, codes.astype(mx.uint32)).astype(dtype)


def encode(x: mx.array, fmt: str = "e4m3") -> mx.array:
    """fp8 codes (uint8) of `x`: round to nearest even, saturate finite
    values at the largest finite one; NaN -> NaN, inf -> inf (e5m2) or the
    largest finite value (e4m3, which has no inf)."""
    ebits, mbits, bias, max_code, has_inf = _format(fmt)
    if not isinstance(x, mx.array) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float32/float16/bfloat16 mx.array, got {getattr(x, 'dtype', type(x))}")
    x = x.astype(mx.float32)
    bits = x.view(mx.uint32)
    sign = (bits >> 24).astype(mx.uint8) & 0x80
    mag = mx.abs(x)
    nan, inf = mx.isnan(x), mx.isinf(x)
    mag = mx.where(nan, 0.0, mx.minimum(mag, np.float32(1e30)))  # inf saturates below (e4m3)
    # Normal range: round the float32 mantissa to `mbits` bits (nearest even)
    # on the bit pattern, then move the exponent from bias 127 to `bias`.
    shift = 23 - mbits
    mbits_u = mag.view(mx.uint32)
    rounded = (mbits_u + ((1 << (shift - 1)) - 1) + ((mbits_u >> shift) & 1)) >> shift
    normal_code = rounded.astype(mx.int32) - ((127 - bias) << mbits)
    # Subnormal range: multiples of the smallest subnormal, rounded to nearest
    # even by float addition of 2^23.
    quantum = np.float32(2.0 ** (1 - bias - mbits))
    sub_code = ((mag / quantum + np.float32(2**23)) - np.float32(2**23)).astype(mx.int32)
    min_normal = np.float32(2.0 ** (1 - bias))
    code = mx.where(mag < min_normal, sub_code, normal_code)
    code = mx.clip(code, 0, max_code).astype(mx.uint8)
    if has_inf:  # exponent all ones: mantissa 0 is inf, anything else NaN
        code = mx.where(inf, mx.array(max_code + 1, mx.uint8), code)
        code = mx.where(nan, mx.array(max_code + 3, mx.uint8), code)
    else:  # E4M3FN: S.1111.111 is its only NaN
        code = mx.where(nan, mx.array(0x7F, mx.uint8), code)
    return code | sign


def _reduce_axes(ndim: int, axis):
    if axis is None:
        return None
    keep = (axis,) if isinstance(axis, int) else tuple(axis)
    keep = tuple(a % ndim for a in keep)
    return tuple(a for a in range(ndim) if a not in keep)


def _as_float_array(x) -> mx.array:
    """`x` as a float mx.array: NumPy arrays, lists and Python scalars are
    converted; anything else is a TypeError naming what came."""
    if not isinstance(x, mx.array):
        try:
            x = mx.array(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"x: expected an mx.array (or something mx.array() converts), got {type(x).__name__}") from e
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected float32/float16/bfloat16 values, got {x.dtype}")
    return x


def _finite_amax(x32: mx.array, axis=None, keepdims: bool = False) -> mx.array:
    """The largest |x| over `axis` among the finite values of float32 `x32`
    (0 where none is finite): quantize's and FP8Linear's activation scales."""
    return mx.max(mx.where(mx.isfinite(x32), mx.abs(x32), 0.0), axis=axis, keepdims=keepdims)


def quantize(x: mx.array, fmt: str = "e4m3", axis=None):
    """Scale `x` into the fp8 range and encode it.

    Returns `(data, scale)` with `x ~= decode(data) * scale`: `scale` is
    float32, `amax / max_finite(fmt)` per tensor (`axis=None`, shape `()`)
    or per slice along `axis` (one scale per index of `axis`, keepdims
    shape: axis=0 of a `[N, K]` weight gives `[N, 1]`, axis=-1 gives
    `[1, K]`). `amax` is taken over the finite values only, so one NaN or
    inf does not flatten the rest; slices with no finite nonzero value (all
    zero, NaN or inf) and empty arrays get scale 1. NaN encodes as the
    format's NaN, inf as `encode` says (e4m3: +-448 times the scale; e5m2:
    inf). `x` may be an mx.array or anything `mx.array()` converts (a NumPy
    array, a list, a scalar).
    """
    _format(fmt)
    x = _as_float_array(x)
    if axis is not None:
        for a in (axis,) if isinstance(axis, int) else tuple(axis):
            if not -x.ndim <= a < x.ndim:
                raise ValueError(f"axis: {a} is out of range for an array of {x.ndim} dims")
    reduce = _reduce_axes(x.ndim, axis)
    if x.size == 0:
        shape = [] if axis is None else [1 if a in reduce else n for a, n in enumerate(x.shape)]
        return mx.zeros(x.shape, mx.uint8), mx.ones(shape, mx.float32)
    x32 = x.astype(mx.float32)
    amax = _finite_amax(x32, reduce, keepdims=axis is not None)
    scale = mx.where(amax > 0, amax / np.float32(max_finite(fmt)), 1.0).astype(mx.float32)
    return encode(x32 / scale, fmt), scale


def dequantize(data: mx.array, scale=None, fmt: str = "e4m3", dtype=mx.float32) -> mx.array:
    """`decode(data) * scale` in `dtype` (the product taken in float32)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected mx.float32, mx.float16 or mx.bfloat16, got {dtype!r}")
    values = decode(data, fmt, mx.float32)
    if scale is not None:
        values = values * mx.array(scale).astype(mx.float32)
    return values.astype(dtype)


__all__ = ["FP8_FORMATS", "decode", "decode_table", "dequantize", "encode", "max_finite", "quantize"]
