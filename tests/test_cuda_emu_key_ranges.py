"""Native per-batch key ranges (`key_start` / `key_len`) in the CUDA kernels,
run on the CPU through the CUDA emulation (tests/cuda_emu) against the float64
reference: the decode kernel and its split combine, the SIMT forward, the
mma.sync forwards (one and two row tiles) and the mma / SIMT backwards.

The backend's wrapper runs unchanged (only mx.fast.cuda_kernel is swapped),
so these calls take the kernels' KEY_RANGE path, not a folded mask. The cases
(tests/cuda_emu/key_range_cases.py) place ranges so that whole key tiles and
blocks fall outside them, others are cut inside, one row keeps nothing and one
everything; combined with causal/window (bottom-right alignment), masks, block
masks, GQA, sinks, softcap and ALiBi. The Hopper (wgmma) kernels have no
emulation: tests/test_cuda_specific.py runs the same cases on the GPU.
"""

import mlx.core as mx
import numpy as np
import pytest

from helpers import check_close, randn, rng, to_np
from reference_np import attention_np

from cuda_emu import harness
from cuda_emu.key_range_cases import backend_runner, check_case, check_poisoned_case

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")

F16, B16, F32 = mx.float16, mx.bfloat16, mx.float32
run = backend_runner(mx.cpu, emulate=True)

DECODE_FEATURES = ["none", "causal", "combined_causal_softcap_alibi_sinks", "combined_mask_window_sinks",
                   "combined_blocks_causal_additive"]


# (B, Hq, Hkv, Nq, Nk, D, Dv): one key, fewer keys than a tile, key splits.
@pytest.mark.parametrize("shape", [(5, 8, 2, 1, 1, 64, 64), (5, 8, 2, 3, 17, 64, 64), (5, 8, 2, 2, 700, 64, 64),
                                   (5, 4, 1, 1, 700, 36, 36)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F16, F32], ids=["decode_f16", "simt_f32"])
def test_decode_key_ranges(shape, dtype):
    """attention_fwd_decode (fp16; D = 36: attention_fwd_simt) and
    attention_fwd_simt (float32), the splits merged by attention_combine."""
    check_case(run, shape, dtype, "causal", grads=False)


@pytest.mark.parametrize("feature", DECODE_FEATURES)
@pytest.mark.parametrize("dtype", [B16, F32], ids=["decode_b16", "simt_f32"])
def test_decode_key_ranges_with_features(feature, dtype):
    check_case(run, (5, 8, 2, 3, 300, 64, 64), dtype, feature, grads=False)


PREFILL_FEATURES = ["none", "causal", "window_both", "combined_causal_softcap_alibi_sinks",
                    "combined_mask_window_sinks", "combined_blocks_causal_additive", "combined_everything"]


# (dtype, D, Dv): attention_fwd_mma2 + attention_bwd_mma (fp16/bf16, D <= 128),
# attention_fwd_mma + attention_bwd_simt (D > 128), SIMT forward and backward (float32).
@pytest.mark.parametrize("kind", [(F16, 64, 64), (B16, 24, 40), (F16, 160, 160), (F32, 33, 16)],
                         ids=["mma2_f16", "mma2_b16_Dv40", "mma_f16_D160", "simt_f32"])
@pytest.mark.parametrize("feature", PREFILL_FEATURES)
def test_prefill_key_ranges_forward_backward(kind, feature):
    dtype, D, Dv = kind
    check_case(run, (4, 4, 2, 17, 113, D, Dv), dtype, feature, grads=True)


@pytest.mark.parametrize("kind", [(F16, 64), (F32, 32)], ids=["mma2_f16", "simt_f32"])
def test_more_queries_than_keys(kind):
    """Nq > Nk, causal (bottom-right: early rows see no key at all)."""
    dtype, D = kind
    check_case(run, (4, 2, 1, 113, 45, D, D), dtype, "causal", grads=True)


@pytest.mark.parametrize("kind", [(F16, (4, 4, 2, 70, 200, 64)), (F16, (5, 8, 2, 1, 700, 8)),
                                  (F32, (4, 2, 1, 40, 90, 32))],
                         ids=["mma2_bwd_mma_f16", "decode_f16", "simt_f32"])
def test_keys_outside_the_range_may_hold_nan(kind):
    dtype, shape = kind
    check_poisoned_case(run, shape, dtype, grads=shape[3] > 1)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["decode_f16", "simt_f32"])
def test_extreme_range_values(dtype):
    """key_start + key_len past the int32 range neither wraps nor faults: a
    start near 2^31 keeps nothing, -2^31 with any length nothing, a negative
    start with the largest length everything."""
    B, Hq, Hkv, Nq, Nk, D = 3, 4, 2, 1, 300, 64
    gen = rng("cuda-emu-key-range-extremes", str(dtype))
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype)
    big = np.iinfo(np.int32).max
    options = {"key_start": mx.array(np.array([big - 10, -big - 1, -5], np.int32)),
               "key_len": mx.array(np.array([100, big, big], np.int32))}
    out, lse, _ = run(q, k, v, None, options)
    want = attention_np(q, k, v, **options)
    assert np.all(to_np(out)[:2] == 0) and np.all(to_np(lse)[:2] == -np.inf)
    check_close("out", to_np(out), want, dtype)
    check_close("lse", to_np(lse), want, mx.float32)


# Wide heads (MLA's 576/512) with key ranges: the column-chunked prefill forward
# and backward, and the MLA decode (packed rows, V chunks, key splits), where
# every block of a V/dK chunk bounds its key loop by the same range.
@pytest.mark.parametrize("case", [((2, 2, 1, 17, 150, 576, 512), F16, True),
                                  ((2, 16, 1, 1, 700, 576, 512), B16, False)], ids=["prefill", "decode"])
@pytest.mark.parametrize("feature", ["causal", "combined_causal_softcap_alibi_sinks"])
def test_wide_heads_with_key_ranges(case, feature):
    shape, dtype, grads = case
    check_case(run, shape, dtype, feature, grads=grads)
