"""Run `[[kernel]]` functions of a Metal library source (not a
`mx.fast.metal_kernel` body) on the CPU emulation: MLX's own kernels such
as steel attention and sdpa_vector, instantiated as MLX's host code does.

    from metal_emu import library
    fn = library.kernel_function(
        source,                        # text with #include "mlx/..." lines
        "attention",                   # the [[kernel]] template's name
        template_args=["half", 32, 32, 64, 64, 4, 1, "half", "float"],
        function_constants={"align_Q": True, "has_mask": False, ...},
        include_dirs=[mlx_include_root])
    fn(buffers={0: q, 1: k, 2: v, 3: out, 4: params_bytes},
       threadgroups=(nq, h, b), threadgroup=(32, 4, 1))   # dispatchThreadgroups
    # buffers are numpy arrays, written back in place (outputs included)

How it differs from the custom-kernel path (harness.Kernel):
- `#include "..."` lines are expanded here (not by clang), so that the MSL
  rewrites of `harness.to_cpp` reach every included header; `<metal_*>`
  includes go to the emulated standard library. A few MLX headers that only
  wrap Apple's compiler intrinsics are replaced by the files under
  `mlx_overrides/` (the emulated stdlib already provides what they define).
- `constant T name [[function_constant(i)]];` becomes `constexpr T name =
  value;` with the value given by name or index, as the host sets it with
  MTLFunctionConstantValues.
- The kernel's parameters are bound from their attributes: `[[buffer(i)]]`
  gets buffer i (a buffer whose function constant is off and that is not
  given gets an empty guarded buffer: touching it is an out-of-bounds error),
  thread attributes (`[[thread_index_in_simdgroup]]`, ...) get the fiber's
  values converted to the parameter's type.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from . import harness

_HERE = os.path.dirname(os.path.abspath(__file__))
_OVERRIDES = os.path.join(_HERE, "mlx_overrides")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[^\n]*$", re.MULTILINE)
_FUNCTION_CONSTANT = re.compile(
    r"\bconstant\s+(?P<type>\w+)\s+(?P<name>\w+)\s*\[\[\s*function_constant\(\s*(?P<index>\d+)\s*\)\s*\]\]\s*;"
)


def expand_includes(source: str, include_dirs: Sequence[str], origin: str = "<source>",
                    _seen: Optional[set] = None) -> str:
    """`source` with every `#include "path"` replaced by the file's text
    (found in mlx_overrides/ first, then in include_dirs), each file once
    (`#pragma once` is assumed, as every MLX header has it), with #line
    markers so compiler messages name the real file and line."""
    seen = set() if _seen is None else _seen

    def resolve(rel):
        for d in (_OVERRIDES, *include_dirs):
            path = os.path.join(d, rel)
            if os.path.isfile(path):
                return os.path.realpath(path)
        raise FileNotFoundError(f"metal_emu: #include \"{rel}\" (from {origin}) not found in {list(include_dirs)}")

    out = []
    pos = 0
    line = 1
    for m in _INCLUDE.finditer(source):
        out.append(source[pos:m.start()])
        line += source.count("\n", pos, m.start())
        path = resolve(m.group(1))
        if path not in seen:
            seen.add(path)
            with open(path) as f:
                text = _PRAGMA_ONCE.sub("", f.read())
            out.append(f'#line 1 "{m.group(1)}"\n')
            out.append(expand_includes(text, include_dirs, m.group(1), seen))
            out.append(f'\n#line {line + 1} "{origin}"')
        pos = m.end()
    out.append(source[pos:])
    return "".join(out)


def bind_function_constants(source: str, values: Mapping) -> str:
    """Each `constant T name [[function_constant(i)]];` made a constexpr with
    the value given under its name (or its index). All must be given."""
    missing = []

    def replace(m):
        name, index = m["name"], int(m["index"])
        if name in values:
            value = values[name]
        elif index in values:
            value = values[index]
        else:
            missing.append(f"{name} ({index})")
            return m.group(0)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            raise TypeError(f"metal_emu: function constant {name} must be bool, int or float, got {value!r}")
        return f"constexpr {m['type']} {name} = {text};"

    out = _FUNCTION_CONSTANT.sub(replace, source)
    if missing:
        raise ValueError(f"metal_emu: function constants without a value: {', '.join(missing)}")
    return out


def _split_top_level(text: str) -> list:
    """Split a parameter list at commas outside (), [], <>."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([<":
            depth += 1
        elif c in ")]>":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return parts


_BUFFER = re.compile(r"\bbuffer\(\s*(\d+)\s*\)")
_ATTRIBUTE = re.compile(r"\[\[\s*(\w+)\s*\]\]")


def kernel_parameters(source: str, name: str) -> list:
    """[("buffer", index) | ("attribute", attribute name)] per parameter of
    the `[[kernel]]` function `name` in `source`."""
    m = re.search(rf"\[\[\s*kernel[^\]]*\]\]\s*void\s+{re.escape(name)}\s*\(", source)
    if not m:
        raise ValueError(f"metal_emu: no [[kernel]] function named {name!r} in the source")
    depth, i = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        i += 1
    params = []
    for p in _split_top_level(source[m.end():i - 1]):
        p = re.sub(r"//[^\n]*", "", p)
        b = _BUFFER.search(p)
        if b:
            params.append(("buffer", int(b.group(1))))
            continue
        a = _ATTRIBUTE.search(p)
        if not a or a.group(1) not in _THREAD_ATTRIBUTES:
            raise ValueError(f"metal_emu: kernel {name}: parameter {p.strip()!r} has no buffer or known thread attribute")
        params.append(("attribute", a.group(1)))
    return params


# Thread attributes and how the entry point reads them from EmuThreadAttrs.
_THREAD_ATTRIBUTES = {
    "thread_position_in_grid": "__a->thread_position_in_grid",
    "thread_position_in_threadgroup": "__a->thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "__a->threadgroup_position_in_grid",
    "threads_per_threadgroup": "__a->threads_per_threadgroup",
    "dispatch_threads_per_threadgroup": "__a->dispatch_threads_per_threadgroup",
    "threadgroups_per_grid": "__a->threadgroups_per_grid",
    "threads_per_grid": "__a->threads_per_grid",
    "thread_index_in_threadgroup": "&__a->thread_index_in_threadgroup",
    "thread_index_in_simdgroup": "&__a->thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup": "&__a->simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "&__a->simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "&__a->dispatch_simdgroups_per_threadgroup",
    "thread_index_in_quadgroup": "&__a->thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup": "&__a->quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup": "&__a->quadgroups_per_threadgroup",
    "thread_execution_width": "&__emu_simd_width",
    "threads_per_simdgroup": "&__emu_simd_width",
}


def _entry_point(name: str, template_args: Sequence, params: list) -> str:
    targs = ", ".join(_template_text(a) for a in template_args)
    fn = f"{name}<{targs}>" if template_args else name
    args = []
    for i, (kind, what) in enumerate(params):
        if kind == "buffer":
            args.append(f"__emu_buffer_arg<__emu_param_t<__F, {i}>>(__b[{what}])")
        else:
            args.append(f"__emu_attribute_arg<__emu_param_t<__F, {i}>>({_THREAD_ATTRIBUTES[what]})")
    return (
        '\n#line 1 "<metal_emu library entry point>"\n'
        "static const unsigned __emu_simd_width = 32;\n"
        "template <class F, int I> struct __emu_param;\n"
        "template <class R, class... A, int I> struct __emu_param<R (*)(A...), I> {\n"
        "  using type = __type_pack_element<I, A...>;\n"
        "};\n"
        "template <class F, int I> using __emu_param_t = typename __emu_param<F, I>::type;\n"
        "template <class P> inline P __emu_buffer_arg(void* p) {\n"
        "  if constexpr (__is_reference(P)) return *(metal::remove_reference_t<P>*)p;\n"
        "  else return (P)p;\n"
        "}\n"
        "template <class P> inline P __emu_attribute_arg(const unsigned* v) {\n"
        "  using S = metal::scalar_of<P>;\n"
        "  if constexpr (metal::is_vector_v<P>) {\n"
        "    P out;\n"
        "    for (int i = 0; i < metal::vec_traits<P>::size; ++i) out[i] = S(v[i]);\n"
        "    return out;\n"
        "  } else {\n"
        "    return P(v[0]);\n"
        "  }\n"
        "}\n"
        'extern "C" void __emu_thread(void** __b) {\n'
        "  const EmuThreadAttrs* __a = __emu_attrs();\n"
        "  (void)__a;\n"
        f"  using __F = decltype(&{fn});\n"
        f"  {fn}(\n    " + ",\n    ".join(args) + ");\n"
        "}\n" + harness.LAUNCH_ENTRY
    )


def _template_text(value) -> str:
    if isinstance(value, str):
        return value
    return harness._template_value(value)


class KernelFunction:
    """One instantiated `[[kernel]]` function, compiled for the emulation."""

    def __init__(self, source: str, name: str, template_args: Sequence = (), function_constants: Mapping = None,
                 include_dirs: Sequence[str] = ()):
        self.name = name
        self.template_args = list(template_args)
        text = expand_includes(source, [str(d) for d in include_dirs])
        text = bind_function_constants(text, dict(function_constants or {}))
        self.params = kernel_parameters(text, name)
        self.buffer_slots = sorted({w for k, w in self.params if k == "buffer"})
        self.source = text
        cpp = (
            "#define __METAL__ 1\n"
            "#define __METAL_VERSION__ 310\n"
            "#define __HAVE_BFLOAT__ 1\n"
            "#include <metal_stdlib>\n"
            '#line 1 "<metal source>"\n'
            + harness.to_cpp(text)
            + _entry_point(name, template_args, self.params)
        )
        self.cpp = cpp

    def __call__(self, *, buffers: Mapping[int, np.ndarray], threadgroups, threadgroup, seed: Optional[int] = None):
        """Runs the grid of `threadgroups` x `threadgroup` threads over the
        numpy `buffers` (by buffer index); every buffer is copied back, so
        output buffers hold the results afterwards."""
        threadgroups = tuple(int(t) for t in threadgroups)
        threadgroup = tuple(int(t) for t in threadgroup)
        grid = tuple(g * t for g, t in zip(threadgroups, threadgroup))
        unknown = set(buffers) - set(self.buffer_slots)
        if unknown:
            raise ValueError(f"metal_emu: kernel {self.name} has no buffer(s) {sorted(unknown)}")
        count = max(self.buffer_slots) + 1 if self.buffer_slots else 0
        empty = np.zeros(0, dtype=np.uint8)
        keep = []
        for i in range(count):
            buf = buffers.get(i, empty)
            if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous):
                raise TypeError(f"metal_emu: buffer {i} must be a C-contiguous numpy array")
            keep.append(buf)
        names = [f"buffer({i})" for i in range(count)]
        lib = harness._library(self.cpp, harness.instrumented())
        return harness.launch(lib, keep, names, grid, threadgroup, seed, self.name, self.source,
                              [_template_text(a) for a in self.template_args])


def kernel_function(source: str, name: str, *, template_args: Sequence = (), function_constants: Mapping = None,
                    include_dirs: Sequence[str] = ()) -> KernelFunction:
    return KernelFunction(source, name, template_args, function_constants, include_dirs)
