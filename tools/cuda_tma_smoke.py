"""GPU smoke test of the TMA-loading matmul2d variants, in a process of its own
(a faulting TMA load would spoil the CUDA context of whatever runs with it).

    python3 tools/cuda_tma_smoke.py [OUT_DIR]

Prints each case's relative error against float64 and writes OUT_DIR/tma_ok
when every case is within tolerance.
"""

import os
import sys

import mlx.core as mx
import numpy as np

from mlx_flash.backends import cuda_matmul as cm


def main(out_dir="."):
    gen = np.random.default_rng(0)
    ok = True
    for route, plan, M, K, N, trans, fp8 in (
        ("wgmma", (256, 4, 0, True), 300, 1000, 513, True, False),
        ("wgmma", (256, 4, 0, True), 130, 200, 70, False, False),
        ("wgmma_fp8", (128, 6, 1, True), 257, 2048, 384, True, True),
        ("wgmma_fp8", (128, 6, 1, True), 129, 300, 200, False, True),
    ):
        a = gen.standard_normal((M, K)).astype(np.float32)
        b = gen.standard_normal((N, K) if trans else (K, N)).astype(np.float32)
        if fp8:
            a8, b8 = mx.to_fp8(mx.array(a)), mx.to_fp8(mx.array(b))
            a64 = np.array(mx.from_fp8(a8, dtype=mx.float32)).astype(np.float64)
            b64 = np.array(mx.from_fp8(b8, dtype=mx.float32)).astype(np.float64)
            out = cm.matmul(a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=trans, out_dtype=mx.float32,
                            route=route, plan=plan)
        else:
            a16, b16 = mx.array(a).astype(mx.float16), mx.array(b).astype(mx.float16)
            a64 = np.array(a16.astype(mx.float32)).astype(np.float64)
            b64 = np.array(b16.astype(mx.float32)).astype(np.float64)
            out = cm.matmul(a16, b16, transpose_b=trans, out_dtype=mx.float32, route=route, plan=plan)
        want = a64 @ (b64.T if trans else b64)
        got = np.array(out).astype(np.float64)
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        good = np.all(np.isfinite(got)) and err < (2e-3 if fp8 else 1e-5)
        ok &= bool(good)
        print(f"tma smoke {route} plan={plan} M={M} K={K} N={N} transpose_b={trans}: rel err {err:.3g} "
              f"{'ok' if good else 'BAD'}", flush=True)
    if ok:
        open(os.path.join(out_dir, "tma_ok"), "w").close()


if __name__ == "__main__":
    main(*sys.argv[1:])
