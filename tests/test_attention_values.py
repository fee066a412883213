"""Forward values (out, lse) and gradients (dq, dk, dv) against the float64 reference,
over shapes, head dims, dtypes and the whole feature matrix, on every backend."""

import mlx.core as mx
import numpy as np
import pytest

from features import FEATURES
from helpers import DTYPES, check_close, is_emulated, plain_errors, qkv, randn, rng, to_np
from reference_np import attention_np

import backends

# (B, Hq, Hkv, Nq, Nk, D, Dv): odd sizes, Nq != Nk both ways, GQA/MQA, Dv != Dqk.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (1, 2, 2, 17, 17, 32, 32),
    (2, 3, 3, 113, 70, 40, 40),
    (1, 4, 2, 70, 113, 59, 59),
    (1, 4, 1, 65, 129, 64, 48),
    (1, 2, 2, 9, 33, 111, 80),
    (1, 1, 1, 33, 33, 256, 256),
    (1, 2, 1, 1, 1023, 64, 64),
    (1, 2, 2, 1023, 1023, 96, 80),  # 32-row query tiles (D + Dv > 160)
    (1, 2, 2, 1023, 17, 8, 8),
]
EMULATED_MAX_N = 130  # the Metal emulator runs threads as fibers on the CPU: keep it small


def _skip_if_too_big(backend, shape):
    if is_emulated(backend) and max(shape[3], shape[4]) > EMULATED_MAX_N:
        pytest.skip(f"N={max(shape[3], shape[4])} is too slow under Metal emulation (covered on real devices)")


def _check_forward(backend, q, k, v, dtype, options):
    out, lse = backends.forward(backend, q, k, v, **options)
    want = attention_np(q, k, v, **options)
    plain = None
    if dtype != mx.float32:
        plain = plain_errors(q, k, v, mx.ones(out.shape, dtype), options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    assert out.dtype == dtype and lse.dtype == mx.float32


def _check_gradients(backend, q, k, v, dtype, options, gen):
    dout = randn(gen, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype)
    grads = backends.gradients(backend, q, k, v, dout, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = plain_errors(q, k, v, dout, options, dtype) if dtype != mx.float32 else None
    for name in ("q", "k", "v"):
        assert grads[name].shape == {"q": q, "k": k, "v": v}[name].shape
        check_close("d" + name, to_np(grads[name]), want, dtype, plain)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_shapes(backend, shape, dtype):
    _skip_if_too_big(backend, shape)
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("fwd", shape, dtype)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, DTYPES[dtype])
    _check_forward(backend, q, k, v, DTYPES[dtype], {})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gradient_shapes(backend, shape, dtype):
    _skip_if_too_big(backend, shape)
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("grad", shape, dtype)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, DTYPES[dtype])
    _check_gradients(backend, q, k, v, DTYPES[dtype], {}, gen)


# Features on two shapes: fewer queries than keys and more queries than keys.
FEATURE_SHAPES = [(2, 4, 2, 45, 77, 40, 40), (1, 3, 1, 77, 45, 24, 32)]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_features(backend, feature, shape, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("feat-fwd", feature, shape, dtype)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, DTYPES[dtype])
    _check_forward(backend, q, k, v, DTYPES[dtype], FEATURES[feature](gen, B, Hq, Nq, Nk))


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gradient_features(backend, feature, shape, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("feat-grad", feature, shape, dtype)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, DTYPES[dtype])
    _check_gradients(backend, q, k, v, DTYPES[dtype], FEATURES[feature](gen, B, Hq, Nq, Nk), gen)


@pytest.mark.parametrize("feature", ["none", "causal", "combined_everything"])
def test_long_sequences_with_features(backend, feature):
    """Many tiles in both directions, so tile skipping and boundaries are exercised."""
    if is_emulated(backend):
        pytest.skip("too slow under Metal emulation (covered on real devices)")
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 300, 523, 64
    gen = rng("long", feature)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D)
    options = FEATURES[feature](gen, B, Hq, Nq, Nk)
    _check_forward(backend, q, k, v, mx.float32, options)
    _check_gradients(backend, q, k, v, mx.float32, options, gen)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_features(backend, feature, dtype):
    """Few queries against many keys (generation): the split-over-keys path."""
    if is_emulated(backend):
        pytest.skip("too slow under Metal emulation (covered on real devices)")
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 3, 700, 64
    gen = rng("decode", feature, dtype)
    q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=DTYPES[dtype])
    _check_forward(backend, q, k, v, DTYPES[dtype], FEATURES[feature](gen, B, Hq, Nq, Nk))
