"""Per-tensor fp8 scales out of MLX's host-resident small pool: before / after, chained (GPU machine; issue 15).

    python tools/cuda_small_scale_ab.py OUT.json [--rounds 15]

MLX 0.32 keeps arrays of at most 8 bytes (a per-tensor float32 scale) in a
managed pool that stays in host memory; matmul2d's kernels read a scale in
every output element's thread. cuda.out_of_small_pool (session 16)
hands the kernels a padded device copy instead. This times, interleaved
round by round, 32 chained fp16 x e4m3 decode products (M 1, N = K 4096,
each call's x the last output) with: a per-tensor scale through today's
path ("per_tensor"), the same with out_of_small_pool bypassed
("per_tensor_in_pool", the old behaviour), and a per-channel scale
("per_channel", 16 KiB: never in the pool); then FP8Linear(per_channel=False)
and (per_channel=True) layers chained the same way.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

import mlx_flash
import mlx_flash.nn
from mlx_flash.backends import cuda as cuda_backend


def main():
    path = sys.argv[1]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 15
    layers, N = 32, 4096
    x0 = (mx.random.normal((1, N)) * 0.1).astype(mx.float16)
    weights = []
    for i in range(layers):
        w = mx.random.normal((N, N), key=mx.random.key(100 + i)) * N ** -0.5
        data, _ = mlx_flash.fp8.quantize(w, fmt="e4m3", axis=None)
        weights.append(data)
    per_tensor = mx.full((1, 1), 1.0, mx.float32)
    per_channel = mx.full((1, N), 1.0, mx.float32)
    lin_t = [mlx_flash.nn.FP8Linear.from_linear(nn.Linear(N, N, bias=False), per_channel=False) for _ in range(8)]
    lin_c = [mlx_flash.nn.FP8Linear.from_linear(nn.Linear(N, N, bias=False), per_channel=True) for _ in range(8)]
    mx.eval(x0, weights, per_tensor, per_channel, [m.parameters() for m in lin_t + lin_c])
    real = cuda_backend.out_of_small_pool

    def chain(scale, bypass=False):
        cuda_backend.out_of_small_pool = (lambda s, stream=None: s) if bypass else real
        try:
            x = x0
            for w in weights:
                x = mlx_flash.matmul2d(x, w, b_fmt="e4m3", b_scale=scale, transpose_b=True)
            return x
        finally:
            cuda_backend.out_of_small_pool = real

    def layers_chain(mods, bypass=False):
        cuda_backend.out_of_small_pool = (lambda s, stream=None: s) if bypass else real
        try:
            x = x0
            for _ in range(4):
                for m in mods:
                    x = m(x)
            return x
        finally:
            cuda_backend.out_of_small_pool = real

    plans = {"per_tensor": lambda: chain(per_tensor), "per_tensor_in_pool": lambda: chain(per_tensor, True),
             "per_channel": lambda: chain(per_channel),
             "fp8linear_per_tensor": lambda: layers_chain(lin_t), "fp8linear_per_tensor_in_pool":
                 lambda: layers_chain(lin_t, True), "fp8linear_per_channel": lambda: layers_chain(lin_c)}
    res = {"card": mx.device_info().get("device_name", "?"), "shape": "x [1, 4096] fp16 @ e4m3 [4096, 4096]^T, "
           "32 chained calls an eval", "us_per_call": {n: [] for n in plans}}
    want = None
    for name, fn in plans.items():  # warm-up; the three matmul2d chains must agree exactly
        out = fn()
        mx.eval(out)
        if name.startswith("per_tensor"):
            want = out if want is None else want
            res.setdefault("identical", {})[name] = bool(mx.array_equal(out, want).item())
    for _ in range(rounds):
        for name, fn in plans.items():
            out = fn()
            t0 = time.perf_counter()
            mx.eval(out)
            res["us_per_call"][name].append((time.perf_counter() - t0) / 32 * 1e6)
    res["median"] = {n: statistics.median(v) for n, v in res["us_per_call"].items()}
    res["min"] = {n: min(v) for n, v in res["us_per_call"].items()}
    for n in plans:
        print(n, "median", round(res["median"][n], 1), "min", round(res["min"][n], 1), flush=True)
    print("identical", res.get("identical"))
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
