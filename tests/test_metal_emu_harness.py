"""The Metal emulation harness itself: tiny kernels whose answers are known.

Each test proves one thing the attention and matmul kernels rely on when
they are run through tests/metal_emu on the CPU: the generated signature,
types and rounding, threadgroup memory and barriers, SIMD-group functions,
simdgroup_matrix, and the errors for what Metal forbids.
"""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from metal_emu import harness

_reason = harness.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

RNG = np.random.default_rng(1234)


def run(source, inputs, *, input_names=None, output_shapes, output_dtypes, grid, threadgroup, template=None,
        header="", output_names=None, **kwargs):
    input_names = input_names or [f"in{i}" for i in range(len(inputs))]
    output_names = output_names or [f"out{i}" for i in range(len(output_shapes))]
    kernel = harness.metal_kernel("t", input_names, output_names, source, header=header,
                                  atomic_outputs=kwargs.pop("atomic_outputs", False))
    return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                  output_shapes=output_shapes, output_dtypes=output_dtypes, **kwargs)


def to_np(x):
    if x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)
    return np.array(x)


# --------------------------------------------------------------------------
# The generated source


def _mlx_generated_source(kernel_args, call_args):
    """The source MLX itself generates, captured from its `verbose` print.

    MLX builds (and prints) the source while tracing for export even where
    there is no Metal back-end. None if this MLX build cannot do that."""
    import tempfile

    kernel = mx.fast.metal_kernel(**kernel_args)
    inputs = call_args.pop("inputs")

    def f(*xs):
        return kernel(inputs=list(xs), verbose=True, **call_args)

    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            mx.export_function(os.path.join(d, "f.mlxfn"), f, *inputs)
        except Exception:  # noqa: BLE001 - capability probe
            return None
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode()
    if "```" not in text:
        return None
    return text.split("```\n", 1)[1].rsplit("\n```", 1)[0]


def test_signature_matches_mlx_without_template_or_attributes():
    kernel_args = dict(name="plain", input_names=["x"], output_names=["y", "z"], source="y[0] = x[0]; z[0] = 1;")
    inputs = [mx.ones((16,), dtype=mx.bfloat16)]
    call = dict(grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,), (1,)],
                output_dtypes=[mx.bfloat16, mx.uint8])
    expected = _mlx_generated_source(kernel_args, dict(call, inputs=inputs))
    if expected is None:
        pytest.skip("this MLX build does not print kernel sources without Metal")
    ours = harness.metal_kernel(**kernel_args).generated_source(inputs=inputs, output_dtypes=call["output_dtypes"])
    assert ours == expected


@pytest.mark.parametrize(
    "source, atomic",
    [
        ("uint i = thread_position_in_grid.x; out0[i] = T(a[i] * s) + T(a_shape[0]) + T(a_strides[0]);", False),
        ("uint i = thread_index_in_simdgroup + simdgroup_index_in_threadgroup * threads_per_simdgroup;"
         " out0[i] = a[i] + b_ndim + threadgroups_per_grid.x + threads_per_threadgroup.y;", False),
        ("atomic_fetch_add_explicit(&out0[0], a[thread_position_in_grid.x], memory_order_relaxed);", True),
    ],
)
def test_signature_matches_mlx(source, atomic):
    inputs = [mx.ones((10, 3)), mx.array(2.0), mx.zeros((3,), dtype=mx.int32)]
    kernel_args = dict(name="sig", input_names=["a", "s", "b"], output_names=["out0"], source=source,
                       header="// header\n", atomic_outputs=atomic)
    call = dict(template=[("T", mx.float32), ("N", 3), ("B", True)], grid=(10, 1, 1), threadgroup=(8, 1, 1),
                output_shapes=[(10,)], output_dtypes=[mx.float32])
    expected = _mlx_generated_source(kernel_args, dict(call, inputs=inputs))
    if expected is None:
        pytest.skip("this MLX build does not print kernel sources without Metal")
    ours = harness.metal_kernel(**kernel_args).generated_source(
        inputs=inputs, output_dtypes=call["output_dtypes"], template=call["template"])
    assert ours == expected


# --------------------------------------------------------------------------
# Elementwise, types, rounding


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_elementwise_with_template_dtype(dtype):
    n = 1000
    a = mx.array(RNG.standard_normal(n).astype(np.float32)).astype(dtype)
    b = mx.array(RNG.standard_normal(n).astype(np.float32)).astype(dtype)
    (out,) = run(
        "uint i = thread_position_in_grid.x; if (i < n) out0[i] = T(a[i] * b[i] + T(1));",
        [a, b, n], input_names=["a", "b", "n"], template=[("T", dtype)],
        output_shapes=[(n,)], output_dtypes=[dtype], grid=(n, 1, 1), threadgroup=(256, 1, 1))
    assert out.dtype == dtype
    expected = (a * b + mx.array(1, dtype=dtype)).astype(dtype)  # MLX rounds per operation too
    np.testing.assert_array_equal(to_np(out), to_np(expected))


def test_half_rounds_every_operation():
    # x * y + z in half: rounding the product to half before adding differs
    # from computing in float and rounding once, for these inputs.
    x = RNG.uniform(0.5, 2, 4096).astype(np.float16)
    y = RNG.uniform(0.5, 2, 4096).astype(np.float16)
    z = RNG.uniform(-1, 1, 4096).astype(np.float16)
    (out,) = run("uint i = thread_position_in_grid.x; out0[i] = x[i] * y[i] + z[i];",
                 [mx.array(x), mx.array(y), mx.array(z)], input_names=["x", "y", "z"],
                 output_shapes=[(4096,)], output_dtypes=[mx.float16], grid=(4096, 1, 1), threadgroup=(128, 1, 1))
    per_op = (x * y).astype(np.float16) + z  # numpy float16 rounds each op
    once = (x.astype(np.float32) * y.astype(np.float32) + z.astype(np.float32)).astype(np.float16)
    assert (per_op != once).any(), "inputs do not tell the two roundings apart"
    np.testing.assert_array_equal(np.array(out), per_op)


def test_bfloat_rounds_every_operation():
    x = mx.array(RNG.uniform(0.5, 2, 4096).astype(np.float32)).astype(mx.bfloat16)
    y = mx.array(RNG.uniform(0.5, 2, 4096).astype(np.float32)).astype(mx.bfloat16)
    z = mx.array(RNG.uniform(-1, 1, 4096).astype(np.float32)).astype(mx.bfloat16)
    (out,) = run("uint i = thread_position_in_grid.x; out0[i] = x[i] * y[i] + z[i];", [x, y, z],
                 input_names=["x", "y", "z"], output_shapes=[(4096,)], output_dtypes=[mx.bfloat16],
                 grid=(4096, 1, 1), threadgroup=(128, 1, 1))
    per_op = (x * y) + z  # MLX bf16 arithmetic rounds each op (round to nearest even)
    xf, yf, zf = (np.array(v.astype(mx.float32)) for v in (x, y, z))
    once = mx.array(xf * yf + zf).astype(mx.bfloat16)
    assert not bool(mx.all(per_op == once).item()), "inputs do not tell the two roundings apart"
    np.testing.assert_array_equal(to_np(out), to_np(per_op))


def test_vector_types_constructors_and_math():
    source = """
    uint i = thread_position_in_grid.x;
    float4 v = float4(a[i], 2.0f, float2(3.0f, a[i]));
    half2 h = half2(v.xy);
    float4 w = v.wzyx * 2.0f + float4(1.0f);
    float3 u = float3(int3(1, 2, 3));
    out0[i] = w.x + w.y + float(h.y) + u.z + metal::max(v.x, 0.5f) + exp(0.0f) + precise::exp2(1.0f)
              + fast::tanh(0.0f) + clamp(5.0f, 0.0f, 1.0f) + select(0.0f, 10.0f, isnan(NAN))
              + (isinf(INFINITY) ? 100.0f : 0.0f) + float(1.5h) + float(numeric_limits<half>::max() == 65504.0f);
    """
    header = '#include <metal_stdlib>\n#include <metal_simdgroup_matrix>\n#include "mlx/backend/metal/kernels/utils.h"\n'
    a = np.array([0.25, -1.0, 3.0], dtype=np.float32)
    (out,) = run(source, [mx.array(a)], input_names=["a"], header=header, output_shapes=[(3,)],
                 output_dtypes=[mx.float32], grid=(3, 1, 1), threadgroup=(3, 1, 1))
    # w = (2a+1, 7, 5, 2a+1): w.x + w.y = 2a + 8
    expected = (2 * a + 8) + 2 + 3 + np.maximum(a, 0.5) + 1 + 2 + 0 + 1 + 10 + 100 + 1.5 + 1
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-6)


# --------------------------------------------------------------------------
# Grid, attributes, outputs


def test_dispatch_threads_edge_and_attributes():
    # 50 x 3 threads in threadgroups of 16 x 2: edge threadgroups are partial.
    source = """
    uint3 p = thread_position_in_grid;
    uint idx = p.y * threads_per_grid.x + p.x;
    out0[idx] = p.x + 1000 * p.y;
    out1[idx] = threadgroup_position_in_grid.x + 100 * threadgroup_position_in_grid.y;
    out2[idx] = threads_per_threadgroup.x * threads_per_threadgroup.y;
    out3[idx] = thread_index_in_threadgroup;
    """
    outs = run(source, [mx.zeros((1,))], output_shapes=[(3, 50)] * 4, output_dtypes=[mx.uint32] * 4,
               grid=(50, 3, 1), threadgroup=(16, 2, 1))
    pos, group, size, index = (np.array(o) for o in outs)
    y, x = np.mgrid[0:3, 0:50]
    np.testing.assert_array_equal(pos, x + 1000 * y)
    np.testing.assert_array_equal(group, x // 16 + 100 * (y // 2))
    actual_x = np.minimum(16, 50 - (x // 16) * 16)
    actual_y = np.minimum(2, 3 - (y // 2) * 2)
    np.testing.assert_array_equal(size, actual_x * actual_y)
    np.testing.assert_array_equal(index, (y % 2) * actual_x + x % 16)


def test_threadgroup_clamped_to_grid_like_mlx():
    (out,) = run("out0[thread_position_in_grid.x] = threads_per_threadgroup.x;", [mx.zeros((1,))],
                 output_shapes=[(5,)], output_dtypes=[mx.uint32], grid=(5, 1, 1), threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(np.array(out), [5] * 5)


def test_shape_strides_ndim():
    a = mx.array(RNG.standard_normal((3, 4, 5)).astype(np.float32))
    source = """
    uint i = thread_position_in_grid.x;
    out0[i] = a[elem_to_loc(i, a_shape, a_strides, a_ndim)];
    if (i == 0) {
      for (int d = 0; d < a_ndim; ++d) { dims[d] = a_shape[d]; dims[3 + d] = int(a_strides[d]); }
    }
    """
    out, dims = run(source, [a.transpose(2, 0, 1)], input_names=["a"], output_names=["out0", "dims"],
                    output_shapes=[(60,), (6,)], output_dtypes=[mx.float32, mx.int32],
                    grid=(60, 1, 1), threadgroup=(32, 1, 1))
    np.testing.assert_array_equal(np.array(out), np.array(a).transpose(2, 0, 1).reshape(-1))
    np.testing.assert_array_equal(np.array(dims), [5, 3, 4, 12, 4, 1])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint8])
def test_unwritten_outputs_are_poisoned(dtype):
    (out,) = run("uint i = thread_position_in_grid.x; if (i % 2 == 0) out0[i] = 7;", [mx.zeros((1,))],
                 output_shapes=[(8,)], output_dtypes=[dtype], grid=(8, 1, 1), threadgroup=(8, 1, 1))
    got = to_np(out)
    np.testing.assert_array_equal(got[::2], 7)
    if dtype in (mx.float32, mx.float16, mx.bfloat16):
        assert np.isnan(got[1::2]).all()
    else:
        raw = np.array(out.view(mx.uint8)).reshape(8, -1)[1::2]
        assert (raw == 0xAB).all()


def test_init_value():
    (out,) = run("uint i = thread_position_in_grid.x; if (i % 2 == 0) out0[i] = 7;", [mx.zeros((1,))],
                 output_shapes=[(8,)], output_dtypes=[mx.float16], grid=(8, 1, 1), threadgroup=(8, 1, 1),
                 init_value=-3.0)
    np.testing.assert_array_equal(np.array(out), [7, -3] * 4)


def test_atomic_outputs():
    a = RNG.integers(-5, 5, 3000).astype(np.int32)
    (total,) = run("atomic_fetch_add_explicit(&out0[0], a[thread_position_in_grid.x], memory_order_relaxed);",
                   [mx.array(a)], input_names=["a"], output_shapes=[(1,)], output_dtypes=[mx.int32],
                   grid=(3000, 1, 1), threadgroup=(256, 1, 1), init_value=0, atomic_outputs=True)
    assert int(np.array(total)[0]) == int(a.sum())


# --------------------------------------------------------------------------
# Threadgroup memory and barriers

_REDUCE = """
    threadgroup float partial[256];
    uint t = thread_position_in_threadgroup.x;
    partial[t] = a[thread_position_in_grid.x];
    BARRIER
    for (uint stride = 128; stride > 0; stride /= 2) {
      if (t < stride) partial[t] += partial[t + stride];
      BARRIER
    }
    if (t == 0) out0[threadgroup_position_in_grid.x] = partial[0];
"""


def _reduce(barrier, seed):
    a = np.random.default_rng(7).standard_normal(4 * 256).astype(np.float32)
    (out,) = run(_REDUCE.replace("BARRIER", barrier), [mx.array(a)], input_names=["a"], output_shapes=[(4,)],
                 output_dtypes=[mx.float32], grid=(1024, 1, 1), threadgroup=(256, 1, 1), seed=seed)
    return np.array(out), a.reshape(4, 256).sum(axis=1)


def test_threadgroup_reduction_with_barriers():
    for seed in range(3):
        out, expected = _reduce("threadgroup_barrier(mem_flags::mem_threadgroup);", seed)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_threadgroup_reduction_without_barriers_is_caught():
    results = [_reduce("", seed) for seed in range(4)]
    expected = results[0][1]
    wrong = [not np.allclose(out, expected, rtol=1e-5, atol=1e-5) for out, _ in results]
    unstable = any(not np.array_equal(results[0][0], out, equal_nan=True) for out, _ in results[1:])
    assert all(wrong) or unstable


def test_threadgroup_memory_limit():
    source = "threadgroup float big[8200]; big[thread_position_in_threadgroup.x] = 1; out0[0] = big[0];"
    with pytest.raises(harness.MetalEmulationError, match="threadgroup memory exceeds"):
        run(source, [mx.zeros((1,))], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
            threadgroup=(32, 1, 1))


def test_threads_per_threadgroup_limit():
    with pytest.raises(ValueError, match="maximum allowed threads"):
        run("out0[0] = 1;", [mx.zeros((1,))], output_shapes=[(1,)], output_dtypes=[mx.float32],
            grid=(2048, 1, 1), threadgroup=(2048, 1, 1))


def test_barrier_not_reached_by_all_threads_is_an_error():
    source = """
    uint t = thread_position_in_threadgroup.x;
    if (t >= 40) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[t] = 1;
    """
    with pytest.raises(harness.MetalEmulationError, match="threadgroup_barrier"):
        run(source, [mx.zeros((1,))], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
            threadgroup=(64, 1, 1))


def test_threadgroup_pointer_passed_as_device_pointer_fails_to_compile():
    header = "inline float first(const device float* p) { return p[0]; }\n"
    source = """
    threadgroup float buf[32];
    buf[thread_position_in_threadgroup.x] = a[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_position_in_grid.x] = first(buf);
    """
    with pytest.raises(harness.MetalCompileError, match=r"no known conversion from 'threadgroup float.*' to 'device float"):
        run(source, [mx.zeros((32,))], input_names=["a"], header=header, output_shapes=[(32,)],
            output_dtypes=[mx.float32], grid=(32, 1, 1), threadgroup=(32, 1, 1))


# --------------------------------------------------------------------------
# SIMD-group functions


def test_simd_functions_match_numpy():
    source = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    float x = a[i];
    out0[i] = simd_sum(x);
    out1[i] = simd_max(x);
    out2[i] = simd_min(x);
    out3[i] = simd_shuffle_xor(x, 5);
    out4[i] = simd_broadcast(x, 3);
    out5[i] = simd_prefix_exclusive_sum(x);
    out6[i] = simd_shuffle_down(x, 4);
    out7[i] = simd_shuffle(x, (lane * 7) % 32);
    """
    n = 128
    a = RNG.standard_normal(n).astype(np.float32)
    outs = [np.array(o) for o in run(source, [mx.array(a)], input_names=["a"], output_shapes=[(n,)] * 8,
                                     output_dtypes=[mx.float32] * 8, grid=(n, 1, 1), threadgroup=(64, 1, 1))]
    g = a.reshape(-1, 32)
    lane = np.arange(32)
    rtol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0].reshape(-1, 32), np.repeat(g.sum(1, keepdims=True), 32, 1), **rtol)
    np.testing.assert_array_equal(outs[1].reshape(-1, 32), np.repeat(g.max(1, keepdims=True), 32, 1))
    np.testing.assert_array_equal(outs[2].reshape(-1, 32), np.repeat(g.min(1, keepdims=True), 32, 1))
    np.testing.assert_array_equal(outs[3].reshape(-1, 32), g[:, lane ^ 5])
    np.testing.assert_array_equal(outs[4].reshape(-1, 32), np.repeat(g[:, 3:4], 32, 1))
    np.testing.assert_allclose(outs[5].reshape(-1, 32), np.cumsum(g, 1) - g, **rtol)
    np.testing.assert_array_equal(outs[6].reshape(-1, 32), g[:, np.where(lane + 4 < 32, lane + 4, lane)])
    np.testing.assert_array_equal(outs[7].reshape(-1, 32), g[:, (lane * 7) % 32])


def test_simd_functions_in_divergent_branches():
    # Each branch's simd_sum runs over the lanes that took the branch.
    source = """
    uint lane = thread_index_in_simdgroup;
    float r;
    if (lane < 12) r = simd_sum(1.0f);
    else r = simd_max(float(lane));
    out0[thread_position_in_grid.x] = r;
    """
    (out,) = run(source, [mx.zeros((1,))], output_shapes=[(32,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
                 threadgroup=(32, 1, 1))
    np.testing.assert_array_equal(np.array(out), [12] * 12 + [31] * 20)


def test_threadgroup_variable_in_a_template_helper():
    # One declaration, two instantiations: each gets storage of its own size.
    header = """
    template <typename T, int N>
    T fill_and_sum(uint t, T v) {
      threadgroup T scratch[N];
      if (t < N) scratch[t] = v;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      T s = 0;
      for (int i = 0; i < N; ++i) s += scratch[i];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      return s;
    }
    """
    source = """
    uint t = thread_position_in_threadgroup.x;
    out0[t] = fill_and_sum<half, 4>(t, half(1)) + fill_and_sum<float, 64>(t, 2.0f);
    """
    (out,) = run(source, [mx.zeros((1,))], header=header, output_shapes=[(64,)], output_dtypes=[mx.float32],
                 grid=(64, 1, 1), threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(np.array(out), [4 + 128] * 64)


def test_simd_sum_over_active_lanes_only():
    source = """
    uint lane = thread_index_in_simdgroup;
    if (lane % 2 == 0) out0[thread_position_in_grid.x] = simd_sum(1.0f);
    else out0[thread_position_in_grid.x] = -1;
    """
    (out,) = run(source, [mx.zeros((1,))], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
                 threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(np.array(out), [16, -1] * 32)


# --------------------------------------------------------------------------
# simdgroup_matrix

_MMA = """
    simdgroup_matrix<T, 8, 8> A, B, C;
    simdgroup_load(A, a, 8);
    simdgroup_load(B, b, 8, ulong2(0, 0), TRANSPOSE_B);
    simdgroup_load(C, c, 8);
    simdgroup_multiply_accumulate(C, A, B, C);
    simdgroup_store(C, out0, 8);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_simdgroup_multiply_accumulate(dtype, transpose_b):
    a, b, c = (mx.array(RNG.standard_normal((8, 8)).astype(np.float32)).astype(dtype) for _ in range(3))
    (out,) = run(_MMA.replace("TRANSPOSE_B", "true" if transpose_b else "false"), [a, b, c],
                 input_names=["a", "b", "c"], template=[("T", dtype)], output_shapes=[(8, 8)],
                 output_dtypes=[dtype], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    af, bf, cf = (to_np(x).astype(np.float64) for x in (a, b, c))
    expected = af @ (bf.T if transpose_b else bf) + cf
    tol = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(to_np(out), expected, rtol=tol, atol=tol * 4)


def test_simdgroup_load_store_origin_and_transpose():
    # A 16 x 24 array; load the 8x8 block at matrix (column 8, row 4), plain
    # and transposed, and store each into a 16 x 16 array at (column 3, row 5).
    source = """
    simdgroup_matrix<float, 8, 8> M;
    simdgroup_load(M, a, 24, ulong2(8, 4), TRANSPOSE);
    simdgroup_store(M, out0, 16, ulong2(3, 5), TRANSPOSE);
    """
    a = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    for transpose in (False, True):
        (out,) = run(source.replace("TRANSPOSE", "true" if transpose else "false"), [mx.array(a)],
                     input_names=["a"], output_shapes=[(16, 16)], output_dtypes=[mx.float32], grid=(32, 1, 1),
                     threadgroup=(32, 1, 1), init_value=-1)
        got = np.array(out)
        expected = np.full((16, 16), -1.0, dtype=np.float32)
        if transpose:
            # M = (rows 8..15, columns 4..11 of a) transposed; stored transposed
            # at matrix origin (3, 5): memory rows 3..10, columns 5..12.
            expected[3:11, 5:13] = a[8:16, 4:12]
        else:
            expected[5:13, 3:11] = a[4:12, 8:16]
        np.testing.assert_array_equal(got, expected)


def test_thread_elements_layout():
    # Each lane writes its two elements' coordinates through thread_elements();
    # the stored matrix must hold row * 8 + column everywhere.
    source = """
    uint lane = thread_index_in_simdgroup;
    uint qid = lane / 4;
    uint fm = (qid & 4) + ((lane / 2) % 4);
    uint fn = (qid & 2) * 2 + (lane % 2) * 2;
    simdgroup_matrix<float, 8, 8> M;
    M.thread_elements()[0] = fm * 8 + fn;
    M.thread_elements()[1] = fm * 8 + fn + 1;
    simdgroup_store(M, out0, 8);
    simdgroup_matrix<float, 8, 8> L;
    simdgroup_load(L, a, 8);
    out1[lane * 2] = L.thread_elements()[0];
    out1[lane * 2 + 1] = L.thread_elements()[1];
    """
    a = np.arange(64, dtype=np.float32)
    stored, loaded = run(source, [mx.array(a)], input_names=["a"], output_shapes=[(64,), (64,)],
                         output_dtypes=[mx.float32] * 2, grid=(32, 1, 1), threadgroup=(32, 1, 1))
    np.testing.assert_array_equal(np.array(stored), a)
    lane = np.arange(32)
    fm = (lane // 4 & 4) + (lane // 2) % 4
    fn = (lane // 4 & 2) * 2 + (lane % 2) * 2
    np.testing.assert_array_equal(np.array(loaded).reshape(32, 2), np.stack([fm * 8 + fn, fm * 8 + fn + 1], 1))


def test_tiled_matmul_through_threadgroup_memory():
    # A 4-SIMD-group 16x16 = (16x24) @ (24x16) product with threadgroup tiles:
    # the shape of the real kernels (load tile, barrier, MMA over k, store).
    source = """
    threadgroup T As[16 * 8];
    threadgroup T Bs[8 * 16];
    uint t = thread_index_in_threadgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint sm = (sg / 2) * 8, sn = (sg % 2) * 8;
    simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int k0 = 0; k0 < K; k0 += 8) {
      As[t] = a[(t / 8) * K + k0 + t % 8];
      Bs[t] = b[(k0 + t / 16) * 16 + t % 16];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_matrix<T, 8, 8> A, B;
      simdgroup_load(A, As, 8, ulong2(0, sm));
      simdgroup_load(B, Bs, 16, ulong2(sn, 0));
      simdgroup_matrix<float, 8, 8> Af, Bf;
      Af.thread_elements() = float2(A.thread_elements());
      Bf.thread_elements() = float2(B.thread_elements());
      simdgroup_multiply_accumulate(acc, Af, Bf, acc);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    simdgroup_store(acc, out0, 16, ulong2(sn, sm));
    """
    a = mx.array(RNG.standard_normal((16, 24)).astype(np.float32)).astype(mx.float16)
    b = mx.array(RNG.standard_normal((24, 16)).astype(np.float32)).astype(mx.float16)
    for seed in range(2):
        (out,) = run(source, [a, b], input_names=["a", "b"], template=[("T", mx.float16), ("K", 24)],
                     output_shapes=[(16, 16)], output_dtypes=[mx.float32], grid=(128, 1, 1),
                     threadgroup=(128, 1, 1), seed=seed)
        expected = to_np(a).astype(np.float64) @ to_np(b).astype(np.float64)
        np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Faults are reported, not crashes


def test_out_of_bounds_read_names_the_buffer():
    source = "uint i = thread_position_in_grid.x; out0[i] = a[i + 8];"  # reads 8 past the end
    with pytest.raises(harness.MetalEmulationError, match=r"out-of-bounds access to buffer 0 `a`.*past the end"):
        run(source, [mx.zeros((1024,))], input_names=["a"], output_shapes=[(1024,)], output_dtypes=[mx.float32],
            grid=(1024, 1, 1), threadgroup=(256, 1, 1))


def test_out_of_bounds_write_names_the_output():
    source = "uint i = thread_position_in_grid.x; result[i * 2] = 1;"
    with pytest.raises(harness.MetalEmulationError, match=r"buffer 1 `result`"):
        run(source, [mx.zeros((1,))], output_names=["result"], output_shapes=[(1000,)],
            output_dtypes=[mx.float32], grid=(1000, 1, 1), threadgroup=(100, 1, 1))


def test_threadgroup_array_overflow():
    source = """
    threadgroup float tile[64];
    tile[thread_position_in_threadgroup.x + 4] = 1;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_position_in_grid.x] = tile[0];
    """
    with pytest.raises(harness.MetalEmulationError, match="threadgroup array"):
        run(source, [mx.zeros((1,))], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
            threadgroup=(64, 1, 1))


def test_divergent_barriers_are_an_error():
    source = """
    uint t = thread_position_in_threadgroup.x;
    if (t < 32) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out0[t] = 1;
    """
    with pytest.raises(harness.MetalEmulationError, match="different threadgroup_barrier"):
        run(source, [mx.zeros((1,))], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
            threadgroup=(64, 1, 1))


def test_harness_survives_faults():
    # After the faults above, the process and the harness still work.
    (out,) = run("out0[thread_position_in_grid.x] = 2;", [mx.zeros((1,))], output_shapes=[(4,)],
                 output_dtypes=[mx.float32], grid=(4, 1, 1), threadgroup=(4, 1, 1))
    np.testing.assert_array_equal(np.array(out), [2] * 4)


# --------------------------------------------------------------------------
# Source rewrites (MSL spellings C++ lacks)


def test_unsuffixed_float_literals_are_float_like_in_msl():
    # In C++ `x * 0.1` would be a double product; MSL has no double.
    source = "uint i = thread_position_in_grid.x; out0[i] = x[i] * 0.1 + 1e-3;"
    x = RNG.standard_normal(256).astype(np.float32)
    (out,) = run(source, [mx.array(x)], input_names=["x"], output_shapes=[(256,)], output_dtypes=[mx.float32],
                 grid=(256, 1, 1), threadgroup=(256, 1, 1))
    np.testing.assert_array_equal(np.array(out), x * np.float32(0.1) + np.float32(1e-3))


def test_rewrites_keep_line_numbers():
    source = "a = float4(1, 2.5, 3h, .5);\nthreadgroup float buf[N * 2];\nconstexpr constant int K = 3;\n"
    rewritten = harness.to_cpp(source)
    assert rewritten.count("\n") == source.count("\n")
    assert "__emu_make<float, 4>(1, 2.5f, half(3), .5f)" in rewritten
    assert "threadgroup float (&buf)[N*2] = *__emu_threadgroup_variable<float[N*2], 0>();" in rewritten
    assert "constexpr int K = 3;" in rewritten


def test_threadgroups_run_in_random_order():
    # Each threadgroup records when it ran; the order changes with the seed.
    source = """
    if (thread_position_in_threadgroup.x == 0) {
      out0[threadgroup_position_in_grid.x] = atomic_fetch_add_explicit(&counter[0], 1, memory_order_relaxed);
    }
    """
    k = harness.metal_kernel("order", ["counter_in"], ["out0", "counter"], source.replace("&counter[0]", "(device atomic_int*)&counter[0]"))
    orders = []
    for seed in range(2):
        out, _ = k(inputs=[mx.zeros((1,))], grid=(16 * 8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(16,), (1,)],
                   output_dtypes=[mx.int32, mx.int32], init_value=0, seed=seed)
        orders.append(np.array(out))
        assert sorted(orders[-1]) == list(range(16))
    assert not np.array_equal(orders[0], orders[1])


def test_parallel_threadgroups_same_results_and_faults(monkeypatch):
    serial, expected = _reduce("threadgroup_barrier(mem_flags::mem_threadgroup);", 0)
    monkeypatch.setenv("METAL_EMU_THREADS", "2")
    parallel, _ = _reduce("threadgroup_barrier(mem_flags::mem_threadgroup);", 0)
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_allclose(parallel, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(harness.MetalEmulationError, match=r"buffer 0 `a`"):
        run("uint i = thread_position_in_grid.x; out0[i] = a[i + 300];", [mx.zeros((1024,))], input_names=["a"],
            output_shapes=[(1024,)], output_dtypes=[mx.float32], grid=(1024, 1, 1), threadgroup=(64, 1, 1))


def test_race_check_runs_several_schedules(monkeypatch):
    monkeypatch.setenv("METAL_EMU_RACE_CHECK", "3")
    out, expected = _reduce("threadgroup_barrier(mem_flags::mem_threadgroup);", 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # With the first barrier but none in the loop, every value read is
    # finite but which partial sums are complete depends on the schedule.
    racy = _REDUCE.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);", 1).replace("BARRIER", "")
    a = np.random.default_rng(7).standard_normal(4 * 256).astype(np.float32)
    with pytest.raises(harness.MetalEmulationError, match="changes with the thread schedule"):
        run(racy, [mx.array(a)], input_names=["a"], output_shapes=[(4,)], output_dtypes=[mx.float32],
            grid=(1024, 1, 1), threadgroup=(256, 1, 1))


def test_patched_mx_fast():
    with harness.patched_mx_fast():
        kernel = mx.fast.metal_kernel("patched", ["a"], ["out0"], "out0[thread_position_in_grid.x] = 2 * a[0];")
        (out,) = kernel(inputs=[mx.array([1.5])], grid=(3, 1, 1), threadgroup=(3, 1, 1), output_shapes=[(3,)],
                        output_dtypes=[mx.float32])
    assert mx.fast.metal_kernel is not harness.metal_kernel
    np.testing.assert_array_equal(np.array(out), [3.0] * 3)


def test_unavailable_reason_without_compiler(monkeypatch):
    monkeypatch.setattr(harness, "_find_clang", lambda: None)
    reason = harness.unavailable_reason.__wrapped__()
    assert reason is not None and "clang" in reason
