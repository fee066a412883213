"""matmul2d on each test backend, behind one function (see backends.py).

  cpu        mlx_flash.matmul2d on the CPU device (the C++ primitive)
  cuda       mlx_flash.matmul2d on the GPU device (MLX's CUDA backend)
  metal      mlx_flash.matmul2d on the GPU device (an Apple GPU)
  metal_emu  the Metal wrapper (mlx_flash.backends.metal_matmul) with its
             kernel factory swapped for the MSL emulation harness
"""

from __future__ import annotations

import mlx.core as mx

import mlx_flash
from mlx_flash._matmul_spec import validate_matmul


ALL = ("cpu", "cuda", "metal", "metal_emu")


def skip_reason(name: str):
    """None if matmul2d can run on backend `name` here, else why not. Like
    backends.skip_reason, but metal_emu needs only the harness (not the
    attention emulation)."""
    if name == "metal_emu":
        try:
            from metal_emu import harness  # tests/metal_emu
        except ImportError as e:
            return f"metal emulation harness not importable: {e}"
        return harness.unavailable_reason()
    import backends

    return backends.skip_reason(name)


def device(name: str):
    return mx.Device(mx.cpu) if name == "cpu" else mx.Device(mx.gpu)


def _poisoned_emulator(**build):
    """The emulation harness's metal_kernel, with outputs starting as NaN so
    that an element the kernel never writes shows."""
    from metal_emu import harness  # tests/metal_emu

    kernel = harness.metal_kernel(**build)
    return lambda **launch: kernel(**launch, init_value=float("nan"))


def matmul(name: str, a, b, **kw):
    if name != "metal_emu":
        return mlx_flash.matmul2d(a, b, stream=device(name), **kw)
    from mlx_flash.backends import metal_matmul

    spec, a3, b3, sa, sb, lead = validate_matmul(a, b, **kw)
    previous = metal_matmul.set_kernel_factory(_poisoned_emulator)
    try:
        out = metal_matmul.matmul2d(a3, b3, sa, sb, spec, mx.Device(mx.cpu))
    finally:
        metal_matmul.set_kernel_factory(previous)
    return out.reshape(*lead, spec.M, spec.N)
