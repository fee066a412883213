"""Issue 14's host-bound shape, (4, 16, 1024, 64): mlx_flash against mx.fast
SDPA (cuDNN), forward and forward + backward, fp16 and bf16, causal and not,
one call per eval (a call's host work counts), in one process. Run it once
with MLX_FLASH_CUDA_HOST_PREFILL=0 and once with =1 to see what the C++
record/replay of prefill calls (backends/cuda_host.py) gives.

    python3 tools/cuda_small_prefill.py OUT.json [iters]
Appends one record per case to OUT.json (a list).
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
import mlx_flash  # noqa: E402
from gpu_timing import mlx_seconds  # noqa: E402

SHAPE = (4, 16, 1024, 64)


def main(out_path: str, iters: int = 200):
    B, H, N, D = SHAPE
    records = json.load(open(out_path)) if os.path.exists(out_path) else []
    prefill = os.environ.get("MLX_FLASH_CUDA_HOST_PREFILL", "0")
    for dname, dtype in (("float16", mx.float16), ("bfloat16", mx.bfloat16)):
        q, k, v, g = (mx.random.normal(SHAPE, key=mx.random.key(i)).astype(dtype) for i in range(4))
        for causal in (False, True):
            ours = lambda q, k, v: mlx_flash.flash_attention(q, k, v, causal=causal)
            fast = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5,
                                                                       mask="causal" if causal else None)
            rec = dict(shape=list(SHAPE), dtype=dname, causal=causal, host_prefill=prefill)
            for name, fn in (("ours", ours), ("mx_fast", fast)):
                loss = lambda q, k, v, fn=fn: (fn(q, k, v).astype(mx.float32) * g.astype(mx.float32)).sum()
                grad = mx.grad(loss, argnums=(0, 1, 2))
                rec[f"{name}_fwd_us"] = mlx_seconds(lambda: fn(q, k, v), iters) * 1e6
                rec[f"{name}_fwdbwd_us"] = mlx_seconds(lambda: grad(q, k, v), iters // 2) * 1e6
            rec["fwd_ratio_vs_mx_fast"] = rec["mx_fast_fwd_us"] / rec["ours_fwd_us"]
            rec["fwdbwd_ratio_vs_mx_fast"] = rec["mx_fast_fwdbwd_us"] / rec["ours_fwdbwd_us"]
            print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in rec.items()}), flush=True)
            records.append(rec)
    json.dump(records, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
