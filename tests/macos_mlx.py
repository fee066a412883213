"""The official macOS MLX wheel (`mlx-metal`, macosx_14_0_arm64), unpacked for Linux tests.

Two kinds of test read it without a Mac:

* the macOS cross-check compiles the Mac-only C++ (csrc/attention_metal.cpp)
  against its headers and resolves the `mlx::` symbols against the exports
  of its `libmlx.dylib`;
* the Metal emulation harness runs MLX's own Metal kernels (steel attention,
  sdpa_vector) from its `mlx/include/mlx/backend/metal/kernels` headers.

The wheel is downloaded once with pip (PyPI is the only registry needed) and
its `mlx/include` tree and `mlx/lib/libmlx.dylib` are unpacked into a cache
directory outside the checkout; the 140 MB metallib is never unpacked.
`macos_mlx_root()` returns that directory or None with the reason, so tests
can skip with it where pip cannot reach the wheel.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MLX_VERSION = "0.32.4"
WHEEL_PLATFORM = "macosx_14_0_arm64"
_WANTED = ("mlx/include/", "mlx/lib/libmlx.dylib")


def cache_dir() -> Path:
    """Where the unpacked wheel lives: $MLX_FLASH_CACHE or ~/.cache/mlx_flash."""
    base = os.environ.get("MLX_FLASH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlx_flash")
    return Path(base) / f"mlx-metal-{MLX_VERSION}-{WHEEL_PLATFORM}"


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--platform", WHEEL_PLATFORM, "--python-version", "3.12", "--implementation", "py",
        "-d", str(dest), f"mlx-metal=={MLX_VERSION}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("mlx_metal-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no mlx_metal wheel in {dest}")
    return wheels[0]


@functools.lru_cache(maxsize=None)
def _fetch() -> tuple[Path | None, str]:
    root = cache_dir()
    marker = root / ".complete"
    if marker.exists():
        return root, ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(Path(tmp))
            staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent if root.parent.exists() else None))
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if name.startswith(_WANTED):
                        zf.extract(name, staging)
            (staging / ".complete").write_text(wheel.name + "\n")
            root.parent.mkdir(parents=True, exist_ok=True)
            if not marker.exists():  # another process may have finished first
                if root.exists():
                    import shutil

                    shutil.rmtree(root)
                staging.rename(root)
    except (subprocess.SubprocessError, OSError, zipfile.BadZipFile) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return None, f"cannot fetch mlx-metal=={MLX_VERSION} ({WHEEL_PLATFORM}) with pip: {detail.strip()[-300:]}"
    return root, ""


def macos_mlx_root() -> tuple[Path | None, str]:
    """(root, "") with root/mlx/include and root/mlx/lib/libmlx.dylib, or (None, reason)."""
    return _fetch()


def include_dir(root: Path) -> Path:
    return root / "mlx" / "include"


def libmlx_dylib(root: Path) -> Path:
    return root / "mlx" / "lib" / "libmlx.dylib"


def metal_kernels_dir(root: Path) -> Path:
    """MLX's own Metal kernel headers (steel/attn, sdpa_vector.h, ...)."""
    return root / "mlx" / "include" / "mlx" / "backend" / "metal" / "kernels"


if __name__ == "__main__":
    where, why = macos_mlx_root()
    print(where if where else why)
