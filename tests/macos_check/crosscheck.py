"""Does the Mac build of mlx_flash._ext link against MLX's libmlx.dylib?

Compiles every C++ source of `_ext` as CMakeLists.txt compiles it on an
Apple-silicon Mac with MLX's Metal backend (`MLXF_METAL`, MLX's interface
flags, C++20, `--target=arm64-apple-macos14.0`, so that names mangle as on
the Mac: `int64_t` is `long long`, libc++'s `std::__1`), against the official
macOS MLX wheel's headers (tests/macos_mlx.py). Then every symbol the objects
leave undefined that only libmlx can provide (MLX's own, and metal-cpp's
`MTL::`/`NS::`/`CA::` selectors and classes, which libmlx defines) is looked
up, by its mangled name, among the exports of the wheel's `libmlx.dylib`.
MLX builds libmlx with hidden visibility, so anything declared without
`MLX_API` (e.g. `mlx::core::copy_gpu`) is missing there and would fail the
Mac link with "Undefined symbols for architecture arm64".

Tools: clang-19 with libc++-19's headers, llvm-nm-19 and llvm-cxxfilt-19;
Darwin's C headers from the Zig wheel (darwin_headers.py); Apple framework
types metal-cpp names come from macos_check/stubs; nanobind's headers at the
version the build pins; Python's are this interpreter's (only CPython's
declarations are needed, and CPython symbols are not checked). Nothing is
linked or run. Flags follow CMakeLists.txt by hand (ext_flags, kernel_flags):
keep them in step when it changes.

    python tests/macos_check/crosscheck.py                  # the _ext sources
    python tests/macos_check/crosscheck.py --source X.cpp   # any other file
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parents[1]
STUBS = _HERE / "stubs"
TARGET = "arm64-apple-macos14.0"  # CMAKE_OSX_DEPLOYMENT_TARGET in CMakeLists.txt
LLVM = "19"

# Entities in these namespaces can only come from libmlx: MLX's own, and
# metal-cpp's private selector/class tables (libmlx is the one binary built
# with MTL_PRIVATE_IMPLEMENTATION). Matched on the mangled name (Mach-O adds a
# leading "_"): a nested name (N, with cv/ref qualifiers), possibly behind a
# vtable/typeinfo/guard-variable prefix, whose first component is one of them.
_LIBMLX_SYMBOL = re.compile(r"^__Z(?:T[VIS]|GV|TH|TW)?N[rVKRO]*(?:3mlx|3MTL|4MTL4|5MTLFX|2NS|2CA)(?=\d|I|C|D)")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a compile needs; `None` fields never occur (see setup())."""

    clang: str
    nm: str
    cxxfilt: str
    libcxx_include: Path
    clang_include: Path
    darwin_include: Path
    mlx_include: Path
    libmlx: Path
    nanobind_include: Path
    python_include: Path


def _libcxx_include(clang: str) -> Path | None:
    # libc++-19-dev installs its headers under the LLVM prefix, next to the
    # clang resource dir's grandparent: /usr/lib/llvm-19/include/c++/v1.
    out = subprocess.run([clang, "-print-resource-dir"], capture_output=True, text=True, check=True).stdout
    resource = Path(out.strip())
    for cand in (resource.parents[2] / "include" / "c++" / "v1", Path(f"/usr/lib/llvm-{LLVM}/include/c++/v1")):
        if (cand / "__config").exists():
            return cand
    return None


def _nanobind_include() -> tuple[Path | None, str]:
    """nanobind's headers at the version pyproject.toml's build pins (the installed
    package if it is that version, else unpacked from its wheel)."""
    from macos_check import wheel_cache

    m = re.search(r'"nanobind==([\w.]+)"', (REPO / "pyproject.toml").read_text())
    if not m:
        return None, "pyproject.toml pins no nanobind version for the build"
    try:
        import nanobind

        if nanobind.__version__ == m.group(1):
            return Path(nanobind.include_dir()), ""
    except ImportError:
        pass
    root, why = wheel_cache.unpacked(f"nanobind=={m.group(1)}", "nanobind/include/", f"nanobind-{m.group(1)}-include")
    return root, why


def setup() -> tuple[Setup | None, str]:
    """(Setup, "") or (None, the precise reason this machine cannot run the check)."""
    tools = {name: shutil.which(f"{name}-{LLVM}") for name in ("clang", "llvm-nm", "llvm-cxxfilt")}
    missing = [f"{n}-{LLVM}" for n, p in tools.items() if not p]
    if missing:
        return None, f"{', '.join(missing)} not found (Debian: apt-get install clang-{LLVM} llvm-{LLVM})"
    clang = tools["clang"]
    libcxx = _libcxx_include(clang)
    if libcxx is None:
        return None, f"libc++ headers for clang-{LLVM} not found (Debian: apt-get install libc++-{LLVM}-dev)"
    resource = subprocess.run([clang, "-print-resource-dir"], capture_output=True, text=True).stdout.strip()

    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import macos_mlx

    from macos_check import darwin_headers

    root, why = macos_mlx.macos_mlx_root()
    if root is None:
        return None, why
    darwin, why = darwin_headers.darwin_include_dir()
    if darwin is None:
        return None, why
    nanobind_include, why = _nanobind_include()
    if nanobind_include is None:
        return None, why
    return Setup(
        clang=clang, nm=tools["llvm-nm"], cxxfilt=tools["llvm-cxxfilt"], libcxx_include=libcxx,
        clang_include=Path(resource) / "include", darwin_include=darwin,
        mlx_include=macos_mlx.include_dir(root), libmlx=macos_mlx.libmlx_dylib(root),
        nanobind_include=nanobind_include, python_include=Path(sysconfig.get_paths()["include"]),
    ), ""


# ---------------------------------------------------------------------------
# What CMakeLists.txt compiles on Apple silicon with MLX's Metal backend


@dataclasses.dataclass(frozen=True)
class Unit:
    source: Path
    flags: tuple[str, ...]  # beyond the common ones: defines, includes, standard

    @property
    def label(self) -> str:
        defs = [f for f in self.flags if f.startswith("-DMLXF_METALLIB")]
        return self.source.name + (f" ({defs[0][2:]})" if defs else "")


def _cmake_sources(cmake_text: str) -> tuple[list[str], list[str]]:
    """(CPU kernel sources, other _ext sources) named in CMakeLists.txt."""
    named = list(dict.fromkeys(re.findall(r"\bcsrc/\w+\.cpp\b", cmake_text)))
    m = re.search(r"set\(\s*MLXF_KERNEL_SOURCES\s+([^)]*)\)", cmake_text)
    kernels = re.findall(r"\bcsrc/\w+\.cpp\b", m.group(1)) if m else []
    return kernels, [s for s in named if s not in kernels]


def ext_flags(s: Setup) -> list[str]:
    """Flags of the _ext target's own sources: nanobind_add_module + MLX's interface
    (MLXConfig.cmake of the macOS wheel: -DACCELERATE_NEW_LAPACK -D_METAL_, the
    metal_cpp and metal_3_1 include dirs, cxx_std_20) + CMakeLists.txt's Apple block."""
    mlx = s.mlx_include
    return [
        "-DNB_DOMAIN=mlx", "-D_ext_EXPORTS", "-DMLXF_METAL=1",
        f"-I{REPO / 'csrc'}", f"-I{s.python_include}", f"-I{s.nanobind_include}",
        "-isystem", str(mlx / "metal_cpp"), "-isystem", str(mlx),
        "-isystem", str(mlx / "mlx" / "backend" / "metal" / "kernels" / "metal_3_1"),
        "-std=gnu++20", "-fvisibility=hidden", "-fno-stack-protector",
        "-DACCELERATE_NEW_LAPACK", "-D_METAL_",
    ]


def kernel_flags() -> list[str]:
    """The mlxf_kernels_generic OBJECT library (the only ISA variant on arm64)."""
    return ["-DMLXF_ISA=generic", f"-I{REPO / 'csrc'}", "-fno-math-errno", "-Wno-psabi", "-std=gnu++17"]


def ext_units(s: Setup) -> list[Unit]:
    """Every C++ source of _ext as the Mac build compiles it. A source that reads
    MLXF_METALLIB (set by CMake only when it built the metallib) is compiled both
    ways: without the metallib the compiler drops code after the error it raises."""
    kernels, others = _cmake_sources((REPO / "CMakeLists.txt").read_text())
    units = [Unit(REPO / k, tuple(kernel_flags())) for k in kernels]
    for src in others:
        path = REPO / src
        flags = ext_flags(s)
        if "MLXF_METALLIB" in path.read_text():
            flags.append("-DMLXF_METALLIB=1")
        units.append(Unit(path, tuple(flags)))
    return units


# ---------------------------------------------------------------------------
# Compile, list symbols, resolve


def common_flags(s: Setup) -> list[str]:
    # -nostdinc: no Linux header may leak in. Order as on a Mac: libc++, then
    # clang's own headers, then the C library (Darwin's), then framework stand-ins.
    return [
        f"--target={TARGET}", "-nostdinc", "-fPIC", "-O3", "-DNDEBUG",
        "-isystem", str(s.libcxx_include), "-isystem", str(s.clang_include),
        "-isystem", str(s.darwin_include), "-isystem", str(STUBS),
        "-Wno-unused-command-line-argument",
    ]


class CompileError(RuntimeError):
    pass


def compile_unit(s: Setup, unit: Unit, out_dir: Path) -> Path:
    cmd = [s.clang, *common_flags(s), *unit.flags, "-c", str(unit.source)]
    key = hashlib.sha256("\0".join(cmd).encode()).hexdigest()[:16]
    obj = out_dir / f"{unit.source.stem}-{key}.o"
    proc = subprocess.run(cmd + ["-o", str(obj)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{unit.label} does not compile for {TARGET}:\n{proc.stderr[-6000:]}")
    return obj


def compile_units(s: Setup, units: list[Unit], out_dir: Path) -> dict[Unit, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {u: pool.submit(compile_unit, s, u, out_dir) for u in units}
        return {u: f.result() for u, f in futures.items()}


def _nm(s: Setup, *args: str) -> set[str]:
    out = subprocess.run([s.nm, "-j", *args], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip() and not line.endswith(":")}


def demangle(s: Setup, names: list[str]) -> dict[str, str]:
    # Mach-O prefixes C names with "_" (so C++ names start with "__Z"): -_ strips it.
    out = subprocess.run([s.cxxfilt, "-_"], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def libmlx_exports(s: Setup) -> set[str]:
    return _nm(s, "-g", "--defined-only", str(s.libmlx))


@dataclasses.dataclass
class Unresolved:
    mangled: str
    demangled: str
    needed_by: list[str]


def unresolved_symbols(s: Setup, objects: dict[Unit, Path], exports: set[str]) -> tuple[list[Unresolved], list[str]]:
    """(symbols only libmlx could provide that it does not export, every such symbol checked)."""
    needed: dict[str, list[str]] = {}
    defined: set[str] = set()
    for unit, obj in objects.items():
        for name in _nm(s, "-u", str(obj)):
            needed.setdefault(name, []).append(unit.label)
        defined |= _nm(s, "-g", "--defined-only", str(obj))
    # As the linker does: what one object defines (e.g. an inline MLX function
    # emitted weak) satisfies the others.
    ours = sorted(n for n in needed if n not in defined and _LIBMLX_SYMBOL.match(n))
    missing = [n for n in ours if n not in exports]
    readable = demangle(s, missing) if missing else {}
    return [Unresolved(n, readable[n], needed[n]) for n in missing], ours


def report(missing: list[Unresolved]) -> str:
    lines = [f"{len(missing)} symbol(s) the objects need are not exported by the macOS libmlx.dylib "
             "(the Mac link of _ext fails on them):"]
    for m in missing:
        lines.append(f"  {m.demangled}\n      {m.mangled}  (needed by {', '.join(sorted(set(m.needed_by)))})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", type=Path,
                    help="check this file (compiled with _ext's flags) instead of the _ext sources")
    ap.add_argument("--define", action="append", default=[], help="extra -D for --source files")
    args = ap.parse_args(argv)
    s, why = setup()
    if s is None:
        print("cannot run the macOS cross-check:", why)
        return 2
    if args.source:
        units = [Unit(p.resolve(), tuple(ext_flags(s) + [f"-D{d}" for d in args.define])) for p in args.source]
    else:
        units = ext_units(s)
    with tempfile.TemporaryDirectory(prefix="macos_crosscheck.") as tmp:
        try:
            objects = compile_units(s, units, Path(tmp))
        except CompileError as exc:
            print(exc)
            return 1
        missing, checked = unresolved_symbols(s, objects, libmlx_exports(s))
    print(f"compiled {len(units)} unit(s) for {TARGET}: {', '.join(u.label for u in units)}")
    if missing:
        print(report(missing))
        return 1
    print(f"all {len(checked)} symbols that only libmlx can provide are exported by {s.libmlx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
