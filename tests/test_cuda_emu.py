"""The CUDA decode path (attention_fwd_decode / attention_fwd_simt + attention_combine),
run on the CPU through the CUDA emulation (tests/cuda_emu), against the float64 reference.

The backend's own wrapper (mlx_flash/backends/cuda.py) picks the kernels, launch
shapes and key splits exactly as on a GPU; only mx.fast.cuda_kernel is swapped
for the emulating one. This checks indexing, fragment layouts, the cp.async
pipeline, the split/merge arithmetic and the logit rules where no GPU exists;
speed, and races the cooperative schedule hides, need the real device
(tools/cuda_decode_check.py).
"""

import mlx.core as mx
import numpy as np
import pytest

import features
from helpers import check_close, plain_errors, randn, rng, to_np
from reference_np import attention_np, attention_varlen_np

from cuda_emu import harness
from cuda_emu.nonfinite_cases import DECODE_CASES, PREFILL_CASES, check_contract, decode_case, prefill_case

pytestmark = pytest.mark.skipif(harness.unavailable_reason() is not None,
                                reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")


def _forward(q, k, v, varlen=None, **options):
    from mlx_flash._spec import validate_attention, validate_attention_varlen
    from mlx_flash.backends import cuda as cuda_backend

    with harness.patched_cuda_kernel():
        if varlen is None:
            spec, inputs = validate_attention(q, k, v, **options)
            out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        else:
            spec, inputs = validate_attention_varlen(q, k, v, *varlen, **options)
            as_bhnd = lambda x: x.transpose(1, 0, 2)[None]
            out, lse = cuda_backend.attention_forward(as_bhnd(q), as_bhnd(k), as_bhnd(v), spec, inputs, mx.cpu)
            out, lse = out[0].transpose(1, 0, 2), lse[0]
        mx.eval(out, lse)
    return out, lse


def _check(q, k, v, dtype, options):
    out, lse = _forward(q, k, v, **options)
    want = attention_np(q, k, v, **options)
    plain = None
    if dtype != mx.float32:
        plain = plain_errors(q, k, v, mx.ones(out.shape, dtype), options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    assert out.dtype == dtype


F16, B16, F32 = mx.float16, mx.bfloat16, mx.float32
# (B, Hq, Hkv, Nq, Nk, D, Dv, dtype): one key, fewer keys than a tile, splits,
# 16 rows per KV head, head dims 16..256 and Dv != D, the SIMT fallbacks
# (float32; 16-bit head dims not multiples of 8) and the combine's layouts
# (Dv a multiple of 4 or not, Dv >= 128 columns).
SHAPES = [
    (1, 8, 2, 1, 1, 64, 64, F16),
    (1, 8, 2, 1, 17, 64, 64, F16),
    (2, 8, 2, 2, 700, 64, 64, F16),
    (1, 4, 4, 3, 1023, 128, 128, B16),
    (1, 16, 1, 1, 700, 256, 256, F16),
    (1, 4, 1, 2, 300, 40, 40, B16),
    (1, 4, 2, 1, 300, 72, 40, F16),
    (1, 2, 2, 1, 300, 16, 16, F16),
    (1, 2, 2, 1, 300, 36, 36, F16),
    (1, 4, 2, 2, 700, 64, 64, F32),
    (1, 2, 2, 1, 700, 33, 7, F32),
    (1, 2, 1, 1, 600, 16, 255, F32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}".replace("mlx.core.", ""))
def test_decode_shapes(shape):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype = shape
    gen = rng("cuda-emu", shape[:7], str(dtype))
    q = randn(gen, (B, Hq, Nq, D), dtype)
    k = randn(gen, (B, Hkv, Nk, D), dtype)
    v = randn(gen, (B, Hkv, Nk, Dv), dtype)
    _check(q, k, v, dtype, {})


@pytest.mark.parametrize("feature", list(features.FEATURES))
def test_decode_features_kr(feature, decode_tuning):
    """Every feature on the KR tiles with the ticket pool (GQA group of 4, one
    query: 4 rows per block)."""
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 1, 300, 64
    dtype = B16 if "combined" in feature else F16
    gen = rng("cuda-emu-feature-kr", feature)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    decode_tuning.update(kr=1, pool=1)  # the default plan, named
    _check(q, k, v, dtype, features.FEATURES[feature](gen, B, Hq, Nq, Nk))


@pytest.mark.parametrize("feature", list(features.FEATURES))
def test_decode_features(feature):
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 3, 300, 64
    dtype = B16 if "combined" in feature else F16
    gen = rng("cuda-emu-feature", feature)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    _check(q, k, v, dtype, features.FEATURES[feature](gen, B, Hq, Nq, Nk))


@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_rows(dtype, with_sinks):
    """Rows whose every key is dropped: out 0 and lse -inf (or the sink's logit)."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 2, 700, 64
    gen = rng("cuda-emu-masked", str(dtype), with_sinks)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    keep = gen.random((B, Hq, Nq, Nk)) < 0.5
    keep[0, 1, :, :] = False
    keep[0, 2, 1, :] = False
    options = {"mask": mx.array(keep)}
    if with_sinks:
        options["sinks"] = randn(gen, (Hq,))
    out, lse = _forward(q, k, v, **options)
    want = attention_np(q, k, v, **options)
    assert np.all(to_np(out)[0, 1] == 0) and np.all(to_np(out)[0, 2, 1] == 0)
    check_close("out", to_np(out), want, dtype, plain_errors(q, k, v, mx.ones(out.shape, dtype), options, dtype)
                if dtype != F32 else None)
    check_close("lse", to_np(lse), want, mx.float32)


@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("case", ["none", "causal_alibi_sinks", "window_softcap"])
def test_decode_varlen(dtype, case):
    lengths = [(1, 300), (0, 4), (2, 17), (1, 1), (3, 700)]
    H, Hkv, D = 8, 2, 64
    gen = rng("cuda-emu-varlen", str(dtype), case)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    q = randn(gen, (int(cu_q[-1]), H, D), dtype)
    k = randn(gen, (int(cu_k[-1]), Hkv, D), dtype)
    v = randn(gen, (int(cu_k[-1]), Hkv, D), dtype)
    options = {"none": {}, "window_softcap": {"window": (100, 0), "softcap": 4.0},
               "causal_alibi_sinks": {"causal": True, "sinks": randn(gen, (H,)),
                                      "alibi_slopes": mx.array(gen.uniform(0.01, 0.1, (len(lengths), H)),
                                                               mx.float32)}}[case]
    out, lse = _forward(q, k, v, varlen=(mx.array(cu_q), mx.array(cu_k)), **options)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, **options)
    # Per-sequence plain errors are not formed here: the dtype's floor (2 eps) is the yardstick.
    check_close("out", to_np(out), want, dtype)
    check_close("lse", to_np(lse), want, mx.float32)


def test_schedule_does_not_change_results(monkeypatch):
    """Other thread interleavings (seeds) give bit-identical results."""
    gen = rng("cuda-emu-seeds")
    q, k, v = randn(gen, (2, 8, 2, 64), F16), randn(gen, (2, 2, 700, 64), F16), randn(gen, (2, 2, 700, 64), F16)
    results = []
    for seed in ("0", "7"):
        monkeypatch.setenv("CUDA_EMU_SEED", seed)
        results.append([np.array(x.astype(mx.float32)) for x in _forward(q, k, v, causal=True)])
    for a, b in zip(*results):
        assert np.array_equal(a, b, equal_nan=True)


# ---------------------------------------------------------------------------
# Wide heads (Dqk up to 576, Dv up to 512): the forward kernels split V/O
# columns over blocks, the backward ones dK/dQ/dV columns (cuda.py's
# _column_chunk, _mma_bwd_chunks, _simt_bwd_config).

def _forward_backward(q, k, v, dout, **options):
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    spec, inputs = validate_attention(q, k, v, **options)
    with harness.patched_cuda_kernel():
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        grads = cuda_backend.attention_backward(q, k, v, out, lse, dout, None, spec, inputs, mx.cpu)
        mx.eval(out, lse, *grads)
    return out, lse, grads


def _check_wide(q, k, v, dout, dtype, options, grads=True):
    if grads:
        out, lse, (dq, dk, dv) = _forward_backward(q, k, v, dout, **options)
    else:
        out, lse = _forward(q, k, v, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None if dtype == F32 else plain_errors(q, k, v, dout, options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    if grads:
        for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
            check_close(name, to_np(got), want, dtype, plain)


def _path(shape):
    """'mma' or 'decode' (fp16/bf16) or 'simt' (float32): the forward kernel the backend picks."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    B, Hq, Hkv, Nq, Nk, D, Dv, dtype = shape
    spec, _ = validate_attention(mx.zeros((B, Hq, Nq, D), dtype), mx.zeros((B, Hkv, Nk, D), dtype),
                                 mx.zeros((B, Hkv, Nk, Dv), dtype))
    return "simt" if dtype == F32 else "mma" if cuda_backend._uses_mma(spec) else "decode"


# (B, Hq, Hkv, Nq, Nk, Dqk, Dv, dtype, forward kernel)
WIDE_SHAPES = [
    (1, 2, 1, 17, 17, 576, 512, F16, "mma"),      # 2 V chunks forward, 6 column chunks backward
    (1, 2, 2, 113, 70, 192, 128, B16, "mma"),     # DeepSeek prefill dims
    (1, 1, 1, 33, 17, 300, 257, F16, "mma"),      # odd Dv: scalar loads, unpaired stores, ragged chunk
    (2, 2, 1, 17, 40, 288, 96, B16, "mma"),       # Dqk > 256, Dv < 128
    (1, 4, 1, 1, 113, 576, 512, F16, "decode"),   # MLA decode: decode kernel (V chunks), SIMT backward
    (1, 16, 1, 1, 700, 576, 512, B16, "decode"),  # ... keys split over blocks, attention_combine
    (1, 64, 1, 2, 300, 576, 512, F16, "decode"),  # MLA's many heads: packed (query, head) rows
    (1, 2, 1, 17, 40, 576, 512, F32, "simt"),     # float32: SIMT forward, backward in 2 column chunks
    (1, 2, 1, 1, 600, 320, 512, F32, "simt"),     # ... decode split over keys
]


@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}".replace(
    "mlx.core.", ""))
def test_wide_heads(shape):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, kernel = shape
    assert _path(shape[:8]) == kernel
    gen = rng("cuda-emu-wide", shape[:7], str(dtype))
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    _check_wide(q, k, v, dout, dtype, {"causal": Nq > 1}, grads=Nq * Hq <= 128)


# Head dims past 64 in one chunk: attention_bwd_mma's k-loops unroll by 2
# (D 80: an odd count of 16-column steps, the remainder iteration).
MID_SHAPES = [
    (2, 4, 2, 70, 113, 96, 96, F16, {"causal": True}),
    (1, 2, 1, 33, 47, 80, 80, B16, {"softcap": 5.0, "window": (20, 3)}),
    (1, 2, 2, 65, 64, 112, 112, F16, {}),
    # The NVRTC survey's "bwd D112 fp16 softcap" instance (its fast tanh, as the forward's).
    (1, 2, 1, 70, 90, 112, 112, F16, {"softcap": 20.0}),
]


@pytest.mark.parametrize("shape", MID_SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}".replace(
    "mlx.core.", ""))
def test_mid_head_backward(shape):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, options = shape
    assert _path(shape[:8]) == "mma"
    gen = rng("cuda-emu-mid", shape[:7], str(dtype))
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    _check_wide(q, k, v, dout, dtype, options)


@pytest.mark.parametrize("feature", list(features.FEATURES))
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_wide_head_features(feature, kind):
    """Every feature on the column-chunked kernels: prefill forward and backward
    (576/512 on the tensor-core kernels), MLA decode forward (packed rows)."""
    dtype = B16 if "combined" in feature else F16
    if kind == "prefill":
        B, Hq, Hkv, Nq, Nk, D, Dv = 2, 2, 1, 33, 47, 576, 512
    else:
        B, Hq, Hkv, Nq, Nk, D, Dv = 2, 32, 1, 2, 300, 576, 512
    assert _path((B, Hq, Hkv, Nq, Nk, D, Dv, dtype)) == ("mma" if kind == "prefill" else "decode")
    gen = rng("cuda-emu-wide-feature", feature, kind)
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    _check_wide(q, k, v, dout, dtype, features.FEATURES[feature](gen, B, Hq, Nq, Nk), grads=kind == "prefill")


@pytest.mark.parametrize("dtype", [F16, F32])
def test_wide_heads_varlen(dtype):
    lengths = [(1, 300), (0, 4), (17, 17), (2, 40)]
    H, Hkv, D, Dv = 8, 1, 576, 512
    gen = rng("cuda-emu-wide-varlen", str(dtype))
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    q = randn(gen, (int(cu_q[-1]), H, D), dtype)
    k = randn(gen, (int(cu_k[-1]), Hkv, D), dtype)
    v = randn(gen, (int(cu_k[-1]), Hkv, Dv), dtype)
    options = {"causal": True, "sinks": randn(gen, (H,)), "softcap": 5.0}
    out, lse = _forward(q, k, v, varlen=(mx.array(cu_q), mx.array(cu_k)), **options)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, **options)
    check_close("out", to_np(out), want, dtype)
    check_close("lse", to_np(lse), want, mx.float32)


# ---------------------------------------------------------------------------
# Non-finite inputs (the contract of issue 13): cases of cuda_emu/nonfinite_cases.py.

@pytest.mark.parametrize("dtype", [F16, F32], ids=["decode_f16", "simt_f32"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_nonfinite_inputs(case, dtype):
    """Split decode (attention_fwd_decode for fp16, attention_fwd_simt for
    float32) and attention_combine follow the non-finite contract."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    q, k, v, options = decode_case(case, dtype)
    spec, _ = validate_attention(q, k, v, **options)
    with harness.patched_cuda_kernel():
        splits = cuda_backend.decode_plan(spec)[-1] if dtype != F32 else cuda_backend._simt_fwd_config(spec)[2]
    if case != "window_nan_outside":  # a 40-key window needs no split
        assert splits > 1, "the case must split keys over blocks, so attention_combine merges them"
    out, lse = _forward(q, k, v, **options)
    want = attention_np(q, k, v, **options)
    check_contract("out", to_np(out), want, dtype)
    check_contract("lse", to_np(lse), want, mx.float32)
    if case.startswith("masked_row"):
        assert np.all(to_np(out)[0, 1] == 0) and np.all(to_np(lse)[0, 1] == -np.inf)
    # Each case must exercise what it names: some rows NaN, some finite (or a masked row).
    assert np.isfinite(want["out"]).any()


@pytest.mark.parametrize("kind", [(F16, 64), (F16, 160), (F32, 64), (F16, 512), (F32, 512)],
                         ids=["mma2_f16", "mma_f16_D160", "simt_f32", "mma_f16_D512", "simt_f32_D512"])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_nonfinite_forward_backward(case, kind):
    """attention_fwd_mma2 + attention_bwd_mma (fp16, D 64), attention_fwd_mma +
    attention_bwd_mma in column chunks (fp16, D 160 and 512: 2 V chunks
    forward), and attention_fwd_simt + attention_bwd_simt (float32; D 512 in
    column chunks backward) follow the non-finite contract, gradients too."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    dtype, D = kind
    q, k, v, do, options = prefill_case(case, dtype, D=D)
    spec, inputs = validate_attention(q, k, v, **options)
    with harness.patched_cuda_kernel():
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        dq, dk, dv = cuda_backend.attention_backward(q, k, v, out, lse, do, None, spec, inputs, mx.cpu)
        mx.eval(out, lse, dq, dk, dv)
    want = attention_np(q, k, v, dout=do, **options)
    check_contract("out", to_np(out), want, dtype)
    check_contract("lse", to_np(lse), want, mx.float32)
    for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_contract(name, to_np(got), want, dtype)
    # The case keeps finite results beside the non-finite ones (what could leak).
    assert np.isfinite(want["out"]).any() and np.isfinite(want["dq"]).any()


# ---------------------------------------------------------------------------
# The split merge inside attention_fwd_decode (the last block of each row group
# merges every split's partial, picked by an atomic ticket) and the K/V stream
# by bulk copies (BULK): forced split counts, GQA, features, non-finite inputs.

@pytest.fixture
def decode_tuning():
    from mlx_flash.backends import cuda as cuda_backend

    yield cuda_backend.DECODE_TUNING
    cuda_backend.DECODE_TUNING.clear()


# (B, Hq, Hkv, Nq, Nk, D, dtype, launch plan asked (DECODE_TUNING), features)
MERGE_CASES = [
    (1, 4, 1, 1, 1, 64, F16, {"splits": 8}, "none"),           # one key: no split to merge
    (1, 8, 2, 1, 17, 128, B16, {"nw": 1, "splits": 2}, "none"),  # a one-key second split
    (2, 8, 2, 2, 113, 64, F16, {"nw": 1, "splits": 7}, "combined_causal_softcap_alibi_sinks"),
    (1, 32, 8, 1, 1023, 128, F16, {"splits": 16}, "combined_blocks_causal_additive"),
    (1, 16, 2, 2, 1023, 64, F16, {"nw": 1, "splits": 16}, "combined_mask_window_sinks"),
    (1, 32, 4, 1, 1023, 64, B16, {"nw": 2, "splits": 128}, "sinks"),  # the most splits: 128 weights a row
    (1, 8, 1, 1, 33000, 64, F16, {}, "none"),                  # the backend's own split count
]


def _case_id(c):
    return "x".join(map(str, c[:6])) + "-" + "-".join(f"{k}{v}" for k, v in c[7].items()) + f"-{c[8]}"


# K/V stream (cp.async or bulk copies) x tile form (16 rows, or keys as the mma's M: KR).
FORMS = {"cp_async": {"kr": 0, "pool": 0}, "bulk": {"bulk": 1, "kr": 0, "pool": 0}, "kr": {"kr": 1, "pool": 0},
         "kr_bulk": {"kr": 1, "bulk": 1, "pool": 0}, "kr_pool": {"kr": 1, "pool": 1}}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", MERGE_CASES, ids=_case_id)
def test_fused_split_merge(case, form, decode_tuning):
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    B, Hq, Hkv, Nq, Nk, D, dtype, plan, feature = case
    gen = rng("cuda-emu-merge", case[:6], feature)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    decode_tuning.update(plan, **FORMS[form])
    spec, _ = validate_attention(q, k, v, **options)
    splits = cuda_backend.decode_plan(spec)[-1]
    assert Nk == 1 or splits > 1, "the case must split keys over blocks, so the fused merge runs"
    _check(q, k, v, dtype, options)


@pytest.mark.parametrize("form", ["cp_async", "bulk", "kr", "kr_bulk"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_nonfinite_inputs_forms(case, form, decode_tuning):
    """The bulk-copy K/V stream and the KR tiles keep the non-finite contract
    (rows past a split's end zeroed, exact P V where a dropped key's V is not
    finite, NaN carried through the merge)."""
    decode_tuning.update(FORMS[form])
    q, k, v, options = decode_case(case, F16)
    out, lse = _forward(q, k, v, **options)
    want = attention_np(q, k, v, **options)
    check_contract("out", to_np(out), want, F16)
    check_contract("lse", to_np(lse), want, mx.float32)
    assert np.isfinite(want["out"]).any()


@pytest.mark.parametrize("cc", [(8, 0), (8, 9)])
def test_bulk_decode_opt_in_names_the_capability_it_needs(cc, decode_tuning, monkeypatch):
    """The decode's bulk K/V copies (MLX_FLASH_CUDA_DECODE_PLAN bulk=1) use
    cp.async.bulk, which GPUs before sm_90 lack: a ValueError naming the
    setting, not NVRTC's compile error. The emulation (no capability) and
    Hopper run it (test_fused_split_merge's bulk forms)."""
    from mlx_flash.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "compute_capability", lambda: cc)
    cuda_backend._decode_launch_of_plan.cache_clear()  # launches made under other capabilities
    decode_tuning.update(FORMS["bulk"])
    gen = rng("cuda-emu-bulk-cc", cc)
    q, k, v = randn(gen, (1, 8, 1, 64), F16), randn(gen, (1, 2, 300, 64), F16), randn(gen, (1, 2, 300, 64), F16)
    try:
        with pytest.raises(ValueError, match=rf"bulk=1.*9\.0 or later; this GPU is {cc[0]}\.{cc[1]}"):
            _forward(q, k, v)
        decode_tuning.pop("bulk")
        _check(q, k, v, F16, {})  # the cp.async stream: no capability needed beyond sm_80
    finally:
        cuda_backend._decode_launch_of_plan.cache_clear()


def test_ticket_pool_regions_are_reset(decode_tuning):
    """With the ticket pool, calls take consecutive regions of a zeroed array
    and their groups' last blocks set the tickets back to 0 (the emulation
    hands the kernel a copy of the region and keeps its bytes after the
    launch), so a region serves again."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    decode_tuning.update(kr=True, pool=True)
    gen = rng("cuda-emu-pool")
    q, k, v = randn(gen, (2, 8, 1, 64), F16), randn(gen, (2, 2, 900, 64), F16), randn(gen, (2, 2, 900, 64), F16)
    spec, inputs = validate_attention(q, k, v)
    assert cuda_backend.decode_plan(spec)[-1] > 1
    with harness.patched_cuda_kernel():
        calls = cuda_backend._TICKET_POOLS[mx.cpu][2] if mx.cpu in cuda_backend._TICKET_POOLS else 0
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        mx.eval(out, lse)
        launch = cuda_backend._decode_launch(spec, mx.bool_, (2, 8, 1))
        assert launch[2], "the launch takes its tickets from the pool"
        after = launch[0].inputs_after["tk"]
    want = attention_np(q, k, v)
    check_close("out", to_np(out), want, F16, plain_errors(q, k, v, mx.ones(out.shape, F16), {}, F16))
    check_close("lse", to_np(lse), want, mx.float32)
    assert cuda_backend._TICKET_POOLS[mx.cpu][2] == calls + 1
    assert not np.any(after), "every ticket set back to 0"


def test_decode_plan_at_each_key_count():
    """_decode_plan takes what the key count does not change from a cache of the spec without key counts
    (a growing KV cache meets a new count at every step): the plan equals the formula worked out whole,
    at every count, under the default tuning and under split / wave overrides."""
    import math

    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cb

    def whole(spec, tuning):  # the formula as one function (its form before the cache of the spec without keys)
        nw, bn, stages = cb._decode_config(spec, tuning)
        dvc = cb._column_chunk(spec.head_dim_v)
        smem = cb._decode_smem(spec.head_dim_qk, dvc, nw, bn, stages)
        rows = 8 if cb._decode_kr(spec, tuning, bn) else 16
        row_blocks = math.ceil(cb._max_q(spec) * spec.group_size / rows) * math.ceil(spec.head_dim_v / dvc)
        base_blocks = row_blocks * spec.batch * spec.heads_kv
        per_sm = max(1, min(4, cb._SM_SMEM // (smem + 1024)))
        keys = cb._effective_keys(spec)
        options = dict(tuning)
        waves, tiles = options.get("waves", 50) / 100, options.get("tiles", 2)
        splits = max(1, min(cb._MAX_SPLITS, int(cb._SMS * per_sm * waves) // base_blocks,
                            math.ceil(keys / (tiles * nw * bn))))
        if "splits" in options:
            splits = max(1, min(cb._MAX_SPLITS, options["splits"], math.ceil(keys / (nw * bn))))
        chunk = math.ceil(math.ceil(keys / splits) / (nw * bn)) * nw * bn
        return nw, bn, stages, smem, row_blocks, math.ceil(keys / chunk)

    base = cb._decode_tuning()
    tunings = [base, tuple(sorted({**dict(base), "splits": 5}.items())),
               tuple(sorted({**dict(base), "waves": 100, "tiles": 1}.items()))]
    q = mx.zeros((1, 32, 1, 128), mx.float16)
    for window in (None, (100, 0)):
        for nk in list(range(1, 70)) + [511, 512, 513, 4095, 4096, 4097, 32767, 32768, 32769]:
            k = mx.zeros((1, 8, nk, 128), mx.float16)
            spec, _ = validate_attention(q, k, k, window=window)
            for tuning in tunings:
                assert cb._decode_plan(spec, tuning) == whole(spec, tuning), (nk, window, tuning)


def test_decode_outputs_as_the_cache_grows():
    """Decode calls at successive key counts (views of one growing cache, as generation makes them), each after
    the calls before it filled the caches of the spec without key counts: outputs and lse equal those of a call
    at that count with every cache of the CUDA path emptied first (bit-identical), and the float64 reference."""
    from mlx_flash._spec import VALIDATED_CALLS
    from mlx_flash.backends import cuda as cb

    gen = rng("cuda-emu-growing")
    B, Hq, Hkv, D = 1, 8, 2, 64
    q = randn(gen, (B, Hq, 1, D), F16)
    kc, vc = randn(gen, (B, Hkv, 160, D), F16), randn(gen, (B, Hkv, 160, D), F16)
    mx.eval(q, kc, vc)
    caches = (cb._without_keys, cb._forward_template, cb._forward_template_of, cb._decode_plan,
              cb._decode_plan_base, cb._decode_launch_of_plan, cb._param_arrays)
    grown = {}
    for nk in (31, 32, 33, 63, 64, 65, 127, 128, 129, 150):
        grown[nk] = _forward(q, kc[:, :, :nk], vc[:, :, :nk])
    for nk, (out, lse) in grown.items():
        for cache in caches:
            cache.cache_clear()
        VALIDATED_CALLS.clear()
        fresh_out, fresh_lse = _forward(q, kc[:, :, :nk], vc[:, :, :nk])
        np.testing.assert_array_equal(to_np(out), to_np(fresh_out))
        np.testing.assert_array_equal(to_np(lse), to_np(fresh_lse))
        want = attention_np(q, kc[:, :, :nk], vc[:, :, :nk])
        check_close("out", to_np(out), want, F16, None)
