"""Metal matmul2d: mx.fast.metal_kernel over metal_src/matmul.h.

`matmul2d(a, b, a_scale, b_scale, spec, stream)` follows the backend
interface of dispatch.py: a `[batch, M, K]`, b `[batch or 1, K, N]`
(`[.., N, K]` with transpose_b), scales None or float32
`[batch or 1, M or 1, 1]` / `[1, 1, N or 1]`; returns `[batch, M, N]` in
`spec.out_dtype`. One kernel per (operand dtypes, formats, layout, out
dtype); shapes and strides travel in a small int32 `params` array, so a new
shape needs no new compile.

Kernels are built by a swappable factory (`set_kernel_factory`), by default
`mx.fast.metal_kernel`; the test suite swaps in the MSL emulation harness
(tests/metal_emu), which takes the same arguments, so the exact source
built here is what the tests run. The kernel cache is keyed on the factory.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from .._matmul_spec import MatmulSpec

# Threads per threadgroup (MM_THREADS of matmul.h) and the square output tile
# per threadgroup: 64 x 64 where the product is large enough to fill the GPU
# with such tiles (more reuse of each staged element), else 32 x 32.
THREADS = 128
SMALL_TILE, LARGE_TILE = 32, 64
_FORMAT_CODES = {None: 0, "e4m3": 1, "e5m2": 2}
_PARAM_COUNT = 8

_BODY = """
    threadgroup float smem[mlxf_mm_smem_floats(TILE)];
    matmul2d_tile<T_OUT, A_FMT, B_FMT, TRANSPOSE_B, TILE, TILE>(
        a, b, a_scale, b_scale, params, out, smem,
        threadgroup_position_in_grid, simdgroup_index_in_threadgroup, thread_index_in_threadgroup);
"""

_factory = None  # None: mx.fast.metal_kernel


def set_kernel_factory(factory):
    """Use `factory` (same signature as mx.fast.metal_kernel) to build
    kernels; None restores the default. Returns the previous factory."""
    global _factory
    previous, _factory = _factory, factory
    return previous


def _metal_src_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "metal_src"), os.path.join(here, "..", "..", "metal_src")):
        if os.path.exists(os.path.join(candidate, "matmul.h")):
            return os.path.normpath(candidate)
    raise FileNotFoundError("mlx_flash: metal_src/matmul.h not found (neither in the package nor the checkout)")


@functools.lru_cache(maxsize=None)
def header_source() -> str:
    """The text of metal_src/matmul.h."""
    with open(os.path.join(_metal_src_dir(), "matmul.h")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _kernel(factory):
    make = factory if factory is not None else mx.fast.metal_kernel
    return make(
        name="mlxf_matmul2d",
        input_names=["a", "b", "a_scale", "b_scale", "params"],
        output_names=["out"],
        source=_BODY,
        header=header_source(),
        ensure_row_contiguous=True,
    )


def _scale_or_one(scale):
    return mx.ones((1,), dtype=mx.float32) if scale is None else scale.astype(mx.float32)


def tile_size(spec: MatmulSpec) -> int:
    """Output tile edge: 64 when M and N both span at least two large tiles."""
    return LARGE_TILE if min(spec.M, spec.N) >= 2 * LARGE_TILE else SMALL_TILE


def launch_config(spec: MatmulSpec):
    """(grid, threadgroup) in threads, as mx.fast.metal_kernel takes them."""
    tile = tile_size(spec)
    col_tiles = (spec.N + tile - 1) // tile
    row_tiles = (spec.M + tile - 1) // tile
    return (col_tiles * THREADS, row_tiles, spec.batch), (THREADS, 1, 1)


def params_array(spec: MatmulSpec, a_scale, b_scale) -> mx.array:
    b_batch_stride = spec.K * spec.N if spec.b_batched and spec.batch > 1 else 0
    as_batch = as_row = bs_col = 0
    if a_scale is not None:
        rows = a_scale.shape[1]
        as_batch = rows if a_scale.shape[0] > 1 else 0
        as_row = 1 if rows > 1 else 0
    if b_scale is not None:
        bs_col = 1 if b_scale.shape[-1] > 1 else 0
    values = [spec.M, spec.N, spec.K, b_batch_stride, as_batch, as_row, bs_col]
    return mx.array(values + [0] * (_PARAM_COUNT - len(values)), dtype=mx.int32)


def matmul2d(a, b, a_scale, b_scale, spec: MatmulSpec, stream):
    """out [batch, M, N] = (dequant(a) * a_scale) @ (dequant(b) * b_scale)."""
    if spec.M == 0 or spec.N == 0 or spec.batch == 0:
        return mx.zeros((spec.batch, spec.M, spec.N), dtype=spec.out_dtype)
    grid, threadgroup = launch_config(spec)
    kernel = _kernel(_factory)
    (out,) = kernel(
        inputs=[a, b, _scale_or_one(a_scale), _scale_or_one(b_scale), params_array(spec, a_scale, b_scale)],
        template=[("T_OUT", spec.out_dtype), ("A_FMT", _FORMAT_CODES[spec.a_fmt]),
                  ("B_FMT", _FORMAT_CODES[spec.b_fmt]), ("TRANSPOSE_B", spec.transpose_b),
                  ("TILE", tile_size(spec))],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(spec.batch, spec.M, spec.N)],
        output_dtypes=[spec.out_dtype],
        stream=stream,
    )
    return out
