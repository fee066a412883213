"""tests/metal_emu/library.py: [[kernel]] functions of a Metal library
source, bound the way a host binds them (function constants, buffer
indices, thread attributes), on tiny kernels whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from metal_emu import harness, library

_reason = harness.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SOURCE = """
#include <metal_stdlib>
using namespace metal;

constant bool add_bias [[function_constant(10)]];
constant int repeat_count [[function_constant(11)]];

template <typename T, int SCALE>
[[kernel, max_total_threads_per_threadgroup(64)]] void scaled(
    const device T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    const constant float& bias [[buffer(2)]],
    const device T* extra [[buffer(3), function_constant(add_bias)]],
    const constant int64_t strides[2] [[buffer(4)]],
    uint3 tid [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]],
    uint2 local [[thread_position_in_threadgroup]]) {
  uint i = tid.x * 64 + local.x;
  T v = x[i * strides[1]] * T(SCALE * repeat_count);
  if (add_bias) {
    v += T(bias) + extra[i];
  }
  out[i] = v + T(lane == i % 32 ? 0 : 1000);
}
"""


def _run(add_bias, extra=True):
    fn = library.kernel_function(SOURCE, "scaled", template_args=["float", 3],
                                 function_constants={"add_bias": add_bias, 11: 2})
    x = np.arange(128, dtype=np.float32)
    out = np.full(128, np.nan, dtype=np.float32)
    buffers = {0: x, 1: out, 2: np.array([0.5], np.float32), 4: np.array([1, 1], np.int64)}
    if extra:
        buffers[3] = np.ones(128, np.float32)
    fn(buffers=buffers, threadgroups=(2, 1, 1), threadgroup=(64, 1, 1))
    return out


def test_function_constants_buffers_and_attributes_bind_like_a_host():
    assert fn_params() == [("buffer", 0), ("buffer", 1), ("buffer", 2), ("buffer", 3), ("buffer", 4),
                           ("attribute", "threadgroup_position_in_grid"), ("attribute", "thread_index_in_simdgroup"),
                           ("attribute", "thread_position_in_threadgroup")]
    x = np.arange(128, dtype=np.float32)
    np.testing.assert_array_equal(_run(False, extra=False), 6 * x)
    np.testing.assert_array_equal(_run(True), 6 * x + 1.5)


def fn_params():
    return library.kernel_parameters(SOURCE, "scaled")


def test_an_unbound_buffer_that_is_read_is_an_error():
    with pytest.raises(harness.MetalEmulationError, match=r"out-of-bounds access to buffer 3 `buffer\(3\)`"):
        _run(True, extra=False)


def test_a_function_constant_without_value_is_an_error():
    with pytest.raises(ValueError, match=r"repeat_count \(11\)"):
        library.kernel_function(SOURCE, "scaled", template_args=["float", 3], function_constants={"add_bias": True})


def test_an_unknown_kernel_name_is_an_error():
    with pytest.raises(ValueError, match="no \\[\\[kernel\\]\\] function named 'scaled2'"):
        library.kernel_parameters(SOURCE, "scaled2")
