"""Per-call cost of mlx_flash's CUDA decode calls, next to mx.fast's (GPU machine).

    python tools/cuda_call_cost.py [OUT.json]

For a decode step (1 query, GQA 32:8, D 128, Nk 32768, fp16): the graph-build
(host) time per call, and the wall time per call with 20 calls queued before
one eval (so a call costs max(host, GPU)), for flash_attention,
flash_attention_quantized (4-bit) and mx.fast SDPA. Run it twice, with and
without MLX_FLASH_CUDA_INLINE_HEADERS=1, to see what the headers MLX
rebuilds and hashes per call cost. Outputs are checked against mx.fast.
"""

import json
import os
import sys

import mlx.core as mx

import mlx_flash
from mlx_flash.backends import cuda as cuda_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_decode_profile import per_call  # noqa: E402  (20 calls queued per eval)


def main():
    B, Hq, Hkv, Nk, D = 1, 32, 8, 32768, 128
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    k = mx.random.normal((B, Hkv, Nk, D)).astype(mx.float16)
    v = mx.random.normal((B, Hkv, Nk, D)).astype(mx.float16)
    kq = tuple(mx.quantize(k, group_size=64, bits=4))
    vq = tuple(mx.quantize(v, group_size=64, bits=4))
    mx.eval(q, k, v, kq, vq)
    s = D ** -0.5
    calls = {
        "mx_fast": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s),
        "flash_attention": lambda: mlx_flash.flash_attention(q, k, v, scale=s),
        "flash_attention_quantized_4bit": lambda: mlx_flash.flash_attention_quantized(
            q, kq, vq, bits=4, group_size=64, scale=s),
    }
    ref = calls["mx_fast"]().astype(mx.float32)
    kd = mx.dequantize(*kq, group_size=64, bits=4)
    vd = mx.dequantize(*vq, group_size=64, bits=4)
    ref_q = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=s).astype(mx.float32)
    result = {"inline_headers": os.environ.get("MLX_FLASH_CUDA_INLINE_HEADERS", "0") == "1",
              "includes_work": cuda_backend._nvrtc_reads_includes(), "calls": {}}
    for name, fn in calls.items():
        want = ref_q if "quantized" in name else ref
        err = mx.max(mx.abs(fn().astype(mx.float32) - want)).item()
        timing = per_call(fn)
        build_us, wall_us = timing["build_us"], timing["batched_us"]
        result["calls"][name] = {"host_build_us": build_us, "per_call_us": wall_us, "max_abs_err": err}
        print(f"{name:32s} host {build_us:7.1f} us  per call {wall_us:7.1f} us  err {err:.2e}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
