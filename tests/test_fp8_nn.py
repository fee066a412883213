"""FP8Linear and convert_to_fp8: values, frozen fp8 weights, LoRA fine-tuning."""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_flash import fp8
from mlx_flash.nn import FP8Linear, convert_to_fp8

# References are MLX computations on the default device: keep them on the CPU
# (see conftest.cpu_default_device); kernels get their device explicitly.
pytestmark = pytest.mark.usefixtures("cpu_default_device")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_from_linear_matches_dequantized_linear(fmt, dtype):
    mx.random.seed(0)
    lin = nn.Linear(37, 21)
    layer = FP8Linear.from_linear(lin, fmt=fmt)
    assert layer.weight.dtype == mx.uint8 and layer.weight.shape == (21, 37)
    assert layer.scale.shape == (21, 1)
    x = mx.random.normal((2, 5, 37)).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 21)
    w = np.array(layer.dequantized_weight(), dtype=np.float64)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w.T + np.array(lin.bias, dtype=np.float64)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, rtol=tol, atol=tol)
    # ...and the fp8 weight is close to the original one.
    rel = 2.0 ** -(4 if fmt == "e4m3" else 3)
    assert np.all(np.abs(w - np.array(lin.weight)) <= rel * np.abs(np.array(lin.weight)) + 1e-3)


def test_fp8_weights_are_frozen():
    layer = FP8Linear(8, 4)
    names = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    assert names == {"bias"}
    layer.unfreeze()
    assert {k for k, _ in tree_flatten(layer.trainable_parameters())} == {"bias"}
    assert 8 * 4 == layer.weight.nbytes  # one byte per weight


class Block(nn.Module):
    """A tiny pre-norm transformer block (attention + MLP), all Linear layers."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def __call__(self, x):
        B, N, D = x.shape
        q, k, v = mx.split(self.qkv(self.norm1(x)), 3, axis=-1)
        split = lambda t: t.reshape(B, N, self.heads, -1).transpose(0, 2, 1, 3)
        s = (split(q) @ split(k).swapaxes(-1, -2)) / math.sqrt(D // self.heads)
        o = (mx.softmax(s, axis=-1) @ split(v)).transpose(0, 2, 1, 3).reshape(B, N, D)
        x = x + self.proj(o)
        return x + self.down(nn.gelu(self.up(self.norm2(x))))


class LoRA(nn.Module):
    """y = base(x) + (x @ A) @ B, the adapter trainable, the base frozen."""

    def __init__(self, base, rank=4):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        self.base = base
        self.a = mx.random.normal((in_dims, rank)) * 0.1
        self.b = mx.zeros((rank, out_dims))

    def __call__(self, x):
        return self.base(x) + (x @ self.a) @ self.b


def test_convert_block_then_lora_fine_tune():
    mx.random.seed(1)
    block = Block()
    x = mx.random.normal((2, 6, 32))
    before = block(x)
    convert_to_fp8(block)
    for name in ("qkv", "proj", "up", "down"):
        assert isinstance(getattr(block, name), FP8Linear)
    after = block(x)
    assert np.max(np.abs(np.array(after - before))) < 0.1 * np.max(np.abs(np.array(before)))

    block.freeze()
    for name in ("qkv", "proj", "up", "down"):
        setattr(block, name, LoRA(getattr(block, name)))
    trainable = {k for k, _ in tree_flatten(block.trainable_parameters())}
    assert trainable and all(k.endswith(".a") or k.endswith(".b") for k in trainable)

    target = mx.random.normal((2, 6, 32))
    loss_fn = lambda model: mx.mean((model(x) - target) ** 2)
    # Gradient w.r.t. the input flows through the fp8 layers.
    gx = mx.grad(lambda inp: mx.sum(block(inp) ** 2))(x)
    assert np.all(np.isfinite(np.array(gx))) and np.max(np.abs(np.array(gx))) > 0

    opt = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(block, loss_fn)
    weights_before = np.array(block.qkv.base.weight)
    losses = []
    for _ in range(8):
        loss, grads = step(block)
        opt.update(block, grads)
        mx.eval(block.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert np.array_equal(np.array(block.qkv.base.weight), weights_before)


def test_convert_with_predicate_and_mlp_training():
    mx.random.seed(2)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    convert_to_fp8(mlp, fmt="e5m2", predicate=lambda path, m: m.weight.shape[0] == 32)
    assert isinstance(mlp.layers[0], FP8Linear) and isinstance(mlp.layers[2], nn.Linear)
    x, y = mx.random.normal((64, 16)), mx.random.normal((64, 4))
    loss_fn = lambda m: mx.mean((m(x) - y) ** 2)
    opt = optim.SGD(learning_rate=0.1)
    step = nn.value_and_grad(mlp, loss_fn)
    first = None
    for _ in range(10):
        loss, grads = step(mlp)
        opt.update(mlp, grads)
        mx.eval(mlp.parameters())
        first = loss.item() if first is None else first
    assert loss.item() < first
    assert mlp.layers[0].weight.dtype == mx.uint8


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear"):
        FP8Linear.from_linear(nn.Conv1d(3, 3, 1))


def _layer_reference(layer, x):
    """float64 of x @ (decode(W) * scale)^T + bias."""
    w = np.array(layer.dequantized_weight(), dtype=np.float64)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w.T
    if "bias" in layer:
        ref = ref + np.array(layer.bias.astype(mx.float32), dtype=np.float64)
    return ref


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_few_rows_path_matches_plain_call(bias, monkeypatch):
    """Inputs of <= COMPILE_MAX_ROWS rows go through mx.compile: same values
    and gradients as the plain call, bad input still an error naming it."""
    import mlx_flash.nn as fnn

    mx.random.seed(3)
    layer = FP8Linear.from_linear(nn.Linear(45, 19, bias=bias))
    for shape in ((1, 45), (7, 45), (2, 8, 45), (17, 45)):
        x = mx.random.normal(shape).astype(mx.float16)
        compiled = layer(x)
        gc = mx.grad(lambda inp: mx.sum(layer(inp).astype(mx.float32) ** 2))(x)
        monkeypatch.setattr(fnn, "_COMPILE", "0")
        plain = layer(x)
        gp = mx.grad(lambda inp: mx.sum(layer(inp).astype(mx.float32) ** 2))(x)
        monkeypatch.setattr(fnn, "_COMPILE", "1")
        assert compiled.shape == shape[:-1] + (19,) and compiled.dtype == mx.float16
        assert np.array_equal(np.array(compiled), np.array(plain)), shape
        assert np.array_equal(np.array(gc), np.array(gp)), shape
        np.testing.assert_allclose(np.array(compiled.astype(mx.float32)), _layer_reference(layer, x),
                                   rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="b|K|inner"):
        layer(mx.zeros((3, 44), dtype=mx.float16))


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="no CUDA GPU visible to MLX")
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_cuda_fp8linear_matches_float64(rows, dtype):
    """FP8Linear on the GPU, decode rows (compiled, the gemv route) and
    prefill rows, against float64 of the dequantized weight; outputs of the
    kernels poisoned (NaN) so an unwritten element shows."""
    from mlx_flash.backends import cuda_matmul

    old = cuda_matmul.POISON
    cuda_matmul.POISON = float("nan")
    try:
        mx.random.seed(rows)
        with mx.stream(mx.gpu):
            layer = FP8Linear.from_linear(nn.Linear(1000, 129))
            x = mx.random.normal((rows, 1000)).astype(dtype)
            y = layer(x)
            mx.eval(y)
        ref = _layer_reference(layer, x)
        # The plain materialised computation in the layer's dtype: the
        # dequantized weight in `dtype`, MLX's matmul, the bias added in `dtype`.
        plain = (x @ layer.dequantized_weight(dtype).T) + layer.bias.astype(dtype)
        plain = np.array(plain.astype(mx.float32), dtype=np.float64)
        err, plain_err = np.abs(np.array(y.astype(mx.float32)) - ref).max(), np.abs(plain - ref).max()
        assert y.dtype == dtype and np.all(np.isfinite(np.array(y.astype(mx.float32))))
        assert err <= 2 * plain_err + 1e-6, (err, plain_err)
    finally:
        cuda_matmul.POISON = old


def test_compiled_few_rows_path_traces_once(monkeypatch):
    """Repeated decode-shaped calls replay one trace (a cache key that
    missed, e.g. a stream object hashed by identity, retraced every call:
    slower than not compiling at all)."""
    import mlx_flash.nn as fnn

    traces = []
    forward = fnn._forward
    monkeypatch.setattr(fnn, "_forward", lambda *args: traces.append(1) or forward(*args))
    fnn._compiled_forward.cache_clear()
    layer = FP8Linear.from_linear(nn.Linear(32, 16, bias=False))
    x = mx.random.normal((1, 32)).astype(mx.float16)
    for _ in range(5):
        mx.eval(layer(x))
    assert len(traces) == 1
    fnn._compiled_forward.cache_clear()


@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="no CUDA GPU visible to MLX")
@pytest.mark.parametrize("shape,N,dtype,bias,per_channel,compiled", [
    ((1, 1, 2048), 512, mx.float16, False, True, "1"), ((16, 1008), 129, mx.bfloat16, True, True, "1"),
    ((3, 5, 96), 33, mx.float16, True, False, "0"), ((2, 1, 4096), 2048, mx.bfloat16, False, True, "0")])
@pytest.mark.parametrize("wide", ["0", "1"])
def test_cuda_fp8linear_direct_path(shape, N, dtype, bias, per_channel, compiled, wide, monkeypatch):
    """MLX_FLASH_FP8LINEAR_PATH=direct on the GPU, through mx.compile and not:
    the same kernel as the matmul2d path (bit-identical outputs, outputs
    poisoned with NaN), within twice the plain computation's error of
    float64, gradients as matmul2d's. wide "1": MLX_FLASH_CUDA_GEMV_WIDE's
    sixteen-warp plans (every N here is small enough for them)."""
    import mlx_flash.nn as fnn
    from mlx_flash.backends import cuda_matmul

    monkeypatch.setattr(cuda_matmul, "POISON", float("nan"))
    monkeypatch.setattr(cuda_matmul, "GEMV_WIDE", wide)
    monkeypatch.setattr(fnn, "_COMPILE", compiled)
    fnn._compiled_direct.cache_clear()  # traces made before the poison
    fnn._compiled_forward.cache_clear()
    mx.random.seed(N)
    layer = FP8Linear.from_linear(nn.Linear(shape[-1], N, bias=bias), per_channel=per_channel)
    x = mx.random.normal(shape).astype(dtype)
    loss = lambda inp: mx.sum(layer(inp).astype(mx.float32) ** 2)  # noqa: E731
    with mx.stream(mx.gpu):
        monkeypatch.setattr(fnn, "_PATH", "direct")
        y, g = layer(x), mx.grad(loss)(x)
        mx.eval(y, g)
        monkeypatch.setattr(fnn, "_PATH", "matmul2d")
        y2, g2 = layer(x), mx.grad(loss)(x)
        mx.eval(y2, g2)
    fnn._compiled_direct.cache_clear()
    fnn._compiled_forward.cache_clear()
    assert y.shape == shape[:-1] + (N,) and y.dtype == dtype
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    assert np.all(np.isfinite(f32(y)))
    assert np.array_equal(f32(y), f32(y2))
    assert np.array_equal(f32(g), f32(g2))
    ref = _layer_reference(layer, x)
    plain = x @ layer.dequantized_weight(dtype).T
    if bias:
        plain = plain + layer.bias.astype(dtype)
    plain_err = np.abs(np.array(f32(plain), dtype=np.float64) - ref).max()
    assert np.abs(f32(y) - ref).max() <= 2 * plain_err + 1e-6


def test_direct_path_shape_cache_answers_as_the_check():
    """FP8Linear's cached "does the direct path take this call" equals
    linear_few_rows_supported (and the float16/bfloat16 check) on each key, asked twice."""
    import mlx_flash.nn as fnn
    from mlx_flash.backends import cuda_matmul

    fnn._DIRECT_SHAPES.clear()
    w, w24 = mx.zeros((8, 32), mx.uint8), mx.zeros((8, 24), mx.uint8)
    cases = [(mx.zeros((1, 32), mx.float16), w), (mx.zeros((2, 8, 32), mx.bfloat16), w),
             (mx.zeros((17, 32), mx.float16), w), (mx.zeros((1, 32), mx.float32), w),
             (mx.zeros((1, 24), mx.float16), w24), (mx.zeros((0, 32), mx.float16), w),
             (mx.zeros((1, 32), mx.float16), w.astype(mx.int8))]
    for _ in range(2):
        for x, weight in cases:
            want = x.dtype in (mx.float16, mx.bfloat16) and cuda_matmul.linear_few_rows_supported(x, weight)
            assert fnn._direct_takes(x, weight) == want, (x.shape, x.dtype, weight.shape, weight.dtype)
    assert len(fnn._DIRECT_SHAPES) == len(cases)
    fnn._DIRECT_SHAPES.clear()
