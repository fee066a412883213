"""Counted work: our Metal attention forward against MLX's steel attention
on the same shapes (tests/metal_emu/counts.py; the N = 4096 table in
docs/metal.md comes from tools/metal_counts.py).

At equal work, ours must read no more device bytes (Q, K, V and masks;
parameter structs apart) and issue no more 8x8 simdgroup multiplies than
MLX's kernel, causal skipping counted, and need no more barriers per key
tile. These are counts, not speed. Small N keeps the emulation quick; the
counts scale with N the same way for both kernels.
"""

from __future__ import annotations

import pytest

import mlx.core as mx

from metal_emu import counts, harness, mlx_attention

_REASON = mlx_attention.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

N = 512


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_ours_does_no_more_counted_work_than_mlx(D, causal):
    ours = counts.count_forward("ours", N, D, causal)
    mlx = counts.count_forward("mlx", N, D, causal)
    report = {n: (ours[n], mlx[n]) for n in ("simdgroup_mma", "device_read_bytes", "barriers_per_key_tile")}
    assert ours["device_read_bytes"] <= mlx["device_read_bytes"], report
    assert ours["simdgroup_mma"] <= mlx["simdgroup_mma"], report
    assert ours["barriers_per_key_tile"] <= mlx["barriers_per_key_tile"], report


def test_scaling_from_a_few_threadgroups_is_exact():
    """The causal extrapolation (blocks 0 .. 15 counted, the rest predicted
    per residue class, the last block checked) equals counting every
    threadgroup, on a grid large enough to extrapolate (32 blocks)."""
    n = 1024
    scaled = counts.count_forward("mlx", n, 64, True)
    q, k, v = counts._inputs(n, 64, mx.float16)
    with harness.counting() as records:
        counts.KERNELS["mlx"](q, k, v, True)
    full = counts._flatten(records)
    assert {c: scaled[c] for c in counts.COUNTERS} == full
    assert records[0]["threadgroups"] == scaled["threadgroups"] == 32


def test_counts_see_causal_skipping():
    full = counts.count_forward("mlx", N, 64, False)
    causal = counts.count_forward("mlx", N, 64, True)
    # 16 query blocks of 32 rows, key tiles of 32: block i visits i + 1 tiles.
    assert causal["key_tiles"] == 16 * 17 // 2 and full["key_tiles"] == 16 * 16
    assert causal["simdgroup_mma"] * 16 * 16 == full["simdgroup_mma"] * causal["key_tiles"]
