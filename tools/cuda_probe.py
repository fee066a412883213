"""Run one attention call shape on the GPU a few times (for ncu / nsys).

    python tools/cuda_probe.py B Hq Hkv Nq Nk D causal(0/1) dtype(float16|bfloat16) [backward(0/1)]

PROBE_MXFAST=1 runs mx.fast.scaled_dot_product_attention (cuDNN) instead, for
its kernels beside ours under the same profiler.
"""
import os
import sys

import mlx.core as mx

import mlx_flash

B, Hq, Hk, Nq, Nk, D, causal = (int(a) for a in sys.argv[1:8])
dtype = getattr(mx, sys.argv[8])
backward = len(sys.argv) > 9 and sys.argv[9] == "1"
q = mx.random.normal((B, Hq, Nq, D)).astype(dtype)
k = mx.random.normal((B, Hk, Nk, D)).astype(dtype)
v = mx.random.normal((B, Hk, Nk, D)).astype(dtype)
mx.eval(q, k, v)
if os.environ.get("PROBE_MXFAST") == "1":
    def attend(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask="causal" if causal else None)
else:
    def attend(q, k, v):
        return mlx_flash.flash_attention(q, k, v, causal=bool(causal))
if backward:
    def loss(q, k, v):
        return attend(q, k, v).sum()
    f = mx.grad(loss, argnums=(0, 1, 2))
    for _ in range(2):
        mx.eval(f(q, k, v))
else:
    for _ in range(2):
        mx.eval(attend(q, k, v))
mx.synchronize()
print("ok")
