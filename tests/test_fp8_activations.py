"""FP8Linear with quantized activations (activations="e4m3" / "e5m2"): the
row-wise quantization (MLX ops on the CPU, one CUDA kernel on MLX's CUDA
backend, run here through the CUDA emulation on the very source the wrapper
hands MLX) bit for bit against a NumPy float32 reference, and the layer
against float64 of the quantized input times the dequantized weight; few-row
calls untouched, gradients straight through, NaN and inf rows, bad options."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_flash import fp8
from mlx_flash import nn as fnn
from mlx_flash.nn import FP8Linear, convert_to_fp8

from cuda_emu import harness
from helpers import rng

GPU = pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="no CUDA GPU visible to MLX")


def _rows(gen, rows, K, dtype, specials=True):
    """Random rows on different scales; with specials the first rows hold a
    zero row, a NaN, an inf, one large value over tiny ones (codes in the
    subnormal range after scaling), and a row of float32 subnormals and zeros
    (zero in 16-bit types)."""
    x = gen.standard_normal((rows, K)).astype(np.float32) * np.exp2(gen.integers(-12, 12, (rows, 1)))
    if specials and rows >= 4:
        x[0] = 0.0
        x[1, gen.integers(K)] = np.nan
        x[2, gen.integers(K)] = -np.inf
        x[3] *= 1e-6
        x[3, gen.integers(K)] = 50.0
    if specials and rows >= 5:  # float32 only: below 2^-64, subnormals among them, and zeros
        x[4] = gen.standard_normal(K).astype(np.float32) * np.float32(1e-39)
        x[4, ::3] = 0.0
    return mx.array(x).astype(dtype)


def _same_codes(got, want, fmt):
    """Codes equal, NaN codes of either sign alike: -inf / inf is a NaN
    whose sign bit the platform picks (x86 sets it, the GPU does not)."""
    got, want = np.array(got), np.asarray(want)
    nan = (lambda c: (c & 0x7F) == 0x7F) if fmt == "e4m3" else (lambda c: (c & 0x7F) > 0x7C)
    np.testing.assert_array_equal(nan(got), nan(want))
    np.testing.assert_array_equal(np.where(nan(got), 0x7F, got), np.where(nan(want), 0x7F, want))


def _reference_quantize(x, fmt):
    """codes, scale of a row-wise quantization in NumPy float32: amax the
    largest finite |x|, scale = amax / max_finite (1 for no finite nonzero
    value, inf for a row holding an inf), codes fp8.encode of x times
    max_finite / amax (0 for an inf row, 1 for an empty one)."""
    x32 = np.array(x.astype(mx.float32), dtype=np.float32)
    top = np.float32(fp8.max_finite(fmt))
    mag = np.where(np.isfinite(x32), np.abs(x32), np.float32(0))
    amax = mag.max(axis=1, keepdims=True)
    inf_rows = np.isinf(x32).any(axis=1, keepdims=True)
    tiny = amax < np.float32(2.0 ** -64)  # scaled by 2^64 first (exact)
    pre = np.where(tiny, np.float32(2.0 ** 64), np.float32(1)).astype(np.float32)
    a2 = (amax * pre).astype(np.float32)
    with np.errstate(divide="ignore"):
        scale = np.where(amax > 0, (a2 / top) * np.where(tiny, np.float32(2.0 ** -64), np.float32(1)), np.float32(1))
        scale = np.where(inf_rows, np.float32(np.inf), scale).astype(np.float32)
        factor = np.where(inf_rows, np.float32(0), np.where(amax > 0, top / a2, np.float32(1))).astype(np.float32)
    with np.errstate(invalid="ignore"), mx.stream(mx.cpu):  # the CPU's float32: no flushed subnormals
        codes = np.array(fp8.encode(mx.array(((x32 * pre) * factor).astype(np.float32)), fmt))
    return codes, scale.astype(np.float32)


@pytest.mark.usefixtures("cpu_default_device")
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_quantize_activations_on_mlx_ops_matches_numpy(fmt, dtype):
    gen = rng("act-quant-ops", fmt, str(dtype))
    x = _rows(gen, 9, 113, dtype)
    codes, scale = fnn._quantize_activations(x, fmt)
    ref_codes, ref_scale = _reference_quantize(x, fmt)
    assert codes.dtype == mx.uint8 and scale.dtype == mx.float32 and scale.shape == (9, 1)
    np.testing.assert_array_equal(np.array(scale), ref_scale)
    _same_codes(codes, ref_codes, fmt)


@pytest.mark.usefixtures("cpu_default_device")
@pytest.mark.skipif(harness.unavailable_reason() is not None,
                    reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")
@pytest.mark.parametrize("rows,K", [(1, 1), (5, 17), (6, 113), (4, 1023), (2, 300), (5, 2056), (4, 24)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_quantize_rows_kernel_emulated(rows, K, fmt, dtype, monkeypatch):
    """cuda_src/fp8_quantize_rows.cuh, the same bits as the MLX-ops form,
    outputs poisoned (NaN: codes 0xFF / a NaN scale where unwritten); K a
    multiple of the 16-byte load (300 for float32, 2056 and 24) and not."""
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "POISON", float("nan"))
    gen = rng("act-quant-emu", rows, K, fmt, str(dtype))
    x = _rows(gen, rows, K, dtype)
    with harness.patched_cuda_kernel():
        codes, scale = cuda_matmul.quantize_rows(x, fmt, stream=mx.cpu)
        mx.eval(codes, scale)
    ref_codes, ref_scale = _reference_quantize(x, fmt)
    np.testing.assert_array_equal(np.array(scale), ref_scale)
    _same_codes(codes, ref_codes, fmt)


def _act_reference(layer, x, fmt):
    """float64 of q(x) @ (decode(W) * scale)^T + bias, q(x) the quantized rows."""
    codes, scale = _reference_quantize(x, fmt)
    table = fp8.decode_table(fmt).astype(np.float64)
    q = table[codes] * scale.astype(np.float64)
    w = np.array(layer.dequantized_weight(mx.float32), dtype=np.float64)
    ref = q @ w.T
    mag = np.abs(q) @ np.abs(w).T
    if "bias" in layer:
        bias = np.array(layer.bias.astype(mx.float32), dtype=np.float64)
        ref, mag = ref + bias, mag + np.abs(bias)
    return ref, mag


def _check_layer(layer, x, act):
    y = layer(x)
    mx.eval(y)
    ref, mag = _act_reference(layer, x.reshape(-1, x.shape[-1]), act)
    got = np.array(y.astype(mx.float32), dtype=np.float64).reshape(ref.shape)
    # fp32 sums (on Hopper promoted every 128 K), the product rounded to x's
    # dtype, the bias added in it
    unit = {mx.float16: 2.0 ** -11, mx.bfloat16: 2.0 ** -8, mx.float32: 2.0 ** -22}[x.dtype]
    bound = (2 * unit + x.shape[-1] * 2.0 ** -23) * mag + 1e-30
    finite = np.isfinite(ref)
    assert np.all(np.abs(got - ref)[finite] <= bound[finite]), np.max((np.abs(got - ref) / bound)[finite])
    return got, ref


@pytest.mark.usefixtures("cpu_default_device")
@pytest.mark.parametrize("act", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", [(17, 64), (2, 60, 113), (1023, 48)])
def test_layer_with_quantized_activations_matches_float64(act, dtype, shape):
    gen = rng("act-layer", act, str(dtype), shape)
    layer = FP8Linear.from_linear(nn.Linear(shape[-1], 37), activations=act)
    x = _rows(gen, int(np.prod(shape[:-1])), shape[-1], dtype, specials=False).reshape(shape)
    _check_layer(layer, x, act)
    assert layer(x).shape == shape[:-1] + (37,) and layer(x).dtype == dtype
    # the input's rounding moves the result: not the 16-bit layer's values
    plain = FP8Linear.from_linear(nn.Linear(shape[-1], 37))
    plain.update(layer.parameters())
    assert not np.array_equal(np.array(plain(x).astype(mx.float32)), np.array(layer(x).astype(mx.float32)))


@pytest.mark.usefixtures("cpu_default_device")
def test_few_rows_and_gradients_are_the_16_bit_layers():
    """Calls of at most COMPILE_MAX_ROWS rows compute as without the option
    (bit for bit); from ACT_QUANT_MIN_ROWS rows the gradients (input, bias)
    are the 16-bit layer's: straight through the rounding."""
    gen = rng("act-grad")
    base = nn.Linear(96, 40)
    quant = FP8Linear.from_linear(base, activations="e4m3")
    plain = FP8Linear.from_linear(base)
    for rows in (1, fnn.COMPILE_MAX_ROWS):
        x = _rows(gen, rows, 96, mx.float16, specials=False)
        assert np.array_equal(np.array(quant(x).astype(mx.float32)), np.array(plain(x).astype(mx.float32))), rows
    x = _rows(gen, fnn.ACT_QUANT_MIN_ROWS, 96, mx.float16, specials=False)

    def loss(model, inp):
        return mx.sum(model(inp).astype(mx.float32) ** 2)

    cot = mx.array(gen.standard_normal((x.shape[0], 40)).astype(np.float32))
    _, (gq,) = mx.vjp(lambda inp: quant(inp).astype(mx.float32), [x], [cot])
    _, (gp,) = mx.vjp(lambda inp: plain(inp).astype(mx.float32), [x], [cot])
    np.testing.assert_array_equal(np.array(gq), np.array(gp))
    grads = nn.value_and_grad(quant, loss)(quant, x)[1]
    assert set(grads) == {"bias"} and np.all(np.isfinite(np.array(grads["bias"])))


@pytest.mark.usefixtures("cpu_default_device")
def test_tiny_rows_give_numbers():
    """float32 rows whose largest value is a subnormal: finite codes (no
    NaN from an overflowed factor times a zero) and outputs within the
    float64 reference's bound."""
    gen = rng("act-tiny")
    layer = FP8Linear.from_linear(nn.Linear(64, 24), activations="e4m3")
    x = (gen.standard_normal((20, 64)) * np.exp2(gen.integers(-149, -60, (20, 1)))).astype(np.float32)
    x[:, ::4] = 0.0
    codes, scale = fnn._quantize_activations(mx.array(x), "e4m3")
    assert not np.any((np.array(codes) & 0x7F) == 0x7F) and np.all(np.isfinite(np.array(scale)))
    got, _ = _check_layer(layer, mx.array(x), "e4m3")
    assert np.all(np.isfinite(got))


@pytest.mark.usefixtures("cpu_default_device")
def test_nan_and_inf_rows_stay_non_finite():
    """A row holding a NaN or an inf gives non-finite outputs (never a
    number saturated at 448 x scale); the other rows are untouched."""
    gen = rng("act-nonfinite")
    layer = FP8Linear.from_linear(nn.Linear(64, 24), activations="e4m3")
    x = np.array(_rows(gen, 20, 64, mx.float32, specials=False))
    x[3, 7] = np.nan
    x[5, 9] = np.inf
    y = np.array(layer(mx.array(x).astype(mx.float16)).astype(mx.float32))
    assert np.all(~np.isfinite(y[[3, 5]]))
    others = np.delete(np.arange(20), [3, 5])
    assert np.all(np.isfinite(y[others]))
    clean = np.array(layer(mx.array(x[others]).astype(mx.float16)).astype(mx.float32))
    np.testing.assert_array_equal(y[others], clean)


def _counting_quantizer(monkeypatch):
    """Counts the calls of nn._quantize_activations (each one quantization)."""
    calls = []
    real = fnn._quantize_activations

    def counted(x2, fmt):
        calls.append(fmt)
        return real(x2, fmt)

    monkeypatch.setattr(fnn, "_quantize_activations", counted)
    return calls


def _block(gen, K=96):
    """q / k / v-like layers of one input (e4m3), and an e5m2 one."""
    layers = [FP8Linear.from_linear(nn.Linear(K, n), activations="e4m3") for n in (40, 24, 24)]
    return layers + [FP8Linear.from_linear(nn.Linear(K, 16), activations="e5m2")]


def _f32(y):
    return np.array(y.astype(mx.float32))


@pytest.mark.usefixtures("cpu_default_device")
def test_projections_of_one_input_share_its_quantization(monkeypatch):
    """Layers called on the very same array, in the same format, quantize it
    once, with the bits of quantizing it at every call; another array (equal
    values included) or another format quantizes anew; the shared entry goes
    when its input is freed."""
    import gc

    gen = rng("act-shared")
    layers = _block(gen)
    x = _rows(gen, 2 * fnn.ACT_QUANT_MIN_ROWS + 3, 96, mx.float16, specials=False).reshape(1, -1, 96)
    monkeypatch.setattr(fnn, "SHARE_ACT_QUANT", False)
    calls = _counting_quantizer(monkeypatch)
    alone = [_f32(layer(x)) for layer in layers]
    assert len(calls) == 4
    monkeypatch.setattr(fnn, "SHARE_ACT_QUANT", True)
    calls.clear()
    shared = [_f32(layer(x)) for layer in layers]
    assert calls == ["e4m3", "e5m2"]  # q, k, v share one; the e5m2 layer its own
    for a, b in zip(alone, shared):
        np.testing.assert_array_equal(a, b)
    calls.clear()
    layers[0](x), layers[1](x)  # x again after the e5m2 entry replaced it: one more e4m3
    assert calls == ["e4m3"]
    twin = mx.array(np.array(x))  # equal values, another array
    calls.clear()
    np.testing.assert_array_equal(_f32(layers[0](twin)), alone[0])
    assert calls == ["e4m3"]
    del twin
    gc.collect()
    assert fnn._shared_quant is None  # its input freed: the codes are not held


@pytest.mark.usefixtures("cpu_default_device")
def test_shared_quantization_keeps_gradients_and_compile(monkeypatch):
    """Gradients through layers sharing one quantization are the 16-bit
    layers' (straight through), and mx.compile traces give the uncompiled
    values, shared or not."""
    gen = rng("act-shared-grad")
    layers = _block(gen)[:3]
    x = _rows(gen, 40, 96, mx.float16, specials=False)
    plain = [FP8Linear.from_linear(nn.Linear(96, layer.weight.shape[0])) for layer in layers]
    for p_layer, layer in zip(plain, layers):
        p_layer.update(layer.parameters())

    def total(mods, inp):
        return sum(mx.sum(m(inp).astype(mx.float32) ** 2) for m in mods)

    calls = _counting_quantizer(monkeypatch)
    value, g = mx.value_and_grad(lambda inp: total(layers, inp))(x)
    assert len(calls) == 1
    # straight through: the gradient of the 16-bit layers at the quantized layers' outputs
    cots = [2 * m(x).astype(mx.float32) for m in layers]
    _, (want,) = mx.vjp(lambda inp: [m(inp).astype(mx.float32) for m in plain], [x], cots)
    np.testing.assert_allclose(_f32(g), _f32(want), rtol=1e-2, atol=1e-2)
    outs = [_f32(m(x)) for m in layers]
    for share in (True, False):
        monkeypatch.setattr(fnn, "SHARE_ACT_QUANT", share)
        compiled = mx.compile(lambda inp: [m(inp) for m in layers])
        for a, b in zip(outs, compiled(x)):
            np.testing.assert_array_equal(a, _f32(b))
    np.testing.assert_array_equal(np.array(value), np.array(total(layers, x)))


def test_bad_activation_format_is_an_error_naming_it():
    with pytest.raises(ValueError, match="activations: expected None or one of"):
        FP8Linear(8, 4, activations="fp16")
    with pytest.raises(ValueError, match="activations"):
        FP8Linear.from_linear(nn.Linear(8, 4), activations="int8")
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="activations"):
        convert_to_fp8(model, activations=True)
    assert isinstance(model.layers[0], nn.Linear)  # nothing converted
    convert_to_fp8(model, activations="e5m2")
    assert model.layers[0].activations == "e5m2" and "activations=e5m2" in repr(model.layers[0])
    from mlx_flash.backends import cuda_matmul

    with pytest.raises(ValueError, match="fmt: expected 'e4m3' or 'e5m2', got None"):
        cuda_matmul.quantize_rows(mx.zeros((2, 8), mx.float16), None)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        cuda_matmul.quantize_rows(mx.zeros((2, 2, 8), mx.float16), "e4m3")


@GPU
@pytest.mark.parametrize("rows,K", [(1, 1), (7, 17), (5, 100), (300, 1000), (2048, 4096)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_cuda_quantize_rows_matches_numpy(rows, K, fmt, dtype):
    from mlx_flash.backends import cuda_matmul

    old = cuda_matmul.POISON
    cuda_matmul.POISON = float("nan")
    try:
        gen = rng("act-quant-gpu", rows, K, fmt, str(dtype))
        x = _rows(gen, rows, K, dtype)
        with mx.stream(mx.gpu):
            codes, scale = cuda_matmul.quantize_rows(x, fmt)
            mx.eval(codes, scale)
    finally:
        cuda_matmul.POISON = old
    ref_codes, ref_scale = _reference_quantize(x, fmt)
    np.testing.assert_array_equal(np.array(scale), ref_scale)
    _same_codes(codes, ref_codes, fmt)


@GPU
@pytest.mark.parametrize("rows,K,N", [(17, 64, 40), (300, 1000, 129), (1023, 4096, 520)])
@pytest.mark.parametrize("act", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_cuda_layer_with_quantized_activations_matches_float64(rows, K, N, act, dtype):
    """On the GPU (Hopper: native fp8 wgmma, promoted every 128 K), kernels'
    outputs poisoned."""
    from mlx_flash.backends import cuda_matmul

    old = cuda_matmul.POISON
    cuda_matmul.POISON = float("nan")
    try:
        gen = rng("act-layer-gpu", rows, K, N, act, str(dtype))
        with mx.stream(mx.gpu):
            layer = FP8Linear.from_linear(nn.Linear(K, N), activations=act)
            x = _rows(gen, rows, K, dtype, specials=False)
            _check_layer(layer, x, act)
    finally:
        cuda_matmul.POISON = old
