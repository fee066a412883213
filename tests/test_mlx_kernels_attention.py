"""MLX's own Metal attention kernels through the emulation harness.

The harness earns trust by running code that is known to be right on Apple
GPUs: the steel attention forward and sdpa_vector (one pass, two passes,
and the GQA first pass) from the headers of the pinned macOS MLX wheel
(tests/macos_mlx.py), with the template arguments, function constants,
buffers and grids that MLX's host code (scaled_dot_product_attention.cpp) uses
(tests/metal_emu/mlx_attention.py). Each case is compared with the float64
reference: fp32 to 2e-5 of the largest reference value; fp16/bf16 to twice
the error of the plain materialised computation in that dtype; lse (float32
in every case) to 1e-5.

Only the masks MLX and our contract agree on are used: no fully masked row
(MLX's kernels give the mean of V there, the contract gives 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import helpers
import reference_np
from metal_emu import mlx_attention

_REASON = mlx_attention.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

FP32_TOL = 2e-5
LSE_TOL = 1e-5
ULP = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "NaN/inf in the kernel's result (an unwritten element?)"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def _materialised(q, k, v, scale, causal, mask, sinks, dtype):
    """Plain attention in `dtype`: logits rounded to dtype, softmax and the
    P V product in dtype: the yardstick for fp16/bf16."""
    Hq, Hkv, Nq, Nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk = mx.repeat(k, Hq // Hkv, axis=1).astype(mx.float32)
    vv = mx.repeat(v, Hq // Hkv, axis=1)
    s = (q.astype(mx.float32) @ kk.transpose(0, 1, 3, 2)) * scale
    keep = mx.ones(s.shape, dtype=mx.bool_)
    if mask is not None and mask.dtype == mx.bool_:
        keep = keep & mask
    elif mask is not None:
        s = s + mask.astype(mx.float32)
    if causal:
        keep = keep & (mx.arange(Nk)[None, :] <= (mx.arange(Nq) + Nk - Nq)[:, None])
    s = mx.where(keep, s.astype(dtype), mx.array(-mx.inf, dtype=dtype))
    if sinks is not None:
        sink = mx.broadcast_to(sinks[None, :, None, None].astype(dtype), s.shape[:3] + (1,))
        s = mx.concatenate([s, sink], axis=-1)
    p = mx.softmax(s, axis=-1)
    if sinks is not None:
        p = p[..., :-1]
    return np.array((p.astype(dtype) @ vv).astype(mx.float32))


def _check(name, got, q, k, v, scale, causal, mask, sinks):
    want = reference_np.attention_np(q, k, v, scale=scale, causal=causal, mask=mask, sinks=sinks)
    err = _rel_err(got, want["out"])
    if q.dtype == mx.float32:
        assert err <= FP32_TOL, f"{name}: relative error {err:.2e} > {FP32_TOL:.0e}"
    else:
        plain = _rel_err(_materialised(q, k, v, scale, causal, mask, sinks, q.dtype), want["out"])
        bound = max(ULP[q.dtype], 2 * plain)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.2e} (plain {q.dtype}: {plain:.2e})"
    return want


def _inputs(key, dtype, B, Hq, Hkv, Nq, Nk, D, mask_kind=None, mask_shape=None, with_sinks=False):
    g = helpers.rng("mlx_kernels", *key)
    q, k, v = helpers.qkv(g, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
    mask = None
    shape = mask_shape or (B, Hq, Nq, Nk)
    if mask_kind == "bool":
        mask = mx.array(g.random(shape) < 0.7)
    elif mask_kind == "additive":
        mask = mx.array(g.standard_normal(shape).astype(np.float32)).astype(dtype)
    # MLX's kernels read sinks in the input dtype: give them already rounded.
    sinks = mx.array(g.standard_normal(Hq).astype(np.float32)).astype(dtype) if with_sinks else None
    return q, k, v, mask, sinks


# (id, dtype, B, Hq, Hkv, Nq, Nk, D, causal, mask kind, mask shape, sinks, save_lse)
STEEL = [
    ("fp32-d64", mx.float32, 1, 2, 2, 37, 45, 64, False, None, None, False, True),
    ("fp16-d64-causal", mx.float16, 1, 2, 2, 33, 50, 64, True, None, None, False, True),
    ("bf16-d64-causal-square", mx.bfloat16, 1, 1, 1, 40, 40, 64, True, None, None, False, True),
    ("fp32-d128-causal", mx.float32, 1, 1, 1, 33, 50, 128, True, None, None, False, True),
    ("fp16-d128-gqa", mx.float16, 1, 4, 2, 37, 45, 128, False, None, None, False, True),
    ("bf16-d128", mx.bfloat16, 1, 1, 1, 17, 33, 128, False, None, None, False, False),
    ("fp32-d64-aligned-causal", mx.float32, 1, 1, 1, 64, 64, 64, True, None, None, False, True),
    ("fp16-d64-bool-mask", mx.float16, 1, 2, 2, 37, 45, 64, False, "bool", None, False, True),
    ("fp32-d64-additive-mask-bcast", mx.float32, 2, 2, 2, 29, 40, 64, False, "additive", (1, 1, 29, 40), False,
     True),
    ("bf16-d64-sinks-causal", mx.bfloat16, 1, 2, 1, 21, 45, 64, True, None, None, True, True),
]


@pytest.mark.parametrize("case", STEEL, ids=[c[0] for c in STEEL])
def test_mlx_kernels_steel_attention(case):
    name, dtype, B, Hq, Hkv, Nq, Nk, D, causal, mask_kind, mask_shape, with_sinks, save_lse = case
    q, k, v, mask, sinks = _inputs(case[:8], dtype, B, Hq, Hkv, Nq, Nk, D, mask_kind, mask_shape, with_sinks)
    scale = D**-0.5
    out, lse = mlx_attention.steel_attention(q, k, v, scale=scale, causal=causal, mask=mask, sinks=sinks,
                                             save_lse=save_lse)
    want = _check(name, out, q, k, v, scale, causal, mask, sinks)
    if save_lse:
        err = _rel_err(lse, want["lse"])
        assert err <= LSE_TOL, f"{name}: lse relative error {err:.2e} > {LSE_TOL:.0e}"


# (id, dtype, B, Hq, Hkv, Nq, Nk, D, causal, mask kind, sinks, two_pass: False, True or "gqa")
VECTOR = [
    ("fp32-d64-1pass", mx.float32, 1, 2, 2, 1, 45, 64, False, None, False, False),
    ("fp16-d128-1pass-causal-gqa", mx.float16, 1, 4, 1, 3, 37, 128, True, None, False, False),
    ("bf16-d64-1pass-bool-mask", mx.bfloat16, 1, 2, 2, 2, 33, 64, False, "bool", False, False),
    ("fp32-d64-1pass-additive-mask-sinks", mx.float32, 1, 2, 2, 1, 40, 64, False, "additive", True, False),
    ("fp16-d64-2pass", mx.float16, 1, 2, 2, 1, 100, 64, False, None, False, True),
    ("fp32-d128-2pass-causal-gqa-sinks", mx.float32, 1, 4, 2, 2, 77, 128, True, None, True, True),
    ("bf16-d64-2pass-bool-mask", mx.bfloat16, 1, 1, 1, 1, 65, 64, False, "bool", False, True),
    ("fp16-d64-2pass-gqa-kernel", mx.float16, 1, 8, 1, 1, 300, 64, False, None, False, "gqa"),
    ("fp32-d128-2pass-gqa-kernel", mx.float32, 2, 16, 2, 1, 129, 128, False, None, False, "gqa"),
]


@pytest.mark.parametrize("case", VECTOR, ids=[c[0] for c in VECTOR])
def test_mlx_kernels_sdpa_vector(case):
    name, dtype, B, Hq, Hkv, Nq, Nk, D, causal, mask_kind, with_sinks, two_pass = case
    q, k, v, mask, sinks = _inputs(case[:8], dtype, B, Hq, Hkv, Nq, Nk, D, mask_kind, None, with_sinks)
    scale = D**-0.5
    if two_pass:
        out = mlx_attention.sdpa_vector_2pass(q, k, v, scale=scale, causal=causal, mask=mask, sinks=sinks,
                                              gqa_kernel=two_pass == "gqa")
    else:
        out = mlx_attention.sdpa_vector(q, k, v, scale=scale, causal=causal, mask=mask, sinks=sinks)
    _check(name, out, q, k, v, scale, causal, mask, sinks)

