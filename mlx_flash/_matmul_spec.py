"""Validation and normalisation of matmul2d arguments.

`MatmulSpec` is the frozen (hashable) record of one call's static choices;
backends cache kernels on it and `matmul.py` caches one differentiable
function per spec. `validate_matmul` checks every argument up front and
returns the spec plus the operands reshaped to the rank every backend
expects:

    a        [batch, M, K]
    b        [batch or 1, K, N]   ([batch or 1, N, K] with transpose_b)
    a_scale  None or float32 [batch or 1, M or 1, 1]
    b_scale  None or float32 [1, 1, N or 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
FP8_FORMATS = ("e4m3", "e5m2")


@dataclass(frozen=True)
class MatmulSpec:
    """Static description of one matmul2d call (kernel-cache key)."""

    a_fmt: Optional[str]  # None (float operand), "e4m3" or "e5m2" (uint8 operand)
    b_fmt: Optional[str]
    transpose_b: bool
    out_dtype: mx.Dtype
    batch: int
    M: int
    N: int
    K: int
    b_batched: bool  # b has its own batch dim (else one b for every batch entry)
    # fp8 x fp8 only: the caller allows the tensor cores' own fp8 accumulation
    # (within 2^-8 (|a| @ |b|)) where a backend has it, instead of fp32-exact sums.
    fast_accumulation: bool = False


def _dtype_name(t) -> str:
    return str(t).replace("mlx.core.", "")


def _check_operand(name: str, x, fmt) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name}: expected an mx.array, got {type(x).__name__}")
    if fmt is not None and fmt not in FP8_FORMATS:
        raise ValueError(f"{name}_fmt: expected None, 'e4m3' or 'e5m2', got {fmt!r}")
    if fmt is None:
        if x.dtype == mx.uint8:
            raise TypeError(
                f"{name}: a uint8 operand holds fp8 codes and needs {name}_fmt='e4m3' or 'e5m2' "
                f"(got {name}_fmt=None)"
            )
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected float32, float16, bfloat16 or uint8 (fp8 codes), got {_dtype_name(x.dtype)}"
            )
    elif x.dtype != mx.uint8:
        raise TypeError(
            f"{name}_fmt={fmt!r} describes fp8 codes held as uint8, but {name} is {_dtype_name(x.dtype)}; "
            f"pass {name}_fmt=None for a float operand or quantise it with mlx_flash.fp8.quantize"
        )


def _check_scale(name: str, s, allowed: Tuple[tuple, ...], described: str):
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        s = mx.array(s, dtype=mx.float32)
    if not isinstance(s, mx.array):
        raise TypeError(f"{name}: expected None, a float or an mx.array, got {type(s).__name__}")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float16/bfloat16 scale, got {_dtype_name(s.dtype)}")
    if tuple(s.shape) not in allowed:
        raise ValueError(f"{name}: expected shape {described}, got {tuple(s.shape)}")
    return s.astype(mx.float32)


def validate_matmul(a, b, *, a_fmt=None, b_fmt=None, a_scale=None, b_scale=None, transpose_b=False,
                    out_dtype=None, fast_accumulation=False):
    """Checks a matmul2d call; returns (spec, a3, b3, a_scale3, b_scale3, lead_shape)."""
    _check_operand("a", a, a_fmt)
    _check_operand("b", b, b_fmt)
    if a.ndim < 2:
        raise ValueError(f"a: expected shape [..., M, K] (at least 2 dims), got {tuple(a.shape)}")
    if b.ndim < 2:
        raise ValueError(f"b: expected shape [K, N] or [..., K, N], got {tuple(b.shape)}")
    if not isinstance(transpose_b, bool):
        raise TypeError(f"transpose_b: expected a bool, got {type(transpose_b).__name__}")
    if not isinstance(fast_accumulation, bool):
        raise TypeError(f"fast_accumulation: expected a bool, got {type(fast_accumulation).__name__}")
    if fast_accumulation and (a_fmt is None or b_fmt is None):
        # Only fp8 x fp8 products have a faster, inexact accumulation; saying
        # nothing would let a caller believe another product took it.
        raise ValueError(f"fast_accumulation: applies to fp8 x fp8 products (a_fmt and b_fmt both set), "
                         f"got a_fmt={a_fmt!r}, b_fmt={b_fmt!r}")
    lead = tuple(a.shape[:-2])
    M, K = a.shape[-2], a.shape[-1]
    if transpose_b:
        N, Kb = b.shape[-2], b.shape[-1]
        b_desc = "[N, K] (transpose_b=True)"
    else:
        Kb, N = b.shape[-2], b.shape[-1]
        b_desc = "[K, N]"
    if Kb != K:
        raise ValueError(
            f"inner dimensions differ: a is {tuple(a.shape)} (K={K}) but b is {tuple(b.shape)} "
            f"with layout {b_desc} (K={Kb})"
        )
    b_lead = tuple(b.shape[:-2])
    b_batched = bool(b_lead) and math.prod(b_lead) != 1
    if b_lead and b_batched and b_lead != lead:
        raise ValueError(
            f"batch dims differ: a has batch {lead} but b has batch {b_lead}; b must be 2-D or batched like a"
        )
    if b_lead and not b_batched and len(b_lead) > len(lead):
        raise ValueError(f"batch dims differ: a has batch {lead} but b has batch {b_lead}")
    batch = math.prod(lead) if lead else 1

    if out_dtype is None:
        floats = [x.dtype for x, f in ((a, a_fmt), (b, b_fmt)) if f is None]
        out_dtype = mx.float32 if not floats else (floats[0] if len(set(floats)) == 1 else mx.float32)
    elif not isinstance(out_dtype, mx.Dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None, mx.float32, mx.float16 or mx.bfloat16, got {out_dtype!r}")

    ones = (1,) * len(lead)
    a_shapes = {(), (1, 1), (M, 1), ones + (1, 1), ones + (M, 1), lead + (1, 1), lead + (M, 1)}
    a_scale = _check_scale("a_scale", a_scale, tuple(a_shapes), f"() or [..., M, 1] = {lead + (M, 1)}")
    b_scale = _check_scale("b_scale", b_scale, ((), (1,), (1, 1), (1, N)), f"() or [1, N] = (1, {N})")

    spec = MatmulSpec(a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=transpose_b, out_dtype=out_dtype,
                      batch=batch, M=M, N=N, K=K, b_batched=b_batched, fast_accumulation=fast_accumulation)
    a3 = a.reshape(batch, M, K)
    b3 = b.reshape((batch if b_batched else 1,) + tuple(b.shape[-2:]))
    if a_scale is not None:
        rows = a_scale.shape[-2] if a_scale.ndim >= 2 else 1
        per_batch = a_scale.ndim > 2 and math.prod(a_scale.shape[:-2]) != 1
        a_scale = a_scale.reshape(batch if per_batch else 1, rows, 1)
    if b_scale is not None:
        b_scale = b_scale.reshape(1, 1, b_scale.shape[-1] if b_scale.ndim == 2 else 1)
    return spec, a3, b3, a_scale, b_scale, lead
