"""Validation and normalisation of flash_attention arguments.

Everything a kernel needs to know about a call is split in two:

* `AttentionSpec`, an immutable (hashable) record of the static choices:
  shapes, scale, causal/window bounds, softcap, which optional inputs are
  present. Backends cache compiled kernels on it and `attention.py` caches one
  differentiable function per spec. It is a NamedTuple, not a frozen
  dataclass: one is built, hashed and compared at every call, and a tuple does
  that in C (a frozen dataclass took ~3 us to build and ~3 us to compare).
* `AttentionInputs`, the optional arrays, already normalised to the rank and
  dtype every backend expects (see the field comments).

All checks happen here, up front, with errors that name the argument, what
was expected and what came. Backends may assume a valid spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# The contract's head-dim limits (MLA's absorbed decode: Dqk 576, Dv 512).
# Each backend may take less: dispatch.head_dim_limits names its own.
MAX_HEAD_DIM_QK = 576
MAX_HEAD_DIM_V = 512
DEFAULT_BLOCK_SIZE = (64, 64)


class AttentionSpec(NamedTuple):
    """Static description of one attention call (kernel-cache key).

    Layout is `[B, H, N, D]`. For varlen calls `batch` is the number of packed
    sequences, `seqlen_q`/`seqlen_k` are the packed totals and
    `max_seqlen_q`/`max_seqlen_k` bound the per-sequence lengths.
    """

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim_qk: int
    head_dim_v: int
    dtype: mx.Dtype
    scale: float
    causal: bool = False
    # -1 means unbounded on that side.
    window_left: int = -1
    window_right: int = -1
    # 0.0 means no softcap.
    softcap: float = 0.0
    has_alibi: bool = False
    has_sinks: bool = False
    # "none", "bool" or "additive".
    mask_kind: str = "none"
    has_block_mask: bool = False
    block_q: int = DEFAULT_BLOCK_SIZE[0]
    block_k: int = DEFAULT_BLOCK_SIZE[1]
    varlen: bool = False
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # key_start/key_len given (per-batch valid key ranges).
    has_key_range: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA/MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0


@dataclass
class AttentionInputs:
    """Optional arrays of a call, normalised for the backends.

    mask:       rank 4 `[Bm, Hm, Nq, Nk]` with Bm in {1, B}, Hm in {1, Hq}
                (dims of size 1 broadcast; Nq/Nk dims may also be 1);
                bool, or float32/float16/bfloat16 for an additive mask.
    alibi:      float32 `[B, Hq]`.
    sinks:      float32 `[Hq]`.
    block_mask: bool rank 4 `[Bb, Hb, ceil(Nq/block_q), ceil(Nk/block_k)]`,
                dims of size 1 broadcast.
    cu_seqlens_q / cu_seqlens_k: int32 `[batch + 1]` (varlen only).
    key_start / key_len: int32 `[B]`, both set or both None: batch b keeps
                keys `key_start[b] <= j < key_start[b] + key_len[b]` (any
                values; a range past either end keeps what lies inside).
    """

    mask: Optional[mx.array] = None
    alibi: Optional[mx.array] = None
    sinks: Optional[mx.array] = None
    block_mask: Optional[mx.array] = None
    cu_seqlens_q: Optional[mx.array] = None
    cu_seqlens_k: Optional[mx.array] = None
    key_start: Optional[mx.array] = None
    key_len: Optional[mx.array] = None


def _shape(a) -> tuple:
    return tuple(a.shape)


def _check_array(name: str, a) -> None:
    if not isinstance(a, mx.array):
        raise TypeError(f"{name}: expected an mx.array, got {type(a).__name__}")


def _check_broadcastable(name: str, a: mx.array, target: tuple, dims: str) -> mx.array:
    """Check `a` broadcasts to `target` and return it reshaped to rank 4."""
    if a.ndim > 4:
        raise ValueError(
            f"{name}: expected at most 4 dimensions broadcastable to {dims}={list(target)}, "
            f"got shape {list(a.shape)}"
        )
    full = (1,) * (4 - a.ndim) + _shape(a)
    for got, want in zip(full, target):
        if got not in (1, want):
            raise ValueError(
                f"{name}: shape {list(a.shape)} does not broadcast to {dims}={list(target)}"
            )
    return a.reshape(full)


def _normalise_window(window, causal: bool) -> Tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(
                f"window: expected a pair (left, right) of ints >= 0 (None or -1 for unbounded), got {window!r}"
            )
        sides = []
        for side_name, side in zip(("left", "right"), window):
            if side is None:
                side = -1
            if isinstance(side, bool) or not isinstance(side, int):
                raise TypeError(f"window: {side_name} must be an int or None, got {side!r}")
            if side < -1:
                raise ValueError(f"window: {side_name} must be >= 0, or -1/None for unbounded, got {side}")
            sides.append(side)
        left, right = sides
    if causal:
        # Causal is the same as a window whose right side is 0.
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _check_qkv(q, k, v, token_axis: int, layout: str):
    rank = 4 if layout == "[B, H, N, D]" else 3
    # The usual valid call passes one combined test; anything else goes through
    # the checks one by one, which name the first bad argument.
    if not (isinstance(q, mx.array) and isinstance(k, mx.array) and isinstance(v, mx.array)
            and q.ndim == rank and k.ndim == rank and v.ndim == rank
            and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype and q.dtype == v.dtype):
        _explain_qkv(q, k, v, rank, layout)
    qs, ks, vs = q.shape, k.shape, v.shape
    hq, hk, hv = qs[1], ks[1], vs[1]
    dqk, dk, dv = qs[-1], ks[-1], vs[-1]
    if hk != hv:
        raise ValueError(f"k, v: head counts must match, got k {hk} and v {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"q: query heads ({hq}) must be a multiple of key/value heads ({hk}) for GQA/MQA"
        )
    if dqk != dk:
        raise ValueError(f"k: head dim must equal q's ({dqk}), got {dk}")
    if not (1 <= dqk <= MAX_HEAD_DIM_QK and 1 <= dv <= MAX_HEAD_DIM_V):
        for name, d, limit in (("q", dqk, MAX_HEAD_DIM_QK), ("v", dv, MAX_HEAD_DIM_V)):
            if not 1 <= d <= limit:
                raise ValueError(f"{name}: head dim must be in [1, {limit}], got {d}")
    if ks[token_axis] != vs[token_axis]:
        raise ValueError(
            f"k, v: sequence lengths must match, got k {ks[token_axis]} and v {vs[token_axis]}"
        )
    return qs, ks, vs


def _explain_qkv(q, k, v, rank: int, layout: str):
    """Raise the error for the first of q, k, v that is not a valid array."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        _check_array(name, a)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != rank:
            raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {list(a.shape)}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: unsupported dtype {a.dtype}; expected float32, float16 or bfloat16"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    raise AssertionError("unreachable: q, k, v passed every check")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a finite float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return scale


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a positive float, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a finite float > 0, got {softcap}")
    return softcap


def _check_block_size(block_size) -> Tuple[int, int]:
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)
    ):
        raise ValueError(f"block_size: expected a pair of positive ints (block_q, block_k), got {block_size!r}")
    if min(block_size) < 1:
        raise ValueError(f"block_size: block sizes must be >= 1, got {tuple(block_size)}")
    return int(block_size[0]), int(block_size[1])


def _check_alibi(alibi_slopes, batch: int, heads_q: int) -> mx.array:
    _check_array("alibi_slopes", alibi_slopes)
    if not mx.issubdtype(alibi_slopes.dtype, mx.floating):
        raise TypeError(f"alibi_slopes: expected a float array, got {alibi_slopes.dtype}")
    if _shape(alibi_slopes) == (heads_q,):
        alibi_slopes = mx.broadcast_to(alibi_slopes[None], (batch, heads_q))
    elif _shape(alibi_slopes) != (batch, heads_q):
        raise ValueError(
            f"alibi_slopes: expected shape [H]=[{heads_q}] or [B, H]=[{batch}, {heads_q}], "
            f"got {list(alibi_slopes.shape)}"
        )
    return alibi_slopes.astype(mx.float32)


def _check_sinks(sinks, heads_q: int) -> mx.array:
    _check_array("sinks", sinks)
    if not mx.issubdtype(sinks.dtype, mx.floating):
        raise TypeError(f"sinks: expected a float array, got {sinks.dtype}")
    if _shape(sinks) != (heads_q,):
        raise ValueError(f"sinks: expected shape [H]=[{heads_q}], got {list(sinks.shape)}")
    return sinks.astype(mx.float32)


def _check_mask(mask, target: tuple) -> Tuple[mx.array, str]:
    _check_array("mask", mask)
    if mask.dtype == mx.bool_:
        kind = "bool"
    elif mask.dtype in FLOAT_DTYPES:
        kind = "additive"
    else:
        raise TypeError(
            f"mask: expected bool (True = keep) or an additive float32/float16/bfloat16 array, got {mask.dtype}"
        )
    return _check_broadcastable("mask", mask, target, "[B, H, Nq, Nk]"), kind


def _check_key_index(name: str, x, batch: int) -> mx.array:
    _check_array(name, x)
    if not mx.issubdtype(x.dtype, mx.integer):
        raise TypeError(f"{name}: expected an integer array, got {x.dtype}")
    if _shape(x) != (batch,):
        raise ValueError(f"{name}: expected shape [B]=[{batch}], got {list(x.shape)}")
    return x.astype(mx.int32)


def _check_key_range(key_start, key_len, batch: int, seqlen_k: int):
    """(key_start, key_len) as int32 `[B]`; a missing one means 0 / to the end.

    Values are not read here (that would wait on the device); any range is
    well defined: keys outside `[0, Nk)` simply do not exist.
    """
    start = None if key_start is None else _check_key_index("key_start", key_start, batch)
    length = None if key_len is None else _check_key_index("key_len", key_len, batch)
    if start is None:
        start = mx.zeros((batch,), mx.int32)
    if length is None:
        length = seqlen_k - start
    return start, length


# ---------------------------------------------------------------------------
# Validated calls without optional arrays, remembered by everything their checks
# read (array types, shapes and dtypes, option values and types), so a repeated
# call (every layer of a decode step) skips the checks: a call is remembered
# only after it passed them, so every error still comes from the checks below.

VALIDATED_CALLS: dict = {}
VALIDATED_CALLS_MAX = 4096
_ARRAY = mx.array


def simple_options_key(scale, causal, window, softcap):
    """(scale, causal, window, softcap) as a cache key, or None where their checks
    could tell apart values that compare equal: only None and exact types
    qualify (True == 1 and 1 == 1.0 as dict keys, but not to the checks)."""
    if not ((scale is None or type(scale) is float) and (causal is False or causal is True)
            and (softcap is None or type(softcap) is float)):
        return None
    if window is not None:
        if type(window) is not tuple or len(window) != 2:
            return None
        left, right = window
        if not ((left is None or type(left) is int) and (right is None or type(right) is int)):
            return None
    return scale, causal, window, softcap


def remember_validated(key, value) -> None:
    """Store a validated call's result (bounded: cleared when full)."""
    if len(VALIDATED_CALLS) >= VALIDATED_CALLS_MAX:
        VALIDATED_CALLS.clear()
    VALIDATED_CALLS[key] = value


def validate_attention(
    q, k, v, *, scale=None, mask=None, causal=False, window=None, softcap=None,
    alibi_slopes=None, sinks=None, block_mask=None, block_size=None, key_start=None, key_len=None,
) -> Tuple[AttentionSpec, AttentionInputs]:
    """Check a `flash_attention` call and return its spec and normalised inputs."""
    if (mask is None and alibi_slopes is None and sinks is None and block_mask is None and block_size is None
            and key_start is None and key_len is None and type(q) is _ARRAY and type(k) is _ARRAY
            and type(v) is _ARRAY):
        options = simple_options_key(scale, causal, window, softcap)
        if options is not None:
            key = ("attention", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, options)
            spec = VALIDATED_CALLS.get(key)
            if spec is None:
                spec = _new_key_count(q, k, v, options)
                if spec is None:
                    spec, _ = _validate_attention(q, k, v, scale=scale, causal=causal, window=window,
                                                  softcap=softcap)
                    ks, vs = k.shape, v.shape
                    remember_validated(("attention-nk", q.shape, ks[:2] + ks[3:], vs[:2] + vs[3:], q.dtype, k.dtype,
                                        v.dtype, options), spec)
                remember_validated(key, spec)
            return spec, AttentionInputs()
    return _validate_attention(
        q, k, v, scale=scale, mask=mask, causal=causal, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, block_mask=block_mask, block_size=block_size,
        key_start=key_start, key_len=key_len,
    )


def _new_key_count(q, k, v, options):
    """The spec of a call that differs from a validated one only in its key
    count (k's and v's axis 2: a growing KV cache meets a new one at every
    generation step), or None. Without optional arrays no check reads the key
    count but "k and v have as many" (_check_qkv): that one is made here, and a
    call failing it is left to the full checks for their error. Everything
    else the checks read is in the key, as in validate_attention's."""
    ks, vs = k.shape, v.shape
    if len(ks) != 4 or len(vs) != 4 or ks[2] != vs[2]:
        return None
    spec = VALIDATED_CALLS.get(("attention-nk", q.shape, ks[:2] + ks[3:], vs[:2] + vs[3:], q.dtype, k.dtype, v.dtype,
                                options))
    if spec is None:
        return None
    return AttentionSpec._make(spec[:4] + (ks[2],) + spec[5:])  # seqlen_k (field 4), as the checks set it


def _validate_attention(
    q, k, v, *, scale=None, mask=None, causal=False, window=None, softcap=None,
    alibi_slopes=None, sinks=None, block_mask=None, block_size=None, key_start=None, key_len=None,
) -> Tuple[AttentionSpec, AttentionInputs]:
    """Every check of validate_attention, run on each call."""
    qs, ks, vs = _check_qkv(q, k, v, token_axis=2, layout="[B, H, N, D]")
    B, Hq, Nq, Dqk = qs
    Bk, Hkv, Nk, _ = ks
    if Bk != B or vs[0] != B:
        raise ValueError(f"k, v: batch size must equal q's ({B}), got k {Bk} and v {vs[0]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    left, right = _normalise_window(window, causal)
    inputs = AttentionInputs()
    mask_kind = "none"
    if mask is not None:
        inputs.mask, mask_kind = _check_mask(mask, (B, Hq, Nq, Nk))
    if alibi_slopes is not None:
        inputs.alibi = _check_alibi(alibi_slopes, B, Hq)
    if sinks is not None:
        inputs.sinks = _check_sinks(sinks, Hq)
    bq, bk = _check_block_size(block_size)
    if block_mask is not None:
        _check_array("block_mask", block_mask)
        if block_mask.dtype != mx.bool_:
            raise TypeError(f"block_mask: expected a bool array, got {block_mask.dtype}")
        nbq, nbk = -(-Nq // bq), -(-Nk // bk)
        inputs.block_mask = _check_broadcastable(
            "block_mask", block_mask, (B, Hq, nbq, nbk),
            f"[B, H, ceil(Nq/{bq}), ceil(Nk/{bk})]",
        )
    elif block_size is not None:
        raise ValueError("block_size: given without block_mask; it only sets block_mask's block sizes")
    if key_start is not None or key_len is not None:
        inputs.key_start, inputs.key_len = _check_key_range(key_start, key_len, B, Nk)
    spec = AttentionSpec(
        batch=B, heads_q=Hq, heads_kv=Hkv, seqlen_q=Nq, seqlen_k=Nk,
        head_dim_qk=Dqk, head_dim_v=vs[-1], dtype=q.dtype,
        scale=_check_scale(scale, Dqk), causal=causal,
        window_left=left, window_right=right, softcap=_check_softcap(softcap),
        has_alibi=inputs.alibi is not None, has_sinks=inputs.sinks is not None,
        mask_kind=mask_kind, has_block_mask=inputs.block_mask is not None,
        block_q=bq, block_k=bk, has_key_range=inputs.key_start is not None,
    )
    return spec, inputs


def _check_cu_seqlens(name: str, cu, total: int) -> Tuple[mx.array, list]:
    _check_array(name, cu)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D array of num_seqs + 1 >= 2 offsets, got shape {list(cu.shape)}")
    if not mx.issubdtype(cu.dtype, mx.integer):
        raise TypeError(f"{name}: expected an integer array, got {cu.dtype}")
    # Offsets are read on the host once: they decide shapes and must be checked.
    offsets = [int(x) for x in cu.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name}: offsets must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(
            f"{name}: last offset must equal the packed length ({total}), got {offsets[-1]}"
        )
    return cu.astype(mx.int32), offsets


def _check_max_seqlen(name: str, given, lengths: list) -> int:
    actual = max(lengths) if lengths else 0
    if given is None:
        return actual
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"{name}: expected an int, got {type(given).__name__}")
    if given < actual:
        raise ValueError(f"{name}: {given} is smaller than the longest sequence ({actual})")
    return given


def validate_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
    scale=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
    mask=None, block_mask=None, block_size=None,
) -> Tuple[AttentionSpec, AttentionInputs]:
    """Check a `flash_attention_varlen` call (`[total_tokens, H, D]` layout)."""
    _check_qkv(q, k, v, token_axis=0, layout="[total_tokens, H, D]")
    if mask is not None:
        raise ValueError(
            "mask: not supported by flash_attention_varlen (a dense [B, H, Nq, Nk] mask has no "
            "meaning for packed sequences); use causal/window/alibi/softcap/sinks or split the batch"
        )
    if block_mask is not None or block_size is not None:
        raise ValueError("block_mask: not supported by flash_attention_varlen; use flash_attention per sequence")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    total_q, Hq, Dqk = q.shape
    total_k, Hkv, _ = k.shape
    cu_q, offs_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k, offs_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k)
    if len(offs_q) != len(offs_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(offs_q)} offsets like cu_seqlens_q, got {len(offs_k)}"
        )
    nseq = len(offs_q) - 1
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, [b - a for a, b in zip(offs_q, offs_q[1:])])
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, [b - a for a, b in zip(offs_k, offs_k[1:])])
    left, right = _normalise_window(window, causal)
    inputs = AttentionInputs(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if alibi_slopes is not None:
        inputs.alibi = _check_alibi(alibi_slopes, nseq, Hq)
    if sinks is not None:
        inputs.sinks = _check_sinks(sinks, Hq)
    spec = AttentionSpec(
        batch=nseq, heads_q=Hq, heads_kv=Hkv, seqlen_q=total_q, seqlen_k=total_k,
        head_dim_qk=Dqk, head_dim_v=v.shape[-1], dtype=q.dtype,
        scale=_check_scale(scale, Dqk), causal=causal,
        window_left=left, window_right=right, softcap=_check_softcap(softcap),
        has_alibi=inputs.alibi is not None, has_sinks=inputs.sinks is not None,
        varlen=True, max_seqlen_q=max_q, max_seqlen_k=max_k,
    )
    return spec, inputs
