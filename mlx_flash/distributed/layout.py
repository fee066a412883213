"""How a sequence is cut into per-rank shards ("contiguous" or "zigzag").

The sequence of length N is cut into equal chunks. With "contiguous" there
are W chunks and rank r holds chunk r. With "zigzag" there are 2W chunks and
rank r holds chunks r and 2W-1-r (in that order), so that under a causal
mask every rank has the same amount of work: an early chunk (little to
attend to) paired with a late one (much to attend to).
"""

from __future__ import annotations

import mlx.core as mx

from .transport import in_ring_order

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'contiguous' or 'zigzag', got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def rank_chunks(layout: str, world: int, rank: int) -> tuple:
    """Global chunk indices held by `rank`, in the order they sit in its shard."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def local_positions(n_local: int, layout: str, world: int, rank: int) -> mx.array:
    """Global sequence positions (int32) of this rank's `n_local` tokens."""
    chunk = n_local // chunks_per_rank(layout)
    starts = [c * chunk for c in rank_chunks(layout, world, rank)]
    return mx.concatenate([mx.arange(s, s + chunk, dtype=mx.int32) for s in starts])


def _group(group):
    return group if group is not None else mx.distributed.init()


def _axis(x: mx.array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: {axis} is out of range for an array of rank {x.ndim}")
    return axis % x.ndim


def shard(x: mx.array, group=None, layout: str = "zigzag", axis: int = -2) -> mx.array:
    """This rank's shard of the full sequence `x` (the same on every rank).

    `x.shape[axis]` must be a multiple of W ("contiguous") or 2W ("zigzag").
    """
    group, layout = _group(group), check_layout(layout)
    axis = _axis(x, axis)
    world, rank = group.size(), group.rank()
    pieces = world * chunks_per_rank(layout)
    n = x.shape[axis]
    if n % pieces:
        raise ValueError(
            f"x: sequence length {n} (axis {axis}) must be a multiple of {pieces} "
            f"for layout {layout!r} over {world} ranks"
        )
    chunk = n // pieces
    index = [slice(None)] * x.ndim
    parts = []
    for c in rank_chunks(layout, world, rank):
        index[axis] = slice(c * chunk, (c + 1) * chunk)
        parts.append(x[tuple(index)])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def unshard(x: mx.array, group=None, layout: str = "zigzag", axis: int = -2) -> mx.array:
    """The full sequence, on every rank, from each rank's shard (an all_gather).

    Differentiable: the gradient of the full array flows back to each shard.
    """
    group, layout = _group(group), check_layout(layout)
    axis = _axis(x, axis)
    world = group.size()
    if world == 1:
        return x
    per_rank = chunks_per_rank(layout)
    if x.shape[axis] % per_rank:
        raise ValueError(f"x: shard length {x.shape[axis]} (axis {axis}) must be even for layout 'zigzag'")
    moved = mx.moveaxis(x, axis, 0)
    # [W * n_local, ...], rank-major; in order with ring attention's transfers (same sockets).
    gathered = in_ring_order(mx.distributed.all_gather, moved, group=group)
    chunk = x.shape[axis] // per_rank
    pieces = gathered.reshape(world, per_rank, chunk, *moved.shape[1:])
    order = [pieces[c, 0] if c < world else pieces[2 * world - 1 - c, 1] for c in range(world * per_rank)] \
        if layout == "zigzag" else [pieces[r, 0] for r in range(world)]
    return mx.moveaxis(mx.concatenate(order, axis=0), 0, axis)
