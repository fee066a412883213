"""The C++ primitive's Metal host side agrees with the Metal sources.

csrc/attention_metal.cpp builds kernel names and binds buffers from the
tables of csrc/metal_abi.h (looked up by the Metal parameter's name at compile
time). Here those tables are printed by a small C++ program and compared with
what metal_src/*.metal say after preprocessing (macos_check/metal_sources.py):
host names, [[buffer(N)]] indices, the function constant, the feature bits
and the parameter-array layout. Nothing about the kernels is listed here, so
the check follows the sources when kernels, buffers or names change.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from macos_check import metal_sources

REPO = Path(__file__).resolve().parents[1]
_CLANG = shutil.which("clang-19")
_CXX = shutil.which("clang++-19") or shutil.which("c++")

pytestmark = pytest.mark.skipif(
    _CLANG is None or _CXX is None, reason="needs clang-19 (Debian: apt-get install clang-19) and a C++20 compiler"
)


@pytest.fixture(scope="module")
def metal():
    return metal_sources.preprocess(_CLANG)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """csrc/metal_abi.h's tables, as its dump program prints them."""
    exe = tmp_path_factory.mktemp("metal_abi") / "dump"
    subprocess.run([_CXX, "-std=c++20", f"-I{REPO / 'csrc'}", str(REPO / "tests/macos_check/metal_abi_dump.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def test_every_kernel_the_primitive_builds_is_instantiated(metal, host):
    exported = metal_sources.host_names(metal)
    for kernel in host["kernels"]:
        missing = [n for n in kernel["names"] if n not in exported]
        assert not missing, (f"{len(missing)} kernel name(s) built by csrc/attention_metal.cpp are not "
                             f"[[host_name]]s of metal_src/*.metal, e.g. {missing[:4]}")


def test_buffer_indices_match_the_kernel_signatures(metal, host):
    exported = metal_sources.host_names(metal)
    signatures = metal_sources.kernel_buffers(metal)
    for kernel in host["kernels"]:
        cpp = {name: i for i, name in enumerate(kernel["buffers"])}
        functions = {exported[n].function for n in kernel["names"] if n in exported}
        assert functions, f"no instantiation of the {kernel['stem']} kernels"
        for fn in functions:
            assert signatures[fn] == cpp, (
                f"{fn}: [[buffer]] parameters in Metal {signatures[fn]} != metal_abi.h's "
                f"{kernel['stem']} table {cpp}")


def test_simdgroups_match_the_instantiations(metal, host):
    """Where a kernel takes its simdgroup count as a template parameter (NSG),
    the instances the C++ calls use the count it launches threadgroups for."""
    exported = metal_sources.host_names(metal)
    params = metal_sources.template_parameters(metal)
    checked = 0
    for kernel in host["kernels"]:
        for n in (n for n in kernel["names"] if n in exported):
            inst = exported[n]
            if "NSG" in params.get(inst.function, []):
                assert int(inst.template_args[params[inst.function].index("NSG")]) == host["simdgroups"], n
                checked += 1
    assert checked > 0, "no kernel takes NSG any more: check how the threadgroup size is chosen"


def test_function_constants_are_the_ones_the_primitive_sets(metal, host):
    """The kernels the C++ calls read the feature bits from the function constant
    it sets, and no other (an unset one would fail pipeline creation)."""
    constants = metal_sources.function_constants(metal)
    exported = metal_sources.host_names(metal)
    used = metal_sources.constants_used(metal)
    for kernel in host["kernels"]:
        for fn in {exported[n].function for n in kernel["names"] if n in exported}:
            assert {constants[c] for c in used[fn]} == {host["features_constant"]}, (fn, used[fn])


def test_feature_bits_and_parameter_layout_match(metal, host):
    metal_features = metal_sources.enum_values(metal, "Feature")
    for name, value in host["features"].items():
        assert metal_features.get(name) == value, f"{name}: C++ {value}, Metal {metal_features.get(name)}"
    # Every parameter the kernels read must be filled by the C++, at the same index.
    assert metal_sources.enum_values(metal, "IntParam") == host["int_params"]
    assert metal_sources.enum_values(metal, "FloatParam") == host["float_params"]


def test_attention_metal_binds_by_name():
    """No literal buffer index in attention_metal.cpp: every index comes from metal_abi.h."""
    src = (REPO / "csrc" / "attention_metal.cpp").read_text()
    literal = re.findall(r"\b(?:set_input_array|set_output_array|set_vector_bytes|set_bytes|bind_input)"
                         r"\([^;{}]*?,\s*\d+\s*\)", src)
    assert not literal, literal


def test_parser_reads_a_known_signature():
    """The parsers on a small text with the shapes they must handle."""
    text = """
    enum Feature : int { A = 1, B = 1 << 3, C };
    constant int fc [[function_constant(2)]];
    template <typename T, int NSG>
    [[kernel]] void k(const device T* x [[buffer(0)]], device vec<T, 2>* y [[buffer(3)]],
                      uint3 pos [[threadgroup_position_in_grid]]) { if (fc) { y[0] = x[0]; } }
    template [[host_name("k_" "f32" "_4")]] [[kernel]] decltype(k<float, 4>) k<float, 4>;
    [[kernel]] void plain(device int* out [[buffer(1)]]) {}
    """
    names = metal_sources.host_names(text)
    assert names["k_f32_4"] == metal_sources.Instance("k_f32_4", "k", ("float", "4"))
    assert names["plain"].function == "plain"
    assert metal_sources.kernel_buffers(text) == {"k": {"x": 0, "y": 3}, "plain": {"out": 1}}
    assert metal_sources.template_parameters(text) == {"k": ["T", "NSG"]}
    assert metal_sources.function_constants(text) == {"fc": 2}
    assert metal_sources.constants_used(text) == {"k": {"fc"}, "plain": set()}
    assert metal_sources.enum_values(text, "Feature") == {"A": 1, "B": 8, "C": 9}
