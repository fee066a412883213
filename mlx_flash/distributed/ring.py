"""Ring attention: `flash_attention` over a sequence sharded across ranks.

Forward, on rank r, for steps t = 0, 1, ...: the K/V shard of rank r - t is
here; the transfer of the next one is issued first (it runs on the transfer
stream while this step's kernels run on the compute stream), then this
step's query/key chunk pairs are computed (`blocks.plan_step`: masked pairs
skipped, the rest cropped to the single-device kernel's rules) and merged by
lse in float32. Sinks join the softmax once, at the end. The ring stops
after the last step any rank needs (a window can end it early).

Backward: K/V go round again; each step runs the backend's fused backward
per pair with the global out and lse, dq stays here, and dK/dV (float32)
travel round the ring with their K/V, each rank adding its share, until
they reach their owner.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .. import dispatch
from .._spec import validate_attention
from . import blocks, layout as layouts
from .transport import Gather, Ring, comm_stream, pack, unpack

TRANSPORTS = ("ring", "gather")
_LAYOUT_CODE = {"contiguous": 0, "zigzag": 1}
_DTYPE_CODE = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
_groups = {}          # id -> group, kept alive so ids stay unique
_agreed = set()       # (group id, call signature) checked across ranks


def _default_transport(backend: str) -> str:
    # MLX's nccl backend (the one multi-GPU backend for CUDA) has no send/recv.
    return "gather" if backend == "cuda" else "ring"


def _check_agreement(group, signature: dict):
    """Fail clearly, once per signature, if ranks disagree on shapes or options.

    A mismatch would otherwise make a rank wait for bytes that never come.
    """
    key = (id(group), tuple(signature.items()))
    if group.size() == 1 or key in _agreed:
        return
    values = mx.array([float(x) for x in signature.values()], dtype=mx.float32)
    # On the transfer stream when there is one: the ring backend's collectives share its sockets.
    stream = comm_stream(mx.cpu) if signature["transport"] == 0 else None
    hi = mx.distributed.all_max(values, group=group, stream=stream)
    lo = mx.distributed.all_min(values, group=group, stream=stream)
    mx.eval(hi, lo)
    bad = [f"{name} (from {l:g} to {h:g})" for name, l, h in zip(signature, lo.tolist(), hi.tolist()) if l != h]
    if bad:
        raise ValueError("ring_flash_attention: ranks disagree on " + ", ".join(bad)
                         + "; every rank must pass shards of the same shape and the same options")
    _agreed.add(key)


def return_hops(world: int, steps: int) -> int:
    """Hops that bring the dK/dV sums home after the last step: forward (> 0) or back (< 0).

    After step `steps - 1` rank r holds the sum for the K/V of rank
    r - (steps - 1): `world - steps + 1` hops onwards or `steps - 1` back.
    """
    onwards, back = world - steps + 1, steps - 1
    return -back if back < onwards else onwards


def messages_per_call(world: int, steps: int) -> dict:
    """Messages each rank sends with the ring transport: K/V ones (packed k and v, their
    dtype) and dK/dV ones (packed, float32)."""
    return {"forward_kv": steps - 1, "backward_kv": steps - 1,
            "backward_dkv": steps - 1 + abs(return_hops(world, steps))}


def _join(chunks):
    """Per-chunk results along the sequence axis (no copy for a single chunk)."""
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)


def _sinks_grad(sinks, lse, out, dout, dlse):
    """This rank's share of d loss / d sink_h = -sum_{b,i} exp(sink_h - lse) * delta."""
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse
    return -mx.sum(mx.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))


@functools.lru_cache(maxsize=128)
def _differentiable(group_id: int, rules: blocks.Rules, layout: str, transport: str, names: tuple):
    group = _groups[group_id]
    world, rank = group.size(), group.rank()
    C = rules.chunk
    chunks_of = functools.partial(layouts.rank_chunks, layout, world)
    mine = chunks_of(rank)
    steps = blocks.steps_needed(chunks_of, world, rules)
    device = mx.default_device().type

    def visiting(k, v, kv, t):
        return (k, v) if t == 0 else unpack(kv, (k.shape, v.shape))

    @mx.custom_function
    def attention(q, k, v, *extras):
        extra = dict(zip(names, extras))
        slopes, sinks = extra.get("alibi"), extra.get("sinks")
        acc = [None] * len(mine)

        def attend(k_s, v_s, t):
            for call in blocks.plan_step(mine, chunks_of((rank - t) % world), rules):
                out, lse = blocks.block_forward(call, q, k_s, v_s, rules, slopes, None)
                out = blocks.pad_rows(out, call.q_count * C, 0.0)
                lse = blocks.pad_rows(lse, call.q_count * C, -mx.inf)
                for c in range(call.q_count):
                    rows = slice(c * C, (c + 1) * C)
                    a = call.q_first + c
                    acc[a] = blocks.merge(acc[a], out[:, :, rows], lse[:, :, rows])

        ring = Ring(group) if transport == "ring" and world > 1 else None
        if ring is not None:
            kv = pack(k, v)
            for t in range(steps):
                after = ring.shift(kv) if t + 1 < steps else None  # in flight during this step
                attend(*visiting(k, v, kv, t), t)
                kv = after
        else:
            everyone = Gather(group, device).gather(pack(k, v)) if world > 1 else None
            for t in range(steps):
                attend(*visiting(k, v, None if t == 0 else everyone[(rank - t) % world], t), t)

        B, H, Dv = q.shape[0], q.shape[1], v.shape[-1]
        for a in range(len(mine)):  # rows no key reaches (not possible with today's rules)
            if acc[a] is None:
                acc[a] = (mx.zeros((B, H, C, Dv), mx.float32), mx.full((B, H, C), -mx.inf, mx.float32))
        out, lse = _join([o for o, _ in acc]), _join([l for _, l in acc])
        if sinks is not None:
            with_sink = mx.logaddexp(lse, sinks[None, :, None])
            out = out * mx.exp(lse - with_sink)[..., None]
            lse = with_sink
        out = out.astype(q.dtype)
        if ring is not None:
            return ring.close(out, lse)
        if world > 1:
            # Every rank must take part in the all_gather, even one that used none of it.
            out, lse = mx.depends([out, lse], [everyone])
        return out, lse

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v, *extras = primals
        dout, dlse = cotangents
        out, lse = outputs
        extra = dict(zip(names, extras))
        slopes, sinks = extra.get("alibi"), extra.get("sinks")
        dq = [None] * len(mine)
        zeros = mx.zeros((k.size + v.size,), mx.float32)

        def share(k_s, v_s, t):
            """This rank's float32 dK/dV for the shard of rank r - t, packed (or None)."""
            dk, dv = [None] * len(mine), [None] * len(mine)
            for call in blocks.plan_step(mine, chunks_of((rank - t) % world), rules):
                gq, gk, gv = blocks.block_backward(call, q, k_s, v_s, out, lse, dout, dlse, rules, slopes, None)
                blocks.add_into(dq, call.q_first, call.q_count, gq, C)
                blocks.add_into(dk, call.k_first, call.k_count, gk, C)
                blocks.add_into(dv, call.k_first, call.k_count, gv, C)
            if all(g is None for g in dk):
                return None
            full = lambda parts, like: mx.concatenate(
                [g if g is not None else mx.zeros(like.shape[:2] + (C,) + like.shape[3:], mx.float32)
                 for g in parts], axis=2)
            return pack(full(dk, k), full(dv, v))

        ring = Ring(group) if transport == "ring" and world > 1 else None
        if ring is not None:
            # Start after the cotangent exists: it orders this backward after the later layers'.
            kv, total = mx.depends([pack(k, v)], [dout])[0], None
            for t in range(steps):
                after = ring.shift(kv) if t + 1 < steps else None
                here = share(*visiting(k, v, kv, t), t)
                total = here if total is None else (total if here is None else total + here)
                if t + 1 < steps:
                    # On to the rank that holds this K/V next.
                    total = ring.shift(total if total is not None else zeros)
                kv = after
            # `total` now holds every share of the K/V of rank r - (steps - 1): send it home.
            hops = return_hops(world, steps)
            for _ in range(abs(hops)):
                total = ring.shift(total if total is not None else zeros, reverse=hops < 0)
            dkv = total if total is not None else zeros
        else:
            gather = Gather(group, device) if world > 1 else None
            everyone = gather.gather(pack(k, v)) if world > 1 else None
            shares = []
            for t in range(world):
                s = None
                if t < steps:
                    s = share(*visiting(k, v, None if t == 0 else everyone[(rank - t) % world], t), t)
                shares.append(zeros if s is None else s)
            if world == 1:
                dkv = shares[0]
            else:
                shares = mx.depends(shares, [everyone])  # every rank takes part in the all_gather
                # shares[t] belongs to rank r - t: reorder by owner for the reduce-scatter.
                dkv = gather.sum_home(mx.stack([shares[(rank - s) % world] for s in range(world)]))
        dk, dv = unpack(dkv, (k.shape, v.shape))
        B, H, D = q.shape[0], q.shape[1], q.shape[-1]
        dq = _join([g if g is not None else mx.zeros((B, H, C, D), mx.float32) for g in dq])
        grads = []
        for name, x in zip(names, extras):
            grads.append(_sinks_grad(x, lse, out, dout, dlse) if name == "sinks" else mx.zeros_like(x))
        dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
        if ring is not None:
            dq, dk, dv = ring.close(dq, dk, dv)
        return (dq, dk, dv, *grads)

    return attention


def ring_flash_attention(q, k, v, *, group=None, layout="zigzag", scale=None, causal=False, window=None,
                         softcap=None, alibi_slopes=None, sinks=None, return_lse=False, mask=None,
                         block_mask=None, block_size=None, transport=None):
    """`flash_attention` over a sequence sharded across the ranks of `group`.

    Args:
      q: `[B, Hq, N_local, D]`; k: `[B, Hkv, N_local, D]`; v:
        `[B, Hkv, N_local, Dv]`: this rank's shard of the sequence, in
        `layout` (`shard()` cuts one). Every rank passes the same shapes.
      group: an `mx.distributed` group (default: the global one).
      layout: "contiguous" (rank r holds chunk r of W) or "zigzag" (rank r
        holds chunks r and 2W-1-r of 2W, which balances causal work;
        N_local must then be even).
      scale, causal, window, softcap, alibi_slopes, sinks: as
        `flash_attention`, by global position. `alibi_slopes` and `sinks`
        are the same on every rank; the gradient of `sinks` is this rank's
        share (sum it over ranks like any replicated parameter's).
      return_lse: also return the float32 lse `[B, Hq, N_local]`.
      mask, block_mask, block_size: not supported across shards (an
        `N x N` array has no place in a sharded sequence).
      transport: "ring" (send/recv to neighbours; backends ring, jaccl,
        mpi) or "gather" (all_gather + reduce-scatter; MLX's nccl backend,
        which has no send/recv). Default: "gather" on CUDA, else "ring".

    Returns:
      This rank's rows of the output `[B, Hq, N_local, Dv]`, or `(out, lse)`.
    """
    for name, value in (("mask", mask), ("block_mask", block_mask), ("block_size", block_size)):
        if value is not None:
            raise ValueError(
                f"{name}: not supported by ring_flash_attention (a dense per-pair mask does not shard); "
                "use causal, window, alibi_slopes, softcap or sinks"
            )
    layout = layouts.check_layout(layout)
    group = group if group is not None else mx.distributed.init()
    if not isinstance(group, mx.distributed.Group):
        raise TypeError(f"group: expected an mx.distributed.Group or None, got {type(group).__name__}")
    backend = dispatch.backend_name(None)
    transport = _default_transport(backend) if transport is None else transport
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: expected 'ring', 'gather' or None, got {transport!r}")
    spec, inputs = validate_attention(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
                                      alibi_slopes=alibi_slopes, sinks=sinks)
    if spec.seqlen_k != spec.seqlen_q:
        raise ValueError(
            f"k: ring attention shards one sequence, so k must have q's shard length "
            f"({spec.seqlen_q}), got {spec.seqlen_k}"
        )
    per_rank = layouts.chunks_per_rank(layout)
    if spec.seqlen_q == 0 or spec.seqlen_q % per_rank:
        raise ValueError(
            f"q: layout {layout!r} cuts each shard into {per_rank} equal chunk(s), so N_local must be a "
            f"positive multiple of {per_rank}; got {spec.seqlen_q} (use layout='contiguous' or pad)"
        )
    _check_agreement(group, {
        "batch": spec.batch, "heads_q": spec.heads_q, "heads_kv": spec.heads_kv, "N_local": spec.seqlen_q,
        "head_dim": spec.head_dim_qk, "head_dim_v": spec.head_dim_v, "dtype": _DTYPE_CODE[spec.dtype],
        "layout": _LAYOUT_CODE[layout], "transport": TRANSPORTS.index(transport), "scale": spec.scale,
        "window_left": spec.window_left, "window_right": spec.window_right, "softcap": spec.softcap,
        "alibi_slopes": spec.has_alibi, "sinks": spec.has_sinks,
    })
    rules = blocks.Rules(
        chunk=spec.seqlen_q // per_rank, window_left=spec.window_left, window_right=spec.window_right,
        scale=spec.scale, softcap=spec.softcap or None, has_alibi=spec.has_alibi,
    )
    _groups[id(group)] = group
    names = tuple(n for n in ("alibi", "sinks") if getattr(inputs, n) is not None)
    fn = _differentiable(id(group), rules, layout, transport, names)
    out, lse = fn(q, k, v, *[getattr(inputs, n) for n in names])
    return (out, lse) if return_lse else out
