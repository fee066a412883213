"""GPU check of the Hopper (wgmma) forward: correctness against float64 and speed.

    python3 tools/cuda_wgmma_check.py [OUT_DIR] [ws,speed_ws,fwd,bwd,speed,speed_bwd,speed_anchor]

ws: the warp-specialised forward (attention_fwd_ws) against float64 and the
wgmma kernel, and its routing; speed_ws: it side by side with the wgmma
kernel, mx.fast and torch SDPA (the issue-14 shapes).
Correctness: every feature of tests/features.py at odd shapes, fp16 and bf16,
head dims 64 and 128, out and lse against the float64 NumPy reference with the
test suite's tolerance (twice the plain materialised fp16/bf16 error).
Speed: the forward at the ANCHORS shapes, wgmma vs the mma.sync kernel vs
mx.fast SDPA (cuDNN), same run; speed_anchor: (2, 16, 4096, 128) fp16 only,
forward and forward + backward, for before/after timings of a kernel change;
JSON to OUT_DIR/wgmma_check.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mlx.core as mx  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash.backends import cuda as cb  # noqa: E402
from mlx_flash.backends import cuda_fwd_ws as ws  # noqa: E402

import gpu_timing  # noqa: E402  (tools/, beside this file)
from features import FEATURES  # noqa: E402
from helpers import check_close, plain_errors, qkv, randn, rng, to_np  # noqa: E402
from reference_np import attention_np  # noqa: E402


def correctness(dims=(64, 128), dtypes=(mx.float16, mx.bfloat16), label=""):
    shapes = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 1, 1, 300, 4103),
              (1, 2, 2, 129, 129)]
    passed = failed = 0
    for D in dims:
        for dtype in dtypes:
            for si, (B, Hq, Hkv, Nq, Nk) in enumerate(shapes):
                for name, build in FEATURES.items():
                    if si > 1 and name not in ("none", "causal", "combined_everything", "block_sparse"):
                        continue
                    gen = rng("wgmma", D, str(dtype), si, name)
                    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
                    try:
                        options = build(gen, B, Hq, Nq, Nk)
                        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
                        mx.eval(out, lse)
                        dout = randn(gen, out.shape, dtype)
                        want = attention_np(q, k, v, **options)
                        plain = plain_errors(q, k, v, dout, options, dtype)
                        e1 = check_close("out", to_np(out), want, dtype, plain)
                        e2 = check_close("lse", to_np(lse), want, dtype, plain)
                        passed += 1
                        print(f"ok   {label}D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name}: out {e1:.2e} (plain {plain['out']:.2e}) lse {e2:.2e}")
                    except Exception as e:  # noqa: BLE001
                        failed += 1
                        print(f"FAIL {label}D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name}: {e}")
                        if failed < 3:
                            traceback.print_exc()
    print(f"correctness {label}: {passed} passed, {failed} failed")
    return passed, failed


# Features the warp-specialised forward serves (cuda_fwd_ws.serves); every
# other feature must keep the wgmma kernel.
WS_FEATURES = ("none", "causal", "window_left", "window_both", "window_right_only")


class RouteCounter:
    """Counts the calls that reach cuda_fwd_ws.forward while installed."""

    def __init__(self):
        self.calls = 0
        self._orig = ws.forward

    def __enter__(self):
        def counted(*args, **kw):
            self.calls += 1
            return self._orig(*args, **kw)

        ws.forward = counted
        return self

    def __exit__(self, *exc):
        ws.forward = self._orig


WS_SHAPES = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 1, 1, 300, 4103),
             (1, 2, 2, 129, 129), (1, 8, 1, 64, 1), (1, 2, 2, 1, 300), (2, 2, 1, 2048, 2048),
             (2, 8, 2, 1100, 300)]  # the last: more work items than SMs (persistent blocks take several)


def correctness_ws(dims=(128, 64), dtypes=(mx.float16, mx.bfloat16), features=WS_FEATURES, shapes=WS_SHAPES,
                   compare=True):
    """The warp-specialised forward against float64 and against the wgmma
    kernel (same inputs, MLX_FLASH_CUDA_FWD_WS off), odd sizes, Nq != Nk, GQA,
    causal and windows; the other features (features=None: all of them) are
    checked to stay off it."""
    passed = failed = 0
    for D in dims:
        for dtype in dtypes:
            for si, (B, Hq, Hkv, Nq, Nk) in enumerate(shapes):
                for name, build in FEATURES.items():
                    served = name in WS_FEATURES
                    if (features is None and served) or (features is not None and name not in features):
                        continue
                    gen = rng("ws", D, str(dtype), si, name)
                    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
                    try:
                        options = build(gen, B, Hq, Nq, Nk)
                        with RouteCounter() as rc:
                            out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
                            mx.eval(out, lse)
                        uses_mma = Nq * (Hq // Hkv) > 16
                        want_route = served and uses_mma
                        if (rc.calls > 0) != want_route:
                            raise AssertionError(f"route: ws kernel called {rc.calls}x, expected {want_route}")
                        want = attention_np(q, k, v, **options)
                        plain = plain_errors(q, k, v, randn(gen, out.shape, dtype), options, dtype)
                        e1 = check_close("out", to_np(out), want, dtype, plain)
                        e2 = check_close("lse", to_np(lse), want, dtype, plain)
                        extra = ""
                        if want_route and compare:
                            ws._ENABLED = False
                            try:
                                o2, l2 = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
                                mx.eval(o2, l2)
                            finally:
                                ws._ENABLED = True
                            import numpy as np
                            d_out = float(np.max(np.abs(to_np(out).astype(np.float64) - to_np(o2).astype(np.float64))))
                            extra = f" vs wgmma kernel {d_out:.2e}"
                            # The grids differ in which block takes an item only: same bits.
                            saved_grid = ws.PERSISTENT
                            ws.PERSISTENT = not ws.persistent(D)
                            try:
                                o3, l3 = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
                                mx.eval(o3, l3)
                            finally:
                                ws.PERSISTENT = saved_grid
                            if not (np.array_equal(to_np(o3), to_np(out), equal_nan=True) and
                                    np.array_equal(to_np(l3), to_np(lse), equal_nan=True)):
                                raise AssertionError("persistent and one-block-per-item grids differ")
                            extra += ", grids agree"
                        passed += 1
                        print(f"ok   ws D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name} route={rc.calls}: out {e1:.2e} "
                              f"(plain {plain['out']:.2e}) lse {e2:.2e}{extra}")
                    except Exception as e:  # noqa: BLE001
                        failed += 1
                        print(f"FAIL ws D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name}: {e}")
                        if failed < 3:
                            traceback.print_exc()
    print(f"correctness ws: {passed} passed, {failed} failed")
    return passed, failed


def _set_ws_knobs(D, knobs):
    """Sets cuda_fwd_ws's knobs (enabled, persistent, dynamic, stages, keys, poly (EXP2_POLY), wg3 (WG3_D64), chains (CHAINS_D128),
    early (RESCALE_EARLY), turns (TURNS_CONTINUOUS), group:
    heads per section of the work order, None = sized by L2) for head dim D; returns the old ones."""
    old = dict(enabled=ws._ENABLED, stages=ws.STAGES[D], keys=ws.KEYS_DENSE_D128 if D == 128 else ws.KEYS_DENSE_D64,
               persistent=ws.PERSISTENT, dynamic=ws.DYNAMIC, group=ws.HEAD_GROUP, poly=ws.EXP2_POLY.get(D, 0),
               wg3=ws.WG3_D64, chains=ws.CHAINS_D128, early=ws.RESCALE_EARLY, turns=ws.TURNS_CONTINUOUS)
    ws.RESCALE_EARLY = knobs.get("early", old["early"])
    ws.TURNS_CONTINUOUS = knobs.get("turns", old["turns"])
    ws.WG3_D64 = knobs.get("wg3", old["wg3"])
    ws.CHAINS_D128 = knobs.get("chains", old["chains"])
    if D in ws.EXP2_POLY:
        ws.EXP2_POLY[D] = knobs.get("poly", old["poly"])
    ws.DYNAMIC = knobs.get("dynamic", old["dynamic"])
    ws.HEAD_GROUP = knobs.get("group", old["group"])
    ws.PERSISTENT = knobs.get("persistent", old["persistent"])
    ws._ENABLED = knobs.get("enabled", old["enabled"])
    ws.STAGES[D] = knobs.get("stages", old["stages"])
    if D == 128:
        ws.KEYS_DENSE_D128 = knobs.get("keys", old["keys"])
    elif D == 64:
        ws.KEYS_DENSE_D64 = knobs.get("keys", old["keys"])
    return old


# Which knob variants speed_ws times beside the default (WS_VARIANTS="k128,s,wg3:f16"
# style: k128 = the other dense D128 key tile, s = the other ring depths, wg3 =
# the wgmma kernel; ":f16" limits one to fp16).
WS_VARIANTS = os.environ.get("WS_VARIANTS", "k128,s,wg3")


def _ws_variants(D, causal, dtype=mx.float16):
    """(label, knobs) timed side by side: the default, each knob changed alone, the wgmma kernel."""
    wanted = {}
    for item in WS_VARIANTS.split(","):
        name, _, only = item.partition(":")
        if name and (not only or _DTYPES.get(only) == dtype):
            wanted[name] = True
    out = [("ws", {}), ("ws_grid", {"persistent": not ws.persistent(D)})]
    if D == 128 and not causal and "k128" in wanted:
        out.append(("ws_k128", {"keys": 176 if ws.KEYS_DENSE_D128 == 128 else 128}))
    if "s" in wanted:
        other = [n for n in ws.STAGE_CHOICES[D] if n != ws.STAGES[D]]
        out += [(f"ws_s{n}", {"stages": n}) for n in other]
    if "wg3" in wanted:
        out.append(("wg3", {"enabled": False}))
    return out


def speed_ws(shapes=((1, 16, 16384, 128), (2, 16, 4096, 128), (1, 16, 8192, 128), (4, 16, 1024, 64),
                     (2, 16, 4096, 64), (1, 16, 16384, 64)), dtypes=(mx.float16, mx.bfloat16), iters=10):
    """Forward side by side: the warp-specialised kernel, the wgmma kernel,
    mx.fast (cuDNN) and torch SDPA, same inputs, one run."""
    from mlx_flash.bench.cuda import _torch_sdpa, time_torch

    rows = []
    for dtype in dtypes:
        for (B, H, N, D) in shapes:
            for causal in (False, True):
                gen = rng("speed-ws", B, H, N, D)
                q, k, v = qkv(gen, B, H, H, N, N, D, dtype=dtype)
                mx.eval(q, k, v)
                s = D ** -0.5
                res = {}
                for label, knobs in _ws_variants(D, causal, dtype):
                    saved = _set_ws_knobs(D, knobs)
                    try:
                        res[label] = time_fn(lambda: mlx_flash.flash_attention(q, k, v, causal=causal, scale=s), iters)
                    except Exception as e:  # noqa: BLE001 (a variant that fails to build or launch)
                        print(f"{label} failed: {e}")
                    finally:
                        _set_ws_knobs(D, saved)
                res["mx.fast"] = time_fn(lambda: mx.fast.scaled_dot_product_attention(
                    q, k, v, scale=s, mask="causal" if causal else None), iters)
                try:
                    run_torch = _torch_sdpa(q, k, v, causal, False)
                    if run_torch is not None:
                        res["torch"] = time_torch(run_torch, iters=iters)[0]
                except Exception as e:  # noqa: BLE001
                    print(f"torch skipped: {e}")
                flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                row = dict(dtype=str(dtype), shape=[B, H, N, D], causal=causal,
                           **{f"{k}_ms": v * 1e3 for k, v in res.items()},
                           **{f"{k}_tflops": flops / v / 1e12 for k, v in res.items()},
                           **{f"ratio_{k}_vs_mx.fast": res["mx.fast"] / v for k, v in res.items()
                              if k != "mx.fast"})
                if "torch" in res and "ws" in res:
                    row["ratio_ws_vs_torch"] = res["torch"] / res["ws"]
                rows.append(row)
                print(f"{row['dtype']} {row['shape']} causal={causal}: " + ", ".join(
                    f"{k} {res[k] * 1e3:.3f} ms ({row[k + '_tflops']:.0f} TF/s)" for k in res) +
                    f"; ws/mx.fast {row.get('ratio_ws_vs_mx.fast', float('nan')):.2f}x" +
                    f", ws/torch {row.get('ratio_ws_vs_torch', float('nan')):.2f}x")
    return rows


def _time_queued(fn, iters=10):
    """Seconds per call with `iters` calls queued in one eval (the GPU runs them
    back to back: kernel throughput without the host's per-call sync)."""
    mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(iters)])
    mx.synchronize()
    return (time.perf_counter() - t0) / iters


def _build_us(fn, calls=20):
    """Host microseconds to build one call's graph (no eval)."""
    t0 = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    t = (time.perf_counter() - t0) / calls * 1e6
    del outs
    return t


def _torch_events(q_shape, dtype, causal, iters=10):
    """torch SDPA on its own random inputs: seconds per call, timed with CUDA
    events over `iters` queued calls (None without torch)."""
    return gpu_timing.torch_sdpa_seconds(q_shape, dtype, causal, iters)


SWEEP_SHAPES = {128: ((1, 16, 16384, 128), (2, 16, 4096, 128), (1, 16, 8192, 128)),
                64: ((1, 16, 16384, 64), (2, 16, 4096, 64), (4, 16, 2048, 64), (4, 16, 1024, 64))}


def sweep(D, dtype, knob_sets, shapes=None, iters=10):
    """Forward timings of the warp-specialised kernel under each knob set (a
    label: knobs dict, as _set_ws_knobs takes), beside mx.fast and torch SDPA,
    at the issue-14 shapes of head dim D: per call with one eval each (as
    mlx_flash.bench.cuda times) and with `iters` calls queued in one eval
    (kernel throughput); torch with CUDA events. Inputs from mx.random (the
    speed does not depend on the values, only on their not being zeros)."""
    rows = []
    for (B, H, N, _) in shapes or SWEEP_SHAPES[D]:
        for causal in (False, True):
            q, k, v = (mx.random.normal((B, H, N, D)).astype(dtype) for _ in range(3))
            mx.eval(q, k, v)
            s = D ** -0.5
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            res, build_us = {}, {}
            for label, knobs in knob_sets.items():
                if "keys" in knobs and (causal or D not in (64, 128)):
                    continue  # the dense D = 64 / 128 key tiles only
                saved = _set_ws_knobs(D, knobs)
                try:
                    fn = lambda: mlx_flash.flash_attention(q, k, v, causal=causal, scale=s)
                    res[label] = (time_fn(fn, iters), _time_queued(fn, iters))
                    if label == "ws":
                        build_us[label] = _build_us(fn)
                except Exception as e:  # noqa: BLE001 (a variant that fails to build or launch)
                    print(f"{label} failed: {e}")
                finally:
                    _set_ws_knobs(D, saved)
            fast = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask="causal" if causal else None)
            res["mx.fast"] = (time_fn(fast, iters), _time_queued(fast, iters))
            build_us["mx.fast"] = _build_us(fast)
            t = _torch_events((B, H, N, D), dtype, causal, iters)
            if t is not None:
                res["torch"] = (t, t)
            row = dict(dtype=str(dtype), shape=[B, H, N, D], causal=causal,
                       **{f"{k}_ms": v[0] * 1e3 for k, v in res.items()},
                       **{f"{k}_queued_ms": v[1] * 1e3 for k, v in res.items()},
                       **{f"{k}_tflops": flops / v[0] / 1e12 for k, v in res.items()},
                       **{f"{k}_queued_tflops": flops / v[1] / 1e12 for k, v in res.items()},
                       **{f"{k}_graph_build_us": v for k, v in build_us.items()})
            rows.append(row)
            print(f"{str(dtype).split('.')[-1]} {[B, H, N, D]} causal={int(causal)}: " + ", ".join(
                f"{k} {flops / v[0] / 1e12:.0f}/{flops / v[1] / 1e12:.0f}" for k, v in res.items()) +
                "  (TF/s per-call-eval/queued); graph build us " +
                ", ".join(f"{k} {v:.0f}" for k, v in build_us.items()), flush=True)
    return rows


def sweep_plan():
    """SWEEP_PLAN="D:f16|bf16:label=knob~value/knob~value,label2=...;..." as
    {(D, dtype name): {label: knobs}} (knobs: persistent, dynamic, enabled, early, turns (0/1), stages, keys,
    group (a count or auto); "ws=" is the default)."""
    plan = {}
    for entry in filter(None, os.environ.get("SWEEP_PLAN", "").split(";")):
        d, dt, sets = entry.split(":")
        knob_sets = {}
        for spec in sets.split(","):
            label, _, kv = spec.partition("=")
            knobs = {}
            for item in filter(None, kv.split("/")):
                key, _, val = item.partition("~")
                if key == "group":
                    knobs[key] = None if val == "auto" else int(val)
                else:
                    knobs[key] = (val == "1" if key in ("persistent", "dynamic", "enabled", "early", "turns")
                                  else val if key == "wg3" else int(val))
            knob_sets[label] = knobs
        plan[(int(d), dt)] = knob_sets
    return plan


def build_share(index, count):
    """Builds share `index` of `count` of the distinct kernels SWEEP_PLAN times
    (tiny calls), so parallel processes fill MLX's on-disk kernel cache."""
    jobs, seen = [], set()
    for (D, dt), knob_sets in sweep_plan().items():
        for causal in (False, True):
            for label, knobs in knob_sets.items():
                if "keys" in knobs and (causal or D not in (64, 128)):
                    continue
                saved = _set_ws_knobs(D, knobs)
                spec_key = (D, dt, causal, ws._ENABLED, ws.STAGES[D], (ws.KEYS_DENSE_D128 if D == 128 else ws.KEYS_DENSE_D64) if not causal else 0,
                            ws.EXP2_POLY.get(D, 0), ws.WG3_D64, ws.CHAINS_D128, ws.RESCALE_EARLY, ws.TURNS_CONTINUOUS)
                _set_ws_knobs(D, saved)
                if spec_key not in seen:
                    seen.add(spec_key)
                    jobs.append((D, dt, causal, label, knobs))
    for D, dt, causal, label, knobs in jobs[index::count]:
        q, k, v = (mx.random.normal((1, 2, 200, D)).astype(_DTYPES[dt]) for _ in range(3))
        saved = _set_ws_knobs(D, knobs)
        t0 = time.perf_counter()
        try:
            mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))
            print(f"built {dt} D{D} causal={int(causal)} {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"build {dt} D{D} causal={int(causal)} {label} failed: {e}", flush=True)
        finally:
            _set_ws_knobs(D, saved)
    print(f"build {index}/{count}: {len(jobs[index::count])} of {len(jobs)}")


_READ_BACK = []  # workspaces read on the host (see trace)

# cuda_fwd_ws's trace slots (the kernel's WsTrace), u64 each after the tensor maps.
_TRACE_SLOTS = ("sm", "entry_ns", "entry", "setup", "q", "loop_end", "epilogue_end", "epilogue_end_ns", "exit",
                "exit_ns", "items")


def trace(B, H, N, D, causal, dtype, persistent, out_dir):
    """One traced call of the warp-specialised forward: where a block's time
    goes (setup, Q wait, main loop, epilogue of its first item, in us at the
    SM clock) and how busy the SMs stay (block spans over the kernel's span)."""
    import numpy as np

    causal = bool(causal)
    q, k, v = (mx.random.normal((B, H, N, D)).astype(dtype) for _ in range(3))
    mx.eval(q, k, v)
    saved = _set_ws_knobs(D, {"persistent": bool(persistent)})
    try:
        mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))  # warm
        ws.TRACE = []
        mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))
        work = ws.TRACE[-1]
        mx.eval(work)
    finally:
        ws.TRACE = None
        _set_ws_knobs(D, saved)
    raw = np.array(work).view(np.uint64).reshape(-1, ws.SLOT_BYTES // 8)[:, ws.TMAP_BYTES // 8:]
    # Reading it moved its pages to the host (MLX's memory is managed); kept
    # alive, it cannot come back from MLX's cache as a later call's output,
    # whose first GPU writes would fault the pages back. The first H200 run
    # read them and freed them: its persistent traces, taken next, show every
    # block stalled ~110 us in its first epilogue until one common instant,
    # and the freed workspace had exactly the size of the next lse output.
    _READ_BACK.append(work)
    tr = {name: raw[:, i].astype(np.float64) for i, name in enumerate(_TRACE_SLOTS)}
    t0 = tr["entry_ns"].min()
    span_us = (tr["exit_ns"].max() - t0) / 1e3
    ghz = np.median((tr["exit"] - tr["entry"]) / np.maximum(tr["exit_ns"] - tr["entry_ns"], 1))
    us = lambda a, b: (tr[b] - tr[a]) / ghz / 1e3
    parts = {"setup": us("entry", "setup"), "q_wait": us("setup", "q"), "main_loop": us("q", "loop_end"),
             "epilogue": us("loop_end", "epilogue_end"), "block": us("entry", "exit")}
    sms = tr["sm"].astype(int)
    busy = np.bincount(sms, weights=(tr["exit_ns"] - tr["entry_ns"]) / 1e3) / span_us
    busy = busy[np.bincount(sms) > 0]
    first_wave = np.sort(tr["entry_ns"] - t0)[:min(len(sms), 132)] / 1e3
    summary = dict(shape=[B, H, N, D], causal=causal, dtype=str(dtype), persistent=bool(persistent),
                   blocks=int(len(sms)), sms=int(len(busy)), span_us=span_us, sm_ghz=float(ghz),
                   sm_busy_mean=float(busy.mean()), sm_busy_min=float(busy.min()),
                   first_wave_entry_us_max=float(first_wave.max()),
                   **{f"{k}_us_mean": float(v.mean()) for k, v in parts.items()},
                   **{f"{k}_us_max": float(v.max()) for k, v in parts.items()})
    print("trace " + json.dumps(summary), flush=True)
    np.save(os.path.join(out_dir, f"trace_{B}x{H}x{N}x{D}_{'causal' if causal else 'dense'}_"
                                  f"{'p' if persistent else 'g'}.npy"), raw)
    return summary


def probe(B, H, N, D, causal, dtype):
    causal = bool(causal)
    """One call of the routed forward (for ncu: one launch per probe)."""
    q, k, v = (mx.random.normal((B, H, N, D)).astype(dtype) for _ in range(3))
    mx.eval(q, k, v)
    mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))
    mx.synchronize()


# label: (use wgmma, stages, key tile)
VARIANTS = {"wg3": (True, 3, 128), "wg2": (True, 2, 128), "mma": (False, 3, 128)}


def correctness_bwd(dims=(64, 128), dtypes=(mx.float16, mx.bfloat16), label="bwd "):
    """dq, dk, dv of the Hopper backward against float64 (the suite's tolerance)."""
    shapes = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 2, 2, 129, 300)]
    passed = failed = 0
    for D in dims:
        for dtype in dtypes:
            for si, (B, Hq, Hkv, Nq, Nk) in enumerate(shapes):
                for name, build in FEATURES.items():
                    if si > 1 and name not in ("none", "causal", "combined_everything", "block_sparse", "softcap"):
                        continue
                    gen = rng("wgmma-bwd", D, str(dtype), si, name)
                    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
                    try:
                        options = build(gen, B, Hq, Nq, Nk)
                        dout = randn(gen, (B, Hq, Nq, D), dtype)
                        _, grads = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)],
                                          [q, k, v], [dout])
                        mx.eval(grads)
                        want = attention_np(q, k, v, dout=dout, **options)
                        plain = plain_errors(q, k, v, dout, options, dtype)
                        errs = [check_close(n, to_np(g), want, dtype, plain) for n, g in zip(("dq", "dk", "dv"), grads)]
                        passed += 1
                        print(f"ok   {label}D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name}: " +
                              " ".join(f"{n} {e:.2e} (plain {plain[n]:.2e})" for n, e in zip(("dq", "dk", "dv"), errs)))
                    except Exception as e:  # noqa: BLE001
                        failed += 1
                        print(f"FAIL {label}D{D} {dtype} {(B, Hq, Hkv, Nq, Nk)} {name}: {e}")
                        if failed < 3:
                            traceback.print_exc()
    print(f"correctness {label}: {passed} passed, {failed} failed")
    return passed, failed


def speed_bwd():
    rows = []
    for dtype in (mx.float16, mx.bfloat16):
        for (B, H, N, D) in [(4, 16, 1024, 64), (2, 16, 4096, 128), (1, 16, 8192, 128), (1, 16, 16384, 128)]:
            for causal in (False, True):
                gen = rng("speed-bwd", B, H, N, D)
                q, k, v = qkv(gen, B, H, H, N, N, D, dtype=dtype)
                mx.eval(q, k, v)
                s = D ** -0.5
                ours = mx.grad(lambda a, b, c: mx.sum(mlx_flash.flash_attention(a, b, c, causal=causal, scale=s)
                                                      .astype(mx.float32)), argnums=(0, 1, 2))
                fast = mx.grad(lambda a, b, c: mx.sum(mx.fast.scaled_dot_product_attention(
                    a, b, c, scale=s, mask="causal" if causal else None).astype(mx.float32)), argnums=(0, 1, 2))
                res = {}
                for label, bwd in (("wg_bwd", True), ("mma_bwd", False)):
                    cb._WGMMA_BWD = bwd
                    res[label] = time_fn(lambda: ours(q, k, v), iters=10)
                cb._WGMMA_BWD = True
                res["mx.fast"] = time_fn(lambda: fast(q, k, v), iters=10)
                flops = 3.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                row = dict(dtype=str(dtype), shape=[B, H, N, D], causal=causal,
                           **{f"{k}_ms": v * 1e3 for k, v in res.items()},
                           **{f"{k}_tflops": flops / v / 1e12 for k, v in res.items()},
                           **{f"ratio_{k}": res["mx.fast"] / v for k, v in res.items() if k != "mx.fast"})
                rows.append(row)
                print(f"fwd+bwd {row['dtype']} {row['shape']} causal={causal}: " + ", ".join(
                    f"{k} {res[k] * 1e3:.3f} ms ({row[k + '_tflops']:.0f} TF/s" +
                    (f", {row['ratio_' + k]:.2f}x)" if k != "mx.fast" else ")") for k in res))
    return rows


def time_fn(fn, iters=20):
    """Seconds per call, one call per eval after warm-ups."""
    return gpu_timing.mlx_seconds(fn, iters)


def speed():
    rows = []
    for dtype in (mx.float16, mx.bfloat16):
        for (B, H, N, D) in [(4, 16, 1024, 64), (2, 16, 4096, 128), (1, 16, 8192, 128), (1, 16, 16384, 128)]:
            for causal in (False, True):
                gen = rng("speed", B, H, N, D)
                q, k, v = qkv(gen, B, H, H, N, N, D, dtype=dtype)
                mx.eval(q, k, v)
                s = D ** -0.5
                res = {}
                for label, (wg, stages, bn) in VARIANTS.items():
                    cb._WGMMA, cb._WGMMA_STAGES, cb._WGMMA_BN = wg, stages, bn
                    res[label] = time_fn(lambda: mlx_flash.flash_attention(q, k, v, causal=causal, scale=s))
                cb._WGMMA, cb._WGMMA_STAGES, cb._WGMMA_BN = True, 3, 128
                res["mx.fast"] = time_fn(lambda: mx.fast.scaled_dot_product_attention(
                    q, k, v, scale=s, mask="causal" if causal else None))
                flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                row = dict(dtype=str(dtype), shape=[B, H, N, D], causal=causal,
                           **{f"{k}_ms": v * 1e3 for k, v in res.items()},
                           **{f"{k}_tflops": flops / v / 1e12 for k, v in res.items()},
                           **{f"ratio_{k}": res["mx.fast"] / v for k, v in res.items() if k != "mx.fast"})
                rows.append(row)
                print(f"{row['dtype']} {row['shape']} causal={causal}: " + ", ".join(
                    f"{k} {res[k] * 1e3:.3f} ms ({row[k + '_tflops']:.0f} TF/s" +
                    (f", {row['ratio_' + k]:.2f}x)" if k != "mx.fast" else ")") for k in res))
    return rows


def speed_anchor(B=2, H=16, N=4096, D=128, iters=30):
    """One anchor shape, fp16, causal and not: forward (wgmma, mma.sync) and
    forward + backward (wgmma, mma.sync backward), and mx.fast; the quick
    before/after timing of a kernel change (run it against both trees)."""
    rows = []
    dtype = mx.float16
    gen = rng("speed-anchor", B, H, N, D)
    q, k, v = qkv(gen, B, H, H, N, N, D, dtype=dtype)
    mx.eval(q, k, v)
    s = D ** -0.5
    for causal in (False, True):
        res = {}
        for label, wg in (("fwd_wg", True), ("fwd_mma", False)):
            cb._WGMMA = wg
            res[label] = time_fn(lambda: mlx_flash.flash_attention(q, k, v, causal=causal, scale=s), iters=iters)
        cb._WGMMA = True
        grad = mx.grad(lambda a, b, c: mx.sum(mlx_flash.flash_attention(a, b, c, causal=causal, scale=s)
                                              .astype(mx.float32)), argnums=(0, 1, 2))
        for label, bwd in (("fwdbwd_wg", True), ("fwdbwd_mma", False)):
            cb._WGMMA_BWD = bwd
            res[label] = time_fn(lambda: grad(q, k, v), iters=iters)
        cb._WGMMA_BWD = True
        res["fwd_mx.fast"] = time_fn(lambda: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=s, mask="causal" if causal else None), iters=iters)
        row = dict(dtype="float16", shape=[B, H, N, D], causal=causal, **{f"{k}_ms": v * 1e3 for k, v in res.items()})
        rows.append(row)
        print(f"anchor {[B, H, N, D]} causal={causal}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in res.items()))
    return rows


def prewarm(index, count):
    """Builds share `index` of `count` of the kernels the ws parts use (every
    speed_ws variant, fp16/bf16, D 64/128, causal or not, and the wgmma kernel
    beside it) on a tiny call, so parallel processes fill MLX's on-disk kernel
    cache (MLX_PTX_CACHE_DIR) before the timed runs."""
    jobs = []
    for dtype in (mx.float16, mx.bfloat16):
        for D in (128, 64):
            for causal in (False, True):
                for label, knobs in _ws_variants(D, causal, dtype):
                    if label != "ws_grid":  # the same kernel as "ws"
                        jobs.append((dtype, D, causal, label, knobs))
    done = 0
    for dtype, D, causal, label, knobs in jobs[index::count]:
        gen = rng("prewarm", D)
        q, k, v = qkv(gen, 1, 2, 2, 200, 200, D, dtype=dtype)
        saved = _set_ws_knobs(D, knobs)
        try:
            mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))
            done += 1
            print(f"prewarm {dtype} D{D} causal={causal} {label}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"prewarm {dtype} D{D} causal={causal} {label} failed: {e}")
        finally:
            _set_ws_knobs(D, saved)
    print(f"prewarm {index}/{count}: {done} of {len(jobs[index::count])} built")


_DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16}
_WS_SPEED_SHAPES = {128: ((1, 16, 16384, 128), (2, 16, 4096, 128), (1, 16, 8192, 128)),
                    64: ((1, 16, 16384, 64), (2, 16, 4096, 64), (4, 16, 1024, 64))}


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    parts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fwd", "bwd", "speed", "speed_bwd"]
    print("hopper:", cb._is_hopper(), mx.device_info(mx.gpu).get("device_name", ""))
    # Exercise every case the warp-specialised kernel can serve (bf16, D = 64 too),
    # whatever MLX_FLASH_CUDA_FWD_WS says (it is opt-in; the "wg3" variant and the
    # comparisons switch it off explicitly).
    ws._ENABLED = True
    ws.CHECKED_ONLY = False
    result = {"device": mx.device_info(mx.gpu).get("device_name", "")}
    passed = failed = 0
    path = os.path.join(out_dir, "wgmma_check.json")

    def save():
        result.update(passed=passed, failed=failed)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    # Parts run in the order given, the JSON saved after each (a job cut short
    # keeps what finished): ws:D:f16|bf16[:k128][:s3][:np][:polyN][:nocmp] (served features; k128 / s3 /
    # polyN: EXP2_POLY N; np: 128-key tiles / three stages / one block per item instead of the defaults; nocmp:
    # against float64 only, not the wgmma kernel), ws_routes (every
    # other feature stays off the kernel), speed_ws:D:f16|bf16[:N] (first N shapes).
    for part in parts:
        name, *args = part.split(":")
        t0 = time.perf_counter()
        if name == "ws":
            D = int(args[0])
            knobs = {}
            if "k128" in args:
                knobs["keys"] = 128
            if "s3" in args:
                knobs["stages"] = 3
            if "np" in args:
                knobs["persistent"] = False
            for a in args:
                if a.startswith("poly"):
                    knobs["poly"] = int(a[4:])
            if "wg3" in args:
                knobs["wg3"] = "1"
            if "wg2" in args:
                knobs["wg3"] = "0"
            saved = _set_ws_knobs(D, knobs)
            try:
                p0, f0 = correctness_ws(dims=(D,), dtypes=(_DTYPES[args[1]],), compare="nocmp" not in args)
            finally:
                _set_ws_knobs(D, saved)
            passed, failed = passed + p0, failed + f0
        elif name == "sweep":  # sweep:D:f16|bf16[:i.j.k] (its plan from SWEEP_PLAN; optionally SWEEP_SHAPES[D][i], [j], [k])
            D, dt = int(args[0]), args[1]
            shapes = [SWEEP_SHAPES[D][int(i)] for i in args[2].split(".")] if len(args) > 2 else None
            result.setdefault("sweep", []).extend(sweep(D, _DTYPES[dt], sweep_plan()[(D, dt)], shapes=shapes))
        elif name == "build":  # build:i:n: share i of n of the kernels SWEEP_PLAN times
            build_share(int(args[0]), int(args[1]))
        elif name == "trace":  # trace:B:H:N:D:causal:f16|bf16:persistent(0/1)
            result.setdefault("trace", []).append(
                trace(*(int(a) for a in args[:5]), _DTYPES[args[5]], int(args[6]), out_dir))
        elif name == "probe":  # probe:B:H:N:D:causal:f16|bf16
            probe(*(int(a) for a in args[:5]), _DTYPES[args[5]])
        elif name == "prewarm":
            prewarm(int(args[0]), int(args[1]))
        elif name == "ws_routes":
            p0, f0 = correctness_ws(dims=(128,), dtypes=(mx.float16,), features=None, shapes=WS_SHAPES[:1])
            passed, failed = passed + p0, failed + f0
        elif name == "speed_ws":
            shapes = _WS_SPEED_SHAPES[int(args[0])][:int(args[2]) if len(args) > 2 else None]
            result.setdefault("speed_ws", []).extend(speed_ws(shapes=shapes, dtypes=(_DTYPES[args[1]],)))
        elif name == "fwd":
            p1, f1 = correctness(label="stages3 ")
            cb._WGMMA_STAGES = 2
            p2, f2 = correctness(dims=(128,), dtypes=(mx.float16,), label="stages2 ")
            cb._WGMMA_STAGES = 3
            passed, failed = passed + p1 + p2, failed + f1 + f2
        elif name == "bwd":
            p3, f3 = correctness_bwd(dims=(128,), dtypes=(mx.float16,))
            p4, f4 = correctness_bwd(dims=(64,), dtypes=(mx.bfloat16,))
            passed, failed = passed + p3 + p4, failed + f3 + f4
        elif name == "speed_anchor":
            result["speed_anchor"] = speed_anchor()
        elif name in ("speed", "speed_bwd"):
            if failed == 0 or os.environ.get("FORCE_SPEED"):
                result[name] = speed() if name == "speed" else speed_bwd()
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"[part {part}: {time.perf_counter() - t0:.1f} s]", flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
