"""The public attention op: validation -> differentiable function -> backend.

`flash_attention` checks its arguments (`_spec.py`), then calls a
`mx.custom_function` whose forward and vjp are the fused kernels of the
backend that owns the call's device (`dispatch.py`). The backward recomputes
from (q, k, v, out, lse) and never holds an N x N array, except for the
gradient of an additive mask, which is itself N x N.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import dispatch
from .backends import cuda_host
from ._spec import AttentionInputs, AttentionSpec, validate_attention, validate_attention_varlen
from .reference import attention_logits

# Optional inputs, in the order they follow (q, k, v) in the differentiable function.
_EXTRA_FIELDS = ("mask", "alibi", "sinks", "block_mask", "cu_seqlens_q", "cu_seqlens_k", "key_start", "key_len")


def _pack_extras(inputs: AttentionInputs):
    if (inputs.mask is None and inputs.alibi is None and inputs.sinks is None and inputs.block_mask is None
            and inputs.cu_seqlens_q is None and inputs.cu_seqlens_k is None and inputs.key_start is None):
        return (), []  # the usual call, without a tuple built by getattr
    names = tuple(n for n in _EXTRA_FIELDS if getattr(inputs, n) is not None)
    return names, [getattr(inputs, n) for n in names]


def _row_delta(out, dout, dlse):
    """delta_i = dO_i . O_i - dlse_i (float32), as in FlashAttention-2's backward."""
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    return delta if dlse is None else delta - dlse


def _sinks_grad(sinks, lse, delta):
    """d loss / d sink_h = -sum_{b,i} exp(sink_h - lse_bhi) * delta_bhi.

    A -inf sink is a dropped logit: it adds nothing, whatever delta holds."""
    sinks = sinks[None, :, None]
    p_sink = mx.exp(sinks - lse)
    return -mx.sum(mx.where(sinks == -mx.inf, 0.0, p_sink * delta), axis=(0, 2))


def _additive_mask_grad(q, k, v, lse, dout, delta, spec, inputs):
    """dS = P * (dP - delta), summed to the mask's broadcast shape.

    The mask is itself N x N, so its gradient is too; it is built only when
    the caller asks for it (MLX evaluates lazily). Dropped pairs (and -inf
    logits) give exactly 0 by a select, so a NaN in a dropped key's v or a
    masked row's dO does not leak.
    """
    s, keep = attention_logits(q, k, spec, inputs)
    keep = keep & (s != -mx.inf) & (lse[..., None] != -mx.inf)
    probs = mx.exp(s - lse[..., None])
    v = v if spec.group_size == 1 else mx.repeat(v, spec.group_size, axis=1)
    dp = dout.astype(mx.float32) @ v.astype(mx.float32).swapaxes(-1, -2)
    ds = mx.where(keep, probs * (dp - delta[..., None]), 0.0)
    mask = inputs.mask
    axes = tuple(a for a in range(4) if mask.shape[a] == 1 and ds.shape[a] != 1)
    if axes:
        ds = mx.sum(ds, axis=axes, keepdims=True)
    return ds.astype(mask.dtype)


@functools.lru_cache(maxsize=256)
def _differentiable(spec: AttentionSpec, names: tuple, backend_name: str, stream):
    """One custom_function per (spec, present extras, backend, stream)."""
    backend = dispatch.backend_for_name(backend_name)

    def rebuild(extras) -> AttentionInputs:
        return AttentionInputs(**dict(zip(names, extras))) if names else AttentionInputs()

    @mx.custom_function
    def attention(q, k, v, *extras):
        return backend.attention_forward(q, k, v, spec, rebuild(extras), stream)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v, *extras = primals
        dout, dlse = cotangents
        out, lse = outputs
        inputs = rebuild(extras)
        dq, dk, dv = backend.attention_backward(q, k, v, out, lse, dout, dlse, spec, inputs, stream)
        grads = []
        for name, x in zip(names, extras):
            if name == "sinks":
                grads.append(_sinks_grad(x, lse, _row_delta(out, dout, dlse)))
            elif name == "mask" and spec.mask_kind == "additive":
                grads.append(_additive_mask_grad(q, k, v, lse, dout, _row_delta(out, dout, dlse), spec, inputs))
            else:
                # Bool masks, offsets, block masks and ALiBi slopes are constants.
                grads.append(mx.zeros_like(x))
        return (dq, dk, dv, *grads)

    return attention


# Head dims every backend takes (wider calls ask the backend which it takes).
_COMMON_HEAD_DIM = min(dispatch.DEFAULT_HEAD_DIM_LIMITS)


def _run(q, k, v, spec, inputs, stream):
    key, extras = _function_key(spec, inputs, stream)
    return _differentiable(*key)(q, k, v, *extras)


def _function_key(spec, inputs, stream):
    """(the _differentiable key of a validated call, the custom function's optional inputs)."""
    name = dispatch.backend_name(stream)
    if spec.head_dim_qk > _COMMON_HEAD_DIM or spec.head_dim_v > _COMMON_HEAD_DIM:
        # Every backend takes the default widths; only wider calls ask which does.
        dispatch.check_head_dims(spec, name)
    if spec.has_key_range:
        spec, inputs = dispatch.fold_key_ranges(spec, inputs, dispatch.backend_for_name(name))
    names, extras = _pack_extras(inputs)
    return (spec, names, name, stream), extras


# The C++ record/replay of repeated CUDA calls (backends/cuda_host.py), or None.
_HOST = cuda_host.ACTIVE


def flash_attention(q, k, v, *, scale=None, mask=None, causal=False, window=None, softcap=None,
                    alibi_slopes=None, sinks=None, block_mask=None, block_size=None,
                    key_start=None, key_len=None, return_lse=False, stream=None):
    """Exact attention with a fused (IO-aware) forward and backward.

    Args:
      q: `[B, Hq, Nq, D]`; k: `[B, Hkv, Nk, D]`; v: `[B, Hkv, Nk, Dv]` with
        Hq a multiple of Hkv (GQA/MQA), D in 1..576 and Dv in 1..512 on
        the CPU and CUDA (1..256 on Metal for now), float32/float16/bfloat16.
      scale: logit scale, default `1/sqrt(D)`.
      mask: bool (True = keep) or additive array broadcastable to
        `[B, Hq, Nq, Nk]`.
      causal: drop keys `j > i + Nk - Nq` (bottom-right alignment).
      window: `(left, right)` local attention around the aligned position;
        None or -1 on a side means unbounded.
      softcap: `s = softcap * tanh(s / softcap)`.
      alibi_slopes: `[H]` or `[B, H]`; subtracts `slope * |p_i - j|`.
      sinks: `[H]` logits that join each row's softmax denominator.
      block_mask: bool, broadcastable to
        `[B, H, ceil(Nq/bq), ceil(Nk/bk)]` with `block_size=(bq, bk)`
        (default (64, 64)); dropped blocks are skipped.
      key_start, key_len: `[B]` integer arrays, per-batch valid keys
        `key_start[b] <= j < key_start[b] + key_len[b]` (e.g. left padding);
        the others are dropped like False entries of a bool mask. Either
        alone means 0 / to the end. Never an N x N array: the CPU kernels
        skip the key tiles outside each range, the GPU backends fold the
        ranges into a `[B, 1, 1, Nk]` mask.
      return_lse: also return the float32 log-sum-exp `[B, Hq, Nq]`.
      stream: stream or device to run on (default: the default device).

    Returns:
      `out` `[B, Hq, Nq, Dv]` in q's dtype, or `(out, lse)`.
    """
    key = None
    if _HOST is not None:  # a repeated call is built in C++ (backends/cuda_host.py)
        key = _HOST.attention(q, k, v, scale, mask, causal, window, softcap, alibi_slopes, sinks, block_mask,
                              block_size, key_start, key_len, return_lse, stream)
        if key is not None and key.__class__ is not bytes:
            return key
    spec, inputs = validate_attention(
        q, k, v, scale=scale, mask=mask, causal=causal, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, block_mask=block_mask, block_size=block_size,
        key_start=key_start, key_len=key_len,
    )
    if key is None:
        out, lse = _run(q, k, v, spec, inputs, stream)
    else:  # first call of its key: the Python path, recorded
        fkey, extras = _function_key(spec, inputs, stream)
        fn = _differentiable(*fkey)
        out, lse, _ = cuda_host.recorded(key, [q, k, v, mask, alibi_slopes, sinks, block_mask, key_start, key_len],
                                         lambda: fn(q, k, v, *extras))
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, *, scale=None, causal=False, window=None,
                           softcap=None, alibi_slopes=None, sinks=None, mask=None,
                           block_mask=None, block_size=None, return_lse=False, stream=None):
    """Attention over packed sequences.

    q `[total_q, Hq, D]`, k `[total_k, Hkv, D]`, v `[total_k, Hkv, Dv]`;
    sequence b owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` of q and
    `cu_seqlens_k[b]:cu_seqlens_k[b+1]` of k and v. Options as
    `flash_attention` (causal alignment is per sequence; alibi_slopes may be
    `[num_seqs, H]`). Returns out `[total_q, Hq, Dv]` and, with return_lse,
    lse `[Hq, total_q]`.
    """
    spec, inputs = validate_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        mask=mask, block_mask=block_mask, block_size=block_size,
    )
    # Backends see one "batch" row of [1, H, total, D] views plus the offsets.
    as_bhnd = lambda x: x.transpose(1, 0, 2)[None]
    out, lse = _run(as_bhnd(q), as_bhnd(k), as_bhnd(v), spec, inputs, stream)
    out = out[0].transpose(1, 0, 2)
    return (out, lse[0]) if return_lse else out
