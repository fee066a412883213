"""Launch-plan variants of the quantized decode kernel side by side (GPU machine).

    python tools/cuda_decode_sweep.py OUT_DIR
    ncu ... python tools/cuda_decode_sweep.py OUT_DIR --only NAME_BITS   # 3 calls of one variant, for a profiler

The decode step of issue 16 (B 1, GQA 32:8, 1 query, Nk 32768, D 128, fp16
q, 4- and 8-bit group 64): mx.fast SDPA over the fp16 cache, then
attention_quant_decode under cuda_quant.TUNING variants (splits, warps,
blocks per SM, ticket pool; the shared-memory ring's were removed with it). Per
variant: per-call times as tools/cuda_decode_profile.py takes them and the
largest difference from mx.fast over the dequantized cache. Every result is
written to OUT_DIR/decode_sweep.json as it comes (a killed run keeps them).
"""

from __future__ import annotations

import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_decode_profile as prof  # noqa: E402

import mlx_flash  # noqa: E402
import mlx_flash.attention_quantized  # noqa: E402,F401
from mlx_flash.backends import cuda_quant as cq  # noqa: E402

# (name, bits, TUNING): the routed default first, then what it is measured against.
VARIANTS = [
    ("default", 4, {}),
    ("default", 8, {}),
    ("main_plan", 4, {"dec_pool": False, "dec_splits": 66}),
    ("regs_splits8", 4, {"dec_splits": 8}),
    ("regs_splits12", 4, {"dec_splits": 12}),
    ("regs_splits24", 4, {"dec_splits": 24}),
    ("regs_splits33", 4, {"dec_splits": 33}),
    ("regs_splits33", 8, {"dec_splits": 33}),
    ("regs_splits24", 8, {"dec_splits": 24}),
    ("regs_w2_splits33", 4, {"dec_warps": 2, "dec_splits": 33}),
]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out_dir, exist_ok=True)
    q, k, v, quant, s = prof.setup()
    res = {"card": mx.device_info().get("device_name", "?"), "shape": "B1 GQA 32:8 Nq 1 Nk 32768 D128 fp16",
           "calls": {}}
    rounds = 5
    if "--only" in sys.argv:
        want = sys.argv[sys.argv.index("--only") + 1]
        for name, bits, tuning in VARIANTS:
            if f"{name}_{bits}bit" == want:
                kq, vq = quant[bits]
                cq.TUNING.update(tuning)
                fn = lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=64, scale=s)  # noqa: E731
                for _ in range(3):
                    mx.eval(fn())
                mx.synchronize()
                if "--time" in sys.argv:  # one line: per-call times and the difference from mx.fast
                    kd = mx.dequantize(*kq, group_size=64, bits=bits)
                    vd = mx.dequantize(*vq, group_size=64, bits=bits)
                    want_out = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=s).astype(mx.float32)
                    err = mx.max(mx.abs(fn().astype(mx.float32) - want_out)).item()
                    print(want, dict(prof.per_call(fn, rounds=5), max_diff=err), flush=True)
                return
        raise SystemExit(f"--only: no variant {want}")
    res["calls"]["mx_fast_fp16"] = prof.per_call(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s),
                                                 rounds=rounds)
    print("mx_fast_fp16", res["calls"]["mx_fast_fp16"], flush=True)
    wants = {}
    for bits, (kq, vq) in quant.items():
        kd = mx.dequantize(*kq, group_size=64, bits=bits)
        vd = mx.dequantize(*vq, group_size=64, bits=bits)
        wants[bits] = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=s).astype(mx.float32)
    mx.eval(wants)
    for name, bits, tuning in VARIANTS:
        kq, vq = quant[bits]
        fn = lambda kq=kq, vq=vq, bits=bits: mlx_flash.flash_attention_quantized(  # noqa: E731
            q, kq, vq, bits=bits, group_size=64, scale=s)
        cq.TUNING.clear()
        cq.TUNING.update(tuning)
        cq.decode_plan.cache_clear()
        key = f"{name}_{bits}bit"
        try:
            t0 = time.perf_counter()
            got = fn()
            mx.eval(got)
            first = time.perf_counter() - t0
            err = mx.max(mx.abs(got.astype(mx.float32) - wants[bits])).item()
            qspec = mlx_flash.attention_quantized.validate_attention_quantized(q, kq, vq, bits=bits, group_size=64)[0]
            r = dict(prof.per_call(fn, rounds=rounds), plan=list(cq.decode_plan(qspec)), max_diff=err,
                     first_call_s=first, tuning=tuning)
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            r = {"error": repr(e)[:300], "tuning": tuning}
        res["calls"][key] = r
        print(key, r, flush=True)
        with open(os.path.join(out_dir, "decode_sweep.json"), "w") as f:
            json.dump(res, f, indent=1)
    cq.TUNING.clear()
    cq.decode_plan.cache_clear()


if __name__ == "__main__":
    main()
