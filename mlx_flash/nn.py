"""mlx.nn layers on fp8 weights.

`FP8Linear` keeps a Linear layer's weight as fp8 codes (uint8, one byte a
weight) with one float32 scale per output channel, and computes
`x @ (decode(W) * scale)^T + bias` with `matmul2d`, decoding inside the
kernel. The fp8 weight and its scale are frozen constants; the layer is
differentiable with respect to its input (and its bias), so adapters such as
LoRA train on top of it. `convert_to_fp8(model)` swaps a model's
`nn.Linear` layers for `FP8Linear` in place.

With `activations="e4m3"` (or "e5m2") a layer also quantizes its input, one
scale a row (token), in calls of more than COMPILE_MAX_ROWS rows (prefill,
training batches) and runs fp8 x fp8: on Hopper the native fp8 tensor cores
at twice the 16-bit rate. Opt-in: the input's rounding to fp8 moves results.
"""

from __future__ import annotations

import functools
import math
import os
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from . import fp8
from .dispatch import cuda_available
from .matmul import matmul2d

_FROZEN = ("weight", "scale")
# Inputs with at most this many rows (a decode step) run matmul2d through
# mx.compile: a decode step's product takes tens of microseconds on a GPU,
# about what matmul2d's Python (argument checks, dispatch, the kernel
# wrapper) costs per call; a compiled call traces that once per shape and
# replays the graph. MLX_FLASH_FP8LINEAR_COMPILE=0 turns it off.
COMPILE_MAX_ROWS = 16
_COMPILE = os.environ.get("MLX_FLASH_FP8LINEAR_COMPILE", "1")
if _COMPILE not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_FP8LINEAR_COMPILE must be 0 or 1, got {_COMPILE!r}")
# The few-rows path on MLX's CUDA backend ("direct", the default;
# MLX_FLASH_FP8LINEAR_PATH=matmul2d for the general call): a call of at most
# COMPILE_MAX_ROWS fp16/bf16 rows whose K is a multiple of 16 is one kernel
# node over the layer's own arrays (cuda_matmul.linear_few_rows) inside a
# custom function whose vjp is matmul2d's, compiled as above. matmul2d's graph
# for the same product has about seven nodes (reshapes, the kernel, the
# custom function's node) and MLX's evaluation loop visits each. Same kernel
# and plan, so bit-identical results (tested on the H200). H200, 16
# Llama-1B-shaped blocks of projections at M = 1 (bench.cuda_matmul calls):
# 8.9 us per call in a pipelined step vs 11.3 through matmul2d (fp16
# nn.Linear: 6.7; benchmarks/results/matmul_cuda_nvidia_h200_s8.json).
_PATH = os.environ.get("MLX_FLASH_FP8LINEAR_PATH", "direct")
if _PATH not in ("matmul2d", "direct"):
    raise ValueError(f"MLX_FLASH_FP8LINEAR_PATH must be 'matmul2d' or 'direct', got {_PATH!r}")


# Quantized activations (FP8Linear(..., activations=fmt)): taken by calls of
# more rows than this. Fewer rows (a decode step) read the weight at memory
# bandwidth with 16-bit activations; quantizing them there would add a kernel
# a call and buy nothing, so those calls compute as without the option.
ACT_QUANT_MIN_ROWS = COMPILE_MAX_ROWS + 1


def _quantize_activations(x2, fmt):
    """(codes, scale [rows, 1]) of a 2-D x, one scale a row: with amax the
    largest finite |x| of a row, scale = amax / max_finite(fmt) and codes =
    fp8.encode(x * (max_finite / amax)) (a multiply, not fp8.quantize's
    division: the CUDA kernel's one instruction a value; rows of amax below
    2^-64 scaled by 2^64 first). A row with no finite nonzero value gets
    scale 1; a row holding an inf scale +inf and factor 0 (finite values
    encode as zeros, infs as NaN), so its outputs come out non-finite as the
    16-bit product's would, not saturated at 448 x scale. On MLX's CUDA
    backend one kernel (cuda_matmul.quantize_rows, the same bits)."""
    if mx.default_device() == mx.gpu and cuda_available():
        return _cuda_matmul().quantize_rows(x2, fmt)
    if x2.size == 0:
        return fp8.quantize(x2, fmt, axis=0)
    x32 = x2.astype(mx.float32)
    top = mx.array(fp8.max_finite(fmt), mx.float32)
    amax = fp8._finite_amax(x32, axis=1, keepdims=True)
    inf_rows = mx.any(mx.isinf(x32), axis=1, keepdims=True)
    some = amax > 0
    # Below 2^-64 (float32 inputs) the row and amax are first times 2^64
    # (exact): top / amax could overflow to inf, and an inf factor makes zeros NaN.
    tiny = amax < np.float32(2.0 ** -64)
    pre = mx.where(tiny, np.float32(2.0 ** 64), np.float32(1.0))
    a2 = amax * pre
    scale = mx.where(some, (a2 / top) * mx.where(tiny, np.float32(2.0 ** -64), np.float32(1.0)), 1.0)
    scale = mx.where(inf_rows, mx.array(float("inf"), mx.float32), scale)
    factor = mx.where(inf_rows, 0.0, mx.where(some, top / mx.where(some, a2, 1.0), 1.0))
    return fp8.encode((x32 * pre) * factor, fmt), scale.astype(mx.float32)


# Projections that read one input (a transformer block's q / k / v, its gate /
# up) share one quantization of it: the layer keeps the last input it
# quantized by a weak reference, with its codes and scales, and a call that
# gets that very array object again (same format and device) takes
# them instead of quantizing again. Same bits as quantizing each time (it is
# the same computation on the same array). The entry goes as soon as that
# input is freed, and a call with any other input replaces it, so at most
# one input's codes are held. False quantizes at every call.
SHARE_ACT_QUANT = True
_shared_quant = None  # (weakref to x, (format, device), codes, scales) of the last quantized input


def _forget_shared_quant(ref):
    global _shared_quant
    entry = _shared_quant
    if entry is not None and entry[0] is ref:
        _shared_quant = None


def _input_quantization(x, x2, fmt):
    """(codes, scales) of x2 (x as [rows, K]) by _quantize_activations, taken
    from the last call's where x is the same array object (SHARE_ACT_QUANT).
    Both outside the layer's custom function, so gradients stop at them
    (the vjp is straight through to x)."""
    global _shared_quant
    key = (fmt, mx.default_device())  # x2's shape follows from x
    entry = _shared_quant
    if SHARE_ACT_QUANT and entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2], entry[3]
    codes, xs = (mx.stop_gradient(a) for a in _quantize_activations(x2, fmt))
    if SHARE_ACT_QUANT:
        _shared_quant = (weakref.ref(x, _forget_shared_quant), key, codes, xs)
    return codes, xs


@functools.lru_cache(maxsize=None)
def _act_quant_function(fmt: str, act_fmt: str):
    """x [rows, K] -> (q(x) @ (decode(W) * scale)^T) in x's dtype, q(x) the
    rows quantized by _quantize_activations (codes times the row's scale): fp8 x
    fp8 through matmul2d with fast_accumulation (native fp8 wgmma on Hopper:
    sums promoted to fp32 every 128 K; exact elsewhere). The codes and scales
    come in from _input_quantization (shared by the layers reading one input).
    Its vjp is the 16-bit layer's (straight through the activations'
    rounding), so adapters train on it as on the plain layer."""

    @mx.custom_function
    def linear(x, weight, scale, codes, xs):
        return matmul2d(codes, weight, a_fmt=act_fmt, b_fmt=fmt, a_scale=xs, b_scale=scale.reshape(1, -1),
                        transpose_b=True, out_dtype=x.dtype, fast_accumulation=True)

    @linear.vjp
    def linear_vjp(primals, cotangent, output):
        x, weight, scale, codes, xs = primals
        dx = _input_grad(x, weight, scale, fmt, cotangent)
        return dx, mx.zeros_like(weight), mx.zeros_like(scale), mx.zeros_like(codes), mx.zeros_like(xs)

    return linear


def _forward(x, weight, scale, bias, fmt):
    y = matmul2d(x, weight, b_fmt=fmt, b_scale=scale.reshape(1, -1), transpose_b=True, out_dtype=x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


def _input_grad(x, weight, scale, fmt, cotangent):
    """The layer's gradient with respect to x: matmul2d's vjp (the direct
    path's and the quantized activations' custom functions both use it)."""
    _, (dx,) = mx.vjp(lambda x: _forward(x, weight, scale, None, fmt), [x], [cotangent])
    return dx


@functools.lru_cache(maxsize=None)
def _compiled_forward(fmt: str, has_bias: bool, stream: str):
    """One compiled forward per (format, bias present, default stream): a
    trace holds the backend and stream matmul2d chose while tracing, so a
    call under another default device or stream gets its own; mx.compile
    itself keys its traces by shape and dtype. `stream` is the stream's
    str(): mx.default_stream returns a new object per call whose hash is its
    identity, so keying by the object missed every time (a new compiled
    function, traced anew, on every call)."""
    if has_bias:
        return mx.compile(lambda x, weight, scale, bias: _forward(x, weight, scale, bias, fmt))
    return mx.compile(lambda x, weight, scale: _forward(x, weight, scale, None, fmt))


@functools.lru_cache(maxsize=None)
def _cuda_matmul():
    from .backends import cuda_matmul

    return cuda_matmul


@functools.lru_cache(maxsize=None)
def _direct_function(fmt: str, has_bias: bool):
    """The direct path's differentiable call, one per (format, bias present):
    forward one kernel (plus the bias add), vjp through matmul2d's."""
    cuda_matmul = _cuda_matmul()

    @mx.custom_function
    def linear(x, weight, scale, *bias):
        y = cuda_matmul.linear_few_rows(x, weight, scale, fmt)
        return y + bias[0].astype(y.dtype) if has_bias else y

    @linear.vjp
    def linear_vjp(primals, cotangent, output):
        x, weight, scale, *bias = primals
        dx = _input_grad(x, weight, scale, fmt, cotangent)
        grads = (dx, mx.zeros_like(weight), mx.zeros_like(scale))
        if has_bias:
            g = cotangent.reshape(-1, cotangent.shape[-1]).astype(mx.float32).sum(axis=0)
            grads += (g.astype(bias[0].dtype),)
        return grads

    return linear


# Compiled direct-path functions per (format, bias present): a list of
# (stream, function) pairs, the stream compared with == (index and device;
# cheaper per call than formatting its str() as _compiled_forward's key).
_DIRECT_TRACES: dict = {}


def _compiled_direct(fmt: str, has_bias: bool, stream):
    """The direct path through mx.compile (with MLX_FLASH_FP8LINEAR_COMPILE=1,
    the default): a call replays the traced kernel and custom-function nodes
    in C++ instead of running the Python forward (the kernel wrapper's shape
    checks, the custom function's Python, MLX's kernel-call assembly: ~10 us a
    call on the H200's host). One per default stream, as _compiled_forward."""
    entries = _DIRECT_TRACES.get((fmt, has_bias))
    if entries:
        for known, fn in entries:
            if known == stream:
                return fn
    fn = mx.compile(_direct_function(fmt, has_bias))
    _DIRECT_TRACES.setdefault((fmt, has_bias), []).append((stream, fn))
    return fn


_compiled_direct.cache_clear = _DIRECT_TRACES.clear


_HALF_TYPES = (mx.float16, mx.bfloat16)

# Whether the direct path takes an (x shape, x dtype, weight shape, weight
# dtype): linear_few_rows_supported's answer (a function of these alone), kept
# (one lookup a call instead of its property reads and comparisons).
_DIRECT_SHAPES: dict = {}
_DIRECT_SHAPES_MAX = 4096


def _direct_takes(x, weight) -> bool:
    key = (x.shape, x.dtype, weight.shape, weight.dtype)
    ok = _DIRECT_SHAPES.get(key)
    if ok is None:
        if len(_DIRECT_SHAPES) >= _DIRECT_SHAPES_MAX:
            _DIRECT_SHAPES.clear()
        ok = _DIRECT_SHAPES[key] = x.dtype in _HALF_TYPES and _cuda_matmul().linear_few_rows_supported(x, weight)
    return ok


class FP8Linear(nn.Module):
    """`y = x @ (dequant(weight) * scale)^T + bias` with an fp8 weight.

    Args:
      input_dims, output_dims: as `nn.Linear`.
      bias: whether the layer has a (trainable, float) bias.
      fmt: "e4m3" (default) or "e5m2".
      per_channel: one scale per output channel (default) or one per tensor.
      activations: None (default: the input stays as it is) or an fp8
        format ("e4m3", "e5m2"): calls of more than COMPILE_MAX_ROWS rows
        quantize the input to it, one scale a row (amax / max finite), and
        compute fp8 x fp8 (on Hopper the native fp8 tensor cores, sums
        promoted to fp32 every 128 K). The rounding of the input moves the
        result (e4m3: ~2^-4 of an element, relative); calls of fewer rows
        (decode steps) compute as without it. Gradients pass straight
        through the rounding.

    A new layer starts from `nn.Linear`'s initialisation, quantised; use
    `FP8Linear.from_linear` to convert a trained layer.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, fmt: str = "e4m3",
                 per_channel: bool = True, activations=None):
        super().__init__()
        bound = math.sqrt(1.0 / input_dims)
        w = mx.random.uniform(-bound, bound, (output_dims, input_dims))
        self.fmt = fmt
        self.activations = _check_activations(activations)
        self.weight, self.scale = self._quantize(w, fmt, per_channel)
        if bias:
            self.bias = mx.random.uniform(-bound, bound, (output_dims,))
        self.freeze(keys=list(_FROZEN), recurse=False)

    @staticmethod
    def _quantize(w, fmt, per_channel):
        data, scale = fp8.quantize(w, fmt=fmt, axis=0 if per_channel else None)
        return data, scale.reshape(-1, 1)  # [out, 1] or [1, 1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "e4m3", per_channel: bool = True,
                    activations=None) -> "FP8Linear":
        """An FP8Linear holding `linear`'s weight in fp8 (its bias as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an mlx.nn.Linear, got {type(linear).__name__}")
        output_dims, input_dims = linear.weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.fmt = fmt
        layer.activations = _check_activations(activations)
        layer.weight, layer.scale = cls._quantize(linear.weight, fmt, per_channel)
        if "bias" in linear:
            layer.bias = linear.bias
        layer.freeze(keys=list(_FROZEN), recurse=False)
        return layer

    def unfreeze(self, *args, **kwargs):
        # The fp8 codes are not trainable (an optimiser step would leave the
        # uint8 grid); keep them frozen whatever the caller unfreezes.
        super().unfreeze(*args, **kwargs)
        self.freeze(keys=list(_FROZEN), recurse=False)
        return self

    def dequantized_weight(self, dtype=mx.float32) -> mx.array:
        """The weight the layer computes with, `[output_dims, input_dims]`."""
        return fp8.dequantize(self.weight, self.scale, self.fmt, dtype)

    def _extra_repr(self) -> str:
        out_dims, in_dims = self.weight.shape
        act = f", activations={self.activations}" if self.activations else ""
        return f"input_dims={in_dims}, output_dims={out_dims}, bias={'bias' in self}, fmt={self.fmt}{act}"

    def __call__(self, x: mx.array) -> mx.array:
        # Module is a dict: item access skips Module.__getattr__ (~0.5 us a read).
        bias = self["bias"] if "bias" in self else None
        weight, scale = self["weight"], self["scale"]
        act = self.activations
        if act is not None and x.ndim and x.shape[-1] and x.size // x.shape[-1] >= ACT_QUANT_MIN_ROWS:
            x2 = x.reshape(-1, x.shape[-1])
            y = _act_quant_function(self.fmt, act)(x2, weight, scale, *_input_quantization(x, x2, act))
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y if bias is None else y + bias.astype(y.dtype)
        if _PATH == "direct":
            device = mx.default_device()
            if device == mx.gpu and cuda_available() and _direct_takes(x, weight):
                args = (x, weight, scale) if bias is None else (x, weight, scale, bias)
                if _COMPILE == "1":
                    return _compiled_direct(self.fmt, bias is not None, mx.default_stream(device))(*args)
                return _direct_function(self.fmt, bias is not None)(*args)
        rows = x.size // x.shape[-1] if x.ndim and x.shape[-1] else 0
        if _COMPILE == "1" and 0 < rows <= COMPILE_MAX_ROWS:
            args = (x, weight, scale) + ((bias,) if bias is not None else ())
            stream = str(mx.default_stream(mx.default_device()))
            return _compiled_forward(self.fmt, bias is not None, stream)(*args)
        return _forward(x, weight, scale, bias, self.fmt)


def _check_activations(activations):
    if activations is not None and activations not in fp8.FP8_FORMATS:
        raise ValueError(f"activations: expected None or one of {sorted(fp8.FP8_FORMATS)}, got {activations!r}")
    return activations


def convert_to_fp8(model: nn.Module, fmt: str = "e4m3", per_channel: bool = True, predicate=None,
                   activations=None) -> nn.Module:
    """Replace `model`'s `nn.Linear` layers with `FP8Linear`, in place.

    `predicate(path, module) -> bool` picks which Linear layers to convert
    (default: all); `activations` as FP8Linear's. Returns the model.
    """
    _check_activations(activations)

    def convert(path, module):
        if isinstance(module, nn.Linear) and (predicate is None or predicate(path, module)):
            return FP8Linear.from_linear(module, fmt=fmt, per_channel=per_channel, activations=activations)
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return model


__all__ = ["FP8Linear", "convert_to_fp8"]
