"""Per-batch valid key ranges (`key_start` / `key_len`): values and gradients
against the float64 reference, alone and with causal, window, GQA and masks,
on every backend; bad arguments get clear errors."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import DTYPES, check_close, is_emulated, plain_errors, qkv, randn, rng, to_np
from reference_np import attention_np

import backends
import mlx_flash

# (B, Hq, Hkv, Nq, Nk, D, Dv): Nq < Nk, Nq > Nk, decode, GQA/MQA, Dv != D.
SHAPES = [(3, 4, 2, 17, 45, 24, 24), (2, 2, 1, 45, 17, 16, 32), (3, 4, 1, 1, 113, 32, 32)]
# Metal emulation runs threads as fibers: small B and H, but keys over
# several tiles so that ranges skip some (prefill; decode through the
# split-key path; Nq > Nk).
EMULATED = [(3, 2, 1, 17, 113, 16, 16), (3, 4, 2, 1, 113, 32, 32), (3, 2, 1, 45, 17, 16, 24)]


def _ranges(gen, B, Nk):
    """Starts and lengths with a left-padded row, a range running past Nk,
    a negative start, and (for B >= 3) an empty range."""
    start = gen.integers(-3, Nk // 2, B)
    length = gen.integers(1, Nk + 5, B)
    start[0] = min(Nk - 1, 4)
    length[0] = Nk - start[0]  # left padding only: BatchKVCache's case
    if B >= 3:
        length[2] = 0  # every key dropped: rows give 0 and lse -inf
    return mx.array(start.astype(np.int32)), mx.array(length.astype(np.int32))


def _options(gen, feature, B, Hq, Nq, Nk):
    start, length = _ranges(gen, B, Nk)
    options = {"key_start": start, "key_len": length}
    if feature == "causal":
        options["causal"] = True
    elif feature == "window":
        options["window"] = (5, 2)
    elif feature == "bool_mask":
        options["mask"] = mx.array(gen.random((B, 1, Nq, Nk)) < 0.7)
    elif feature == "additive_mask":
        options["mask"] = randn(gen, (Nq, Nk))
    elif feature == "causal_sinks":
        options.update(causal=True, sinks=randn(gen, (Hq,)))
    elif feature == "start_only":
        del options["key_len"]
    elif feature == "len_only":
        del options["key_start"]
    return options


FEATURES = ["alone", "causal", "window", "bool_mask", "additive_mask", "causal_sinks", "start_only", "len_only"]


def _shapes_for(backend):
    return EMULATED if is_emulated(backend) else SHAPES


def _check(backend, shape, dtype, feature, grads):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("key-range", feature, shape, str(dtype), grads)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    options = _options(gen, feature, B, Hq, Nq, Nk)
    if not grads:
        out, lse = backends.forward(backend, q, k, v, **options)
        want = attention_np(q, k, v, **options)
        plain = None if dtype == mx.float32 else plain_errors(q, k, v, mx.ones(out.shape, dtype), options, dtype)
        check_close("out", to_np(out), want, dtype, plain)
        check_close("lse", to_np(lse), want, mx.float32)
        return
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    wrt = ("q", "k", "v", "mask") if feature == "additive_mask" and backend == "cpu" else ("q", "k", "v")
    got = backends.gradients(backend, q, k, v, dout, wrt=wrt, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None if dtype == mx.float32 else plain_errors(q, k, v, dout, options, dtype)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(got[name]), want, dtype, plain)
    if "mask" in wrt:
        assert got["mask"].shape == options["mask"].shape
        check_close("dmask", to_np(got["mask"]), want["dmask_full"].sum(axis=(0, 1)), dtype)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_forward(backend, feature, dtype):
    for shape in _shapes_for(backend):
        _check(backend, shape, DTYPES[dtype], feature, grads=False)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients(backend, feature, dtype):
    for shape in _shapes_for(backend):
        _check(backend, shape, DTYPES[dtype], feature, grads=True)


def test_same_as_the_equivalent_bool_mask():
    """key ranges drop keys exactly as the [B, 1, 1, Nk] bool mask they stand for."""
    gen = rng("key-range-vs-mask")
    q, k, v = qkv(gen, 3, 4, 2, 17, 30, 16)
    start, length = _ranges(gen, 3, 30)
    j = mx.arange(30)
    keep = ((j >= start[:, None]) & (j < (start + length)[:, None]))[:, None, None, :]
    with mx.stream(mx.cpu):
        a = mlx_flash.flash_attention(q, k, v, key_start=start, key_len=length, causal=True, return_lse=True)
        b = mlx_flash.flash_attention(q, k, v, mask=keep, causal=True, return_lse=True)
    for x, y in zip(a, b):
        assert np.array_equal(to_np(x), to_np(y))


def test_reference_takes_key_ranges():
    gen = rng("key-range-reference")
    q, k, v = qkv(gen, 2, 2, 1, 9, 21, 8)
    start, length = mx.array([3, -2], mx.int32), mx.array([18, 10], mx.int32)
    out, lse = mlx_flash.reference.flash_attention(q, k, v, key_start=start, key_len=length, return_lse=True)
    want = attention_np(q, k, v, key_start=start, key_len=length)
    check_close("out", to_np(out), want, mx.float32)
    check_close("lse", to_np(lse), want, mx.float32)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(key_start=mx.zeros((3,), mx.int32)), ValueError, ["key_start", "[B]=[2]", "[3]"]),
        (dict(key_len=mx.zeros((2, 1), mx.int32)), ValueError, ["key_len", "[B]=[2]", "[2, 1]"]),
        (dict(key_start=mx.zeros((2,))), TypeError, ["key_start", "integer", "float32"]),
        (dict(key_len=[3, 4]), TypeError, ["key_len", "mx.array", "list"]),
    ],
)
def test_bad_key_ranges(overrides, error, words):
    q = mx.ones((2, 4, 5, 8))
    k = mx.ones((2, 2, 7, 8))
    with pytest.raises(error) as info:
        mlx_flash.flash_attention(q, k, k, **overrides)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


@pytest.mark.skipif(backends.skip_reason("metal_emu") is not None, reason=str(backends.skip_reason("metal_emu")))
@pytest.mark.parametrize("nq", [64, 1], ids=["prefill", "decode"])
def test_metal_skips_the_tiles_outside_the_ranges(nq):
    """The Metal kernels never load or multiply a key tile outside the range:
    counted by the instrumented emulation, every kernel that loops over keys
    (forward or decode split, dK/dV, dQ) issues exactly the multiplies and
    K/V reads of the tiles that hold valid keys, here 3 of 16 (fp16, D = 64:
    key tiles of 64 in the forward, blocks of 32 in the backward)."""
    from metal_emu import attention as emu
    from metal_emu import harness

    gen = rng("key-range-counts", nq)
    B, H, Nk, D = 2, 1, 512, 64
    q, k, v = qkv(gen, B, H, H, nq, Nk, D, D, mx.float16)
    dout = randn(gen, (B, H, nq, D), mx.float16)
    ranges = {"key_start": mx.array([384, -7], mx.int32), "key_len": mx.array([128, 71], mx.int32)}

    def count(**options):
        with harness.counting() as records:
            emu.gradients(q, k, v, dout, **options)
        per_kernel = {}
        for r in records:
            name = r["kernel"].removeprefix("mlxf_")
            read = sum(r["buffers"][n][0] for n in ("k", "v") if n in r["buffers"])
            mma, kv = per_kernel.get(name, (0, 0))
            per_kernel[name] = (mma + r["simdgroup_mma"], kv + read)
        return per_kernel

    full, ranged = count(), count(**ranges)
    # Batch 0 keeps keys 384..511 (the last 2 of 8 forward tiles, 4 of 16
    # backward blocks), batch 1 keys 0..63 (the first 1 of 8, 2 of 16).
    for name in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        mma_full, kv_full = full[name]
        mma_ranged, kv_ranged = ranged[name]
        assert mma_full > 0 and kv_full > 0, (name, full)
        assert mma_ranged * 16 == mma_full * 3, (name, mma_ranged, mma_full)
        assert kv_ranged * 16 == kv_full * 3, (name, kv_ranged, kv_full)
