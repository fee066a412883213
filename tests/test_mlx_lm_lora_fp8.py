"""LoRA on fp8 weights through mlx-lm's own `linear_to_lora_layers`.

While patched, `FP8Linear` layers become `FP8LoRALinear` (mlx-lm's LoRA
around the fp8 layer): the forward runs the fp8 `matmul2d`, gradients reach
only `lora_a`/`lora_b`, and they match the same LoRA over `nn.Linear`
layers holding the dequantised weights.
"""

from __future__ import annotations

import pytest

mlx_lm = pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

import mlx_flash  # noqa: E402
import mlx_flash.nn as fnn  # noqa: E402
from mlx_flash._lm_lora import FP8LoRALinear  # noqa: E402
from mlx_flash.nn import FP8Linear  # noqa: E402

from test_mlx_lm_patch import assert_close, build, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_only", "fresh_stats")

LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}


def _fp8_and_dequantised(name):
    """An fp8-weight model and the same model with nn.Linear over the dequantised weights."""
    model = mlx_flash.convert_model_to_fp8(build(name))
    twin = build(name)
    fp8_layers = [(path, m) for path, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert fp8_layers
    twin.load_weights([(path + ".weight", m.dequantized_weight()) for path, m in fp8_layers], strict=False)
    return model, twin


def _with_lora(model, twin):
    for m in (model, twin):
        m.freeze()
        linear_to_lora_layers(m, 2, LORA)
    # LoRA's B starts at zero (which would zero A's gradient): the same random B, and A, in both.
    adapters = [(k, 0.05 * mx.random.normal(v.shape) if k.endswith("lora_b") else v)
                for k, v in tree_flatten(model.trainable_parameters())]
    for m in (model, twin):
        m.load_weights(adapters, strict=False)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_lora_over_fp8_gradients_match_dequantised(name, monkeypatch):
    model, twin = _fp8_and_dequantised(name)
    with mlx_flash.patch_mlx_lm():
        _with_lora(model, twin)
        loras = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        assert loras and all(isinstance(m, FP8LoRALinear) and isinstance(m.linear, FP8Linear) for m in loras)
        trainable = dict(tree_flatten(model.trainable_parameters()))
        assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)

        calls = []
        original = fnn.matmul2d
        monkeypatch.setattr(fnn, "matmul2d", lambda *a, **kw: calls.append(kw.get("b_fmt")) or original(*a, **kw))
        batch, lengths = tokens(21, batch=2), mx.array([[0, 20], [0, 15]])
        loss_and_grad = lambda m: nn.value_and_grad(m, lambda *a: default_loss(m, *a)[0])  # noqa: E731
        loss, grads = loss_and_grad(model)(batch, lengths)
        assert calls and set(calls) == {"e4m3"}  # the fp8 layers ran the fp8 matmul
        twin_loss, twin_grads = loss_and_grad(twin)(batch, lengths)
    grads, twin_grads = dict(tree_flatten(grads)), dict(tree_flatten(twin_grads))
    assert grads.keys() == twin_grads.keys() == trainable.keys()
    assert_close(loss, twin_loss)
    for key in grads:
        assert_close(grads[key], twin_grads[key], tol=1e-4)

    # One optimiser step moves the adapters and leaves the fp8 codes as they were.
    codes = {k: v for k, v in tree_flatten(model.parameters()) if v.dtype == mx.uint8}
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.update(model, tree_unflatten(list(grads.items())))
    mx.eval(model.parameters())
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(after[k], v).item() for k, v in codes.items())
    assert any(not mx.array_equal(after[k], trainable[k]).item() for k in trainable)


def test_fuse_folds_the_update_into_fp8_weights():
    model, twin = _fp8_and_dequantised("llama")
    with mlx_flash.patch_mlx_lm():
        _with_lora(model, twin)
    lora = model.layers[-1].self_attn.q_proj
    assert isinstance(lora, FP8LoRALinear)
    exact = lora.linear.dequantized_weight() + (lora.scale * lora.lora_b.T) @ lora.lora_a.T
    dense = lora.fuse(dequantize=True)
    assert isinstance(dense, nn.Linear) and mx.array_equal(dense.weight, exact).item()
    fused = lora.fuse()
    assert isinstance(fused, FP8Linear) and fused.fmt == lora.linear.fmt
    # Re-quantised to e4m3 (3 mantissa bits): within half a step, 2^-4 relative, per channel.
    err = mx.max(mx.abs(fused.dequantized_weight() - exact), axis=1)
    assert mx.all(err <= 2.0**-4 * mx.max(mx.abs(exact), axis=1)).item()


def test_fp8_layers_know_lora_only_while_patched():
    assert not hasattr(FP8Linear, "to_lora")
    with mlx_flash.patch_mlx_lm():
        assert hasattr(FP8Linear, "to_lora")
    assert not hasattr(FP8Linear, "to_lora")


def test_lora_over_fp8_with_quantized_activations_trains():
    """convert_model_to_fp8(activations="e4m3"): the training batch's fp8
    layers quantize their input (fp8 x fp8 matmul2d calls), the loss stays
    near the 16-bit-activation model's, and only the adapters get
    gradients, finite ones (straight through the rounding)."""
    model = mlx_flash.convert_model_to_fp8(build("llama"), activations="e4m3")
    plain = mlx_flash.convert_model_to_fp8(build("llama"))
    plain.update(model.parameters())
    assert all(m.activations == "e4m3" for _, m in model.named_modules() if isinstance(m, FP8Linear))
    with mlx_flash.patch_mlx_lm():
        _with_lora(model, plain)
        batch, lengths = tokens(21, batch=2), mx.array([[0, 20], [0, 15]])
        loss_and_grad = lambda m: nn.value_and_grad(m, lambda *a: default_loss(m, *a)[0])  # noqa: E731
        calls = []
        original = fnn.matmul2d
        fnn.matmul2d = lambda *a, **kw: calls.append(kw.get("a_fmt")) or original(*a, **kw)
        try:
            loss, grads = loss_and_grad(model)(batch, lengths)
            mx.eval(loss, grads)
        finally:
            fnn.matmul2d = original
        plain_loss, _ = loss_and_grad(plain)(batch, lengths)
    assert "e4m3" in calls  # 42 rows a call: the input quantized
    assert abs(loss.item() - plain_loss.item()) < 0.05 * abs(plain_loss.item())
    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert all(bool(mx.all(mx.isfinite(g)).item()) for g in flat.values())
