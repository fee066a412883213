"""The quantized decode inside a model-like decode step, against mx.fast over the fp16 cache (issue 16).

    python tools/cuda_decode_in_model.py OUT.json [--rounds 21] [--bits 4] [--smoke]

tools/cuda_quant_load_probe.py --ab chains 32 attention calls and nothing else. MLX then records
most of the step into one CUDA graph before the GPU starts (on an H100 a graph closes at 100 nodes
or 1000 MB of inputs: 4-bit caches take ~27 layers to fill it, fp16 caches ~7), so the step's wall
time adds the host's encoding (~14 us a node) to the GPU's, and more of it for us than for mx.fast.
A model's step has other nodes between its attention calls. Here each of 32 layers is
`x -> q = x Wq -> attention(q, layer's cache) -> x = a Wo` ("proj": two fp16 4096 x 4096
projections) or that plus an MLP (gate, up: 4096 x 14336, down: 14336 x 4096; "mlp"), GQA 32:8,
Nk 32768, D 128, group 64. Per variant three chains, timed interleaved round by round: the
projections alone (attention replaced by its query), ours, mx.fast. The attention's cost in the
step is a chain's time less the projections-only chain's; the JSON has medians and the ratio
mx.fast / ours of those costs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn


def main():
    path = sys.argv[1]
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 21
    bits = int(sys.argv[sys.argv.index("--bits") + 1]) if "--bits" in sys.argv else 4
    sys.path.insert(0, "tools")
    from cuda_quant_load_probe import layer_caches

    import mlx_flash

    layers, Hq, Hkv, Nk, D, F = 32, 32, 8, 32768, 128, 14336
    if "--smoke" in sys.argv:  # a check of the script itself on any machine: tiny sizes, one round
        layers, Nk, F, rounds = 2, 256, 512, 1
    E = Hq * D
    caches, fp16 = layer_caches(layers, Hkv, Nk, D, bits)

    def weight(shape, i):
        return (mx.random.normal(shape, key=mx.random.key(900 + i)) * shape[0] ** -0.5).astype(mx.float16)

    wq = [weight((E, E), 5 * i) for i in range(layers)]
    wo = [weight((E, E), 5 * i + 1) for i in range(layers)]
    mlp = [(weight((E, F), 5 * i + 2), weight((E, F), 5 * i + 3), weight((F, E), 5 * i + 4)) for i in range(layers)]
    mx.eval(wq, wo, mlp)
    x0 = (mx.random.normal((1, E), key=mx.random.key(5)) * 0.5).astype(mx.float16)

    def attend(kind, q, i):
        if kind == "proj_only":
            return q
        if kind == "ours":
            return mlx_flash.flash_attention_quantized(q, caches[i][0], caches[i][1], bits=bits, group_size=64)
        return mx.fast.scaled_dot_product_attention(q, *fp16[i], scale=D ** -0.5)

    def step(variant, kind):
        x = x0
        for i in range(layers):
            q = (x @ wq[i]).reshape(1, Hq, 1, D)
            x = attend(kind, q, i).reshape(1, E) @ wo[i]
            if variant == "mlp":
                g, u, d = mlp[i]
                x = x + (nn.silu(x @ g) * (x @ u)) @ d
        return x

    names = [(v, k) for v in ("proj", "mlp") for k in ("proj_only", "ours", "mx_fast")]
    times = {f"{v}/{k}": [] for v, k in names}
    for v, k in names:  # warm-up: compiles, plan caches, graph caches
        for _ in range(2):
            mx.eval(step(v, k))
    for _ in range(rounds):
        for v, k in names:
            out = step(v, k)
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(out)
            mx.synchronize()
            times[f"{v}/{k}"].append((time.perf_counter() - t0) / layers * 1e6)
    med = {n: statistics.median(t) for n, t in times.items()}
    res = {"card": mx.device_info().get("device_name", "?"), "bits": bits, "rounds": rounds,
           "shape": f"{layers} layers; GQA 32:8, Nk {Nk}, D {D}, {bits}-bit group 64; projections {E} x {E} fp16"
                    f" (mlp: also {E} x {F} x 2 and {F} x {E})",
           "us_per_layer": times, "median_us_per_layer": med, "attention_us_per_layer": {}, "ratio_vs_mx_fast": {}}
    for v in ("proj", "mlp"):
        ours = med[f"{v}/ours"] - med[f"{v}/proj_only"]
        fast = med[f"{v}/mx_fast"] - med[f"{v}/proj_only"]
        res["attention_us_per_layer"][v] = {"ours": ours, "mx_fast": fast}
        res["ratio_vs_mx_fast"][v] = fast / ours if ours > 0 else None
        res["ratio_vs_mx_fast"][v + "_whole_step"] = med[f"{v}/mx_fast"] / med[f"{v}/ours"]
        print(v, {k: round(med[f"{v}/{k}"], 1) for _, k in names[:3]}, "attention ours", round(ours, 1),
              "mx.fast", round(fast, 1), "ratio", round(fast / ours, 3) if ours > 0 else None, flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
