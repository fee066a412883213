"""Registers, spills and shared memory of our CUDA kernels as MLX's NVRTC builds them, without a GPU.

MLX 0.32.x compiles an mx.fast.cuda_kernel at its first launch with NVRTC
(mlx/backend/cuda/custom_kernel.cpp builds the source; jit_module.cpp
compiles it). nvcc, which the compile tests use, can allocate registers
differently for the same kernel (the quantized decode's ring, since removed: 138 under
NVRTC on the H200, 120 under nvcc 13), and the launch plans size blocks by
registers. This tool reproduces MLX's compile offline:

* the kernel objects and their launches come from the wrappers' own code:
  mx.fast.cuda_kernel is swapped for a recorder (no kernel runs; outputs are
  zeros) while the wrapper is called for a case, so the source, header,
  template constants and input dtypes are exactly what MLX would get;
* the source is assembled as custom_kernel.cpp's build_kernel does (MLX's
  default header, our header, the signature with `<name>_shape/_strides/_ndim`
  where the body names them, the template constants, the body);
* NVRTC (libnvrtc through ctypes) compiles it with jit_module.cpp's options:
  --device-as-default-execution-space, --gpu-architecture=sm_90a (compute
  capability 9.0; "a" from 9 up), the include paths, MLX's device headers as
  in-memory headers; ptxas's --verbose is added only to read spills (it does
  not change the code: checked by compiling with and without it);
* `cuobjdump --dump-resource-usage` reads registers, shared and local memory
  from the cubin; nvcc can compile the very same text for the comparison.

Needs: libnvrtc 13 (`pip install "nvidia-cuda-nvrtc==13.0.*"`, a developer
tool, not a dependency), cuobjdump (nvidia-cuda-cuobjdump or a CUDA
toolkit), CUDA headers (CUDA_HOME, /usr/local/cuda) and MLX's device headers
(mlx/backend/cuda/device/*.cuh, compiled into MLX's CUDA library, not in its
CPU wheel): MLX_SRC names an MLX source tree or git directory (MLX_REF, default
HEAD, picks the commit of a git directory).

    MLX_SRC=/path/to/mlx python tools/nvrtc_regs.py [--nvcc] [--only SUBSTRING] [--jobs 2]
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402

# mlx/backend/cuda/jit_module.cpp's g_include_names (0.32.x): the headers MLX hands NVRTC from memory.
MLX_DEVICE_HEADERS = ("atomic_ops.cuh", "binary_ops.cuh", "cast_op.cuh", "config.h", "complex.cuh",
                      "cute_dequant.cuh", "fp16_math.cuh", "gemm_sm70.cuh", "hadamard.cuh", "indexing.cuh",
                      "qmm_naive.cuh", "qmm_sm80.cuh", "qmm_sm90.cuh", "scatter_ops.cuh", "unary_ops.cuh",
                      "ternary_ops.cuh", "utils.cuh")
_DEVICE_DIR = "mlx/backend/cuda/device/"

# custom_kernel.cpp's default_header.
_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'

# utils.cpp's dtype_to_cuda_type.
_CUDA_TYPES = {mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
               mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
               mx.uint64: "uint64_t", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float",
               mx.float64: "double"}

ARCH = "sm_90a"  # H100/H200: compute capability 9.0, NVRTC >= 11.8 emits SASS, "a" from 9 up


# ---- finding the toolchain -----------------------------------------------------------

def _site_nvidia() -> list:
    return [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]


def find_libnvrtc() -> str | None:
    """libnvrtc.so.13: $NVRTC_LIB, the nvidia-cuda-nvrtc wheel, a CUDA toolkit."""
    if os.environ.get("NVRTC_LIB"):
        return os.environ["NVRTC_LIB"]
    cands = []
    for base in _site_nvidia():
        cands += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so.1[0-9]*")))
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cands += sorted(glob.glob(os.path.join(cuda, "lib64", "libnvrtc.so.1[0-9]*")))
    cands = [c for c in cands if "builtins" not in c and ".alt." not in c]
    return cands[0] if cands else None


def find_cuobjdump() -> str | None:
    for base in _site_nvidia():
        for c in glob.glob(os.path.join(base, "*", "bin", "cuobjdump")):
            return c
    return shutil.which("cuobjdump") or (shutil.which("cuobjdump", path=os.path.join(
        os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin")))


def cuda_include() -> str | None:
    """The CUDA runtime headers MLX's NVRTC is pointed at (nvidia/cu13/include in
    the CUDA wheel's site-packages, else CUDA_HOME / CUDA_PATH / /usr/local/cuda)."""
    for base in _site_nvidia():
        p = os.path.join(base, "cu13", "include")
        if os.path.exists(os.path.join(p, "cuda_fp16.h")):
            return p
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    p = os.path.join(home, "include")
    return p if os.path.exists(os.path.join(p, "cuda_fp16.h")) else None


def include_args() -> list:
    """jit_module.cpp's include_path_args: MLX's include dir (next to its library),
    the CCCL headers, the CUDA runtime headers."""
    args = []
    mlx_inc = os.path.join(os.path.dirname(mx.__file__), "include")
    if os.path.isdir(mlx_inc):
        args.append(f"--include-path={mlx_inc}")
    cuda = cuda_include()
    cccl = os.path.join(mlx_inc, "cccl")
    if not os.path.isdir(cccl) and cuda and os.path.isdir(os.path.join(cuda, "cccl")):
        cccl = os.path.join(cuda, "cccl")  # MLX's cccl_dir(): the toolkit's copy
    if os.path.isdir(cccl):
        args.append(f"--include-path={cccl}")
    if cuda:
        args.append(f"--include-path={cuda}")
    return args


def mlx_device_headers() -> dict | None:
    """{include name: text} of MLX's in-memory device headers, from MLX_SRC (a
    source tree or a git directory at MLX_REF); None where MLX_SRC is unset."""
    src = os.environ.get("MLX_SRC")
    if not src:
        return None
    out = {}
    for name in MLX_DEVICE_HEADERS:
        path = os.path.join(src, _DEVICE_DIR, name)
        if os.path.exists(path):
            with open(path) as f:
                out[_DEVICE_DIR + name] = f.read()
        else:
            ref = os.environ.get("MLX_REF", "HEAD")
            r = subprocess.run(["git", f"--git-dir={src}" if not os.path.isdir(os.path.join(src, ".git"))
                                else f"--git-dir={os.path.join(src, '.git')}", "show", f"{ref}:{_DEVICE_DIR}{name}"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise FileNotFoundError(f"MLX_SRC={src}: no {_DEVICE_DIR}{name} ({r.stderr.strip()})")
            out[_DEVICE_DIR + name] = r.stdout
    return out


def unavailable_reason() -> str | None:
    if find_libnvrtc() is None:
        return 'no libnvrtc (pip install "nvidia-cuda-nvrtc==13.0.*")'
    if find_cuobjdump() is None:
        return "no cuobjdump (nvidia-cuda-cuobjdump or a CUDA toolkit)"
    if cuda_include() is None:
        return "no CUDA headers (CUDA_HOME)"
    if not os.environ.get("MLX_SRC"):
        return "MLX_SRC unset (an MLX 0.32 source tree or git directory: MLX's device headers)"
    return None


# ---- recording the wrappers' kernels -------------------------------------------------

class Launch:
    """One mx.fast.cuda_kernel launch as the wrapper made it."""

    def __init__(self, spec, inputs, output_dtypes, template, grid, threadgroup):
        self.name, self.input_names, self.output_names, self.body, self.header, self.row_contiguous, \
            self.smem = spec
        self.inputs = [(x.dtype, x.ndim) for x in inputs]
        self.output_dtypes = list(output_dtypes)
        self.template = list(template or [])
        self.grid, self.threadgroup = tuple(grid), tuple(threadgroup)

    def kernel_name(self) -> str:
        """custom_kernel.cpp: "custom_kernel_" + name + the template's hash."""
        h = ""
        for _, v in self.template:
            if isinstance(v, bool):
                h += "_t" if v else "_f"
            elif isinstance(v, int):
                h += f"_{v}"
            else:
                h += "_" + str(v).removeprefix("mlx.core.")
        return "custom_kernel_" + self.name + h

    def source(self) -> str:
        """custom_kernel.cpp's build_kernel, line for line."""
        s = _DEFAULT_HEADER + self.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        s += f"__global__ void {self.kernel_name()}(\n"
        for n, (dtype, ndim) in zip(self.input_names, self.inputs):
            s += f"    const {_CUDA_TYPES[dtype]}* {n},\n"
            if ndim > 0:
                if n + "_shape" in self.body:
                    s += f"    const __grid_constant__ Shape {n}_shape,\n"
                if n + "_strides" in self.body:
                    s += f"    const __grid_constant__ Strides {n}_strides,\n"
                if n + "_ndim" in self.body:
                    s += f"    const __grid_constant__ int {n}_ndim,\n"
        for i, (n, dtype) in enumerate(zip(self.output_names, self.output_dtypes)):
            s += f"    {_CUDA_TYPES[dtype]}* {n}" + (",\n" if i < len(self.output_names) - 1 else ") {\n")
        if self.template:
            for n, v in self.template:
                if isinstance(v, bool):
                    s += f"  constexpr bool {n} = {'true' if v else 'false'};\n"
                elif isinstance(v, int):
                    s += f"  constexpr int {n} = {v};\n"
                else:
                    s += f"  using {n} = {_CUDA_TYPES[v]};\n"
            s += "\n"
        return s + self.body + "\n}\n\n} // namespace mlx::core::cu\n"

    def key(self):
        return self.source()


class _Recorder:
    def __init__(self, spec, sink):
        self.spec, self.sink = spec, sink

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                 verbose=False, stream=None):
        self.sink.append(Launch(self.spec, inputs, output_dtypes, template, grid, threadgroup))
        return [mx.zeros(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]


class _FakeLibcuda:
    def __getattr__(self, name):
        return lambda *args: 0  # CUDA_SUCCESS


@contextlib.contextmanager
def recording(hopper=True):
    """Within the block mx.fast.cuda_kernel records launches (into the yielded
    list) and returns zeros; the CUDA backend believes it runs on sm_90 (hopper)."""
    from mlx_flash.backends import cuda as cb

    launches = []
    had = hasattr(mx.fast, "cuda_kernel")
    original = getattr(mx.fast, "cuda_kernel", None)

    def cuda_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                    shared_memory=0, atomic_outputs=False):
        return _Recorder((name, list(input_names), list(output_names), source, header, ensure_row_contiguous,
                          shared_memory), launches)

    from mlx_flash.backends import cuda_matmul as cm

    saved_hopper, saved_reads = cb._is_hopper, cb._nvrtc_reads_includes
    saved_tma, saved_libcuda = cm._tma_available, cm._libcuda
    mx.fast.cuda_kernel = cuda_kernel
    # TMA's routes too: a tensor map is launch data, not code (its encoder answers "done", the bytes stay zero).
    cm._tma_available = lambda: True
    cm._libcuda = lambda: _FakeLibcuda()
    cb._is_hopper = lambda: hopper
    # As on the GPU: the header goes as one #include of its saved file (NVRTC reads it by absolute path).
    cb._nvrtc_reads_includes = lambda: True
    # Every cache of the CUDA modules (kernel objects, launch plans, tensor maps): cleared on the way in and
    # out, so no recorder leaks into later calls and no real kernel into the recording.
    import importlib
    import pkgutil

    import mlx_flash.backends as backends

    caches = []
    for info in pkgutil.iter_modules(backends.__path__):
        if info.name.startswith("cuda"):
            mod = importlib.import_module(f"mlx_flash.backends.{info.name}")
            caches += [f for f in vars(mod).values() if callable(getattr(f, "cache_clear", None))]
    for c in caches:
        c.cache_clear()
    try:
        yield launches
    finally:
        cb._is_hopper, cb._nvrtc_reads_includes = saved_hopper, saved_reads
        cm._tma_available, cm._libcuda = saved_tma, saved_libcuda
        if had:
            mx.fast.cuda_kernel = original
        else:
            del mx.fast.cuda_kernel
        for c in caches:
            c.cache_clear()


# ---- NVRTC, cuobjdump, nvcc -----------------------------------------------------------

_nvrtc = None


def _lib():
    global _nvrtc
    if _nvrtc is None:
        path = find_libnvrtc()
        if path is None:
            raise RuntimeError(unavailable_reason())
        # libnvrtc dlopens its builtins by soname; the wheel's lib dir is on no search path.
        for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*"))):
            if ".alt." not in b:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                break
        lib = ctypes.CDLL(path)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _nvrtc = lib
    return _nvrtc


def nvrtc_version() -> tuple:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def nvrtc_compile(source: str, name_expr: str, headers: dict, verbose_ptxas=True, extra=()) -> tuple:
    """(cubin bytes, program log) as jit_module.cpp's compile() makes them (plus
    ptxas --verbose for the spill lines, unless verbose_ptxas is False)."""
    lib = _lib()

    def check(rc, what, prog=None):
        if rc != 0:
            log = _log(prog) if prog is not None else ""
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}\n{log[-6000:]}")

    def _log(p):
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(p, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value + 1)
        lib.nvrtcGetProgramLog(p, buf)
        return buf.value.decode(errors="replace")

    names = list(headers)
    hdr_src = (ctypes.c_char_p * len(names))(*[headers[n].encode() for n in names])
    hdr_names = (ctypes.c_char_p * len(names))(*[n.encode() for n in names])
    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"mlx_flash_kernel.cu", len(names),
                                 hdr_src, hdr_names), "nvrtcCreateProgram")
    try:
        check(lib.nvrtcAddNameExpression(prog, name_expr.encode()), "nvrtcAddNameExpression")
        opts = ["--device-as-default-execution-space", f"--gpu-architecture={ARCH}"] + include_args()
        if verbose_ptxas:
            opts.append("--ptxas-options=--verbose")
        opts += list(extra)
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        check(lib.nvrtcCompileProgram(prog, len(opts), argv), "nvrtcCompileProgram", prog)
        log = _log(prog)
        n = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)), "nvrtcGetCUBINSize")
        buf = ctypes.create_string_buffer(n.value)
        check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        return buf.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def resource_usage(cubin: bytes) -> dict:
    """{mangled kernel: {"REG", "STACK", "SHARED", "LOCAL"}} by cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([find_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    usage, fn = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            usage[fn] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return usage


def ptxas_spills(log: str) -> tuple:
    """(spill store bytes, spill load bytes) summed over every function ptxas reports
    (a kernel's non-inlined callees included)."""
    st = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", log))
    ld = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", log))
    return st, ld


def _write_headers(headers: dict, root: str):
    for name, text in headers.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def nvcc_usage(source: str, headers: dict) -> dict:
    """{"REG", "SPILL_ST", "SPILL_LD"} of the same text under nvcc (CUDA toolkit),
    MLX's device headers written to a directory on the include path."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    with tempfile.TemporaryDirectory() as d:
        _write_headers(headers, d)
        src = os.path.join(d, "k.cu")
        with open(src, "w") as f:
            f.write(source)
        r = subprocess.run([nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-Xptxas", "-v",
                            "-I", d, "-c", "-o", os.path.join(d, "k.o"), src], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-4000:])
        regs = [int(m) for m in re.findall(r"Used (\d+) registers", r.stderr)]
        st, ld = ptxas_spills(r.stderr)
        return {"REG": max(regs) if regs else None, "SPILL_ST": st, "SPILL_LD": ld}


def measure(launch: Launch, headers: dict, with_nvcc=False) -> dict:
    """NVRTC's (and optionally nvcc's) resource usage of one recorded launch."""
    src = launch.source()
    cubin, log = nvrtc_compile(src, "mlx::core::cu::" + launch.kernel_name(), headers)
    usage = resource_usage(cubin)
    entry = [u for k, u in usage.items() if launch.kernel_name() in k]
    assert len(entry) == 1, (launch.kernel_name(), list(usage))
    st, ld = ptxas_spills(log)
    res = {"regs": entry[0]["REG"], "shared": entry[0]["SHARED"], "local": entry[0]["LOCAL"],
           "stack": entry[0]["STACK"], "spill_st": st, "spill_ld": ld}
    if with_nvcc:
        n = nvcc_usage(src, headers)
        res.update(nvcc_regs=n["REG"], nvcc_spill_st=n["SPILL_ST"], nvcc_spill_ld=n["SPILL_LD"])
    return res


# ---- the cases: the wrappers' own calls ----------------------------------------------

def _quant_decode(tuning, B=1, Hq=32, Hkv=8, Nk=2048, D=128, bits=4, gs=64, dtype=mx.float16, scale_dtype=None,
                  **opts):
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant

    q = mx.zeros((B, Hq, 1, D), dtype)
    k = mx.zeros((B, Hkv, Nk, D), dtype)
    kq = tuple(mx.quantize(k, group_size=gs, bits=bits))
    if scale_dtype is not None:
        kq = (kq[0],) + tuple(x.astype(scale_dtype) for x in kq[1:])
    qspec, inputs, kk, vv = validate_attention_quantized(q, kq, kq, bits=bits, group_size=gs, **opts)
    saved = dict(cuda_quant.TUNING)
    cuda_quant.TUNING.update(tuning)
    cuda_quant.decode_plan.cache_clear()
    cuda_quant._decode_launch.cache_clear()
    try:
        cuda_quant.quantized_attention_forward(q, kk, vv, qspec, inputs, mx.cpu)
    finally:
        cuda_quant.TUNING.clear()
        cuda_quant.TUNING.update(saved)
        cuda_quant.decode_plan.cache_clear()
        cuda_quant._decode_launch.cache_clear()


def _attention(B, Hq, Hkv, Nq, Nk, D, dtype, backward=False, **opts):
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cb

    q, k, v = (mx.zeros((B, h, n, D), dtype) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    spec, inputs = validate_attention(q, k, v, **opts)
    out, lse = cb.attention_forward(q, k, v, spec, inputs, mx.cpu)
    if backward:
        cb.attention_backward(q, k, v, out, lse, mx.zeros_like(out), None, spec, inputs, mx.cpu)


def _matmul(M, K, N, dtype=mx.float16, b_fmt=None, **kw):
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    a = mx.zeros((M, K), dtype)
    b = mx.zeros((N, K), mx.uint8 if b_fmt else dtype)
    extra = dict(b_fmt=b_fmt, b_scale=mx.ones((1, N))) if b_fmt else {}
    spec, a3, b3, sa3, sb3, lead = validate_matmul(a, b, transpose_b=True, **extra, **kw)
    cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu)


def tiles_cases():
    """The quantized decode's opt-in TILES 2 (TUNING "dec_tiles": two tiles a warp an iteration, register path)
    at the benchmark's shape (GQA 32:8, D 128, fp16) and its neighbours: plain, with features, 8-bit, bf16,
    fp32 scales, FOLD, the one-tile prefetch, LATE (dec_late_scales; also at TILES 1). Up to 248 registers under
    nvcc: NVRTC must not spill."""
    tiles = {"decode": True, "dec_tiles": 2}
    feats = dict(softcap=2.0, window=(64, 0), sinks=mx.zeros((32,)))
    yield "qdec tiles2 fp16 4-bit D128", lambda: _quant_decode(tiles)
    yield "qdec tiles2 fp16 4-bit D128 features", lambda: _quant_decode(tiles, **feats)
    yield "qdec tiles2 fp16 8-bit D128", lambda: _quant_decode(tiles, bits=8)
    yield "qdec tiles2 fp16 8-bit D128 features", lambda: _quant_decode(tiles, bits=8, **feats)
    yield "qdec tiles2 bf16 4-bit D128 features", lambda: _quant_decode(tiles, dtype=mx.bfloat16, **feats)
    yield "qdec tiles2 fp32 scales", lambda: _quant_decode(tiles, scale_dtype=mx.float32)
    yield "qdec tiles2 fold", lambda: _quant_decode({**tiles, "dec_fold": True})
    yield "qdec tiles2 prefetch", lambda: _quant_decode({**tiles, "dec_prefetch": True, "dec_pool": False})
    late = {"dec_late_scales": True, "dec_prefetch": True, "dec_pool": False}
    yield "qdec tiles2 prefetch late", lambda: _quant_decode({**tiles, **late})
    yield "qdec tiles2 late 8-bit features", lambda: _quant_decode({**tiles, "dec_late_scales": True}, bits=8, **feats)
    yield "qdec tiles1 prefetch late", lambda: _quant_decode({"decode": True, **late})
    # Q's fragments in shared memory at D <= 128 (QSF, session 16): four blocks an SM need <= 128 at 4-bit.
    qs = {"dec_q_shared": True}
    yield "qdec q_shared fp16 4-bit D128", lambda: _quant_decode(qs)
    yield "qdec q_shared fp16 4-bit D128 features", lambda: _quant_decode(
        qs, softcap=2.0, window=(64, 0), sinks=mx.zeros((32,)))
    yield "qdec q_shared bf16 4-bit D128 features", lambda: _quant_decode(
        qs, dtype=mx.bfloat16, softcap=2.0, window=(64, 0), sinks=mx.zeros((32,)))
    yield "qdec q_shared fp16 4-bit D64", lambda: _quant_decode(qs, D=64)
    yield "qdec q_shared fp16 4-bit D128 group 128", lambda: _quant_decode(qs, gs=128)
    yield "qdec q_shared fp32 scales", lambda: _quant_decode(qs, scale_dtype=mx.float32)
    yield "qdec q_shared keys_m2", lambda: _quant_decode({**qs, "dec_keys_m": 2})
    yield "qdec q_shared fold", lambda: _quant_decode({**qs, "dec_fold": True})
    yield "qdec q_shared fp16 8-bit D128", lambda: _quant_decode(qs, bits=8)


def routed_cases():
    """Default-routed instances (no TUNING): Hopper attention forward (ws / wgmma /
    mma), decode, backward, quantized decode, matmul and gemv."""
    f16, b16 = mx.float16, mx.bfloat16
    yield "fwd D64 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 64, f16)
    yield "fwd D128 bf16 causal", lambda: _attention(1, 8, 8, 1024, 1024, 128, b16, causal=True)
    yield "fwd D128 fp16 softcap", lambda: _attention(1, 8, 8, 1024, 1024, 128, f16, softcap=30.0)
    yield "fwd D128 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 128, f16)
    yield "fwd D192 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 192, f16)
    yield "fwd D96 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 96, f16)
    yield "fwd D256 bf16", lambda: _attention(1, 8, 8, 1024, 1024, 256, b16)
    yield "decode D128 fp16 GQA 32:8", lambda: _attention(1, 32, 8, 1, 8192, 128, f16)
    yield "decode D64 bf16", lambda: _attention(1, 8, 8, 1, 8192, 64, b16)
    yield "bwd D64 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 64, f16, backward=True)
    yield "bwd D128 bf16 causal", lambda: _attention(1, 8, 8, 1024, 1024, 128, b16, backward=True, causal=True)
    yield "bwd D96 fp16", lambda: _attention(1, 8, 8, 1024, 1024, 96, f16, backward=True)
    yield "bwd D96 bf16 causal", lambda: _attention(1, 8, 8, 1024, 1024, 96, b16, backward=True, causal=True)
    yield "bwd D96 fp16 softcap", lambda: _attention(1, 8, 8, 1024, 1024, 96, f16, backward=True, softcap=30.0)
    yield "bwd D112 fp16 softcap", lambda: _attention(1, 8, 8, 1024, 1024, 112, f16, backward=True, softcap=30.0)
    yield "bwd D128 bf16 bool mask", lambda: _attention(1, 8, 8, 1024, 1024, 128, b16, backward=True,
                                                        mask=mx.zeros((1024, 1024), mx.bool_))
    yield "bwd D128 fp16 alibi", lambda: _attention(1, 8, 8, 1024, 1024, 128, f16, backward=True,
                                                    alibi_slopes=mx.ones((8,)))
    yield "qdec routed fp16 4-bit D128", lambda: _quant_decode({})
    yield "qdec routed fp16 8-bit D128", lambda: _quant_decode({}, bits=8)
    yield "qdec routed bf16 4-bit D128 features", lambda: _quant_decode(
        {}, dtype=b16, softcap=2.0, window=(64, 0), sinks=mx.zeros((32,)))
    yield "qdec routed fp16 4-bit D256", lambda: _quant_decode({}, D=256, Hq=8, Hkv=2)
    yield "matmul fp16 4096^2", lambda: _matmul(4096, 4096, 4096)
    yield "gemv fp16 M1", lambda: _matmul(1, 4096, 4096)
    yield "gemv fp16 M16", lambda: _matmul(16, 4096, 4096)
    yield "gemv fp8 weight M1", lambda: _matmul(1, 4096, 4096, b_fmt="e4m3")
    yield "matmul fp8 weight M4096", lambda: _matmul(4096, 4096, 4096, b_fmt="e4m3")


def collect(cases) -> list:
    """[(case label, Launch)] of every distinct kernel the cases launch."""
    seen, out = set(), []
    for label, call in cases:
        with recording() as launches:
            try:
                call()
            except Exception as e:  # noqa: BLE001 (reported, the other cases go on)
                out.append((label, e))
                continue
        for ln in launches:
            if ln.name == "mlx_flash_include_probe" or ln.key() in seen:
                continue
            seen.add(ln.key())
            out.append((label, ln))
    return out


def _template_brief(ln: Launch) -> str:
    keep = ("D", "DV", "BITS", "GS", "NW", "STAGES", "KEYS_M", "TILES", "BN", "W", "SPLIT", "BULK", "KR")
    t = [f"{n}={v}" for n, v in ln.template if n in keep]
    consts = re.findall(r"constexpr (?:int|bool) (\w+) = (\w+);", ln.body.split("\n\n")[0])
    t += [f"{n}={v}" for n, v in consts if n in keep]
    return " ".join(t)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", choices=("routed", "tiles", "all"), default="all")
    p.add_argument("--nvcc", action="store_true", help="also compile each text with nvcc")
    p.add_argument("--only", default="", help="cases whose label contains this")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        sys.exit(f"nvrtc_regs: {reason}")
    headers = mlx_device_headers()
    cases = (list(routed_cases()) if args.set in ("routed", "all") else []) + (
        list(tiles_cases()) if args.set in ("tiles", "all") else [])
    cases = [c for c in cases if args.only in c[0]]
    items = collect(cases)
    print(f"NVRTC {'.'.join(map(str, nvrtc_version()))}, {ARCH}; MLX device headers from {os.environ['MLX_SRC']}")

    def run(item):
        label, ln = item
        if isinstance(ln, Exception):
            return label, None, f"wrapper failed: {type(ln).__name__}: {ln}"
        try:
            return label, ln, measure(ln, headers, args.nvcc)
        except Exception as e:  # noqa: BLE001
            return label, ln, f"compile failed: {e}"[:400]

    print("| case | kernel | template | threads | NVRTC regs | spills | nvcc regs | nvcc spills | smem |")
    print("|---|---|---|---|---|---|---|---|---|")
    with ThreadPoolExecutor(args.jobs) as ex:
        for label, ln, r in ex.map(run, items):
            if not isinstance(r, dict):
                print(f"| {label} | {ln.name if ln else ''} | | | {r} | | | | |", flush=True)
                continue
            nv = (f"{r['nvcc_regs']} | {r['nvcc_spill_st']}/{r['nvcc_spill_ld']}" if "nvcc_regs" in r else " | ")
            print(f"| {label} | {ln.name.removeprefix('mlx_flash_')[:40]} | {_template_brief(ln)} | "
                  f"{ln.threadgroup[0]} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {nv} | {ln.smem} |",
                  flush=True)


if __name__ == "__main__":
    main()
