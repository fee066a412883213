"""mlx_flash: fast, exact attention (fused forward and backward) and fp8/fp16
matrix products for MLX on Metal, CUDA and CPU."""

from . import fp8, reference
from .attention import flash_attention, flash_attention_varlen
from .attention_quantized import flash_attention_quantized
from .matmul import matmul2d
from .mlx_lm_patch import (convert_model_to_fp8, is_mlx_lm_patched, patch_mlx_lm, patch_stats,
                           reset_patch_stats, unpatch_mlx_lm)

__all__ = [
    "flash_attention", "flash_attention_varlen", "flash_attention_quantized", "fp8", "matmul2d", "reference",
    "patch_mlx_lm", "unpatch_mlx_lm", "is_mlx_lm_patched", "patch_stats", "reset_patch_stats",
    "convert_model_to_fp8",
]
__version__ = "0.1.0"
