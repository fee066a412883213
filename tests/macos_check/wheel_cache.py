"""Unpack part of a PyPI wheel into a cache directory, once.

For the macOS cross-check's inputs that are not installed in the test
environment: Darwin's C headers (from the `ziglang` wheel) and nanobind's
headers at the version the build pins (from the `nanobind` wheel). Same
scheme as tests/macos_mlx.py: `pip download` (PyPI is the only registry
needed), keep only the wanted folder, and mark the cache complete so later
runs never touch the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_root() -> Path:
    """$MLX_FLASH_CACHE or ~/.cache/mlx_flash, like tests/macos_mlx.py."""
    return Path(os.environ.get("MLX_FLASH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlx_flash"))


def unpacked(requirement: str, folder_in_wheel: str, cache_name: str) -> tuple[Path | None, str]:
    """(cache folder holding `folder_in_wheel`'s contents, "") or (None, why not).

    `requirement` is pinned (name==version) so the cache never goes stale."""
    root = cache_root() / cache_name
    if (root / ".complete").exists():
        return root, ""
    name = requirement.split("==")[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
                   requirement]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
            wheels = sorted(Path(tmp).glob(f"{name.replace('-', '_')}-*.whl"))
            if not wheels:
                raise FileNotFoundError(f"pip download left no {name} wheel in {tmp}")
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
            with zipfile.ZipFile(wheels[0]) as zf:
                for info in zf.infolist():
                    if info.filename.startswith(folder_in_wheel) and not info.is_dir():
                        target = staging / info.filename[len(folder_in_wheel):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(info))
            (staging / ".complete").write_text(wheels[0].name + "\n")
            if not (root / ".complete").exists():  # another process may have finished first
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
            else:
                shutil.rmtree(staging, ignore_errors=True)
    except (subprocess.SubprocessError, OSError, zipfile.BadZipFile) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return None, f"cannot fetch {requirement} with pip: {detail.strip()[-300:]}"
    return root, ""
