"""GPU check and A/B timing of the Hopper (wgmma) backward.

    python3 tools/cuda_bwd_ab.py check DTYPE D FEATURE[,FEATURE...]   (float16|bfloat16, 64|128)
    python3 tools/cuda_bwd_ab.py warm DTYPE D CAUSAL(0|1)
    python3 tools/cuda_bwd_ab.py time OUT.json [iters]
    python3 tools/cuda_bwd_ab.py bwdonly OUT.json [iters]
    ncu ... python3 tools/cuda_bwd_ab.py one DTYPE B,H,N,D CAUSAL(0|1) WHICH(fast|new|ws|...)

check: dq, dk, dv of flash_attention's vjp against the float64 NumPy
reference (tests/reference_np.py) with the suite's tolerance (twice the plain
materialised fp16/bf16 error), the named features of tests/features.py (all:
every one) at odd shapes, GQA and Nq != Nk (a process per feature or two:
NVRTC compiling each instance dominates). The block order is whatever
MLX_FLASH_BWD_HEADS_FIRST says. Prints one
line a case and a summary line "check ...: P passed, F failed".
warm: builds the kernels `time` runs for one dtype, head dim and causal
flag (every route) on a small call, so parallel processes fill
MLX_PTX_CACHE_DIR first.
time: forward + backward (mx.grad of a sum) per call, one call per eval, of
mlx_flash on each route (VARIANTS: the default, the early dV, and
under causal the head-adjacent block order), of
mx.fast.scaled_dot_product_attention (cuDNN) in the same process, and of
torch SDPA (CUDA events over queued calls) at the issue-14 shapes, causal
and not, fp16 and bf16; writes OUT.json as it goes (a job cut short keeps
what finished). BWD_AB_ROWS picks rows ("dtype:B,H,N,D;..."; default: fp16
then bf16 at SHAPES). With BWD_BEFORE_DIR set (a folder holding an older
attention_bwd_wgmma.cu and .cuh, e.g. main's), also "before": that kernel
(under its own MLX name) with delta formed by MLX ops, as the backend did
before attention_bwd_delta, in the same process.
bwdonly: the backward alone, as (forward + backward) - forward per call for
mlx_flash, mx.fast (cuDNN) and torch SDPA, each timed in the same process,
alternating the three per repetition (BWD_AB_REPS, default 3; the median is
kept) so that clock drift hits all three alike.
one: warms, then runs one forward + backward between cudaProfilerStart and
Stop (through torch), for `ncu --profile-from-start off` to measure every
kernel of exactly that call (ours: delta, backward, dQ conversion; fast:
cuDNN's); WHICH a route name of VARIANTS, or fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mlx.core as mx  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash.backends import cuda as cb  # noqa: E402

import gpu_timing  # noqa: E402  (tools/, beside this file)

SHAPES = [(1, 16, 8192, 128), (2, 16, 4096, 128), (4, 16, 1024, 64)]
# route name: (cb._BWD_HEADS_FIRST, cb._BWD_WS, cb._BWD_WS_DQ, cb._BWD_DV_EARLY, cb._BWD_DQ_V4);
# "new": attention_bwd_wgmma (its default settings); "order0" (head-adjacent
# blocks) is timed only where the default order differs (causal); "ws": the
# warp-specialised backward (MLX_FLASH_BWD_WS=1) with dQ by atomics, "wsdq":
# with its dQ writer warp; "ws128": MLX_FLASH_BWD_WS=-1 (ws with the dQ
# writer at D 128 from 4096 keys, else attention_bwd_wgmma); "dvearly":
# attention_bwd_wgmma with MLX_FLASH_BWD_DV_EARLY=1; "dqv4": with its float4
# dQ atomics (MLX_FLASH_BWD_DQ_V4=1). (The bulk-reduction dQ, "bulk1", lost
# and was removed in session 11.)
VARIANTS = {"new": (-1, 0, 0, 0, 0), "order0": (0, 0, 0, 0, 0), "ws": (-1, 1, 0, 0, 0),
            "wsdq": (-1, 1, 1, 0, 0), "ws128": (-1, -1, 1, 0, 0), "dvearly": (-1, 0, 0, 1, 0),
            "dqv4": (-1, 0, 0, 0, 1)}


def _variants(causal):
    return [n for n in VARIANTS if (causal or n != "order0") and not n.startswith("ws")]


def set_route(name):
    cb._BWD_HEADS_FIRST, cb._BWD_WS, cb._BWD_WS_DQ, cb._BWD_DV_EARLY, cb._BWD_DQ_V4 = VARIANTS[name]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}


def check(dtype, D, features):
    from features import FEATURES
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from reference_np import attention_np

    # (B, Hq, Hkv, Nq, Nk): tiny, GQA with Nq << Nk, Nq >> Nk (MQA), a partial last tile.
    shapes = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 2, 2, 129, 300)]
    names = list(FEATURES) if features == "all" else features.split(",")
    cases = [(si, name) for name in names for si in range(len(shapes))]
    passed = failed = 0
    label = (f"D{D} {dtype} heads_first={cb._BWD_HEADS_FIRST} ws={cb._BWD_WS} "
             f"ws_dq={cb._BWD_WS_DQ} dv_early={cb._BWD_DV_EARLY} dq_v4={cb._BWD_DQ_V4}")
    # Count the warp-specialised launches: a check of that route must reach it.
    ws_calls = [0]
    ws_launch = cb._backward_ws

    def counted(*a, **kw):
        ws_calls[0] += 1
        return ws_launch(*a, **kw)

    cb._backward_ws = counted
    for si, name in cases:
        B, Hq, Hkv, Nq, Nk = shapes[si]
        gen = rng("wgmma-bwd", D, str(dtype), si, name)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        try:
            options = FEATURES[name](gen, B, Hq, Nq, Nk)
            dout = randn(gen, (B, Hq, Nq, D), dtype)
            _, grads = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)], [q, k, v], [dout])
            mx.eval(grads)
            want = attention_np(q, k, v, dout=dout, **options)
            plain = plain_errors(q, k, v, dout, options, dtype)
            errs = [check_close(n, to_np(g), want, dtype, plain) for n, g in zip(("dq", "dk", "dv"), grads)]
            passed += 1
            print(f"ok   {label} {shapes[si]} {name}: " +
                  " ".join(f"{n} {e:.2e} (plain {plain[n]:.2e})" for n, e in zip(("dq", "dk", "dv"), errs)), flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {label} {shapes[si]} {name}: {e}", flush=True)
            if failed < 3:
                traceback.print_exc()
    print(f"check {label} {features}: {passed} passed, {failed} failed, {ws_calls[0]} ws launches", flush=True)
    return failed


def _grad(causal, s, fast):
    if fast:
        f = lambda a, b, c: mx.fast.scaled_dot_product_attention(  # noqa: E731
            a, b, c, scale=s, mask="causal" if causal else None)
    else:
        f = lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal, scale=s)  # noqa: E731
    return mx.grad(lambda a, b, c: mx.sum(f(a, b, c).astype(mx.float32)), argnums=(0, 1, 2))


def warm(dtype, D, causal):
    # One head at the timed lengths: the forward's route depends on the key count.
    N = max(s[2] for _, s in _rows() if s[3] == D)
    q, k, v = (mx.random.normal((1, 1, N, D)).astype(dtype) for _ in range(3))
    # BWD_AB_WARM_ROUTES: a comma list of the routes to build (default: all).
    only = os.environ.get("BWD_AB_WARM_ROUTES")
    for name in only.split(",") if only else _variants(causal):
        set_route(name)
        mx.eval(_grad(causal, D ** -0.5, False)(q, k, v))
    set_route("new")
    if os.environ.get("BWD_BEFORE_DIR"):
        saved = cb._wgmma_bwd_config, cb._bwd_delta
        cb._wgmma_bwd_config, cb._bwd_delta = before_route(os.environ["BWD_BEFORE_DIR"])
        try:
            mx.eval(_grad(causal, D ** -0.5, False)(q, k, v))
        finally:
            cb._wgmma_bwd_config, cb._bwd_delta = saved
    print(f"warm {dtype} D{D} causal={causal} done", flush=True)


def _mlx_delta(dout, out, dlse, spec, stream):
    """delta as the backend formed it before attention_bwd_delta (four MLX ops)."""
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1, stream=stream)
    return delta if dlse is None else delta - dlse


def before_route(before_dir):
    """(config, delta) replacing cb._wgmma_bwd_config and cb._bwd_delta with
    the older kernel of before_dir (dQ by atomics) and the MLX-op delta."""
    read = lambda name: open(os.path.join(before_dir, name)).read()  # noqa: E731

    @functools.lru_cache(maxsize=None)
    def config(spec):
        names = cb.kernel_headers("attention_bwd_wgmma")
        text = "\n".join(read(n) if n == "attention_bwd_wgmma.cuh" else cb._read(n) for n in names)
        header = cb._minify(re.sub(r'^\s*(#pragma once|#include\s+"[^"]+")\s*$', "", text, flags=re.M))
        kernel = mx.fast.cuda_kernel(
            name="mlx_flash_attention_bwd_wgmma_before", input_names=list(cb._BWD_MMA_INPUTS),
            output_names=["dq_acc", "dk", "dv"], source=read("attention_bwd_wgmma.cu"), header=header,
            ensure_row_contiguous=True, shared_memory=cb._wgmma_bwd_smem(spec.head_dim_qk))
        return math.ceil(cb._max_k(spec) / 128), kernel

    return config, _mlx_delta


def time_fn(fn, iters):
    """Milliseconds per call, one call per eval after warm-ups."""
    return gpu_timing.mlx_seconds(fn, iters) * 1e3


def torch_fwdbwd_ms(shape, dtype, causal, iters):
    """torch SDPA forward + backward on its own random inputs (CUDA events), or None without torch."""
    t = gpu_timing.torch_sdpa_seconds(shape, dtype, causal, iters, backward=True)
    return None if t is None else t * 1e3


def _rows():
    spec = os.environ.get("BWD_AB_ROWS")
    if not spec:
        return [(dtype, shape) for dtype in (mx.float16, mx.bfloat16) for shape in SHAPES]
    return [(DTYPES[r.split(":")[0]], tuple(int(x) for x in r.split(":")[1].split(","))) for r in spec.split(";")]


def time_all(out, iters):
    device = mx.device_info(mx.gpu).get("device_name", "")
    result = {"device": device, "what": "forward + backward ms per call (mx.grad of a sum; one call per eval)",
              "routes": {"new": "default: dQ by float2 atomics, heads-first block order under causal from 4096 keys",
                         "order0": "dQ by atomics, a head's key blocks adjacent (MLX_FLASH_BWD_HEADS_FIRST=0)",
                         "before": "the backward before these changes (BWD_BEFORE_DIR's kernel, delta by MLX ops)"},
              "rows": []}
    for dtype, shape in _rows():
        B, H, N, D = shape
        q, k, v = (mx.random.normal(shape).astype(dtype) for _ in range(3))
        mx.eval(q, k, v)
        s = D ** -0.5
        for causal in (False, True):
            res = {}
            for name in _variants(causal):
                set_route(name)
                g = _grad(causal, s, False)
                res[name] = time_fn(lambda: g(q, k, v), iters)
            set_route("new")
            if os.environ.get("BWD_BEFORE_DIR"):
                saved = cb._wgmma_bwd_config, cb._bwd_delta
                cb._wgmma_bwd_config, cb._bwd_delta = before_route(os.environ["BWD_BEFORE_DIR"])
                try:
                    g = _grad(causal, s, False)
                    res["before"] = time_fn(lambda: g(q, k, v), iters)
                finally:
                    cb._wgmma_bwd_config, cb._bwd_delta = saved
            g = _grad(causal, s, True)
            res["mx.fast"] = time_fn(lambda: g(q, k, v), iters)
            t = torch_fwdbwd_ms(shape, dtype, causal, iters)
            if t is not None:
                res["torch"] = t
            row = dict(dtype=str(dtype).split(".")[-1], shape=list(shape), causal=causal,
                       **{f"{k}_ms": round(v, 4) for k, v in res.items()},
                       **{f"{n}_vs_mx.fast": round(res["mx.fast"] / res[n], 3) for n in _variants(causal)},
                       **({f"{n}_vs_torch": round(res["torch"] / res[n], 3) for n in _variants(causal)}
                          if "torch" in res else {}))
            result["rows"].append(row)
            print(f"time {row['dtype']} {shape} causal={causal}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
                  + " | vs mx.fast " + " ".join(f"{n} {row[n + '_vs_mx.fast']:.2f}x" for n in _variants(causal))
                  + (f" | new vs torch {row['new_vs_torch']:.2f}x" if "torch" in res else ""), flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)


def _fwd(causal, s, fast):
    if fast:
        return lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=s,
                                                                    mask="causal" if causal else None)
    return lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal, scale=s)


def torch_fwd_ms(shape, dtype, causal, iters):
    """torch SDPA forward alone (no grad), CUDA events, or None without torch."""
    t = gpu_timing.torch_sdpa_seconds(shape, dtype, causal, iters)
    return None if t is None else t * 1e3


def bwd_only(out, iters):
    device = mx.device_info(mx.gpu).get("device_name", "")
    reps = int(os.environ.get("BWD_AB_REPS", "3"))
    # Our routes to time (VARIANTS names; default: the default route only).
    routes = os.environ.get("BWD_AB_ROUTES", "new").split(",")
    result = {"device": device,
              "what": "backward alone = (forward + backward) - forward, ms per call (one call per eval; torch "
                      "by CUDA events), median of BWD_AB_REPS alternating repetitions; new = our default route, "
                      "ws = MLX_FLASH_BWD_WS=1",
              "rows": []}
    for dtype, shape in _rows():
        B, H, N, D = shape
        q, k, v = (mx.random.normal(shape).astype(dtype) for _ in range(3))
        mx.eval(q, k, v)
        s = D ** -0.5
        for causal in (False, True):
            fns = {}
            for name in routes:
                f, g = _fwd(causal, s, False), _grad(causal, s, False)
                fns[name] = (lambda f=f: f(q, k, v), lambda g=g: g(q, k, v), name)
            f, g = _fwd(causal, s, True), _grad(causal, s, True)
            fns["mx.fast"] = (lambda f=f: f(q, k, v), lambda g=g: g(q, k, v), "new")
            samples = {f"{n}_{w}": [] for n in list(fns) + ["torch"] for w in ("fwd", "fwdbwd")}
            for _ in range(reps):
                for name, (f, g, route) in fns.items():
                    set_route(route)
                    samples[f"{name}_fwd"].append(time_fn(f, iters))
                    samples[f"{name}_fwdbwd"].append(time_fn(g, iters))
                set_route("new")
                tf, tb = torch_fwd_ms(shape, dtype, causal, iters), torch_fwdbwd_ms(shape, dtype, causal, iters)
                if tf is not None:
                    samples["torch_fwd"].append(tf)
                    samples["torch_fwdbwd"].append(tb)
            med = {k: sorted(v)[len(v) // 2] for k, v in samples.items() if v}
            row = dict(dtype=str(dtype).split(".")[-1], shape=list(shape), causal=causal,
                       **{f"{k}_ms": round(v, 4) for k, v in med.items()})
            names = [n for n in list(fns) + ["torch"] if f"{n}_fwd" in med]
            for n in names:
                row[f"{n}_bwd_ms"] = round(med[f"{n}_fwdbwd"] - med[f"{n}_fwd"], 4)
            refs = [n for n in ("mx.fast", "torch") if n in names]
            for r in routes:
                for n in refs:
                    row[f"{r}_bwd_vs_{n}"] = round(row[f"{n}_bwd_ms"] / row[f"{r}_bwd_ms"], 3)
                    row[f"{r}_fwdbwd_vs_{n}"] = round(med[f"{n}_fwdbwd"] / med[f"{r}_fwdbwd"], 3)
            result["rows"].append(row)
            print(f"bwdonly {row['dtype']} {shape} causal={causal}: "
                  + " ".join(f"{n} fwd {med[n + '_fwd']:.3f} bwd {row[n + '_bwd_ms']:.3f}" for n in names)
                  + " | bwd vs " + " ".join(f"{r}/{n} {row[f'{r}_bwd_vs_{n}']:.2f}x" for r in routes for n in refs)
                  + " | fwdbwd vs " + " ".join(f"{r}/{n} {row[f'{r}_fwdbwd_vs_{n}']:.2f}x" for r in routes
                                               for n in refs), flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)


def one(dtype, shape, causal, which):
    import torch

    q, k, v = (mx.random.normal(shape).astype(dtype) for _ in range(3))
    if which in VARIANTS:
        set_route(which)
    g = _grad(causal, shape[3] ** -0.5, which == "fast")
    for _ in range(3):
        mx.eval(g(q, k, v))
    mx.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    mx.eval(g(q, k, v))
    mx.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"one {dtype} {shape} causal={causal} {which} done", flush=True)


def main():
    mode = sys.argv[1]
    print("device:", mx.device_info(mx.gpu).get("device_name", ""), "hopper:", cb._is_hopper(), flush=True)
    if mode == "check":
        sys.exit(1 if check(DTYPES[sys.argv[2]], int(sys.argv[3]), sys.argv[4]) else 0)
    elif mode == "warm":
        warm(DTYPES[sys.argv[2]], int(sys.argv[3]), bool(int(sys.argv[4])))
    elif mode == "bwdonly":
        bwd_only(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20)
    elif mode == "one":
        one(DTYPES[sys.argv[2]], tuple(int(x) for x in sys.argv[3].split(",")), bool(int(sys.argv[4])), sys.argv[5])
    elif mode == "time":
        time_all(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
