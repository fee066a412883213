"""Run `mx.fast.metal_kernel` sources on the CPU.

`metal_kernel(...)` mirrors `mx.fast.metal_kernel`: it builds the same kernel
source text MLX would build (signature generated from the input/output names,
the template arguments and the attributes the body mentions, as in
mlx/backend/common/metal_kernel.cpp), compiles it as C++20 with clang-19
against an emulation of the Metal standard library (include/metal_stdlib),
and runs the grid on the CPU, every thread a cooperatively scheduled fiber
(runtime/runtime.cpp). See docs/metal_emulation.md.

    from metal_emu import harness
    if harness.unavailable_reason() is None:
        k = harness.metal_kernel("add", ["a", "b"], ["out"], source)
        (out,) = k(inputs=[a, b], grid=(n, 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[a.shape], output_dtypes=[a.dtype])

Besides MLX's arguments, a call takes `seed=` (the order in which ready
threads run; default 0, or $METAL_EMU_SEED). `counting()` counts the work of
the launches in a block, $METAL_EMU_INTERLEAVE=1 switches SIMD-groups at every
threadgroup-memory access (both through instrumented builds); library.py runs
`[[kernel]]` functions of Metal library sources such as MLX's own kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_INCLUDE = os.path.join(_HERE, "include")
_RUNTIME = os.path.join(_HERE, "runtime")


def _build_dir() -> str:
    """Where compiled kernels are cached: $METAL_EMU_BUILD_DIR, else _build/
    next to this file, else (read-only checkout) a per-user temp folder."""
    if os.environ.get("METAL_EMU_BUILD_DIR"):
        return os.environ["METAL_EMU_BUILD_DIR"]
    here = os.path.join(_HERE, "_build")
    try:
        os.makedirs(here, exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"metal_emu_build-{os.getuid()}")


_BUILD = _build_dir()

MAX_THREADS_PER_THREADGROUP = 1024
THREADGROUP_MEMORY_LIMIT = 32768
# Arrays with fewer elements than this are passed in the constant address
# space (MLX's max_constant_array_size).
_MAX_CONSTANT_ARRAY_SIZE = 8

_CXX_FLAGS = [
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-g0",
    "-Wno-unknown-attributes",
    "-Wno-c++17-extensions",
    "-Wno-ignored-attributes",
    # MSL rounds every half/bfloat operation; clang on x86 would otherwise
    # compute half expressions in float and round only at the end.
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
    # One rounding per operation, no fused multiply-adds behind our back.
    "-ffp-contract=off",
]


def _cpu_flags() -> list:
    """Instruction sets that make fma() and half conversions inline (x86-64)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f"-m{name}" for name in ("fma", "f16c") if name in flags]


_CXX_FLAGS += _cpu_flags()


class MetalCompileError(RuntimeError):
    """The kernel source did not compile against the MSL emulation."""


class MetalEmulationError(RuntimeError):
    """The kernel ran into something Metal forbids (divergent barrier, limits, ...)."""


# --------------------------------------------------------------------------
# dtypes

_TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

# numpy dtype of the same bytes (bfloat16 travels as its uint16 bits).
_NUMPY_DTYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,
    mx.bool_: np.bool_,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
}

_FLOATING = (mx.float32, mx.float16, mx.bfloat16)


def type_string(dtype) -> str:
    """The MSL type name MLX writes for `dtype` (get_type_string)."""
    try:
        return _TYPE_STRINGS[dtype]
    except KeyError:
        raise TypeError(f"metal_emu: dtype {dtype} is not supported by the emulation") from None


def _as_array(x) -> mx.array:
    """An input as MLX would take it (Python scalars become 0-d arrays)."""
    if isinstance(x, mx.array):
        return x
    if isinstance(x, (bool, int, float, np.ndarray, np.generic)):
        return mx.array(x)
    raise TypeError(f"metal_emu: inputs must be mx.array or scalars, got {type(x).__name__}")


def _to_bytes(x: mx.array) -> np.ndarray:
    """Row-contiguous host copy of `x`'s elements (bfloat16 as uint16 bits)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x, copy=True))


def _from_bytes(buf: np.ndarray, shape, dtype) -> mx.array:
    out = mx.array(buf.view(_NUMPY_DTYPES[dtype]).reshape(shape))
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


# --------------------------------------------------------------------------
# The source MLX generates (mirrors mlx/backend/common/metal_kernel.cpp)

_METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# How the emulation's entry point computes each attribute from EmuThreadAttrs.
_ATTRIBUTE_VALUES = {
    "grid_origin": "uint3(0)",
    "grid_size": "__emu_u3(__a->threads_per_grid)",
    "thread_execution_width": "32u",
    "threads_per_simdgroup": "32u",
}


def _template_value(value) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, mx.Dtype):
        return type_string(value)
    raise TypeError(f"metal_emu: template values must be mx.Dtype, int or bool, got {type(value).__name__}")


def _template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


class _Signature:
    """Everything about one instantiation that the source depends on."""

    def __init__(self, kernel: "Kernel", inputs, template, output_dtypes):
        self.kernel = kernel
        self.inputs = inputs
        self.template = list(template or [])
        self.output_dtypes = list(output_dtypes)
        name = "custom_kernel_" + kernel.name
        self.template_def = ""
        if self.template:
            self.template_def = "<" + ", ".join(_template_value(v) for _, v in self.template) + ">"
            name += "_" + _template_hash(self.template_def)
        for x in inputs:
            name += "_" + type_string(x.dtype)
            if x.ndim == 0:
                name += "s"
            elif x.size < _MAX_CONSTANT_ARRAY_SIZE:
                name += "c"
        for dtype in self.output_dtypes:
            name += "_" + type_string(dtype)
        self.kernel_name = name

    def buffers(self):
        """(kind, input index or output index, C type) per buffer index, in order."""
        out = []
        for i, x in enumerate(self.inputs):
            space = "constant" if x.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
            out.append(("input", i, space))
            if x.ndim > 0:
                has_shape, has_strides, has_ndim = self.kernel.shape_infos[i]
                if has_shape:
                    out.append(("shape", i, None))
                if has_strides:
                    out.append(("strides", i, None))
                if has_ndim:
                    out.append(("ndim", i, None))
        for j in range(len(self.kernel.output_names)):
            out.append(("output", j, None))
        return out

    def source(self) -> str:
        """The exact text MLX would compile (after its utils header)."""
        k = self.kernel
        text = k.header
        if self.template:
            text += "template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in self.template) + ">\n"
        text += f"[[kernel]] void {self.kernel_name}(\n"
        index = 0
        for kind, i, space in self.buffers():
            if kind == "input":
                x = self.inputs[i]
                ref = "&" if x.ndim == 0 else "*"
                text += f"  const {space} {type_string(x.dtype)}{ref} {k.input_names[i]} [[buffer({index})]],\n"
            elif kind == "shape":
                text += f"  const constant int* {k.input_names[i]}_shape [[buffer({index})]],\n"
            elif kind == "strides":
                text += f"  const constant int64_t* {k.input_names[i]}_strides [[buffer({index})]],\n"
            elif kind == "ndim":
                text += f"  const constant int& {k.input_names[i]}_ndim [[buffer({index})]],\n"
            else:
                t = type_string(self.output_dtypes[i])
                if k.atomic_outputs:
                    t = f"atomic<{t}>"
                text += f"  device {t}* {k.output_names[i]} [[buffer({index})]]"
                # MLX compares the buffer index with inputs + outputs - 1
                # (not counting shape buffers); reproduce it as it is.
                if index < len(self.inputs) + len(k.output_names) - 1 or k.attributes:
                    text += ",\n"
                else:
                    text += ") {\n"
            index += 1
        for a, (attr, dtype) in enumerate(k.attributes):
            text += f"  {dtype} {attr} [[{attr}]]"
            text += ",\n" if a < len(k.attributes) - 1 else ") {\n"
        text += k.source
        text += "\n}\n"
        if self.template:
            inst = self.kernel_name + self.template_def
            text += (
                f'\ntemplate [[host_name("{self.kernel_name}")]] [[kernel]] decltype({inst}) {inst};\n'
            )
        return text

    def entry_point(self) -> str:
        """C++ that calls the kernel for the current fiber's thread."""
        k = self.kernel
        args = []
        for b, (kind, i, space) in enumerate(self.buffers()):
            if kind == "input":
                x = self.inputs[i]
                t = type_string(x.dtype)
                if x.ndim == 0:
                    args.append(f"*(const constant {t}*)__b[{b}]")
                else:
                    args.append(f"(const {space} {t}*)__b[{b}]")
            elif kind == "shape":
                args.append(f"(const constant int*)__b[{b}]")
            elif kind == "strides":
                args.append(f"(const constant int64_t*)__b[{b}]")
            elif kind == "ndim":
                args.append(f"*(const constant int*)__b[{b}]")
            else:
                t = type_string(self.output_dtypes[i])
                if k.atomic_outputs:
                    t = f"atomic<{t}>"
                args.append(f"(device {t}*)__b[{b}]")
        for attr, dtype in k.attributes:
            if attr in _ATTRIBUTE_VALUES:
                args.append(_ATTRIBUTE_VALUES[attr])
            elif dtype == "uint3":
                args.append(f"__emu_u3(__a->{attr})")
            else:
                args.append(f"__a->{attr}")
        call = self.kernel_name + self.template_def
        return (
            "\n#line 1 \"<metal_emu entry point>\"\n"
            "static inline uint3 __emu_u3(const unsigned* v) { return uint3{v[0], v[1], v[2]}; }\n"
            'extern "C" void __emu_thread(void** __b) {\n'
            "  const EmuThreadAttrs* __a = __emu_attrs();\n"
            "  (void)__a;\n"
            f"  {call}(\n    " + ",\n    ".join(args) + ");\n"
            "}\n" + LAUNCH_ENTRY
        )


# The C entry point of every kernel library (calls the runtime with the
# library's __emu_thread).
LAUNCH_ENTRY = (
    'extern "C" int emu_launch(void** buffers, const unsigned long* bytes, const char* const* names, int count,\n'
    "                          const long* grid, const long* group, unsigned long long seed, long tg_limit,\n"
    "                          int os_threads, char* error, long error_len, const EmuLaunchOptions* options) {\n"
    "  return __emu_run_grid_ex(__emu_thread, buffers, bytes, names, count, grid, group, seed, tg_limit,\n"
    "                           os_threads, error, error_len, options);\n"
    "}\n"
)


def _template_hash(template_def: str) -> str:
    """MLX's make_template_hash: '<float, 3>' -> '_float_3' minus the last char."""
    out = []
    i = 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


# --------------------------------------------------------------------------
# MSL -> C++ rewrites. Each keeps the line count, so compiler messages and
# barrier sites point at lines of the generated Metal source.

_VECTOR_SCALARS = "float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool"
_VECTOR_CONSTRUCTOR = re.compile(rf"(?<![\w.:])({_VECTOR_SCALARS})([234])\s*\(")
_HOST_NAME = re.compile(r"\btemplate\s*\[\[\s*host_name\([^)]*\)\s*\]\]\s*(\[\[\s*kernel\s*\]\]\s*)?")
_HALF_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[hH](?!\w)")
# MSL has no double: an unsuffixed floating literal is a float there, a
# double in C++ (which would widen `h * 0.5` to double arithmetic).
_DOUBLE_LITERAL = re.compile(
    r"(?<![\w.])(\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![\w.])"
)
# `constant const int64_t strides[3]` as a parameter: an array parameter in
# an address space, which C++ rejects before adjusting it to a pointer.
_ARRAY_PARAMETER = re.compile(
    r"\b(?P<space>constant|device|threadgroup)\s+(?P<const>const\s+)?(?P<type>[A-Za-z_]\w*)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*\[[^\]\[;]*\]\s*(?=[,)]|\[\[)"
)
# `[[threadgroup(0)]]` (a threadgroup-memory binding): the word is a macro here.
_THREADGROUP_ATTRIBUTE = re.compile(r"\[\[\s*threadgroup\s*\(")
_CONSTEXPR_CONSTANT = re.compile(r"\bconstexpr\s+constant\b|\bconstant\s+constexpr\b")
_THREADGROUP_DECLARATION = re.compile(
    r"(?P<lead>(?:^|[;{}])\s*)threadgroup\s+"
    r"(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]\[]+\]\s*)*);",
    re.MULTILINE,
)


def to_cpp(source: str) -> str:
    """The MLX-generated Metal source, made valid C++ for the emulation."""
    text = _HOST_NAME.sub("template ", source)
    text = _CONSTEXPR_CONSTANT.sub("constexpr", text)
    text = _THREADGROUP_ATTRIBUTE.sub("[[threadgroup_binding(", text)
    text = _ARRAY_PARAMETER.sub(r"\g<space> \g<const>\g<type>* \g<name> ", text)
    text = _HALF_LITERAL.sub(r"half(\1)", text)
    text = _DOUBLE_LITERAL.sub(r"\1f", text)
    text = _VECTOR_CONSTRUCTOR.sub(r"::metal::__emu_make<\1, \2>(", text)
    counter = iter(range(1 << 30))

    def threadgroup_variable(m):
        key = next(counter)
        t, name, dims = m["type"], m["name"], re.sub(r"\s+", "", m["dims"] or "")
        if dims:
            return f"{m['lead']}threadgroup {t} (&{name}){dims} = *__emu_threadgroup_variable<{t}{dims}, {key}>();"
        return f"{m['lead']}threadgroup {t}& {name} = *__emu_threadgroup_variable<{t}, {key}>();"

    return _THREADGROUP_DECLARATION.sub(threadgroup_variable, text)


# --------------------------------------------------------------------------
# Compilation and caching


# Part of every cache key: bump when how libraries are built or linked changes.
_BUILD_VERSION = 2


def _find_clang() -> Optional[str]:
    for name in (os.environ.get("METAL_EMU_CXX"), "clang++-19", "clang++-20", "clang++-21"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _hash_files(*dirs) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for root, _, files in sorted(os.walk(d)):
            for f in sorted(files):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _toolchain():
    """(clang path, hash of the emulation's own sources)."""
    clang = _find_clang()
    return clang, f"{_BUILD_VERSION} " + _hash_files(_INCLUDE, _RUNTIME) + " ".join(_CXX_FLAGS)


def _run_clang(args, what: str):
    clang, _ = _toolchain()
    proc = subprocess.run([clang, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MetalCompileError(f"metal_emu: {what} failed to compile:\n{proc.stderr.strip()}")


def _atomic_output(path: str, build) -> str:
    """Builds `path` once (build(tmp) writes a temporary file that is renamed)."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.lru_cache(maxsize=None)
def _runtime_library() -> str:
    """The runtime as one shared library, loaded once (RTLD_GLOBAL) for all
    kernels, so that they share one pool of fiber stacks: a copy per kernel
    library would map thousands of stacks in a long test session and run
    into the kernel's limit on memory mappings."""
    _, tag = _toolchain()
    key = hashlib.sha256(tag.encode()).hexdigest()[:16]
    name = f"libmetal_emu_runtime-{key}.so"
    path = os.path.join(_BUILD, name)
    src = os.path.join(_RUNTIME, "runtime.cpp")
    _atomic_output(
        path,
        lambda tmp: _run_clang([*_CXX_FLAGS, "-O2", "-shared", f"-Wl,-soname,{name}", src, "-o", tmp, "-lpthread"],
                               "the runtime"),
    )
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


_LIBRARIES = {}

# Instrumented builds: clang's ThreadSanitizer instrumentation makes every
# load and store of the kernel call the runtime (runtime.cpp's __tsan_*
# functions, not TSan's), which counts memory traffic and, in interleave
# mode, switches SIMD-groups there. Only the instrumentation: no TSan runtime.
_INSTRUMENT_FLAGS = [
    "-DEMU_INSTRUMENTED",
    "-fsanitize=thread",
    "-mllvm", "-tsan-instrument-func-entry-exit=0",
    "-mllvm", "-tsan-instrument-atomics=0",
]


def interleave_mode() -> bool:
    """$METAL_EMU_INTERLEAVE=1: every launch runs instrumented, switching
    SIMD-groups at every threadgroup-memory access in a seeded random
    priority order (see runtime.cpp, run_threadgroup_interleaved)."""
    value = os.environ.get("METAL_EMU_INTERLEAVE", "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"METAL_EMU_INTERLEAVE must be 0 or 1, got {value!r}")
    return value == "1"


def _library(cpp: str, instrumented: bool = False):
    """ctypes handle of the shared library built from `cpp` (cached on disk)."""
    _, tag = _toolchain()
    if instrumented:
        tag += " instrumented " + " ".join(_INSTRUMENT_FLAGS)
    key = hashlib.sha256((tag + "\0" + cpp).encode()).hexdigest()[:24]
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    runtime = _runtime_library()
    path = os.path.join(_BUILD, f"kernel-{key}.so")

    def build(tmp):
        src = tmp + ".cpp"
        with open(src, "w") as f:
            f.write(cpp)
        try:
            extra = _INSTRUMENT_FLAGS if instrumented else []
            _run_clang([*_CXX_FLAGS, *extra, "-shared", "-I", _INCLUDE, src, runtime, "-Wl,-rpath,$ORIGIN", "-o",
                        tmp], "the kernel")
        finally:
            os.unlink(src)

    _atomic_output(path, build)
    lib = ctypes.CDLL(path)
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_long),
        ctypes.POINTER(ctypes.c_long),
        ctypes.c_ulonglong,
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_long,
        ctypes.c_void_p,
    ]
    _LIBRARIES[key] = lib
    return lib


def translation_unit(metal_source: str, entry_point: str = "") -> str:
    """The C++ file compiled for a generated Metal source."""
    return (
        '#include "mlx_preamble.h"\n'
        '#line 1 "<metal source>"\n' + to_cpp(metal_source) + entry_point
    )


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when kernels can be emulated here, else why not (for pytest.skip)."""
    if _find_clang() is None:
        return "metal emulation needs clang++-19 (apt install clang-19), not found on PATH"
    try:
        k = metal_kernel(
            "metal_emu_probe",
            ["a"],
            ["out"],
            "uint i = thread_position_in_grid.x; out[i] = a[i] + half(1) + simd_sum(1.0f);",
        )
        (out,) = k(
            inputs=[mx.zeros((32,), dtype=mx.float16)],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )
        if not bool(mx.all(out == 33.0).item()):
            return "metal emulation self-test gave a wrong result"
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
        return f"metal emulation self-test failed: {e}"
    return None


# --------------------------------------------------------------------------
# The public kernel object


def os_threads() -> int:
    """OS threads a launch spreads its threadgroups over: $METAL_EMU_THREADS,
    default 1. Results do not depend on it, except for kernels whose
    threadgroups interact (atomics, races), which are then not reproducible."""
    value = os.environ.get("METAL_EMU_THREADS", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"METAL_EMU_THREADS must be a positive integer, got {value!r}") from None


def race_check_runs() -> int:
    """How many schedules each launch runs ($METAL_EMU_RACE_CHECK, default 1).
    With 2 or more, a kernel (without atomic outputs) whose outputs differ
    between schedules raises MetalEmulationError."""
    value = os.environ.get("METAL_EMU_RACE_CHECK", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"METAL_EMU_RACE_CHECK must be a positive integer, got {value!r}") from None


def _quote_lines(message: str, source: str) -> str:
    """`message` followed by the source lines it names ("line 12")."""
    lines = source.splitlines()
    quoted = []
    for n in dict.fromkeys(int(m) for m in re.findall(r"\bline (\d+)", message)):
        if 1 <= n <= len(lines):
            quoted.append(f"  {n:4d} | {lines[n - 1]}")
    return message + ("\n" + "\n".join(quoted) if quoted else "")


def _needs(source: str, name: str) -> bool:
    return source.find(name) != -1


class Kernel:
    """Mirror of the object `mx.fast.metal_kernel` returns."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if compile_options is not None and not isinstance(compile_options, dict):
            raise TypeError("[metal_kernel] Expected `compile_options` to be a dict.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.compile_options = dict(compile_options or {})
        self.shape_infos = [
            (_needs(source, n + "_shape"), _needs(source, n + "_strides"), _needs(source, n + "_ndim"))
            for n in self.input_names
        ]
        self.attributes = [(a, t) for a, t in _METAL_ATTRIBUTES if _needs(source, a)]

    def generated_source(self, *, inputs, output_dtypes, template=None) -> str:
        """The Metal source MLX would generate for this call."""
        return _Signature(self, [_as_array(x) for x in inputs], template, output_dtypes).source()

    def __call__(self, *, inputs, template=None, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None, verbose=False, stream=None, seed=None) -> list:
        inputs = [_as_array(x) for x in inputs]
        for what, got, want in (
            ("inputs", len(inputs), len(self.input_names)),
            ("output_shapes", len(output_shapes), len(self.output_names)),
            ("output_dtypes", len(output_dtypes), len(self.output_names)),
        ):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}.")
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3:
            raise ValueError(f"[metal_kernel] grid and threadgroup must have 3 entries, got {grid} and {threadgroup}")
        tg_threads = 1
        for g, t in zip(grid, threadgroup):
            tg_threads *= min(g, t)
        if tg_threads > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"[metal_kernel] Thread group size ({tg_threads}) is greater than  the maximum allowed threads "
                f"per threadgroup ({MAX_THREADS_PER_THREADGROUP})."
            )
        signature = _Signature(self, inputs, template, output_dtypes)
        source = signature.source()
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{source}\n```")
        lib = _library(translation_unit(source, signature.entry_point()), instrumented())

        keep = []  # host buffers, alive until the launch returns
        names = []
        for kind, i, _ in signature.buffers():
            if kind == "input":
                buf = _to_bytes(inputs[i])
            elif kind == "shape":
                buf = np.array(inputs[i].shape, dtype=np.int32)
            elif kind == "strides":
                # Inputs reach the kernel row-contiguous (see the docs).
                shape = inputs[i].shape
                strides = [1] * len(shape)
                for d in range(len(shape) - 2, -1, -1):
                    strides[d] = strides[d + 1] * shape[d + 1]
                buf = np.array(strides, dtype=np.int64)
            elif kind == "ndim":
                buf = np.array([inputs[i].ndim], dtype=np.int32)
            else:
                buf = self._output_buffer(output_shapes[i], output_dtypes[i], init_value)
            keep.append(buf)
            if kind == "output":
                names.append(self.output_names[i])
            else:
                names.append(self.input_names[i] + ("" if kind == "input" else "_" + kind))
        if seed is None:
            seed = int(os.environ.get("METAL_EMU_SEED", "0"))
        n_in = len(keep) - len(self.output_names)
        initial = [b.copy() for b in keep[n_in:]]
        launch(lib, keep, names, grid, threadgroup, seed, self.name, source,
               {n: _template_value(v) for n, v in (template or [])})
        outputs = keep[n_in:]
        # Optional schedule check: run again under other seeds, the outputs
        # must not change (a change means a race: a missing barrier, ...).
        if not self.atomic_outputs and not _COUNTING:  # counting: one launch, one record
            for extra in range(1, race_check_runs()):
                first = [b.copy() for b in outputs]
                for buf, init in zip(outputs, initial):
                    buf[...] = init
                launch(lib, keep, names, grid, threadgroup, seed + extra, self.name, source)
                for j, (a, b) in enumerate(zip(first, outputs)):
                    if a.tobytes() != b.tobytes():
                        differ = int(np.count_nonzero(a.view(np.uint8) != b.view(np.uint8)))
                        raise MetalEmulationError(
                            f"metal_emu: kernel `{self.name}`: output `{self.output_names[j]}` changes with the "
                            f"thread schedule (seeds {seed} and {seed + extra}, {differ} bytes differ): a race, "
                            "e.g. a missing threadgroup_barrier"
                        )
        return [
            _from_bytes(outputs[j], tuple(output_shapes[j]), output_dtypes[j]) for j in range(len(self.output_names))
        ]

    @staticmethod
    def _output_buffer(shape, dtype, init_value) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if init_value is not None:
            return _to_bytes(mx.full(shape, init_value, dtype=dtype)).reshape(-1).copy()
        count = int(np.prod(shape, dtype=np.int64))
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        raw = np.empty(count * itemsize, dtype=np.uint8)
        # Unwritten outputs must show: NaN for floats, 0xAB bytes for integers.
        raw.fill(0xFF if dtype in _FLOATING else 0xAB)
        return raw.view(_NUMPY_DTYPES[dtype])


# --------------------------------------------------------------------------
# Counting

# Indices of EmuLaunchOptions.counts (runtime/emu_abi.h).
_COUNT_NAMES = ("threadgroups", "barriers", "simdgroup_mma", "threadgroup_read_bytes", "threadgroup_write_bytes",
                "exp", "exp2", "log", "log2", "tanh", "other_math")


class _LaunchOptions(ctypes.Structure):
    _fields_ = [("interleave", ctypes.c_int), ("only_threadgroups", ctypes.POINTER(ctypes.c_long)),
                ("only_count", ctypes.c_long), ("counts", ctypes.POINTER(ctypes.c_ulonglong))]


class _Counting:
    def __init__(self, only_threadgroups):
        self.only_threadgroups = only_threadgroups
        self.launches = []


_COUNTING: list = []  # active counting() blocks, innermost last


@contextlib.contextmanager
def counting(only_threadgroups=None):
    """Counts the work of every launch inside the block (kernels are built
    instrumented there). Yields a list that gets one dict per launch:
    kernel, grid, threadgroup, the counters of _COUNT_NAMES (summed over the
    threadgroups run) and `buffers`: {buffer name: (bytes read, bytes written)}.

    `only_threadgroups(kernel_name, threadgroups_per_grid) -> list of (x, y, z)
    or None` runs only the listed threadgroups of a launch (outputs of the
    others stay poisoned): for counting a large grid by a few threadgroups."""
    state = _Counting(only_threadgroups)
    _COUNTING.append(state)
    try:
        yield state.launches
    finally:
        _COUNTING.remove(state)


def instrumented() -> bool:
    """Whether launches now need the instrumented build."""
    return bool(_COUNTING) or interleave_mode()


def launch(lib, buffers, names, grid, threadgroup, seed, kernel_name, source, template=None):
    """Runs `lib`'s kernel over the host `buffers` (numpy arrays, copied in
    and back); raises MetalEmulationError naming `kernel_name` (and quoting
    the `source` lines the runtime's message names) on any error. Inside a
    counting() block, records the launch's counts there."""
    if seed is None:
        seed = int(os.environ.get("METAL_EMU_SEED", "0"))
    options = _LaunchOptions()
    options.interleave = 1 if interleave_mode() else 0
    counts = None
    keep_alive = []
    tg_counts = tuple(-(-g // min(t, g)) for g, t in zip(grid, threadgroup))
    if _COUNTING:
        counts = (ctypes.c_ulonglong * (len(_COUNT_NAMES) + 2 * len(buffers)))()
        options.counts = counts
        pick = _COUNTING[-1].only_threadgroups
        chosen = pick(kernel_name, tg_counts) if pick else None
        if chosen is not None:
            ids = [x + tg_counts[0] * (y + tg_counts[1] * z) for x, y, z in chosen]
            only = (ctypes.c_long * max(1, len(ids)))(*ids)
            keep_alive.append(only)
            options.only_threadgroups = only
            options.only_count = len(ids)
    count = len(buffers)
    array = (ctypes.c_void_p * max(1, count))(*[b.ctypes.data for b in buffers])
    sizes = (ctypes.c_ulong * max(1, count))(*[b.nbytes for b in buffers])
    c_names = (ctypes.c_char_p * max(1, count))(*[n.encode() for n in names])
    error = ctypes.create_string_buffer(4096)
    status = lib.emu_launch(array, sizes, c_names, count, (ctypes.c_long * 3)(*grid),
                            (ctypes.c_long * 3)(*threadgroup), seed, THREADGROUP_MEMORY_LIMIT, os_threads(), error,
                            len(error), ctypes.addressof(options))
    if status != 0:
        raise MetalEmulationError(f"metal_emu: kernel `{kernel_name}`: " + _quote_lines(error.value.decode(), source))
    if counts is not None:
        record = {"kernel": kernel_name, "template": template, "threadgroups_per_grid": tg_counts,
                  "threadgroup": tuple(threadgroup)}
        record.update({n: int(counts[i]) for i, n in enumerate(_COUNT_NAMES)})
        base = len(_COUNT_NAMES)
        record["buffers"] = {n: (int(counts[base + 2 * i]), int(counts[base + 2 * i + 1])) for i, n in enumerate(names)}
        _COUNTING[-1].launches.append(record)


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False, compile_options=None) -> Kernel:
    """Mirror of `mx.fast.metal_kernel` that runs on the CPU emulation."""
    return Kernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs,
                  compile_options)


@contextlib.contextmanager
def patched_mx_fast():
    """Within the block, `mx.fast.metal_kernel` is this harness's
    `metal_kernel`: for code that calls MLX's factory directly rather than
    taking a factory argument. Kernels created inside keep emulating."""
    original = mx.fast.metal_kernel
    mx.fast.metal_kernel = metal_kernel
    try:
        yield
    finally:
        mx.fast.metal_kernel = original
