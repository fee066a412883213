"""Materialised attention in plain MLX: the oracle for the fused kernels.

It builds the full `[B, H, Nq, Nk]` score matrix, so it costs O(N^2) memory.
It exists for tests and for users who ask for it by name
(`mlx_flash.reference.flash_attention`); the fused op never falls back to it.
The code follows the contract of ARCHITECTURE.md line by line.
"""

from __future__ import annotations

import mlx.core as mx

from ._spec import AttentionInputs, AttentionSpec, validate_attention, validate_attention_varlen


def _expand_kv(x: mx.array, group: int) -> mx.array:
    """Give every query head its key/value head: head h reads h // group."""
    return x if group == 1 else mx.repeat(x, group, axis=1)


def _positions(spec: AttentionSpec, nq: int, nk: int):
    """Aligned query positions p_i = i + Nk - Nq (column) and key indices j (row)."""
    p = (mx.arange(nq) + (nk - nq))[:, None]
    j = mx.arange(nk)[None, :]
    return p, j


def _block_keep(block_mask: mx.array, spec: AttentionSpec, nq: int, nk: int) -> mx.array:
    """Expand a per-block bool mask to per-element by indexing i // bq, j // bk."""
    rows = mx.arange(nq) // spec.block_q
    cols = mx.arange(nk) // spec.block_k
    return block_mask[:, :, rows][:, :, :, cols]


def key_range_keep(key_start: mx.array, key_len: mx.array, nk: int) -> mx.array:
    """Per-batch valid keys `key_start[b] <= j < key_start[b] + key_len[b]`, as `[B, 1, 1, Nk]` bool."""
    # 64-bit: start + len of any two int32 values must not wrap around.
    j = mx.arange(nk, dtype=mx.int64)[None, :]
    start = key_start.astype(mx.int64)[:, None]
    keep = (j >= start) & (j < start + key_len.astype(mx.int64)[:, None])
    return keep[:, None, None, :]


def attention_logits(q, k, spec: AttentionSpec, inputs: AttentionInputs, dtype=mx.float32):
    """Logits after softcap, ALiBi and the additive mask, and the keep mask.

    q `[B, Hq, Nq, D]`, k `[B, Hkv, Nk, D]` (one sequence batch, not varlen).
    Returns (s, keep) with s `[B, Hq, Nq, Nk]` computed in `dtype` (float32
    by default; tests also run it in fp16/bf16 as the "plain" baseline) and
    keep broadcastable to it.
    """
    nq, nk = q.shape[2], k.shape[2]
    k = _expand_kv(k, spec.group_size)
    s = (q.astype(dtype) * mx.array(spec.scale, dtype)) @ k.astype(dtype).swapaxes(-1, -2)
    if spec.softcap:
        s = spec.softcap * mx.tanh(s / spec.softcap)
    p, j = _positions(spec, nq, nk)
    if inputs.alibi is not None:
        s = s - (inputs.alibi[:, :, None, None] * mx.abs(p - j).astype(mx.float32)).astype(dtype)
    keep = mx.ones((1, 1, nq, nk), dtype=mx.bool_)
    if inputs.mask is not None:
        if spec.mask_kind == "additive":
            s = s + inputs.mask.astype(dtype)
        else:
            keep = keep & inputs.mask
    if spec.window_right >= 0:
        keep = keep & (j <= p + spec.window_right)
    if spec.window_left >= 0:
        keep = keep & (j >= p - spec.window_left)
    if inputs.block_mask is not None:
        keep = keep & _block_keep(inputs.block_mask, spec, nq, nk)
    if inputs.key_start is not None:
        keep = keep & key_range_keep(inputs.key_start, inputs.key_len, nk)
    return s, keep


def attention_probabilities(q, k, spec: AttentionSpec, inputs: AttentionInputs, dtype=mx.float32):
    """Softmax probabilities `[B, Hq, Nq, Nk]`, lse `[B, Hq, Nq]` and the kept
    pairs (bool, broadcastable to the probabilities), in `dtype`.

    Non-finite logits follow the contract: a -inf logit is a dropped key; a
    NaN or +inf kept logit (or sink) makes the row's probabilities and lse NaN.
    """
    s, keep = attention_logits(q, k, spec, inputs, dtype)
    keep = keep & (s != -mx.inf)  # a -inf logit drops its key (its v is never read)
    s = mx.where(keep, s, -mx.inf)
    poisoned = mx.any(keep & (mx.isnan(s) | (s == mx.inf)), axis=-1, keepdims=True)
    sinks = None
    if inputs.sinks is not None:
        sinks = inputs.sinks[None, :, None, None].astype(dtype)
        poisoned = poisoned | mx.isnan(sinks) | (sinks == mx.inf)
        sinks = mx.where(poisoned, -mx.inf, sinks)
    s = mx.where(poisoned, -mx.inf, s)
    if s.shape[-1] > 0:
        row_max = mx.max(s, axis=-1, keepdims=True)
    else:  # no keys at all (an empty packed sequence)
        row_max = mx.full(s.shape[:-1] + (1,), -mx.inf, dtype)
    if sinks is not None:
        row_max = mx.maximum(row_max, sinks)
    # A fully masked row has row_max = -inf: shift by 0 there so exp gives 0, not NaN.
    shift = mx.where(mx.isinf(row_max), 0.0, row_max)
    e = mx.exp(s - shift)
    denom = mx.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + mx.exp(sinks - shift)
    lse = mx.where(poisoned, mx.nan, mx.log(denom) + shift)[..., 0]
    probs = mx.where(denom > 0, e / mx.where(denom > 0, denom, 1.0), 0.0)
    probs = mx.where(poisoned & keep, mx.nan, probs)
    return probs, lse, keep


def kept_matmul(keep, probs, v):
    """probs @ v summed over kept pairs only, IEEE per element.

    With finite v this is the plain product (dropped probabilities are 0).
    Otherwise a dropped key's NaN or inf must not leak through 0 * NaN: the
    finite part of v goes through the product and its non-finite entries are
    classified per output element by products of 0/1 indicators (a kept
    zero probability times inf is NaN, as the materialised softmax gives).
    """
    if mx.all(mx.isfinite(v)).item():
        return probs @ v
    f32 = lambda x: x.astype(mx.float32)
    base = probs @ mx.where(mx.isfinite(v), v, 0.0)
    kept_zero, kept_pos = keep & (probs == 0), keep & (probs > 0)
    nan = f32(keep & mx.isnan(probs)) @ f32(~mx.isfinite(v)) + f32(keep) @ f32(mx.isnan(v)) \
        + f32(kept_zero) @ f32(mx.isinf(v))
    pos = f32(kept_pos) @ f32(v == mx.inf)
    neg = f32(kept_pos) @ f32(v == -mx.inf)
    term = mx.where((nan > 0) | ((pos > 0) & (neg > 0)), mx.nan,
                    mx.where(pos > 0, mx.inf, mx.where(neg > 0, -mx.inf, 0.0)))
    return base + term.astype(base.dtype)


def attention_dense(q, k, v, spec: AttentionSpec, inputs: AttentionInputs, dtype=mx.float32):
    """(out, lse) for `[B, H, N, D]` inputs, materialised, computed in `dtype`."""
    probs, lse, keep = attention_probabilities(q, k, spec, inputs, dtype)
    v = _expand_kv(v, spec.group_size)
    keep = mx.broadcast_to(keep, probs.shape)
    out = kept_matmul(keep, probs, v.astype(dtype))
    # A poisoned row is NaN even with no kept key (a NaN sink). stop_gradient:
    # the vjp must not reach log(denom) of fully masked rows (0 * inf).
    out = mx.where(mx.stop_gradient(mx.isnan(lse))[..., None], mx.nan, out)
    return out.astype(q.dtype), lse.astype(mx.float32)


def flash_attention(q, k, v, *, scale=None, mask=None, causal=False, window=None, softcap=None,
                    alibi_slopes=None, sinks=None, block_mask=None, block_size=None,
                    key_start=None, key_len=None, return_lse=False, stream=None):
    """Same contract as `mlx_flash.flash_attention`, computed by materialising."""
    spec, inputs = validate_attention(
        q, k, v, scale=scale, mask=mask, causal=causal, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, block_mask=block_mask, block_size=block_size,
        key_start=key_start, key_len=key_len,
    )
    with mx.stream(stream if stream is not None else mx.default_stream(mx.default_device())):
        out, lse = attention_dense(q, k, v, spec, inputs)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, *, return_lse=False, stream=None, **options):
    """Varlen contract by running each packed sequence on its own."""
    spec, inputs = validate_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options
    )
    offs_q, offs_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(spec.batch):
        qs = q[offs_q[b]:offs_q[b + 1]].transpose(1, 0, 2)[None]
        ks = k[offs_k[b]:offs_k[b + 1]].transpose(1, 0, 2)[None]
        vs = v[offs_k[b]:offs_k[b + 1]].transpose(1, 0, 2)[None]
        seq_inputs = AttentionInputs(
            alibi=None if inputs.alibi is None else inputs.alibi[b:b + 1],
            sinks=inputs.sinks,
        )
        out, lse = attention_dense(qs, ks, vs, spec, seq_inputs)
        outs.append(out[0].transpose(1, 0, 2))
        lses.append(lse[0])
    out = mx.concatenate(outs, axis=0)
    lse = mx.concatenate(lses, axis=1)
    return (out, lse) if return_lse else out
