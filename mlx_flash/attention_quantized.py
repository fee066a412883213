"""Attention straight from an affine-quantized K/V cache (mlx-lm's kv_bits).

`flash_attention_quantized` validates (`_quant_spec.py`), then calls a
`mx.custom_function` whose forward dequantizes K and V tile by tile inside
the backend kernel (`dispatch.py`; CPU: csrc/attention_quant_cpu_kernel.cpp): no full-precision copy of
the cache ever exists. k and v are constants (a cache); the vjp gives q's
gradient through a fused kernel (no N x N array), and the sinks' and an
additive mask's through the same formulas as `flash_attention`.

Backends: the CPU, Metal (metal_src/attention_quant.h, backends/metal_quant.py)
and CUDA (cuda_src/attention_quant*.cu, backends/cuda_quant.py); a backend
without the kernel raises (never a silent fallback to a materialised path).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import dispatch
from .backends import cuda_host
from ._quant_spec import QuantSpec, validate_attention_quantized
from ._spec import AttentionInputs
from .attention import _additive_mask_grad, _row_delta, _sinks_grad

_EXTRA_FIELDS = ("mask", "alibi", "sinks")


def dequantize_kv(triple, qspec: QuantSpec, dtype=None):
    """`mx.dequantize` of a (data, scales, biases) triple (optionally cast)."""
    x = mx.dequantize(*triple, group_size=qspec.group_size, bits=qspec.bits)
    return x if dtype is None else x.astype(dtype)


@functools.lru_cache(maxsize=256)
def _differentiable(qspec: QuantSpec, names: tuple, backend_name: str, stream):
    """One custom_function per (spec, present extras, backend, stream)."""
    backend = dispatch.backend_for_name(backend_name)
    spec = qspec.attention

    def rebuild(extras) -> AttentionInputs:
        return AttentionInputs(**dict(zip(names, extras))) if names else AttentionInputs()

    @mx.custom_function
    def attention(q, kw, ks, kb, vw, vs, vb, *extras):
        return backend.quantized_attention_forward(q, (kw, ks, kb), (vw, vs, vb), qspec, rebuild(extras), stream)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, kw, ks, kb, vw, vs, vb, *extras = primals
        dout, dlse = cotangents
        out, lse = outputs
        inputs = rebuild(extras)
        delta = _row_delta(out, dout, dlse)
        dq = backend.quantized_attention_backward(q, (kw, ks, kb), (vw, vs, vb), lse, delta, dout, qspec, inputs,
                                                  stream)
        grads = []
        for name, x in zip(names, extras):
            if name == "sinks":
                grads.append(_sinks_grad(x, lse, delta))
            elif name == "mask" and spec.mask_kind == "additive":
                # The mask is N x N, so its gradient is too (built only when asked
                # for): this one place dequantizes K and V in full.
                k = dequantize_kv((kw, ks, kb), qspec, q.dtype)
                v = dequantize_kv((vw, vs, vb), qspec, q.dtype)
                grads.append(_additive_mask_grad(q, k, v, lse, dout, delta, spec, inputs))
            else:
                grads.append(mx.zeros_like(x))  # bool masks and ALiBi slopes are constants
        # k and v are constants (a cache): zero cotangents, stop_gradient semantics.
        constants = [mx.zeros_like(a) for a in (kw, ks, kb, vw, vs, vb)]
        return (dq, *constants, *grads)

    return attention


# The C++ record/replay of repeated CUDA calls (backends/cuda_host.py), or None.
_HOST = cuda_host.ACTIVE


def flash_attention_quantized(q, k, v, *, bits, group_size, scale=None, mask=None, causal=False,
                              window=None, softcap=None, alibi_slopes=None, sinks=None,
                              return_lse=False, stream=None):
    """Exact attention over an affine-quantized K/V cache, dequantized inside the kernel.

    Args:
      q: `[B, Hq, Nq, D]`, float32/float16/bfloat16.
      k, v: each the `(data, scales, biases)` triple that
        `mx.quantize(x, group_size=group_size, bits=bits)` returns for x of
        shape `[B, Hkv, Nk, D]` (`[B, Hkv, Nk, Dv]` for v; mode "affine",
        quantized along the head dim), exactly what mlx-lm's
        `QuantizedKVCache` stores. Views (e.g. the cache's `[..., :offset, :]`
        slices) are read through their strides, never copied.
      bits: 2, 3, 4, 5, 6 or 8; group_size: 32, 64 or 128 (as given to
        `mx.quantize`).
      scale, mask, causal, window, softcap, alibi_slopes, sinks, return_lse,
        stream: as in `flash_attention` (GQA included; Dv may differ from D).

    Returns:
      `out` `[B, Hq, Nq, Dv]` in q's dtype (or `(out, lse)`), equal to
      `flash_attention(q, mx.dequantize(*k, ...), mx.dequantize(*v, ...), ...)`
      to the usual tolerance (the kernel dequantizes to fp32, without rounding
      K and V to the scales' dtype first).

    Gradients flow to q, sinks and an additive mask. k and v are constants
    (stop_gradient semantics: their cotangents are zero).

    Backends: CPU, Metal and CUDA.
    """
    key = None
    if _HOST is not None:  # a repeated call is built in C++ (backends/cuda_host.py)
        key = _HOST.attention_quantized(q, k, v, bits, group_size, scale, mask, causal, window, softcap,
                                        alibi_slopes, sinks, return_lse, stream)
        if key is not None and key.__class__ is not bytes:
            return key
        if key is not None:
            slots = [q, *k, *v, mask, alibi_slopes, sinks]  # the extension checked k and v are triples
    qspec, inputs, k, v = validate_attention_quantized(
        q, k, v, bits=bits, group_size=group_size, scale=scale, mask=mask, causal=causal,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )
    backend = dispatch.backend_name(stream)
    if backend not in dispatch.QUANTIZED_KV_BACKENDS:
        raise NotImplementedError(
            f"flash_attention_quantized: no {backend} kernel yet (attention from a quantized KV cache "
            f"runs on the CPU, Metal and CUDA); pass stream=mx.cpu, or dequantize k and v and call "
            f"flash_attention"
        )
    if inputs.mask is None and inputs.alibi is None and inputs.sinks is None:
        names, extras = (), ()  # the usual call: no getattr loops
    else:
        names = tuple(n for n in _EXTRA_FIELDS if getattr(inputs, n) is not None)
        extras = [getattr(inputs, n) for n in names]
    fn = _differentiable(qspec, names, backend, stream)
    if key is None:
        out, lse = fn(q, *k, *v, *extras)
    else:  # first call of its key: the Python path, recorded
        out, lse, _ = cuda_host.recorded(key, slots, lambda: fn(q, *k, *v, *extras))
    return (out, lse) if return_lse else out


def reference_attention_quantized(q, k, v, *, bits, group_size, **options):
    """The materialised oracle: `reference.flash_attention` over `mx.dequantize`d k and v."""
    from . import reference

    qspec, _, k, v = validate_attention_quantized(q, k, v, bits=bits, group_size=group_size)
    return reference.flash_attention(q, dequantize_kv(k, qspec, q.dtype), dequantize_kv(v, qspec, q.dtype), **options)
