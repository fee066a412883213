"""CUDA benchmark: mlx_flash vs mx.fast SDPA (cuDNN) vs PyTorch SDPA, one run, one card.

    python -m mlx_flash.bench.cuda [--sections fwd,fwdbwd,features,decode,decode_gqa8,key_ranges,matmul,wide_decode,wide_prefill,wide_heads] [--out PATH]

Writes cuda_<card>.json (into --out when it is a directory, the current one by
default; to --out when it names a .json file) and prints one line per
measurement. TFLOP/s count attention as
4*B*H*Nq*Nk*D (half of it under causal), forward+backward as 3.5x that,
matrix products as 2*M*N*K.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time

import mlx.core as mx

import mlx_flash
from mlx_flash import dispatch, reference

ANCHOR_SHAPES = [(4, 16, 1024, 64), (2, 16, 4096, 128), (1, 16, 8192, 128), (1, 16, 16384, 128)]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}
MIB = 1024 * 1024


def card_name() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 (no nvidia-smi: name the device generically)
        name = "cuda"
    return name


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def time_mlx(fn, warmup=2, iters=10):
    """(seconds per call, peak MiB) of an MLX callable returning arrays."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) / iters, mx.get_peak_memory() / MIB


def time_torch(fn, warmup=2, iters=10):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, torch.cuda.max_memory_allocated() / MIB


def time_interleaved(contenders: dict, rounds=9, per_round=5):
    """{name: (median seconds per call, peak MiB)} of contenders timed round by
    round in turn, so that the card's clock and cache drifts over a run fall on
    all of them alike (session 16 saw one plan read 63 and 94 us a call at the
    two ends of a run timed plan after plan). A contender is ("mlx", fn) with
    fn returning arrays, or ("torch", fn); each round times per_round calls."""
    import statistics

    def sync(kind):
        if kind == "torch":
            import torch

            torch.cuda.synchronize()
        else:
            mx.synchronize()

    def run(kind, fn, n):
        for _ in range(n):
            out = fn()
            if kind == "mlx":
                mx.eval(out)
        sync(kind)

    peaks = {}
    for name, (kind, fn) in contenders.items():  # warm-up (compiles), then the peak of one call
        run(kind, fn, 2)
        if kind == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
            run(kind, fn, 1)
            peaks[name] = torch.cuda.max_memory_allocated() / MIB
        else:
            mx.reset_peak_memory()
            run(kind, fn, 1)
            peaks[name] = mx.get_peak_memory() / MIB
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (kind, fn) in contenders.items():
            t0 = time.perf_counter()
            run(kind, fn, per_round)
            times[name].append((time.perf_counter() - t0) / per_round)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def attn_flops(B, H, Nq, Nk, D, causal):
    return 4 * B * H * Nq * Nk * D * (0.5 if causal else 1.0)


class Recorder:
    def __init__(self):
        self.rows = []

    def add(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    q = mx.random.normal((B, Hq, Nq, D), key=k1).astype(dtype)
    k = mx.random.normal((B, Hkv, Nk, D), key=k2).astype(dtype)
    v = mx.random.normal((B, Hkv, Nk, D), key=k3).astype(dtype)
    mx.eval(q, k, v)
    return q, k, v


def _torch_sdpa(q, k, v, causal, backward):
    """A timing closure for torch SDPA on copies of q, k, v (None without torch)."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    tdt = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}[q.dtype]
    to_t = lambda x: torch.from_numpy(np.array(x.astype(mx.float32))).to("cuda", tdt).requires_grad_(backward)
    tq, tk, tv = to_t(q), to_t(k), to_t(v)
    enable_gqa = tq.shape[1] != tk.shape[1]

    def run():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=enable_gqa)
        if backward:
            o.backward(torch.ones_like(o))
        return o

    return run


def bench_attention(rec: Recorder, backward: bool):
    for dname, dtype in DTYPES.items():
        for B, H, N, D in ANCHOR_SHAPES:
            for causal in (False, True):
                q, k, v = _qkv(B, H, H, N, N, D, dtype)
                flops = attn_flops(B, H, N, N, D, causal) * (3.5 if backward else 1.0)
                mask = "causal" if causal else None

                def ours():
                    return mlx_flash.flash_attention(q, k, v, causal=causal)

                def fast():
                    return mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)

                if backward:
                    ours = mx.grad(lambda a, b, c: mx.sum(mlx_flash.flash_attention(a, b, c, causal=causal).astype(mx.float32)), argnums=(0, 1, 2))
                    fast = mx.grad(lambda a, b, c: mx.sum(mx.fast.scaled_dot_product_attention(a, b, c, scale=D ** -0.5, mask=mask).astype(mx.float32)), argnums=(0, 1, 2))
                    run_ours, run_fast = (lambda: ours(q, k, v)), (lambda: fast(q, k, v))
                else:
                    run_ours, run_fast = ours, fast
                contenders = {"ours": ("mlx", run_ours), "mx_fast": ("mlx", run_fast)}
                run_torch = _torch_sdpa(q, k, v, causal, backward)
                if run_torch is not None:
                    contenders["torch"] = ("torch", run_torch)
                timed = time_interleaved(contenders)
                (t_ours, m_ours), (t_fast, m_fast) = timed["ours"], timed["mx_fast"]
                row = dict(section="fwdbwd" if backward else "fwd", dtype=dname, shape=[B, H, N, D], causal=causal,
                           timing="interleaved, median of 9 rounds of 5 calls",
                           ours_ms=t_ours * 1e3, ours_tflops=flops / t_ours / 1e12, ours_peak_mib=m_ours,
                           mx_fast_ms=t_fast * 1e3, mx_fast_tflops=flops / t_fast / 1e12, mx_fast_peak_mib=m_fast,
                           ratio_vs_mx_fast=t_fast / t_ours)
                if "torch" in timed:
                    t_torch, m_torch = timed["torch"]
                    row.update(torch_ms=t_torch * 1e3, torch_tflops=flops / t_torch / 1e12,
                               torch_peak_mib=m_torch, ratio_vs_torch=t_torch / t_ours)
                rec.add(**row)
                del q, k, v


def _feature_options(name, B, H, N):
    if name == "softcap":
        return {"softcap": 30.0}
    if name == "alibi":
        return {"alibi_slopes": mx.array([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], mx.float32)}
    if name == "window":
        return {"window": (1024, 0)}
    if name == "block_sparse":
        nb = -(-N // 128)
        keep = mx.random.uniform(shape=(1, 1, nb, nb), key=mx.random.key(3)) < 0.3
        keep = keep | mx.eye(nb, dtype=mx.bool_)[None, None]  # every row keeps its diagonal block
        return {"block_mask": keep, "block_size": (128, 128)}
    raise ValueError(name)


def bench_features(rec: Recorder, N=8192, B=1, H=16, D=128):
    dtype = mx.float16
    q, k, v = _qkv(B, H, H, N, N, D, dtype)
    for name in ("softcap", "alibi", "window", "block_sparse"):
        opts = _feature_options(name, B, H, N)
        ours = lambda: mlx_flash.flash_attention(q, k, v, **opts)
        ref = lambda: reference.flash_attention(q, k, v, **opts)
        t_ours, m_ours = time_mlx(ours, warmup=1, iters=5)
        t_ref, m_ref = time_mlx(ref, warmup=1, iters=3)
        err = float(mx.max(mx.abs(ours().astype(mx.float32) - ref().astype(mx.float32))).item())
        rec.add(section="features", feature=name, dtype="float16", shape=[B, H, N, D], ours_ms=t_ours * 1e3,
                ours_peak_mib=m_ours, reference_ms=t_ref * 1e3, reference_peak_mib=m_ref,
                speedup_vs_reference=t_ref / t_ours, max_abs_diff=err)


def chained_step(call, q, layers):
    """A model's decode step: `call(i, x)` is layer i's attention over query x,
    and each layer's query is the previous layer's output (same shape and
    dtype), so the calls run one after another as in a model. Independent
    calls of one eval may run concurrently in MLX's CUDA graph, which a
    model's layers cannot. Returns the last layer's output."""
    x = q
    for i in range(layers):
        x = call(i, x)
    return x


def bench_decode(rec: Recorder, B=1, Hq=32, Hkv=4, Nk=32768, D=128, layers=32):
    """One decode step: latency of a single call per eval, the per-call time
    of `layers` independent calls on distinct K/V caches in one eval, and of
    `layers` chained calls (each query the previous output: a model's decode
    step, one kernel at a time)."""
    for dname, dtype in DTYPES.items():
        q, k, v = _qkv(B, Hq, Hkv, 1, Nk, D, dtype)
        caches = [_qkv(B, Hq, Hkv, 1, Nk, D, dtype, seed=i + 1)[1:] for i in range(layers)]
        ours = lambda: mlx_flash.flash_attention(q, k, v)
        fast = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
        ours_step = lambda: [mlx_flash.flash_attention(q, kc, vc) for kc, vc in caches]
        fast_step = lambda: [mx.fast.scaled_dot_product_attention(q, kc, vc, scale=D ** -0.5) for kc, vc in caches]
        t_ours, m_ours = time_mlx(ours, iters=50)
        t_fast, m_fast = time_mlx(fast, iters=50)
        s_ours, _ = time_mlx(ours_step, iters=10)
        s_fast, _ = time_mlx(fast_step, iters=10)
        c_ours, _ = time_mlx(lambda: chained_step(lambda i, x: mlx_flash.flash_attention(x, *caches[i]), q, layers),
                             iters=10)
        c_fast, _ = time_mlx(lambda: chained_step(lambda i, x: mx.fast.scaled_dot_product_attention(
            x, *caches[i], scale=D ** -0.5), q, layers), iters=10)
        kv_bytes = 2 * B * Hkv * Nk * D * 2
        rec.add(section="decode", dtype=dname, shape=[B, Hq, Hkv, 1, Nk, D], ours_us=t_ours * 1e6,
                ours_gbps=kv_bytes / t_ours / 1e9, mx_fast_us=t_fast * 1e6, ratio_vs_mx_fast=t_fast / t_ours,
                ours_peak_mib=m_ours, mx_fast_peak_mib=m_fast,
                step_layers=layers, ours_step_us_per_call=s_ours / layers * 1e6,
                mx_fast_step_us_per_call=s_fast / layers * 1e6, step_ratio_vs_mx_fast=s_fast / s_ours,
                ours_step_gbps=kv_bytes * layers / s_ours / 1e9,
                ours_chained_us_per_call=c_ours / layers * 1e6, mx_fast_chained_us_per_call=c_fast / layers * 1e6,
                chained_ratio_vs_mx_fast=c_fast / c_ours)
        del caches


KEY_RANGE_CASES = ((1, False, False), (2048, False, False), (2048, True, False), (2048, False, True),
                   (2048, True, True))  # (Nq, causal, forward+backward)


def bench_key_ranges(rec: Recorder, B=4, H=16, Nk=8192, D=128, cases=KEY_RANGE_CASES, iters=10):
    """Per-batch key ranges, half of every row's keys outside its range (left
    padding: the first Nk/2 keys, +-1000 between rows): the native ranges vs
    the same ranges as the [B, 1, 1, Nk] bool mask a backend without them
    folds them into (what mlx_flash did before) vs mx.fast SDPA with that mask,
    and the same call over every key without ranges. Nq = 1 (decode) and
    2048 (the Hopper forward; forward+backward too)."""
    from mlx_flash.reference import key_range_keep

    dtype = mx.float16
    half = Nk // 2
    start = mx.array([half, half - 1000, half + 1000, half][:B] + [half] * max(0, B - 4), mx.int32)
    length = Nk - start
    keep = key_range_keep(start, length, Nk)
    mx.eval(start, length, keep)
    kept_fraction = float(mx.mean(keep.astype(mx.float32)).item())
    for Nq, causal, backward in cases:
        q, k, v = _qkv(B, H, H, Nq, Nk, D, dtype)
        calls = {
            "native": lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal, key_start=start,
                                                                key_len=length),
            "folded_mask": lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal, mask=keep),
            "no_range": lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal),
            # mx.fast aligns causal top-left for Nq != Nk; only the non-causal rows compare with it.
            "mx_fast_mask": None if causal else (
                lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=D ** -0.5, mask=keep)),
        }
        row = dict(section="key_ranges", dtype="float16", shape=[B, H, Nq, Nk, D], causal=causal,
                   backward=backward, kept_fraction=kept_fraction)
        for name, fn in calls.items():
            if fn is None:
                continue
            if backward:
                grad = mx.grad(lambda a, b, c, fn=fn: mx.sum(fn(a, b, c).astype(mx.float32)), argnums=(0, 1, 2))
                run = lambda grad=grad: grad(q, k, v)
            else:
                run = lambda fn=fn: fn(q, k, v)
            try:
                t, m = time_mlx(run, warmup=2, iters=iters)
                row.update({f"{name}_ms": t * 1e3, f"{name}_peak_mib": m})
            except Exception as e:  # noqa: BLE001 (record, keep the other calls)
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
        if "native_ms" in row and "folded_mask_ms" in row:
            row["speedup_vs_folded_mask"] = row["folded_mask_ms"] / row["native_ms"]
            a = calls["native"](q, k, v).astype(mx.float32)
            b = calls["folded_mask"](q, k, v).astype(mx.float32)
            row["max_abs_diff_vs_folded_mask"] = float(mx.max(mx.abs(a - b)).item())
        if "native_ms" in row and "mx_fast_mask_ms" in row:
            row["ratio_vs_mx_fast_mask"] = row["mx_fast_mask_ms"] / row["native_ms"]
        rec.add(**row)
        del q, k, v


def bench_matmul(rec: Recorder):
    from mlx_flash.backends import cuda_matmul

    for n in (4096, 8192):
        flops = 2 * n ** 3
        a16 = mx.random.normal((n, n), key=mx.random.key(1)).astype(mx.float16)
        b16 = mx.random.normal((n, n), key=mx.random.key(2)).astype(mx.float16)
        a8, b8 = mx.to_fp8(a16), mx.to_fp8(b16)
        b8t = mx.contiguous(b8.T)
        mx.eval(a16, b16, a8, b8, b8t)
        cases = {
            "mlx_fp16": lambda: a16 @ b16,
            "ours_fp16": lambda: cuda_matmul.matmul(a16, b16),
            "ours_fp8_e4m3": lambda: cuda_matmul.matmul(a8, b8, a_fmt="e4m3", b_fmt="e4m3", out_dtype=mx.float16),
            "ours_fp8_e4m3_bT": lambda: cuda_matmul.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                           out_dtype=mx.float16),
            "ours_fp16_x_fp8": lambda: cuda_matmul.matmul(a16, b8, b_fmt="e4m3"),
        }
        for name, fn in cases.items():
            t, m = time_mlx(fn, iters=10)
            rec.add(section="matmul", case=name, n=n, ms=t * 1e3, tflops=flops / t / 1e12, peak_mib=m)
        try:
            import numpy as np
            import torch

            ta = torch.from_numpy(np.array(a16.astype(mx.float32))).cuda().to(torch.float8_e4m3fn)
            tb = torch.from_numpy(np.array(b16.astype(mx.float32))).cuda().to(torch.float8_e4m3fn).t().contiguous().t()
            one = torch.ones((), device="cuda")
            t, m = time_torch(lambda: torch._scaled_mm(ta, tb, scale_a=one, scale_b=one, out_dtype=torch.float16))
            rec.add(section="matmul", case="torch_scaled_mm_e4m3", n=n, ms=t * 1e3, tflops=flops / t / 1e12, peak_mib=m)
            th = torch.from_numpy(np.array(a16.astype(mx.float32))).cuda().half()
            t, m = time_torch(lambda: th @ th)
            rec.add(section="matmul", case="torch_fp16", n=n, ms=t * 1e3, tflops=flops / t / 1e12, peak_mib=m)
        except Exception as e:  # noqa: BLE001
            print(f"torch matmul skipped: {e}")


def _mla_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype):
    q, k, _ = _qkv(B, Hq, Hkv, Nq, Nk, D, dtype)
    v = mx.random.normal((B, Hkv, Nk, Dv), key=mx.random.key(7)).astype(dtype)
    mx.eval(v)
    return q, k, v


def bench_wide_decode(rec: Recorder, dtype=mx.float16):
    """MLA's absorbed decode (Dqk 576, Dv 512, one latent KV head): one call per
    eval, 1 and 4 queries, 16 and 128 query heads, 4K and 32K keys."""
    D, Dv = 576, 512
    for Hq in (16, 128):
        for Nk in (4096, 32768):
            for Nq in (1, 4):
                q, k, v = _mla_qkv(1, Hq, 1, Nq, Nk, D, Dv, dtype)
                t_ours, m_ours = time_mlx(lambda: mlx_flash.flash_attention(q, k, v), iters=30)
                t_fast, m_fast = time_mlx(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5),
                                          iters=30)
                kv_bytes = Nk * (D + Dv) * 2
                rec.add(section="wide_decode", dtype=str(dtype).split(".")[-1], shape=[1, Hq, 1, Nq, Nk, D, Dv],
                        ours_us=t_ours * 1e6, mx_fast_us=t_fast * 1e6, ratio_vs_mx_fast=t_fast / t_ours,
                        ours_kv_gbps=kv_bytes / t_ours / 1e9, ours_peak_mib=m_ours, mx_fast_peak_mib=m_fast)
                del q, k, v


def bench_wide_prefill(rec: Recorder, dtype=mx.float16, B=1, H=16, N=4096):
    """Prefill at wide head dims (DeepSeek's 192/128 and 512/512), forward and
    forward+backward, causal or not. FLOPs: 2*N^2*(D + Dv) per head forward,
    2*N^2*(4*D + 3*Dv) forward+backward (halved under causal)."""
    for D, Dv in ((192, 128), (512, 512)):
        q, k, v = _mla_qkv(B, H, H, N, N, D, Dv, dtype)
        for backward in (False, True):
            for causal in (False, True):
                mask = "causal" if causal else None
                flops = 2 * B * H * N * N * ((4 * D + 3 * Dv) if backward else (D + Dv)) * (0.5 if causal else 1.0)
                ours = lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal)
                fast = lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=D ** -0.5, mask=mask)
                if backward:
                    ours = mx.grad(lambda a, b, c, f=ours: mx.sum(f(a, b, c).astype(mx.float32)), argnums=(0, 1, 2))
                    fast = mx.grad(lambda a, b, c, f=fast: mx.sum(f(a, b, c).astype(mx.float32)), argnums=(0, 1, 2))
                t_ours, m_ours = time_mlx(lambda: ours(q, k, v), iters=5)
                t_fast, m_fast = time_mlx(lambda: fast(q, k, v), iters=5)
                rec.add(section="wide_fwdbwd" if backward else "wide_fwd", dtype=str(dtype).split(".")[-1],
                        shape=[B, H, N, D, Dv], causal=causal, ours_ms=t_ours * 1e3,
                        ours_tflops=flops / t_ours / 1e12, ours_peak_mib=m_ours, mx_fast_ms=t_fast * 1e3,
                        mx_fast_tflops=flops / t_fast / 1e12, mx_fast_peak_mib=m_fast,
                        ratio_vs_mx_fast=t_fast / t_ours)
        del q, k, v


# Wide heads on Hopper (issue 14): (Dqk, Dv) and dtypes, the most telling first.
WIDE_HEADS_CASES = [((256, 256), "float16", False), ((192, 192), "float16", False), ((192, 128), "float16", False),
                    ((256, 256), "float16", True), ((96, 96), "float16", False), ((256, 256), "bfloat16", False),
                    ((192, 192), "float16", True), ((192, 128), "float16", True), ((96, 96), "float16", True)]


def _wide_route(mode):
    """Sets the wide-head route (cuda_fwd_ws.WIDE_MODE: "all" = the
    warp-specialised forward, "0" = the route before it) and returns the old one."""
    from mlx_flash.backends import cuda_fwd_ws

    old, cuda_fwd_ws.WIDE_MODE = cuda_fwd_ws.WIDE_MODE, mode
    return old


def _torch_sdpa_random(q_shape, k_shape, v_shape, dtype, causal):
    """A timing closure for torch SDPA on random inputs of these shapes made on
    the GPU (copying MLX's through the host cost seconds a row at N = 8192)."""
    try:
        import torch
    except ImportError:
        return None
    tdt = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}[dtype]
    tq, tk, tv = (torch.randn(s, device="cuda", dtype=tdt) for s in (q_shape, k_shape, v_shape))
    return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)


def bench_wide_heads(rec: Recorder, B=1, H=16, N=8192, cases=None, iters=10, others=True):
    """Forward at wide heads, (1, 16, 8192, D): the warp-specialised Hopper
    kernel (attention_fwd_ws) side by side with the route it replaces
    (attention_fwd_mma), mx.fast SDPA and torch SDPA, same inputs, one run.
    FLOPs 2*B*H*N^2*(Dqk + Dv), halved under causal. ws_calls counts the
    calls that reached attention_fwd_ws in the ws timing (the route check).
    others=False: the ws kernel alone (tile variants, cuda_fwd_ws's knobs)."""
    from mlx_flash.backends import cuda_fwd_ws

    for (D, Dv), dname, causal in cases or WIDE_HEADS_CASES:
        dtype = DTYPES[dname]
        q, k, v = _mla_qkv(B, H, H, N, N, D, Dv, dtype)
        flops = 2 * B * H * N * N * (D + Dv) * (0.5 if causal else 1.0)
        mask = "causal" if causal else None
        ours = lambda: mlx_flash.flash_attention(q, k, v, causal=causal)
        row = dict(section="wide_heads", dtype=dname, shape=[B, H, N, D, Dv], causal=causal,
                   ws_keys=cuda_fwd_ws.keys_per_tile(cuda_fwd_ws.AttentionSpec(
                       B, H, H, N, N, D, Dv, dtype, D ** -0.5, window_right=0 if causal else -1)))
        calls = []
        forward = cuda_fwd_ws.forward
        cuda_fwd_ws.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
        old = _wide_route("all")
        try:
            t_ws, m_ws = time_mlx(ours, iters=iters)
            row.update(ws_ms=t_ws * 1e3, ws_tflops=flops / t_ws / 1e12, ws_peak_mib=m_ws, ws_calls=len(calls))
            if not others:
                rec.add(**row)
                continue
            _wide_route("0")
            t_old, m_old = time_mlx(ours, iters=iters)
            row.update(old_route_ms=t_old * 1e3, old_route_tflops=flops / t_old / 1e12, ratio_vs_old_route=t_old / t_ws)
        finally:
            _wide_route(old)
            cuda_fwd_ws.forward = forward
        try:
            t_fast, m_fast = time_mlx(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5,
                                                                                   mask=mask), iters=iters)
            row.update(mx_fast_ms=t_fast * 1e3, mx_fast_tflops=flops / t_fast / 1e12, mx_fast_peak_mib=m_fast,
                       ratio_vs_mx_fast=t_fast / t_ws)
        except Exception as e:  # noqa: BLE001 (record it, keep the others)
            row.update(mx_fast_error=f"{type(e).__name__}: {e}")
        try:
            run_torch = _torch_sdpa_random(q.shape, k.shape, v.shape, dtype, causal)
            if run_torch is not None:
                t_torch, m_torch = time_torch(run_torch, iters=iters)
                row.update(torch_ms=t_torch * 1e3, torch_tflops=flops / t_torch / 1e12, ratio_vs_torch=t_torch / t_ws)
        except Exception as e:  # noqa: BLE001
            row.update(torch_error=f"{type(e).__name__}: {e}")
        rec.add(**row)
        del q, k, v


SECTIONS = {
    "fwd": lambda r: bench_attention(r, backward=False),
    "fwdbwd": lambda r: bench_attention(r, backward=True),
    "features": bench_features,
    "decode": bench_decode,
    "decode_gqa8": lambda r: bench_decode(r, Hkv=8),  # GQA 32:8 (Llama-3 8B's decode)
    "key_ranges": bench_key_ranges,
    "matmul": bench_matmul,
    "wide_decode": bench_wide_decode,
    "wide_prefill": bench_wide_prefill,
    "wide_heads": bench_wide_heads,
}


def out_path(out: str, card: str) -> str:
    """--out as given when it names a .json file, else cuda_<card>.json inside that directory."""
    return out if out.endswith(".json") else os.path.join(out, f"cuda_{slug(card)}.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", default=".",
                        help="results JSON file, or a directory for cuda_<card>.json (default the current directory)")
    args = parser.parse_args(argv)
    if not dispatch.cuda_available():
        raise SystemExit("mlx_flash.bench.cuda: MLX sees no CUDA GPU")
    card = card_name()
    rec = Recorder()
    for name in args.sections.split(","):
        try:
            SECTIONS[name](rec)
        except Exception as e:  # noqa: BLE001 (record the failure, keep the other sections)
            rec.add(section=name, error=f"{type(e).__name__}: {e}")
    result = {"card": card, "mlx": mx.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": rec.rows}
    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError:
        pass
    path = out_path(args.out, card)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
