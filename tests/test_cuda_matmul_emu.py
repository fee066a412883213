"""matmul2d's few-rows CUDA kernel (cuda_src/matmul_gemv.cuh) run on the CPU
through the CUDA emulation (tests/cuda_emu), against float64 of the dequantized
operands, outputs poisoned with NaN. The backend's own wrapper
(cuda_matmul.matmul2d, route "gemv") pads and launches as on a GPU; only
mx.fast.cuda_kernel is swapped. This checks the kernel's fragment layout and
k order, edge rows and the cross-warp sum where no GPU exists; the GPU run of
tests/test_matmul_cuda_routes.py checks the same on the device.
"""

import mlx.core as mx
import numpy as np
import pytest

from cuda_emu import harness
from helpers import rng
from test_matmul import assert_close, make_operand, reference

pytestmark = [pytest.mark.usefixtures("cpu_default_device"),
              pytest.mark.skipif(harness.unavailable_reason() is not None,
                                 reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "POISON", float("nan"))


@pytest.mark.parametrize("M,K,N,ka,kb", [(1, 45, 17, "float16", "e4m3"), (9, 160, 33, "bfloat16", "e5m2"),
                                         (3, 208, 20, "float16", "float16"), (16, 96, 18, "bfloat16", "bfloat16"),
                                         (5, 1, 3, "float16", "e4m3"), (8, 2100, 9, "float16", "e5m2")])
def test_gemv_kernel_emulated(M, K, N, ka, kb):
    from mlx_flash.backends import cuda_matmul

    gen = rng("gemv-emu", M, K, N, ka, kb)
    a, _, a64 = make_operand(gen, (2, M, K), ka)
    b, b_fmt, b64 = make_operand(gen, (N, K), kb)
    sa = gen.uniform(0.5, 2, (2, M, 1)).astype(np.float32)
    sb = gen.uniform(0.5, 2, (1, N)).astype(np.float32)
    from mlx_flash._matmul_spec import validate_matmul

    spec, a3, b3, sa3, sb3, lead = validate_matmul(a, b, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                                                   transpose_b=True, out_dtype=mx.float32)
    with harness.patched_cuda_kernel():
        out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="gemv")
        mx.eval(out)
    assert_close(out.reshape(2, M, N), reference(a64, b64, sa, sb, transpose_b=True), mx.float32, K)
