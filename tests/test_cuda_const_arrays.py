"""The CUDA backend's constant arrays (backends/cuda.py const_array) stay out of MLX's small pool.

MLX's CUDA allocator serves arrays of at most 8 bytes from one managed pool
that stays in host memory, so a kernel reading one (the scale in `fp`, the
splits in `ns`) waits on PCIe each launch (session 16: the 4-bit decode
kernel 46 -> 15 us at Nk 512 once they left it; docs/cuda_decode.md). Every
constant array a kernel takes must span more than 8 bytes and hold its
values first. Runs everywhere (the arrays are built the same on the CPU).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash._quant_spec import validate_attention_quantized
from mlx_flash.backends import cuda, cuda_quant

SMALL = cuda._SMALL_POOL_BYTES


@pytest.mark.parametrize("values, dtype", [((7,), mx.int32), ((1.5, -2.0), mx.float32), ((0,), mx.bool_),
                                           ((3, 4), mx.uint8), ((1.0,), mx.float32), (tuple(range(17)), mx.int32)])
def test_const_array_spans_more_than_the_small_pool(values, dtype):
    a = cuda.const_array(values, dtype)
    assert a.nbytes > SMALL and a.dtype == dtype
    got = np.array(a)
    np.testing.assert_array_equal(got[:len(values)], np.array(values).astype(got.dtype))
    assert not got[len(values):].any()  # the padding is zeros
    assert cuda.const_array(values, dtype) is a  # made once, kept


def test_every_constant_input_of_the_decode_spans_more_than_the_small_pool():
    """Parameter blocks, placeholders and the quantized decode's split count (ns)."""
    from mlx_flash._spec import validate_attention

    q = mx.zeros((1, 8, 1, 64), mx.float16)
    k = mx.zeros((1, 2, 40, 64), mx.float16)
    spec, _ = validate_attention(q, k, k)
    ip, fp = cuda._param_arrays(spec, cuda._NO_DIMS, cuda._NO_DIMS)
    arrays = [ip, fp, *cuda._placeholders()]
    kq = tuple(mx.quantize(mx.ones((1, 2, 40, 64), mx.float16), group_size=64, bits=4))
    qspec = validate_attention_quantized(q, kq, kq, bits=4, group_size=64)[0]
    _, ns, _ = cuda_quant._decode_launch(qspec, tuple(q.shape), kq[1].dtype, kq[1].dtype, ())
    arrays.append(ns)
    for a in arrays:
        assert a.nbytes > SMALL, (a.shape, a.dtype)
    assert float(fp[0]) == pytest.approx(64 ** -0.5) and int(ns[0]) == cuda_quant.decode_plan(qspec)[1]


def test_the_parameter_block_of_a_new_key_count_waits_on_nothing(monkeypatch):
    """The int parameter block (it holds seqlen_k: new at every generation
    step) is written by the host: made without an eval, which would wait for
    the whole queued step (tools/cuda_new_length_probe.py), holding the
    values, padded past the small pool, made once per block."""
    from mlx_flash._spec import validate_attention

    q = mx.zeros((1, 8, 1, 64), mx.float16)
    k = mx.zeros((1, 2, 41, 64), mx.float16)
    spec, _ = validate_attention(q, k, k)
    cuda._param_arrays.cache_clear()
    cuda.const_array((spec.scale, 1.0), mx.float32)  # the float block: made before, as every call's

    def no_eval(*args, **kwargs):
        raise AssertionError("the parameter block was evaluated")

    monkeypatch.setattr(mx, "eval", no_eval)
    ip, fp = cuda._param_arrays(spec, cuda._NO_DIMS, cuda._NO_DIMS)
    monkeypatch.undo()
    got = np.array(ip)
    assert got[4] == 41 and got[:4].tolist() == [1, 8, 2, 1] and ip.nbytes > SMALL
    assert cuda._param_arrays(spec, cuda._NO_DIMS, cuda._NO_DIMS)[0] is ip
    small = cuda.length_array((5,), mx.int32)
    assert small.nbytes > SMALL and np.array(small).tolist()[:1] == [5] and not np.array(small)[1:].any()


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1), (1, 2, 1)])
def test_small_scales_leave_the_pool(shape):
    """matmul2d's and FP8Linear's scales of 8 bytes or less (per tensor) reach the kernels as views of a
    padded array made on the call's stream; larger ones pass untouched."""
    s = mx.array(np.arange(1, 1 + np.prod(shape), dtype=np.float32).reshape(shape))
    got = cuda.out_of_small_pool(s, mx.cpu)
    assert got is not s and got.shape == s.shape and got.dtype == s.dtype
    np.testing.assert_array_equal(np.array(got), np.array(s))
    big = mx.ones((1, 1, 3), mx.float32)
    assert cuda.out_of_small_pool(big, mx.cpu) is big
    assert cuda.out_of_small_pool(None, mx.cpu) is None


def test_small_caller_arrays_of_a_recorded_call_pass_as_given():
    """Key ranges at batch 2 (8 bytes) reach the attention kernels as the caller's arrays: a padded copy would
    be an input computed in the call, which the C++ replay refuses (csrc/cuda_host.cpp)."""
    from mlx_flash._spec import AttentionInputs

    fields = dict.fromkeys(AttentionInputs.__dataclass_fields__)
    inputs = AttentionInputs(**{**fields, "key_start": mx.array([1, 2], mx.int32), "key_len": mx.array([7, 9], mx.int32)})
    start, length = cuda._key_range_inputs(inputs)
    assert start is inputs.key_start and length is inputs.key_len
