"""Decode per call on the GPU: mlx_flash vs mx.fast (cuDNN), with where the time goes.

    python3 tools/cuda_decode_perf.py OUT.json [--label NAME] [--sweep] [--shapes 32:8,32:4] [--dtypes fp16,bf16]
    python3 tools/cuda_decode_perf.py --warm [--sweep]   # only compile the kernels (NVRTC), in parallel workers

For each decode shape (B 1, 1 query, Nk 32768, D 128, GQA 32:8 and 32:4) and
dtype, per call in microseconds:
  latency   one call per eval (launch + GPU + sync);
  step      32 calls on 32 distinct K/V caches per eval (a model's decode step,
            as `python -m mlx_flash.bench.cuda`'s decode section): graph
            building and eval in series, what a step costs without overlap;
  build     the graph building alone (host cost: Python + MLX op assembly);
  gpu       the eval alone of those 32 prebuilt calls: max(MLX's launch
            work, GPU time) per call.
The same inputs are checked against mx.fast on float32 copies of q, k, v
(max |error| and the error relative to the largest output), so every timed
variant is also a correctness check of the split path.

--sweep adds launch-plan variants of the decode kernel (DECODE_TUNING:
warps, key tile, stages, splits) on fp16 32:8 and 32:4. --warm compiles every
kernel the run will use in a few processes at once (MLX keeps compiled
kernels on disk), so the timed run does not wait on NVRTC.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx

import mlx_flash
from mlx_flash.backends import cuda as cb

SHAPES = {"32:8": (1, 32, 8, 1, 32768, 128), "32:4": (1, 32, 4, 1, 32768, 128)}
DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16}
LAYERS = 32
# Launch-plan variants (DECODE_TUNING over the defaults; waves in percent).
# In order of preference (the simpler plan first): the choice is the first
# within 3% of the least GPU time.
SWEEP = [{}, {"waves": 100}, {"kr": 1}, {"kr": 1, "waves": 100}, {"kr": 1, "waves": 25}, {"kr": 1, "stages": 2},
         {"kr": 1, "bulk": 1}, {"kr": 1, "pool": 1}, {"pool": 1}, {"kr": 1, "bulk": 1, "pool": 1}]
PASSES = 2  # the sweep measures every variant this many times, interleaved, and keeps the best


def caches(shape, dtype, n):
    B, Hq, Hkv, Nq, Nk, D = shape
    out = []
    for i in range(n):
        kq, kk, kv = mx.random.split(mx.random.key(100 + i), 3)
        out.append((mx.random.normal((B, Hq, Nq, D), key=kq).astype(dtype),
                    mx.random.normal((B, Hkv, Nk, D), key=kk).astype(dtype),
                    mx.random.normal((B, Hkv, Nk, D), key=kv).astype(dtype)))
    mx.eval(out)
    return out


def impl_fn(name, scale):
    if name == "mlx_flash":
        return lambda q, k, v: mlx_flash.flash_attention(q, k, v, scale=scale)
    return lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def measure(fn, sets, lat_iters=30, step_iters=8):
    q, k, v = sets[0]
    for _ in range(3):
        mx.eval([fn(*s) for s in sets])
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(lat_iters):
        mx.eval(fn(q, k, v))
    mx.synchronize()
    latency = (time.perf_counter() - t) / lat_iters * 1e6
    step, build, gpu = [], [], []
    for _ in range(step_iters):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [fn(*s) for s in sets]
        t1 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        t2 = time.perf_counter()
        step.append((t2 - t0) / len(sets) * 1e6)
        build.append((t1 - t0) / len(sets) * 1e6)
        gpu.append((t2 - t1) / len(sets) * 1e6)
        del outs
    return {"latency_us": round(latency, 2), "step_us": round(statistics.median(step), 2),
            "build_us": round(statistics.median(build), 2), "gpu_us": round(statistics.median(gpu), 2)}


def check(fn, sets, scale):
    """Max |ours - float32 mx.fast| over two layers, absolute and relative to the largest |out|."""
    worst, top = 0.0, 0.0
    for q, k, v in sets[:2]:
        want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), k.astype(mx.float32),
                                                    v.astype(mx.float32), scale=scale)
        got = fn(q, k, v).astype(mx.float32)
        worst = max(worst, mx.max(mx.abs(got - want)).item())
        top = max(top, mx.max(mx.abs(want)).item())
        finite = mx.all(mx.isfinite(got)).item()
        if not finite:
            worst = float("inf")
    rel = worst / max(top, 1e-30)
    return {"max_abs_err": worst, "rel_err": rel, "ok": rel < 2e-2}


def describe_plan(q, k, v):
    from mlx_flash._spec import validate_attention

    spec, _ = validate_attention(q, k, v)
    if not hasattr(cb, "decode_plan"):
        return None
    nw, bn, stages, smem, row_blocks, splits = cb.decode_plan(spec)
    return {"nw": nw, "bn": bn, "stages": stages, "smem": smem, "row_blocks": row_blocks, "splits": splits}


def warm(sweep: bool, dtypes=("fp16", "bf16")):
    """Compile every decode kernel variant the timed run uses, one small call each, in parallel."""
    jobs = [(d, {}) for d in dtypes]
    if sweep:
        jobs += [("fp16", v) for v in SWEEP if any(k not in ("splits", "waves", "tiles") for k in v)]
        jobs += [("bf16", v) for v in ({"kr": 1}, {"kr": 1, "pool": 1}, {"pool": 1}) if "bf16" in dtypes]
    procs = []
    for dname, variant in jobs:
        code = ("import mlx.core as mx, mlx_flash\n"
                "from mlx_flash.backends import cuda as cb\n"
                f"cb.DECODE_TUNING.update({variant!r}); cb.DECODE_TUNING.setdefault('splits', 2)\n"
                f"dt = mx.{'float16' if dname == 'fp16' else 'bfloat16'}\n"
                "q = mx.zeros((1, 4, 1, 128), dt); k = mx.zeros((1, 1, 4096, 128), dt)\n"
                "mx.eval(mlx_flash.flash_attention(q, k, k))\n")
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
    for p in procs:
        p.wait()
    print(f"warm: {len(jobs)} variants compiled", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--label", default="")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--shapes", default="32:8,32:4")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--impls", default="mlx_flash,mx.fast")
    parser.add_argument("--choice-out", default=None, help="write the best variant as MLX_FLASH_CUDA_DECODE_PLAN text")
    parser.add_argument("--warm-dtypes", default="fp16,bf16")
    args = parser.parse_args()
    if args.warm:
        warm(args.sweep, tuple(args.warm_dtypes.split(",")))
        return
    res = {"card": mx.device_info().get("device_name", "?"), "label": args.label, "layers": LAYERS,
           "unit": "us per call", "cases": {}, "sweep": {}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    for sname in [name for name in args.shapes.split(",") if name in SHAPES]:  # --shapes none: sweep only
        shape = SHAPES[sname]
        for dname in args.dtypes.split(","):
            sets = caches(shape, DTYPES[dname], LAYERS)
            scale = shape[-1] ** -0.5
            row = {"shape": list(shape), "kv_MB": 2 * shape[0] * shape[2] * shape[4] * shape[5] * 2 / 1e6}
            for impl in args.impls.split(","):
                fn = impl_fn(impl, scale)
                r = measure(fn, sets)
                r.update(check(fn, sets, scale))
                r["gbps_gpu"] = round(row["kv_MB"] / r["gpu_us"] / 1e3, 1)
                row[impl] = r
            if "mlx_flash" in row:
                row["mlx_flash"]["plan"] = describe_plan(*sets[0])
            if "mlx_flash" in row and "mx.fast" in row:
                row["step_ratio_vs_mx_fast"] = round(row["mx.fast"]["step_us"] / row["mlx_flash"]["step_us"], 3)
                row["latency_ratio_vs_mx_fast"] = round(row["mx.fast"]["latency_us"] / row["mlx_flash"]["latency_us"], 3)
                row["gpu_ratio_vs_mx_fast"] = round(row["mx.fast"]["gpu_us"] / row["mlx_flash"]["gpu_us"], 3)
            res["cases"][f"{sname} {dname}"] = row
            print(f"{args.label} {sname} {dname}", json.dumps(row), flush=True)
            save()
            del sets
    if args.sweep:
        sets = {sname: caches(SHAPES[sname], mx.float16, LAYERS) for sname in ("32:8", "32:4")}
        fn = impl_fn("mlx_flash", 128 ** -0.5)
        for p in range(PASSES):
            for variant in SWEEP:
                for sname in ("32:8", "32:4"):
                    cb.DECODE_TUNING.clear()
                    cb.DECODE_TUNING.update(variant)
                    key = f"{sname} fp16 {json.dumps(variant)}"
                    try:
                        r = measure(fn, sets[sname], lat_iters=10, step_iters=6)
                        r.update(check(fn, sets[sname], 128 ** -0.5))
                        r["plan"] = describe_plan(*sets[sname][0])
                    except Exception as e:  # noqa: BLE001 (a variant that does not build: say so, go on)
                        r = {"error": str(e)[:300]}
                    old = res["sweep"].get(key)
                    if old is not None and "gpu_us" in old and "gpu_us" in r:  # keep each number's best pass
                        r = {**r, **{m: min(old[m], r[m]) for m in ("latency_us", "step_us", "build_us", "gpu_us")},
                             "ok": old["ok"] and r["ok"]}
                    res["sweep"][key] = r
                    print(f"sweep pass {p} {sname} {variant}", json.dumps(r), flush=True)
                    save()
        cb.DECODE_TUNING.clear()
        # The choice: the least GPU time per call over both shapes among the correct variants.
        scores = {}
        for variant in SWEEP:
            rows = [res["sweep"].get(f"{sname} fp16 {json.dumps(variant)}", {}) for sname in ("32:8", "32:4")]
            if all("gpu_us" in r and r["ok"] for r in rows):
                scores[json.dumps(variant)] = sum(r["gpu_us"] for r in rows)
        if scores:
            least = min(scores.values())
            best = next(json.loads(v) for v in scores if scores[v] <= 1.03 * least)
            res["choice"] = {"variant": best, "score_gpu_us": scores[json.dumps(best)], "scores": scores,
                             "env": ",".join(f"{k}={int(v)}" for k, v in best.items())}
            print("choice", json.dumps(res["choice"]), flush=True)
            if args.choice_out:
                with open(args.choice_out, "w") as f:
                    f.write(res["choice"]["env"])
    save()


if __name__ == "__main__":
    main()
