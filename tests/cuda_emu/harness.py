"""Run the CUDA kernels of cuda_src/ on the CPU, as `mx.fast.cuda_kernel` would run them.

`cuda_kernel(...)` mirrors `mx.fast.cuda_kernel`: it builds the kernel function
MLX builds (inputs as `const T*`, outputs as `T*`, template constants at the top
of the body), with the header mlx_flash passes, compiles it as C++ with
clang-19 against a small emulation of the CUDA device language
(include/cuda_emu.h, mma_emu.cuh in place of cuda_src/mma.cuh) and runs the
grid on the fiber runtime of the Metal emulation (tests/metal_emu/runtime):
every CUDA thread a fiber, a block a threadgroup, a warp a SIMD-group.

Kernels built with `ensure_row_contiguous=False` read their inputs in place,
as MLX hands them over: the bytes a view spans (its buffer, not a dense
copy, so rows outside the view are there to be misread) and, for every input
whose name the source mentions as `<name>_strides`, MLX's `Strides`
parameter (element strides, MAX_NDIM entries).

`patched_cuda_kernel()` swaps it in for `mx.fast.cuda_kernel`, so the CUDA
backend's own wrappers (mlx_flash/backends/cuda.py: launch shapes, split
heuristics, kernel chaining) run unchanged on a machine without a GPU:

    with patched_cuda_kernel():
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)

The Hopper kernels (the GEMM matmul_wgmma.cuh / matmul_wgmma_ws.cuh, and
attention_fwd_ws.cuh, attention_fwd_wgmma.cuh, attention_bwd_wgmma.cuh,
attention_bwd_ws.cuh) keep their text: ptx_asm.py rewrites their inline PTX
into hopper_emu.cuh's emulation (TMA, mbarriers, named barriers, wgmma SS / RS,
16-bit and fp8 kinds). `patched_hopper()` adds what an H200 gives the
wrappers (sm_90, TMA with tensor maps in the emulation's encoding, an SM
count), so they route as there.

Shared memory and unwritten outputs are poisoned (NaN bytes); cp.async
copies land only when their thread waits for them; ready fibers run in a
seeded random order. What it cannot show: timing, and races between
threads that the cooperative schedule happens to order correctly.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import os
import re
import struct

import mlx.core as mx
import numpy as np

from metal_emu import harness as _metal

from . import ptx_asm

_HERE = os.path.dirname(os.path.abspath(__file__))
_INCLUDE = os.path.join(_HERE, "include")
_METAL_RUNTIME = os.path.join(os.path.dirname(_HERE), "metal_emu", "runtime")
_SMEM_LIMIT = 227 * 1024  # per block, sm_90

_C_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.bool_: "bool",
            mx.int32: "int32_t", mx.uint8: "uint8_t", mx.uint32: "uint32_t"}
_NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
          mx.int32: np.int32, mx.uint8: np.uint8, mx.uint32: np.uint32}
_INCLUDE_LINE = re.compile(r'^\s*(#pragma once|#include\s+"[^"]+")\s*$', re.M)
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\[\];")
_STATIC_SMEM = re.compile(r"(?<!extern )__shared__\s+(?:__align__\(\d+\)\s+)?((?:(?:unsigned|long)\s+)*\w+)\s+((?:[^;()\[]|\[[^\];]+\])+);")
# PTX of the Hopper kernels (ptx_asm.py rewrites it, hopper_emu.cuh runs it).
_HOPPER_MARKERS = ("wgmma.", "mbarrier.", "cp.async.bulk", "setmaxnreg", "bar.sync")


def unavailable_reason():
    return _metal.unavailable_reason()


def _read(path):
    with open(path) as f:
        return f.read()


_HEADER_INCLUDE = re.compile(r'^// mlx_flash header [0-9a-f]+\n#include "([^"]+)"\n$')


def _emulated_header(header: str) -> str:
    """mlx_flash's header with mma.cuh's PTX swapped for mma_emu.cuh and the
    __shared__ declarations turned into runtime allocations."""
    from mlx_flash.backends import cuda as cuda_backend

    included = _HEADER_INCLUDE.match(header)
    if included:  # the backend's one-line #include of its saved header: emulate the text itself
        header = _read(included[1])
    strip = lambda text: _INCLUDE_LINE.sub("", text)
    original = header  # the kernel's own text (the emulation's headers below mention PTX in comments)
    # The backend hands MLX minified headers (cuda_backend._header): match mma.cuh in that form.
    real_mma = cuda_backend._minify(strip(cuda_backend._read("mma.cuh")))
    if real_mma in header:
        header = header.replace(real_mma, strip(_read(os.path.join(_HERE, "mma_emu.cuh"))))
    elif "mma.sync" in header or "cp.async" in header:
        raise AssertionError("cuda_emu: the header has mma.cuh's PTX in an unexpected form")
    # The decode kernel's own PTX (decode_ptx.cuh: bulk copies, movmatrix).
    real_decode_ptx = cuda_backend._minify(strip(cuda_backend._read("decode_ptx.cuh")))
    if real_decode_ptx in header:
        header = header.replace(real_decode_ptx, strip(_read(os.path.join(_HERE, "decode_ptx_emu.cuh"))))
    if any(marker in original for marker in _HOPPER_MARKERS):
        # The Hopper kernels (the GEMM matmul_wgmma*.cuh, attention_fwd_ws.cuh,
        # attention_bwd_*.cuh): their inline PTX, wherever it stands, rewritten
        # into hopper_emu.cuh's calls.
        header = (f"#define EMU_TMA_EARLY {int(TMA_EARLY)}\n#define EMU_FP8_ACCUM_BITS {int(FP8_ACCUM_BITS)}\n"
                  f"#define EMU_FP8_ACCUM_CUT_ACC {int(FP8_ACCUM_CUT_ACC)}\n"
                  + _read(os.path.join(_HERE, "hopper_emu.cuh")) + "\n" + ptx_asm.translate(header))
    return _shared_declarations(header)


def _shared_declarations(text: str) -> str:
    """extern __shared__ and __shared__ declarations turned into runtime allocations."""
    text = _DYNAMIC_SMEM.sub(r"unsigned char* \1 = __emu_dynamic_smem();", text)
    counter = iter(range(1 << 30))

    def declare(m):
        lines = []
        for item in re.split(r",(?![^\[]*\])", m[2]):  # one allocation per declarator (`T a, b[4];`)
            d = re.fullmatch(r"\s*(\w+)\s*((?:\[[^\]]+\])*)\s*", item)
            if not d:
                raise AssertionError(f"cuda_emu: __shared__ declaration not understood: {m[0]!r}")
            lines.append(f"auto& {d[1]} = *__emu_shared_array<{m[1]}{d[2]}, {next(counter)}>();")
        return " ".join(lines)

    return _STATIC_SMEM.sub(declare, text)


def _template_line(name, value):
    if isinstance(value, bool):
        return f"  constexpr bool {name} = {'true' if value else 'false'};"
    if isinstance(value, int):
        return f"  constexpr int {name} = {value};"
    return f"  using {name} = {_C_TYPES[value]};"


def _include_text() -> str:
    """include/'s headers (the translation unit #includes them: part of a build's key)."""
    return "".join(_read(os.path.join(_INCLUDE, n)) for n in sorted(os.listdir(_INCLUDE)) if n.endswith(".h"))


def _library(cpp: str):
    _, tag = _metal._toolchain()
    key = hashlib.sha256((tag + "\0cuda_emu\0" + _include_text() + cpp).encode()).hexdigest()[:24]
    if key in _metal._LIBRARIES:
        return _metal._LIBRARIES[key]
    runtime = _metal._runtime_library()
    path = os.path.join(_metal._BUILD, f"cuda-kernel-{key}.so")

    def build(tmp):
        src = tmp + ".cpp"
        with open(src, "w") as f:
            f.write(cpp)
        try:
            _metal._run_clang([*_metal._CXX_FLAGS, "-shared", "-I", _INCLUDE, "-I", _METAL_RUNTIME, src, runtime,
                               "-Wl,-rpath,$ORIGIN", "-o", tmp], "the CUDA kernel")
        finally:
            os.unlink(src)

    _metal._atomic_output(path, build)
    lib = ctypes.CDLL(path)
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
                               ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.POINTER(ctypes.c_long),
                               ctypes.POINTER(ctypes.c_long), ctypes.c_ulonglong, ctypes.c_long, ctypes.c_int,
                               ctypes.c_char_p, ctypes.c_long]
    _metal._LIBRARIES[key] = lib
    return lib


def _to_bytes(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x, copy=True)).reshape(-1)


_MAX_NDIM = 10  # MLX's Strides: cuda::std::array<int64_t, MAX_NDIM>
_WRITTEN_INPUTS = ("tk", "tickets")  # ticket pool regions (decode attention, the weight-as-A matmul)


def _view_bytes(x: mx.array):
    """(the bytes x spans in its own buffer, its element strides): an input
    that MLX passes without a copy (ensure_row_contiguous=False)."""
    mx.eval(x)
    view = np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)  # shares x's memory
    itemsize = view.itemsize
    if any(s < 0 for s in view.strides):
        raise NotImplementedError("cuda_emu: negative strides")
    span = 0 if view.size == 0 else (sum((n - 1) * s for n, s in zip(view.shape, view.strides)) + itemsize)
    address = view.__array_interface__["data"][0]
    raw = np.frombuffer((ctypes.c_char * max(span, 1)).from_address(address), np.uint8)[:span].copy()
    strides = [s // itemsize for s in view.strides] + [0] * (_MAX_NDIM - view.ndim)
    return raw, np.array(strides, np.int64)


# Hopper TMA loads write their bytes at issue (True) instead of when their
# barrier is first polled (hopper_emu.cuh, tma_land).
TMA_EARLY = False
# fp8 wgmma (hopper_emu.cuh): 0 sums in fp32; > 0 models
# Hopper's truncating fp8 accumulation with that many fraction bits below the
# largest term's exponent (the running accumulator cut too unless
# FP8_ACCUM_CUT_ACC is False); tools/fp8_accum_model.py is the same in numpy.
FP8_ACCUM_BITS = 0
FP8_ACCUM_CUT_ACC = True

# (kernel name, template values) of every launch, newest last: tests check
# which kernel a wrapper's routing chose.
LAUNCHES: collections.deque = collections.deque(maxlen=256)


class CudaKernel:
    """Mirror of the object `mx.fast.cuda_kernel` returns."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 shared_memory=0, atomic_outputs=False):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.shared_memory = source, header, shared_memory
        self.atomic_outputs, self.ensure_row_contiguous = atomic_outputs, ensure_row_contiguous
        # As MLX decides (custom_kernel.cpp): strides for the inputs the source names so.
        self.strided = [n for n in self.input_names if n + "_strides" in source]

    def translation_unit(self, inputs, template, output_dtypes) -> str:
        params = [f"  const {_C_TYPES[x.dtype]}* {n} = (const {_C_TYPES[x.dtype]}*)__b[{i}];"
                  for i, (n, x) in enumerate(zip(self.input_names, inputs))]
        params += [f"  {_C_TYPES[d]}* {n} = ({_C_TYPES[d]}*)__b[{len(inputs) + i}];"
                   for i, (n, d) in enumerate(zip(self.output_names, output_dtypes))]
        first = len(inputs) + len(output_dtypes)  # stride blocks follow the outputs
        params += [f"  const Strides {n}_strides = __emu_strides(__b[{first + i}]);"
                   for i, n in enumerate(self.strided)]
        header = _emulated_header(self.header)
        start = "".join(f"  mlx_flash::{fn}();\n" for fn in ("emu_thread_start", "emu_hopper_thread_start") if fn in header)
        source = ptx_asm.translate(self.source) if "namespace emu_hopper" in header else self.source
        return "\n".join([
            '#include "cuda_emu.h"',
            header,
            f"const unsigned long __emu_dynamic_smem_bytes = {max(int(self.shared_memory), 16)};",
            'extern "C" void __emu_thread(void** __b) {',
            start + "\n".join(params),
            "\n".join(_template_line(n, v) for n, v in (template or [])),
            _shared_declarations(source),
            "}",
            'extern "C" int emu_launch(void** buffers, const unsigned long* bytes, const char* const* names,',
            "                          int count, const long* grid, const long* group, unsigned long long seed,",
            "                          long tg_limit, int os_threads, char* error, long error_len) {",
            "  return __emu_run_grid(__emu_thread, buffers, bytes, names, count, grid, group, seed, tg_limit,",
            "                        os_threads, error, error_len);",
            "}",
        ])

    def __call__(self, *, inputs, template=None, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None, verbose=False, stream=None, seed=None):
        if self.shared_memory > _SMEM_LIMIT:
            raise ValueError(f"cuda_emu: {self.name} asks for {self.shared_memory} bytes of shared memory")
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        for n, v in template or []:
            # MLX names the kernel after its template values; NVRTC's lookup of
            # a name holding "-1" fails on the card (session 12), so none may be negative.
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"cuda_emu: {self.name}: template {n} = {v} is negative")
        LAUNCHES.append((self.name, dict(template or [])))
        lib = _library(self.translation_unit(inputs, template, output_dtypes))
        if self.ensure_row_contiguous:
            keep = [_to_bytes(x) for x in inputs]
            strides = [_view_bytes(mx.contiguous(inputs[self.input_names.index(n)]))[1] for n in self.strided]
        else:
            views = {n: _view_bytes(x) for n, x in zip(self.input_names, inputs)}
            keep = [views[n][0] for n in self.input_names]
            strides = [views[n][1] for n in self.strided]
        for shape, dtype in zip(output_shapes, output_dtypes):
            count = int(np.prod(shape, dtype=np.int64))
            if init_value is not None:
                # (mx.full gives float32 for a NaN fill of an integer dtype: cast.)
                keep.append(_to_bytes(mx.full(tuple(shape), init_value, dtype=dtype).astype(dtype)).copy())
            else:  # unwritten outputs must show: NaN
                raw = np.full(count * np.dtype(_NUMPY[dtype]).itemsize, 0xFF, dtype=np.uint8)
                keep.append(raw.view(_NUMPY[dtype]))
        keep += strides
        n = len(keep)
        array = (ctypes.c_void_p * n)(*[b.ctypes.data for b in keep])
        sizes = (ctypes.c_ulong * n)(*[b.nbytes for b in keep])
        buffer_names = self.input_names + self.output_names + [s + "_strides" for s in self.strided]
        names = (ctypes.c_char_p * n)(*[s.encode() for s in buffer_names])
        error = ctypes.create_string_buffer(4096)
        seed = int(os.environ.get("CUDA_EMU_SEED", "0")) if seed is None else seed
        status = lib.emu_launch(array, sizes, names, n, (ctypes.c_long * 3)(*grid),
                                (ctypes.c_long * 3)(*threadgroup), seed, _SMEM_LIMIT + 4096, 1, error, len(error))
        if status != 0:
            raise RuntimeError(f"cuda_emu: kernel {self.name}: {error.value.decode()}")
        # Inputs a kernel writes on purpose (the decode kernel's ticket pool
        # region): their bytes after the launch, for tests to inspect.
        self.inputs_after = {n: buf.copy() for n, buf in zip(self.input_names, keep) if n in _WRITTEN_INPUTS}
        outs = []
        for buf, shape, dtype in zip(keep[len(inputs):], output_shapes, output_dtypes):
            arr = mx.array(buf.view(_NUMPY[dtype]).reshape(tuple(shape)))
            outs.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
        return outs


def cuda_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                shared_memory=0, atomic_outputs=False):
    return CudaKernel(name, input_names, output_names, source, header, ensure_row_contiguous, shared_memory,
                      atomic_outputs)


@contextlib.contextmanager
def patched_cuda_kernel():
    """Within the block, mx.fast.cuda_kernel (as mlx_flash's CUDA backend calls
    it) builds emulated kernels."""
    from mlx_flash.backends import cuda as cuda_backend

    had = hasattr(mx.fast, "cuda_kernel")
    original = getattr(mx.fast, "cuda_kernel", None)
    mx.fast.cuda_kernel = cuda_kernel
    caches = [cuda_backend._kernel] + [getattr(cuda_backend, n) for n in ("_decode_launch_cached",)
                                       if hasattr(cuda_backend, n)]  # the decode launch keeps its kernel
    for cache in caches:
        cache.cache_clear()
    try:
        yield
    finally:
        if had:
            mx.fast.cuda_kernel = original
        else:
            del mx.fast.cuda_kernel
        for cache in caches:
            cache.cache_clear()


# The emulation's tensor map (hopper_emu.cuh's TensorMap): tag, rank, element
# bytes, swizzle bytes, global address (written by each block), dims, byte
# strides of dims 1 and 2, box; 128 bytes like a CUtensorMap.
_TENSOR_MAP = struct.Struct("<IIIIQ3Q2Q3II")
_TENSOR_MAP_TAG = 0x4D54554D


def tensor_map_3d(elem_bytes: int, inner: int, rows: int, slabs: int, box_rows: int) -> bytes:
    """cuda_fwd_ws.tensor_map_3d's map (row-major [slabs][rows][inner], boxes of
    64 x box_rows x 1, 128-byte swizzle, zero fill) in the emulation's encoding."""
    row_bytes = inner * elem_bytes
    return _TENSOR_MAP.pack(_TENSOR_MAP_TAG, 3, elem_bytes, 128, 0, inner, rows, slabs, row_bytes, rows * row_bytes,
                            64, box_rows, 1, 0).ljust(128, b"\0")


def tensor_map_2d(elem_bytes: int, inner: int, outer: int, box_inner: int, box_outer: int,
                  swizzle: int = 128) -> bytes:
    """cuda_matmul.tensor_map_template's map (row-major [outer][inner], boxes of
    box_inner x box_outer, 128- or 64-byte swizzle or none, zero fill) in the emulation's encoding."""
    assert swizzle in (0, 64, 128), swizzle
    return _TENSOR_MAP.pack(_TENSOR_MAP_TAG, 2, elem_bytes, swizzle, 0, inner, outer, 1, inner * elem_bytes,
                            inner * outer * elem_bytes, box_inner, box_outer, 1, 0).ljust(128, b"\0")


@contextlib.contextmanager
def patched_hopper(sm_count: int = 3):
    """patched_cuda_kernel, and what an H100/H200 gives the CUDA wrappers: sm_90,
    TMA (tensor maps in the emulation's encoding instead of libcuda's) and
    `sm_count` multiprocessors (few: persistent blocks take several items).
    The wrappers' routing is theirs: a call goes where it would on the GPU."""
    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_fwd_ws, cuda_matmul

    swaps = [(cuda_backend, "_is_hopper", lambda: True), (cuda_matmul, "_tma_available", lambda: True),
             (cuda_fwd_ws, "tensor_map_3d", tensor_map_3d), (cuda_fwd_ws, "sm_count", lambda: sm_count),
             (cuda_matmul, "tensor_map_template", tensor_map_2d), (cuda_matmul, "sm_count", lambda: sm_count)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    caches = [cuda_fwd_ws._kernel, cuda_fwd_ws._templates, cuda_matmul._tma_template_array] + [
        getattr(cuda_backend, n) for n in ("_bwd_ws_kernel",) if hasattr(getattr(cuda_backend, n), "cache_clear")]
    for cache in caches:
        cache.cache_clear()
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        with patched_cuda_kernel():
            yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for cache in caches:
            cache.cache_clear()
