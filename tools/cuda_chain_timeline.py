"""Where a chained decode step's time goes on the GPU: every kernel's start and duration, through
CUPTI (torch.profiler records the kernels of every library in the process, MLX's included).

    python tools/cuda_chain_timeline.py OUT.json [--layers 32] [--bits 4]

Runs a 32-layer chained step (each layer's query the last one's output, as a model's decode step)
of our quantized decode (GQA 32:8, Nk 32768, D 128, group 64) and of mx.fast over the fp16 caches,
each once to warm up and then once under the profiler, and reports per step: the wall time of the
eval, the GPU span from the first kernel's start to the last kernel's end, each kernel name's count
and median duration, and the median gap between one kernel's end and the next one's start. The
question (issue 16): does the chained step's time beyond the kernel's own lie in gaps between
kernels (launch, MLX's graph), or does the kernel run slower in the chain than alone under Nsight?
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx


def main():
    path = sys.argv[1]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 32
    bits = int(sys.argv[sys.argv.index("--bits") + 1]) if "--bits" in sys.argv else 4
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, "tools")
    from cuda_quant_load_probe import chained_step, layer_caches

    Hkv, Nk, D = 8, 32768, 128
    q = mx.random.normal((1, 32, 1, D), key=mx.random.key(3)).astype(mx.float16)
    caches, fp16 = layer_caches(layers, Hkv, Nk, D, bits)
    torch.zeros(1, device="cuda")  # CUDA context and CUPTI ready before the profiler starts

    def ours():
        return chained_step("ours", q, caches, fp16, bits)

    def fast():
        return chained_step("mx_fast", q, caches, fp16, bits)

    res = {"card": mx.device_info().get("device_name", "?"), "layers": layers, "bits": bits,
           "shape": f"B1 GQA 32:8 Nk {Nk} D {D}, group 64", "steps": {}}
    for name, step in (("ours", ours), ("mx_fast", fast), ("ours_again", ours), ("mx_fast_again", fast)):
        for _ in range(3):
            mx.eval(step())
        x = step()
        mx.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            mx.eval(x)
            mx.synchronize()
            wall = time.perf_counter() - t0
        kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start),
                         key=lambda k: k[0])
        by_name = {}
        for s, e, n in kernels:
            by_name.setdefault(n[:90], []).append(e - s)
        gaps = [kernels[i + 1][0] - kernels[i][1] for i in range(len(kernels) - 1)]
        span = kernels[-1][1] - kernels[0][0] if kernels else 0
        row = {"wall_us_per_layer": wall / layers * 1e6, "gpu_span_us_per_layer": span / layers,
               "kernels": len(kernels), "median_gap_us": statistics.median(gaps) if gaps else None,
               "sum_gaps_us_per_layer": sum(gaps) / layers if gaps else None,
               "by_kernel": {n: {"count": len(d), "median_us": statistics.median(d),
                                 "sum_us_per_layer": sum(d) / layers} for n, d in by_name.items()}}
        res["steps"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "by_kernel"}), flush=True)
        for n, d in row["by_kernel"].items():
            print("   ", n, d, flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
