"""Interleaved A/B timing of the warp-specialised forward's knob sets, beside
mx.fast (cuDNN) and torch SDPA, in one process.

    SWEEP_PLAN="128:f16:ws=,early=early~1;..." python3 tools/cuda_fwd_ws_ab.py OUT.json D:f16|bf16[:i.j] ... [--rounds R]

SWEEP_PLAN's labels and knobs are tools/cuda_wgmma_check.py's (sweep_plan,
_set_ws_knobs); i.j pick SWEEP_SHAPES[D] rows (default: all). Each shape,
causal and not: every label (and mx.fast) is timed `rounds` times in turn,
ten calls queued per eval each time, so clock drift and throttling fall on
every label alike (one label after the other moved rows by up to 6% in
session 8). Reported: the median per label (TFLOP/s), and each label's median
of its per-round ratio to "ws" (the default route) and to mx.fast. The
queued time still carries each call's host graph building (~40-60 us for
ours, 2-5 us for mx.fast). Appends to OUT.json; prints rows as they come.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cuda_wgmma_check as cw  # noqa: E402  (sets up tests/ on the path too)
import mlx.core as mx  # noqa: E402

import mlx_flash  # noqa: E402


def run(D, dt, shapes, knob_sets, rounds):
    dtype = cw._DTYPES[dt]
    rows = []
    for (B, H, N, _) in shapes:
        for causal in (False, True):
            q, k, v = (mx.random.normal((B, H, N, D)).astype(dtype) for _ in range(3))
            mx.eval(q, k, v)
            s = D ** -0.5
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            fns = {}
            for label, knobs in knob_sets.items():
                def fn(knobs=knobs):
                    saved = cw._set_ws_knobs(D, knobs)
                    try:
                        return mlx_flash.flash_attention(q, k, v, causal=causal, scale=s)
                    finally:
                        cw._set_ws_knobs(D, saved)
                fns[label] = fn
            fns["mx.fast"] = lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=s, mask="causal" if causal else None)
            times = {label: [] for label in fns}
            for label, fn in list(fns.items()):
                try:
                    cw._time_queued(fn, 3)  # build and warm
                except Exception as e:  # noqa: BLE001 (a variant that fails to build or launch)
                    print(f"{label} failed: {e}", flush=True)
                    del fns[label], times[label]
            for _ in range(rounds):
                for label, fn in fns.items():
                    times[label].append(cw._time_queued(fn, 10))
            t_torch = cw._torch_events((B, H, N, D), dtype, causal, 10)
            med = {label: statistics.median(t) for label, t in times.items()}
            row = dict(dtype=str(dtype), shape=[B, H, N, D], causal=causal, rounds=rounds,
                       **{f"{label}_queued_ms": m * 1e3 for label, m in med.items()},
                       **{f"{label}_queued_tflops": flops / m / 1e12 for label, m in med.items()},
                       **{f"{label}_all_ms": [x * 1e3 for x in t] for label, t in times.items()})
            for base in ("ws", "mx.fast"):
                if base in times:
                    for label, t in times.items():
                        if label != base:
                            row[f"ratio_{label}_vs_{base}"] = statistics.median(
                                b / x for b, x in zip(times[base], t))
            if t_torch is not None:
                row["torch_ms"] = t_torch * 1e3
                row["torch_tflops"] = flops / t_torch / 1e12
                for label, m in med.items():
                    if label != "mx.fast":
                        row[f"ratio_{label}_vs_torch"] = t_torch / m
            rows.append(row)
            print(f"{dt} {[B, H, N, D]} causal={int(causal)}: " + ", ".join(
                f"{label} {row[label + '_queued_tflops']:.0f}" for label in med) +
                (f", torch {row['torch_tflops']:.0f}" if t_torch else "") + " TF/s (queued medians); " + ", ".join(
                f"{label}/{base} {row[f'ratio_{label}_vs_{base}']:.3f}" for base in ("ws", "mx.fast")
                for label in med if f"ratio_{label}_vs_{base}" in row), flush=True)
    return rows


def main(argv):
    out, parts, rounds = argv[0], [], 5
    rest = argv[1:]
    if "--rounds" in rest:
        i = rest.index("--rounds")
        rounds = int(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    plan = cw.sweep_plan()
    try:
        device = mx.device_info()
    except Exception:  # noqa: BLE001 (only a label)
        device = {}
    for part in rest:
        d, dt, *idx = part.split(":")
        D = int(d)
        shapes = [cw.SWEEP_SHAPES[D][int(i)] for i in idx[0].split(".")] if idx else cw.SWEEP_SHAPES[D]
        rows = run(D, dt, shapes, plan[(D, dt)], rounds)
        old = json.load(open(out)) if os.path.exists(out) else []
        json.dump(old + [dict(r, device=str(device.get("device_name", "")), plan=os.environ.get("SWEEP_PLAN"))
                         for r in rows], open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
