"""The C++ replay's short graph against its full graph, in one process (GPU machine).

    python tools/cuda_short_graph_ab.py OUT.json [--rounds 15] [--layers 32]

An untraced replayed call returns the kernel's out and lse without the custom
function's stop_gradient and CustomTransforms nodes (csrc/cuda_host.cpp,
`set_short_graph`); a traced one keeps them. This times both forms side by
side with mx.fast SDPA, switching the extension between them in interleaved
rounds (one step of each variant a round, so a change of host load hits all
alike), on:

* the decode step of issues 14 / 16: B 1, GQA 32:8, 1 query, Nk 32768, D 128,
  fp16 q, `layers` distinct caches (one call a layer, then one eval):
  flash_attention over the fp16 caches and flash_attention_quantized over
  4-bit group-64 caches, beside mx.fast over the fp16 caches; the calls
  independent (MLX may run them concurrently in its CUDA graph) and
  *chained* (each layer's query is the previous layer's output, so the
  kernels run one after another, as in a model);
* the host-bound prefill of issue 14: (4, 16, 1024, 64) fp16 forward, ten
  calls queued per eval.

Per call: build_us (graph building), eval_us (the eval of the prebuilt calls),
step_us (both in series), medians over the rounds; each variant's ratio to
mx.fast's step. Before timing, every short-graph result is checked bit for
bit against the full graph's, and the extension's counters show that the
short replays happened.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

import mlx_flash
from mlx_flash.backends import cuda_host
from mlx_flash.bench.cuda import chained_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nk", type=int, default=32768)
    args = ap.parse_args()
    host = cuda_host.ACTIVE
    if host is None:
        raise SystemExit("needs mlx_flash._cuda_host and a CUDA GPU")
    B, Hq, Hkv, Nk, D, L = 1, 32, 8, args.nk, 128, args.layers
    s = D ** -0.5
    q = mx.random.normal((B, Hq, 1, D), key=mx.random.key(7)).astype(mx.float16)
    fp16, quant = [], []
    for i in range(L):
        kk, kv = mx.random.split(mx.random.key(1000 + i))
        k = mx.random.normal((B, Hkv, Nk, D), key=kk).astype(mx.float16)
        v = mx.random.normal((B, Hkv, Nk, D), key=kv).astype(mx.float16)
        fp16.append((k, v))
        quant.append((tuple(mx.quantize(k, group_size=64, bits=4)), tuple(mx.quantize(v, group_size=64, bits=4))))
        mx.eval(fp16[-1], quant[-1])
    pq, pk, pv = (mx.random.normal((4, 16, 1024, 64), key=mx.random.key(50 + j)).astype(mx.float16) for j in range(3))
    mx.eval(pq, pk, pv)

    # name: (mx.fast's call of layer i with query x, ours, calls a step, chained)
    fast = lambda i, x: mx.fast.scaled_dot_product_attention(x, *fp16[i], scale=s)  # noqa: E731
    ours16 = lambda i, x: mlx_flash.flash_attention(x, *fp16[i], scale=s)  # noqa: E731
    ours4 = lambda i, x: mlx_flash.flash_attention_quantized(x, *quant[i], bits=4, group_size=64, scale=s)  # noqa: E731
    cases = {
        "decode_fp16": (fast, ours16, L, False),
        "decode_quant4": (fast, ours4, L, False),
        "decode_fp16_chained": (fast, ours16, L, True),
        "decode_quant4_chained": (fast, ours4, L, True),
        "prefill_4x16x1024x64": (lambda i, x: mx.fast.scaled_dot_product_attention(pq, pk, pv, scale=0.125),
                                 lambda i, x: mlx_flash.flash_attention(pq, pk, pv, scale=0.125), 10, False),
    }
    res = {"card": mx.device_info().get("device_name", "?"), "mlx": mx.__version__,
           "shape": f"decode: B1 GQA 32:8 Nq 1 Nk {Nk} D128 fp16 q, {L} layers (distinct caches) a step; "
                    "prefill: (4,16,1024,64) fp16, 10 calls queued a step",
           "rounds": args.rounds, "check": {}, "cases": {}}

    def step(fn, calls, chained):
        t0 = time.perf_counter()
        if chained:  # each layer's query is the previous layer's output: the kernels run in series
            outs = [chained_step(fn, q, calls)]
        else:
            outs = [fn(i, q) for i in range(calls)]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        return (t1 - t0) / calls, (t2 - t1) / calls, (t2 - t0) / calls

    for name, (anchor, ours, calls, chained) in cases.items():
        # Warm-up and the bit-for-bit check: record, then a full and a short replay of layer 0.
        mx.eval(anchor(0, q), ours(0, q))
        host.set_short_graph(False)
        full = ours(0, q)
        mx.eval(full)
        shorts = host.short_graph_stats()[0]
        host.set_short_graph(True)
        short = ours(0, q)
        mx.eval(short)
        took_short = host.short_graph_stats()[0] - shorts
        same = bool(np.array_equal(np.array(full.astype(mx.float32)), np.array(short.astype(mx.float32)),
                                   equal_nan=True))
        res["check"][name] = {"short_replays": took_short, "bit_identical": same}
        print(name, res["check"][name], flush=True)
        samples = {"mx_fast": [], "short": [], "full": []}
        for _ in range(args.rounds):
            samples["mx_fast"].append(step(anchor, calls, chained))
            for form in ("short", "full"):
                host.set_short_graph(form == "short")
                samples[form].append(step(ours, calls, chained))
        host.set_short_graph(True)
        out = {}
        for form, xs in samples.items():
            out[form] = {key: statistics.median(x[j] for x in xs) * 1e6
                         for j, key in enumerate(("build_us", "eval_us", "step_us"))}
        for form in ("short", "full"):
            out[form]["step_vs_mx_fast"] = out["mx_fast"]["step_us"] / out[form]["step_us"]
            out[form]["eval_vs_mx_fast"] = out["mx_fast"]["eval_us"] / out[form]["eval_us"]
        res["cases"][name] = out
        print(name, json.dumps({f: {k: round(v, 2) for k, v in d.items()} for f, d in out.items()}), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    res["host_stats"] = cuda_host.stats()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("host", res["host_stats"])


if __name__ == "__main__":
    main()
