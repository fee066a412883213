"""mlx_flash: fast, exact attention (fused forward and backward) and fp8/fp16
matrix products for MLX on Metal, CUDA and CPU."""

from . import reference
from .attention import flash_attention, flash_attention_varlen

__all__ = ["flash_attention", "flash_attention_varlen", "reference"]
__version__ = "0.1.0"
