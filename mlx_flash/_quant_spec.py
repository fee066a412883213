"""Validation of `flash_attention_quantized` arguments.

k and v arrive as the `(words, scales, biases)` triples that
`mx.quantize(x, group_size=group_size, bits=bits)` returns for x of shape
`[B, Hkv, Nk, D]` (affine mode, quantized along D): words uint32
`[B, Hkv, Nk, D * bits / 32]`, scales and biases `[B, Hkv, Nk, D / group_size]`
in one float dtype. The triples are checked here; every other option is
judged by `_spec.validate_attention` itself, called on lazy broadcast
placeholders of the dequantized shapes (never evaluated, so they cost no
memory), so the two ops cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import mlx.core as mx

from ._spec import (FLOAT_DTYPES, VALIDATED_CALLS, AttentionInputs, AttentionSpec, remember_validated,
                    simple_options_key, validate_attention)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_ARRAY = mx.array
_TRIPLE_TYPES = (tuple, list)


class QuantSpec(NamedTuple):
    """Static description of one quantized call (kernel-cache key)."""

    attention: AttentionSpec
    bits: int
    group_size: int


def _check_int_choice(name: str, value, choices) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def _check_triple(name: str, triple, bits: int, group_size: int) -> Tuple[Tuple[mx.array, ...], tuple]:
    """Check one (words, scales, biases) triple; returns it and its dequantized shape."""
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise TypeError(
            f"{name}: expected the (data, scales, biases) triple of mx.quantize, got "
            f"{type(triple).__name__}{'' if not isinstance(triple, (tuple, list)) else f' of length {len(triple)}'}"
        )
    words, scales, biases = triple
    for part, a in (("data", words), ("scales", scales), ("biases", biases)):
        if not isinstance(a, mx.array):
            raise TypeError(f"{name}: {part} must be an mx.array, got {type(a).__name__}")
        if a.ndim != 4:
            raise ValueError(f"{name}: {part} must have rank 4 [B, Hkv, Nk, *], got shape {list(a.shape)}")
    if words.dtype != mx.uint32:
        raise TypeError(f"{name}: data must be uint32 (packed codes of mx.quantize), got {words.dtype}")
    if scales.dtype not in FLOAT_DTYPES or biases.dtype != scales.dtype:
        raise TypeError(
            f"{name}: scales and biases must share one dtype of float32/float16/bfloat16, "
            f"got {scales.dtype} and {biases.dtype}"
        )
    B, H, N, W = words.shape
    if (W * 32) % bits:
        raise ValueError(f"{name}: data's last dim {W} is not a whole number of {bits}-bit values (W * 32 % bits)")
    D = W * 32 // bits
    if D % group_size:
        raise ValueError(
            f"{name}: data's last dim {W} holds D={D} values at bits={bits}, not a multiple of "
            f"group_size={group_size}; were bits/group_size the ones given to mx.quantize?"
        )
    want = (B, H, N, D // group_size)
    for part, a in (("scales", scales), ("biases", biases)):
        if tuple(a.shape) != want:
            raise ValueError(
                f"{name}: {part} must have shape {list(want)} (D={D} / group_size={group_size}) to match data "
                f"{list(words.shape)} at bits={bits}, got {list(a.shape)}; were bits/group_size the ones given "
                f"to mx.quantize?"
            )
    return (words, scales, biases), (B, H, N, D)


def _call_key(q, k, v, bits, group_size, options):
    """Everything the checks of a call without optional arrays read, or None
    where the arguments are not plain (arrays, triples, ints) and must go
    through the checks one by one."""
    if not (type(k) in _TRIPLE_TYPES and type(v) in _TRIPLE_TYPES and len(k) == 3 and len(v) == 3
            and type(bits) is int and type(group_size) is int and type(q) is _ARRAY):
        return None
    kw, ks, kb = k
    vw, vs, vb = v
    if not (type(kw) is _ARRAY and type(ks) is _ARRAY and type(kb) is _ARRAY and type(vw) is _ARRAY
            and type(vs) is _ARRAY and type(vb) is _ARRAY):
        return None
    return ("quantized", bits, group_size, q.shape, q.dtype, kw.shape, kw.dtype, ks.shape, ks.dtype, kb.shape,
            kb.dtype, vw.shape, vw.dtype, vs.shape, vs.dtype, vb.shape, vb.dtype, options)


def validate_attention_quantized(
    q, k, v, *, bits, group_size, scale=None, mask=None, causal=False, window=None, softcap=None,
    alibi_slopes=None, sinks=None,
) -> Tuple[QuantSpec, AttentionInputs, tuple, tuple]:
    """Check a `flash_attention_quantized` call; returns (spec, inputs, k triple, v triple).

    A call without optional arrays whose arguments passed the checks before
    (same shapes, dtypes and options: every layer of a decode step) is not
    checked again (see _spec.remember_validated)."""
    if mask is None and alibi_slopes is None and sinks is None:
        options = simple_options_key(scale, causal, window, softcap)
        key = None if options is None else _call_key(q, k, v, bits, group_size, options)
        if key is not None:
            qspec = VALIDATED_CALLS.get(key)
            if qspec is None:
                qspec, _, _, _ = _validate_attention_quantized(
                    q, k, v, bits=bits, group_size=group_size, scale=scale, causal=causal, window=window,
                    softcap=softcap)
                remember_validated(key, qspec)
            return qspec, AttentionInputs(), tuple(k), tuple(v)
    return _validate_attention_quantized(
        q, k, v, bits=bits, group_size=group_size, scale=scale, mask=mask, causal=causal, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


def _validate_attention_quantized(
    q, k, v, *, bits, group_size, scale=None, mask=None, causal=False, window=None, softcap=None,
    alibi_slopes=None, sinks=None,
) -> Tuple[QuantSpec, AttentionInputs, tuple, tuple]:
    """Every check of validate_attention_quantized, run on each call."""
    bits = _check_int_choice("bits", bits, SUPPORTED_BITS)
    group_size = _check_int_choice("group_size", group_size, SUPPORTED_GROUP_SIZES)
    if not isinstance(q, mx.array):
        raise TypeError(f"q: expected an mx.array, got {type(q).__name__}")
    k, k_shape = _check_triple("k", k, bits, group_size)
    v, v_shape = _check_triple("v", v, bits, group_size)
    if k_shape[:3] != v_shape[:3]:
        raise ValueError(
            f"k, v: [B, Hkv, Nk] must match, got k {list(k_shape[:3])} and v {list(v_shape[:3])}"
        )
    if q.ndim == 4 and q.shape[-1] != k_shape[-1]:
        raise ValueError(f"q: head dim must equal k's dequantized head dim ({k_shape[-1]}), got {q.shape[-1]}")
    # Placeholders of the dequantized shapes, in q's dtype (lazy views, never evaluated).
    dtype = q.dtype if q.dtype in FLOAT_DTYPES else mx.float32
    zero = mx.zeros((), dtype)
    spec, inputs = validate_attention(
        q, mx.broadcast_to(zero, k_shape), mx.broadcast_to(zero, v_shape), scale=scale, mask=mask,
        causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )
    return QuantSpec(spec, bits, group_size), inputs, tuple(k), tuple(v)
