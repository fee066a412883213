"""Run one attention call shape on the GPU a few times (for ncu / nsys).

    python tools/cuda_probe.py B Hq Hkv Nq Nk D causal(0/1) dtype(float16|bfloat16) [backward(0/1)]
"""
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
if backward:
    def loss(q, k, v):
        return mlx_flash.flash_attention(q, k, v, causal=bool(causal)).sum()
    f = mx.grad(loss, argnums=(0, 1, 2))
    for _ in range(2):
        mx.eval(f(q, k, v))
else:
    for _ in range(2):
        mx.eval(mlx_flash.flash_attention(q, k, v, causal=bool(causal)))
mx.synchronize()
print("ok")
