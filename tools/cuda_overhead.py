"""Where does a small mlx_flash CUDA call spend its time? (run on the GPU machine)

Prints, in microseconds: the latency of one call evaluated alone (what a decode
step sees) and the cost per call when 20 independent calls share one eval
(close to the GPU time), for trivial mx.fast.cuda_kernel calls with a tiny and
with mlx_flash's full header, for mx.fast SDPA and for mlx_flash at a tiny, a
small and the decode shape. Writes the numbers as JSON to argv[1] if given.
"""

from __future__ import annotations

import json
import sys
import time

import mlx.core as mx

import mlx_flash
from mlx_flash.backends import cuda as cb

import gpu_timing  # noqa: E402  (tools/, beside this file)


def latency(fn, iters=60):
    """Microseconds per call, one call per eval after warm-ups."""
    return gpu_timing.mlx_seconds(fn, iters) * 1e6


def per_call_batched(fn, n=20, iters=10):
    def many():
        return [fn() for _ in range(n)]

    return latency(many, iters) / n


def build_only(fn, iters=200):
    """Graph construction alone (no eval): Python and MLX's source assembly."""
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def main():
    res = {}
    src = "unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 16) out[i] = inp[i] + 1.f;"
    small = mx.fast.cuda_kernel(name="triv_small", input_names=["inp"], output_names=["out"], source=src)
    big = mx.fast.cuda_kernel(name="triv_big", input_names=["inp"], output_names=["out"], source=src,
                              header=cb._header())
    x = mx.ones((16,), mx.float32)
    mx.eval(x)
    for name, kern in (("trivial kernel, tiny header", small), ("trivial kernel, mlx_flash header", big)):
        def call(kern=kern):
            return kern(inputs=[x], grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(16,)],
                        output_dtypes=[mx.float32])[0]
        res[name] = dict(latency=latency(call), batched=per_call_batched(call), build=build_only(call))

    def plain_add():
        return x + 1
    res["mx add"] = dict(latency=latency(plain_add), batched=per_call_batched(plain_add))

    shapes = {
        "tiny fwd (1,1,64,64) mma": (1, 1, 1, 64, 64, 64),
        "tiny decode (1,1,1,64)": (1, 1, 1, 1, 64, 64),
        "fwd (4,16,1024,64)": (4, 16, 16, 1024, 1024, 64),
        "decode 32:4 Nk=32768 D128": (1, 32, 4, 1, 32768, 128),
    }
    for name, (B, Hq, Hk, Nq, Nk, D) in shapes.items():
        q = mx.random.normal((B, Hq, Nq, D)).astype(mx.float16)
        k = mx.random.normal((B, Hk, Nk, D)).astype(mx.float16)
        v = mx.random.normal((B, Hk, Nk, D)).astype(mx.float16)
        mx.eval(q, k, v)
        s = D ** -0.5

        def ours():
            return mlx_flash.flash_attention(q, k, v, scale=s)

        def fast():
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=s)

        res[name] = {
            "mlx_flash": dict(latency=latency(ours), batched=per_call_batched(ours), build=build_only(ours)),
            "mx.fast": dict(latency=latency(fast), batched=per_call_batched(fast), build=build_only(fast)),
        }
    for key, val in res.items():
        print(key, json.dumps(val))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
