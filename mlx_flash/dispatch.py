"""Pick the backend module that runs a call, from the stream/device it targets.

Every backend module (`mlx_flash.backends.cpu`, `.metal`, `.cuda`) has the
same functions, so `attention.py` and `matmul.py` never branch on the device:

    attention_forward(q, k, v, spec, inputs, stream) -> (out, lse)
    attention_backward(q, k, v, out, lse, dout, dlse, spec, inputs, stream,
                       own_output=True) -> (dq, dk, dv)

`own_output`: out and lse are this call's own result over exactly the keys
k, v hold. Ring attention's blocks pass global ones (False), so delta =
dO . O - dlse must come from out there; with True a backend may instead sum
P dP itself (the CPU kernel does where a sequence's keys fit one key tile:
no rounding of a 16-bit out in it).

Backends with a quantized-KV kernel (CPU, Metal and CUDA; `QUANTIZED_KV_BACKENDS`)
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

Optional module attributes say what a backend takes beyond the common
ground (absent means the default):

    HEAD_DIM_LIMITS = (max Dqk, max Dv)   default DEFAULT_HEAD_DIM_LIMITS
    QUANTIZED_HEAD_DIM_LIMITS = (...)     the quantized-KV kernels' own, where
                                          narrower; default HEAD_DIM_LIMITS
    NATIVE_KEY_RANGES = True              the kernels read inputs.key_start /
                                          key_len; otherwise `fold_key_ranges`
                                          turns them into a [B, 1, 1, Nk] mask
"""

from __future__ import annotations

import functools
import importlib

import dataclasses

import mlx.core as mx

from ._spec import AttentionInputs, AttentionSpec
from .reference import key_range_keep

_BACKENDS = {"cpu": "mlx_flash.backends.cpu", "metal": "mlx_flash.backends.metal", "cuda": "mlx_flash.backends.cuda"}
QUANTIZED_KV_BACKENDS = ("cpu", "metal", "cuda")


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


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """Whether this MLX has a CUDA GPU; asked once, as it cannot change within a
    process (FP8Linear asks it on every call)."""
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def backend_name(stream) -> str:
    """'cpu', 'metal' or 'cuda' for the device the call runs on."""
    device = device_of(stream)
    if device.type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if cuda_available():
        return "cuda"
    raise RuntimeError(f"mlx_flash: no backend for device {device}")


@functools.lru_cache(maxsize=None)
def backend_for_name(name: str):
    """The backend module called `name` ('cpu', 'metal' or 'cuda')."""
    return importlib.import_module(_BACKENDS[name])



# Head dims the kernels of a backend take when it names none itself (the
# GPU tile plans stop at 256 for now; wider ones are future kernel work).
DEFAULT_HEAD_DIM_LIMITS = (256, 256)


def head_dim_limits(name: str) -> tuple:
    """(max Dqk, max Dv) that backend `name` takes."""
    return getattr(backend_for_name(name), "HEAD_DIM_LIMITS", DEFAULT_HEAD_DIM_LIMITS)


def quantized_head_dim_limits(name: str) -> tuple:
    """(max Dqk, max Dv) that backend `name`'s quantized-KV kernels take."""
    return getattr(backend_for_name(name), "QUANTIZED_HEAD_DIM_LIMITS", head_dim_limits(name))


def check_head_dims(spec: AttentionSpec, name: str) -> None:
    """A clear error when the contract allows the head dims but this backend does not."""
    max_qk, max_v = head_dim_limits(name)
    for arg, d, limit in (("q", spec.head_dim_qk, max_qk), ("v", spec.head_dim_v, max_v)):
        if d > limit:
            raise ValueError(
                f"{arg}: head dim {d} is over the {name} backend's limit of {limit} "
                f"(the cpu backend takes Dqk <= {head_dim_limits('cpu')[0]}, Dv <= {head_dim_limits('cpu')[1]})"
            )


def fold_key_ranges(spec: AttentionSpec, inputs: AttentionInputs, backend):
    """key_start/key_len as part of the mask, for a backend without native ranges.

    The ranges become a `[B, 1, 1, Nk]` bool keep-mask (O(B * Nk), never
    N x N), AND-ed with a bool mask, or turned into -inf entries of an
    additive one (-inf logits are dropped keys). Plain MLX ops outside the
    differentiable function, so an additive mask's gradient flows back
    through them to the caller's mask.
    """
    if not spec.has_key_range or getattr(backend, "NATIVE_KEY_RANGES", False):
        return spec, inputs
    keep = key_range_keep(inputs.key_start, inputs.key_len, spec.seqlen_k)
    if spec.mask_kind == "none":
        mask, kind = keep, "bool"
    elif spec.mask_kind == "bool":
        mask, kind = inputs.mask & keep, "bool"
    else:
        dropped = mx.array(-float("inf"), inputs.mask.dtype)
        mask, kind = mx.where(keep, inputs.mask, dropped), "additive"
    inputs = dataclasses.replace(inputs, mask=mask, key_start=None, key_len=None)
    return spec._replace(mask_kind=kind, has_key_range=False), inputs
