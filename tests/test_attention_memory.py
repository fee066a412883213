"""The fused backward never holds an N x N array: peak memory stays O(N)."""

import mlx.core as mx
import pytest

import mlx_flash
from helpers import qkv, rng


# The CPU kernel's memory: every op of the step (the loss, its cotangents) on
# the CPU, so a GPU default device does not add its own buffers to the peak.
@pytest.mark.usefixtures("cpu_default_device")
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_memory_is_linear_in_n(causal):
    B, H, N, D = 1, 2, 8192, 64
    q, k, v = qkv(rng("memory", causal), B, H, H, N, N, D)
    mx.eval(q, k, v)

    def loss(q, k, v):
        return mx.sum(mlx_flash.flash_attention(q, k, v, causal=causal, stream=mx.cpu))

    grad = mx.grad(loss, argnums=(0, 1, 2))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    grads = grad(q, k, v)
    mx.eval(grads)
    extra = mx.get_peak_memory() - base
    one_head_scores = N * N * 4
    assert extra < one_head_scores, f"extra peak {extra / 2**20:.0f} MiB >= one N x N fp32 head ({one_head_scores / 2**20:.0f} MiB)"
    # Far below, in fact: out, lse and three grads, plus O(N * D) packing scratch,
    # and the backward's dQ accumulator per worker thread (csrc/attention_cpu_kernel.cpp),
    # N x D fp32 per thread: the one term that grows with the core count.
    from mlx_flash import _ext

    inputs_bytes = 3 * B * H * N * D * 4
    per_thread_dq = _ext.num_threads() * N * D * 4
    assert extra < 4 * inputs_bytes + per_thread_dq, f"extra peak {extra / 2**20:.1f} MiB"


@pytest.mark.usefixtures("cpu_default_device")
def test_key_ranges_add_no_n_by_n_memory():
    """Per-batch key ranges cost a [B, 1, 1, Nk] mask, not [B, 1, Nq, Nk]."""
    B, H, N, D = 2, 1, 8192, 16
    q, k, v = qkv(rng("memory-key-ranges"), B, H, H, N, N, D)
    start = mx.array([0, 3000], mx.int32)
    mx.eval(q, k, v, start)

    def loss(q, k, v):
        return mx.sum(mlx_flash.flash_attention(q, k, v, causal=True, key_start=start, stream=mx.cpu))

    grad = mx.grad(loss, argnums=(0, 1, 2))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(q, k, v))
    extra = mx.get_peak_memory() - base
    from mlx_flash import _ext

    inputs_bytes = 3 * B * H * N * D * 4
    per_thread_dq = _ext.num_threads() * N * D * 4
    assert extra < 4 * inputs_bytes + per_thread_dq, f"extra peak {extra / 2**20:.1f} MiB"
    assert extra < B * N * N // 8  # an eighth of one [B, 1, N, N] bool mask


@pytest.mark.usefixtures("cpu_default_device")
def test_cpu_kernels_pack_only_the_key_range():
    """A row that keeps 300 of 65536 keys: the CPU kernels pack (and visit)
    only the key tiles of its range, so their scratch is O(range * D), where
    over all keys it holds fp32 panels of the whole of K and V."""
    B, H, Nq, Nk, D = 1, 1, 64, 65536, 128
    q, k, v = qkv(rng("memory-key-tiles"), B, H, H, Nq, Nk, D)
    ranges = dict(key_start=mx.array([40000], mx.int32), key_len=mx.array([300], mx.int32))
    mx.eval(q, k, v, ranges)

    def extra_peak(fn):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    forward = lambda **kw: lambda: mlx_flash.flash_attention(q, k, v, stream=mx.cpu, **kw)
    loss = lambda **kw: lambda q, k, v: mx.sum(mlx_flash.flash_attention(q, k, v, stream=mx.cpu, **kw))
    backward = lambda **kw: lambda: mx.grad(loss(**kw), argnums=(0, 1, 2))(q, k, v)
    panels = 2 * Nk * D * 4  # K^T and V, fp32
    assert extra_peak(forward()) >= panels  # the measure sees the packing
    assert extra_peak(forward(**ranges)) < panels / 32
    grads = 2 * Nk * D * 4 + Nq * D * 4  # dk, dv (zero outside the range: still outputs), dq
    assert extra_peak(backward()) >= grads + panels
    assert extra_peak(backward(**ranges)) < grads + panels / 32
