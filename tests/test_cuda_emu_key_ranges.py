"""Native per-batch key ranges (`key_start` / `key_len`) in the CUDA kernels,
run on the CPU through the CUDA emulation (tests/cuda_emu) against the float64
reference: the decode kernel and its split combine, the SIMT forward, the
mma.sync forwards (one and two row tiles) and the mma / SIMT backwards.

The backend's wrapper runs unchanged (only mx.fast.cuda_kernel is swapped),
so these calls take the kernels' KEY_RANGE path, not a folded mask. Ranges are
placed so that whole key tiles (forward) and whole key blocks (backward) fall
outside them, others are cut inside, one row of the batch keeps nothing and
one keeps everything; combined with causal/window (bottom-right alignment),
masks, block masks, GQA, sinks, softcap and ALiBi. The Hopper (wgmma) kernels
have no emulation: tests/test_cuda_specific.py runs them on the GPU.
"""

import mlx.core as mx
import numpy as np
import pytest

import features
from helpers import check_close, plain_errors, randn, rng, to_np
from reference_np import attention_np

from cuda_emu import harness
from cuda_emu.nonfinite_cases import check_contract

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")

F16, B16, F32 = mx.float16, mx.bfloat16, mx.float32


def key_ranges(B, Nk):
    """(key_start, key_len) int32 [B]: left padding that also runs past the end,
    an empty range, a negative start cut early, every key, and (B = 5) a range
    inside the keys."""
    rows = [(Nk * 5 // 8, Nk), (0, 0), (-3, Nk // 3 + 3), (0, Nk), (Nk // 4, Nk // 2 + 1)][:B]
    start, length = (np.array(x, np.int32) for x in zip(*rows))
    return mx.array(start), mx.array(length)


def _inside(B, Nk):
    """[B, Nk] bool: key j is inside batch row b's range."""
    start, length = (np.array(x).astype(np.int64) for x in key_ranges(B, Nk))
    j = np.arange(Nk)[None, :]
    return (j >= start[:, None]) & (j < (start + length)[:, None])


def _options(feature, gen, B, Hq, Nq, Nk):
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    options["key_start"], options["key_len"] = key_ranges(B, Nk)
    return options


def _run(q, k, v, dout, options):
    """(out, lse) and, with dout, (dq, dk, dv) of the CUDA backend, emulated."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    spec, inputs = validate_attention(q, k, v, **options)
    assert spec.has_key_range and cuda_backend.NATIVE_KEY_RANGES  # the kernels get the ranges, not a mask
    with harness.patched_cuda_kernel():
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        grads = ()
        if dout is not None:
            grads = cuda_backend.attention_backward(q, k, v, out, lse, dout, None, spec, inputs, mx.cpu)
        mx.eval(out, lse, *grads)
    return out, lse, grads


def _check(shape, dtype, feature, grads):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("cuda-emu-key-range", shape, str(dtype), feature, grads)
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    options = _options(feature, gen, B, Hq, Nq, Nk)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype) if grads else None
    out, lse, got = _run(q, k, v, dout, options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None
    if dtype != F32:
        plain = plain_errors(q, k, v, dout if grads else mx.ones(out.shape, dtype), options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    # Batch row 1 keeps no key: out 0 and lse -inf (or the sink's logit), zero gradients.
    assert np.all(to_np(out)[1] == 0)
    if "sinks" not in options:
        assert np.all(to_np(lse)[1] == -np.inf)
    for name, g in zip(("dq", "dk", "dv"), got):
        check_close(name, to_np(g), want, dtype, plain)
    if got:
        assert np.all(to_np(got[0])[1] == 0) and np.all(to_np(got[1])[1] == 0) and np.all(to_np(got[2])[1] == 0)
        # Keys outside a row's range get no gradient.
        outside = ~_inside(B, Nk)
        for g in got[1:]:
            assert np.all(to_np(g).transpose(0, 2, 1, 3)[outside] == 0)


DECODE_FEATURES = ["none", "causal", "combined_causal_softcap_alibi_sinks", "combined_mask_window_sinks",
                   "combined_blocks_causal_additive"]


# (B, Hq, Hkv, Nq, Nk, D, Dv): one key, fewer keys than a tile, key splits.
@pytest.mark.parametrize("shape", [(5, 8, 2, 1, 1, 64, 64), (5, 8, 2, 3, 17, 64, 64), (5, 8, 2, 2, 700, 64, 64),
                                   (5, 4, 1, 1, 700, 36, 36)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F16, F32], ids=["decode_f16", "simt_f32"])
def test_decode_key_ranges(shape, dtype):
    """attention_fwd_decode (fp16; D = 36: attention_fwd_simt) and
    attention_fwd_simt (float32), the splits merged by attention_combine."""
    _check(shape, dtype, "causal", grads=False)


@pytest.mark.parametrize("feature", DECODE_FEATURES)
@pytest.mark.parametrize("dtype", [B16, F32], ids=["decode_b16", "simt_f32"])
def test_decode_key_ranges_with_features(feature, dtype):
    _check((5, 8, 2, 3, 300, 64, 64), dtype, feature, grads=False)


PREFILL_FEATURES = ["none", "causal", "window_both", "combined_causal_softcap_alibi_sinks",
                    "combined_mask_window_sinks", "combined_blocks_causal_additive", "combined_everything"]


# (dtype, D, Dv): attention_fwd_mma2 + attention_bwd_mma (fp16/bf16, D <= 128),
# attention_fwd_mma + attention_bwd_simt (D > 128), SIMT forward and backward (float32).
@pytest.mark.parametrize("kind", [(F16, 64, 64), (B16, 24, 40), (F16, 160, 160), (F32, 33, 16)],
                         ids=["mma2_f16", "mma2_b16_Dv40", "mma_f16_D160", "simt_f32"])
@pytest.mark.parametrize("feature", PREFILL_FEATURES)
def test_prefill_key_ranges_forward_backward(kind, feature):
    dtype, D, Dv = kind
    _check((4, 4, 2, 17, 113, D, Dv), dtype, feature, grads=True)


@pytest.mark.parametrize("kind", [(F16, 64), (F32, 32)], ids=["mma2_f16", "simt_f32"])
def test_more_queries_than_keys(kind):
    """Nq > Nk, causal (bottom-right: early rows see no key at all)."""
    dtype, D = kind
    _check((4, 2, 1, 113, 45, D, D), dtype, "causal", grads=True)


@pytest.mark.parametrize("kind", [(F16, 64, (4, 4, 2, 70, 200)), (F16, 8, (5, 8, 2, 1, 700)),
                                  (F32, 32, (4, 2, 1, 40, 90))],
                         ids=["mma2_bwd_mma_f16", "decode_f16", "simt_f32"])
def test_keys_outside_the_range_may_hold_nan(kind):
    """Dropped keys never meet NaN/inf: k and v outside each row's range are
    poisoned, in tiles the ranges cut and in tiles they skip, and every result
    stays finite and right (the non-finite contract)."""
    dtype, D, (B, Hq, Hkv, Nq, Nk) = kind
    gen = rng("cuda-emu-key-range-nan", str(dtype), D)
    q, k, v, do = (np.array(randn(gen, s, F32)) for s in
                   ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, Hq, Nq, D)))
    outside = ~_inside(B, Nk)
    for b in range(B):
        k[b, :, outside[b], 1] = np.nan
        v[b, :, outside[b], 2] = np.inf
        v[b, :, outside[b], 0] = np.nan
    start, length = key_ranges(B, Nk)
    options = {"causal": True, "key_start": start, "key_len": length}
    cast = lambda x: mx.array(x).astype(dtype)
    q, k, v, do = cast(q), cast(k), cast(v), cast(do)
    grads = Nq > 1
    out, lse, got = _run(q, k, v, do if grads else None, options)
    want = attention_np(q, k, v, dout=do if grads else None, **options)
    check_contract("out", to_np(out), want, dtype)
    check_contract("lse", to_np(lse), want, mx.float32)
    for name, g in zip(("dq", "dk", "dv"), got):
        check_contract(name, to_np(g), want, dtype)
    assert np.isfinite(to_np(out)).all()
