"""The warp-specialised Hopper GEMM (cuda_src/matmul_wgmma_ws.cuh) under Nsight
Compute: one n^3 product per plan, each evaluated alone, nothing else of
ours launched. GPU machine (MLX names the kernel custom_kernel_mlx_flash_
matmul_wgmma_ws_<template>; the filter must not match other mlx_flash kernels):

    ncu -k regex:matmul_wgmma_ws -c 3 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \\
        python tools/cuda_matmul_ws_profile.py [n] [case ...]

Cases (default: fp16 e4m3): fp16 (16-bit, BN 256, 4 stages), e4m3 (native fp8,
BN 128, 6 stages, sums promoted every 256 K), e4m3_bn192. Run it without ncu
first (same MLX_PTX_CACHE_DIR) so that the profiled run finds the kernels
compiled.
"""

from __future__ import annotations

import sys

PLANS = {
    "fp16": ("fp16", (256, 4, 0, True, True)),
    "e4m3": ("e4m3", (128, 6, 2, True, True)),
    "e4m3_bn192": ("e4m3", (192, 5, 2, True, True)),
}


def main(argv):
    import mlx.core as mx

    from mlx_flash.backends import cuda_matmul as cm

    n = int(argv[0]) if argv else 8192
    names = argv[1:] or ["fp16", "e4m3"]
    k1, k2 = mx.random.split(mx.random.key(1))
    a16 = mx.random.normal((n, n), key=k1).astype(mx.float16)
    b16t = mx.random.normal((n, n), key=k2).astype(mx.float16)
    a8, b8t = mx.to_fp8(a16), mx.to_fp8(b16t)
    mx.eval(a16, b16t, a8, b8t)
    for name in names:
        kind, plan = PLANS[name]
        if kind == "fp16":
            out = cm.matmul(a16, b16t, transpose_b=True, route="wgmma", plan=plan)
        else:
            out = cm.matmul(a8, b8t, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True, out_dtype=mx.float16,
                            route="wgmma_fp8", plan=plan)
        mx.eval(out)
        mx.synchronize()
        print(f"profiled {name} plan {plan} at {n}^3", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
