"""FP8Linear's prefill product under Nsight Compute: the weight-as-A kernel
(cuda_src/matmul_wgmma_wa.cuh, route wgmma_wa, its default plan) and the
warp-specialised kernel decoding in shared memory (matmul_wgmma_ws.cuh, RAW),
each evaluated alone at M x K x N, fp16 x times an e4m3 [N, K] weight. GPU
machine; run it once without ncu first (same MLX_PTX_CACHE_DIR) so the
profiled run finds the kernels compiled:

    ncu -k regex:matmul_wgmma_w -c 4 --section SpeedOfLight --section WarpStateStats ... \\
        python tools/cuda_matmul_wa_profile.py 512 4096 4096 2048 4096 4096
"""

from __future__ import annotations

import sys


def main(argv):
    import mlx.core as mx

    from mlx_flash import fp8
    from mlx_flash.backends import cuda_matmul as cm

    values = [int(v) for v in argv] or [512, 4096, 4096]
    cm.CVT_RAW_MAX_ROWS = 1 << 30  # route "wgmma": the ws kernel decodes in shared memory at every M
    for m, k, n in zip(values[0::3], values[1::3], values[2::3]):
        k1, k2 = mx.random.split(mx.random.key(m + k + n))
        x = mx.random.normal((m, k), key=k1).astype(mx.float16)
        w8 = fp8.encode(mx.random.normal((n, k), key=k2), "e4m3")
        scale = mx.full((1, n), 0.05, mx.float32)
        mx.eval(x, w8, scale)
        for route in ("wgmma_wa", "wgmma"):
            mx.eval(cm.matmul(x, w8, b_fmt="e4m3", b_scale=scale, transpose_b=True, route=route))
            mx.synchronize()
            print(f"profiled {route} at {m} x {k} x {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
