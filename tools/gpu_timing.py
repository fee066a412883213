"""Timers shared by the GPU tools (tools/cuda_*.py), so that every tool times
a call the same way and the numbers of one round compare with another's.

Both return seconds per call. The MLX timer evaluates one call per eval (a
call's host work counts, as it does for a model); the torch timer queues its
calls and reads CUDA events, as torch users see SDPA.
"""

from __future__ import annotations

import time

import mlx.core as mx


def mlx_seconds(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call of `fn` (returns arrays), one call per eval, after warm-ups."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) / iters


def torch_sdpa_seconds(shape, dtype, causal: bool, iters: int, backward: bool = False, warmup: int = 3):
    """Seconds per call of torch's SDPA (forward, or forward + backward) on its
    own random inputs of `shape` in `dtype` (mx.float16 or mx.bfloat16), timed
    with CUDA events over `iters` queued calls; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tdt = torch.float16 if dtype == mx.float16 else torch.bfloat16
    q, k, v = (torch.randn(shape, device="cuda", dtype=tdt, requires_grad=backward) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=tdt) if backward else None

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            torch.autograd.grad(out, (q, k, v), g)

    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters
