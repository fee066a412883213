"""Attention over a quantized KV cache: `flash_attention_quantized` vs
mlx-lm's quantized path and vs the unquantized cache, on the CPU or a GPU.

    PYTHONPATH=$PWD python -m mlx_flash.bench.quantized_kv [--quick] [--device cpu|gpu] \
        [--cases decode prefill_chunk ...] [--out quantized_kv_<device>.json]

`--device gpu` (a CUDA card; the JSON names it) times the GPU cases: decode
at Nk = 32768 in float16 (4 and 8 bits) against mx.fast SDPA over the fp16
cache and mlx-lm's quantized path, and a causal 2048-query prefill chunk
against the 32K cache, every implementation at full size (the card has the
memory mlx-lm's materialised scores need).

The cache is what mlx-lm's `QuantizedKVCache` holds for one layer of a
Llama-3-8B-shaped model (GQA 32:8, head dim 128; `mx.quantize` along the
head dim, group 64). Implementations, on the same inputs:

* `flash_quantized`: `mlx_flash.flash_attention_quantized` on the triples.
* `mlx_lm_quantized`: `mlx_lm.models.base.quantized_scaled_dot_product_attention`
  (two `mx.quantized_matmul`s around a materialised softmax).
* `mx_fast_unquantized`: `mx.fast.scaled_dot_product_attention` over the
  float cache (what `generate` runs without kv_bits).
* `flash_unquantized`: `mlx_flash.flash_attention` over the float cache.

Cases: decode (1 query per head) at Nk = 32768 in float32 and float16, 4
and 8 bits; a causal prefill chunk against the 32K cache (bottom-right
aligned). mlx-lm's quantized path materialises the [B, Hq, Nq, Nk] scores
(8 GiB in float32 for a 2048-query chunk), more than a shared 2-core test
machine should give it, so its prefill runs at a smaller
chunk (`--mlx-lm-prefill-queries`, default 256) and the full 2048-query
chunk runs for mlx_flash alone; the JSON says which ran at which size.
Peak memory is MLX's allocator peak above what was held before the call
(the cache and q are held; outputs and workspace count).

`--cache-views` adds, per decode case, the cache as mlx-lm's
`QuantizedKVCache` hands it over: `keys[..., :offset, :]` slices of a
preallocated buffer (capacity rounded up to its step of 256 plus one step),
timed and measured side by side with the same values as dense arrays, and
with the views copied dense before the call (what `mx.fast.cuda_kernel`'s
default `ensure_row_contiguous=True` does inside every call): a copy shows
as the cache's bytes of extra peak and as time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

import mlx_flash
from mlx_flash import dispatch

from .common import (MLX_MEMORY_METHOD, TIMING_RULE, TimingPolicy, fmt_bytes, fmt_time,
                     machine_info, mlx_extra_peak, now_iso, time_interleaved, today, write_json)

SHAPE = dict(batch=1, heads_q=32, heads_kv=8, head_dim=128, group_size=64)


def make_inputs(nq: int, nk: int, bits: int, dtype, seed: int = 0):
    """q, the float cache (k, v) and its quantized triples."""
    B, Hq, Hkv, D = SHAPE["batch"], SHAPE["heads_q"], SHAPE["heads_kv"], SHAPE["head_dim"]
    key = mx.random.key(seed)
    kq_, kk, kv = mx.random.split(key, 3)
    q = mx.random.normal((B, Hq, nq, D), key=kq_).astype(dtype)
    k = mx.random.normal((B, Hkv, nk, D), key=kk).astype(dtype)
    v = mx.random.normal((B, Hkv, nk, D), key=kv).astype(dtype)
    kq = tuple(mx.quantize(k, group_size=SHAPE["group_size"], bits=bits))
    vq = tuple(mx.quantize(v, group_size=SHAPE["group_size"], bits=bits))
    mx.eval(q, k, v, kq, vq)
    return q, k, v, kq, vq


def _mlx_lm_quantized_sdpa():
    """mlx-lm's quantized attention, or None when mlx-lm is not installed."""
    try:
        from mlx_lm.models.base import quantized_scaled_dot_product_attention
    except ImportError:
        return None
    return quantized_scaled_dot_product_attention


def implementations(q, k, v, kq, vq, bits: int, causal: bool, names) -> dict:
    quantized_scaled_dot_product_attention = _mlx_lm_quantized_sdpa()
    if quantized_scaled_dot_product_attention is None and "mlx_lm_quantized" in names:
        print("  mlx_lm_quantized: skipped: mlx-lm is not installed (pip install 'mlx_flash[lm]')")
        names = tuple(n for n in names if n != "mlx_lm_quantized")
    scale = SHAPE["head_dim"] ** -0.5
    gs = SHAPE["group_size"]
    mask = "causal" if causal else None
    all_impls = {
        "flash_quantized": lambda: mlx_flash.flash_attention_quantized(
            q, kq, vq, bits=bits, group_size=gs, scale=scale, causal=causal),
        # It scales its queries in place (`queries *= scale`): hand it its own array.
        "mlx_lm_quantized": lambda: quantized_scaled_dot_product_attention(
            mx.array(q), kq, vq, scale=scale, mask=mask, group_size=gs, bits=bits),
        "mx_fast_unquantized": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
        "flash_unquantized": lambda: mlx_flash.flash_attention(q, k, v, scale=scale, causal=causal),
    }
    return {name: all_impls[name] for name in names}


def run_case(label: str, nq: int, nk: int, bits: int, dtype, names, policy: TimingPolicy, batch: int = 1,
             prewarm: bool = False) -> dict:
    """One case; with batch > 1 (the GPU) a timed call queues `batch` independent
    calls before one eval, so launch and sync overheads do not hide kernels of
    microseconds; times are per call. Memory is measured on a single call.
    `prewarm` runs every implementation once before anything is measured (on
    a GPU the first call compiles kernels)."""
    q, k, v, kq, vq = make_inputs(nq, nk, bits, dtype)
    impls = implementations(q, k, v, kq, vq, bits, nq > 1, names)
    outputs = {}
    build_s = {name: [] for name in impls}

    def keeping(name, fn, n):
        def call():
            t0 = time.perf_counter()
            outs = [fn() for _ in range(n)]
            build_s[name].append((time.perf_counter() - t0) / n)
            mx.eval(outs)
            outputs[name] = outs[-1]
        return call

    if prewarm:
        # One untimed call each first: a GPU kernel's first call compiles it
        # (NVRTC, seconds), which must count neither as memory nor as a sample.
        for name, fn in impls.items():
            try:
                mx.eval(fn())
            except Exception:  # time_interleaved records the error for this one
                pass
    blocking = {name: keeping(name, fn, batch) for name, fn in impls.items()}
    warmups = {name: mlx_extra_peak(keeping(name, fn, 1)) for name, fn in impls.items()}
    timings = time_interleaved(blocking, policy, warmups)
    for name, t in timings.items():
        if not isinstance(t, Exception) and build_s[name]:
            # Graph-building (host) time per call, Python and MLX's launch work:
            # with `batch` calls queued, a call costs max(host, device) time.
            t["host_build_s"] = statistics.median(build_s[name][1:] or build_s[name])
    if batch > 1:
        timings = {name: t if isinstance(t, Exception) else dict(
            t, time_s=t["time_s"] / batch, min_s=t["min_s"] / batch,
            times_s=[round(x / batch, 9) for x in t["times_s"]], calls_per_sample=batch)
            for name, t in timings.items()}
    record = {
        "case": label, "queries": nq, "keys": nk, "bits": bits, "dtype": str(dtype).split(".")[-1],
        "causal": nq > 1,
        "quantized_cache_bytes": sum(x.nbytes for x in kq + vq), "float_cache_bytes": k.nbytes + v.nbytes,
        "results": {},
    }
    ref = outputs.get("flash_quantized")
    for name, t in timings.items():
        if isinstance(t, Exception):
            record["results"][name] = {"error": f"{type(t).__name__}: {t}"}
            continue
        entry = dict(t, **(warmups[name].result or {}))
        if ref is not None and name in outputs and name != "flash_quantized":
            entry["max_abs_diff_vs_flash_quantized"] = float(
                mx.max(mx.abs(outputs[name].astype(mx.float32) - ref.astype(mx.float32))).item())
        record["results"][name] = entry
    base = record["results"].get("flash_quantized", {})
    for name, entry in record["results"].items():
        if "time_s" in entry and "time_s" in base and name != "flash_quantized":
            entry["flash_quantized_speedup"] = entry["time_s"] / base["time_s"]
            if base.get("extra_peak_bytes"):
                entry["extra_peak_ratio_vs_flash_quantized"] = entry["extra_peak_bytes"] / base["extra_peak_bytes"]
    del q, k, v, kq, vq, outputs
    mx.clear_cache()
    return record


def _as_cache_slice(x: mx.array, step: int = 256) -> mx.array:
    """x as QuantizedKVCache returns it: the first Nk token rows of a bigger buffer."""
    B, H, N, W = x.shape
    capacity = (N + step - 1) // step * step + step
    buffer = mx.concatenate([x, mx.zeros((B, H, capacity - N, W), x.dtype)], axis=2)
    mx.eval(buffer)
    return buffer[..., :N, :]


def run_view_case(nk: int, bits: int, dtype, policy: TimingPolicy, batch: int = 1) -> dict:
    """flash_quantized decode over cache slices (views) vs the same values dense."""
    q, _, _, kq, vq = make_inputs(1, nk, bits, dtype)
    kv, vv = (tuple(_as_cache_slice(x) for x in t) for t in (kq, vq))
    mx.eval(kv, vv)
    gs, scale = SHAPE["group_size"], SHAPE["head_dim"] ** -0.5
    dense = lambda t: tuple(mx.contiguous(x) for x in t)
    impls = {
        "flash_quantized_dense": lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=gs,
                                                                             scale=scale),
        "flash_quantized_cache_view": lambda: mlx_flash.flash_attention_quantized(q, kv, vv, bits=bits,
                                                                                  group_size=gs, scale=scale),
        # What a kernel built with ensure_row_contiguous=True costs: a dense copy of the views per call.
        "copy_then_flash_quantized": lambda: mlx_flash.flash_attention_quantized(
            q, dense(kv), dense(vv), bits=bits, group_size=gs, scale=scale),
    }
    sdpa = _mlx_lm_quantized_sdpa()
    if sdpa is not None:
        impls["mlx_lm_quantized_cache_view"] = lambda: sdpa(mx.array(q), kv, vv, scale=scale, mask=None,
                                                            group_size=gs, bits=bits)
    outputs = {}

    def keeping(name, fn, n):
        def call():
            outs = [fn() for _ in range(n)]
            mx.eval(outs)
            outputs[name] = outs[-1]
        return call

    warmups = {name: mlx_extra_peak(keeping(name, fn, 1)) for name, fn in impls.items()}
    timings = time_interleaved({n: keeping(n, f, batch) for n, f in impls.items()}, policy, warmups)
    record = {"case": "decode_cache_view", "queries": 1, "keys": nk, "bits": bits,
              "dtype": str(dtype).split(".")[-1], "causal": False,
              "quantized_cache_bytes": sum(x.nbytes for x in kq + vq), "results": {}}
    ref = outputs.get("flash_quantized_dense")
    for name, t in timings.items():
        if isinstance(t, Exception):
            record["results"][name] = {"error": f"{type(t).__name__}: {t}"}
            continue
        if batch > 1:
            t = dict(t, time_s=t["time_s"] / batch, min_s=t["min_s"] / batch, calls_per_sample=batch)
        entry = dict(t, **(warmups[name].result or {}))
        if ref is not None and name in outputs:
            entry["max_abs_diff_vs_dense"] = float(
                mx.max(mx.abs(outputs[name].astype(mx.float32) - ref.astype(mx.float32))).item())
        record["results"][name] = entry
    del q, kq, vq, kv, vv, outputs
    mx.clear_cache()
    return record


def print_case(rec: dict) -> None:
    print(f"{rec['case']}: Nq={rec['queries']} Nk={rec['keys']} {rec['bits']}-bit {rec['dtype']}", flush=True)
    for name, e in rec["results"].items():
        if "error" in e:
            print(f"  {name:22s} error: {e['error']}")
            continue
        extra = f"  time / flash_quantized's: {e['flash_quantized_speedup']:.2f}" if "flash_quantized_speedup" in e else ""
        host = f"  host {fmt_time(e['host_build_s'])}" if "host_build_s" in e else ""
        if "max_abs_diff_vs_dense" in e:
            extra += f"  max |diff| vs dense {e['max_abs_diff_vs_dense']:.3g}"
        print(f"  {name:22s} {fmt_time(e['time_s']):>10s}{host}  extra peak {fmt_bytes(e.get('extra_peak_bytes')):>12s}{extra}",
              flush=True)


ALL = ("flash_quantized", "mlx_lm_quantized", "mx_fast_unquantized", "flash_unquantized")


def cases(quick: bool, nk: int, prefill: int, mlx_lm_prefill: int, device: str = "cpu"):
    """(label, Nq, Nk, bits, dtype, implementations)."""
    if quick:
        nk, prefill, mlx_lm_prefill = min(nk, 1024), 64, 32
    if device == "gpu":
        return [
            ("decode", 1, nk, 4, mx.float16, ALL),
            ("decode", 1, nk, 8, mx.float16, ALL),
            ("decode", 1, nk, 4, mx.bfloat16, ALL[:3]),
            ("prefill_chunk", prefill, nk, 4, mx.float16, ALL),
        ]
    return [
        ("decode", 1, nk, 4, mx.float32, ALL),
        ("decode", 1, nk, 4, mx.float16, ALL),
        ("decode", 1, nk, 8, mx.float32, ALL[:2]),
        ("prefill_chunk_small", mlx_lm_prefill, nk, 4, mx.float32, ALL[:2]),
        ("prefill_chunk", prefill, nk, 4, mx.float32, ("flash_quantized",)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--prefill-queries", type=int, default=2048)
    parser.add_argument("--mlx-lm-prefill-queries", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where every implementation runs (gpu: a CUDA card)")
    parser.add_argument("--cache-views", action="store_true",
                        help="also run each decode case over QuantizedKVCache-style slices (views) vs dense")
    parser.add_argument("--only-cache-views", action="store_true", help="run only the cache-view cases")
    parser.add_argument("--cases", nargs="+", default=None, metavar="LABEL",
                        help="run only the cases with these labels (decode, prefill_chunk, prefill_chunk_small)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results JSON here (default: quantized_kv_<device>_<date>.json in the "
                             "current directory; pass benchmarks/results/... to update the committed file)")
    args = parser.parse_args(argv)
    tag = "cpu"
    if args.device == "gpu":
        from .cuda import card_name, slug

        if not dispatch.cuda_available():
            raise SystemExit("--device gpu: no CUDA GPU visible to MLX")
        card = card_name()
        tag = slug(card)
    if args.out is None:  # never into an installed package or over a checkout's committed results
        args.out = Path(f"quantized_kv_{tag}_{today()}.json")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.device == "gpu":  # calls of tens of microseconds: many repeats
        policy = TimingPolicy(budget_s=2.0, min_repeats=20, max_repeats=200, long_call_s=3.0)
    else:
        policy = TimingPolicy(budget_s=2.0, min_repeats=3, max_repeats=5, long_call_s=3.0)
    result = {
        "benchmark": f"quantized_kv_{args.device}", "date": now_iso(), "machine": machine_info(), "shape": SHAPE,
        "timing_rule": TIMING_RULE, "timing_policy": policy.as_dict(), "memory_method": MLX_MEMORY_METHOD,
        "cases": [],
    }
    if args.device == "gpu":
        result["card"] = card
    for label, nq, nk, bits, dtype, names in cases(args.quick, args.keys, args.prefill_queries,
                                                   args.mlx_lm_prefill_queries, args.device):
        if args.cases is not None and label not in args.cases:
            continue
        batch = (20 if nq == 1 else 1) if args.device == "gpu" else 1
        records = []
        if (args.cache_views or args.only_cache_views) and label == "decode" and names == ALL:
            records.append(run_view_case(nk, bits, dtype, policy, batch))
        if not args.only_cache_views:
            records.append(run_case(label, nq, nk, bits, dtype, names, policy, batch, prewarm=args.device == "gpu"))
        for rec in records:
            print_case(rec)
            result["cases"].append(rec)
            write_json(args.out, result)  # after every case: a long run killed late keeps what it measured
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
