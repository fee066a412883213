"""The Metal attention backend run on the CPU through the MSL emulation harness.

`forward` and `gradients` mean what tests/backends.py's functions mean for a
real device; they validate like the public op (mlx_flash._spec) and call
mlx_flash/backends/metal.py directly with the harness as kernel factory, so
the wrapper code and the kernel sources are exactly those that run on an
Apple GPU. Only the autograd plumbing of mlx_flash.attention is bypassed: the
backward kernels are called with the cotangents the public op's vjp would get.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

from mlx_flash import attention as _attention
from mlx_flash import dispatch as _dispatch
from mlx_flash._spec import validate_attention, validate_attention_varlen
from mlx_flash.backends import metal as _metal

from . import harness


@contextlib.contextmanager
def emulated(poison: bool = True):
    """Run the Metal backend through the harness (outputs poisoned with NaN)."""
    previous = _metal.set_kernel_factory(harness.metal_kernel)
    previous_poison = _metal.POISON_OUTPUTS
    _metal.POISON_OUTPUTS = poison
    try:
        yield _metal
    finally:
        _metal.set_kernel_factory(previous)
        _metal.POISON_OUTPUTS = previous_poison


def _as_bhnd(x):
    """[total, H, D] -> the [1, H, total, D] view backends get for varlen."""
    return x.transpose(1, 0, 2)[None]


def _from_bhnd(x):
    return x[0].transpose(1, 0, 2)


def _validate(q, k, v, varlen, options):
    if varlen is None:
        spec, inputs = validate_attention(q, k, v, **options)
        # As the public op does before calling a backend without native key ranges.
        spec, inputs = _dispatch.fold_key_ranges(spec, inputs, _metal)
        return spec, inputs, (q, k, v)
    spec, inputs = validate_attention_varlen(q, k, v, *varlen, **options)
    return spec, inputs, (_as_bhnd(q), _as_bhnd(k), _as_bhnd(v))


def forward(q, k, v, *, varlen=None, **options):
    """(out, lse) like flash_attention(..., return_lse=True), or the varlen
    entry when varlen=(cu_seqlens_q, cu_seqlens_k[, max_q, max_k])."""
    spec, inputs, (qb, kb, vb) = _validate(q, k, v, varlen, options)
    with emulated():
        out, lse = _metal.attention_forward(qb, kb, vb, spec, inputs, None)
    mx.eval(out, lse)
    if varlen is None:
        return out, lse
    return _from_bhnd(out), lse[0]


def gradients(q, k, v, dout, *, varlen=None, dlse=None, wrt=("q", "k", "v"), **options):
    """Cotangents of sum(out * dout) (+ sum(lse * dlse) over finite lse) with
    respect to the names in `wrt` (q, k, v, sinks, mask), as a dict."""
    spec, inputs, (qb, kb, vb) = _validate(q, k, v, varlen, options)
    with emulated():
        out, lse = _metal.attention_forward(qb, kb, vb, spec, inputs, None)
        # The public op hands its vjp dout in out's dtype and dlse as float32.
        do = (dout if varlen is None else _as_bhnd(dout)).astype(out.dtype)
        dl = None
        if dlse is not None:
            dl = (dlse if varlen is None else dlse[None]).astype(mx.float32)
            dl = mx.where(mx.isinf(lse), 0.0, dl)
        dq, dk, dv = _metal.attention_backward(qb, kb, vb, out, lse, do, dl, spec, inputs, None)
    grads = {"q": dq, "k": dk, "v": dv}
    if varlen is not None:
        grads = {name: _from_bhnd(g) for name, g in grads.items()}
    delta = _attention._row_delta(out, do, dl)
    if "sinks" in wrt:
        grads["sinks"] = _attention._sinks_grad(inputs.sinks, lse, delta).astype(options["sinks"].dtype)
    if "mask" in wrt:
        if spec.mask_kind != "additive":
            raise ValueError("gradients: wrt 'mask' needs an additive (float) mask")
        dmask = _attention._additive_mask_grad(qb, kb, vb, lse, do, delta, spec, inputs)
        grads["mask"] = dmask.reshape(options["mask"].shape)
    result = {name: grads[name] for name in wrt}
    mx.eval(*result.values())
    return result
