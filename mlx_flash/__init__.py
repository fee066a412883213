"""mlx_flash: fast, exact attention (fused forward and backward) and fp8/fp16
matrix products for MLX on Metal, CUDA and CPU."""

from . import fp8, reference
from .attention import flash_attention, flash_attention_varlen
from .matmul import matmul2d

__all__ = ["flash_attention", "flash_attention_varlen", "fp8", "matmul2d", "reference"]
__version__ = "0.1.0"
