"""Locate the kernel sources (metal_src/, cuda_src/) that wrappers read at run time.

Two layouts exist:

* an installed wheel: the CMake install rules copy them into the package,
  `mlx_flash/metal_src` and `mlx_flash/cuda_src`;
* a source checkout (or editable install): they sit at the repository root,
  next to the `mlx_flash/` package directory.

The package copy wins when both exist, so an installed wheel never reads a
stray checkout.
"""

from __future__ import annotations

import functools
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_KINDS = ("metal_src", "cuda_src")


@functools.lru_cache(maxsize=None)
def source_dir(kind: str) -> Path:
    """The directory holding the `kind` sources ('metal_src' or 'cuda_src')."""
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    for candidate in (_PACKAGE_DIR / kind, _PACKAGE_DIR.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"mlx_flash: kernel sources '{kind}' not found in {_PACKAGE_DIR} (installed wheel) "
        f"or {_PACKAGE_DIR.parent} (source checkout); the installation is incomplete"
    )


@functools.lru_cache(maxsize=None)
def read_source(kind: str, name: str) -> str:
    """The text of one source file, e.g. read_source('metal_src', 'attention.h')."""
    path = source_dir(kind) / name
    if not path.is_file():
        raise FileNotFoundError(f"mlx_flash: kernel source {path} is missing")
    return path.read_text()


def metal_source(name: str) -> str:
    return read_source("metal_src", name)


def cuda_source(name: str) -> str:
    return read_source("cuda_src", name)
