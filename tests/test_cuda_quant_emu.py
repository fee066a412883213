"""The CUDA kernels of flash_attention_quantized (cuda_src/attention_quant*.cu),
run on the CPU through the CUDA emulation (tests/cuda_emu) against the
float64 reference over mx.dequantize'd k and v, and compiled with nvcc for
sm_90a exactly as mx.fast.cuda_kernel wraps them (no register spills).

The backend's own wrappers (mlx_flash/backends/cuda_quant.py) pick launch
shapes and key splits as on a GPU; only mx.fast.cuda_kernel is swapped for
the emulating one. The op-level tests (tests/test_attention_quantized.py
-k cuda) run the same kernels for real on a CUDA GPU.
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest

from helpers import check_close, plain_errors, randn, reference_error, rng, to_np
from reference_np import attention_np

from cuda_emu import harness

F16, B16, F32 = mx.float16, mx.bfloat16, mx.float32
emulated = pytest.mark.skipif(harness.unavailable_reason() is not None,
                              reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")


def _case(key, B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=F32, bits=4, group_size=64, scale_dtype=None):
    gen = rng("cuda-quant-emu", *key)
    Dv = D if Dv is None else Dv
    q = randn(gen, (B, Hq, Nq, D), dtype)
    cache = scale_dtype or (dtype if dtype != F32 else F32)
    k = randn(gen, (B, Hkv, Nk, D), cache)
    v = randn(gen, (B, Hkv, Nk, Dv), cache)
    kq = tuple(mx.quantize(k, group_size=group_size, bits=bits))
    vq = tuple(mx.quantize(v, group_size=group_size, bits=bits))
    # The reference reads K and V dequantized in float32 (the kernel's own precision).
    f32 = lambda t: tuple(x.astype(F32) if x.dtype != mx.uint32 else x for x in t)
    kd = mx.dequantize(*f32(kq), group_size=group_size, bits=bits)
    vd = mx.dequantize(*f32(vq), group_size=group_size, bits=bits)
    mx.eval(q, kq, vq, kd, vd)
    return gen, q, kq, vq, kd, vd


def _emu(q, kq, vq, bits, group_size, dout=None, tuning=None, **options):
    """out, lse (and dq with dout) through cuda_quant's wrappers on the emulation."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.attention import _row_delta
    from mlx_flash.backends import cuda_quant

    qspec, inputs, k, v = validate_attention_quantized(q, kq, vq, bits=bits, group_size=group_size, **options)
    saved = dict(cuda_quant.TUNING)
    cuda_quant.TUNING.update(tuning or {})
    cuda_quant.forward_plan.cache_clear()
    cuda_quant.decode_plan.cache_clear()
    try:
        with harness.patched_cuda_kernel():
            out, lse = cuda_quant.quantized_attention_forward(q, k, v, qspec, inputs, mx.cpu)
            mx.eval(out, lse)
            res = {"out": to_np(out), "lse": to_np(lse)}
            if dout is not None:
                delta = _row_delta(out, dout, None)
                dq = cuda_quant.quantized_attention_backward(q, k, v, lse, delta, dout, qspec, inputs, mx.cpu)
                res["dq"] = to_np(dq)
    finally:
        cuda_quant.TUNING.clear()
        cuda_quant.TUNING.update(saved)
        cuda_quant.forward_plan.cache_clear()
        cuda_quant.decode_plan.cache_clear()
    return res


def _check(got, want, dtype, plain=None, names=("out", "lse", "dq")):
    for name in names:
        if name in got:
            check_close(name, got[name], want, F32 if name == "lse" else dtype, plain)


@emulated
@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_every_bits_and_group_size(bits, group_size):
    gen, q, kq, vq, kd, vd = _case(("bits", bits, group_size), 1, 4, 2, 3, 45, 128, bits=bits,
                                   group_size=group_size)
    dout = randn(gen, q.shape)
    got = _emu(q, kq, vq, bits, group_size, dout=dout)
    _check(got, attention_np(q, kd, vd, dout=dout), F32)


# (B, Hq, Hkv, Nq, Nk, D, Dv, bits, group): one key, odd sizes, Nq > Nk,
# Dv != D (both ways), MQA decode over many keys, rows not filling a warp.
SHAPES = [
    (1, 1, 1, 1, 1, 32, 32, 4, 32),
    (2, 4, 2, 17, 113, 64, 64, 3, 32),
    (1, 6, 2, 13, 7, 64, 32, 5, 32),
    (1, 2, 1, 5, 70, 32, 96, 6, 32),
    (1, 8, 1, 1, 1000, 128, 128, 4, 64),
    (1, 3, 3, 2, 300, 64, 64, 8, 64),
    # V rows too wide for a 32-key stage: 8-key stages (8-bit 256; 8-bit 512, group 32).
    (1, 4, 1, 1, 300, 256, 256, 8, 64),
    (1, 2, 1, 2, 70, 64, 512, 8, 32),
]


@emulated
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape):
    B, Hq, Hkv, Nq, Nk, D, Dv, bits, gs = shape
    gen, q, kq, vq, kd, vd = _case(("shape",) + shape, B, Hq, Hkv, Nq, Nk, D, Dv, bits=bits, group_size=gs)
    dout = randn(gen, (B, Hq, Nq, Dv))
    got = _emu(q, kq, vq, bits, gs, dout=dout)
    _check(got, attention_np(q, kd, vd, dout=dout), F32)


FEATURES = {
    "causal": lambda g, Hq, Nq, Nk: {"causal": True},
    "window": lambda g, Hq, Nq, Nk: {"window": (9, 3)},
    "softcap": lambda g, Hq, Nq, Nk: {"softcap": 2.0},
    "alibi": lambda g, Hq, Nq, Nk: {"alibi_slopes": mx.array(g.uniform(0.01, 0.2, (Hq,)).astype(np.float32))},
    "sinks": lambda g, Hq, Nq, Nk: {"sinks": mx.array(g.standard_normal(Hq).astype(np.float32))},
    "bool_mask": lambda g, Hq, Nq, Nk: {"mask": mx.array(g.random((1, 1, Nq, Nk)) < 0.7)},
    "additive_mask": lambda g, Hq, Nq, Nk: {"mask": mx.array(g.standard_normal((1, Hq, Nq, Nk)).astype(np.float32))},
    "combined": lambda g, Hq, Nq, Nk: {"causal": True, "softcap": 3.0, "sinks": mx.array(
        g.standard_normal(Hq).astype(np.float32)), "alibi_slopes": mx.array(
        g.uniform(0.01, 0.2, (1, Hq)).astype(np.float32)), "mask": mx.array(g.random((Nq, Nk)) < 0.8)},
}


@emulated
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(feature):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 11, 77, 64
    gen, q, kq, vq, kd, vd = _case(("feature", feature), B, Hq, Hkv, Nq, Nk, D, bits=4, group_size=32)
    opts = FEATURES[feature](gen, Hq, Nq, Nk)
    dout = randn(gen, (B, Hq, Nq, D))
    got = _emu(q, kq, vq, 4, 32, dout=dout, **opts)
    _check(got, attention_np(q, kd, vd, dout=dout, **opts), F32)


@emulated
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_split_path(splits):
    """GQA decode (4 heads per KV head share a warp), keys split over warps and
    merged by attention_combine, with sinks (one -inf) and a window that
    leaves some splits empty."""
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 1, 1100, 128
    gen, q, kq, vq, kd, vd = _case(("split", splits), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4, group_size=64)
    opts = {"window": (700, 0), "sinks": mx.array(np.r_[gen.standard_normal(7), -np.inf].astype(np.float32))}
    got = _emu(q, kq, vq, 4, 64, tuning={"splits": splits}, **opts)
    want = attention_np(q, kd, vd, **opts)
    plain = plain_errors(q, kd.astype(F16), vd.astype(F16), mx.ones((B, Hq, Nq, D), F16), opts, F16)
    _check(got, want, F16, plain, names=("out",))
    assert reference_error("lse", got["lse"], want) < 1e-3


@emulated
@pytest.mark.parametrize("dtype", [F16, B16])
def test_half_precision_q_and_scales(dtype):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 19, 90, 64
    gen, q, kq, vq, kd, vd = _case(("half", str(dtype)), B, Hq, Hkv, Nq, Nk, D, dtype=dtype, bits=4)
    dout = randn(gen, (B, Hq, Nq, D), dtype)
    opts = {"causal": True}
    got = _emu(q, kq, vq, 4, 64, dout=dout, **opts)
    want = attention_np(q, kd, vd, dout=dout, **opts)
    plain = plain_errors(q, kd.astype(dtype), vd.astype(dtype), dout, opts, dtype)
    _check(got, want, dtype, plain, names=("out", "dq"))
    assert reference_error("lse", got["lse"], want) < 1e-2


@emulated
def test_float32_q_over_bfloat16_scales():
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 4, 50, 64
    gen, q, kq, vq, kd, vd = _case(("mixed",), B, Hq, Hkv, Nq, Nk, D, dtype=F32, scale_dtype=B16, bits=6,
                                   group_size=32)
    dout = randn(gen, q.shape)
    got = _emu(q, kq, vq, 6, 32, dout=dout, causal=True)
    _check(got, attention_np(q, kd, vd, dout=dout, causal=True), F32)


@emulated
def test_nonfinite_contract():
    """A NaN (scale of) key/value j reaches exactly the rows that keep j
    (forward and dq); masked-out rows stay 0 / -inf; a NaN sink and a +inf
    logit make their rows NaN."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 6, 40, 32
    gen, q, kq, vq, _, _ = _case(("nan",), B, Hq, Hkv, Nq, Nk, D, bits=4, group_size=32)
    j = Nk - Nq + 3  # the key query 3 is the first to see (causal, bottom-right)
    clean = (kq, vq)
    ks, vs = np.array(kq[1]), np.array(vq[1])
    ks[:, :, j] = np.nan
    vs[:, :, j] = np.nan
    kq, vq = (kq[0], mx.array(ks), kq[2]), (vq[0], mx.array(vs), vq[2])
    got = _emu(q, kq, vq, 4, 32, dout=mx.ones((B, Hq, Nq, D)), causal=True)
    for i in range(Nq):
        sees = i >= 3
        for name in ("out", "dq"):
            assert np.all(np.isnan(got[name][:, :, i])) == sees, (name, i)
            assert sees or np.all(np.isfinite(got[name][:, :, i])), (name, i)
    # Fully masked row 1: out 0, lse -inf, dq 0, even with a NaN key elsewhere.
    m = np.ones((Nq, Nk), bool)
    m[1] = False
    got = _emu(q, kq, vq, 4, 32, dout=mx.ones((B, Hq, Nq, D)), mask=mx.array(m))
    assert np.all(got["out"][:, :, 1] == 0) and np.all(got["lse"][:, :, 1] == -np.inf)
    assert np.all(got["dq"][:, :, 1] == 0)
    # NaN sink: its head's rows NaN; the other head finite (no NaN key kept by this mask).
    m2 = np.ones((Nq, Nk), bool)
    m2[:, j] = False
    got = _emu(q, kq, vq, 4, 32, mask=mx.array(m2), sinks=mx.array([np.nan, 0.5], mx.float32))
    assert np.all(np.isnan(got["out"][:, 0])) and np.all(np.isnan(got["lse"][:, 0]))
    assert np.all(np.isfinite(got["out"][:, 1]))
    # +inf additive mask entry on a kept key: that row NaN (clean k/v: an
    # additive -inf on a NaN logit would stay NaN, rule 2).
    add = np.zeros((Nq, Nk), np.float32)
    add[:, j] = -np.inf
    add[2, 5] = np.inf
    got = _emu(q, *clean, 4, 32, mask=mx.array(add))
    assert np.all(np.isnan(got["out"][:, :, 2])) and np.all(np.isnan(got["lse"][:, :, 2]))
    rest = [0, 1, 3, 4, 5]
    assert np.all(np.isfinite(got["out"][:, :, rest])) and np.all(np.isfinite(got["lse"][:, :, rest]))


# ---- the tensor-core forward (attention_quant_fwd_mma; 16-bit q) ----------------------

MMA = {"mma": True}


def _check_mma(q, kd, vd, got, dtype, opts):
    want = attention_np(q, kd, vd, **opts)
    plain = plain_errors(q, kd.astype(dtype), vd.astype(dtype), mx.ones(got["out"].shape, dtype), opts, dtype)
    _check(got, want, dtype, plain, names=("out",))
    # The kernel's logits are exact products of q and K rounded to q's dtype
    # summed in fp32: lse against the reference over that rounded K (against
    # fp32 K a logit near 0 carries K's rounding as a large relative error).
    want_rounded = attention_np(q, kd.astype(dtype), vd.astype(dtype), **opts)
    assert reference_error("lse", got["lse"], want_rounded) < 1e-3


@emulated
@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
def test_mma_every_bits(bits):
    gs = 32 if bits in (3, 5) else 128
    gen, q, kq, vq, kd, vd = _case(("mma-bits", bits), 1, 2, 1, 40, 100, 128, dtype=F16, bits=bits, group_size=gs)
    _check_mma(q, kd, vd, _emu(q, kq, vq, bits, gs, tuning=MMA, causal=True), F16, {"causal": True})


# (B, Hq, Hkv, Nq, Nk, D, Dv): one key, rows and keys not multiples of the
# tiles, Dv != D both ways, Nq > Nk, head dim 128.
MMA_SHAPES = [
    (1, 1, 1, 1, 1, 32, 32),
    (1, 4, 2, 70, 77, 64, 32),
    (1, 2, 1, 65, 20, 32, 96),
    (2, 2, 2, 17, 130, 128, 128),
]


@emulated
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F16, B16], ids=["float16", "bfloat16"])
def test_mma_shapes(shape, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen, q, kq, vq, kd, vd = _case(("mma-shape", str(dtype)) + shape, B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype,
                                   bits=4, group_size=32)
    _check_mma(q, kd, vd, _emu(q, kq, vq, 4, 32, tuning=MMA), dtype, {})


@emulated
@pytest.mark.parametrize("feature", list(FEATURES))
def test_mma_features(feature):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 37, 90, 64
    gen, q, kq, vq, kd, vd = _case(("mma-feature", feature), B, Hq, Hkv, Nq, Nk, D, dtype=B16, bits=4,
                                   group_size=64)
    opts = FEATURES[feature](gen, Hq, Nq, Nk)
    _check_mma(q, kd, vd, _emu(q, kq, vq, 4, 64, tuning=MMA, **opts), B16, opts)


@emulated
@pytest.mark.parametrize("tile", [(8, 64), (4, 64), (8, 32)], ids=lambda t: f"{t[0]}warps-{t[1]}keys")
def test_mma_tiles(tile):
    """Other block/tile sizes than the small shapes' 4 x 32: the prefill
    default 8 x 64, threads owning two staged chunks (4 x 64, D 128), fewer
    chunks than threads (D 96), several tiles with a ragged last one,
    windowed so tiles start mid-range."""
    nw, bn = tile
    for key, (Hq, Hkv, Nq, Nk, D, Dv, bits, gs) in (("d128", (4, 2, 70, 150, 128, 128, 4, 64)),
                                                    ("d96", (2, 1, 33, 101, 96, 64, 3, 32))):
        gen, q, kq, vq, kd, vd = _case(("mma-tile", nw, bn, key), 1, Hq, Hkv, Nq, Nk, D, Dv, dtype=F16, bits=bits,
                                       group_size=gs)
        opts = {"causal": True, "window": (60, 0)}
        got = _emu(q, kq, vq, bits, gs, tuning={"mma": True, "mma_warps": nw, "mma_bn": bn}, **opts)
        _check_mma(q, kd, vd, got, F16, opts)


def test_mma_plan():
    """8 warps x 64 keys when such blocks fill the SMs (the 2048-query chunk),
    4 x 32 for smaller chunks, the SIMT split kernel below one 64-row block per SM."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant

    gen = rng("cuda-quant-plan")
    kq = tuple(mx.quantize(randn(gen, (1, 8, 64, 128), F16), group_size=64, bits=4))

    def plan(nq):
        q = mx.zeros((1, 32, nq, 128), F16)
        qspec = validate_attention_quantized(q, kq, kq, bits=4, group_size=64, causal=True)[0]
        return cuda_quant.uses_mma(qspec), cuda_quant.mma_tile(qspec)

    assert plan(2048) == (True, (8, 64))
    assert plan(512) == (True, (4, 32))
    assert plan(200)[0] is False


@emulated
def test_mma_nonfinite_logits():
    """A NaN key scale (a NaN logit) reaches exactly the rows that keep the key,
    also inside tiles that skip the logit rules (causal, keys well before the
    diagonal); a +inf additive mask entry and a NaN sink make their rows NaN;
    a row that keeps no key gives 0 and the sink's lse."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 20, 150, 64
    gen, q, kq, vq, kd, vd = _case(("mma-nan-k",), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4, group_size=32)
    for j, first_row in ((Nk - Nq + 7, 7), (10, 0)):  # on the diagonal; in a tile every row keeps whole
        ks = np.array(kq[1].astype(F32))
        ks[:, :, j] = np.nan
        got = _emu(q, (kq[0], mx.array(ks).astype(F16), kq[2]), vq, 4, 32, tuning=MMA, causal=True)
        for i in range(Nq):
            assert np.all(np.isnan(got["out"][:, :, i])) == (i >= first_row), (j, i)
            assert np.all(np.isnan(got["lse"][:, :, i])) == (i >= first_row), (j, i)
            assert i >= first_row or np.all(np.isfinite(got["out"][:, :, i])), (j, i)
    add = np.zeros((Nq, Nk), np.float32)
    add[3, 40] = np.inf
    add[5] = -np.inf
    got = _emu(q, kq, vq, 4, 32, tuning=MMA, mask=mx.array(add), sinks=mx.array([np.nan, 0.5], mx.float32))
    assert np.all(np.isnan(got["out"][:, 0])) and np.all(np.isnan(got["lse"][:, 0]))
    assert np.all(np.isnan(got["out"][:, 1, 3])) and np.isnan(got["lse"][0, 1, 3])
    # Row 5 keeps no key: out 0, lse the sink's alone.
    assert np.all(got["out"][:, 1, 5] == 0) and abs(got["lse"][0, 1, 5] - 0.5) < 1e-6
    rest = [i for i in range(Nq) if i not in (3, 5)]
    assert np.all(np.isfinite(got["out"][:, 1, rest])) and np.all(np.isfinite(got["lse"][:, 1, rest]))


@emulated
def test_mma_float16_q_over_float32_scales():
    gen, q, kq, vq, kd, vd = _case(("mma-f32-scales",), 1, 4, 2, 50, 90, 64, dtype=F16, scale_dtype=F32, bits=8,
                                   group_size=32)
    _check_mma(q, kd, vd, _emu(q, kq, vq, 8, 32, tuning=MMA, causal=True), F16, {"causal": True})


@emulated
def test_mma_nonfinite_value_takes_the_exact_path():
    """A NaN value scale of key j: exactly the rows that keep j (causal) are
    NaN, the others finite and correct (the tile's P.V runs element-wise)."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 20, 70, 32
    gen, q, kq, vq, kd, vd = _case(("mma-nan",), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4, group_size=32)
    j = Nk - Nq + 5
    vs = np.array(vq[1].astype(F32))
    vs[:, :, j] = np.nan
    vq_nan = (vq[0], mx.array(vs).astype(F16), vq[2])
    got = _emu(q, kq, vq_nan, 4, 32, tuning=MMA, causal=True)
    want = attention_np(q, kd, vd, causal=True)
    assert np.all(np.isnan(got["out"][:, :, 5:])) and np.all(np.isfinite(got["out"][:, :, :5]))
    assert np.all(np.isfinite(got["lse"]))
    err = np.abs(got["out"][:, :, :5] - want["out"][:, :, :5]).max()
    assert err < 1e-2, err


# ---- caches read in place: strided views, never copied --------------------------------

def _poisoned(gen, x, before, after):
    """x with `before`/`after` extra token rows around it: garbage codes, NaN
    scales and biases (a kernel that reads them gives NaN)."""
    B, H, N, W = x.shape
    if x.dtype == mx.uint32:
        pad = lambda n: mx.array(gen.integers(0, 2**32, (B, H, n, W), dtype=np.uint64).astype(np.uint32))
    else:
        pad = lambda n: mx.full((B, H, n, W), np.nan, x.dtype)
    return mx.concatenate([pad(before), x, pad(after)], axis=2)


def _view(gen, x, layout):
    """The same values as x, as a view of a bigger or differently laid out buffer."""
    N = x.shape[2]
    if layout == "cache_slice":  # QuantizedKVCache: keys[..., :offset, :] of a preallocated buffer
        return _poisoned(gen, x, 0, 37)[..., :N, :]
    if layout == "offset_slice":
        return _poisoned(gen, x, 5, 11)[..., 5:5 + N, :]
    if layout == "token_major":  # a [B, N, H, W] buffer seen as [B, H, N, W]
        return mx.contiguous(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "column_strided":  # last dim not unit-stride: the word-by-word path
        return mx.contiguous(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    if layout == "batch_broadcast":  # one cache shared by the batch (stride 0)
        return mx.broadcast_to(_poisoned(gen, x[:1], 0, 9)[..., :N, :], x.shape)
    raise ValueError(layout)


def _first_batch_for_all(kq, vq, kd, vd):
    first = lambda x: mx.contiguous(mx.broadcast_to(x[:1], x.shape))
    return tuple(first(x) for x in kq), tuple(first(x) for x in vq), first(kd), first(vd)


LAYOUTS = ["cache_slice", "offset_slice", "token_major", "column_strided", "batch_broadcast"]


def _views(gen, kq, vq, layout):
    views = [tuple(_view(gen, x, layout) for x in t) for t in (kq, vq)]
    mx.eval(views)
    # The kernels must see views, not dense copies (the harness passes MLX's strides).
    words = harness._view_bytes(views[0][0])[1][:4]
    B, H, N, W = kq[0].shape
    assert list(words) != [H * N * W, N * W, W, 1], words
    return views


@emulated
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_cache_views(layout):
    """Decode (GQA rows sharing a warp, keys split), prefill rows and dq, over
    k/v triples that are views: the values of the dense triple, poisoned rows
    around them in the buffer (NaN if read)."""
    for key, (B, Hq, Hkv, Nq, Nk, D, bits, gs, splits) in (
            ("decode", (2, 8, 2, 1, 300, 64, 4, 32, 3)), ("prefill", (2, 4, 2, 9, 70, 64, 3, 32, 1))):
        gen, q, kq, vq, kd, vd = _case(("strided", layout, key), B, Hq, Hkv, Nq, Nk, D, bits=bits,
                                       group_size=gs)
        if layout == "batch_broadcast":  # every batch row reads batch 0's cache
            kq, vq, kd, vd = _first_batch_for_all(kq, vq, kd, vd)
        kv, vv = _views(gen, kq, vq, layout)
        dout = randn(gen, (B, Hq, Nq, D))
        opts = {"causal": True} if key == "prefill" else {"sinks": randn(gen, (Hq,))}
        got = _emu(q, kv, vv, bits, gs, dout=dout, tuning={"splits": splits}, **opts)
        _check(got, attention_np(q, kd, vd, dout=dout, **opts), F32)


@emulated
@pytest.mark.parametrize("layout", ["cache_slice", "column_strided", "batch_broadcast"])
def test_mma_strided_cache_views(layout):
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 40, 75, 64
    gen, q, kq, vq, kd, vd = _case(("mma-strided", layout), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4,
                                   group_size=32)
    if layout == "batch_broadcast":
        kq, vq, kd, vd = _first_batch_for_all(kq, vq, kd, vd)
    kv, vv = _views(gen, kq, vq, layout)
    _check_mma(q, kd, vd, _emu(q, kv, vv, 4, 32, tuning=MMA, causal=True), F16, {"causal": True})


# ---- the tensor-core decode (attention_quant_decode; 16-bit q, G * Nq <= 8) -----------

DECODE = {"decode": True}


def _check_decode(q, kd, vd, got, dtype, opts, lse=True):
    """out against the float64 reference (with the plain fp16/bf16 computation's
    error as yardstick), lse within 1e-3 relative (the kernel's scales are
    applied in fp32; only q.k's products of codes pass the tensor cores)."""
    want = attention_np(q, kd, vd, **opts)
    plain = plain_errors(q, kd.astype(dtype), vd.astype(dtype), mx.ones(got["out"].shape, dtype), opts, dtype)
    _check(got, want, dtype, plain, names=("out",))
    if lse:
        assert reference_error("lse", got["lse"], want) < 1e-3


def _uses_decode(q, kq, vq, bits, gs, **opts):
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant

    return cuda_quant.uses_decode(validate_attention_quantized(q, kq, vq, bits=bits, group_size=gs, **opts)[0])


# (B, Hq, Hkv, Nq, Nk, D, Dv, bits, group, dtype, warps, splits): one key, odd
# key counts (a partial last tile, splits of unequal length, empty splits),
# GQA 4:1 and 8:1, MQA, two or three queries per row group, Dv != D, every
# group size the kernel takes, bf16 over 4-bit codes, 1/2/4/8 warps per block.
DECODE_SHAPES = [
    (1, 4, 1, 1, 1, 64, 64, 4, 64, F16, 4, 1),
    (1, 8, 2, 1, 17, 128, 128, 4, 64, F16, 4, 3),
    (2, 8, 2, 1, 113, 128, 128, 8, 64, F16, 2, 2),
    (1, 8, 1, 1, 1023, 128, 128, 4, 128, F16, 4, 5),
    (1, 4, 4, 1, 300, 64, 128, 8, 32, F16, 1, 4),
    (1, 8, 2, 2, 77, 128, 64, 4, 64, B16, 8, 2),
    (1, 2, 1, 3, 200, 128, 128, 8, 128, F16, 4, 7),
    (2, 6, 2, 2, 129, 64, 64, 4, 64, B16, 2, 16),
    (1, 8, 4, 1, 333, 256, 256, 4, 64, B16, 4, 3),
    (1, 4, 1, 2, 97, 256, 128, 8, 64, F16, 2, 2),
]


def _decode_case(shape):
    """A DECODE_SHAPES case (the same inputs emulated and on the GPU): q, the
    quantized and dequantized caches, bits, group size, dtype, and the TUNING
    of its launch (the decode kernel, its warps and splits)."""
    B, Hq, Hkv, Nq, Nk, D, Dv, bits, gs, dtype, warps, splits = shape
    _, q, kq, vq, kd, vd = _case(("decode",) + shape[:9] + (str(dtype),), B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype,
                                 bits=bits, group_size=gs)
    return q, kq, vq, kd, vd, bits, gs, dtype, {**DECODE, "dec_warps": warps, "dec_splits": splits}


@emulated
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes(shape):
    q, kq, vq, kd, vd, bits, gs, dtype, plan = _decode_case(shape)
    assert _uses_decode(q, kq, vq, bits, gs)
    # Tickets from the pool; zero-filled tickets; KEYS_M (and K's raw codes, 2); FOLD (codes with their magic
    # kept), with and without KEYS_M (and L2 prefetches).
    for extra in ({}, {"dec_pool": False}, {"dec_keys_m": True}, {"dec_keys_m": 2}, {"dec_fold": True},
                  {"dec_fold": True, "dec_keys_m": True, "dec_l2pf": 3}):
        got = _emu(q, kq, vq, bits, gs, tuning={**plan, **extra})
        _check_decode(q, kd, vd, got, dtype, {})
    # Q's fragments in shared memory (QSF), alone, with KEYS_M 2 and with FOLD.
    for extra in ({"dec_q_shared": True}, {"dec_q_shared": True, "dec_keys_m": 2},
                  {"dec_q_shared": True, "dec_fold": True, "dec_pool": False}):
        got = _emu(q, kq, vq, bits, gs, tuning={**plan, **extra})
        _check_decode(q, kd, vd, got, dtype, {})


@emulated
@pytest.mark.parametrize("splits, warps", [(40, 4), (70, 4), (45, 2), (33, 8)])
def test_decode_merge_of_many_splits(splits, warps):
    """The last block's merge (lanes over the splits, rows over the warps): more than 32 and 64 splits (some
    empty: a window), 2 and 8 warps, with sinks (one -inf) and lse; then a NaN V scale in one split reaches
    exactly its KV head's rows."""
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 1, 1200, 128
    gen, q, kq, vq, kd, vd = _case(("decode-many-splits", splits, warps), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4,
                                   group_size=64)
    opts = {"window": (900, 0), "sinks": mx.array(np.r_[gen.standard_normal(Hq - 1), -np.inf].astype(np.float32))}
    tuning = {**DECODE, "dec_splits": splits, "dec_warps": warps}
    got = _emu(q, kq, vq, 4, 64, tuning=tuning, **opts)
    _check_decode(q, kd, vd, got, F16, opts)
    vs = np.array(vq[1])
    vs[:, 1, Nk - 5] = np.nan  # KV head 1's last split: its four query heads
    got = _emu(q, kq, (vq[0], mx.array(vs), vq[2]), 4, 64, tuning=tuning, **opts)
    assert np.all(np.isnan(got["out"][:, 4:])) and np.all(np.isfinite(got["out"][:, :4]))
    assert np.all(np.isfinite(got["lse"]))


DECODE_FEATURES = {
    "causal": lambda g, Hq: {"causal": True},
    "window": lambda g, Hq: {"window": (40, 0)},
    "softcap": lambda g, Hq: {"softcap": 2.0},
    "sinks": lambda g, Hq: {"sinks": mx.array(np.r_[g.standard_normal(Hq - 1), -np.inf].astype(np.float32))},
    "combined": lambda g, Hq: {"window": (60, 2), "softcap": 3.0,
                               "sinks": mx.array(g.standard_normal(Hq).astype(np.float32))},
}


@emulated
@pytest.mark.parametrize("feature", list(DECODE_FEATURES))
def test_decode_features(feature):
    """Two queries per row group (causal bottom-right, a window that empties
    some splits), softcap, sinks (one -inf)."""
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 2, 150, 128
    gen, q, kq, vq, kd, vd = _case(("decode-feature", feature), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4,
                                   group_size=64)
    opts = DECODE_FEATURES[feature](gen, Hq)
    assert _uses_decode(q, kq, vq, 4, 64, **opts)
    # The routed plan; KEYS_M (1, 2); FOLD with L2 prefetches, and with KEYS_M.
    for keys_m, fold, l2pf in ((False, False, 0), (True, False, 0), (2, False, 0), (False, True, 2), (True, True, 0)):
        got = _emu(q, kq, vq, 4, 64, tuning={**DECODE, "dec_splits": 5, "dec_keys_m": keys_m, "dec_fold": fold,
                                             "dec_l2pf": l2pf}, **opts)
        _check_decode(q, kd, vd, got, F16, opts)
    got = _emu(q, kq, vq, 4, 64, tuning={**DECODE, "dec_splits": 5, "dec_q_shared": True}, **opts)  # QSF
    _check_decode(q, kd, vd, got, F16, opts)


@emulated
def test_decode_routing():
    """The decode kernel takes exactly its cases; the rest keep main's kernels."""
    gen, q, kq, vq, _, _ = _case(("decode-route",), 1, 8, 2, 1, 40, 128, dtype=F16, bits=4, group_size=64)
    assert _uses_decode(q, kq, vq, 4, 64)
    assert _uses_decode(q, kq, vq, 4, 64, softcap=1.0, causal=True)
    assert not _uses_decode(q.astype(F32), kq, vq, 4, 64)                       # fp32 q
    assert not _uses_decode(q, kq, vq, 4, 64, mask=mx.ones((1, 40), mx.bool_))  # masks
    assert not _uses_decode(q, kq, vq, 4, 64, alibi_slopes=mx.ones((8,)))       # ALiBi
    q2 = mx.concatenate([q, q, q], axis=2)
    assert not _uses_decode(q2, kq, vq, 4, 64)                                   # 12 rows per KV head
    for bits, gs, dtype in ((4, 32, F16), (3, 64, F16), (8, 64, B16), (6, 64, F16)):
        _, q3, k3, v3, _, _ = _case(("decode-route", bits, gs), 1, 4, 1, 1, 20, 64, dtype=dtype, bits=bits,
                                    group_size=gs)
        assert not _uses_decode(q3, k3, v3, bits, gs), (bits, gs, dtype)
    _, q4, k4, v4, _, _ = _case(("decode-route-wide",), 1, 2, 1, 1, 20, 512, dtype=F16, bits=4, group_size=64)
    assert not _uses_decode(q4, k4, v4, 4, 64)                                   # head dim > 256
    _, q5, k5, v5, _, _ = _case(("decode-route-wide8",), 1, 2, 1, 1, 20, 256, dtype=F16, bits=8, group_size=64)
    assert not _uses_decode(q5, k5, v5, 8, 64)                                   # 8-bit Dv 256 (spills)


@emulated
@pytest.mark.parametrize("extra", [{}, {"dec_keys_m": True}, {"dec_keys_m": 2}, {"dec_fold": True},
                                   {"dec_fold": True, "dec_keys_m": True}, {"dec_q_shared": True}],
                         ids=["default", "keys_m", "keys_m_raw", "fold", "fold_keys_m", "q_shared"])
def test_decode_nonfinite(extra):
    """A NaN scale of key j reaches exactly the rows that keep j (K's: the
    logit; V's: the output); a NaN key a window drops, the last key (read
    again for a partial tile's padding) included, leaks nowhere; a NaN sink
    makes its head's rows NaN."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 1, 2, 51, 64
    gen, q, kq, vq, kd, vd = _case(("decode-nan",), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=4, group_size=64)
    tuning = {**DECODE, "dec_splits": 3, **extra}
    j = Nk - 1  # seen by query 1 only (causal, bottom-right); also the padding's stand-in
    for which in ("k", "v"):
        t = kq if which == "k" else vq
        sc = np.array(t[1])
        sc[:, :, j] = np.nan
        bad = (t[0], mx.array(sc), t[2])
        kk, vv = (bad, vq) if which == "k" else (kq, bad)
        got = _emu(q, kk, vv, 4, 64, tuning=tuning, causal=True)
        assert np.all(np.isnan(got["out"][:, :, 1])), which
        assert np.all(np.isfinite(got["out"][:, :, 0])) and np.all(np.isfinite(got["lse"][:, :, 0])), which
        if which == "k":
            assert np.all(np.isnan(got["lse"][:, :, 1]))
    # Keys 0..9 NaN (K and V), outside every row's window: nothing leaks.
    ks, vs = np.array(kq[1]), np.array(vq[1])
    ks[:, :, :10] = np.nan
    vs[:, :, :10] = np.nan
    kk, vv = (kq[0], mx.array(ks), kq[2]), (vq[0], mx.array(vs), vq[2])
    opts = {"window": (30, 0)}
    got = _emu(q, kk, vv, 4, 64, tuning=tuning, **opts)
    _check_decode(q, kd, vd, got, F16, opts)
    # NaN sink: head 0's rows NaN, the others as the reference.
    sinks = mx.array([np.nan, 0.3, -1.0, 2.0], mx.float32)
    got = _emu(q, kq, vq, 4, 64, tuning=tuning, sinks=sinks)
    assert np.all(np.isnan(got["out"][:, 0])) and np.all(np.isnan(got["lse"][:, 0]))
    want = attention_np(q, kd, vd, sinks=sinks)
    assert np.allclose(got["out"][:, 1:], np.asarray(want["out"])[:, 1:], atol=2e-3)


@emulated
def test_decode_no_keys():
    """No key at all: out 0 and lse -inf; with sinks, out 0 and lse = the sink."""
    gen, q, kq, vq, _, _ = _case(("decode-empty",), 1, 8, 2, 1, 5, 128, dtype=F16, bits=4, group_size=64)
    kq, vq = (tuple(x[:, :, :0] for x in t) for t in (kq, vq))
    assert _uses_decode(q, kq, vq, 4, 64)
    got = _emu(q, kq, vq, 4, 64, tuning=DECODE)
    assert np.all(got["out"] == 0) and np.all(got["lse"] == -np.inf)
    sinks = randn(gen, (8,))
    got = _emu(q, kq, vq, 4, 64, tuning=DECODE, sinks=sinks)
    assert np.all(got["out"] == 0) and np.allclose(got["lse"][0, :, 0], np.asarray(sinks))


@emulated
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_strided_cache_views(layout):
    """The decode kernel reads views in place (word-by-word where not dense)."""
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 1, 90, 128
    for bits in (4, 8):
        gen, q, kq, vq, kd, vd = _case(("decode-strided", layout, bits), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=bits,
                                       group_size=64)
        if layout == "batch_broadcast":
            kq, vq, kd, vd = _first_batch_for_all(kq, vq, kd, vd)
        kv, vv = _views(gen, kq, vq, layout)
        # The routed plan, KEYS_M, FOLD with L2 prefetches (which only a dense cache takes).
        for keys_m, fold in ((False, False), (True, False), (False, True)):
            got = _emu(q, kv, vv, bits, 64, tuning={**DECODE, "dec_splits": 2, "dec_keys_m": keys_m, "dec_fold": fold,
                                                    "dec_l2pf": 2 * fold})
            _check_decode(q, kd, vd, got, F16, {})
        got = _emu(q, kv, vv, bits, 64, tuning={**DECODE, "dec_splits": 2, "dec_q_shared": True})
        _check_decode(q, kd, vd, got, F16, {})


@emulated
def test_decode_plan():
    """Splits fill the GPU (a few blocks per SM) but keep whole tiles per warp."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant as cq

    def plan(B, Hkv, Nk):
        gen, q, kq, vq, _, _ = _case(("decode-plan", B, Hkv, Nk), B, 4 * Hkv, Hkv, 1, Nk, 64, dtype=F16)
        cq.decode_plan.cache_clear()
        return cq.decode_plan(validate_attention_quantized(q, kq, vq, bits=4, group_size=64)[0])

    # One wave of the 4-warp blocks that fit an SM (3); whole tiles per warp.
    nw, splits, smem = plan(1, 8, 32768)
    assert nw == cq._DEC_WARPS and splits == cq._SMS * (cq._DEC_RESIDENT_WARPS["narrow"] // nw) // 8 == 49
    assert 32768 / splits >= 16 * nw * cq._DEC_MIN_TILES
    # The flag, 4 warps' scale stages (D 64, group 64: 2 planes of 32 lanes), the merge areas ([4][8][64] o,
    # m, l, the V bias terms).
    assert smem == 16 + 4 * 4 * 32 * 2 + 4 * (4 * 8 * 64 + 2 * 4 * 8 + 4 * 8 * 1)
    assert plan(1, 1, 20)[1] == 1
    assert plan(64, 8, 4096)[1] == 1
    # D 256 (184 registers under NVRTC): 2 blocks of 4 warps an SM, one wave (16384 keys: not capped by tiles).
    gen, q, kq, vq, _, _ = _case(("decode-plan", 256), 1, 32, 8, 1, 16384, 256, dtype=F16)
    cq.decode_plan.cache_clear()
    assert cq.decode_plan(validate_attention_quantized(q, kq, vq, bits=4, group_size=64)[0])[1] == cq._SMS * 2 // 8
    # QSF (Q's fragments in shared memory, 108 registers at 4-bit D 128): 4 blocks an SM, one wave; the
    # fragments (8 bytes a lane a k-step) before the merge areas. 8-bit (146 registers) keeps 3.
    saved = dict(cq.TUNING)
    try:
        cq.TUNING["dec_q_shared"] = True
        nw, splits, smem = plan(1, 8, 32768)
        assert splits == cq._SMS * (cq._DEC_RESIDENT_WARPS["q_shared"] // nw) // 8 == 66
        assert smem == 16 + 4 * 4 * 32 * 2 + 4 * 256 * (64 // 16) + 4 * (4 * 8 * 64 + 2 * 4 * 8 + 4 * 8 * 1)
        gen, q, kq, vq, _, _ = _case(("decode-plan", "q_shared", 8), 1, 32, 8, 1, 32768, 128, dtype=F16, bits=8)
        cq.decode_plan.cache_clear()
        assert cq.decode_plan(validate_attention_quantized(q, kq, vq, bits=8, group_size=64)[0])[1] == 49
    finally:
        cq.TUNING.clear()
        cq.TUNING.update(saved)
        cq.decode_plan.cache_clear()


def test_decode_register_options():
    """FOLD and L2PF: TUNING's where given, else the module's (off)."""
    from mlx_flash.backends import cuda_quant as cq

    saved = dict(cq.TUNING)
    try:
        cq.TUNING.clear()
        assert cq.decode_register_options() == (False, 0)
        cq.TUNING.update(dec_fold=1, dec_l2pf=4)
        assert cq.decode_register_options() == (True, 4)
    finally:
        cq.TUNING.clear()
        cq.TUNING.update(saved)


@pytest.mark.parametrize("key", ["dec_stages", "dec_ring_debug", "dec_ring", "dec_release"])
def test_decode_removed_setting(key):
    """Removed variants' settings (the shared-memory ring removed in session 12, the per-lane cp.async ring in
    session 16, the acquire-release merge ticket in session 17) are an error naming the key, at any value (0
    too), from the plan and from a launch whose plan is already cached: never silently ignored."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant as cq

    gen, q, kq, vq, _, _ = _case(("decode-removed",), 1, 4, 1, 1, 40, 64, dtype=F16)
    qspec = validate_attention_quantized(q, kq, vq, bits=4, group_size=64)[0]
    saved = dict(cq.TUNING)
    try:
        cq.TUNING.clear()
        cq.decode_plan.cache_clear()
        cq.decode_plan(qspec)  # cached before the setting appears
        for value in (0, 4):
            cq.TUNING[key] = value
            with pytest.raises(ValueError, match=rf"TUNING\['{key}'\].*removed"):
                cq._decode_launch(qspec, tuple(q.shape), kq[1].dtype, vq[1].dtype, tuple(cq.TUNING.items()))
            cq.decode_plan.cache_clear()
            with pytest.raises(ValueError, match=rf"TUNING\['{key}'\].*removed"):
                cq.decode_plan(qspec)
    finally:
        cq.TUNING.clear()
        cq.TUNING.update(saved)
        cq.decode_plan.cache_clear()


# ---- the same decode cases on a CUDA GPU (skipped without one) ----------------------

def _gpu_reason():
    import backends

    return backends.skip_reason("cuda")


on_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


def _gpu(q, kq, vq, bits, group_size, tuning=None, **options):
    """out, lse through cuda_quant's wrappers on the GPU (mx.fast.cuda_kernel itself)."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant

    qspec, inputs, k, v = validate_attention_quantized(q, kq, vq, bits=bits, group_size=group_size, **options)
    saved = dict(cuda_quant.TUNING)
    cuda_quant.TUNING.update(tuning or {})
    cuda_quant.decode_plan.cache_clear()
    try:
        out, lse = cuda_quant.quantized_attention_forward(q, k, v, qspec, inputs, mx.gpu)
        mx.eval(out, lse)
        return {"out": to_np(out), "lse": to_np(lse)}
    finally:
        cuda_quant.TUNING.clear()
        cuda_quant.TUNING.update(saved)
        cuda_quant.decode_plan.cache_clear()


@on_gpu
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes_gpu(shape):
    q, kq, vq, kd, vd, bits, gs, dtype, plan = _decode_case(shape)
    # The register path (pool tickets; zero-filled tickets with its prefetch).
    for extra in ({}, {"dec_pool": False, "dec_prefetch": True}, {"dec_q_shared": True},
                  {"dec_q_shared": True, "dec_keys_m": 2}):
        got = _gpu(q, kq, vq, bits, gs, tuning={**plan, **extra})
        _check_decode(q, kd, vd, got, dtype, {})


@on_gpu
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_keys_m_gpu(shape):
    """KEYS_M (S^T = K Q^T, movmatrix), and with K's raw codes (KEYS_M 2)."""
    q, kq, vq, kd, vd, bits, gs, dtype, plan = _decode_case(shape)
    for keys_m in (1, 2):
        got = _gpu(q, kq, vq, bits, gs, tuning={**plan, "dec_keys_m": keys_m})
        _check_decode(q, kd, vd, got, dtype, {})


@on_gpu
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_fold_gpu(shape):
    """FOLD (K's and V's codes with their magic kept), with and without KEYS_M; L2 prefetches."""
    q, kq, vq, kd, vd, bits, gs, dtype, plan = _decode_case(shape)
    for extra in ({}, {"dec_keys_m": True}, {"dec_pool": False, "dec_prefetch": True}, {"dec_l2pf": 4}):
        got = _gpu(q, kq, vq, bits, gs, tuning={**plan, "dec_fold": True, **extra})
        _check_decode(q, kd, vd, got, dtype, {})


@on_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("feature", list(DECODE_FEATURES))
def test_decode_features_gpu(feature, bits):
    """The routed plan with each feature, 4- and 8-bit; KEYS_M, FOLD, L2 prefetches."""
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 2, 3000, 128
    gen, q, kq, vq, kd, vd = _case(("decode-feature-gpu", feature), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=bits,
                                   group_size=64)
    opts = DECODE_FEATURES[feature](gen, Hq)
    got = _gpu(q, kq, vq, bits, 64, **opts)
    _check_decode(q, kd, vd, got, F16, opts)
    got = _gpu(q, kq, vq, bits, 64, tuning={"dec_keys_m": True}, **opts)
    _check_decode(q, kd, vd, got, F16, opts)
    for extra in ({}, {"dec_keys_m": True}, {"dec_fold": False, "dec_l2pf": 4}):  # FOLD, L2 prefetches
        got = _gpu(q, kq, vq, bits, 64, tuning={"dec_fold": True, **extra}, **opts)
        _check_decode(q, kd, vd, got, F16, opts)
    got = _gpu(q, kq, vq, bits, 64, tuning={"dec_q_shared": True}, **opts)  # QSF
    _check_decode(q, kd, vd, got, F16, opts)


# Launch plans of the decode measured side by side (tools/cuda_decode_profile.py --step):
# the routed plan and its opt-in variants.
LONG_PLANS = {
    "default": {},
    "regs_km": {"dec_keys_m": True},
    "regs_fold": {"dec_fold": True},
    "regs_fold_km": {"dec_fold": True, "dec_keys_m": True},
    "regs_l2pf4": {"dec_l2pf": 4},
    "regs_fold_l2pf4": {"dec_fold": True, "dec_l2pf": 4},
    "q_shared": {"dec_q_shared": True},
    "q_shared_km2": {"dec_q_shared": True, "dec_keys_m": 2},
}


@on_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("path", list(LONG_PLANS))
def test_decode_long_context_gpu(path, bits):
    """The benchmark's shape (GQA 32:8, Nk 32768, 4- and 8-bit) with each
    plan: every split merged."""
    B, Hq, Hkv, Nq, Nk, D = 1, 32, 8, 1, 32768, 128
    gen, q, kq, vq, kd, vd = _case(("decode-long-gpu",), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=bits, group_size=64)
    got = _gpu(q, kq, vq, bits, 64, tuning=LONG_PLANS[path])
    _check_decode(q, kd, vd, got, F16, {})


# ---- nvcc compile check (as MLX wraps each kernel), no spills -----------------------

def _compile_cases():
    from mlx_flash.backends import cuda_quant as cq

    every = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 2), ("WINDOW", True)]
    causal = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 0), ("WINDOW", True)]
    for T, ST in ((mx.float16, mx.float16), (mx.bfloat16, mx.bfloat16), (mx.float32, mx.float16)):
        for bits, feats in ((3, every), (4, causal), (4, every), (8, causal)):
            for rw in (1, 2, 4):
                tmpl = [("T", T), ("KST", ST), ("VST", ST), ("MT", mx.float32)] + feats + [
                    ("D", 128), ("DV", 128), ("BITS", bits), ("GS", 64), ("RW", rw)]
                yield "attention_quant_fwd", cq._FWD_INPUTS, ("part_o", "part_lse"), tmpl + [("W", cq._FWD_WARPS)]
                yield "attention_quant_bwd", cq._BWD_INPUTS, ("dq",), tmpl + [("W", cq._WARPS)]
        # Wide V rows: the forward's 16- and 8-key V stages.
        for d, dv, bits, gs in ((256, 256, 8, 64), (128, 512, 8, 32), (576, 512, 4, 64)):
            tmpl = [("T", T), ("KST", ST), ("VST", ST), ("MT", mx.float32)] + every + [
                ("D", d), ("DV", dv), ("BITS", bits), ("GS", gs), ("RW", 4)]
            yield "attention_quant_fwd", cq._FWD_INPUTS, ("part_o", "part_lse"), tmpl + [("W", cq._FWD_WARPS)]
        if T != mx.float32:
            # The default tile (8 warps x 64 keys) and the 4 x 32 alternative.
            for nw, bn in ((cq._MMA_WARPS, cq._MMA_BN), (4, 32)):
                for bits, feats, d, dv in ((3, every, 128, 128), (4, causal, 128, 128), (8, every, 128, 128),
                                           (6, causal, 64, 96)):
                    yield "attention_quant_fwd_mma", cq._MMA_INPUTS, ("out", "lse"), [
                        ("T", T), ("KST", ST), ("VST", ST), ("MT", mx.float32)] + feats + [
                        ("SINKS", True), ("D", d), ("DV", dv), ("BITS", bits), ("GS", 32), ("NW", nw), ("BN", bn)]


def _decode_compile_cases(opt_in=False):
    """The decode's instances; opt_in: only FOLD / L2PF's / TILES 2's / LATE's, compiled in a translation unit of
    their own (MLX compiles each kernel alone; in one unit with the others they moved nvcc's registers of
    instances that do not use them, an artefact of the single unit)."""
    from mlx_flash.backends import cuda_quant as cq

    outs = ("out", "lse", "scratch")
    W = cq._DEC_WARPS
    for T in (mx.float16, mx.bfloat16):
        for ST in (T, mx.float32):
            for bits, gs, d, dv in ((4, 64, 128, 128), (4, 128, 128, 128), (8, 32, 128, 64), (8, 64, 128, 128),
                                    (4, 64, 64, 64), (8, 128, 128, 128), (4, 64, 256, 256), (8, 64, 256, 128)):
                if T == mx.bfloat16 and bits == 8:
                    continue
                for feats in ((False, False, False), (True, True, True)):
                    # (prefetch, pool, warps, KEYS_M, FOLD, L2PF, TILES): the routed plan (pool tickets), zero-filled
                    # tickets with and without the prefetch, KEYS_M 1 and 2 (S^T = K Q^T; K's raw codes).
                    paths = [(False, True, W, 0, False, 0, 1)] + [
                        (pf, False, W, 0, False, 0, 1) for pf in ((False, True) if bits == 4 and d == 128 else (False,))]
                    paths += [(False, True, W, km, False, 0, 1) for km in (1, 2)]
                    if opt_in:
                        paths = []
                    # FOLD (fp16 only: bf16's instance is the plain one), with KEYS_M and L2 prefetches at D 128.
                    if opt_in and T == mx.float16 and ST == T:
                        paths += [(False, True, W, 0, True, 0, 1)] + (
                            [(False, True, W, 1, True, 0, 1), (False, True, W, 0, True, 4, 1),
                             (False, True, W, 0, False, 4, 1)] if d == dv == 128 and gs == 64 else [])
                    # TILES 2 (two tiles a warp an iteration) and LATE at the benchmark's D 128,
                    # group 64, 4- and 8-bit, scales of q's type (CI time; every shape, dtype and scale type
                    # <= 128 passed once, 172 instances, and took fewer registers), with FOLD (fp16) and the
                    # prefetch (4-bit).
                    new = opt_in and ST == T and (d, dv, gs) == (128, 128, 64)
                    if new:
                        paths += [(False, True, W, 0, False, 0, 2)]
                        if T == mx.float16:
                            paths += [(False, True, W, 0, True, 0, 2)]
                        if bits == 4:
                            paths += [(True, False, W, 0, False, 0, 2)]
                    # LATE (raw scales until staged): TILES 1 and 2, with the prefetch at 4-bit D 128.
                    late_paths = []
                    if new:
                        late_paths = [(False, True, W, 0, False, 0, t2) for t2 in (1, 2)]
                        if bits == 4:
                            late_paths += [(True, False, W, 0, False, 0, 2), (True, False, W, 0, False, 0, 1)]
                    # QSF (Q's fragments in shared memory at D <= 128): every shape and scale type of 128 or
                    # less, plain and with KEYS_M 2 / FOLD at the benchmark's.
                    qsf_paths = []
                    if opt_in and d <= 128:
                        qsf_paths = [(False, True, W, 0, False, 0, 1, False)]
                        if (d, dv, gs) == (128, 128, 64) and ST == T and T == mx.float16:
                            qsf_paths += [(False, True, W, 2, False, 0, 1, False), (False, True, W, 0, True, 0, 1, False)]
                    for pf, pool, nw, keys_m, fold, l2pf, tiles, late, qsf in (
                            [p + (False, False) for p in paths] + [p + (True, False) for p in late_paths] +
                            [p + (True,) for p in qsf_paths]):
                        yield "attention_quant_decode", cq._DEC_INPUTS, outs, [
                            ("T", T), ("KST", ST), ("VST", ST), ("SOFTCAP", feats[0]), ("WINDOW", feats[1]),
                            ("SINKS", feats[2]), ("D", d), ("DV", dv), ("BITS", bits), ("GS", gs),
                            ("NW", nw), ("PF", pf), ("POOL", pool), ("KEYS_M", keys_m),
                            ("FOLD", fold), ("L2PF", l2pf), ("TILES", tiles), ("LATE", late), ("QSF", qsf)]


def _dtypes(names, template):
    t = dict(template)
    table = {"q": t.get("T"), "dout": t.get("T"), "kw": mx.uint32, "vw": mx.uint32, "ks": t.get("KST"),
             "kb": t.get("KST"), "vs": t.get("VST"), "vb": t.get("VST"), "mask": t.get("MT"), "ip": mx.int32,
             "ns": mx.int32, "out": t.get("T"), "dq": t.get("T"), "sinks": mx.float32, "alibi": mx.float32,
             "scratch": mx.float32, "tk": mx.uint32}
    return [(n, table.get(n, mx.float32)) for n in names]


def _ptxas_usage_with_calls(log):
    """{kernel: (registers, spill store bytes, spill load bytes)}, summing
    the lines of any non-inlined callee (ptxas reports each callee's
    properties on their own lines; a spill anywhere counts against the last
    kernel named)."""
    import re

    usage, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            usage[name] = [None, 0, 0]
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name][1] += int(m.group(1))
            usage[name][2] += int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name][0] = int(m.group(1))
    return usage


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("body", ["attention_quant_fwd", "attention_quant_bwd", "attention_quant_fwd_mma",
                                  "attention_quant_decode", "attention_quant_decode-opt_in"])
def test_nvcc_compiles_without_spills(body, tmp_path):
    """Every kernel instance of `body` in one translation unit (as MLX wraps
    each), for sm_90a; ptxas must report no spills."""
    import test_cuda_specific as tcs

    types = {**tcs._CUDA_TYPES, mx.uint32: "uint32_t"}
    kernels = []
    body, opt_in = body.split("-")[0], body.endswith("-opt_in")
    cases = list(_decode_compile_cases(opt_in)) if body == "attention_quant_decode" else _compile_cases()
    for n, (name, inputs, outputs, template) in enumerate(c for c in cases if c[0] == body):
        saved = dict(tcs._CUDA_TYPES)
        tcs._CUDA_TYPES.update(types)
        try:
            kernels.append(tcs._kernel_text(f"{body}_{n}", tcs.cuda_backend._read(body + ".cu"),
                                            _dtypes(inputs, template), _dtypes(outputs, template), template))
        finally:
            tcs._CUDA_TYPES.clear()
            tcs._CUDA_TYPES.update(saved)
    log = tcs._nvcc_compile(tmp_path, body, tcs._prelude(tcs.cuda_backend.kernel_headers(body)) + "\n" + "\n".join(kernels),
                            flags=("-Xptxas", "-v"))
    usage = tcs.ptxas_usage(log) if body != "attention_quant_decode" else _ptxas_usage_with_calls(log)
    assert len(usage) == len(kernels), log[-2000:]
    for name, (regs, spill_st, spill_ld) in usage.items():
        assert spill_st == 0 and spill_ld == 0, f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"
