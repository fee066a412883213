"""Replays the small products that failed in tests/test_matmul.py on the H200
(session 5: test_scales with fp8 x fp8, test_batched float16 x e4m3 with a
[K, N] b, test_every_operand_type_combination bfloat16 x e4m3; all on the
Hopper "cvt" kernel, fp8 decoded in shared memory, rows of a < 512), each
REPS times per route / plan with outputs poisoned with NaN, and prints how
often each misses the float64 reference: is it the kernel, the plan, or the
call sequence? GPU machine:

    python tools/cuda_matmul_cvt_repro.py [REPS]
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv):
    sys.path.insert(0, "tests")
    import mlx.core as mx

    from helpers import rng as seeded
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul as cm
    from test_matmul import make_operand, reference

    reps = int(argv[0]) if argv else 5
    cm.POISON = float("nan")
    gpu = mx.Device(mx.gpu)
    gen = seeded("cvt-repro")
    cases = []
    a, af, a64 = make_operand(gen, (4, 11, 40), "e4m3")
    b, bf, b64 = make_operand(gen, (23, 40), "e5m2")
    sa = gen.uniform(0.5, 2, (4, 11, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2, (1, 23)).astype(np.float32)
    cases.append(("scales_e4m3_e5m2_bT", dict(a=a, b=b, a_fmt=af, b_fmt=bf, a_scale=mx.array(sa), b_scale=mx.array(sb),
                                             transpose_b=True, out_dtype=mx.float32),
                  reference(a64, b64, sa, sb, True)))
    a, _, a64 = make_operand(gen, (2, 3, 9, 33), "float16")
    b, bf, b64 = make_operand(gen, (33, 21), "e4m3")
    cases.append(("batched_f16_e4m3", dict(a=a, b=b, b_fmt=bf, transpose_b=False, out_dtype=mx.float32),
                  reference(a64, b64, transpose_b=False)))
    a, _, a64 = make_operand(gen, (19, 45), "bfloat16")
    b, bf, b64 = make_operand(gen, (45, 37), "e4m3")
    cases.append(("bf16_e4m3", dict(a=a, b=b, b_fmt=bf, transpose_b=False, out_dtype=mx.float32),
                  reference(a64, b64, transpose_b=False)))
    routes = [("wgmma", None), ("wgmma", (256, 4, 0, False)), ("wgmma", (128, 6, 0, False)),
              ("wgmma", (256, 4, 0, True, True)), ("mma", None)]
    for name, kw, ref in cases:
        spec, a3, b3, s_a, s_b, lead = validate_matmul(**kw)
        scale = np.max(np.abs(ref)) + 1e-30
        for route, plan in routes:
            bad, worst = 0, 0.0
            for _ in range(reps):
                out = cm.matmul2d(a3, b3, s_a, s_b, spec, gpu, route=route, plan=plan)
                out = np.array(out.astype(mx.float32)).reshape(ref.shape)
                err = np.nan if not np.all(np.isfinite(out)) else np.max(np.abs(out - ref)) / scale
                worst = err if np.isnan(err) or np.isnan(worst) else max(worst, err)
                bad += not (err < 1e-5)
            print(f"{name} route {route} plan {plan}: {bad}/{reps} wrong, worst relative error {worst:.3g}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
