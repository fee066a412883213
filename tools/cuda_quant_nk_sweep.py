"""The quantized decode's kernel time against the number of keys, for Nsight Compute (GPU machine).

    ncu --clock-control none --metrics gpu__time_duration.sum -k regex:attention_quant_decode \\
        python tools/cuda_quant_nk_sweep.py 512,2048,8192,32768 16,49 [--plans JSON]

For each Nk and split count (TUNING dec_splits), fresh 4-bit group-64 caches
(B 1, 8 KV heads, D 128, fp16 q, GQA 32:8) and three calls, each its own
launch: the kernel's fixed cost is its time at a few keys a split (session
16: 46 us at Nk 512 with the constant arrays in MLX's host-resident small
pool, 15 us in device memory; 35.5 us at Nk 32768). --plans: {name: TUNING}
run after the split sweep's (each printed before its launches).
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx

import mlx_flash
from mlx_flash.backends import cuda_quant as cq


def run(nk: int, tuning: dict, label: str):
    k = mx.random.normal((1, 8, nk, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, nk, 128)).astype(mx.float16)
    kq, vq = tuple(mx.quantize(k, group_size=64, bits=4)), tuple(mx.quantize(v, group_size=64, bits=4))
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    mx.eval(kq, vq, q)
    cq.TUNING.clear()
    cq.TUNING.update(tuning)
    cq.decode_plan.cache_clear()
    print(label, flush=True)
    for _ in range(3):
        mx.eval(mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64))
    cq.TUNING.clear()
    cq.decode_plan.cache_clear()


def main():
    nks = [int(x) for x in sys.argv[1].split(",")]
    splits = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 and not sys.argv[2].startswith("-") else []
    plans = json.loads(sys.argv[sys.argv.index("--plans") + 1]) if "--plans" in sys.argv else {}
    for nk in nks:
        for s in splits:
            run(nk, {"dec_splits": s}, f"nk {nk} splits {s}")
        for name, tuning in plans.items():
            run(nk, tuning, f"nk {nk} plan {name}")


if __name__ == "__main__":
    main()
