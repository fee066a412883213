"""The fused backward never holds an N x N array: peak memory stays O(N)."""

import mlx.core as mx
import pytest

import mlx_flash
from helpers import qkv, rng


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
    # Far below, in fact: out, lse and three grads, plus O(N * D) packing scratch.
    inputs_bytes = 3 * B * H * N * D * 4
    assert extra < 4 * inputs_bytes, f"extra peak {extra / 2**20:.1f} MiB"
