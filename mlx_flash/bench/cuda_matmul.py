"""CUDA matmul2d benchmark: ours (each route) vs MLX's matmul, PyTorch fp16 and
torch._scaled_mm (e4m3), and the decode products against the card's copy
bandwidth, all in one run on one card.

    python -m mlx_flash.bench.cuda_matmul [--sections gemm,decode,plans] [--sizes 4096 8192] [--out DIR] [--warm]

gemm:   n^3 products (TFLOP/s = 2 n^3 / t), each result checked against a
        second computation of the same product (relative max difference).
targets: (opt-in) issue 15's products through the public matmul2d beside
        their anchors (MLX's matmul, torch._scaled_mm), timed in turn with
        the queue full, and each case's GPU time a call through CUPTI;
        ours / anchor ratios per pair (TARGET_PAIRS).
prefill: (opt-in) FP8Linear's prefill products (M = 128..2048 tokens x
        Llama-8B-shaped e4m3 weights [N, K]): fp8 decoded inside the kernel
        and by a pass first, beside MLX's fp16 matmul; peak memory a call.
llama:  (opt-in) greedy generation tokens/s of random Llama-3.2-1B/3B-shaped
        mlx-lm models, fp16 vs FP8Linear (needs mlx_lm importable; its
        package __init__ is bypassed, so no transformers).
llama_prefill: (opt-in) prompt tokens/s of the same models (--llama-models,
        --llama-prompts), fp16 beside FP8Linear with the weight-as-A kernel's
        stream-K off and as set (--llama-sk-variants adds plans), and with
        quantized activations (activations="e4m3"), in turn.
llama_prefill_profile: (opt-in, needs torch) one forward of those models,
        fp16, FP8Linear and FP8Linear with quantized activations, profiled
        kernel by kernel (CUPTI): the GPU's busy time, its waits, and the
        time by kernel class and name.
decode: M = 1..16 rows times an [N, K] weight (fp8 e4m3 or fp16), GB/s of
        weight bytes read, next to a plain copy's GB/s (bytes read + written)
        measured in the same run; MLX's fp16 matmul of the same shape;
        --gemv-plans times the few-rows kernel's plans side by side. Below
        ~100 us a call is bound by host time (tools/cuda_gemv_kernels.py
        gives the kernels' own times under Nsight Compute).
decode_stream: (opt-in) the decode products cycling through distinct weights
        (half a GiB of fp8, each read once a round) so every weight byte
        comes from DRAM, not L2, next to the copy bandwidth of the same run.
plans:  the Hopper kernel's tile plans side by side at 8192^3.
calls:  (opt-in) where a decode step's time goes per projection call: graph
        building, evaluation and the pipelined step, fp16 nn.Linear vs
        FP8Linear's few-rows paths (Llama-1B-shaped projections, M = 1).
fp8err: (opt-in) e4m3 x e4m3 against float64 of the decoded operands, on the
        same operands: our exact route, fast_accumulation, the native route
        per promotion interval, torch._scaled_mm with use_fast_accum False
        and True, and an fp32 matmul (issue 15: what cuBLAS's "fp32
        accumulation" is on Hopper).
fp8speed: (opt-in) TFLOP/s of those products, ours and _scaled_mm.
layers: four Llama-3-8B-shaped blocks of projections (no attention) as fp16
        nn.Linear vs FP8Linear: a decode step's projections (M = 1) and a
        512-token prefill through the public layers.
--warm: every case once at a tiny size, nothing timed: fills MLX's kernel
cache (NVRTC compiles each variant once, whatever the shape).
Writes matmul_cuda_<card>.json (into --out, a directory; or --out as a .json
path) and prints one JSON line per measurement.

    python -m mlx_flash.bench.cuda_matmul --plot matmul_cuda_<card>.json   # the PNG next to it
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time

import mlx.core as mx

from .. import dispatch
from .cuda import Recorder, card_name, slug

GIB = 1024 ** 3
# Native fp8 plans with two accumulator sets alternating between promotion
# intervals, timed in the gemm section (BN, stages, promotion interval in
# 128 K, TMA, warp-specialised, acc2).
NATIVE_ACC2_PLANS = ((128, 6, 2, True, True, True), (128, 7, 4, True, True, True))
SKIP_TMA = False  # --skip-tma
CASES = None  # --cases: a regular expression the gemm cases' names must match
START = time.perf_counter()  # rows note when they were measured (seconds since import)
CHECKPOINT = None  # main's JSON writer: called after each gemm size, so a run cut short keeps those


def time_lazy(make, reps: int, rounds: int = 3) -> float:
    """Seconds per product: `reps` products built lazily and evaluated together
    (so launches queue back to back), best of `rounds`. The graphs are built
    before the clock starts: building them is Python host work (argument
    checks, padding, tensor-map templates) that a model pays once per call
    too, but counting it here charged our wrapper's host time to the kernel
    while MLX's own matmul builds in microseconds. Only the evaluation is
    timed, for MLX's matmul and ours alike."""
    mx.eval(make())
    best = float("inf")
    for _ in range(rounds):
        graphs = [make() for _ in range(reps)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(graphs)
        mx.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
        del graphs
    return best


def gpu_clocks() -> dict:
    """SM clock (MHz) and power draw (W) now, from nvidia-smi: the H200 runs
    under a 700 W cap and lowers its clock under sustained tensor-core load,
    so each timed case records the clock it ran at ({} where nvidia-smi is
    missing)."""
    import subprocess

    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,power.limit",
                               "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        sm, draw, limit = (v.strip() for v in line.split(","))
        return {"sm_mhz": float(sm), "power_w": float(draw), "power_limit_w": float(limit)}
    except Exception:  # noqa: BLE001 (no nvidia-smi: the row just has no clocks)
        return {}


def time_lazy_clocked(make, reps: int, rounds: int = 3):
    """time_lazy, plus the SM clock and power read right after the timed
    rounds (while the card is still at its loaded clock)."""
    t = time_lazy(make, reps, rounds)
    return t, gpu_clocks()


def time_torch(fn, reps: int, rounds: int = 3) -> float:
    import torch

    fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def rel_diff(x, y) -> float:
    x, y = x.astype(mx.float32), y.astype(mx.float32)
    return (mx.abs(x - y).max() / (mx.abs(y).max() + 1e-30)).item()


def _torch():
    try:
        import numpy as np
        import torch

        return np, torch
    except ImportError:
        return None, None


def bench_gemm(rec: Recorder, sizes):
    from ..backends import cuda_matmul as cm

    np, torch = _torch()
    for n in sizes:
        flops = 2 * n ** 3
        reps = min(50, max(3, int(4e13 // flops)))
        k1, k2 = mx.random.split(mx.random.key(n))
        a16 = mx.random.normal((n, n), key=k1).astype(mx.float16)
        b16 = mx.random.normal((n, n), key=k2).astype(mx.float16)
        a8, b8 = mx.to_fp8(a16), mx.to_fp8(b16)       # e4m3 codes (uint8)
        b8t = mx.contiguous(b8.T)                     # [N, K]: a Linear weight
        b16t = mx.contiguous(b16.T)
        mx.eval(a16, b16, a8, b8, b8t, b16t)
        mlx_fp16 = a16 @ b16
        mx.eval(mlx_fp16)
        cases = {
            "mlx_fp16": (lambda: a16 @ b16, None),
            "ours_fp16": (lambda: cm.matmul(a16, b16), mlx_fp16),
            "ours_fp16_bT": (lambda: cm.matmul(a16, b16t, transpose_b=True), mlx_fp16),
            "ours_bf16": (lambda: cm.matmul(a16.astype(mx.bfloat16), b16.astype(mx.bfloat16)), mlx_fp16),
            "ours_fp16_tma": (lambda: cm.matmul(a16, b16, route="wgmma", plan=(256, 4, 0, True)), mlx_fp16),
            "ours_fp16_bT_tma": (lambda: cm.matmul(a16, b16t, transpose_b=True, route="wgmma", plan=(256, 4, 0, True)),
                                 mlx_fp16),
            "ours_fp16_ws": (lambda: cm.matmul(a16, b16, route="wgmma", plan=(256, 4, 0, True, True)), mlx_fp16),
            "ours_fp16_bT_ws": (lambda: cm.matmul(a16, b16t, transpose_b=True, route="wgmma",
                                                  plan=(256, 4, 0, True, True)), mlx_fp16),
            # 128-wide tiles: twice the tiles of 256, so a smaller product's last wave is less empty.
            "ours_fp16_ws_bn128": (lambda: cm.matmul(a16, b16, route="wgmma", plan=(128, 6, 0, True, True)),
                                   mlx_fp16),
            "ours_fp16_bT_ws_bn128": (lambda: cm.matmul(a16, b16t, transpose_b=True, route="wgmma",
                                                        plan=(128, 6, 0, True, True)), mlx_fp16),
            "ours_bf16_ws": (lambda: cm.matmul(a16.astype(mx.bfloat16), b16.astype(mx.bfloat16), route="wgmma",
                                               plan=(256, 4, 0, True, True)), mlx_fp16),
            "ours_e4m3_native_ws_bn128_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                               out_dtype=mx.float16, route="wgmma_fp8",
                                                               plan=(128, 6, 2, True, True)), None),
            "ours_e4m3_native_ws_bn192_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                               out_dtype=mx.float16, route="wgmma_fp8",
                                                               plan=(192, 5, 2, True, True)), None),
            "ours_e4m3_native_ws_bn256_nopromote_bT": (lambda: cm.matmul(
                a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16, route="wgmma_fp8",
                plan=(256, 4, 0, True, True)), None),
            "ours_fp16_x_e4m3_bT_ws": (lambda: cm.matmul(a16, b8t, b_fmt="e4m3", transpose_b=True, route="wgmma",
                                                         plan=(256, 4, 0, True, True)), None),
            **{f"ours_e4m3_native_ws_bn{p[0]}_st{p[1]}_pr{p[2]}_acc2_bT": (
                lambda p=p: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16,
                                      route="wgmma_fp8", plan=p), None)
               for p in NATIVE_ACC2_PLANS},
            "ours_e4m3_native_tma_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                          out_dtype=mx.float16, route="wgmma_fp8",
                                                          plan=(128, 6, 1, True)), None),
            "ours_e4m3_native_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                      out_dtype=mx.float16, route="wgmma_fp8"), None),
            "ours_e4m3_native": (lambda: cm.matmul(a8, b8, a_fmt="e4m3", b_fmt="e4m3", out_dtype=mx.float16,
                                                   route="wgmma_fp8"), None),
            "ours_e4m3_x_e5m2_native_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e5m2", transpose_b=True,
                                                             out_dtype=mx.float16, route="wgmma_fp8"), None),
            "ours_e4m3_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                               out_dtype=mx.float16), None),
            "ours_fp16_x_e4m3_bT": (lambda: cm.matmul(a16, b8t, b_fmt="e4m3", transpose_b=True), None),
            "ours_fp16_x_e4m3": (lambda: cm.matmul(a16, b8, b_fmt="e4m3"), None),
            "ours_mma_fp16": (lambda: cm.matmul(a16, b16, route="mma"), mlx_fp16),
            "ours_mma_e4m3_bT": (lambda: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                   out_dtype=mx.float16, route="mma"), None),
        }
        results = {}
        if CASES is not None:
            cases = {k: v for k, v in cases.items() if CASES.search(k)}
        if SKIP_TMA:
            cases = {k: v for k, v in cases.items() if "tma" not in k}
        for name, (fn, check) in cases.items():
            try:
                out = fn()
                mx.eval(out)
                results[name] = out
                t, clocks = time_lazy_clocked(fn, reps)
                row = dict(section="gemm", case=name, n=n, ms=t * 1e3, tflops=flops / t / 1e12,
                           at_s=round(time.perf_counter() - START, 1), **clocks)
                if check is not None:
                    row["rel_diff_vs_mlx_fp16"] = rel_diff(out, check)
                rec.add(**row)
            except Exception as e:  # noqa: BLE001 (record, go on)
                rec.add(section="gemm", case=name, n=n, error=f"{type(e).__name__}: {e}"[:500])
        native_acc2 = [k for k in results if k.startswith("ours_e4m3_native_ws_") and k.endswith("_acc2_bT")]
        for x, y in tuple((k, "ours_e4m3_native_ws_bn128_bT") for k in native_acc2) + (
                     ("ours_e4m3_native_ws_bn128_bT", "ours_e4m3_native_tma_bT"),
                     ("ours_e4m3_native_ws_bn192_bT", "ours_e4m3_native_tma_bT"),
                     ("ours_e4m3_bT", "ours_mma_e4m3_bT"), ("ours_e4m3_native_bT", "ours_mma_e4m3_bT"),
                     ("ours_e4m3_native_tma_bT", "ours_e4m3_native_bT"),
                     ("ours_e4m3_native", "ours_e4m3_native_bT")):
            if x in results and y in results:
                rec.add(section="gemm_check", n=n, case=f"{x}_vs_{y}", rel_diff=rel_diff(results[x], results[y]))
        if "ours_fp16_x_e4m3_bT" in results and "ours_fp16_x_e4m3" in results:  # the two b layouts
            rec.add(section="gemm_check", n=n, case="ours_fp16_x_e4m3_bT_vs_ours_fp16_x_e4m3", rel_diff=rel_diff(
                results["ours_fp16_x_e4m3_bT"], results["ours_fp16_x_e4m3"]))
        del results, mlx_fp16
        if torch is None:
            if CHECKPOINT is not None:
                CHECKPOINT()
            continue
        try:
            ta = torch.from_numpy(np.array(a8)).cuda().view(torch.float8_e4m3fn)
            tb = torch.from_numpy(np.array(b8t)).cuda().view(torch.float8_e4m3fn).t()  # column-major [K, N]
            one = torch.ones((), device="cuda")
            scaled = lambda: torch._scaled_mm(ta, tb, scale_a=one, scale_b=one, out_dtype=torch.float16)
            t = time_torch(scaled, reps)
            clocks = gpu_clocks()
            ours = cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16,
                             route="wgmma_fp8")
            diff = rel_diff(ours, mx.array(scaled().float().cpu().numpy()))
            rec.add(section="gemm", case="torch_scaled_mm_e4m3", n=n, ms=t * 1e3, tflops=flops / t / 1e12,
                    ours_rel_diff=diff, **clocks)
            th = torch.from_numpy(np.array(a16)).cuda()
            tbh = torch.from_numpy(np.array(b16)).cuda()
            t = time_torch(lambda: th @ tbh, reps)
            rec.add(section="gemm", case="torch_fp16", n=n, ms=t * 1e3, tflops=flops / t / 1e12, **gpu_clocks())
            del ta, tb, th, tbh
        except Exception as e:  # noqa: BLE001
            rec.add(section="gemm", case="torch", n=n, error=f"{type(e).__name__}: {e}"[:500])
        if CHECKPOINT is not None:
            CHECKPOINT()


def copy_bandwidth(rec: Recorder, nbytes: int = 2 * GIB):
    """GB/s of a plain device copy (bytes read + written), MLX and PyTorch."""
    x = mx.random.randint(0, 255, (nbytes // 4,), dtype=mx.int32, key=mx.random.key(0))
    mx.eval(x)
    t = time_lazy(lambda: x + 1, 10)
    best = 2 * nbytes / t / 1e9
    rec.add(section="copy", case="mlx_add1_int32", bytes=nbytes, gbps=best)
    del x
    np, torch = _torch()
    if torch is not None:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t = time_torch(lambda: dst.copy_(src), 10)
        rec.add(section="copy", case="torch_copy", bytes=nbytes, gbps=2 * nbytes / t / 1e9)
        best = max(best, 2 * nbytes / t / 1e9)
        del src, dst
    return best


DECODE_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (16384, 16384))
DECODE_ROWS = (1, 4, 16)
# Few-rows kernel plans timed side by side (cuda_matmul.GEMV_PLAN's fields);
# None = the default plan (the whole-sector layout). The second: the
# half-sector layout (the default before session 7); the third whole-sector
# with batches of 8 chunks' loads (fp8 weights only: 16-bit ones spill at 16
# rows).
GEMV_PLANS = (None, (8, 1, 4, 0, 0, 2), (8, 1, 8, 0, 0, 2, 1))


def _plan_name(plan) -> str:
    return "default" if plan is None else "_".join(map(str, plan))


def bench_decode(rec: Recorder, shapes=DECODE_SHAPES, copy_bytes: int = 2 * GIB, plans=None, rows=DECODE_ROWS):
    from ..backends import cuda_matmul as cm

    plans = plans or GEMV_PLANS
    copy_gbps = copy_bandwidth(rec, copy_bytes)
    # The per-call floor under the same timer: an MLX op on 16 values, and the
    # direct call on a weight of 32 rows (one block: launch plus one block's
    # latency through K), so a small weight's time splits into fixed and
    # streaming parts.
    tiny = mx.zeros((16,), mx.int32)
    mx.eval(tiny)
    rec.add(section="decode_floor", case="mlx_add1_16_int32", us=time_lazy(lambda: tiny + 1, 200) * 1e6)
    for K in sorted({k for k, _ in shapes}):
        w_one = mx.to_fp8(mx.random.normal((32, K), key=mx.random.key(3)))
        scale_one = mx.full((1, 32), 0.01)
        for M in rows:
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.float16)
            mx.eval(w_one, scale_one, x)
            try:
                us = time_lazy(lambda: cm.linear_few_rows(x, w_one, scale_one, "e4m3"), 200) * 1e6
                rec.add(section="decode_floor", case="ours_direct_one_block", M=M, K=K, N=32, us=us)
            except Exception as e:  # noqa: BLE001
                rec.add(section="decode_floor", case="ours_direct_one_block", M=M, K=K, N=32,
                        error=f"{type(e).__name__}: {e}"[:500])
    for K, N in shapes:
        key = mx.random.key(K + N)
        w16 = (mx.random.normal((N, K), key=key) * 0.02).astype(mx.float16)
        w8, scale = mx.to_fp8(w16 * 100), mx.full((1, N), 0.01)
        mx.eval(w16, w8, scale)
        for M in rows:
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.float16)
            mx.eval(x)
            reps = min(200, max(20, int(2e10 // (N * K))))
            cases = {}
            for plan in plans:
                cases[f"ours_fp16_x_e4m3@{_plan_name(plan)}"] = (
                    lambda plan=plan: cm.matmul(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, plan=plan),
                    N * K, plan)
            # FP8Linear's direct path (one kernel node; nn.MLX_FLASH_FP8LINEAR_PATH), with each plan.
            for plan in plans:
                cases[f"ours_direct_fp16_x_e4m3@{_plan_name(plan)}"] = (
                    lambda plan=plan: cm.linear_few_rows(x, w8, scale, "e4m3", plan=plan), N * K, plan)
            cases["ours_fp16_x_fp16"] = (lambda: cm.matmul(x, w16, transpose_b=True), 2 * N * K, None)
            cases["mlx_fp16"] = (lambda: x @ w16.T, 2 * N * K, None)
            ref = x @ w16.T
            for name, (fn, wbytes, plan) in cases.items():
                case, _, plan_name = name.partition("@")
                try:
                    t, clocks = time_lazy_clocked(fn, reps)
                    gbps = wbytes / t / 1e9
                    row = dict(section="decode", case=case, M=M, K=K, N=N, us=t * 1e6, weight_gbps=gbps,
                               fraction_of_copy=gbps / copy_gbps, copy_gbps=copy_gbps, **clocks)
                    if plan_name:
                        row["plan"] = plan_name
                    if case != "mlx_fp16":
                        row["rel_diff_vs_mlx_fp16"] = rel_diff(fn(), ref)
                    rec.add(**row)
                except Exception as e:  # noqa: BLE001
                    rec.add(section="decode", case=case, plan=plan_name, M=M, K=K, N=N,
                            error=f"{type(e).__name__}: {e}"[:500])


def bench_decode_stream(rec: Recorder, shapes=DECODE_SHAPES, rows=(1, 16), stream_bytes: int = GIB // 2,
                        copy_bytes: int = 2 * GIB, plans=None, cycles: int = 4):
    """The decode products over many distinct weights, so every weight byte
    comes from DRAM: `decode` reads one weight per case, which a 4096^2 fp8
    weight (16 MiB) serves from L2 (50 MiB) after the first call. Here each
    case cycles through as many distinct [N, K] weights as make
    `stream_bytes` of fp8 (an fp16 weight set of the same count holds twice
    that), each read once per timed round (reps = the count), next to the
    copy bandwidth measured in the same run: issue 15's ">= 70% of the
    card's measured memory bandwidth" for fp8 weights, and its "close to 2x
    the same product with fp16 weights". `plans` (few-rows plans, None the
    backend's) time FP8Linear's direct call once each; `cycles` passes over
    the weight set per timed eval (more calls per eval: the eval's own fixed
    cost, ~10-20 us, spread thinner; still every weight from DRAM, 0.5 GiB
    against a 50 MiB L2)."""
    import itertools

    from ..backends import cuda_matmul as cm

    copy_gbps = copy_bandwidth(rec, copy_bytes)
    for K, N in shapes:
        count = max(4, -(-stream_bytes // (N * K)))
        w16s, w8s = [], []
        for i in range(count):
            w16 = (mx.random.normal((N, K), key=mx.random.key(7 * i + K + N)) * 0.02).astype(mx.float16)
            w16s.append(w16)
            w8s.append(mx.to_fp8(w16 * 100))
            mx.eval(w16s[-1], w8s[-1])
        scale = mx.full((1, N), 0.01)
        mx.eval(scale)
        for M in rows:
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.float16)
            mx.eval(x)
            cases = {}
            for plan in plans or (None,):
                name = "ours_direct_fp16_x_e4m3" + ("" if plan is None else "@" + _plan_name(plan))
                cases[name] = (lambda w, plan=plan: cm.linear_few_rows(x, w, scale, "e4m3", plan=plan), w8s, N * K)
            cases["ours_fp16_x_e4m3"] = (
                lambda w: cm.matmul(x, w, b_fmt="e4m3", b_scale=scale, transpose_b=True), w8s, N * K)
            cases["ours_fp16_x_fp16"] = (lambda w: cm.matmul(x, w, transpose_b=True), w16s, 2 * N * K)
            cases["mlx_fp16"] = (lambda w: x @ w.T, w16s, 2 * N * K)
            for name, (fn, weights, wbytes) in cases.items():
                case, _, plan_name = name.partition("@")
                extra = {"plan": plan_name} if plan_name else {}
                try:
                    cycle = itertools.cycle(weights)
                    t, clocks = time_lazy_clocked(lambda fn=fn, cycle=cycle: fn(next(cycle)), count * cycles)
                    gbps = wbytes / t / 1e9
                    rec.add(section="decode_stream", case=case, **extra, M=M, K=K, N=N, weights=count, cycles=cycles,
                            weight_set_gib=count * wbytes / GIB, us=t * 1e6, weight_gbps=gbps,
                            fraction_of_copy=gbps / copy_gbps, copy_gbps=copy_gbps, **clocks)
                except Exception as e:  # noqa: BLE001
                    rec.add(section="decode_stream", case=case, **extra, M=M, K=K, N=N,
                            error=f"{type(e).__name__}: {e}"[:500])
        del w16s, w8s


def bench_plans(rec: Recorder, n: int = 8192):
    from ..backends import cuda_matmul as cm

    flops = 2 * n ** 3
    k1, k2 = mx.random.split(mx.random.key(7))
    a16 = mx.random.normal((n, n), key=k1).astype(mx.float16)
    b16t = mx.random.normal((n, n), key=k2).astype(mx.float16)
    a8, b8t = mx.to_fp8(a16), mx.to_fp8(b16t)
    mx.eval(a16, b16t, a8, b8t)
    kinds = {
        "fp16_bT": lambda plan: cm.matmul(a16, b16t, transpose_b=True, route="wgmma", plan=plan),
        "e4m3_native_bT": lambda plan: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                 out_dtype=mx.float16, route="wgmma_fp8", plan=plan),
        "fp16_x_e4m3_bT": lambda plan: cm.matmul(a16, b8t, b_fmt="e4m3", transpose_b=True, route="wgmma",
                                                 plan=plan),
    }
    plans = {"fp16_bT": [(256, 4, 0, True), (128, 6, 0, True), (256, 3, 0, True)],
             "e4m3_native_bT": [(128, 6, 2), (256, 4, 0), (128, 6, 1, True), (128, 6, 2, True), (128, 6, 4, True),
                                (256, 4, 0, True)],
             "fp16_x_e4m3_bT": [(128, 4, 0)]}
    for kind, fn in kinds.items():
        for plan in plans[kind]:
            if SKIP_TMA and len(plan) > 3 and plan[3]:
                continue
            try:
                t = time_lazy(lambda: fn(plan), 5)
                rec.add(section="plans", case=kind, plan=list(plan), n=n, ms=t * 1e3, tflops=flops / t / 1e12)
            except Exception as e:  # noqa: BLE001
                rec.add(section="plans", case=kind, plan=list(plan), n=n, error=f"{type(e).__name__}: {e}"[:500])


# Native fp8 plans whose accumulation error the fp8err section measures:
# (BN, stages, promotion interval in stages of 128 K, TMA, warp-specialised).
# PROMOTE 1 restarts the tensor-core sums every 4 k32 instructions (DeepGEMM's
# interval), 2 every 8 (the route's default), 0 never, -1 / -2 every
# instruction / every two (MLX_FLASH_CUDA_FP8_PROMOTE_K 32 / 64).
FP8ERR_PLANS = ((128, 6, -1, True, True), (192, 5, -1, True, True), (128, 6, -2, True, True),
                (128, 6, 1, True, True), (128, 6, 2, True, True), (256, 4, 0, True, True))
FP8ERR_DISTS = ("normal", "positive")


def _fp8_operands(shape, key, dist):
    """e4m3 codes of normal draws ("positive": their absolute values, so every
    partial sum grows one way and a truncating accumulator's error adds up)."""
    x = mx.random.normal(shape, key=key)
    return mx.to_fp8(mx.abs(x) if dist == "positive" else x)


def _fp8_error_row(out, ref, absref, torch):
    """Distances of `out` from the float64 product `ref` (torch, on the card):
    rel_err = max |err| / max |ref|; rms_rel = ||err|| / ||ref||;
    bound_ratio = max |err| / (|a| @ |b|) (the native route's tested bound is
    2^-8); toward_zero = mean(-err * sign(ref)) / mean |ref| (> 0: sums land
    nearer zero than they should, the mark of truncation)."""
    err = out.to(torch.float64) - ref
    return dict(rel_err=float(err.abs().max() / ref.abs().max()),
                rms_rel=float(err.norm() / ref.norm()),
                bound_ratio=float((err.abs() / absref.clamp_min(1e-300)).max()),
                toward_zero=float((-err * ref.sign()).mean() / ref.abs().mean()),
                nonfinite=int((~torch.isfinite(out)).sum()))


def bench_fp8err(rec: Recorder, ks=(4096, 8192), m: int = 4096, plans=FP8ERR_PLANS, dists=FP8ERR_DISTS):
    """Issue 15 (A): what "fp32 accumulation" of e4m3 x e4m3 means on Hopper.
    On the same random e4m3 operands ([m, K] x [m, K]^T, float32 results),
    the distance from float64 of the decoded operands of: matmul2d's default
    (exact) route, matmul2d(..., fast_accumulation=True), the native route
    with each promotion interval in `plans`, torch._scaled_mm with
    use_fast_accum False and True (cuBLAS), and torch's float32 matmul of the
    decoded operands (TF32 off: plain fp32 accumulation, the control).
    fp32_test_tol is the tests' fp32 bound, 1e-6 sqrt(K) + 1e-7. Errors
    only (no timing): fp8speed times the same products."""
    import mlx_flash
    from ..backends import cuda_matmul as cm

    np, torch = _torch()
    if torch is None:
        raise RuntimeError("fp8err needs torch (float64 reference and torch._scaled_mm on the card)")
    torch.backends.cuda.matmul.allow_tf32 = False
    one = torch.ones((), device="cuda")
    for dist in dists:
        for K in ks:
            ka, kb = mx.random.split(mx.random.key(K + (1 if dist == "positive" else 0)))
            a8, b8 = _fp8_operands((m, K), ka, dist), _fp8_operands((m, K), kb, dist)
            mx.eval(a8, b8)
            ta = torch.from_numpy(np.array(a8)).cuda().view(torch.float8_e4m3fn)
            tb = torch.from_numpy(np.array(b8)).cuda().view(torch.float8_e4m3fn)
            a64, b64 = ta.float().double(), tb.float().double()
            ref = a64 @ b64.T
            absref = a64.abs() @ b64.abs().T
            base = dict(section="fp8err", dist=dist, M=m, N=m, K=K, fp32_test_tol=1e-6 * K ** 0.5 + 1e-7)
            runs = {
                "ours_exact_default": lambda: mlx_flash.matmul2d(a8, b8, a_fmt="e4m3", b_fmt="e4m3",
                                                                 transpose_b=True, out_dtype=mx.float32),
                "ours_fast_accumulation": lambda: mlx_flash.matmul2d(
                    a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float32,
                    fast_accumulation=True),
                **{f"ours_native_bn{p[0]}_promote{p[2]}": (lambda p=p: cm.matmul(
                    a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float32, route="wgmma_fp8",
                    plan=p)) for p in plans},
            }
            for case, fn in runs.items():
                try:
                    out = torch.from_numpy(np.array(fn(), copy=True)).cuda()
                    rec.add(**base, case=case, **_fp8_error_row(out, ref, absref, torch))
                except Exception as e:  # noqa: BLE001
                    rec.add(**base, case=case, error=f"{type(e).__name__}: {e}"[:500])
            torch_runs = {
                "torch_scaled_mm_fast_accum_false": lambda: torch._scaled_mm(
                    ta, tb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False),
                "torch_scaled_mm_fast_accum_true": lambda: torch._scaled_mm(
                    ta, tb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=True),
                "torch_fp32_of_decoded": lambda: a64.float() @ b64.float().T,
            }
            for case, fn in torch_runs.items():
                try:
                    rec.add(**base, case=case, **_fp8_error_row(fn(), ref, absref, torch))
                except Exception as e:  # noqa: BLE001
                    rec.add(**base, case=case, error=f"{type(e).__name__}: {e}"[:500])
            del ta, tb, a64, b64, ref, absref
            torch.cuda.empty_cache()


def bench_fp8speed(rec: Recorder, shapes=((4096, 4096, 8192), (8192, 8192, 8192)), plans=FP8ERR_PLANS):
    """TFLOP/s of the fp8err section's products (e4m3 x e4m3, b as [N, K],
    float16 results), ours and torch._scaled_mm side by side in one process."""
    import mlx_flash
    from ..backends import cuda_matmul as cm

    np, torch = _torch()
    for M, N, K in shapes:
        flops = 2 * M * N * K
        reps = min(50, max(5, int(4e13 // flops)))
        ka, kb = mx.random.split(mx.random.key(M + K))
        a8, b8 = _fp8_operands((M, K), ka, "normal"), _fp8_operands((N, K), kb, "normal")
        mx.eval(a8, b8)
        cases = {
            "ours_exact_default": lambda: mlx_flash.matmul2d(a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                             out_dtype=mx.float16),
            "ours_fast_accumulation": lambda: mlx_flash.matmul2d(a8, b8, a_fmt="e4m3", b_fmt="e4m3",
                                                                 transpose_b=True, out_dtype=mx.float16,
                                                                 fast_accumulation=True),
            **{f"ours_native_bn{p[0]}_promote{p[2]}": (lambda p=p: cm.matmul(
                a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16, route="wgmma_fp8",
                plan=p)) for p in plans},
        }
        for case, fn in cases.items():
            try:
                t, clocks = time_lazy_clocked(fn, reps)
                rec.add(section="fp8speed", case=case, M=M, N=N, K=K, ms=t * 1e3, tflops=flops / t / 1e12, **clocks)
            except Exception as e:  # noqa: BLE001
                rec.add(section="fp8speed", case=case, M=M, N=N, K=K, error=f"{type(e).__name__}: {e}"[:500])
        if torch is None:
            continue
        ta = torch.from_numpy(np.array(a8)).cuda().view(torch.float8_e4m3fn)
        tb = torch.from_numpy(np.array(b8)).cuda().view(torch.float8_e4m3fn).t()  # column-major [K, N]
        one = torch.ones((), device="cuda")
        for fast in (False, True):
            try:
                t = time_torch(lambda: torch._scaled_mm(ta, tb, scale_a=one, scale_b=one, out_dtype=torch.float16,
                                                        use_fast_accum=fast), reps)
                rec.add(section="fp8speed", case=f"torch_scaled_mm_fast_accum_{str(fast).lower()}", M=M, N=N, K=K,
                        ms=t * 1e3, tflops=flops / t / 1e12, **gpu_clocks())
            except Exception as e:  # noqa: BLE001
                rec.add(section="fp8speed", case=f"torch_scaled_mm_fast_accum_{str(fast).lower()}", M=M, N=N, K=K,
                        error=f"{type(e).__name__}: {e}"[:500])
        del ta, tb


def time_steady(prepare, small: int, large: int) -> float:
    """Seconds per call with the queue full: `prepare(n)` returns a callable
    that runs n calls and blocks until they are done (for MLX, graphs built
    beforehand and evaluated together; for torch, n launches and a
    synchronize). The difference of a large and a small batch, over the
    difference of their sizes, leaves out what a batch pays once however
    long it is: the host's recording of MLX's first CUDA graph before the GPU
    starts (MLX closes a graph at 100 nodes or 1000 MB of inputs, so at 4096^2
    operands ~30 products are recorded before the first runs) and the
    synchronize. Session 10's 4096^3 rows, one batch of 50 timed whole, held
    that start-up in every call's share."""
    if not 0 < small < large:
        raise ValueError(f"time_steady: expected 0 < small < large, got {small}, {large}")
    took = []
    for n in (small, large):
        run = prepare(n)
        t0 = time.perf_counter()
        run()
        took.append(time.perf_counter() - t0)
        del run
    return (took[1] - took[0]) / (large - small)


def interleave(calls: dict, rounds: int, sample) -> dict:
    """{name: [seconds, ...]}: `sample(name, call)` for every call in turn,
    `rounds` times, so that a drift of the card's clock over the run falls on
    all of them alike (session 17: timing one case after the other drifted by
    up to 1.5x). A call that raises is recorded as its exception and left out
    of the later rounds."""
    got = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            if isinstance(got[name], BaseException):
                continue
            try:
                got[name].append(sample(name, call))
            except Exception as e:  # noqa: BLE001 (one case failing must not lose the others)
                got[name] = e
    return got


def _mlx_batch(make):
    """prepare(n) for time_steady: n graphs of `make` built, then one eval."""
    def prepare(n):
        graphs = [make() for _ in range(n)]
        mx.synchronize()
        return lambda: (mx.eval(graphs), mx.synchronize())
    return prepare


def _torch_batch(fn, torch):
    def prepare(n):
        torch.cuda.synchronize()

        def run():
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        return run
    return prepare


def gpu_time_per_call(prepare, n: int, torch) -> dict:
    """The GPU's own time of one call run alone, through CUPTI (torch.profiler
    records MLX's kernels as well as torch's): n calls, each evaluated and
    synchronized before the next, so no two kernels share the card (within
    one of MLX's CUDA graphs independent products overlap: in session 18's
    8-call batches MLX's kernels summed up to 17 % more time than the
    batch's wall time per call).
    The durations of every kernel, copy and fill, summed, over n; and the
    kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    runs = [prepare(1) for _ in range(n)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for run in runs:
            run()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and e.time_range.end > e.time_range.start]
    by_name = {}
    for e in events:
        by_name.setdefault(e.name[:100], []).append(e.time_range.end - e.time_range.start)
    total = sum(sum(d) for d in by_name.values())
    return {"gpu_us_per_call": total / n,
            "gpu_kernels": {k: {"count": len(d), "us": sum(d) / len(d)} for k, d in by_name.items()}}


# Issue 15's products: each of ours against its anchor in the same run, as
# (ours, anchor) case names of bench_targets.
TARGET_PAIRS = (("ours_fp16", "mlx_fp16"), ("ours_bf16", "mlx_bf16"), ("ours_fp16_x_e4m3_bT", "mlx_fp16"),
                ("ours_fp16_x_e4m3_bT_decode_first", "mlx_fp16"), ("ours_fp16_x_e4m3_bT_in_kernel", "mlx_fp16"),
                ("ours_e4m3_fast", "torch_scaled_mm_fast_accum_false"),
                ("ours_e4m3_x_e5m2_fast", "torch_scaled_mm_fast_accum_false"),
                ("ours_e4m3_fast_rowcol_scales_bf16", "torch_scaled_mm_rowwise_bf16"),
                ("ours_e4m3_exact", "torch_scaled_mm_fast_accum_false"),
                ("torch_scaled_mm_fast_accum_false", "mlx_fp16"))


# Native fp8 plans timed beside the routed one (BN, stages, promotion in
# stages of 128 K, TMA, warp-specialised): the routed plan before session 18
# (BN 128), more stages, the wide tile with fewer stages or promotion every
# 256 K.
TARGET_NATIVE_PLANS = ((128, 6, 1, True, True), (128, 7, 1, True, True), (192, 4, 1, True, True),
                       (192, 5, 2, True, True))


def raw_slots(slots: int, make):
    """`make` with the backend's fp8-weight decode set to `slots` slots of
    codes in the kernel at any number of rows (0: a decode pass first), the
    weight-as-A kernel off (session 20's default route), while
    it builds its graph: the route is chosen then, so the variants run side
    by side in one process."""
    from ..backends import cuda_matmul as cm

    def build():
        saved = cm.CVT_RAW_SLOTS, cm.CVT_RAW_MAX_ROWS, cm.FP8W_WA
        cm.CVT_RAW_SLOTS, cm.CVT_RAW_MAX_ROWS, cm.FP8W_WA = slots, 1 << 62, False
        try:
            return make()
        finally:
            cm.CVT_RAW_SLOTS, cm.CVT_RAW_MAX_ROWS, cm.FP8W_WA = saved
    return build


def bench_targets(rec: Recorder, sizes, rounds: int = 5, profile_calls: int = 8, native_plans=TARGET_NATIVE_PLANS):
    """Issue 15's targets at n^3, one run: ours through the public
    `mlx_flash.matmul2d` (its default routes: fp16, bf16, fp16 x e4m3 weight
    (FP8Linear's prefill), e4m3 x e4m3 exact, `fast_accumulation=True` (the
    native fp8 wgmma, promotion every 128 K as cuBLAS), e4m3 x e5m2, per-row
    x per-column scales) beside MLX's matmul and torch (fp16 matmul,
    `_scaled_mm` with fast accumulation off and on, row-wise scales).
    Every case is timed in turn, `rounds` times (time_steady: queue full,
    start-up left out; MLX may overlap independent products in one CUDA
    graph, torch runs them one after the other), then under CUPTI, each call
    alone: the GPU's own time a call, the kernel-to-kernel comparison.
    A "ratio" row per pair of TARGET_PAIRS gives ours / anchor in TFLOP/s,
    by wall and by GPU time. `native_plans` are timed too (the backend's
    wrapper, not the public call), each against _scaled_mm."""
    import mlx_flash
    from .. import fp8
    from ..backends import cuda_matmul as cm

    np, torch = _torch()
    on_gpu = torch is not None and dispatch.cuda_available()
    for n in sizes:
        flops = 2 * n ** 3
        large = min(96, max(8, int(2e13 // flops)))
        small = max(2, large // 4)
        k1, k2 = mx.random.split(mx.random.key(n + 15))
        a16 = mx.random.normal((n, n), key=k1).astype(mx.float16)
        b16 = mx.random.normal((n, n), key=k2).astype(mx.float16)
        abf, bbf = a16.astype(mx.bfloat16), b16.astype(mx.bfloat16)
        a8 = fp8.encode(a16, "e4m3")
        b8t = fp8.encode(mx.contiguous(b16.T), "e4m3")        # [N, K]: a Linear weight
        b8t_e5m2 = fp8.encode(mx.contiguous(b16.T), "e5m2")
        a_rows = mx.random.uniform(0.5, 2.0, (n, 1), key=k1)  # per-row (a) and per-column (b) scales
        b_cols = mx.random.uniform(0.5, 2.0, (1, n), key=k2)
        mx.eval(a16, b16, abf, bbf, a8, b8t, b8t_e5m2, a_rows, b_cols)
        mm = mlx_flash.matmul2d
        cases = {
            "mlx_fp16": lambda: a16 @ b16,
            "mlx_bf16": lambda: abf @ bbf,
            "ours_fp16": lambda: mm(a16, b16),
            "ours_bf16": lambda: mm(abf, bbf),
            "ours_fp16_x_e4m3_bT": lambda: mm(a16, b8t, b_fmt="e4m3", transpose_b=True),
            "ours_fp16_x_e4m3_bT_decode_first": raw_slots(0, lambda: mm(a16, b8t, b_fmt="e4m3", transpose_b=True)),
            "ours_fp16_x_e4m3_bT_in_kernel": raw_slots(cm.CVT_RAW_SLOTS or 2, lambda: mm(a16, b8t, b_fmt="e4m3", transpose_b=True)),
            "ours_e4m3_exact": lambda: mm(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                          out_dtype=mx.float16),
            "ours_e4m3_fast": lambda: mm(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                         out_dtype=mx.float16, fast_accumulation=True),
            "ours_e4m3_x_e5m2_fast": lambda: mm(a8, b8t_e5m2, a_fmt="e4m3", b_fmt="e5m2", transpose_b=True,
                                                out_dtype=mx.float16, fast_accumulation=True),
            "ours_e4m3_fast_rowcol_scales_bf16": lambda: mm(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                            a_scale=a_rows, b_scale=b_cols, out_dtype=mx.bfloat16,
                                                            fast_accumulation=True),
        }
        if dispatch.cuda_available():
            cases.update({f"ours_e4m3_native_plan_{'_'.join(str(int(v)) for v in p)}": (
                lambda p=p: cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16,
                                      route="wgmma_fp8", plan=p)) for p in native_plans})
        pairs = TARGET_PAIRS + tuple((name, "torch_scaled_mm_fast_accum_false") for name in cases
                                     if name.startswith("ours_e4m3_native_plan_"))
        prepares = {name: _mlx_batch(make) for name, make in cases.items()}
        if on_gpu:
            th, tbh = (torch.from_numpy(np.array(x)).cuda() for x in (a16, b16))
            tbf, tbbf = th.bfloat16(), tbh.bfloat16()
            ta = torch.from_numpy(np.array(a8)).cuda().view(torch.float8_e4m3fn)
            tb = torch.from_numpy(np.array(b8t)).cuda().view(torch.float8_e4m3fn).t()  # column-major [K, N]
            one = torch.ones((), device="cuda")
            ts_a = torch.from_numpy(np.array(a_rows)).cuda()
            ts_b = torch.from_numpy(np.array(b_cols)).cuda()
            tcalls = {
                "torch_fp16": lambda: th @ tbh,
                "torch_bf16": lambda: tbf @ tbbf,
                "torch_scaled_mm_fast_accum_false": lambda: torch._scaled_mm(
                    ta, tb, scale_a=one, scale_b=one, out_dtype=torch.float16, use_fast_accum=False),
                "torch_scaled_mm_fast_accum_true": lambda: torch._scaled_mm(
                    ta, tb, scale_a=one, scale_b=one, out_dtype=torch.float16, use_fast_accum=True),
                "torch_scaled_mm_rowwise_bf16": lambda: torch._scaled_mm(
                    ta, tb, scale_a=ts_a, scale_b=ts_b, out_dtype=torch.bfloat16, use_fast_accum=False),
            }
            prepares.update({name: _torch_batch(fn, torch) for name, fn in tcalls.items()})
        # Warm-up (kernels compiled, allocations sized), and each result
        # checked against float32 of its operands (the fp8 ones decoded).
        refs = {}
        for name in list(prepares):
            try:
                prepares[name](1)()
            except Exception as e:  # noqa: BLE001
                rec.add(section="targets", case=name, n=n, error=f"{type(e).__name__}: {e}"[:500])
                del prepares[name]
        if n <= 8192:
            # float32 of each case's own operands (fp8 codes decoded) and scales;
            # lazy, so only the references in use are computed, ref8 once.
            f32 = lambda x, fmt=None: fp8.decode(x, fmt) if fmt else x.astype(mx.float32)  # noqa: E731
            ref8 = f32(a8, "e4m3") @ f32(b8t, "e4m3").T  # every other e4m3 x e4m3 case
            ref_w8 = f32(a16) @ f32(b8t, "e4m3").T  # the fp16 x e4m3 weight product, every variant
            ref_of = {"ours_fp16": f32(a16) @ f32(b16), "ours_bf16": f32(abf) @ f32(bbf),
                      "ours_fp16_x_e4m3_bT": ref_w8, "ours_fp16_x_e4m3_bT_decode_first": ref_w8,
                      "ours_fp16_x_e4m3_bT_in_kernel": ref_w8,
                      "ours_e4m3_x_e5m2_fast": f32(a8, "e4m3") @ f32(b8t_e5m2, "e5m2").T,
                      "ours_e4m3_fast_rowcol_scales_bf16": ref8 * a_rows * b_cols}
            for name, make in cases.items():
                if name in prepares and not name.startswith("mlx"):
                    refs[name] = rel_diff(make(), ref_of.get(name, ref8))
        samples = interleave(prepares, rounds, lambda name, prep: time_steady(prep, small, large))
        gpu = {}
        for name, got in samples.items():
            row = dict(section="targets", case=name, n=n, batch=[small, large], rounds=rounds)
            if isinstance(got, BaseException):
                rec.add(**row, error=f"{type(got).__name__}: {got}"[:500])
                continue
            t = statistics.median(got)
            row.update(ms=t * 1e3, tflops=flops / t / 1e12, ms_rounds=[round(x * 1e3, 4) for x in got])
            if name in refs:
                row["rel_diff_vs_fp32"] = refs[name]
            if on_gpu:
                try:
                    g = gpu_time_per_call(prepares[name], profile_calls, torch)
                    gpu[name] = g["gpu_us_per_call"]
                    row.update(gpu_tflops=flops / (g["gpu_us_per_call"] * 1e-6) / 1e12, **g)
                except Exception as e:  # noqa: BLE001
                    row["gpu_error"] = f"{type(e).__name__}: {e}"[:300]
            rec.add(**row, **gpu_clocks())
        for ours, anchor in pairs:
            if all(isinstance(samples.get(x), list) and samples[x] for x in (ours, anchor)):
                med = {x: statistics.median(samples[x]) for x in (ours, anchor)}
                ratio = dict(section="targets_ratio", n=n, case=f"{ours}_vs_{anchor}", wall=med[anchor] / med[ours])
                if ours in gpu and anchor in gpu:
                    ratio["gpu"] = gpu[anchor] / gpu[ours]
                rec.add(**ratio)
        del prepares, cases
        if on_gpu:
            del th, tbh, tbf, tbbf, ta, tb, tcalls
            torch.cuda.empty_cache()
        mx.clear_cache()
        if CHECKPOINT is not None:
            CHECKPOINT()


# FP8Linear's prefill products (M tokens x a [N, K] weight): Llama-3.1-8B's
# attention (4096 x 4096) and MLP (14336 x 4096, 4096 x 14336) weights.
PREFILL_SHAPES = tuple((m, k, n) for m in (128, 256, 512, 1024, 2048, 4096) for k, n in ((4096, 4096), (4096, 14336),
                                                                               (14336, 4096)))


# Warp-specialised plans and slots of fp8 codes timed beside the routed one
# (BN, stages, promote, TMA, ws; slots).
PREFILL_PLANS = (((256, 3, 0, True, True), 4),)
# Weight-as-A plans (BT tokens, stages[, stream-K tiles]) timed beside its
# default (session 20); session 21: the default plans forced to 0 stream-K
# tiles (the stream-K form of the kernel with every tile whole). Besides,
# "ours_wa_whole": the default plan with the stream-K switch off (the kernel
# a card has run, matmul_wgmma_wa.cuh).
PREFILL_WA_PLANS = ((128, 8), (256, 5), (128, 8, 0), (256, 5, 0))
# Cases also timed alone on the GPU (CUPTI, gpu_time_per_call): with the queue
# full, MLX lets independent products of one graph overlap, which hides a
# kernel that leaves SMs idle (session 21).
PREFILL_GPU_CASES = ("mlx_fp16", "ours_wa", "ours_wa_whole", "ours_wa_bt128_st8_sk0", "ours_wa_bt256_st5_sk0")


def _without_stream_k(cm, call):
    """call() with the weight-as-A kernel's stream-K switch off (every tile
    whole: the kernel text of matmul_wgmma_wa.cuh), whatever the environment
    set."""
    saved, cm.WA_SK = cm.WA_SK, False
    try:
        return call()
    finally:
        cm.WA_SK = saved


def _prefill_operands(m: int, k: int, n: int):
    """FP8Linear's prefill operands, evaluated: fp16 x [m, k], an fp16 weight
    w16 [n, k], its e4m3 codes w8 (w16 x 20) and the per-row scale 0.05 [1, n]
    (so w8 decoded times the scale is w16 to e4m3's precision)."""
    from .. import fp8

    k1, k2 = mx.random.split(mx.random.key(m + k + n))
    x = mx.random.normal((m, k), key=k1).astype(mx.float16)
    w16 = (mx.random.normal((n, k), key=k2) * 0.05).astype(mx.float16)
    w8 = fp8.encode(w16 * 20.0, "e4m3")
    scale = mx.full((1, n), 0.05, mx.float32)
    mx.eval(x, w16, w8, scale)
    return x, w16, w8, scale


def bench_prefill(rec: Recorder, shapes=PREFILL_SHAPES, rounds: int = 5, plans=(), wa_plans=()):
    """FP8Linear's prefill product, `(x @ decode(w).T) * scale` for fp16 x of
    M rows and an e4m3 weight [N, K] with a scale per weight row, through the public
    matmul2d: as routed, fp8 codes decoded inside the kernel and by a pass
    first (CVT_RAW_SLOTS 0; below CVT_WS_MIN_ROWS rows on the kernel that
    decodes in shared memory), and `plans` ((plan, slots) pairs), beside
    MLX's fp16 matmul with the fp16 weight (`x @ w16.T`, nn.Linear's
    product). Timed in turn (interleave, time_steady); each result checked
    against float32; peak memory of one call (the decode pass's fp16 copy of
    the weight shows there). Session 19's s19b run named the kernel that
    decodes, forced below 512 rows, "ours_ws_forced". "ours_wa": the
    weight-as-A kernel (route wgmma_wa, its default plan, stream-K as the
    switch says), "ours_wa_whole" the same with stream-K off, and
    `wa_plans` ((BT, stages[, stream-K tiles]) each) on it."""
    import mlx_flash
    from .. import fp8
    from ..backends import cuda_matmul as cm

    for m, k, n in shapes:
        flops = 2 * m * k * n
        large = min(96, max(8, int(2e13 // flops)))
        small = max(2, large // 4)
        x, w16, w8, scale = _prefill_operands(m, k, n)
        mm = mlx_flash.matmul2d
        ours = lambda: mm(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True)  # noqa: E731
        # The routed call is timed last in each round (session 20's s20d timed it second, right after MLX's,
        # and it came out 6-12 % slower than the same kernel forced at 1024 rows and more).
        cases = {"mlx_fp16": lambda: x @ w16.T,
                 "ours_in_kernel": raw_slots(cm.CVT_RAW_SLOTS or 2, ours), "ours_decode_first": raw_slots(0, ours)}
        for plan, slots in plans if dispatch.cuda_available() else ():
            cases[f"ours_plan_{plan[0]}_{plan[1]}_raw{slots}"] = raw_slots(slots, lambda plan=plan: cm.matmul(
                x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, route="wgmma", plan=plan))
        if dispatch.cuda_available():
            for plan in (None,) + tuple(wa_plans):
                name = "ours_wa" if plan is None else "ours_wa_bt{}_st{}".format(*plan) + "".join(
                    f"_sk{v}" for v in plan[2:])
                cases[name] = lambda plan=plan: cm.matmul(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True,
                                                          route="wgmma_wa", plan=plan)
            cases["ours_wa_whole"] = lambda: _without_stream_k(cm, lambda: cm.matmul(
                x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, route="wgmma_wa"))
        cases["ours_routed"] = ours
        ref = (x.astype(mx.float32) @ fp8.decode(w8, "e4m3").T) * scale
        prepares, peaks = {}, {}
        for name, make in cases.items():
            try:
                mx.eval(make())
                mx.synchronize()
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                got = make()
                mx.eval(got)
                peaks[name] = (mx.get_peak_memory() - base) / 2 ** 20
                err = rel_diff(got, ref) if name != "mlx_fp16" else None
                del got
                prepares[name] = (_mlx_batch(make), err)
            except Exception as e:  # noqa: BLE001
                rec.add(section="prefill", case=name, m=m, k=k, n=n, error=f"{type(e).__name__}: {e}"[:500])
        samples = interleave({name: p for name, (p, _) in prepares.items()}, rounds,
                             lambda name, prep: time_steady(prep, small, large))
        for name, got in samples.items():
            row = dict(section="prefill", case=name, m=m, k=k, n=n, batch=[small, large], rounds=rounds,
                       peak_mib=peaks.get(name))
            if isinstance(got, BaseException):
                rec.add(**row, error=f"{type(got).__name__}: {got}"[:500])
                continue
            t = statistics.median(got)
            row.update(us=t * 1e6, tflops=flops / t / 1e12, us_rounds=[round(v * 1e6, 2) for v in got])
            if prepares[name][1] is not None:
                row["rel_diff_vs_fp32"] = prepares[name][1]
            rec.add(**row)
        gpu = {}
        _, torch = _torch()
        if torch is not None and dispatch.cuda_available():
            for name in PREFILL_GPU_CASES:
                if name in prepares:
                    try:
                        got = gpu_time_per_call(prepares[name][0], 8, torch)
                        gpu[name] = got["gpu_us_per_call"]
                        rec.add(section="prefill_gpu", case=name, m=m, k=k, n=n, **got)
                    except Exception as e:  # noqa: BLE001
                        rec.add(section="prefill_gpu", case=name, m=m, k=k, n=n,
                                error=f"{type(e).__name__}: {e}"[:500])
        base = samples.get("mlx_fp16")
        for name, got in samples.items():
            if name != "mlx_fp16" and isinstance(got, list) and got and isinstance(base, list) and base:
                ratio = dict(section="prefill_ratio", m=m, k=k, n=n, case=f"{name}_vs_mlx_fp16",
                             wall=statistics.median(base) / statistics.median(got))
                if name in gpu and "mlx_fp16" in gpu:
                    ratio["gpu"] = gpu["mlx_fp16"] / gpu[name]
                rec.add(**ratio)
        del prepares, cases, x, w16, w8
        mx.clear_cache()
        if CHECKPOINT is not None:
            CHECKPOINT()


# (K, N) of the products in Llamas of 3B shape (q / o, k / v, gate / up,
# down) and 8B shape: bench_wa_tiles times each at every M it is given.
WA_TILE_SHAPES = ((3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072),
                  (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
# Its cases: (name, plan (BT, stages, stream-K tiles) or None for the
# default's, tile fit).
# (Parts s26b and s26d also timed decode loads of 4 bytes, since removed:
# their cases' names end in _dw4 / _dw16.)
WA_TILE_CASES = (("bt256", (256, 5, 0), True), ("bt192", (192, 6, 0), True), ("bt128", (128, 8, 0), True),
                 ("default_nofit", None, False), ("default", None, True))


@contextlib.contextmanager
def _settings(module, **values):
    """module's attributes set to `values` inside the block, restored after
    (a routing switch read while a call's graph is built)."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _products_alone(rec: Recorder, section: str, calls_of: dict, ref, shape, rounds: int, calls: int, torch,
                    extra: dict, **fields):
    """Each call of calls_of ({case: make}, "mlx_fp16" the anchor) checked
    against `ref` once (float32 relative difference; a failing case recorded
    and dropped), then timed by the GPU time of a call run alone (CUPTI),
    cases in turn `rounds` times: rows of `section` with the median, the
    ratio to the anchor, extra[case]'s fields and `fields`."""
    m, k, n = shape
    errs = {}
    for name, make in list(calls_of.items()):
        try:
            got = make()
            mx.eval(got)
            if name != "mlx_fp16":
                errs[name] = rel_diff(got, ref)
            del got
        except Exception as e:  # noqa: BLE001
            rec.add(section=section, case=name, m=m, k=k, n=n, error=f"{type(e).__name__}: {e}"[:500])
            del calls_of[name]
    samples = interleave({name: _mlx_batch(make) for name, make in calls_of.items()}, rounds,
                         lambda name, prep: gpu_time_per_call(prep, calls, torch)["gpu_us_per_call"])
    base = samples.get("mlx_fp16")
    for name, got in samples.items():
        row = dict(section=section, case=name, m=m, k=k, n=n, rounds=rounds, calls=calls, **fields)
        if isinstance(got, BaseException):
            rec.add(**row, error=f"{type(got).__name__}: {got}"[:500])
            continue
        t = statistics.median(got)
        row.update(gpu_us=t, gpu_us_rounds=[round(v, 2) for v in got], tflops=2 * m * k * n / t / 1e6)
        if name in errs:
            row["rel_diff_vs_fp32"] = errs[name]
        row.update(extra.get(name, {}))
        if isinstance(base, list) and base and name != "mlx_fp16":
            row["vs_mlx_fp16"] = statistics.median(base) / t
        rec.add(**row)


def bench_wa_tiles(rec: Recorder, shapes, rounds: int = 2, calls: int = 8, cases=WA_TILE_CASES):
    """The weight-as-A kernel's tile heights (session 26), by the GPU time of
    a call run alone (CUPTI, gpu_time_per_call: what predicts a model, whose
    products mostly wait on the one before), beside MLX's fp16 product
    `x @ w16.T`: FP8Linear's product (fp16 x [M, K], e4m3 weight [N, K], a
    scale per weight row) with each plan whole (stream-K tiles 0), and the
    default plan (stream-K as the defaults say) with the tile fit and
    without (session 25's). Cases in turn, `rounds` times, the median; each
    result checked against float32 once; the default cases' plans recorded."""
    from .. import fp8
    from ..backends import cuda_matmul as cm

    _, torch = _torch()
    if torch is None:
        raise RuntimeError("bench_wa_tiles needs torch (its profiler reads the GPU's kernel times)")
    for m, k, n in shapes:
        x, w16, w8, scale = _prefill_operands(m, k, n)
        ref = (x.astype(mx.float32) @ fp8.decode(w8, "e4m3").T) * scale

        def ours(plan, fit):
            with _settings(cm, WA_TILE_FIT=fit):
                return cm.matmul(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, route="wgmma_wa", plan=plan)

        calls_of = {"mlx_fp16": lambda: x @ w16.T}
        for name, plan, fit in cases:
            calls_of[name] = functools.partial(ours, plan, fit)
        plans = {}
        for name, plan, fit in cases:
            if plan is None:
                with _settings(cm, WA_TILE_FIT=fit):
                    plans[name] = {"plan": list(cm.wa_plan(m, n, k, cm.sm_count()))}
        _products_alone(rec, "wa_tiles", calls_of, ref, (m, k, n), rounds, calls, torch, plans)
        del calls_of, x, w16, w8, ref
        mx.clear_cache()
        if CHECKPOINT is not None:
            CHECKPOINT()


# The native fp8 kernel's stream-K cases (session 29): (name, NATIVE_SK,
# NATIVE_SK_SPLITS, NATIVE_SK_PARTIAL).
NATIVE_SK_CASES = (("native_whole", False, 2, False), ("native_split2", True, 2, False),
                   ("native_split4", True, 4, False), ("native_partial", True, 2, True))


def bench_native_sk(rec: Recorder, shapes, rounds: int = 2, calls: int = 8, cases=NATIVE_SK_CASES):
    """Quantized activations' product (FP8Linear(activations="e4m3"): e4m3 x
    [M, K] with a scale a row, e4m3 weight [N, K] with a scale a row, the
    native fp8 kernel) with the native stream-K rules of each case, by the GPU
    time of a call run alone (CUPTI), beside MLX's fp16 product `x @ w16.T`.
    Cases in turn, `rounds` times, the median; each result checked against
    float32 once; the stream-K plan (tiles, blocks) recorded."""
    import math

    from .. import fp8
    from ..backends import cuda_matmul as cm

    _, torch = _torch()
    if torch is None:
        raise RuntimeError("bench_native_sk needs torch (its profiler reads the GPU's kernel times)")
    for m, k, n in shapes:
        x, w16, w8, w_scale = _prefill_operands(m, k, n)
        x8, x_scale = fp8.quantize(x, "e4m3", axis=0)  # a scale a row (token)
        mx.eval(x8, x_scale)
        ref = (fp8.decode(x8, "e4m3") @ fp8.decode(w8, "e4m3").T) * x_scale * w_scale

        def ours(on, splits, partial):
            with _settings(cm, NATIVE_SK=on, NATIVE_SK_SPLITS=splits, NATIVE_SK_PARTIAL=partial):
                return cm.matmul(x8, w8, a_fmt="e4m3", b_fmt="e4m3", a_scale=x_scale.reshape(-1),
                                 b_scale=w_scale, transpose_b=True, out_dtype=mx.float16, route="wgmma_fp8")

        calls_of = {"mlx_fp16": lambda: x @ w16.T}
        plans = {}
        bn = cm.WS_PLANS["native"][0]
        units, ktiles = math.ceil(m / 128) * math.ceil(n / bn), math.ceil(k / 128)
        for name, on, splits, partial in cases:
            calls_of[name] = functools.partial(ours, on, splits, partial)
            with _settings(cm, NATIVE_SK=on, NATIVE_SK_SPLITS=splits, NATIVE_SK_PARTIAL=partial):
                plans[name] = {"stream_k": list(cm.native_stream_k_tiles(units, ktiles, cm.sm_count()))}
        _products_alone(rec, "native_sk", calls_of, ref, (m, k, n), rounds, calls, torch, plans,
                        tiles=units, ktiles=ktiles)
        del calls_of, x, w16, w8, x8, ref
        mx.clear_cache()
        if CHECKPOINT is not None:
            CHECKPOINT()


def _bars(ax, rows, key, label_of, title, ylabel):
    """Grouped bars of rows[key] by case (x) and size (one bar colour each)."""
    sizes = sorted({r["n"] for r in rows})
    cases = list(dict.fromkeys(label_of(r) for r in rows))
    width = 0.8 / max(1, len(sizes))
    for i, n in enumerate(sizes):
        vals = {label_of(r): r[key] for r in rows if r["n"] == n}
        ax.bar([j + i * width for j in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=f"{n}^3")
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(cases))], cases, rotation=35, ha="right",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()


def _grouped(ax, rows, group_of, case_of, key):
    """Bars of rows[key], grouped by group_of, one colour per case_of."""
    labels = list(dict.fromkeys(group_of(r) for r in rows))
    cases = list(dict.fromkeys(case_of(r) for r in rows))
    width = 0.8 / max(1, len(cases))
    for i, c in enumerate(cases):
        vals = {group_of(r): r[key] for r in rows if case_of(r) == c}
        ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width, label=c)
    ax.set_xticks([j + width * (len(cases) - 1) / 2 for j in range(len(labels))], labels, rotation=35,
                  ha="right", fontsize=8)
    ax.legend(fontsize=7)


def plot(path: str) -> str:
    """The panels a run holds: gemm and targets TFLOP/s per case and size
    (targets: by wall with the queue full, and by GPU time through CUPTI),
    decode weight GB/s against the copy bandwidth, prefill and wa_tiles time
    ratios against MLX's fp16 matmul, the models' ratios and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "error" not in r]
    gemm = [r for r in rows if r.get("section") == "gemm" and "tflops" in r]
    targets = [r for r in rows if r.get("section") == "targets" and "tflops" in r]
    dec = [r for r in rows if r.get("section") == "decode"]
    prefill = [r for r in rows if r.get("section") == "prefill_ratio"]
    model = [r for r in rows if r.get("section") == "llama_prefill" and "vs_fp16" in r and r["case"] != "fp16"]
    profile = [r for r in rows if r.get("section") == "llama_prefill_profile" and "by_class_us" in r]
    tiles = [r for r in rows if r.get("section") == "wa_tiles" and "vs_mlx_fp16" in r]
    native_sk = [r for r in rows if r.get("section") == "native_sk" and "vs_mlx_fp16" in r]
    panels = [p for p, got in (("gemm", gemm), ("targets", targets), ("targets_gpu", [r for r in targets
                                                                                        if "gpu_tflops" in r]),
                               ("decode", dec), ("prefill", prefill), ("llama_prefill", model),
                               ("llama_prefill_profile", profile), ("wa_tiles", tiles), ("native_sk", native_sk)) if got]
    if not panels:
        raise ValueError(f"{path}: no gemm, targets, decode, prefill, llama_prefill, llama_prefill_profile or "
                         "wa_tiles or native_sk rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "gemm":
            _bars(ax, gemm, "tflops", lambda r: r["case"], "n x n x n products", "TFLOP/s")
        elif panel == "targets":
            _bars(ax, targets, "tflops", lambda r: r["case"], "issue 15's products, wall, queue full", "TFLOP/s")
        elif panel == "prefill":
            labels = list(dict.fromkeys(f'{r["m"]}x{r["k"]}x{r["n"]}' for r in prefill))
            pcases = list(dict.fromkeys(r["case"] for r in prefill))
            width = 0.8 / max(1, len(pcases))
            for i, c in enumerate(pcases):
                vals = {f'{r["m"]}x{r["k"]}x{r["n"]}': r["wall"] for r in prefill if r["case"] == c}
                ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width,
                       label=c.removesuffix("_vs_mlx_fp16"))
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xticks([j + width * (len(pcases) - 1) / 2 for j in range(len(labels))], labels, rotation=35,
                          ha="right", fontsize=8)
            ax.set_ylabel("MLX fp16 time / ours (> 1: faster)")
            ax.set_title("FP8Linear prefill: fp16 x [N, K] e4m3 weight, M x K x N")
            ax.legend(fontsize=7)
        elif panel == "targets_gpu":
            _bars(ax, [r for r in targets if "gpu_tflops" in r], "gpu_tflops", lambda r: r["case"],
                  "issue 15's products, GPU time (CUPTI)", "TFLOP/s")
        elif panel == "llama_prefill":
            _grouped(ax, model, lambda r: f'{r["model"]} {r["prompt"]}', lambda r: r["case"], "vs_fp16")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel("prompt tokens/s / the fp16 model's (> 1: faster)")
            ax.set_title("mlx-lm Llama prefill, FP8Linear cases vs fp16")
        elif panel == "wa_tiles":
            _grouped(ax, tiles, lambda r: f'{r["m"]}x{r["k"]}x{r["n"]}', lambda r: r["case"], "vs_mlx_fp16")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel("MLX fp16 GPU time / ours (> 1: faster)")
            ax.set_title("FP8Linear's product, a call alone (CUPTI), M x K x N, by tile plan")
        elif panel == "native_sk":
            _grouped(ax, native_sk, lambda r: f'{r["m"]}x{r["k"]}x{r["n"]}', lambda r: r["case"], "vs_mlx_fp16")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel("MLX fp16 GPU time / ours (> 1: faster)")
            ax.set_title("native fp8 x fp8 (quantized activations), a call alone (CUPTI), by stream-K rule")
        elif panel == "llama_prefill_profile":
            classes = sorted({c for r in profile for c in r["by_class_us"]})
            labels = [f'{r["model"]} {r["prompt"]} {r["case"]}' for r in profile]
            bottom = [0.0] * len(profile)
            for cls in classes:
                vals = [r["by_class_us"].get(cls, 0.0) / 1e3 for r in profile]
                ax.bar(range(len(profile)), vals, 0.7, bottom=bottom, label=cls)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.plot(range(len(profile)), [r["busy_us"] / 1e3 for r in profile], "k_", ms=20, label="GPU busy")
            ax.set_xticks(range(len(profile)), labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel("ms of kernel time a forward")
            ax.set_title("prefill forward, kernel time by class (CUPTI)")
            ax.legend(fontsize=7)
        else:
            labels = list(dict.fromkeys(f'M={r["M"]} {r["K"]}x{r["N"]}' for r in dec))
            name = lambda r: r["case"] + (f'@{r["plan"]}' if r.get("plan") else "")  # noqa: E731
            dcases = list(dict.fromkeys(name(r) for r in dec))
            width = 0.8 / max(1, len(dcases))
            for i, c in enumerate(dcases):
                vals = {f'M={r["M"]} {r["K"]}x{r["N"]}': r["weight_gbps"] for r in dec if name(r) == c}
                ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width,
                       label=c)
            copy = [r["gbps"] for r in rows if r.get("section") == "copy"]
            if copy:
                ax.axhline(max(copy), color="k", lw=0.8, ls="--", label="plain copy")
                ax.axhline(0.7 * max(copy), color="gray", lw=0.8, ls=":", label="70% of copy")
            ax.set_xticks([j + width * (len(dcases) - 1) / 2 for j in range(len(labels))], labels, rotation=35,
                          ha="right", fontsize=8)
            ax.set_ylabel("weight GB/s")
            ax.set_title("decode: M rows x [N, K] weight")
            ax.legend(fontsize=8)
    fig.suptitle(f'matmul2d on {data["card"]} (MLX {data["mlx"]}, torch {data.get("torch", "-")}, {data["time"]})')
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# (output, input) dims of one Llama-3-8B-shaped block's projections: q, k, v, o, gate, up, down.
BLOCK_LINEARS = ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336))


def bench_layers(rec: Recorder, blocks: int = 4, rows=(1, 512)):
    """A stack of `blocks` blocks of projections (no attention) as nn.Linear in fp16
    vs mlx_flash.nn.FP8Linear (e4m3, per-channel scales), through the public
    layers: per-token time at M = 1 (a decode step's projections) and TFLOP/s at
    prefill M. Each layer gets its own random input, so all run in one eval."""
    import mlx.nn as nn

    from ..nn import FP8Linear

    fp16, fp8 = [], []
    for i, (o, k) in enumerate(BLOCK_LINEARS * blocks):
        lin = nn.Linear(k, o, bias=False)
        lin.weight = (mx.random.normal((o, k), key=mx.random.key(100 + i)) * 0.02).astype(mx.float16)
        fp8.append(FP8Linear.from_linear(lin))
        fp16.append(lin)
        mx.eval(lin.parameters(), fp8[-1].parameters())
    weight_bytes16 = sum(2 * o * k for o, k in BLOCK_LINEARS) * blocks
    flops_per_row = sum(2 * o * k for o, k in BLOCK_LINEARS) * blocks
    for M in rows:
        xs = {k: mx.random.normal((M, k), key=mx.random.key(k)).astype(mx.float16) for _, k in BLOCK_LINEARS}
        mx.eval(list(xs.values()))
        for name, layers in (("fp16_nn_Linear", fp16), ("FP8Linear_e4m3", fp8)):
            t = time_lazy(lambda: [layer(xs[layer.weight.shape[1]]) for layer in layers], 10 if M == 1 else 3)
            rec.add(section="layers", case=name, M=M, blocks=blocks, ms=t * 1e3, tokens_per_s=M / t,
                    tflops=flops_per_row * M / t / 1e12, weight_gib_fp16=weight_bytes16 / GIB)


# A Llama-3.2-1B block's projections (out, in): q, k, v, o, gate, up, down.
LLAMA_1B_LINEARS = ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))


def bench_calls(rec: Recorder, blocks: int = 16, steps: int = 40):
    """Where a decode step's time goes, per projection call: 16 Llama-1B-shaped
    blocks of projections (q, k, v, o, gate, up, down; residual adds, a gated
    MLP and an rms_norm between, as the model's dataflow), M = 1, through
    fp16 nn.Linear and FP8Linear on each of its few-rows paths (matmul2d
    compiled, the default; direct, MLX_FLASH_FP8LINEAR_PATH=direct, compiled
    and not; the direct kernel without its custom function). Per call:
    build_us (graph building alone), eval_us (mx.eval of the built graph
    alone: MLX's evaluation loop plus the GPU), step_us (generation's
    pattern: each step built and queued with mx.async_eval while the previous
    one is read back). The direct path's outputs are compared with the
    default path's (same kernel: bit-identical)."""
    import mlx.nn as nn

    from .. import nn as fnn

    norm_w = mx.ones((2048,), mx.float16)
    fp16 = []
    for i, (o, k) in enumerate(LLAMA_1B_LINEARS * blocks):
        lin = nn.Linear(k, o, bias=False)
        lin.weight = (mx.random.normal((o, k), key=mx.random.key(300 + i)) * 0.02).astype(mx.float16)
        fp16.append(lin)
    fp8 = [fnn.FP8Linear.from_linear(lin) for lin in fp16]
    mx.eval([lin.parameters() for lin in fp16 + fp8])
    calls = len(fp16)

    def step(layers, h):
        side = []
        for b in range(blocks):
            q, k, v, o, g, u, d = layers[7 * b:7 * b + 7]
            side += [k(h), v(h)]
            h2 = h + o(q(h))
            h = mx.fast.rms_norm(h2 + d(nn.silu(g(h2)) * u(h2)), norm_w, 1e-5)
        return [h] + side

    x = mx.random.normal((1, 2048), key=mx.random.key(7)).astype(mx.float16)
    mx.eval(x)
    from ..backends import cuda_matmul as cm

    class NoGrad:
        """The direct path's kernel alone, no custom function (not differentiable):
        what the custom function's node costs, measured."""

        def __init__(self, layer):
            self.layer = layer

        def __call__(self, h):
            return cm.linear_few_rows(h, self.layer.weight, self.layer.scale, self.layer.fmt)

    variants = (("fp16_nn_Linear", fp16, None, "1"), ("FP8Linear_matmul2d", fp8, "matmul2d", "1"),
                ("FP8Linear_direct", fp8, "direct", "1"), ("FP8Linear_direct_uncompiled", fp8, "direct", "0"),
                ("direct_kernel_no_custom_function", [NoGrad(f) for f in fp8], None, "1"))
    outs = {}
    for name, layers, path, compiled in variants:
        old = fnn._PATH, fnn._COMPILE
        fnn._COMPILE = compiled
        if path:
            fnn._PATH = path
        try:
            outs[name] = step(layers, x)[0]
            mx.eval(outs[name])
            best = {"build_us": float("inf"), "eval_us": float("inf"), "step_us": float("inf")}
            for _ in range(3):
                mx.synchronize()
                t0 = time.perf_counter()
                graph = step(layers, x)
                t1 = time.perf_counter()
                mx.eval(graph)
                mx.synchronize()
                t2 = time.perf_counter()
                best["build_us"] = min(best["build_us"], (t1 - t0) / calls * 1e6)
                best["eval_us"] = min(best["eval_us"], (t2 - t1) / calls * 1e6)
                h = x
                t0 = time.perf_counter()
                cur = step(layers, h)
                mx.async_eval(cur)
                for _ in range(steps - 1):
                    nxt = step(layers, cur[0])
                    mx.async_eval(nxt)
                    mx.eval(cur)
                    cur = nxt
                mx.eval(cur)
                best["step_us"] = min(best["step_us"], (time.perf_counter() - t0) / steps / calls * 1e6)
            row = dict(section="calls", case=name, calls_per_step=calls, blocks=blocks, **best, **gpu_clocks())
            if name.startswith(("FP8Linear_direct", "direct_")):
                row["max_abs_diff_vs_matmul2d_path"] = mx.abs(
                    outs[name].astype(mx.float32) - outs["FP8Linear_matmul2d"].astype(mx.float32)).max().item()
            rec.add(**row)
        except Exception as e:  # noqa: BLE001
            rec.add(section="calls", case=name, error=f"{type(e).__name__}: {e}"[:500])
        finally:
            fnn._PATH, fnn._COMPILE = old


# Llama-3.2-shaped random models (mlx-lm's llama.Model, tied embeddings).
LLAMA_CONFIGS = {
    "llama_1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                     vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama_3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                     vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's shape: 16 GB of fp16 weights, so a decode step reads weights longer than the host
    # builds it, where the 1B / 3B models' steps are host-bound (docs/matmul.md).
    "llama_8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                     vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def _mlx_lm_llama():
    """mlx_lm.models.llama and .cache without mlx_lm's package __init__ (it
    imports transformers, which the GPU machine lacks): the package is
    registered as a bare namespace over its directory first."""
    import importlib
    import importlib.util
    import sys
    import types

    if "mlx_lm" not in sys.modules:
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None:
            raise ImportError("mlx_lm is not importable (put mlx-lm's package directory on PYTHONPATH)")
        pkg = types.ModuleType("mlx_lm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_lm"] = pkg
    return importlib.import_module("mlx_lm.models.llama"), importlib.import_module("mlx_lm.models.cache")


def bench_llama(rec: Recorder, models=("llama_1b", "llama_3b"), prompt: int = 128, tokens: int = 64,
                uncompiled: bool = False):
    """Greedy generation tokens/s of a random-weight mlx-lm Llama in fp16 vs
    the same model with every nn.Linear as FP8Linear (e4m3, per-channel
    scales), decoded the way mlx-lm's generate_step does (next token's graph
    built and queued with mx.async_eval before the current one is read).
    FP8Linear's few-rows paths side by side (uncompiled=True adds matmul2d
    without mx.compile)."""
    from .. import nn as fnn

    llama, cache_mod = _mlx_lm_llama()

    def generate(model):
        cache = cache_mod.make_prompt_cache(model)
        toks = mx.random.randint(0, 1000, (1, prompt), key=mx.random.key(1))
        y = mx.argmax(model(toks, cache=cache)[:, -1], axis=-1)
        mx.eval(y)

        def step(y):
            return mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)

        t0 = time.perf_counter()
        y = step(y)
        mx.async_eval(y)
        out = []
        for _ in range(tokens - 1):
            nxt = step(y)
            mx.async_eval(nxt)
            out.append(y.item())
            y = nxt
        out.append(y.item())
        return tokens / (time.perf_counter() - t0), out

    for name in models:
        cfg = LLAMA_CONFIGS[name]
        model = llama.Model(llama.ModelArgs.from_dict(cfg))
        model.set_dtype(mx.float16)
        mx.eval(model.parameters())
        generate(model)  # warm: kernels compiled, caches sized
        fp16_tps, fp16_toks = max(generate(model) for _ in range(2))
        rec.add(section="llama", case="fp16", model=name, prompt=prompt, tokens=tokens, tokens_per_s=fp16_tps,
                **gpu_clocks())
        fnn.convert_to_fp8(model)
        mx.eval(model.parameters())
        mx.clear_cache()
        # FP8Linear's few-rows paths: matmul2d compiled (the default), the
        # direct kernel node (MLX_FLASH_FP8LINEAR_PATH=direct), matmul2d uncompiled.
        for case, path, compiled in (("fp8_e4m3", "matmul2d", "1"), ("fp8_e4m3_direct", "direct", "1"),
                                     ("fp8_e4m3_uncompiled", "matmul2d", "0"))[:3 if uncompiled else 2]:
            old = fnn._COMPILE, fnn._PATH
            fnn._COMPILE, fnn._PATH = compiled, path
            try:
                generate(model)
                tps, toks = max(generate(model) for _ in range(2))
            finally:
                fnn._COMPILE, fnn._PATH = old
            same = sum(a == b for a, b in zip(toks, fp16_toks))
            rec.add(section="llama", case=case, model=name,
                    prompt=prompt, tokens=tokens, tokens_per_s=tps, vs_fp16=tps / fp16_tps,
                    greedy_tokens_equal_to_fp16=same, **gpu_clocks())
        del model
        mx.clear_cache()


def _llama_pair(llama, args):
    """A random-weight mlx-lm Llama in fp16 and the same weights with every
    nn.Linear as FP8Linear (e4m3, per-channel scales), and the FP8Linear layers
    (whose `activations` the cases switch)."""
    from .. import nn as fnn

    model16 = llama.Model(args)
    model16.set_dtype(mx.float16)
    mx.eval(model16.parameters())
    model8 = llama.Model(args)
    model8.update(model16.parameters())
    fnn.convert_to_fp8(model8)
    mx.eval(model8.parameters())
    mx.clear_cache()
    return model16, model8, [m for _, m in model8.named_modules() if isinstance(m, fnn.FP8Linear)]


@contextlib.contextmanager
def _activations(layers, act):
    """The FP8Linear layers with activations=act inside the block, None after."""
    for layer in layers:
        layer.activations = act
    try:
        yield
    finally:
        for layer in layers:
            layer.activations = None


def bench_llama_prefill(rec: Recorder, models=("llama_8b",), prompts=(512, 1024, 2048), rounds: int = 5,
                        configs=None, variants=(), wa_variants=(), act_unshared=False, native_variants=()):
    """Prompt tokens/s of a random-weight mlx-lm Llama: the fp16 model beside
    the same weights with every nn.Linear as FP8Linear (e4m3, per-channel
    scales), with the weight-as-A kernel's stream-K off ("fp8_e4m3": every
    tile whole) and as the module's settings say ("fp8_e4m3_stream_k"; on by
    default since session 24); cuda_matmul.WA_SK is read at every call's
    routing (a prefill's FP8Linear calls go through the uncompiled matmul2d). Issue 15's prefill target
    (>= 1.0x MLX's fp16 product from 512 rows) in a model: the attention,
    norms and embedding are the same in every case, so the ratio is the
    linear layers' plus the rest's share. One prompt of `p` tokens a call,
    one forward over a fresh cache (mlx-lm's generate_step prefills in chunks
    of 2048, so these are whole chunks); cases timed in turn (interleave),
    median of `rounds`; the fp8 cases' last-token logits checked against
    each other (stream-K only reorders a tile's sums). `variants`: (name,
    splits, waves) each, one more case "fp8_e4m3_sk_<name>" with stream-K on,
    cuda_matmul.WA_SK_SPLITS = splits and WA_SK_WAVES = waves. `wa_variants`:
    (name, fit) each, a case "fp8_e4m3_wa_<name>" with cuda_matmul.WA_TILE_FIT
    so set (session 26).
    "fp8_e4m3_act_e4m3": the same layers with activations="e4m3" (the input
    quantized a token at a time, fp8 x fp8 on the native fp8 tensor cores;
    moves the logits, so its row's max_abs_logit_diff_vs_fp16 says by how much; the projections reading
    one input share its quantization, nn.SHARE_ACT_QUANT). With `act_unshared` one more case,
    "fp8_e4m3_act_e4m3_unshared": the same with a quantization at every layer (session 27).
    `native_variants`: (name, on, splits, partial) each, a case
    "fp8_e4m3_act_e4m3_nsk_<name>": the quantized activations with
    cuda_matmul.NATIVE_SK = on, NATIVE_SK_SPLITS = splits and
    NATIVE_SK_PARTIAL = partial (session 29)."""
    from .. import nn as fnn
    from ..backends import cuda_matmul as cm

    llama, cache_mod = _mlx_lm_llama()
    configs = LLAMA_CONFIGS if configs is None else configs
    for name in models:
        model16, model8, fp8_layers = _llama_pair(llama, llama.ModelArgs.from_dict(configs[name]))
        args = model16.args
        for p in prompts:
            toks = mx.random.randint(0, min(1000, args.vocab_size), (1, p), key=mx.random.key(p))
            mx.eval(toks)

            def forward(model, settings=None, act=None, share=True):
                # cuda_matmul's settings for this call's routing (its graph is built here), restored after;
                # share: nn.SHARE_ACT_QUANT for the quantized activations.
                settings = settings or {}
                old = {key: getattr(cm, key) for key in settings}
                old_share = fnn.SHARE_ACT_QUANT
                for key, value in settings.items():
                    setattr(cm, key, value)
                fnn.SHARE_ACT_QUANT = share
                try:
                    with _activations(fp8_layers, act):
                        cache = cache_mod.make_prompt_cache(model)
                        return model(toks, cache=cache)[:, -1].astype(mx.float32)
                finally:
                    for key, value in old.items():
                        setattr(cm, key, value)
                    fnn.SHARE_ACT_QUANT = old_share

            cases = {"fp16": lambda: forward(model16), "fp8_e4m3": lambda: forward(model8, {"WA_SK": False}),
                     "fp8_e4m3_stream_k": lambda: forward(model8, {"WA_SK": True}),
                     "fp8_e4m3_act_e4m3": lambda: forward(model8, act="e4m3")}
            if act_unshared:
                cases["fp8_e4m3_act_e4m3_unshared"] = lambda: forward(model8, act="e4m3", share=False)
            for vname, splits, waves in variants:
                cases[f"fp8_e4m3_sk_{vname}"] = functools.partial(
                    forward, model8, {"WA_SK": True, "WA_SK_SPLITS": splits, "WA_SK_WAVES": waves})
            for vname, fit in wa_variants:
                cases[f"fp8_e4m3_wa_{vname}"] = functools.partial(forward, model8, {"WA_TILE_FIT": fit})
            for vname, on, splits, partial in native_variants:
                cases[f"fp8_e4m3_act_e4m3_nsk_{vname}"] = functools.partial(
                    forward, model8, {"NATIVE_SK": on, "NATIVE_SK_SPLITS": splits, "NATIVE_SK_PARTIAL": partial},
                    act="e4m3")
            last = {}

            def sample(case, call):
                out = call()  # graph built before the clock starts, as time_lazy
                mx.synchronize()
                t0 = time.perf_counter()
                mx.eval(out)
                mx.synchronize()
                last[case] = out
                return time.perf_counter() - t0

            for case, call in cases.items():  # warm: kernels compiled, the allocator's cache sized
                sample(case, call)
            times = interleave(cases, rounds, sample)
            base = statistics.median(times["fp16"]) if isinstance(times["fp16"], list) else None
            for case, got in times.items():
                row = dict(section="llama_prefill", case=case, model=name, prompt=p, rounds=rounds)
                if isinstance(got, BaseException):
                    row["error"] = f"{type(got).__name__}: {got}"[:500]
                else:
                    sec = statistics.median(got)
                    row.update(seconds=sec, prompt_tokens_per_s=p / sec, seconds_all=got)
                    if base is not None:
                        row["vs_fp16"] = base / sec
                    if case != "fp16" and "fp8_e4m3" in last and case in last:
                        row["max_abs_logit_diff_vs_fp8_e4m3"] = mx.abs(last[case] - last["fp8_e4m3"]).max().item()
                    if case in last and "fp16" in last:
                        row["max_abs_logit_diff_vs_fp16"] = mx.abs(last[case] - last["fp16"]).max().item()
                rec.add(**row, **gpu_clocks())
            if CHECKPOINT is not None:
                CHECKPOINT()
        del model16, model8
        mx.clear_cache()


# Kernel classes of a model forward's profile, by the first class with a
# pattern the kernel's name holds (lower case). Session 25's s25a-s25e runs
# had gemm before attention, so their "gemm" holds cuDNN's attention
# (cudnn_generated_..._sdpa_sm90_...); docs/matmul.md's tables recount from
# the runs' kernel names.
PROFILE_CLASSES = (("ours_fp8_weight", ("matmul_wgmma_wa", "fp8w", "matmul_gemv")),
                   ("ours_quantize", ("quantize_rows",)),
                   ("ours_other", ("mlx_flash", "matmul_wgmma", "attention_")),
                   # before gemm: cuDNN's attention kernels' names hold "sm90_" too
                   ("attention", ("sdpa", "fmha", "flash", "cudnn")),
                   ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "cublas")),
                   ("copy_fill", ("memcpy", "memset", "copy")))


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pats in PROFILE_CLASSES:
        if any(p in low for p in pats):
            return cls
    return "other"


def forward_profile(call, torch, reps: int = 2) -> dict:
    """Where one evaluated call's GPU time goes (CUPTI through torch.profiler,
    which records MLX's kernels too): `reps` calls, each built, then
    evaluated and synchronized alone. Per call: the span from the first
    kernel's start to the last one's end, the union of busy intervals (the
    rest of the span the GPU waited: host time, launch gaps), the sum of
    durations (above the busy time where kernels overlapped), the sum by
    kernel class and the 25 costliest kernel names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            out = call()  # built before the GPU starts on it
            mx.synchronize()
            mx.eval(out)
            mx.synchronize()
    events = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return profile_summary(events, reps)


def profile_summary(events, reps: int) -> dict:
    """forward_profile's numbers from (start, end, name) events (us) of `reps`
    calls run apart in time: the calls are told apart by the reps - 1 widest
    gaps between busy stretches; the call of the shortest span is kept."""
    events = sorted(events)
    ends, gap_at = [], []
    for i, (s, e, _) in enumerate(events):
        ends.append(max(e, ends[-1]) if ends else e)
        if i:
            gap_at.append((s - ends[i - 1], i))
    cuts = [0] + sorted(i for _, i in sorted(gap_at)[len(gap_at) - (reps - 1):]) + [len(events)] if reps > 1 \
        else [0, len(events)]
    per = []
    for lo, hi in zip(cuts, cuts[1:]):
        evs = events[lo:hi]
        busy, cur_s, cur_e = 0.0, None, None
        for s, e, _ in evs:
            if cur_e is None or s > cur_e:
                busy += 0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += 0 if cur_e is None else cur_e - cur_s
        classes, names = {}, {}
        for s, e, n in evs:
            cls = kernel_class(n)
            classes[cls] = classes.get(cls, 0.0) + (e - s)
            c, t = names.get(n[:120], (0, 0.0))
            names[n[:120]] = (c + 1, t + (e - s))
        top = sorted(names.items(), key=lambda kv: -kv[1][1])[:25]
        per.append({"span_us": evs[-1][1] - evs[0][0] if evs else 0.0, "busy_us": busy,
                    "kernel_sum_us": sum(e - s for s, e, _ in evs), "kernels": len(evs), "by_class_us": classes,
                    "top": [{"name": n, "count": c, "us": t} for n, (c, t) in top]})
    return min(per, key=lambda r: r["span_us"])


def bench_llama_prefill_profile(rec: Recorder, models=("llama_8b",), prompts=(512, 2048), configs=None):
    """Where a prefill's GPU time goes: one forward of each model (fp16,
    FP8Linear as set, and FP8Linear with activations="e4m3") profiled kernel by kernel (forward_profile), so the
    FP8Linear / fp16 gap of llama_prefill can be put on kernel classes (our
    fp8-weight products against cuBLAS's, attention, the rest) and on the
    GPU's waits."""
    _, torch = _torch()
    if torch is None:
        raise RuntimeError("llama_prefill_profile needs torch (its profiler reads CUPTI)")
    llama, cache_mod = _mlx_lm_llama()
    configs = LLAMA_CONFIGS if configs is None else configs
    for name in models:
        model16, model8, fp8_layers = _llama_pair(llama, llama.ModelArgs.from_dict(configs[name]))
        for p in prompts:
            toks = mx.random.randint(0, min(1000, model16.args.vocab_size), (1, p), key=mx.random.key(p))
            mx.eval(toks)
            for case, model, act in (("fp16", model16, None), ("fp8_e4m3", model8, None),
                                     ("fp8_e4m3_act_e4m3", model8, "e4m3")):
                def call(model=model):
                    return model(toks, cache=cache_mod.make_prompt_cache(model))[:, -1].astype(mx.float32)
                with _activations(fp8_layers, act):
                    mx.eval(call())  # warm
                    rec.add(section="llama_prefill_profile", case=case, model=name, prompt=p,
                            **forward_profile(call, torch), **gpu_clocks())
            if CHECKPOINT is not None:
                CHECKPOINT()
        del model16, model8
        mx.clear_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="gemm,decode")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--out", default=".")
    parser.add_argument("--warm", action="store_true", help="compile every variant at tiny sizes; time nothing")
    parser.add_argument("--plot", metavar="JSON", help="plot a results JSON (PNG next to it) and exit")
    parser.add_argument("--skip-tma", action="store_true", help="leave out the TMA-loading kernel variants")
    parser.add_argument("--decode-shapes", default=None,
                        help="K:N pairs for the decode section, comma separated (default: DECODE_SHAPES)")
    parser.add_argument("--cases", default=None, help="regular expression: only the gemm cases it matches")
    parser.add_argument("--decode-rows", default=None, help="M values of the decode section, comma separated")
    parser.add_argument("--prefill-rows", default=None,
                        help="M values of the prefill section, comma separated (default: every one of PREFILL_SHAPES)")
    parser.add_argument("--gemv-plans", default=None,
                        help="few-rows kernel plans W,RT,U,MAXBLOCKS,STAGES[,BOUNDS,SECTOR] separated by ';' "
                             "('default': the backend's); decode times fp16 x e4m3 with each, "
                             "decode_stream FP8Linear's direct call")
    parser.add_argument("--stream-cycles", type=int, default=4,
                        help="decode_stream: passes over the weight set per timed eval (1 was session 12's: "
                             "8-32 calls an eval, whose fixed cost then counted as a few us a call)")
    parser.add_argument("--llama-models", default="llama_1b,llama_3b",
                        help="models of the llama and llama_prefill sections")
    parser.add_argument("--llama-prompts", default="512,1024,2048",
                        help="prompt lengths (tokens) of the llama_prefill section, comma separated")
    parser.add_argument("--llama-wa-variants", default="",
                        help="llama_prefill: NAME:FIT cases, comma separated (cuda_matmul.WA_TILE_FIT = FIT, "
                             "0 or 1)")
    parser.add_argument("--wa-tiles-rows", default="512,1024,2048",
                        help="wa_tiles and native_sk: M values (tokens), comma separated")
    parser.add_argument("--llama-act-unshared", action="store_true",
                        help="llama_prefill: one more case, the quantized activations without the shared "
                             "quantization of one input (nn.SHARE_ACT_QUANT = False)")
    parser.add_argument("--llama-sk-variants", default="",
                        help="llama_prefill: NAME:SPLITS:WAVES cases, comma separated (stream-K on with "
                             "cuda_matmul.WA_SK_SPLITS = SPLITS, WA_SK_WAVES = WAVES (0 or 1))")
    parser.add_argument("--llama-native-sk-variants", default="",
                        help="llama_prefill: NAME:ON:SPLITS:PARTIAL cases, comma separated (quantized activations "
                             "with cuda_matmul.NATIVE_SK = ON, NATIVE_SK_SPLITS = SPLITS, NATIVE_SK_PARTIAL = "
                             "PARTIAL; ON and PARTIAL 0 or 1)")
    args = parser.parse_args(argv)
    try:
        flag = {"0": False, "1": True}
        native_variants = tuple((n, flag[on], int(sp), flag[pa]) for n, on, sp, pa in
                                (v.split(":") for v in args.llama_native_sk_variants.split(",") if v))
        if any(sp < 2 for _, _, sp, _ in native_variants):
            raise ValueError("a split count below 2")
    except (ValueError, KeyError):
        parser.error(f"--llama-native-sk-variants: expected NAME:ON:SPLITS:PARTIAL (SPLITS 2 or more, ON and "
                     f"PARTIAL 0 or 1) separated by commas, got {args.llama_native_sk_variants!r}")
    try:
        sk_variants = tuple((n, int(sp), {"0": False, "1": True}[w]) for n, sp, w in
                            (v.split(":") for v in args.llama_sk_variants.split(",") if v))
        if any(sp < 2 for _, sp, _ in sk_variants):
            raise ValueError("a split count below 2")
    except (ValueError, KeyError):
        parser.error(f"--llama-sk-variants: expected NAME:SPLITS:WAVES (SPLITS 2 or more, WAVES 0 or 1) separated "
                     f"by commas, got {args.llama_sk_variants!r}")
    try:
        wa_variants = tuple((n, {"0": False, "1": True}[fit]) for n, fit in
                            (v.split(":") for v in args.llama_wa_variants.split(",") if v))
    except (ValueError, KeyError):
        parser.error(f"--llama-wa-variants: expected NAME:FIT (FIT 0 or 1) separated by commas, "
                     f"got {args.llama_wa_variants!r}")
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    if not dispatch.cuda_available():
        raise SystemExit("mlx_flash.bench.cuda_matmul: MLX sees no CUDA GPU")
    global SKIP_TMA, CASES
    SKIP_TMA = args.skip_tma
    if args.cases:
        import re

        CASES = re.compile(args.cases)
    decode_shapes = DECODE_SHAPES if not args.decode_shapes else tuple(
        tuple(int(v) for v in pair.split(":")) for pair in args.decode_shapes.split(","))
    plans = None if not args.gemv_plans else tuple(
        None if p == "default" else tuple(int(v) for v in p.split(",")) for p in args.gemv_plans.split(";"))
    rows = DECODE_ROWS if not args.decode_rows else tuple(int(v) for v in args.decode_rows.split(","))
    prefill_shapes = PREFILL_SHAPES
    if args.prefill_rows:
        wanted = {int(v) for v in args.prefill_rows.split(",")}
        prefill_shapes = tuple(s for s in PREFILL_SHAPES if s[0] in wanted)
        if not prefill_shapes:
            parser.error(f"--prefill-rows: none of {sorted(wanted)} is a row count of the prefill shapes "
                         f"{sorted({s[0] for s in PREFILL_SHAPES})}")
    card = card_name()
    rec = Recorder()
    try:
        from ..backends import cuda_matmul as cm

        rec.add(section="device", sm_count=cm.sm_count())
    except Exception as e:  # noqa: BLE001
        rec.add(section="device", error=f"{type(e).__name__}: {e}"[:500])
    if args.warm:
        global time_lazy, time_torch
        time_lazy = lambda make, reps, rounds=3: (mx.eval(make()), 1.0)[1]  # noqa: E731
        time_torch = lambda fn, reps, rounds=3: (fn(), 1.0)[1]  # noqa: E731
    sections = {"gemm": lambda: bench_gemm(rec, [256] if args.warm else args.sizes),
                "targets": lambda: bench_targets(rec, [256] if args.warm else args.sizes, 1 if args.warm else 5),
                "prefill": lambda: bench_prefill(rec, ((128, 256, 256), (512, 256, 256)) if args.warm else
                                                 prefill_shapes, 1 if args.warm else 5, PREFILL_PLANS,
                                                 PREFILL_WA_PLANS),
                "decode": lambda: bench_decode(rec, *(((256, 256),), 1 << 20) if args.warm else (decode_shapes,),
                                               plans=plans, rows=(1, 16) if args.warm else rows),
                "decode_stream": lambda: bench_decode_stream(rec, ((256, 256),) if args.warm else decode_shapes,
                                                             (1,) if args.warm else (1, 16),
                                                             1 << 20 if args.warm else GIB // 2,
                                                             1 << 20 if args.warm else 2 * GIB,
                                                             plans=plans, cycles=args.stream_cycles),
                "plans": lambda: bench_plans(rec, 256 if args.warm else 8192),
                "layers": lambda: bench_layers(rec, 1 if args.warm else 4, (1, 32) if args.warm else (1, 512)),
                "llama": lambda: bench_llama(rec, tuple(args.llama_models.split(","))),
                "llama_prefill": lambda: bench_llama_prefill(
                    rec, tuple(args.llama_models.split(",")), tuple(int(v) for v in args.llama_prompts.split(",")),
                    variants=sk_variants, wa_variants=wa_variants, act_unshared=args.llama_act_unshared,
                    native_variants=native_variants),
                "wa_tiles": lambda: bench_wa_tiles(rec, ((256, 1024, 1024),) if args.warm else tuple(
                    (m, k, n) for m in (int(v) for v in args.wa_tiles_rows.split(",")) for k, n in WA_TILE_SHAPES),
                    1 if args.warm else 2),
                "native_sk": lambda: bench_native_sk(rec, ((256, 1024, 1024),) if args.warm else tuple(
                    (m, k, n) for m in (int(v) for v in args.wa_tiles_rows.split(",")) for k, n in WA_TILE_SHAPES),
                    1 if args.warm else 2),
                "llama_prefill_profile": lambda: bench_llama_prefill_profile(
                    rec, tuple(args.llama_models.split(",")), tuple(int(v) for v in args.llama_prompts.split(","))),
                "fp8err": lambda: bench_fp8err(rec, (256,) if args.warm else (4096, 8192), 128 if args.warm else 4096),
                "fp8speed": lambda: bench_fp8speed(rec, ((256, 256, 256),) if args.warm else
                                                   ((4096, 4096, 8192), (8192, 8192, 8192))),
                "calls": lambda: bench_calls(rec, 1 if args.warm else 16, 2 if args.warm else 40)}
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, f"matmul_cuda_{slug(card)}.json")
    _, torch = _torch()

    def write():
        result = {"benchmark": "matmul2d on CUDA", "card": card, "mlx": mx.__version__,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rec.rows}
        if torch is not None:
            result["torch"] = torch.__version__
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")

    global CHECKPOINT
    CHECKPOINT = None if args.warm else write
    for name in args.sections.split(","):
        try:
            sections[name]()
        except Exception as e:  # noqa: BLE001 (record the failure, keep the other sections)
            rec.add(section=name, error=f"{type(e).__name__}: {e}"[:500])
        if not args.warm:
            write()  # after every section: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
