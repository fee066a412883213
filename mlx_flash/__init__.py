"""mlx_flash: fast, exact attention (fused forward and backward) and fp8/fp16
matrix products for MLX on Metal, CUDA and CPU."""


def _import_mlx():
    """Import mlx.core, saying what to install when MLX's native library is missing.

    On Linux the `mlx` wheel holds only the Python bindings; libmlx.so comes
    from a backend package, mlx-cpu or mlx-cuda-12/13. They install the same
    file, so mlx_flash cannot depend on one of them without overwriting the
    other: the user picks it, and this message says how."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        if "libmlx" not in str(exc):
            raise
        raise ImportError(
            f"MLX is installed without its native library ({exc}). On Linux, MLX's backend comes "
            "in a separate package: pip install 'mlx_flash[cpu]' (or 'mlx[cpu]==0.32.4') for the "
            "CPU, or 'mlx[cuda]==0.32.4' for NVIDIA GPUs (mlx[cuda13] for CUDA 13)."
        ) from exc


_import_mlx()

from . import distributed, fp8, reference  # noqa: E402
from .attention import flash_attention, flash_attention_varlen  # noqa: E402
from .attention_quantized import flash_attention_quantized  # noqa: E402
from .matmul import matmul2d  # noqa: E402
from .mlx_lm_patch import (convert_model_to_fp8, is_mlx_lm_patched, patch_mlx_lm,  # noqa: E402
                           patch_stats, reset_patch_stats, unpatch_mlx_lm)

__all__ = [
    "flash_attention", "flash_attention_varlen", "flash_attention_quantized", "fp8", "matmul2d",
    "reference", "distributed",
    "patch_mlx_lm", "unpatch_mlx_lm", "is_mlx_lm_patched", "patch_stats", "reset_patch_stats",
    "convert_model_to_fp8",
]
__version__ = "0.1.0"
