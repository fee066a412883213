"""The backends a test can run on, behind one interface.

Test functions take a `backend` name (conftest.py parametrises it) and call
`forward(backend, ...)` / `gradients(backend, ...)`, so every behaviour test
runs unchanged on each backend:

  cpu        the C++ primitive (always)
  cuda       mx.fast.cuda_kernel wrappers (only where MLX sees a CUDA GPU)
  metal      mx.fast.metal_kernel wrappers (only on an Apple GPU)
  metal_emu  the same Metal source text run through the MSL emulation
             harness on the CPU (tests/metal_emu/), where clang-19 exists

A backend that cannot run here is skipped with the reason.
"""

from __future__ import annotations

import mlx.core as mx

import mlx_flash


def _has_cuda() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def _metal_emu_reason():
    """None if the Metal emulation harness can run here, else why not."""
    try:
        from metal_emu import attention, harness  # noqa: F401  (tests/metal_emu)
    except ImportError as e:
        return f"metal emulation harness not importable: {e}"
    return harness.unavailable_reason()


def skip_reason(name: str):
    """None if backend `name` runs here, else a reason to skip."""
    if name == "cpu":
        return None
    if name == "cuda":
        return None if _has_cuda() else "no CUDA GPU visible to MLX"
    if name == "metal":
        return None if mx.metal.is_available() else "no Apple GPU (Metal) here"
    if name == "metal_emu":
        return _metal_emu_reason()
    return f"unknown backend {name}"


ALL = ("cpu", "cuda", "metal", "metal_emu")


def _device_stream(name: str):
    return mx.cpu if name == "cpu" else mx.gpu


def forward(name: str, q, k, v, *, varlen=None, **options):
    """(out, lse) of flash_attention (or flash_attention_varlen when
    varlen=(cu_seqlens_q, cu_seqlens_k)) on backend `name`."""
    if name == "metal_emu":
        from metal_emu import attention as emu

        return emu.forward(q, k, v, varlen=varlen, **options)
    stream = _device_stream(name)
    if varlen is not None:
        return mlx_flash.flash_attention_varlen(q, k, v, *varlen, return_lse=True, stream=stream, **options)
    return mlx_flash.flash_attention(q, k, v, return_lse=True, stream=stream, **options)


def gradients(name: str, q, k, v, dout, *, varlen=None, dlse=None, wrt=("q", "k", "v"), **options):
    """Cotangents of sum(out * dout) (+ sum(lse * dlse)) w.r.t. the names in
    `wrt` (any of q, k, v, sinks, mask), as a dict."""
    if name == "metal_emu":
        from metal_emu import attention as emu

        return emu.gradients(q, k, v, dout, varlen=varlen, dlse=dlse, wrt=wrt, **options)
    stream = _device_stream(name)
    args = {"q": q, "k": k, "v": v, "sinks": options.pop("sinks", None), "mask": options.pop("mask", None)}

    def loss(*xs):
        a = dict(args, **dict(zip(wrt, xs)))
        extra = {n: a[n] for n in ("sinks", "mask") if a[n] is not None}
        if varlen is not None:
            out, lse = mlx_flash.flash_attention_varlen(
                a["q"], a["k"], a["v"], *varlen, return_lse=True, stream=stream, **extra, **options
            )
        else:
            out, lse = mlx_flash.flash_attention(
                a["q"], a["k"], a["v"], return_lse=True, stream=stream, **extra, **options
            )
        total = mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))
        if dlse is not None:
            total = total + mx.sum(mx.where(mx.isinf(lse), 0.0, lse) * dlse)
        return total

    grads = mx.grad(loss, argnums=tuple(range(len(wrt))))(*[args[n] for n in wrt])
    if not isinstance(grads, (tuple, list)):  # one argnum: MLX returns the array itself
        grads = (grads,)
    return dict(zip(wrt, grads))
