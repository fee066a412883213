"""Raw fp8 x fp8 products from the card for modelling Hopper's fp8 wgmma
accumulation offline (GPU machine):

    python tools/fp8_accum_dump.py OUT.npz

Saves e4m3 codes a [M, K], b [N, K] (normal draws, and their absolute values)
and float32 results of the native route per promotion interval, the exact
route and torch._scaled_mm (use_fast_accum False and True), so that a model of
the tensor cores' truncating sums (e.g. one for the CUDA emulation) can be
checked against the hardware bit for bit, away from the card.
"""

import sys

import mlx.core as mx
import numpy as np

from mlx_flash.backends import cuda_matmul as cm

M, N, K = 128, 128, 1024
PLANS = {"native_promote0": (128, 6, 0, True, True), "native_promote1": (128, 6, 1, True, True),
         "native_promote2": (128, 6, 2, True, True)}


def main(path):
    import torch

    saved = {}
    for dist in ("normal", "positive"):
        ka, kb = mx.random.split(mx.random.key(11 if dist == "normal" else 12))
        a, b = mx.random.normal((M, K), key=ka), mx.random.normal((N, K), key=kb)
        if dist == "positive":
            a, b = mx.abs(a), mx.abs(b)
        a8, b8 = mx.to_fp8(a), mx.to_fp8(b)
        mx.eval(a8, b8)
        saved[f"{dist}_a"], saved[f"{dist}_b"] = np.array(a8), np.array(b8)
        for name, plan in PLANS.items():
            saved[f"{dist}_{name}"] = np.array(cm.matmul(a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                         out_dtype=mx.float32, route="wgmma_fp8", plan=plan))
        saved[f"{dist}_exact"] = np.array(cm.matmul(a8, b8, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True,
                                                    out_dtype=mx.float32))
        ta = torch.from_numpy(saved[f"{dist}_a"]).cuda().view(torch.float8_e4m3fn)
        tb = torch.from_numpy(saved[f"{dist}_b"]).cuda().view(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        for fast in (False, True):
            try:
                out = torch._scaled_mm(ta, tb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                       use_fast_accum=fast)
                saved[f"{dist}_scaled_mm_fast{int(fast)}"] = out.cpu().numpy()
            except Exception as e:  # noqa: BLE001
                print(f"{dist} scaled_mm fast={fast}: {type(e).__name__}: {e}")
    np.savez_compressed(path, **saved)
    print(f"wrote {path}: {sorted(saved)}")


if __name__ == "__main__":
    main(sys.argv[1])
