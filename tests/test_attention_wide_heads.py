"""Head dims past 256 (MLA: Dqk 576 / Dv 512; DeepSeek prefill 192 / 128):
values and gradients against the float64 reference where the backend takes
them (the CPU today), and a clear per-backend error where it does not."""

import mlx.core as mx
import pytest

from helpers import DTYPES, check_close, is_emulated, plain_errors, qkv, randn, rng, to_np
from reference_np import attention_np, attention_varlen_np

import backends
from mlx_flash import dispatch
from mlx_flash._spec import validate_attention

# (B, Hq, Hkv, Nq, Nk, Dqk, Dv)
SHAPES = [
    (1, 2, 1, 17, 17, 576, 512),    # MLA absorbed prefill (MQA over the latent)
    (1, 4, 1, 1, 113, 576, 512),    # MLA absorbed decode
    (1, 8, 1, 2, 700, 576, 512),    # ... long enough for the CPU's split-over-keys decode path
    (1, 2, 2, 113, 113, 576, 512),
    (2, 2, 1, 17, 40, 192, 128),    # DeepSeek's prefill dims
    (1, 2, 2, 113, 70, 192, 128),
    (1, 1, 1, 33, 17, 300, 257),    # odd widths just over the GPU limit
]
# The Metal emulation runs every GPU thread as a fiber on 2 cores: it takes
# these (small B and H, the real widths; odd N, Nq != Nk, the split decode,
# Dv and Dqk blocks that end mid-fragment) instead of SHAPES.
EMULATED = [
    (1, 2, 1, 17, 33, 576, 512),    # MLA prefill, MQA
    (1, 4, 1, 1, 113, 576, 512),    # MLA decode: split over keys, GQA heads packed
    (1, 4, 1, 3, 70, 576, 512),     # ... 12 packed rows: 2 simdgroups (Q staged only where it fits)
    (1, 1, 1, 33, 17, 512, 512),
    (2, 1, 1, 113, 40, 320, 256),
    (1, 2, 2, 17, 113, 192, 128),
    (1, 1, 1, 9, 21, 300, 257),
]
FEATURES = {"none": {}, "causal": {"causal": True}, "window": {"window": (9, 0)}}


def _wide_backends(backend):
    max_qk, max_v = dispatch.head_dim_limits("metal" if backend == "metal_emu" else backend)
    if max_qk < 576 or max_v < 512:
        pytest.skip(f"{backend} takes head dims up to {max_qk}/{max_v} for now")


def _shape_runs_on(backend, shape):
    if is_emulated(backend) and shape not in EMULATED:
        pytest.skip("the Metal emulation runs the EMULATED shapes")


@pytest.mark.parametrize("shape", SHAPES + [s for s in EMULATED if s not in SHAPES], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_values_and_gradients(backend, shape, feature, dtype):
    _wide_backends(backend)
    _shape_runs_on(backend, shape)
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    dtype = DTYPES[dtype]
    gen = rng("wide", shape, feature, str(dtype))
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    options = FEATURES[feature]
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    out, lse = backends.forward(backend, q, k, v, **options)
    grads = backends.gradients(backend, q, k, v, dout, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None if dtype == mx.float32 else plain_errors(q, k, v, dout, options, dtype)
    assert out.shape == (B, Hq, Nq, Dv) and out.dtype == dtype
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(grads[name]), want, dtype, plain)


def _combo_options(gen, combo, B, Hq, Nq, Nk):
    if combo == "bool_mask-softcap-sinks":
        return {"mask": mx.array(gen.random((B, 1, Nq, Nk)) < 0.7), "softcap": 4.0, "sinks": randn(gen, (Hq,))}
    if combo == "additive_mask-alibi-causal":
        return {"mask": randn(gen, (Nq, Nk)), "alibi_slopes": mx.array(gen.random(Hq).astype("float32")),
                "causal": True}
    # block mask, window and per-batch key ranges (one of them empty when B > 1)
    start = gen.integers(-2, Nk // 2, B)
    length = gen.integers(Nk // 3, Nk + 3, B)
    if B > 1:
        length[-1] = 0
    return {"block_mask": mx.array(gen.random((B, Hq, -(-Nq // 8), -(-Nk // 16))) < 0.7), "block_size": (8, 16),
            "window": (30, 4), "key_start": mx.array(start.astype("int32")),
            "key_len": mx.array(length.astype("int32"))}


COMBOS = ["bool_mask-softcap-sinks", "additive_mask-alibi-causal", "block_mask-window-key_range"]
# (shape, dtype): GQA prefill, MLA decode, Nq > Nk with widths that end mid-fragment.
COMBO_CASES = [((2, 4, 2, 17, 40, 576, 512), "float16"), ((2, 4, 1, 1, 113, 576, 512), "bfloat16"),
               ((1, 2, 1, 33, 17, 320, 200), "float32")]


@pytest.mark.parametrize("case", COMBO_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + c[1])
@pytest.mark.parametrize("combo", COMBOS)
def test_features_combined(backend, case, combo):
    """Masks, softcap, sinks, ALiBi, block masks, windows and key ranges
    together at wide heads, values and gradients."""
    _wide_backends(backend)
    shape, dtype = case
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    dtype = DTYPES[dtype]
    gen = rng("wide-combo", shape, combo, str(dtype))
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    options = _combo_options(gen, combo, B, Hq, Nq, Nk)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    out, lse = backends.forward(backend, q, k, v, **options)
    grads = backends.gradients(backend, q, k, v, dout, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None if dtype == mx.float32 else plain_errors(q, k, v, dout, options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(grads[name]), want, dtype, plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_varlen(backend, dtype):
    """Packed sequences (one of them empty, one decode-sized) at MLA's widths."""
    _wide_backends(backend)
    dtype = DTYPES[dtype]
    gen = rng("wide-varlen", str(dtype))
    cu_q, cu_k = [0, 5, 5, 22, 23], [0, 17, 20, 40, 59]
    q = randn(gen, (cu_q[-1], 4, 576), dtype)
    k = randn(gen, (cu_k[-1], 1, 576), dtype)
    v = randn(gen, (cu_k[-1], 1, 512), dtype)
    dout = randn(gen, (cu_q[-1], 4, 512), dtype)
    cu = (mx.array(cu_q, mx.int32), mx.array(cu_k, mx.int32))
    options = {"causal": True, "softcap": 20.0}
    out, lse = backends.forward(backend, q, k, v, varlen=cu, **options)
    grads = backends.gradients(backend, q, k, v, dout, varlen=cu, **options)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, dout=dout, **options)
    check_close("out", to_np(out), want, dtype)
    check_close("lse", to_np(lse), want, mx.float32)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(grads[name]), want, dtype)


@pytest.mark.parametrize("name", ["metal", "cuda"])
@pytest.mark.parametrize("dims, arg", [((576, 512), "q"), ((64, 320), "v")])
def test_gpu_backends_name_their_limit(name, dims, arg):
    spec, _ = validate_attention(mx.ones((1, 1, 2, dims[0])), mx.ones((1, 1, 2, dims[0])),
                                 mx.ones((1, 1, 2, dims[1])))
    max_qk, max_v = dispatch.head_dim_limits(name)
    if dims[0] <= max_qk and dims[1] <= max_v:
        pytest.skip(f"{name} takes {dims} now")
    with pytest.raises(ValueError) as info:
        dispatch.check_head_dims(spec, name)
    message = str(info.value)
    for word in (arg, name, str(max_qk if arg == "q" else max_v), str(dims[0] if arg == "q" else dims[1]), "cpu"):
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("name", ["cpu", "metal"])
def test_limit_is_the_contracts(name):
    assert dispatch.head_dim_limits(name) == (576, 512)
