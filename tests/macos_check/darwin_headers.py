"""The macOS C library headers, for compiling the Mac build on Linux.

libc++ needs a C library underneath; for the `arm64-apple-macos` target it
must be Darwin's (its `int64_t` is `long long`, its locale API is xlocale,
...), not glibc's. Apple's SDK cannot be downloaded here, but the Zig
toolchain on PyPI (`ziglang`) carries the Darwin libc headers it
cross-compiles with (`lib/libc/include/any-darwin-any`: libc, pthread,
mach, dispatch, objc, TargetConditionals, simd). Only that folder is
unpacked, into a cache directory outside the checkout; the Zig compiler
itself is never used. Apple's frameworks (CoreFoundation, IOSurface, ...)
are not in it: macos_check/stubs stands in for the few declarations
metal-cpp needs from them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ZIG_VERSION = "0.17.0"
_IN_WHEEL = "ziglang/lib/libc/include/any-darwin-any/"


def cache_dir() -> Path:
    """$MLX_FLASH_CACHE or ~/.cache/mlx_flash, like tests/macos_mlx.py."""
    base = os.environ.get("MLX_FLASH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlx_flash")
    return Path(base) / f"darwin-libc-headers-zig-{ZIG_VERSION}"


@functools.lru_cache(maxsize=None)
def _fetch() -> tuple[Path | None, str]:
    root = cache_dir()
    if (root / ".complete").exists():
        return root, ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "-d", tmp, f"ziglang=={ZIG_VERSION}"]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
            wheels = sorted(Path(tmp).glob("ziglang-*.whl"))
            if not wheels:
                raise FileNotFoundError(f"pip download left no ziglang wheel in {tmp}")
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
            with zipfile.ZipFile(wheels[0]) as zf:
                for info in zf.infolist():
                    if info.filename.startswith(_IN_WHEEL) and not info.is_dir():
                        target = staging / info.filename[len(_IN_WHEEL):]
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
        return None, f"cannot fetch ziglang=={ZIG_VERSION} (Darwin libc headers) with pip: {detail.strip()[-300:]}"
    return root, ""


def darwin_include_dir() -> tuple[Path | None, str]:
    """(folder with Darwin's <stdint.h>, <pthread.h>, <mach/mach.h>, ...) or (None, reason)."""
    return _fetch()


if __name__ == "__main__":
    where, why = darwin_include_dir()
    print(where if where else why)
