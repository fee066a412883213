"""Bad input gets a clear error naming the argument, what was expected and what came."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash

q = mx.ones((1, 4, 8, 16))
k = mx.ones((1, 2, 10, 16))
v = mx.ones((1, 2, 10, 16))


def call(**overrides):
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return mlx_flash.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(q=mx.ones((4, 8, 16))), ValueError, ["q", "rank 4", "[4, 8, 16]"]),
        (dict(k=mx.ones((1, 3, 10, 16)), v=mx.ones((1, 3, 10, 16))), ValueError, ["multiple", "4", "3"]),
        (dict(v=mx.ones((1, 3, 10, 16))), ValueError, ["head counts", "k 2", "v 3"]),
        (dict(k=mx.ones((1, 2, 10, 8))), ValueError, ["head dim", "16", "8"]),
        (dict(v=mx.ones((1, 2, 11, 16))), ValueError, ["sequence lengths", "10", "11"]),
        (dict(q=mx.ones((1, 4, 8, 600)), k=mx.ones((1, 2, 10, 600))), ValueError, ["q", "head dim", "576", "600"]),
        (dict(v=mx.ones((1, 2, 10, 513))), ValueError, ["v", "head dim", "512", "513"]),
        (dict(k=mx.ones((2, 2, 10, 16)), v=mx.ones((2, 2, 10, 16))), ValueError, ["batch", "1", "2"]),
        (dict(q=mx.ones((1, 4, 8, 16), mx.int32)), TypeError, ["q", "dtype", "int32"]),
        (dict(k=mx.ones((1, 2, 10, 16), mx.float16)), TypeError, ["dtypes must match"]),
        (dict(q=np.ones((1, 4, 8, 16))), TypeError, ["q", "mx.array", "ndarray"]),
        (dict(scale=math.inf), ValueError, ["scale", "finite", "inf"]),
        (dict(scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
        (dict(scale="0.1"), TypeError, ["scale", "str"]),
        (dict(softcap=-1.0), ValueError, ["softcap", "> 0", "-1.0"]),
        (dict(softcap=0.0), ValueError, ["softcap", "> 0"]),
        (dict(window=(1, 2, 3)), ValueError, ["window", "pair"]),
        (dict(window=(-5, 0)), ValueError, ["window", "left", "-5"]),
        (dict(window=(1.5, 0)), TypeError, ["window", "left", "1.5"]),
        (dict(causal=1), TypeError, ["causal", "bool", "int"]),
        (dict(mask=mx.ones((8, 9), mx.bool_)), ValueError, ["mask", "[8, 9]", "[1, 4, 8, 10]"]),
        (dict(mask=mx.ones((1, 1, 1, 8, 10), mx.bool_)), ValueError, ["mask", "at most 4"]),
        (dict(mask=mx.ones((8, 10), mx.int32)), TypeError, ["mask", "bool", "int32"]),
        (dict(alibi_slopes=mx.ones((3,))), ValueError, ["alibi_slopes", "[4]", "[3]"]),
        (dict(alibi_slopes=mx.ones((4,), mx.int32)), TypeError, ["alibi_slopes", "float", "int32"]),
        (dict(sinks=mx.ones((2,))), ValueError, ["sinks", "[4]", "[2]"]),
        (dict(block_mask=mx.ones((1, 4, 1, 1), mx.float32)), TypeError, ["block_mask", "bool", "float32"]),
        (dict(block_mask=mx.ones((1, 4, 2, 1), mx.bool_)), ValueError, ["block_mask", "[1, 4, 2, 1]", "ceil"]),
        (dict(block_mask=mx.ones((1, 1, 1, 1), mx.bool_), block_size=(0, 4)), ValueError, ["block_size", ">= 1"]),
        (dict(block_mask=mx.ones((1, 1, 1, 1), mx.bool_), block_size=(8,)), ValueError, ["block_size", "pair"]),
        (dict(block_size=(8, 8)), ValueError, ["block_size", "without block_mask"]),
        (dict(stream="cpu"), TypeError, ["stream", "str"]),
    ],
)
def test_bad_arguments(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def varlen(**overrides):
    args = dict(q=mx.ones((12, 4, 16)), k=mx.ones((15, 2, 16)), v=mx.ones((15, 2, 16)),
                cu_seqlens_q=mx.array([0, 5, 12]), cu_seqlens_k=mx.array([0, 7, 15]))
    args.update(overrides)
    return mlx_flash.flash_attention_varlen(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k"), **args
    )


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(q=mx.ones((1, 12, 4, 16))), ValueError, ["q", "rank 3", "total_tokens"]),
        (dict(cu_seqlens_q=mx.array([0, 7, 5, 12])), ValueError, ["cu_seqlens_q", "non-decreasing"]),
        (dict(cu_seqlens_q=mx.array([1, 5, 12])), ValueError, ["cu_seqlens_q", "start at 0", "1"]),
        (dict(cu_seqlens_q=mx.array([0, 5, 11])), ValueError, ["cu_seqlens_q", "packed length", "12", "11"]),
        (dict(cu_seqlens_k=mx.array([0, 15])), ValueError, ["cu_seqlens_k", "3 offsets", "2"]),
        (dict(cu_seqlens_q=mx.array([0.0, 5.0, 12.0])), TypeError, ["cu_seqlens_q", "integer", "float32"]),
        (dict(max_seqlen_q=3), ValueError, ["max_seqlen_q", "3", "7"]),
        (dict(mask=mx.ones((12, 15), mx.bool_)), ValueError, ["mask", "not supported", "varlen"]),
        (dict(alibi_slopes=mx.ones((3, 4))), ValueError, ["alibi_slopes", "[2, 4]", "[3, 4]"]),
    ],
)
def test_bad_varlen_arguments(overrides, error, words):
    with pytest.raises(error) as info:
        varlen(**overrides)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_good_calls_pass_validation():
    """The error cases above differ from valid calls only in the named argument."""
    assert call().shape == (1, 4, 8, 16)
    assert varlen().shape == (12, 4, 16)
    assert call(causal=True, window=(None, 3), softcap=2.0, alibi_slopes=mx.ones((1, 4)), sinks=mx.zeros((4,)),
                block_mask=mx.ones((1, 1, 1, 1), mx.bool_), block_size=(8, 16), scale=0.5).shape == (1, 4, 8, 16)
