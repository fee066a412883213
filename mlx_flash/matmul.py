"""The public matmul2d op: validation -> differentiable function -> backend.

    out = (dequant(a) * a_scale) @ (dequant(b) * b_scale)

with fp8 operands (uint8 codes, `*_fmt` "e4m3" / "e5m2") decoded inside the
kernels and fp32 accumulation. `matmul2d` checks its arguments
(`_matmul_spec.py`), then calls an `mx.custom_function` whose forward is the
backend kernel (`dispatch.py`) and whose vjp is two more matmul2d calls:

    da = (g * b_scale) @ dequant(b)^T, each row times a_scale
    db = dequant(a)^T @ (g * a_scale), each column times b_scale

fp8 operands and the scales are constants (their cotangents are zero).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import dispatch
from ._matmul_spec import MatmulSpec, validate_matmul


def _call(backend, a, b, a_scale, b_scale, *, a_fmt, b_fmt, transpose_b, out_dtype, b_batched, stream):
    """One backend call on [batch, M, K] x [batch or 1, K, N] operands."""
    batch, M, K = a.shape
    N = b.shape[-2] if transpose_b else b.shape[-1]
    spec = MatmulSpec(a_fmt=a_fmt, b_fmt=b_fmt, transpose_b=transpose_b, out_dtype=out_dtype,
                      batch=batch, M=M, N=N, K=K, b_batched=b_batched)
    return backend.matmul2d(a, b, a_scale, b_scale, spec, stream)


def _grad_a(backend, spec: MatmulSpec, b, a_scale, b_scale, g, a_dtype, stream):
    """d loss / d a = a_scale * ((g * b_scale) @ dequant(b)^T), [batch, M, K]."""
    g = g if b_scale is None else g.astype(mx.float32) * b_scale
    return _call(backend, g, b, a_scale, None, a_fmt=None, b_fmt=spec.b_fmt,
                 transpose_b=not spec.transpose_b, out_dtype=a_dtype, b_batched=spec.b_batched,
                 stream=stream)


def _grad_b(backend, spec: MatmulSpec, a, a_scale, b_scale, g, b_dtype, stream):
    """d loss / d b = (dequant(a)^T @ (g * a_scale)) * b_scale, in b's layout."""
    g = g if a_scale is None else g.astype(mx.float32) * a_scale
    if not spec.b_batched:  # one b for all batch entries: sum over the batch
        a = a.reshape(1, spec.batch * spec.M, spec.K)
        g = g.reshape(1, spec.batch * spec.M, spec.N)
    if spec.transpose_b:
        # db [N, K] = (g^T @ dequant(a)) with row n times b_scale[n].
        row_scale = None if b_scale is None else b_scale.reshape(1, -1, 1)
        return _call(backend, g.swapaxes(-1, -2), a, row_scale, None, a_fmt=None, b_fmt=spec.a_fmt,
                     transpose_b=False, out_dtype=b_dtype, b_batched=True, stream=stream)
    return _call(backend, a.swapaxes(-1, -2), g, None, b_scale, a_fmt=spec.a_fmt, b_fmt=None,
                 transpose_b=False, out_dtype=b_dtype, b_batched=True, stream=stream)


@functools.lru_cache(maxsize=256)
def _differentiable(spec: MatmulSpec, has_a_scale: bool, has_b_scale: bool, backend_name: str, stream):
    """One custom_function per (spec, scales present, backend, stream)."""
    backend = dispatch.backend_for_name(backend_name)

    def unpack(scales):
        scales = list(scales)
        a_scale = scales.pop(0) if has_a_scale else None
        b_scale = scales.pop(0) if has_b_scale else None
        return a_scale, b_scale

    @mx.custom_function
    def matmul(a, b, *scales):
        a_scale, b_scale = unpack(scales)
        return backend.matmul2d(a, b, a_scale, b_scale, spec, stream)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        a, b, *scales = primals
        a_scale, b_scale = unpack(scales)
        g = cotangent
        da = mx.zeros_like(a) if spec.a_fmt else _grad_a(backend, spec, b, a_scale, b_scale, g, a.dtype, stream)
        db = mx.zeros_like(b) if spec.b_fmt else _grad_b(backend, spec, a, a_scale, b_scale, g, b.dtype, stream)
        return (da, db, *(mx.zeros_like(s) for s in scales))

    return matmul


def matmul2d(a, b, *, a_fmt=None, b_fmt=None, a_scale=None, b_scale=None, transpose_b=False,
             out_dtype=None, fast_accumulation=False, stream=None):
    """`(dequant(a) * a_scale) @ (dequant(b) * b_scale)`, fp32 accumulation
    (unless an fp8 x fp8 call allows `fast_accumulation`).

    Args:
      a: `[..., M, K]`, float32/float16/bfloat16, or uint8 fp8 codes with
        `a_fmt`.
      b: `[K, N]` (`[N, K]` with `transpose_b=True`) or batched like a
        (`[..., K, N]`); float or uint8 fp8 codes with `b_fmt`.
      a_fmt, b_fmt: None for a float operand, "e4m3" (E4M3FN) or "e5m2" for
        fp8 codes (decoded inside the kernel; see `mlx_flash.fp8`).
      a_scale: None, a scalar, or an array of shape `()` or `[..., M, 1]`.
      b_scale: None, a scalar, or an array of shape `()` or `[1, N]`.
      transpose_b: b is given as `[N, K]` (e.g. an nn.Linear weight).
      out_dtype: result dtype; default the float operands' dtype (float32
        when both are fp8 or the float dtypes differ).
      fast_accumulation: fp8 x fp8 products only (a ValueError otherwise):
        allow the tensor cores' own fp8 accumulation where the backend has
        it. On Hopper (CUDA) the product then runs on native fp8 `wgmma`
        (k32, twice the 16-bit rate; 1099 vs 674 TFLOP/s at 8192^3 on an
        H200), whose sums are promoted to fp32 every 128 K as cuBLAS does
        for `torch._scaled_mm(use_fast_accum=False)` (the same error,
        measured): within `2^-8 * (|a| @ |b|)` instead of fp32-exact.
        Elsewhere the product is computed exactly, which is within that
        bound too.
      stream: stream or device to run on (default: the default device).

    Returns:
      `[..., M, N]` in `out_dtype`. Differentiable in float operands.
    """
    spec, a3, b3, a_scale3, b_scale3, lead = validate_matmul(
        a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=a_scale, b_scale=b_scale, transpose_b=transpose_b,
        out_dtype=out_dtype, fast_accumulation=fast_accumulation,
    )
    name = dispatch.backend_name(stream)
    fn = _differentiable(spec, a_scale3 is not None, b_scale3 is not None, name, stream)
    scales = [s for s in (a_scale3, b_scale3) if s is not None]
    out = fn(a3, b3, *scales)
    return out.reshape(*lead, spec.M, spec.N)
