"""The macOS build of mlx_flash._ext compiles and links: checked on Linux.

tests/macos_check/crosscheck.py compiles every C++ source of `_ext` as
CMakeLists.txt does on an Apple-silicon Mac (MLX's Metal backend on, the
metallib built) for arm64-apple-macos14.0, against the official macOS MLX
wheel's headers, and resolves every symbol that only libmlx can provide
against that wheel's libmlx.dylib exports. A call to something MLX does not
export (as `mlx::core::copy_gpu` once was) would fail the Mac link with
"Undefined symbols for architecture arm64"; here it fails a test first.
Skips, with the reason, only where the tools (clang-19, llvm-19, libc++-19
headers) or the wheels cannot be had.
"""

from __future__ import annotations


import pytest

from macos_check import crosscheck


@pytest.fixture(scope="module")
def setup():
    s, why = crosscheck.setup()
    if s is None:
        pytest.skip(why)
    return s


@pytest.fixture(scope="module")
def exports(setup):
    names = crosscheck.libmlx_exports(setup)
    assert len(names) > 1000, "libmlx.dylib's export list looks wrong"
    return names


@pytest.fixture(scope="module")
def objdir(tmp_path_factory):
    return tmp_path_factory.mktemp("macos_objects")


def test_ext_compiles_for_macos_and_links_against_libmlx(setup, exports, objdir):
    units = crosscheck.ext_units(setup)
    metal = [u for u in units if u.source.name == "attention_metal.cpp"]
    assert metal and "-DMLXF_METAL=1" in metal[0].flags and "-DMLXF_METALLIB=1" in metal[0].flags
    objects = crosscheck.compile_units(setup, units, objdir)
    missing, checked = crosscheck.unresolved_symbols(setup, objects, exports)
    assert not missing, crosscheck.report(missing)
    # eval_gpu's encoder calls and metal-cpp selectors were among those checked.
    assert len(checked) >= 20, checked


def test_cmake_builds_every_csrc_source():
    """The cross-check compiles what CMakeLists.txt names; that is all of csrc/."""
    kernels, others = crosscheck._cmake_sources((crosscheck.REPO / "CMakeLists.txt").read_text())
    on_disk = {f"csrc/{p.name}" for p in (crosscheck.REPO / "csrc").glob("*.cpp")}
    assert set(kernels) | set(others) == on_disk
    assert "csrc/attention_metal.cpp" in others and kernels


_CALLS_COPY_GPU = """#include "mlx/backend/gpu/copy.h"
void copy(const mlx::core::array& a, mlx::core::array& b, const mlx::core::Stream& s) {
  mlx::core::copy_gpu(a, b, mlx::core::CopyType::General, s);  // declared without MLX_API
}
void evaluate(mlx::core::array& a) { a.eval(); }  // exported: must resolve
"""


def test_a_call_to_an_unexported_mlx_function_fails_the_check(setup, exports, tmp_path):
    src = tmp_path / "calls_copy_gpu.cpp"
    src.write_text(_CALLS_COPY_GPU)
    unit = crosscheck.Unit(src, tuple(crosscheck.ext_flags(setup)))
    objects = crosscheck.compile_units(setup, [unit], tmp_path / "obj")
    missing, checked = crosscheck.unresolved_symbols(setup, objects, exports)
    assert [m.demangled for m in missing] == [
        "mlx::core::copy_gpu(mlx::core::array const&, mlx::core::array&, mlx::core::CopyType, mlx::core::Stream const&)"
    ]
    assert "copy_gpu" in crosscheck.report(missing) and "calls_copy_gpu.cpp" in crosscheck.report(missing)
    assert "__ZN3mlx4core5array4evalEv" in checked  # array::eval, resolved alongside


def test_mangling_is_the_macs(setup, exports, tmp_path):
    """int64_t is long long on macOS (mangled `x`), long on Linux (`l`). The check
    compiles for the Mac, so an MLX function taking int64_t is needed, and found,
    under its Mac name."""
    src = tmp_path / "int64.cpp"
    src.write_text('#include "mlx/backend/metal/device.h"\n'
                   "void bind(mlx::core::metal::CommandEncoder& e, const mlx::core::array& a) {\n"
                   "  e.set_input_array(a, 0, int64_t(16));\n}\n")
    unit = crosscheck.Unit(src, tuple(crosscheck.ext_flags(setup)))
    objects = crosscheck.compile_units(setup, [unit], tmp_path / "obj")
    missing, checked = crosscheck.unresolved_symbols(setup, objects, exports)
    mac_name = "__ZN3mlx4core5metal14CommandEncoder15set_input_arrayERKNS0_5arrayEix"
    assert not missing and mac_name in checked and mac_name in exports
    assert mac_name[:-1] + "l" not in exports  # the Linux spelling would not link
