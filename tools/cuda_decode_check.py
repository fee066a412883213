"""GPU check of the CUDA decode path (run on the GPU machine, repo root on PYTHONPATH).

    python3 tools/cuda_decode_check.py OUT_DIR [--no-sweep | --sweep]
    python3 tools/cuda_decode_check.py OUT_DIR --emulate   # (a) only, on the CPU emulation (slow)

(a) Correctness: flash_attention / flash_attention_varlen on the CUDA backend
    against the float64 NumPy reference (tests/reference_np.py) for decode
    shapes and features, fp16/bf16/fp32, random inputs. One line per case,
    then PASS/FAIL totals. Tolerances as the test suite's: fp32 out 2e-5
    relative (to the sum of |p v|), lse 2e-6 relative; fp16/bf16 out within
    twice the error of the plain materialised computation in that dtype (at
    least 2 ulps of the dtype).
(b) Timing: mlx_flash vs mx.fast.scaled_dot_product_attention for decode
    shapes, as the latency of one call per eval and as the per-call time of
    32 calls (32 distinct K/V caches, like the layers of one decode step) in
    one eval; written to OUT_DIR/decode_timing.json.
(c) The decode kernel's tile variants (warps, keys per warp tile, pipeline
    stages) on two shapes, each checked then timed: skipped with --no-sweep,
    or when (a) and (b) took over 120 s (NVRTC compiles every kernel variant
    on first use) unless --sweep.

--emulate runs (a) without a GPU through tests/cuda_emu (the kernels as C++
on the CPU; a dry run of this script and of the kernels' logic, not of speed).

Everything printed also goes to OUT_DIR/decode_check.log. Exit status 1 if
any case failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_flash  # noqa: E402
from helpers import FP32_TOL, reference_error, rel_error  # noqa: E402
from mlx_flash import reference  # noqa: E402
from mlx_flash._spec import validate_attention  # noqa: E402
from mlx_flash.backends import cuda as cb  # noqa: E402
from reference_np import attention_np, attention_varlen_np  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "."
SWEEP = "--no-sweep" not in sys.argv
EMULATE = "--emulate" in sys.argv
STREAM = mx.cpu if EMULATE else mx.gpu
os.makedirs(OUT, exist_ok=True)
_LOG = open(os.path.join(OUT, "decode_check.log"), "w")
T0 = time.perf_counter()


def say(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    _LOG.write(line + "\n")
    _LOG.flush()


F16, B16, F32 = mx.float16, mx.bfloat16, mx.float32
EPS = {F16: 2.0**-10, B16: 2.0**-7}


def np64(x):
    if isinstance(x, mx.array):
        return np.array(x) if x.dtype == mx.bool_ else np.array(x.astype(F32)).astype(np.float64)
    return x


def reference_grouped(q, k, v, **options):
    """attention_np one KV head at a time (it repeats K/V over the group: at
    Nk = 32768 the whole call would need gigabytes of float64)."""
    q, k, v = np64(q), np64(k), np64(v)
    options = {key: np64(val) for key, val in options.items()}
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    parts = []
    for hk in range(Hkv):
        hs = slice(hk * G, (hk + 1) * G)
        o = dict(options)
        if o.get("alibi_slopes") is not None:
            o["alibi_slopes"] = o["alibi_slopes"][..., hs]
        if o.get("sinks") is not None:
            o["sinks"] = o["sinks"][hs]
        for name in ("mask", "block_mask"):
            m = o.get(name)
            if m is not None and m.ndim == 4 and m.shape[1] > 1:
                o[name] = m[:, hs]
        parts.append(attention_np(q[:, hs], k[:, hk:hk + 1], v[:, hk:hk + 1], **o))
    return {key: np.concatenate([p[key] for p in parts], axis=1) for key in ("out", "lse", "mag_out")}


def path_of(spec):
    """Which forward kernel the CUDA backend runs for this call."""
    if cb._uses_mma(spec):
        return "mma"
    if spec.dtype != F32 and spec.head_dim_qk % 8 == 0 and spec.head_dim_v % 8 == 0:
        nw, bn, stages, _, _, splits = cb.decode_plan(spec)
        return f"decode(nw={nw},bn={bn},st={stages},splits={splits})"
    return "simt"


RESULTS = {"pass": 0, "fail": 0, "failed": []}


def report(name, ok, text):
    RESULTS["pass" if ok else "fail"] += 1
    if not ok:
        RESULTS["failed"].append(name)
    say(f"{'PASS' if ok else 'FAIL'} {name}: {text}")


def randn(gen, shape, dtype):
    return mx.array(gen.standard_normal(shape).astype(np.float32)).astype(dtype)


def check_dense(name, B, Hq, Hkv, Nq, Nk, D, dtype, options=None, Dv=None, seed=0):
    t = time.perf_counter()
    gen = np.random.default_rng([seed, B, Hq, Hkv, Nq, Nk, D, len(name)])
    Dv = Dv or D
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    options = options(gen, B, Hq, Nq, Nk) if callable(options) else dict(options or {})
    label = f"{name} {(B, Hq, Hkv, Nq, Nk, D, Dv)} {str(dtype).split('.')[-1]}"
    try:
        spec, inputs = validate_attention(q, k, v, **options)
        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, stream=STREAM, **options)
        mx.eval(out, lse)
        want = reference_grouped(q, k, v, **options)
        e_out = reference_error("out", np.array(out.astype(F32)), want)
        e_lse = rel_error(np.array(lse), want["lse"])
        if dtype == F32:
            tol = FP32_TOL["out"]
        else:
            plain, _ = reference.attention_dense(q, k, v, spec, inputs, dtype=dtype)
            e_plain = reference_error("out", np.array(plain.astype(F32)), want)
            tol = max(2 * e_plain, 2 * EPS[dtype])
        ok = e_out <= tol and e_lse <= FP32_TOL["lse"] and out.dtype == dtype
        report(label, ok, f"out {e_out:.2e} (tol {tol:.2e}) lse {e_lse:.2e} [{path_of(spec)}] "
                          f"{time.perf_counter() - t:.1f}s")
    except Exception as e:  # noqa: BLE001 - a crash is a failed case, the others still run
        report(label, False, f"{type(e).__name__}: {str(e)[:300]}")


def check_varlen(name, lengths, Hq, Hkv, D, dtype, options=None, seed=0):
    t = time.perf_counter()
    gen = np.random.default_rng([seed, Hq, Hkv, D, len(name), len(lengths)])
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    q = randn(gen, (int(cu_q[-1]), Hq, D), dtype)
    k = randn(gen, (int(cu_k[-1]), Hkv, D), dtype)
    v = randn(gen, (int(cu_k[-1]), Hkv, D), dtype)
    options = options(gen, len(lengths), Hq) if callable(options) else dict(options or {})
    label = f"varlen {name} {lengths} Hq={Hq} Hkv={Hkv} D={D} {str(dtype).split('.')[-1]}"
    path = "mma" if dtype != F32 and max(a for a, _ in lengths) * Hq // Hkv > 16 else "decode/simt"
    try:
        out, lse = mlx_flash.flash_attention_varlen(q, k, v, mx.array(cu_q), mx.array(cu_k), return_lse=True,
                                                    stream=STREAM, **options)
        mx.eval(out, lse)
        want = attention_varlen_np(q, k, v, cu_q, cu_k, **options)
        e_out = reference_error("out", np.array(out.astype(F32)), want)
        e_lse = rel_error(np.array(lse), want["lse"])
        # No per-sequence plain computation here: the dtype's floor (2 ulps) is the yardstick.
        tol = FP32_TOL["out"] if dtype == F32 else 2 * EPS[dtype]
        ok = e_out <= tol and e_lse <= FP32_TOL["lse"]
        report(label, ok, f"out {e_out:.2e} (tol {tol:.2e}) lse {e_lse:.2e} [{path}] {time.perf_counter() - t:.1f}s")
    except Exception as e:  # noqa: BLE001
        report(label, False, f"{type(e).__name__}: {str(e)[:300]}")


# ---------------------------------------------------------------------------
# Feature builders: (gen, B, H, Nq, Nk) -> options.

def bool_mask(gen, B, H, Nq, Nk):
    return {"mask": mx.array(gen.random((Nq, Nk)) < 0.7)}


def bool_mask_per_head(gen, B, H, Nq, Nk):
    return {"mask": mx.array(gen.random((B, H, Nq, Nk)) < 0.7)}


def additive_mask_inf(gen, B, H, Nq, Nk):
    m = gen.standard_normal((B, 1, Nq, Nk)).astype(np.float32)
    m[gen.random(m.shape) < 0.3] = -np.inf
    return {"mask": mx.array(m)}


def additive_mask_f16(gen, B, H, Nq, Nk):
    return {"mask": mx.array(gen.standard_normal((Nq, Nk)).astype(np.float32)).astype(F16)}


def block_mask(gen, B, H, Nq, Nk):
    bq, bk = 16, 64
    return {"block_mask": mx.array(gen.random((1, H, -(-Nq // bq), -(-Nk // bk))) < 0.6), "block_size": (bq, bk)}


def sinks(gen, B, H, Nq, Nk):
    return {"sinks": randn(gen, (H,), F32)}


def alibi(gen, B, H, Nq, Nk):
    return {"alibi_slopes": mx.array(2.0 ** (-8.0 * (np.arange(H) + 1) / H), F32)}


def masked_rows_sinks(gen, B, H, Nq, Nk):
    keep = gen.random((B, H, Nq, Nk)) < 0.5
    keep[:, 1] = False
    keep[:, 2, -1] = False
    return {"mask": mx.array(keep), "sinks": randn(gen, (H,), F32)}


def masked_rows(gen, B, H, Nq, Nk):
    return {"mask": masked_rows_sinks(gen, B, H, Nq, Nk)["mask"]}


def everything(gen, B, H, Nq, Nk):
    return {"causal": True, "softcap": 5.0, **alibi(gen, B, H, Nq, Nk), **sinks(gen, B, H, Nq, Nk),
            **bool_mask_per_head(gen, B, H, Nq, Nk), **block_mask(gen, B, H, Nq, Nk)}


def correctness():
    say("== correctness")
    # Plain decode over key counts (one key, below a tile, odd, many splits).
    for Nk in (1, 17, 113, 1023, 4103, 32768):
        check_dense("plain", 1, 32, 4, 1, Nk, 128, F16)
    for Nk in (17, 4103, 32768):
        check_dense("plain", 1, 32, 4, 1, Nk, 128, B16)
    for Nk in (113, 4103):
        check_dense("plain", 1, 32, 4, 1, Nk, 128, F32)
    # Query rows per KV head, group sizes, head dims, Dv != D, batch > 1.
    check_dense("nq2", 2, 32, 4, 2, 1023, 128, F16)
    check_dense("nq2", 2, 32, 4, 2, 4103, 128, B16)
    check_dense("nq3 (mma path)", 1, 32, 4, 3, 1023, 128, F16)
    check_dense("mha nq3", 2, 8, 8, 3, 1023, 128, B16)
    check_dense("mha", 1, 8, 8, 1, 4103, 256, F16)
    check_dense("mha nq3", 1, 8, 8, 3, 1023, 256, B16)
    check_dense("mqa", 1, 16, 1, 1, 32768, 64, F16)
    check_dense("mqa", 1, 16, 1, 1, 4103, 64, B16)
    check_dense("d40", 1, 32, 4, 1, 4103, 40, F16)
    check_dense("d40 nq2", 1, 8, 8, 2, 1023, 40, B16)
    check_dense("dv64", 1, 32, 4, 1, 1023, 128, F16, Dv=64)
    check_dense("d36 (simt fallback)", 1, 8, 8, 1, 1023, 36, F16)
    check_dense("batch4", 4, 32, 8, 1, 4096, 128, F16)
    check_dense("fp32 nq3", 1, 8, 8, 3, 1023, 64, F32)
    check_dense("fp32 mqa d40", 1, 16, 1, 1, 4103, 40, F32)
    check_dense("fp32 dv7", 1, 8, 8, 1, 1023, 33, F32, Dv=7)
    # Features.
    check_dense("causal", 2, 8, 8, 3, 4103, 64, F16, {"causal": True})
    check_dense("causal", 1, 32, 4, 2, 4103, 128, B16, {"causal": True})
    check_dense("window(1000,0)", 1, 32, 4, 2, 4103, 128, F16, {"window": (1000, 0)})
    check_dense("window(2048,0)", 1, 32, 4, 1, 32768, 128, F16, {"window": (2048, 0)})
    check_dense("window(300,2)", 1, 8, 8, 3, 4103, 64, B16, {"window": (300, 2)})
    check_dense("softcap", 1, 32, 4, 1, 4103, 128, F16, {"softcap": 5.0})
    check_dense("alibi", 1, 32, 4, 2, 4103, 128, F16, alibi)
    check_dense("alibi per batch", 2, 8, 8, 1, 1023, 64, B16,
                lambda g, B, H, Nq, Nk: {"alibi_slopes": mx.array(g.uniform(0.01, 0.3, (B, H)), F32)})
    check_dense("bool mask", 1, 32, 4, 2, 4103, 128, F16, bool_mask)
    check_dense("bool mask per head", 1, 8, 8, 3, 4103, 64, B16, bool_mask_per_head)
    check_dense("additive mask -inf", 1, 32, 4, 1, 4103, 128, F16, additive_mask_inf)
    check_dense("additive mask fp16", 1, 16, 1, 1, 4103, 64, F16, additive_mask_f16)
    check_dense("block mask", 1, 32, 4, 2, 4103, 128, F16, block_mask)
    check_dense("sinks", 1, 32, 4, 1, 4103, 128, F16, sinks)
    check_dense("sinks", 1, 32, 4, 1, 32768, 128, B16, sinks)
    check_dense("fully masked rows", 1, 8, 8, 3, 1023, 64, F16, masked_rows)
    check_dense("fully masked rows + sinks", 1, 8, 8, 3, 1023, 64, F16, masked_rows_sinks)
    check_dense("fully masked rows + sinks", 1, 8, 8, 3, 1023, 64, F32, masked_rows_sinks)
    check_dense("everything", 1, 32, 4, 2, 4103, 128, F16, everything)
    check_dense("everything", 2, 8, 8, 3, 1023, 64, B16, everything)
    check_dense("everything", 1, 8, 8, 3, 1023, 64, F32, everything)
    # Varlen.
    # At most 2 query rows per sequence: 2 x 8 heads per KV head stay on the decode kernel.
    lengths = [(1, 4103), (0, 5), (2, 17), (1, 1), (2, 1023)]
    check_varlen("plain", lengths, 32, 4, 128, F16)
    check_varlen("causal+sinks+alibi", lengths, 32, 4, 128, F16,
                 lambda g, S, H: {"causal": True, "sinks": randn(g, (H,), F32),
                                  "alibi_slopes": mx.array(g.uniform(0.01, 0.1, (S, H)), F32)})
    check_varlen("window+softcap", lengths, 8, 8, 64, B16, {"window": (500, 0), "softcap": 4.0})
    check_varlen("plain", lengths, 16, 1, 64, F32)
    say(f"== correctness: {RESULTS['pass']} PASS, {RESULTS['fail']} FAIL ({time.perf_counter() - T0:.0f}s so far)")


# ---------------------------------------------------------------------------
# Timing.

def _time(fn, iters):
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def time_pair(make, layers=32, lat_iters=50, batch_iters=10):
    """(latency of one call per eval, per-call time of `layers` calls in one eval) in us."""
    sets = [make(i) for i in range(layers)]
    mx.eval(sets)
    res = {}
    for impl in ("mlx_flash", "mx.fast"):
        def one(s, impl=impl):
            q, k, v = s
            if impl == "mlx_flash":
                return mlx_flash.flash_attention(q, k, v, stream=STREAM)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, stream=STREAM)
        for _ in range(3):
            mx.eval([one(s) for s in sets])
        latency = _time(lambda: one(sets[0]), lat_iters)
        batched = _time(lambda: [one(s) for s in sets], batch_iters) / layers
        res[impl] = {"latency_us": round(latency, 1), "per_call_us_32": round(batched, 1)}
    del sets
    return res


TIMING_SHAPES = [
    ((1, 32, 4, 1, 32768, 128), F16), ((1, 32, 4, 1, 32768, 128), B16), ((1, 32, 8, 1, 8192, 128), F16),
    ((4, 32, 8, 1, 4096, 128), F16), ((1, 16, 16, 1, 16384, 64), F16),
]


def _maker(shape, dtype):
    B, Hq, Hkv, Nq, Nk, D = shape

    def make(i):
        key = mx.random.key(i)
        kq, kk, kv = mx.random.split(key, 3)
        return (mx.random.normal((B, Hq, Nq, D), key=kq).astype(dtype),
                mx.random.normal((B, Hkv, Nk, D), key=kk).astype(dtype),
                mx.random.normal((B, Hkv, Nk, D), key=kv).astype(dtype))
    return make


def timing():
    say("== timing (us): latency = one call per eval; per_call_32 = 32 calls (distinct K/V) per eval")
    res = {}
    for shape, dtype in TIMING_SHAPES:
        B, Hq, Hkv, Nq, Nk, D = shape
        name = f"{shape} {str(dtype).split('.')[-1]}"
        spec = validate_attention(*_maker(shape, dtype)(0))[0]
        r = time_pair(_maker(shape, dtype))
        kv_bytes = 2 * B * Hkv * Nk * D * 2
        r["path"] = path_of(spec)
        r["kv_MiB"] = kv_bytes / 2**20
        r["mlx_flash_GBps_per_call_32"] = round(kv_bytes / r["mlx_flash"]["per_call_us_32"] / 1e3, 1)
        res[name] = r
        say(name, json.dumps(r))
    return res


SWEEP_VARIANTS = [{}, {"stages": 2}, {"stages": 4}, {"nw": 2, "stages": 3}, {"nw": 2, "stages": 4},
                  {"bn": 32, "stages": 2}, {"nw": 8, "stages": 2}]


def sweep():
    say("== decode tile sweep (DECODE_TUNING; {} = the default choice)")
    res = {}
    for shape in ((1, 32, 4, 1, 32768, 128), (1, 16, 16, 1, 16384, 64)):
        for variant in SWEEP_VARIANTS:
            cb.DECODE_TUNING.clear()
            cb.DECODE_TUNING.update(variant)
            B, Hq, Hkv, Nq, Nk, D = shape
            before = RESULTS["fail"]
            check_dense(f"sweep {variant}", 1, Hq, Hkv, 1, 4103, D, F16)
            if RESULTS["fail"] > before:
                continue
            spec = validate_attention(*_maker(shape, F16)(0))[0]
            r = time_pair(_maker(shape, F16), lat_iters=20, batch_iters=5)
            r["path"] = path_of(spec)
            res[f"{shape} fp16 {json.dumps(variant)}"] = r
            say(f"{shape} fp16 {variant}", json.dumps(r))
    cb.DECODE_TUNING.clear()
    return res


def main():
    try:
        say("device:", mx.default_device(), json.dumps({k: str(v) for k, v in mx.device_info().items()}))
    except Exception:  # noqa: BLE001 - informational only
        say("device:", mx.default_device())
    if EMULATE:
        from cuda_emu import harness
        from mlx_flash import dispatch

        dispatch.backend_name = lambda stream: "cuda"
        with harness.patched_cuda_kernel():
            correctness()
        out = {}
    else:
        correctness()
        out = {"timing": timing()}
        elapsed = time.perf_counter() - T0
        if SWEEP and (elapsed < 120 or "--sweep" in sys.argv):
            out["sweep"] = sweep()
        elif SWEEP:
            say(f"== sweep skipped: {elapsed:.0f}s already spent (pass --sweep to force it)")
    out["results"] = RESULTS
    out["seconds"] = round(time.perf_counter() - T0, 1)
    with open(os.path.join(OUT, "decode_timing.json"), "w") as f:
        json.dump(out, f, indent=1)
    say(f"== total: {RESULTS['pass']} PASS, {RESULTS['fail']} FAIL in {out['seconds']}s")
    if RESULTS["failed"]:
        say("failed:\n  " + "\n  ".join(RESULTS["failed"]))
    sys.exit(1 if RESULTS["fail"] else 0)


if __name__ == "__main__":
    main()
