"""What a chained decode step costs besides its kernels (GPU machine).

    python tools/cuda_chain_floor.py OUT.json [--layers 32] [--rounds 9] [--nk 32768]
    nsys profile -o OUT/chain --stats=true python tools/cuda_chain_floor.py OUT.json --rounds 3

Session 15 measured, with each layer's query the last layer's output (one
kernel at a time, as in a model), 60-75 us a call for mx.fast SDPA and for
our decodes at B 1, GQA 32:8, Nk 32768, D 128, while Nsight Compute gave
~50 us for our routed 4-bit kernel alone (H200) and the 4-bit cache's 38 MB
take ~10 us at the card's bandwidth. This times, in one process and in
interleaved rounds, the chained step (`layers` calls, then one eval) of:

* `floor`: the cheapest op with the same data dependence, `x * 1.0001` on
  the [1, 32, 1, 128] query: MLX's cost a dependent kernel in its CUDA graph;
* `mx_fast_fp16`, `ours_fp16`: SDPA over `layers` distinct fp16 caches;
* `ours_quant4`: flash_attention_quantized over 4-bit group-64 caches.

eval_us is the eval of the prebuilt step per call. Under nsys, the kernel
summary gives each kernel's GPU time, so eval_us minus the kernels' time is
what the chain costs besides them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

import mlx_flash
from mlx_flash.bench.cuda import chained_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--nk", type=int, default=32768)
    args = ap.parse_args()
    B, Hq, Hkv, D, L = 1, 32, 8, 128, args.layers
    s = D ** -0.5
    q = mx.random.normal((B, Hq, 1, D), key=mx.random.key(7)).astype(mx.float16)
    fp16, quant = [], []
    for i in range(L):
        kk, kv = mx.random.split(mx.random.key(1000 + i))
        k = mx.random.normal((B, Hkv, args.nk, D), key=kk).astype(mx.float16)
        v = mx.random.normal((B, Hkv, args.nk, D), key=kv).astype(mx.float16)
        fp16.append((k, v))
        quant.append((tuple(mx.quantize(k, group_size=64, bits=4)), tuple(mx.quantize(v, group_size=64, bits=4))))
        mx.eval(fp16[-1], quant[-1])
    calls = {
        "floor": lambda i, x: x * 1.0001,
        "mx_fast_fp16": lambda i, x: mx.fast.scaled_dot_product_attention(x, *fp16[i], scale=s),
        "ours_fp16": lambda i, x: mlx_flash.flash_attention(x, *fp16[i], scale=s),
        "ours_quant4": lambda i, x: mlx_flash.flash_attention_quantized(x, *quant[i], bits=4, group_size=64, scale=s),
    }
    for fn in calls.values():  # compile and record before timing
        for _ in range(2):
            mx.eval(chained_step(fn, q, L))
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            out = chained_step(fn, q, L)
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(out)
            times[name].append((time.perf_counter() - t0) / L * 1e6)
    res = {"card": mx.device_info().get("device_name", "?"), "layers": L, "nk": args.nk,
           "shape": f"B1 GQA 32:8 Nq 1 Nk {args.nk} D128 fp16, 4-bit group 64; chained: each query the last output",
           "eval_us_per_call": {n: statistics.median(t) for n, t in times.items()},
           "eval_us_min": {n: min(t) for n, t in times.items()}}
    print(json.dumps(res), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
