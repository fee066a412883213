"""flash_attention_quantized's Metal kernels run on the CPU through the harness.

`forward` and `gradients` validate like the public op (_quant_spec) and call
mlx_flash/backends/metal_quant.py directly with the harness as kernel
factory (attention.emulated), so the wrapper code and the kernel source are
exactly those that run on an Apple GPU. Only the autograd plumbing of
mlx_flash.attention_quantized is bypassed: the dq kernel gets the
cotangents the op's vjp would hand it, and dsinks / dmask come from the same
formulas the vjp uses.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_flash import attention as _attention
from mlx_flash._quant_spec import validate_attention_quantized
from mlx_flash.attention_quantized import dequantize_kv
from mlx_flash.backends import metal_quant

from .attention import emulated


def forward(q, k, v, *, bits, group_size, **options):
    """(out, lse) like flash_attention_quantized(..., return_lse=True)."""
    qspec, inputs, k, v = validate_attention_quantized(q, k, v, bits=bits, group_size=group_size, **options)
    with emulated():
        out, lse = metal_quant.quantized_attention_forward(q, k, v, qspec, inputs, None)
        mx.eval(out, lse)
    return out, lse


def gradients(q, k, v, dout, *, bits, group_size, wrt=("q",), **options):
    """(out, lse, grads): cotangents of sum(out * dout) w.r.t. the names in
    `wrt` (q, sinks, mask) as a dict."""
    qspec, inputs, k, v = validate_attention_quantized(q, k, v, bits=bits, group_size=group_size, **options)
    with emulated():
        out, lse = metal_quant.quantized_attention_forward(q, k, v, qspec, inputs, None)
        do = dout.astype(out.dtype)
        delta = _attention._row_delta(out, do, None)
        dq = metal_quant.quantized_attention_backward(q, k, v, lse, delta, do, qspec, inputs, None)
        mx.eval(out, lse, dq)
    grads = {"q": dq}
    if "sinks" in wrt:
        grads["sinks"] = _attention._sinks_grad(inputs.sinks, lse, delta)
    if "mask" in wrt:
        kd, vd = dequantize_kv(k, qspec, q.dtype), dequantize_kv(v, qspec, q.dtype)
        grads["mask"] = _attention._additive_mask_grad(q, kd, vd, lse, do, delta, qspec.attention, inputs).reshape(
            options["mask"].shape)
    result = {name: grads[name] for name in wrt}
    mx.eval(*result.values())
    return out, lse, result
