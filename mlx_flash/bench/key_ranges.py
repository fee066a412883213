"""Per-batch key ranges (`key_start`/`key_len`) on the CPU: native vs folded.

    PYTHONPATH=$PWD python -m mlx_flash.bench.key_ranges [--quick] [--out key_ranges_cpu.json]

The CPU kernels take key ranges natively (backends/cpu.py NATIVE_KEY_RANGES):
only the key tiles of each batch row's range are packed and visited. A
backend without that folds the ranges into a `[B, 1, 1, Nk]` bool mask
(dispatch.fold_key_ranges), which drops the same keys but still computes every
tile. Each case runs, on the same inputs:

* `native`: `flash_attention(..., key_start=, key_len=)` as the CPU runs it.
* `folded_mask`: the same call with the CPU backend's NATIVE_KEY_RANGES off
  (what the CPU ran before, and what a backend without native ranges runs).
* `no_ranges`: the call without ranges (every key kept): the cost of the
  full-length batch.

Cases: a left-padded batch (mlx-lm's BatchKVCache: rows padded by 0, 1/4,
1/2 and 3/4 of the length), causal prefill and decode (one query against the
cache), forward and forward+backward for the prefill. Outputs of `native` and
`folded_mask` must agree (max |diff| is recorded). Memory: the native
kernels pack only the key tiles of each range (tests/test_attention_memory.py
test_cpu_kernels_pack_only_the_key_range checks it); the time is what this
measures.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import mlx.core as mx

import mlx_flash

from .common import TIMING_RULE, TimingPolicy, fmt_time, machine_info, now_iso, time_interleaved, today, write_json


@contextlib.contextmanager
def folded_ranges():
    """Within the block, the CPU backend folds key ranges into a mask."""
    from mlx_flash.backends import cpu

    saved = cpu.NATIVE_KEY_RANGES
    cpu.NATIVE_KEY_RANGES = False
    try:
        yield
    finally:
        cpu.NATIVE_KEY_RANGES = saved


def left_padding(batch: int, nk: int) -> mx.array:
    """Row b padded by b / batch of the keys (row 0 not at all)."""
    return mx.array([b * nk // batch for b in range(batch)], mx.int32)


def make_inputs(batch, heads_q, heads_kv, nq, nk, d, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((batch, heads_q, nq, d), key=keys[0])
    k = mx.random.normal((batch, heads_kv, nk, d), key=keys[1])
    v = mx.random.normal((batch, heads_kv, nk, d), key=keys[2])
    mx.eval(q, k, v)
    return q, k, v


def run_case(label, shape, backward: bool, policy: TimingPolicy) -> dict:
    batch, heads_q, heads_kv, nq, nk, d = shape
    q, k, v = make_inputs(batch, heads_q, heads_kv, nq, nk, d)
    start = left_padding(batch, nk)
    causal = nq > 1

    def call(**ranges):
        if not backward:
            return lambda: mlx_flash.flash_attention(q, k, v, causal=causal, stream=mx.cpu, **ranges)
        loss = lambda q, k, v: mx.sum(mlx_flash.flash_attention(q, k, v, causal=causal, stream=mx.cpu, **ranges))
        return lambda: mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

    native, no_ranges = call(key_start=start), call()
    folded_call = call(key_start=start)

    def folded():
        with folded_ranges():
            return folded_call()

    impls = {"native": native, "folded_mask": folded, "no_ranges": no_ranges}
    outputs = {}

    def keeping(name, fn):
        def run():
            out = fn()
            mx.eval(out)
            outputs[name] = out
        return run

    timings = time_interleaved({name: keeping(name, fn) for name, fn in impls.items()}, policy)
    kept = sum(nk - int(s) for s in start.tolist())
    record = {"case": label, "shape": dict(zip(("batch", "heads_q", "heads_kv", "queries", "keys", "head_dim"),
                                               shape)),
              "causal": causal, "backward": backward, "key_start": start.tolist(),
              "kept_key_fraction": kept / (batch * nk), "results": {}}
    for name, t in timings.items():
        if isinstance(t, Exception):
            record["results"][name] = {"error": f"{type(t).__name__}: {t}"}
            continue
        record["results"][name] = t
    if "native" in outputs and "folded_mask" in outputs:
        flat = lambda x: x if isinstance(x, (list, tuple)) else [x]
        record["max_abs_diff_native_vs_folded"] = max(
            float(mx.max(mx.abs(a - b)).item()) for a, b in zip(flat(outputs["native"]), flat(outputs["folded_mask"])))
    base = record["results"].get("native", {})
    for name, entry in record["results"].items():
        if name != "native" and "time_s" in entry and "time_s" in base:
            entry["time_vs_native"] = entry["time_s"] / base["time_s"]
    return record


def print_case(rec: dict) -> None:
    s = rec["shape"]
    print(f"{rec['case']}: B={s['batch']} Hq={s['heads_q']} Hkv={s['heads_kv']} Nq={s['queries']} Nk={s['keys']} "
          f"D={s['head_dim']} kept {rec['kept_key_fraction']:.0%} of the keys"
          f"{' (forward+backward)' if rec['backward'] else ''}", flush=True)
    for name, e in rec["results"].items():
        if "error" in e:
            print(f"  {name:12s} error: {e['error']}")
            continue
        ratio = f"  time / native's: {e['time_vs_native']:.2f}" if "time_vs_native" in e else ""
        print(f"  {name:12s} {fmt_time(e['time_s']):>10s}{ratio}", flush=True)


def cases(quick: bool):
    """(label, (B, Hq, Hkv, Nq, Nk, D), backward)."""
    n, cache = (512, 2048) if quick else (2048, 16384)
    return [
        ("left_padded_prefill", (4, 8, 2, n, n, 64), False),
        ("left_padded_prefill", (4, 8, 2, n // 2, n // 2, 64), True),
        ("left_padded_decode", (4, 32, 8, 1, cache, 128), False),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: key_ranges_cpu_<date>.json in the current directory)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(f"key_ranges_cpu_{today()}.json")
    policy = TimingPolicy(budget_s=2.0, min_repeats=3, max_repeats=7, long_call_s=3.0)
    result = {"benchmark": "key_ranges_cpu", "date": now_iso(), "machine": machine_info(),
              "timing_rule": TIMING_RULE, "timing_policy": policy.as_dict(), "cases": []}
    for label, shape, backward in cases(args.quick):
        rec = run_case(label, shape, backward, policy)
        print_case(rec)
        result["cases"].append(rec)
        write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
