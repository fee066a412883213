"""The Metal wrappers' per-call host work (backends/metal_buffers.py and the
cached launch plans of metal.py / metal_quant.py), on any machine: a
recording kernel factory stands in for mx.fast.metal_kernel.

What must hold: repeated calls of one configuration hand the kernels the very
same parameter and placeholder arrays (no per-call rebuilding), with the
values the kernels' layouts expect; a new sequence length gets new values;
the constants never go stale (an array leaves the cache together with its
id); user arrays still reach the quantized kernels contiguous. The results of
these launches are checked by the emulation tests (test_metal_attention.py and
the metal_emu backend of the behaviour tests); speed by tools/metal_host_cost.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash._quant_spec import validate_attention_quantized
from mlx_flash._spec import validate_attention
from mlx_flash.backends import metal, metal_buffers, metal_quant

ROOT = Path(__file__).resolve().parents[1]


class _Recorder:
    def __init__(self):
        self.launches = []

    def __call__(self, **build):
        name = build["name"]

        def kernel(**launch):
            self.launches.append((name, launch))
            return [mx.zeros(s, dtype=d) for s, d in zip(launch["output_shapes"], launch["output_dtypes"])]

        return kernel


@pytest.fixture
def recorder():
    rec = _Recorder()
    previous = metal.set_kernel_factory(rec)
    yield rec
    metal.set_kernel_factory(previous)


def _inputs(launch):
    return launch[1]["inputs"]


def test_constants_are_shared_padded_and_never_stale():
    a, b = metal_buffers.int_params((3, 1, 4)), metal_buffers.int_params((3, 1, 4))
    assert a is b and metal_buffers.is_constant(a)
    assert np.array(a).tolist() == [3, 1, 4, 0, 0, 0, 0, 0] and a.dtype == mx.int32
    f = metal_buffers.float_params((0.5, 0.0))
    assert np.array(f).tolist() == [0.5] + [0.0] * 7 and f.dtype == mx.float32
    p = metal_buffers.placeholder(mx.bool_)
    assert p is metal_buffers.placeholder(mx.bool_) and p.shape == (8,) and metal_buffers.is_constant(p)
    assert not metal_buffers.is_constant(mx.zeros((8,), mx.int32))
    # Past the capacity the oldest arrays leave, and their ids with them.
    first = metal_buffers.int_params((-1,) * 9)
    for n in range(metal_buffers._CAPACITY + 1):
        metal_buffers.int_params((n, -2))
    assert ("int32", (-1,) * 9) not in metal_buffers._by_key
    assert not metal_buffers.is_constant(first)
    assert len(metal_buffers._by_key) <= metal_buffers._CAPACITY
    assert {id(x) for x in metal_buffers._by_key.values()} | {id(x) for x in metal_buffers._placeholders.values()} \
        == metal_buffers._ids


def test_decode_calls_reuse_their_parameters(recorder):
    h = lambda *s: mx.random.normal(s).astype(mx.float16)  # noqa: E731
    q, k, v = h(1, 8, 1, 64), h(1, 2, 3001, 64), h(1, 2, 3001, 64)
    spec, inputs = validate_attention(q, k, v, scale=0.125)
    for _ in range(2):
        metal.attention_forward(q, k, v, spec, inputs, None)
    names = [name for name, _ in recorder.launches]
    assert names == ["mlxf_attention_fwd", "mlxf_attention_combine"] * 2  # split over keys, then merged
    first, second = _inputs(recorder.launches[0]), _inputs(recorder.launches[2])
    assert all(x is y for x, y in zip(first[3:], second[3:]))  # placeholders and parameters: the same arrays
    iparams = np.array(first[-2]).tolist()
    assert iparams[:5] == [1, 8, 2, 1, 3001] and np.array(first[-1])[0] == np.float32(0.125)
    # One key more (the next generation step): new parameters with the new length.
    k2, v2 = h(1, 2, 3002, 64), h(1, 2, 3002, 64)
    spec2, inputs2 = validate_attention(q, k2, v2, scale=0.125)
    metal.attention_forward(q, k2, v2, spec2, inputs2, None)
    third = _inputs(recorder.launches[4])
    assert third[-2] is not first[-2] and np.array(third[-2]).tolist()[4] == 3002


def test_backward_launches_carry_the_mask_strides(recorder):
    q, k, v = (mx.random.normal((2, 4, 17, 32)) for _ in range(3))
    mask = mx.random.normal((1, 4, 17, 17))
    spec, inputs = validate_attention(q, k, v, mask=mask)
    out, lse = metal.attention_forward(q, k, v, spec, inputs, None)
    metal.attention_backward(q, k, v, out, lse, mx.ones_like(out), None, spec, inputs, None)
    names = [name for name, _ in recorder.launches]
    assert names == ["mlxf_attention_fwd", "mlxf_attention_bwd_delta", "mlxf_attention_bwd_dkdv",
                     "mlxf_attention_bwd_dq"]
    iparams = np.array(_inputs(recorder.launches[2])[-2]).tolist()
    assert iparams[9:13] == [0, 17 * 17, 17, 1]  # mask [1, 4, 17, 17]: batch dim broadcast
    assert np.array_equal(np.array(_inputs(recorder.launches[2])[6]), np.array(mask))  # the mask itself


def test_quantized_decode_reuses_constants_and_keeps_user_arrays_contiguous(recorder):
    qt = mx.random.normal((1, 8, 64, 1)).astype(mx.float16).transpose(0, 1, 3, 2)  # a strided [1, 8, 1, 64] view
    k, v = (tuple(mx.quantize(mx.random.normal((1, 2, 700, 64)), group_size=32, bits=4)) for _ in range(2))
    qspec, inputs, k, v = validate_attention_quantized(qt, k, v, bits=4, group_size=32, scale=0.125)
    for _ in range(2):
        metal_quant.quantized_attention_forward(qt, k, v, qspec, inputs, None)
    first = _inputs(recorder.launches[0])
    second = _inputs(recorder.launches[len(recorder.launches) // 2])
    assert all(x is y for x, y in zip(first[7:], second[7:]))  # mask/alibi/sinks placeholders, parameters
    assert all(metal_buffers.is_constant(x) for x in first[7:])
    assert first[1] is k[0]  # the cache is read through its strides, as it is
    assert first[0] is not qt  # q, a strided view, reaches the kernel as a contiguous copy
    assert np.array_equal(np.array(first[0]), np.array(qt))


def test_metal_host_cost_tool_runs():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "metal_host_cost.py"), "--calls", "3", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode fp16" in done.stdout and "backend" in done.stdout
