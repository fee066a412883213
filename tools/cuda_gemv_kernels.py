"""Kernel times of matmul2d's decode products (a few rows of a times an [N, K]
weight) under Nsight Compute, where a timed loop of calls would be bound by
the host (~30 us per call) for every weight below ~64 MB. GPU machine:

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file OUT/ncu.csv \\
        python tools/cuda_gemv_kernels.py run OUT/segments.json [--plans "8,1,4,0,0;8,1,1,0,4"]
    python tools/cuda_gemv_kernels.py parse OUT/ncu.csv OUT/segments.json OUT/gemv_kernels.json

GEMV_SHAPES (K:N pairs, comma separated) and GEMV_ROWS narrow the run.

`run` makes REPS calls of each case, each call evaluated alone, with a marker
kernel before every case; `parse` attributes each profiled kernel to the case
its last marker began and writes the mean time per call (all kernels of a
call summed: MLX's matmul may launch several) with the weight's GB/s. ncu
flushes the caches before every kernel (its default), so each call reads its
weight from memory as a decode step does. The copy rows are a plain MLX copy
(x + 1 over int32, bytes read + written), the same kind of measurement.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

SHAPES = ((16384, 16384), (4096, 14336), (14336, 4096), (4096, 4096), (8192, 8192))
ROWS = (1, 16)
# GEMV_SHAPES="4096:4096,14336:4096" (K:N pairs) and GEMV_ROWS="1,16" narrow a run.
if os.environ.get("GEMV_SHAPES"):
    SHAPES = tuple(tuple(int(v) for v in pair.split(":")) for pair in os.environ["GEMV_SHAPES"].split(","))
if os.environ.get("GEMV_ROWS"):
    ROWS = tuple(int(v) for v in os.environ["GEMV_ROWS"].split(","))
REPS = 1
# Stop starting new shapes after this many seconds (the profiled run must
# end by itself for ncu to write its report).
BUDGET_S = float(os.environ.get("GEMV_NCU_SECONDS", "1e9"))


def run(segments_path, plans):
    import mlx.core as mx

    from mlx_flash.backends import cuda_matmul as cm

    marker = mx.fast.cuda_kernel(name="mlx_flash_gemv_marker", input_names=["x"], output_names=["y"],
                                 source="y[0] = x[0] + 1;")
    one = mx.zeros((1,), mx.int32)
    mx.eval(one)
    segments = []

    def mark(desc):
        segments.append(desc)
        (y,) = marker(inputs=[one], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                      output_dtypes=[mx.int32])
        mx.eval(y)
        mx.synchronize()

    start = time.monotonic()
    mark(dict(case="setup"))
    nbytes = 1 << 30
    big = mx.zeros((nbytes // 4,), mx.int32)
    mx.eval(big)
    mark(dict(case="copy_mlx_add1_int32", bytes=2 * nbytes))
    for _ in range(REPS):
        mx.eval(big + 1)
    mx.synchronize()
    del big
    for K, N in SHAPES:
        if time.monotonic() - start > BUDGET_S:
            break
        mark(dict(case="setup"))
        w16 = (mx.random.normal((N, K), key=mx.random.key(K + N)) * 0.02).astype(mx.float16)
        w8, scale = mx.to_fp8(w16 * 100), mx.full((1, N), 0.01)
        mx.eval(w16, w8, scale)
        for M in ROWS:
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.float16)
            mx.eval(x)
            cases = [(f"ours_fp16_x_e4m3", plan, N * K,
                      lambda plan=plan: cm.matmul(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, plan=plan))
                     for plan in plans]
            cases.append(("ours_fp16_x_fp16", None, 2 * N * K, lambda: cm.matmul(x, w16, transpose_b=True)))
            cases.append(("mlx_fp16", None, 2 * N * K, lambda: x @ w16.T))
            for name, plan, wbytes, fn in cases:
                mark(dict(case="setup"))
                mx.eval(fn())  # compiled (and its inputs settled) before the case's marker
                mx.synchronize()
                mark(dict(case=name, plan=None if plan is None else list(plan), M=M, K=K, N=N, weight_bytes=wbytes,
                          reps=REPS))
                for _ in range(REPS):
                    mx.eval(fn())
                    mx.synchronize()
        del w16, w8
    mark(dict(case="end"))
    with open(segments_path, "w") as f:
        json.dump(segments, f)


def parse(csv_path, segments_path, out_path):
    with open(segments_path) as f:
        segments = json.load(f)
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,  # older ncu
             "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
    seg = -1
    totals, counts = {}, {}
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
        if "mlx_flash_gemv_marker" in r["Kernel Name"]:
            seg += 1
            continue
        if 0 <= seg < len(segments):
            totals[seg] = totals.get(seg, 0.0) + us
            counts[seg] = counts.get(seg, 0) + 1
    out = []
    copy_gbps = None
    for i, s in enumerate(segments):
        if s["case"] in ("setup", "end") or i not in totals:
            continue
        if s["case"].startswith("copy"):
            us = totals[i] / REPS
            copy_gbps = s["bytes"] / us / 1e3
            out.append(dict(s, us=us, gbps=copy_gbps, kernels_per_call=counts[i] / REPS))
            continue
        us = totals[i] / s["reps"]
        row = dict(s, us=us, weight_gbps=s["weight_bytes"] / us / 1e3, kernels_per_call=counts[i] / s["reps"])
        if copy_gbps:
            row["fraction_of_copy"] = row["weight_gbps"] / copy_gbps
        out.append(row)
    with open(out_path, "w") as f:
        json.dump(dict(method="ncu gpu__time_duration.sum, caches flushed per kernel, clocks free", rows=out), f,
                  indent=1)
    for row in out:
        print(json.dumps(row))


def main(argv):
    if argv[0] == "run":
        plans = [None]
        if len(argv) > 3 and argv[2] == "--plans":
            plans = [None if p == "default" else tuple(int(v) for v in p.split(",")) for p in argv[3].split(";")]
        run(argv[1], plans)
    elif argv[0] == "parse":
        parse(*argv[1:4])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
