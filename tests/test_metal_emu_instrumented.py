"""Instrumented emulation: the interleave mode that catches a missing barrier
between SIMD-groups, and the work counters (docs/metal_emulation.md).

The interleave fixtures are kernels with a deliberately missing
threadgroup_barrier, written so that the default schedule (every thread
runs to its next synchronisation point before any SIMD-group operation
completes) can never expose it, and the interleave mode must. Then a few
small cases of our attention kernels and of MLX's run under the mode.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import reference_np
from metal_emu import harness

_reason = harness.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SEEDS = range(6)

# SIMD-group 0 and 1 each store their half of `tile`, then read the other
# half. The simd_sum between store and load is no barrier between
# SIMD-groups: the fixed kernel has a threadgroup_barrier there.
_READ_BEFORE_WRITE = """
  threadgroup float tile[64];
  uint t = thread_position_in_threadgroup.x;
  tile[t] = a[t];
  float s = simd_sum(1.0f);
  {barrier}
  out[t] = tile[63 - t] * (s / 32.0f);
"""

# Every thread reads another SIMD-group's value and then overwrites its own
# slot; the missing barrier is the one between those reads and writes.
_WRITE_AFTER_READ = """
  threadgroup float tile[64];
  uint t = thread_position_in_threadgroup.x;
  tile[t] = a[t];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float x = tile[63 - t];
  x += simd_sum(0.0f);
  {barrier}
  tile[t] = 2.0f * a[t];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[t] = x + tile[63 - t];
"""


@pytest.fixture(autouse=True)
def _one_schedule_per_launch(monkeypatch):
    """The fixtures judge one schedule at a time, whatever the caller set."""
    monkeypatch.setenv("METAL_EMU_RACE_CHECK", "1")


def _run(body, barrier, seed):
    source = body.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);" if barrier else "")
    kernel = harness.metal_kernel("race_fixture", ["a"], ["out"], source)
    a = mx.arange(1, 65, dtype=mx.float32)
    (out,) = kernel(inputs=[a], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)],
                    output_dtypes=[mx.float32], seed=seed)
    return np.array(out)


_EXPECTED = {
    "read_before_write": np.arange(64, 0, -1, dtype=np.float32),
    "write_after_read": 3.0 * np.arange(64, 0, -1, dtype=np.float32),
}
_BODIES = {"read_before_write": _READ_BEFORE_WRITE, "write_after_read": _WRITE_AFTER_READ}


@pytest.mark.parametrize("fixture", sorted(_BODIES))
def test_default_schedule_misses_the_missing_barrier(fixture, monkeypatch):
    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "0")
    for seed in SEEDS:
        np.testing.assert_array_equal(_run(_BODIES[fixture], False, seed), _EXPECTED[fixture])


@pytest.mark.parametrize("fixture", sorted(_BODIES))
def test_interleave_mode_catches_the_missing_barrier(fixture, monkeypatch):
    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "1")
    wrong = [seed for seed in SEEDS if not np.array_equal(_run(_BODIES[fixture], False, seed), _EXPECTED[fixture])]
    # Each seed picks a SIMD-group priority order; the one that runs first
    # reads (or overwrites) before the other has written (or read).
    assert len(wrong) >= len(SEEDS) // 2, f"interleave mode exposed the race under seeds {wrong} only"


@pytest.mark.parametrize("fixture", sorted(_BODIES))
def test_interleave_mode_passes_the_fixed_kernel(fixture, monkeypatch):
    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "1")
    for seed in SEEDS:
        np.testing.assert_array_equal(_run(_BODIES[fixture], True, seed), _EXPECTED[fixture])


# --------------------------------------------------------------------------
# Our kernels and MLX's under the interleave mode (a few small cases)


def _rel(got, want):
    got = np.array(got.astype(mx.float32)) if isinstance(got, mx.array) else np.asarray(got)
    assert np.all(np.isfinite(got))
    return float(np.abs(got - want).max() / np.abs(want).max())


def _qkv(seed, B, Hq, Hkv, Nq, Nk, D, dtype=mx.float32):
    g = np.random.default_rng(seed)
    return [mx.array(g.standard_normal(s).astype(np.float32)).astype(dtype)
            for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))]


@pytest.mark.parametrize("case", [
    ("forward", dict(causal=True)),
    ("decode", dict()),
    ("backward", dict(causal=True)),
], ids=lambda c: c[0])
def test_our_kernels_under_interleave(case, monkeypatch):
    from metal_emu import attention as emu

    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "1")
    name, options = case
    Nq = 3 if name == "decode" else 37
    q, k, v = _qkv(7, 1, 2, 1, Nq, 45, 32)
    if name == "backward":
        dout = _qkv(8, 1, 2, 1, Nq, 45, 32)[0]
        grads = emu.gradients(q, k, v, dout, **options)
        want = reference_np.attention_np(q, k, v, dout=dout, **options)
        for n in ("q", "k", "v"):
            assert _rel(grads[n], want["d" + n]) < 5e-5, n
    else:
        out, lse = emu.forward(q, k, v, **options)
        want = reference_np.attention_np(q, k, v, **options)
        assert _rel(out, want["out"]) < 2e-5
        assert _rel(lse, want["lse"]) < 2e-6


@pytest.mark.parametrize("nq", [37, 2], ids=["prefill", "decode"])
def test_our_wide_head_key_range_kernels_under_interleave(nq, monkeypatch):
    """MLA's 576/512 in fp32 (Q, dQ's V and dK/dV's dO from device memory, O
    and dQ in column blocks) with per-batch key ranges, forward and backward."""
    from metal_emu import attention as emu

    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "1")
    g = np.random.default_rng(11 + nq)
    q, k, v, dout = (mx.array(g.standard_normal(s).astype(np.float32))
                     for s in ((2, 2, nq, 576), (2, 1, 45, 576), (2, 1, 45, 512), (2, 2, nq, 512)))
    options = dict(key_start=mx.array([3, -4], mx.int32), key_len=mx.array([30, 20], mx.int32))
    out, lse = emu.forward(q, k, v, **options)
    grads = emu.gradients(q, k, v, dout, **options)
    want = reference_np.attention_np(q, k, v, dout=dout, **options)
    assert _rel(out, want["out"]) < 2e-5
    assert _rel(lse, want["lse"]) < 2e-6
    for n in ("q", "k", "v"):
        assert _rel(grads[n], want["d" + n]) < 5e-5, n


def test_mlx_kernels_under_interleave(monkeypatch):
    from metal_emu import mlx_attention

    reason = mlx_attention.unavailable_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("METAL_EMU_INTERLEAVE", "1")
    q, k, v = _qkv(9, 1, 2, 2, 37, 45, 64)
    out, _ = mlx_attention.steel_attention(q, k, v, scale=0.125, causal=True)
    assert _rel(out, reference_np.attention_np(q, k, v, scale=0.125, causal=True)["out"]) < 2e-5
    q1 = q[:, :, :2]
    want = reference_np.attention_np(q1, k, v, scale=0.125)["out"]
    assert _rel(mlx_attention.sdpa_vector(q1, k, v, scale=0.125), want) < 2e-5
    assert _rel(mlx_attention.sdpa_vector_2pass(q1, k, v, scale=0.125), want) < 2e-5


# --------------------------------------------------------------------------
# Counting


_COUNTED = """
  threadgroup float tile[64];
  uint t = thread_position_in_threadgroup.x;
  uint g = thread_position_in_grid.x;
  tile[t] = a[g];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float x = tile[63 - t];
  simdgroup_float8x8 m = simdgroup_float8x8(1.0f);
  simdgroup_multiply_accumulate(m, m, m, m);
  out[g] = exp(x) + exp2(x) + tanh(x) + m.thread_elements()[0];
"""


def test_counting_a_known_kernel():
    kernel = harness.metal_kernel("counted", ["a"], ["out"], _COUNTED)
    a = mx.array(np.linspace(-1, 1, 256).astype(np.float32))
    with harness.counting() as launches:
        (out,) = kernel(inputs=[a], grid=(256, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(256,)],
                        output_dtypes=[mx.float32])
    (c,) = launches
    assert c["threadgroups"] == 4 and c["barriers"] == 4
    assert c["simdgroup_mma"] == 8  # one per SIMD-group (2 per threadgroup)
    assert c["threadgroup_write_bytes"] == 256 * 4 and c["threadgroup_read_bytes"] == 256 * 4
    assert c["exp"] == 256 and c["exp2"] == 256 and c["tanh"] == 256 and c["log"] == 0
    assert c["buffers"]["a"] == (256 * 4, 0)
    assert c["buffers"]["out"] == (0, 256 * 4)
    x = np.linspace(-1, 1, 256).astype(np.float32).reshape(4, 64)[:, ::-1].reshape(-1)
    # m = I, so m * m + m = 2 I: element 0 of a lane is 2 where it is diagonal.
    lane = np.arange(256) % 32
    row = (lane // 4 & 4) + (lane // 2) % 4
    col = (lane // 4 & 2) * 2 + (lane % 2) * 2
    want = np.exp(x) + np.exp2(x) + np.tanh(x) + np.where(row == col, 2.0, 0.0)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-6)


def test_counting_only_some_threadgroups():
    kernel = harness.metal_kernel("counted", ["a"], ["out"], _COUNTED)
    a = mx.array(np.linspace(-1, 1, 256).astype(np.float32))
    with harness.counting(only_threadgroups=lambda name, tgs: [(1, 0, 0)]) as launches:
        (out,) = kernel(inputs=[a], grid=(256, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(256,)],
                        output_dtypes=[mx.float32])
    (c,) = launches
    assert c["threadgroups"] == 1 and c["barriers"] == 1 and c["buffers"]["a"] == (64 * 4, 0)
    out = np.array(out)
    assert np.all(np.isfinite(out[64:128])) and np.all(np.isnan(out[:64])) and np.all(np.isnan(out[128:]))
