"""One ring step: which (query chunk, key chunk) pairs to compute, and how.

A rank's queries and the visiting key/value shard are each one or two chunks
of `chunk` tokens at known global positions. For a query chunk starting at
global position `qs` and a key chunk starting at `ks` (`delta = qs - ks`),
query row i may see key row j when `j - i` lies in
`[delta - left, delta + right]` (the window; causal is `right = 0`). A pair
is skipped when no (i, j) qualifies, computed without any rule when every
(i, j) does, and otherwise cropped so that the single-device kernel's
bottom-right-aligned window expresses the rule exactly: the kernel keeps key
j' for query i' when `j' - i'` lies in `[a - left', a + right']` with
`a = Nk' - Nq'`, so rows past the band's end (or keys past it) are cut off
and the remaining bounds are shifted by `a`.

ALiBi (`-slope * |pos_q - pos_k|`) is by global position. On a diagonal pair
the kernel's own ALiBi is already right. On any other pair the sign of
`pos_q - pos_k` is fixed, so the bias is linear: a per-key part
`sign * slope * j` (an additive `[B, H, 1, Nk]` mask, O(N) memory) and a
per-row part `-sign * slope * (i + delta)`, added to that block's lse (the
block's output does not change when a whole row shifts).

Partial results merge by their lse in float32. The backward of a pair is
the backend's fused backward run with the *global* out and lse (shifted by
the same per-row ALiBi part), which makes each pair's dq/dk/dv the exact
share of the global gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from .. import dispatch
from .._spec import AttentionInputs, validate_attention


class Rules(NamedTuple):
    """The call's options that depend on global position or are per call."""

    chunk: int
    window_left: int   # -1: unbounded
    window_right: int  # -1: unbounded
    scale: float
    softcap: Optional[float]
    has_alibi: bool


class BlockCall(NamedTuple):
    """One kernel call of a ring step.

    Queries: `q_count` chunks of the local shard from chunk `q_first`, of
    which the first `q_rows` rows are computed (rows past it see no key of
    this pair). Keys: `k_count` chunks of the visiting shard from `k_first`,
    of which the first `k_rows` rows are used. `window` is in the call's own
    frame; `alibi` is "none", "native" (diagonal pair) or "linear".
    """

    q_first: int
    q_count: int
    q_rows: int
    k_first: int
    k_count: int
    k_rows: int
    window: Tuple[int, int]
    alibi: str
    delta: int


def _pair(qc: int, kc: int, rules: Rules):
    """(kind, call fields) for query chunk qc and key chunk kc (global indices)."""
    C = rules.chunk
    delta = (qc - kc) * C
    lo = None if rules.window_left < 0 else delta - rules.window_left
    hi = None if rules.window_right < 0 else delta + rules.window_right
    # j - i ranges over [-(C-1), C-1] within a pair of chunks.
    if (lo is not None and lo > C - 1) or (hi is not None and hi < -(C - 1)):
        return "skip", None
    full = (lo is None or lo <= -(C - 1)) and (hi is None or hi >= C - 1)
    alibi = "none" if not rules.has_alibi else ("native" if delta == 0 else "linear")
    if full:
        return "full", (C, C, (-1, -1), alibi, delta)
    q_rows = C - lo if lo is not None and lo > 0 else C  # rows i >= C - lo see no key here
    k_rows = C + hi if hi is not None and hi < 0 else C  # keys j >= C + hi seen by no row
    a = k_rows - q_rows
    window = (-1 if lo is None else a - lo, -1 if hi is None else hi - a)
    return "partial", (q_rows, k_rows, window, alibi, delta)


def plan_step(q_chunks: tuple, k_chunks: tuple, rules: Rules) -> list:
    """The kernel calls that compute local queries against one visiting shard.

    Fully visible pairs without ALiBi need no rule, so they are grouped into
    as few calls as possible (a whole shard against a whole shard when the
    mask allows, e.g. every non-causal step).
    """
    calls, full_sets = [], []
    for a, qc in enumerate(q_chunks):
        plain = []
        for b, kc in enumerate(k_chunks):
            kind, f = _pair(qc, kc, rules)
            if kind == "skip":
                continue
            if kind == "full" and f[3] == "none":
                plain.append(b)
            else:
                calls.append(BlockCall(a, 1, f[0], b, 1, f[1], f[2], f[3], f[4]))
        full_sets.append(tuple(plain))
    C = rules.chunk
    if full_sets and all(s == full_sets[0] for s in full_sets) and full_sets[0]:
        ks = full_sets[0]  # a subset of at most two chunks, hence contiguous
        calls.append(BlockCall(0, len(q_chunks), len(q_chunks) * C, ks[0], len(ks), len(ks) * C,
                               (-1, -1), "none", 0))
    else:
        for a, ks in enumerate(full_sets):
            if ks:
                calls.append(BlockCall(a, 1, C, ks[0], len(ks), len(ks) * C, (-1, -1), "none", 0))
    return calls


def steps_needed(layout_chunks, world: int, rules: Rules) -> int:
    """Number of ring steps after which no rank has work left (>= 1)."""
    last = 0
    for r in range(world):
        for t in range(world):
            if plan_step(layout_chunks(r), layout_chunks((r - t) % world), rules):
                last = max(last, t)
    return last + 1


# --- the kernel calls ---------------------------------------------------------

def _slices(call: BlockCall, q, k, v, chunk: int):
    qs = call.q_first * chunk
    ks = call.k_first * chunk
    return (q[:, :, qs:qs + call.q_rows], k[:, :, ks:ks + call.k_rows], v[:, :, ks:ks + call.k_rows])


def _alibi_parts(call: BlockCall, slopes):
    """(additive key mask [B, H, 1, Nk], lse row shift [B, H, Nq]) of a linear ALiBi pair."""
    sign = 1.0 if call.delta > 0 else -1.0
    s = slopes[:, :, None]  # [B, H, 1]
    j = mx.arange(call.k_rows, dtype=mx.float32)
    i = mx.arange(call.q_rows, dtype=mx.float32) + call.delta
    return (sign * s * j)[:, :, None, :], -sign * s * i


def _spec(call: BlockCall, qb, kb, vb, rules: Rules, slopes):
    mask = shift = alibi = None
    if call.alibi == "native":
        alibi = slopes
    elif call.alibi == "linear":
        mask, shift = _alibi_parts(call, slopes)
    spec, inputs = validate_attention(
        qb, kb, vb, scale=rules.scale, window=call.window, softcap=rules.softcap,
        alibi_slopes=alibi, mask=mask,
    )
    return spec, inputs, shift


def block_forward(call: BlockCall, q, k, v, rules: Rules, slopes, stream):
    """(out, lse) of one call, lse in global terms (ALiBi row part included)."""
    qb, kb, vb = _slices(call, q, k, v, rules.chunk)
    spec, inputs, shift = _spec(call, qb, kb, vb, rules, slopes)
    backend = dispatch.backend_for_name(dispatch.backend_name(stream))
    out, lse = backend.attention_forward(qb, kb, vb, spec, inputs, stream)
    return out, (lse if shift is None else lse + shift)


def block_backward(call: BlockCall, q, k, v, out, lse, dout, dlse, rules: Rules, slopes, stream):
    """(dq, dk, dv) of one call from the global out/lse rows it covers."""
    qb, kb, vb = _slices(call, q, k, v, rules.chunk)
    spec, inputs, shift = _spec(call, qb, kb, vb, rules, slopes)
    rows = slice(call.q_first * rules.chunk, call.q_first * rules.chunk + call.q_rows)
    ob, lb, dob = out[:, :, rows], lse[:, :, rows], dout[:, :, rows]
    dlb = None if dlse is None else dlse[:, :, rows]
    if shift is not None:
        lb = lb - shift  # the kernel's logits carry the per-key part only
    backend = dispatch.backend_for_name(dispatch.backend_name(stream))
    # out / lse are global (over other ranks' keys too): delta must come from them.
    return backend.attention_backward(qb, kb, vb, ob, lb, dob, dlb, spec, inputs, stream, own_output=False)


# --- accumulation -------------------------------------------------------------

@mx.compile
def _merge_pair(acc_out, acc_lse, out, lse):
    # Compiled: the elementwise chain fuses, so a merge allocates its result only.
    new_lse = mx.logaddexp(acc_lse, lse)
    ref = mx.where(new_lse == -mx.inf, 0.0, new_lse)
    w_acc = mx.exp(acc_lse - ref)[..., None]
    w_new = mx.exp(lse - ref)[..., None]
    return acc_out * w_acc + out.astype(mx.float32) * w_new, new_lse


def merge(acc, out, lse):
    """Combine two partial softmax results by their lse (float32).

    Rows no key has reached yet carry lse -inf and output 0; two such rows
    stay that way (never NaN), while a NaN anywhere stays NaN.
    """
    if acc is None:
        return out.astype(mx.float32), lse
    return _merge_pair(acc[0], acc[1], out, lse)


def pad_rows(x, rows: int, fill: float):
    """x with rows appended along axis 2 up to `rows`, holding `fill`."""
    missing = rows - x.shape[2]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[2] = missing
    return mx.concatenate([x, mx.full(shape, fill, dtype=x.dtype)], axis=2)


def add_into(acc: list, first: int, count: int, grad, chunk: int):
    """Add `grad` (rows of `count` chunks from `first`, maybe cropped) into per-chunk float32 sums."""
    grad = pad_rows(grad.astype(mx.float32), count * chunk, 0.0)
    for c in range(count):
        part = grad[:, :, c * chunk:(c + 1) * chunk]
        acc[first + c] = part if acc[first + c] is None else acc[first + c] + part
