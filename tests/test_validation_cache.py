"""Validated calls are remembered (host cost of decode), never at the price of a check.

`validate_attention` / `validate_attention_quantized` skip their checks for a
call without optional arrays whose shapes, dtypes and options passed before.
These tests pin that the shortcut gives the same spec as the checks, that a
bad call after a good one of the same shapes still gets its error (values
that compare equal to good ones included: True == 1, 1 == 1.0), and that
results stay right when the same shapes come back with new data.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash import _quant_spec, _spec
from helpers import FP32_TOL, randn, rel_error, rng, to_np
from reference_np import attention_np


def _qkv(key, B=1, Hq=4, Hkv=2, Nq=3, Nk=17, D=16):
    gen = rng("validation_cache", *key)
    return (randn(gen, (B, Hq, Nq, D)), randn(gen, (B, Hkv, Nk, D)), randn(gen, (B, Hkv, Nk, D)))


OPTION_SETS = [
    {},
    {"scale": 0.3},
    {"causal": True},
    {"window": (4, 0)},
    {"window": (None, 2), "softcap": 5.0},
    {"scale": 0.25, "causal": True, "window": (3, -1), "softcap": 2.5},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_remembered_spec_equals_checked_spec(options):
    q, k, v = _qkv(("spec",))
    _spec.VALIDATED_CALLS.clear()
    first, _ = _spec.validate_attention(q, k, v, **options)
    again, inputs = _spec.validate_attention(q, k, v, **options)
    checked, _ = _spec._validate_attention(q, k, v, **options)
    assert first == checked and again == checked
    assert inputs == _spec.AttentionInputs()


@pytest.mark.parametrize("bad, error, words", [
    ({"scale": True}, TypeError, ["scale", "bool"]),
    ({"scale": math.inf}, ValueError, ["scale", "finite", "inf"]),
    ({"scale": float("nan")}, ValueError, ["scale", "finite", "nan"]),
    ({"causal": 1}, TypeError, ["causal", "bool", "int"]),
    ({"window": (True, 0)}, TypeError, ["window", "left", "True"]),
    ({"window": (2, -3)}, ValueError, ["window", "right", "-3"]),
    ({"window": [2, 0, 1]}, ValueError, ["window", "pair"]),
    ({"softcap": 0.0}, ValueError, ["softcap", "> 0"]),
    ({"softcap": True}, TypeError, ["softcap", "bool"]),
])
def test_bad_options_after_good_ones_of_equal_value(bad, error, words):
    """1 == True and 1.0 == 1 as dict keys: the shortcut must not let them through."""
    q, k, v = _qkv(("bad",))
    good = {"scale": 1.0, "causal": True, "window": (1, 0), "softcap": 1.0}
    mx.eval(mlx_flash.flash_attention(q, k, v, **good))  # remembered
    mx.eval(mlx_flash.flash_attention(q, k, v, scale=1.0, window=(2, 0), softcap=2.0))
    with pytest.raises(error) as info:
        mlx_flash.flash_attention(q, k, v, **{**good, **bad})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_arrays_after_good_ones():
    q, k, v = _qkv(("arrays",))
    mx.eval(mlx_flash.flash_attention(q, k, v))
    with pytest.raises(TypeError, match="q: expected an mx.array, got ndarray"):
        mlx_flash.flash_attention(np.array(q), k, v)
    with pytest.raises(TypeError, match="dtypes must match"):
        mlx_flash.flash_attention(q, k.astype(mx.float16), v)
    with pytest.raises(ValueError, match="sequence lengths must match"):
        mlx_flash.flash_attention(q, k, v[:, :, :5])


@pytest.mark.parametrize("options", [{}, {"causal": True, "window": (5, 0)}, {"scale": 0.2, "softcap": 3.0}])
def test_repeated_shapes_new_data_match_reference(options):
    """Same shapes and options with new data (the remembered path) against float64."""
    for i in range(3):
        q, k, v = _qkv(("values", i, tuple(options)), B=2, Hq=4, Hkv=1, Nq=5, Nk=33, D=24)
        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, stream=mx.cpu, **options)
        want = attention_np(q, k, v, **options)
        assert rel_error(to_np(out), want["out"]) < FP32_TOL["out"]
        assert rel_error(to_np(lse), want["lse"]) < FP32_TOL["lse"]


def test_bounded():
    q, k, v = _qkv(("bounded",))
    _spec.VALIDATED_CALLS.clear()
    for i in range(_spec.VALIDATED_CALLS_MAX + 5):
        _spec.validate_attention(q, k, v, scale=1.0 + i)
    assert 0 < len(_spec.VALIDATED_CALLS) <= _spec.VALIDATED_CALLS_MAX
    spec, _ = _spec.validate_attention(q, k, v, scale=2.0)
    assert spec.scale == 2.0


# ---- flash_attention_quantized ------------------------------------------------

def _quantized(key, bits=4, group_size=32, Nk=19):
    q, k, v = _qkv(("quantized", *key), Nk=Nk, D=64)
    kq = tuple(mx.quantize(k, group_size=group_size, bits=bits))
    vq = tuple(mx.quantize(v, group_size=group_size, bits=bits))
    mx.eval(q, kq, vq)
    return q, kq, vq


@pytest.mark.parametrize("options", OPTION_SETS)
def test_quantized_remembered_spec_equals_checked_spec(options):
    q, kq, vq = _quantized(("spec",))
    _spec.VALIDATED_CALLS.clear()
    first = _quant_spec.validate_attention_quantized(q, kq, vq, bits=4, group_size=32, **options)
    again = _quant_spec.validate_attention_quantized(q, list(kq), vq, bits=4, group_size=32, **options)
    checked = _quant_spec._validate_attention_quantized(q, kq, vq, bits=4, group_size=32, **options)
    assert first[0] == checked[0] and again[0] == checked[0]
    assert again[2] == kq and again[3] == vq and isinstance(again[2], tuple)


def test_quantized_bad_calls_after_good_ones():
    q, kq, vq = _quantized(("bad",))
    call = lambda k=kq, v=vq, **kw: mlx_flash.flash_attention_quantized(  # noqa: E731
        q, k, v, **{"bits": 4, "group_size": 32, "scale": 1.0, "causal": True, **kw})
    mx.eval(call())
    with pytest.raises(ValueError, match=r"bits: expected one of .*got True"):
        call(bits=True)
    with pytest.raises(ValueError, match=r"group_size: expected one of .*got 32.0"):
        call(group_size=32.0)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        call(causal=1)
    with pytest.raises(TypeError, match="scale: expected a finite float, got bool"):
        call(scale=True)
    with pytest.raises(TypeError, match=r"v: expected the \(data, scales, biases\) triple"):
        call(v=vq[:2])
    with pytest.raises(TypeError, match="k: data must be uint32"):
        call(k=(kq[0].astype(mx.int32),) + kq[1:])
    with pytest.raises(TypeError, match="k: data must be an mx.array"):
        call(k=(np.array(kq[0]),) + kq[1:])


def test_quantized_repeated_shapes_new_data_match_reference():
    for i in range(3):
        q, kq, vq = _quantized(("values", i), bits=8)
        kd, vd = (mx.dequantize(*t, group_size=32, bits=8) for t in (kq, vq))
        out, lse = mlx_flash.flash_attention_quantized(q, kq, vq, bits=8, group_size=32, causal=True,
                                                       return_lse=True, stream=mx.cpu)
        want = attention_np(q, kd, vd, causal=True)
        assert rel_error(to_np(out), want["out"]) < FP32_TOL["out"]
        assert rel_error(to_np(lse), want["lse"]) < FP32_TOL["lse"]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_new_key_count_spec_equals_checked_spec(options):
    """A call that differs from a validated one only in its key count (a growing KV cache) takes its spec
    from the remembered one with the new count: the same spec as the checks give, at every count."""
    _spec.VALIDATED_CALLS.clear()
    q, k, v = _qkv(("nk",), Nk=40)
    _spec.validate_attention(q, k, v, **options)
    for nk in (1, 17, 39, 40, 41, 64, 65, 300):
        kn, vn = k[:, :, :min(nk, 40)], v[:, :, :min(nk, 40)]
        if nk > 40:
            kn, vn = mx.concatenate([k] * 8, axis=2)[:, :, :nk], mx.concatenate([v] * 8, axis=2)[:, :, :nk]
        got, inputs = _spec.validate_attention(q, kn, vn, **options)
        checked, _ = _spec._validate_attention(q, kn, vn, **options)
        assert got == checked and type(got) is type(checked) and inputs == _spec.AttentionInputs()


def test_new_key_count_still_checks_k_against_v():
    """k and v of different key counts after a validated call of their other dims still get the error."""
    _spec.VALIDATED_CALLS.clear()
    q, k, v = _qkv(("nk-bad",), Nk=20)
    _spec.validate_attention(q, k, v)
    with pytest.raises(ValueError, match="sequence lengths must match"):
        _spec.validate_attention(q, k[:, :, :10], v[:, :, :12])
