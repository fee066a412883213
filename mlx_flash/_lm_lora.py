"""LoRA over `FP8Linear`, in mlx-lm's terms (imported only with mlx-lm).

mlx-lm's `linear_to_lora_layers` (what `mlx_lm.lora` and `load_adapters`
call) converts a layer that has a `to_lora(r, scale, dropout)` method by
calling it. While the patch is on, `FP8Linear` has one (`fp8_to_lora`),
returning an `FP8LoRALinear`: mlx-lm's own `LoRALinear` around the fp8
layer, so its forward is the fp8 `matmul2d` plus the low-rank update and its
trainable parameters are `lora_a` and `lora_b` only (the fp8 codes and
scales stay frozen). `fuse` folds the update into the weight and quantises
it again (or returns an `nn.Linear` with `dequantize=True`).
"""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from .nn import FP8Linear


class FP8LoRALinear(LoRALinear):
    """`LoRALinear` whose base layer is an `FP8Linear`."""

    @staticmethod
    def from_base(linear: FP8Linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        if not isinstance(linear, FP8Linear):
            raise TypeError(f"linear: expected an mlx_flash.nn.FP8Linear, got {type(linear).__name__}")
        output_dims, input_dims = linear.weight.shape
        # LoRALinear's own placeholder base layer is never evaluated (MLX is lazy).
        lora = FP8LoRALinear(input_dims=input_dims, output_dims=output_dims, r=r, dropout=dropout, scale=scale)
        lora.linear = linear
        return lora

    def fuse(self, dequantize: bool = False):
        """The base layer with the low-rank update folded in: an `FP8Linear`
        in the base layer's format (re-quantised), or an `nn.Linear`."""
        base = self.linear
        weight = base.dequantized_weight()
        delta = (self.scale * self.lora_b.T) @ self.lora_a.T
        output_dims, input_dims = weight.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in base)
        fused.weight = weight + delta.astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if dequantize:
            return fused
        return FP8Linear.from_linear(fused, fmt=base.fmt, per_channel=base.scale.shape[0] > 1)


def fp8_to_lora(self: FP8Linear, r: int = 8, scale: float = 20.0, dropout: float = 0.0) -> FP8LoRALinear:
    """`FP8Linear.to_lora` while patched: what mlx-lm's `linear_to_lora_layers` calls."""
    return FP8LoRALinear.from_base(self, r=r, dropout=dropout, scale=scale)
