"""Key-range cases of the CUDA kernels (native `key_start` / `key_len`),
shared by the emulated runs (tests/test_cuda_emu_key_ranges.py) and the GPU
runs (tests/test_cuda_specific.py); every case is compared with
reference_np.attention_np in float64.

`run(q, k, v, dout, options)` runs the CUDA backend's attention_forward (and,
with dout, attention_backward) and returns (out, lse, (dq, dk, dv) or ()).
"""

import mlx.core as mx
import numpy as np

import features
from helpers import check_close, plain_errors, randn, rng, to_np
from reference_np import attention_np

from .nonfinite_cases import check_contract


def key_ranges(B, Nk):
    """(key_start, key_len) int32 [B]: left padding that also runs past the end,
    an empty range, a negative start cut early, every key, and (B = 5) a range
    inside the keys. With Nk of a few tiles, whole key tiles (forward) and
    whole key blocks (backward) fall outside some ranges and others are cut."""
    rows = [(Nk * 5 // 8, Nk), (0, 0), (-3, Nk // 3 + 3), (0, Nk), (Nk // 4, Nk // 2 + 1)][:B]
    start, length = (np.array(x, np.int32) for x in zip(*rows))
    return mx.array(start), mx.array(length)


def inside(B, Nk):
    """[B, Nk] bool: key j is inside batch row b's range."""
    start, length = (np.array(x).astype(np.int64) for x in key_ranges(B, Nk))
    j = np.arange(Nk)[None, :]
    return (j >= start[:, None]) & (j < (start + length)[:, None])


def check_case(run, shape, dtype, feature, grads):
    """One call with key ranges and `feature` (a tests/features.py builder),
    against float64: values, lse and (grads) dq, dk, dv; the empty row 1 gives
    out 0, lse -inf (without sinks) and zero gradients, and keys outside the
    ranges get zero dk, dv."""
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    gen = rng("cuda-key-range", shape, str(dtype), feature, grads)
    q, k, v = randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype), randn(gen, (B, Hkv, Nk, Dv), dtype)
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    options["key_start"], options["key_len"] = key_ranges(B, Nk)
    dout = randn(gen, (B, Hq, Nq, Dv), dtype) if grads else None
    out, lse, got = run(q, k, v, dout, options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = None
    if dtype != mx.float32:
        plain = plain_errors(q, k, v, dout if grads else mx.ones(out.shape, dtype), options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    assert np.all(to_np(out)[1] == 0)
    if "sinks" not in options:
        assert np.all(to_np(lse)[1] == -np.inf)
    for name, g in zip(("dq", "dk", "dv"), got):
        check_close(name, to_np(g), want, dtype, plain)
        assert np.all(to_np(g)[1] == 0), f"{name}: the empty row has gradients"
    outside = ~inside(B, Nk)
    for name, g in zip(("dk", "dv"), got[1:]):
        assert np.all(to_np(g).transpose(0, 2, 1, 3)[outside] == 0), f"{name}: a key outside its range has gradients"


def check_poisoned_case(run, shape, dtype, grads):
    """Dropped keys never meet NaN/inf (the non-finite contract): k and v
    outside each row's range are NaN or inf, in tiles the ranges cut and in
    tiles they skip; every result stays finite and right."""
    B, Hq, Hkv, Nq, Nk, D = shape
    gen = rng("cuda-key-range-nan", shape, str(dtype))
    q, k, v, do = (np.array(randn(gen, s, mx.float32)) for s in
                   ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, Hq, Nq, D)))
    outside = ~inside(B, Nk)
    for b in range(B):
        k[b, :, outside[b], 1] = np.nan
        v[b, :, outside[b], 2] = np.inf
        v[b, :, outside[b], 0] = np.nan
    start, length = key_ranges(B, Nk)
    options = {"causal": True, "key_start": start, "key_len": length}
    cast = lambda x: mx.array(x).astype(dtype)
    q, k, v, do = cast(q), cast(k), cast(v), cast(do)
    out, lse, got = run(q, k, v, do if grads else None, options)
    want = attention_np(q, k, v, dout=do if grads else None, **options)
    check_contract("out", to_np(out), want, dtype)
    check_contract("lse", to_np(lse), want, mx.float32)
    for name, g in zip(("dq", "dk", "dv"), got):
        check_contract(name, to_np(g), want, dtype)
    assert np.isfinite(to_np(out)).all()


def backend_runner(stream, emulate):
    """run(q, k, v, dout, options) on the CUDA backend: its kernels emulated on
    the CPU (tests/cuda_emu) or on the GPU (stream mx.gpu)."""
    import contextlib

    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    def run(q, k, v, dout, options):
        spec, inputs = validate_attention(q, k, v, **options)
        assert spec.has_key_range and cuda_backend.NATIVE_KEY_RANGES  # the kernels get ranges, not a mask
        if emulate:
            from . import harness

            context = harness.patched_cuda_kernel()
        else:
            context = contextlib.nullcontext()
        with context:
            out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, stream)
            grads = ()
            if dout is not None:
                grads = cuda_backend.attention_backward(q, k, v, out, lse, dout, None, spec, inputs, stream)
            mx.eval(out, lse, *grads)
        return out, lse, grads

    return run
