"""Tile sizes of the Metal attention kernels, mirrored from the headers.

Python mirrors of the constexpr rules of metal_src/attention_common.h and
attention_bwd.h (docs/metal.md, "Tile sizes" and "Wide heads"), which the
wrapper (metal.py) needs for its launch grids and template arguments;
test_metal_tile_sizes_match_header holds them equal to the headers'.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Threadgroup memory: 32 KiB per threadgroup on Apple GPUs; tiles aim at half
# of it so that two threadgroups can share a core (docs/metal.md).
_TG_BUDGET = 16 * 1024
_TG_LIMIT = 32 * 1024


def _pad8(d: int) -> int:
    return -(-d // 8) * 8


def _tile_ld(d: int, itemsize: int) -> int:
    return _pad8(d) + 16 // itemsize  # mirrors mlxf::tile_ld


def _fwd_q_elems(dqk: int, nsg: int, itemsize: int) -> int:
    return 8 * nsg * _tile_ld(dqk, itemsize)


def d_blocks(d: int) -> int:
    """Threadgroups along a head dim past 256 (mlxf::d_blocks): the forward's
    O columns (Dv) and dQ's columns (Dqk), at most 32 fragments each."""
    return (_pad8(d) // 8 + 31) // 32


def _d_block_cols(d: int) -> int:
    return -(-(_pad8(d) // 8) // d_blocks(d)) * 8  # mirrors mlxf::d_block_cols


def _fwd_kv_elems(dqk: int, dv: int, bk: int, itemsize: int) -> int:
    return bk * max(_tile_ld(dqk, itemsize), _tile_ld(_d_block_cols(dv), itemsize))


def fwd_q_in_tg(dqk: int, dv: int, nsg: int, bk: int, itemsize: int) -> bool:
    """Whether the forward keeps its Q tile in threadgroup memory next to a
    K/V tile of `bk` keys (mlxf::fwd_q_in_tg)."""
    return (_fwd_q_elems(dqk, nsg, itemsize) + _fwd_kv_elems(dqk, dv, bk, itemsize)) * itemsize + 4 * nsg <= _TG_LIMIT


def fwd_tg_bytes(dqk: int, dv: int, nsg: int, bk: int, itemsize: int) -> int:
    """Threadgroup bytes of the forward kernel (mlxf::fwd_tg_bytes); one
    simdgroup (decode) reads K/V fragments from device memory directly."""
    if nsg == 1:
        return itemsize + 4
    q = _fwd_q_elems(dqk, nsg, itemsize) if fwd_q_in_tg(dqk, dv, nsg, bk, itemsize) else 0
    return (q + _fwd_kv_elems(dqk, dv, bk, itemsize)) * itemsize + 4 * nsg


def _fwd_plan_bytes(dqk: int, dv: int, bk: int, itemsize: int) -> int:
    """mlxf::fwd_plan_bytes: BK is planned for 4 simdgroups, with the Q tile
    where it fits next to an 8-key tile."""
    q = _fwd_q_elems(dqk, 4, itemsize) if fwd_q_in_tg(dqk, dv, 4, 8, itemsize) else 0
    return (q + _fwd_kv_elems(dqk, dv, bk, itemsize)) * itemsize + 16


def _largest_fitting(candidates, nbytes):
    """The first candidate whose tile fits the budget, else the smallest.
    Past what 32 KiB holds (fp32 with Dqk + Dv over about 1000), the
    kernels read the second operand (V for dQ, dO for dK/dV) from device
    memory instead (mlxf::dq_v_in_tg, dkdv_do_in_tg)."""
    return next((c for c in candidates if nbytes(c) <= _TG_BUDGET), candidates[-1])


@dataclass(frozen=True)
class Tiles:
    fwd_nsg: int  # simdgroups per forward threadgroup (8 query rows each)
    fwd_bk: int   # keys per forward K/V tile
    dq_bk: int    # keys per dQ K+V tile
    dkdv_nsg: int  # simdgroups per dK/dV threadgroup (8 keys each)
    dkdv_bq: int  # queries per dK/dV Q+dO tile


@functools.lru_cache(maxsize=None)
def tile_sizes(head_dim_qk: int, head_dim_v: int, itemsize: int) -> Tiles:
    """Tile sizes for one head-dim pair and element size (bytes)."""
    ld_sum = _tile_ld(head_dim_qk, itemsize) + _tile_ld(head_dim_v, itemsize)
    fwd_bytes = functools.partial(_fwd_plan_bytes, head_dim_qk, head_dim_v, itemsize=itemsize)
    fwd_bk = next((bk for bk in (64, 32) if fwd_bytes(bk=bk) <= _TG_BUDGET), 16 if fwd_bytes(bk=16) <= _TG_LIMIT else 8)
    dq_bk = _largest_fitting((64, 32, 16, 8), lambda bk: bk * ld_sum * itemsize)
    dkdv_bq = _largest_fitting((64, 32, 16, 8), lambda bq: bq * ld_sum * itemsize + 2 * bq * 4)
    return Tiles(fwd_nsg=4, fwd_bk=fwd_bk, dq_bk=dq_bk, dkdv_nsg=4, dkdv_bq=dkdv_bq)
