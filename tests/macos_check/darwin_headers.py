"""The macOS C library headers, for compiling the Mac build on Linux.

libc++ needs a C library underneath; for the `arm64-apple-macos` target it
must be Darwin's (its `int64_t` is `long long`, its locale API is xlocale,
...), not glibc's. Apple's SDK cannot be downloaded here, but the Zig
toolchain on PyPI (`ziglang`) carries the Darwin libc headers it
cross-compiles with (`lib/libc/include/any-darwin-any`: libc, pthread,
mach, dispatch, objc, TargetConditionals, simd). Only that folder is
unpacked (wheel_cache.py); the Zig compiler itself is never used. Apple's
frameworks (CoreFoundation, IOSurface, ...) are not in it: macos_check/stubs
stands in for the few declarations metal-cpp needs from them.
"""

from __future__ import annotations

from pathlib import Path

try:
    from . import wheel_cache
except ImportError:  # run as a script
    import wheel_cache

ZIG_VERSION = "0.17.0"


def darwin_include_dir() -> tuple[Path | None, str]:
    """(folder with Darwin's <stdint.h>, <pthread.h>, <mach/mach.h>, ...) or (None, reason)."""
    return wheel_cache.unpacked(f"ziglang=={ZIG_VERSION}", "ziglang/lib/libc/include/any-darwin-any/",
                                f"darwin-libc-headers-zig-{ZIG_VERSION}")


if __name__ == "__main__":
    where, why = darwin_include_dir()
    print(where if where else why)
