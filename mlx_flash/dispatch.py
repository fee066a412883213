"""Pick the backend module that runs a call, from the stream/device it targets.

Every backend module (`mlx_flash.backends.cpu`, `.metal`, `.cuda`) has the
same functions, so `attention.py` and `matmul.py` never branch on the device:

    attention_forward(q, k, v, spec, inputs, stream) -> (out, lse)
    attention_backward(q, k, v, out, lse, dout, dlse, spec, inputs, stream)
        -> (dq, dk, dv)

Backends with a quantized-KV kernel (CPU and CUDA so far; `QUANTIZED_KV_BACKENDS`)
also have, with k and v the `(data, scales, biases)` triples of mx.quantize:

    quantized_attention_forward(q, k, v, qspec, inputs, stream) -> (out, lse)
    quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs, stream) -> dq

Shapes: q `[B, Hq, Nq, Dqk]`, k `[B, Hkv, Nk, Dqk]`, v `[B, Hkv, Nk, Dv]`
(views with any strides; varlen calls pass `[1, H, total, D]` views and
`spec.batch` sequences), out `[B, Hq, Nq, Dv]` in q's dtype, lse float32
`[B, Hq, Nq]`; `dlse` is None or float32 like lse (a cotangent of lse when
the caller differentiates through it). dq/dk/dv come back in the input dtype.
Backend modules are imported lazily: the CPU one needs the compiled
extension, the CUDA one must not.
"""

from __future__ import annotations

import functools
import importlib

import mlx.core as mx

_BACKENDS = {"cpu": "mlx_flash.backends.cpu", "metal": "mlx_flash.backends.metal", "cuda": "mlx_flash.backends.cuda"}
QUANTIZED_KV_BACKENDS = ("cpu", "cuda")


def device_of(stream) -> mx.Device:
    """The device a call with `stream=` (None, a Stream or a Device) runs on."""
    if stream is None:
        return mx.default_device()
    if isinstance(stream, mx.Stream):
        return stream.device
    if isinstance(stream, mx.Device):
        return stream
    if isinstance(stream, mx.DeviceType):  # mx.cpu / mx.gpu
        return mx.Device(stream)
    raise TypeError(f"stream: expected None, an mx.Stream, mx.Device or mx.cpu/mx.gpu, got {type(stream).__name__}")


def backend_name(stream) -> str:
    """'cpu', 'metal' or 'cuda' for the device the call runs on."""
    device = device_of(stream)
    if device.type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    raise RuntimeError(f"mlx_flash: no backend for device {device}")


@functools.lru_cache(maxsize=None)
def backend_for_name(name: str):
    """The backend module called `name` ('cpu', 'metal' or 'cuda')."""
    return importlib.import_module(_BACKENDS[name])

