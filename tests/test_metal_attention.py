"""Feature matrix of the Metal attention kernels, run through the MSL emulation
harness (tests/metal_emu): forward, decode and backward, features alone and
combined, fp32/fp16/bf16, head dims 3..256, Nq != Nk.

Every case is checked against the float64 NumPy reference: fp32 to 2e-5 of
the largest reference value; fp16/bf16 to twice the error of the plain
materialised computation in that dtype (softmax and products in the dtype).
Outputs are poisoned with NaN before each kernel, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import mlx.core as mx

import backends
import reference_np
from mlx_flash import reference as mlx_reference
from mlx_flash._spec import validate_attention

pytestmark = pytest.mark.skipif(
    backends.skip_reason("metal_emu") is not None,
    reason=str(backends.skip_reason("metal_emu")),
)

FP32_TOL = 2e-5
# A floor for the low-precision bound: one unit in the last place of the dtype.
ULP = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def _emu():
    from metal_emu import attention as emu

    return emu


def _rand(rng, shape, dtype, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _np(x):
    return np.array(x.astype(mx.float32)) if x.dtype != mx.bool_ else np.array(x)


def _rel_err(got, want):
    got, want = _np(got) if isinstance(got, mx.array) else got, np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    fin = np.isfinite(want)
    # -inf lse rows must be -inf exactly.
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "mismatched -inf pattern"
    if not fin.any():
        return 0.0
    diff = np.abs(got[fin].astype(np.float64) - want[fin])
    return float(diff.max() / max(np.abs(want[fin]).max(), 1e-6)) if diff.size else 0.0


def _materialised(q, k, v, options, dtype):
    """Plain attention in `dtype`: the logits (features applied in fp32) are
    rounded to dtype, softmax and both products run in dtype."""
    spec, inputs = validate_attention(q, k, v, **options)
    s, keep = mlx_reference.attention_logits(q, k, spec, inputs)
    s = mx.where(keep, s.astype(dtype), mx.array(-mx.inf, dtype=dtype))
    if inputs.sinks is not None:
        sink = mx.broadcast_to(inputs.sinks[None, :, None, None].astype(dtype), s.shape[:3] + (1,))
        s = mx.concatenate([s, sink], axis=-1)
    p = mx.softmax(s, axis=-1)
    p = mx.where(mx.isnan(p), mx.array(0.0, dtype=dtype), p)
    if inputs.sinks is not None:
        p = p[..., :-1]
    vv = v if spec.group_size == 1 else mx.repeat(v, spec.group_size, axis=1)
    return p.astype(dtype) @ vv


def _materialised_grads(q, k, v, dout, options, dtype):
    def loss(q, k, v):
        return mx.sum(_materialised(q, k, v, options, dtype).astype(mx.float32) * dout.astype(mx.float32))

    return dict(zip("qkv", mx.grad(loss, argnums=(0, 1, 2))(q, k, v)))


def _check(name, got, want, dtype, baseline=None):
    err = _rel_err(got, want)
    if dtype == mx.float32:
        assert err <= FP32_TOL, f"{name}: relative error {err:.2e} > {FP32_TOL:.0e}"
    else:
        bound = ULP[dtype]
        if baseline is not None:
            bound = max(bound, 2 * _rel_err(baseline, want))
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.2e} ({dtype})"


def _reduce_to(full, shape):
    """Sum a [B, H, Nq, Nk] gradient down to a broadcast mask's shape."""
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(a for a in range(4) if shape4[a] == 1 and full.shape[a] != 1)
    return full.sum(axis=axes, keepdims=True).reshape(shape)


# (id, dtype, B, Hq, Hkv, Nq, Nk, Dqk, Dv, options-builder, extra wrt)
def _bool_mask(rng, shape, p=0.7):
    return mx.array(rng.random(shape) < p)


CASES = [
    ("plain-fp32-d64", mx.float32, 1, 2, 2, 17, 33, 64, 64, lambda r, s: {}, ()),
    ("plain-fp16-d64", mx.float16, 1, 2, 2, 33, 17, 64, 64, lambda r, s: {}, ()),
    ("plain-bf16-d64", mx.bfloat16, 2, 1, 1, 40, 40, 64, 64, lambda r, s: {}, ()),
    ("d8-fp32", mx.float32, 1, 2, 2, 70, 65, 8, 8, lambda r, s: {}, ()),
    ("d40-fp32", mx.float32, 1, 1, 1, 29, 51, 40, 40, lambda r, s: {}, ()),
    ("d80-fp16", mx.float16, 1, 1, 1, 37, 23, 80, 80, lambda r, s: {}, ()),
    ("d96-bf16", mx.bfloat16, 1, 1, 1, 21, 30, 96, 96, lambda r, s: {}, ()),
    ("d128-fp32", mx.float32, 1, 1, 1, 33, 45, 128, 128, lambda r, s: {}, ()),
    ("d256-fp32", mx.float32, 1, 1, 1, 11, 20, 256, 256, lambda r, s: {}, ()),
    ("d256-fp16-dv40", mx.float16, 1, 1, 1, 9, 18, 256, 40, lambda r, s: {}, ()),
    ("dqk40-dv24", mx.float32, 1, 2, 1, 19, 27, 40, 24, lambda r, s: {}, ()),
    ("dqk3-dv5", mx.float32, 1, 1, 1, 13, 9, 3, 5, lambda r, s: {}, ()),
    ("n1", mx.float32, 1, 1, 1, 1, 1, 16, 16, lambda r, s: {}, ()),
    ("causal-nq<nk", mx.float32, 1, 2, 2, 20, 50, 32, 32, lambda r, s: {"causal": True}, ()),
    ("causal-nq>nk", mx.float32, 1, 1, 1, 45, 20, 32, 32, lambda r, s: {"causal": True}, ()),
    ("window", mx.float32, 1, 1, 1, 60, 60, 32, 32, lambda r, s: {"window": (7, 3)}, ()),
    ("window-left-causal", mx.float16, 1, 1, 1, 50, 70, 48, 48,
     lambda r, s: {"window": (10, None), "causal": True}, ()),
    ("bool-mask-2d", mx.float32, 1, 2, 2, 23, 31, 32, 32,
     lambda r, s: {"mask": _bool_mask(r, (23, 31))}, ()),
    ("bool-mask-rows-empty", mx.float32, 2, 1, 1, 9, 12, 16, 16,
     lambda r, s: {"mask": mx.array(np.repeat(r.random((2, 1, 9, 1)) < 0.6, 12, axis=3))}, ()),
    ("additive-mask", mx.float32, 2, 2, 2, 17, 26, 24, 24,
     lambda r, s: {"mask": _rand(r, (2, 1, 17, 26), mx.float32)}, ("mask",)),
    ("additive-mask-fp16", mx.float16, 1, 2, 2, 17, 20, 32, 32,
     lambda r, s: {"mask": _rand(r, (1, 2, 1, 20), mx.float16)}, ()),
    ("softcap", mx.float32, 1, 1, 1, 30, 30, 32, 32, lambda r, s: {"softcap": 2.0, "scale": 1.0}, ()),
    ("alibi-h", mx.float32, 1, 2, 2, 25, 35, 32, 32,
     lambda r, s: {"alibi_slopes": mx.array([0.25, 0.0625])}, ()),
    ("alibi-bh-causal", mx.bfloat16, 2, 2, 1, 19, 19, 32, 32,
     lambda r, s: {"alibi_slopes": mx.array(r.random((2, 2)).astype(np.float32)), "causal": True}, ()),
    ("sinks", mx.float32, 1, 2, 2, 21, 29, 32, 32,
     lambda r, s: {"sinks": mx.array([0.5, -1.0])}, ("sinks",)),
    ("sinks-masked-rows", mx.float32, 1, 2, 2, 30, 10, 16, 16,
     lambda r, s: {"sinks": mx.array([1.5, 0.0]), "causal": True}, ("sinks",)),
    ("block-mask", mx.float32, 1, 2, 2, 40, 50, 32, 32,
     lambda r, s: {"block_mask": _bool_mask(r, (1, 2, 3, 7), 0.5), "block_size": (16, 8)}, ()),
    ("block-mask-causal", mx.float16, 1, 1, 1, 64, 64, 64, 64,
     lambda r, s: {"block_mask": mx.array(np.tril(np.ones((2, 2), bool))), "block_size": (32, 32),
                   "causal": True}, ()),
    ("gqa-4-2", mx.float32, 1, 4, 2, 20, 24, 32, 32, lambda r, s: {}, ()),
    ("mqa-3-1", mx.float16, 1, 3, 1, 18, 33, 40, 40, lambda r, s: {"causal": True}, ()),
    ("combo-causal-softcap-alibi-sinks-gqa", mx.float16, 1, 4, 2, 27, 41, 64, 64,
     lambda r, s: {"causal": True, "softcap": 5.0, "alibi_slopes": mx.array([0.1, 0.2, 0.3, 0.4]),
                   "sinks": mx.array([0.0, 1.0, -1.0, 2.0])}, ()),
    ("combo-window-mask-blocks", mx.bfloat16, 1, 2, 2, 48, 56, 32, 32,
     lambda r, s: {"window": (12, 12), "mask": _bool_mask(r, (1, 2, 48, 56), 0.8),
                   "block_mask": _bool_mask(r, (2, 1, 2, 4), 0.6)[:1], "block_size": (32, 16)}, ()),
    ("combo-additive-softcap-window", mx.float32, 1, 2, 1, 33, 47, 80, 80,
     lambda r, s: {"mask": _rand(r, (33, 47), mx.float32), "softcap": 3.0, "window": (None, 5)}, ()),
    ("decode-q1", mx.float32, 1, 2, 2, 1, 130, 64, 64, lambda r, s: {}, ()),
    ("decode-q4-causal-sinks", mx.float16, 1, 2, 2, 4, 100, 64, 64,
     lambda r, s: {"causal": True, "sinks": mx.array([0.3, -0.2])}, ()),
    ("decode-gqa-window-bf16", mx.bfloat16, 2, 4, 1, 2, 90, 128, 128,
     lambda r, s: {"window": (40, 0)}, ()),
    ("decode-gqa-packed-mask-alibi-sinks-causal", mx.float32, 1, 6, 2, 3, 100, 40, 40,
     lambda r, s: {"mask": _bool_mask(r, (1, 6, 3, 100), 0.8), "alibi_slopes": mx.array(r.random(6).astype(np.float32)),
                   "sinks": mx.array(r.standard_normal(6).astype(np.float32)), "causal": True, "softcap": 6.0},
     ("sinks",)),
    ("decode-gqa-additive-fp16", mx.float16, 2, 8, 2, 1, 77, 64, 32,
     lambda r, s: {"mask": _rand(r, (2, 8, 1, 77), mx.float16)}, ()),
    ("decode-gqa-block-mask-unpacked", mx.float32, 1, 4, 2, 5, 120, 32, 32,
     lambda r, s: {"block_mask": _bool_mask(r, (1, 4, 1, 8), 0.6), "block_size": (8, 16)}, ()),
    ("decode-q8-alibi-mask", mx.float32, 1, 1, 1, 8, 129, 96, 96,
     lambda r, s: {"alibi_slopes": mx.array([0.05]), "mask": _bool_mask(r, (8, 129), 0.9)}, ()),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_metal_attention_matrix(case):
    name, dtype, B, Hq, Hkv, Nq, Nk, Dqk, Dv, build, extra_wrt = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q = _rand(rng, (B, Hq, Nq, Dqk), dtype)
    k = _rand(rng, (B, Hkv, Nk, Dqk), dtype)
    v = _rand(rng, (B, Hkv, Nk, Dv), dtype)
    dout = _rand(rng, (B, Hq, Nq, Dv), dtype)
    options = build(rng, None)
    emu = _emu()

    out, lse = emu.forward(q, k, v, **options)
    np_opts = {n: o for n, o in options.items()}
    ref = reference_np.attention_np(q, k, v, dout=dout, **np_opts)
    lowp = dtype != mx.float32
    base_out = _materialised(q, k, v, options, dtype) if lowp else None
    _check(f"{name} out", out, ref["out"], dtype, base_out)
    # lse is computed in fp32 from the (exact) low-precision inputs.
    _check(f"{name} lse", lse, ref["lse"], mx.float32)

    wrt = ("q", "k", "v") + tuple(extra_wrt)
    grads = emu.gradients(q, k, v, dout, wrt=wrt, **options)
    base = _materialised_grads(q, k, v, dout, options, dtype) if lowp else {}
    for n in ("q", "k", "v"):
        _check(f"{name} d{n}", grads[n], ref[f"d{n}"], dtype, base.get(n))
    if "sinks" in extra_wrt:
        _check(f"{name} dsinks", grads["sinks"], ref["dsinks"], mx.float32)
    if "mask" in extra_wrt:
        _check(f"{name} dmask", grads["mask"], _reduce_to(ref["dmask_full"], options["mask"].shape), mx.float32)


VARLEN_CASES = [
    ("varlen-plain", [0, 5, 20, 31], [0, 9, 17, 40], {}),
    ("varlen-causal-gqa-alibi", [0, 12, 13, 40], [0, 30, 31, 55],
     {"causal": True, "alibi_slopes": mx.array([[0.1, 0.2], [0.3, 0.4], [0.0, 0.5]])}),
    ("varlen-empty-seq-sinks-window", [0, 7, 7, 26], [0, 5, 11, 30],
     {"window": (4, 2), "sinks": mx.array([0.2, -0.4])}),
    ("varlen-decode", [0, 1, 3], [0, 70, 140], {"softcap": 4.0}),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_metal_attention_varlen(case):
    name, cu_q, cu_k, options = case
    rng = np.random.default_rng(len(name))
    Hq, Hkv, D = 2, (1 if "gqa" in name else 2), 24
    q = _rand(rng, (cu_q[-1], Hq, D), mx.float32)
    k = _rand(rng, (cu_k[-1], Hkv, D), mx.float32)
    v = _rand(rng, (cu_k[-1], Hkv, D), mx.float32)
    dout = _rand(rng, (cu_q[-1], Hq, D), mx.float32)
    cu = (mx.array(cu_q, dtype=mx.int32), mx.array(cu_k, dtype=mx.int32))
    emu = _emu()
    out, lse = emu.forward(q, k, v, varlen=cu, **options)
    ref = reference_np.attention_varlen_np(q, k, v, cu_q, cu_k, dout=dout, **options)
    _check(f"{name} out", out, ref["out"], mx.float32)
    _check(f"{name} lse", lse, ref["lse"], mx.float32)
    wrt = ("q", "k", "v") + (("sinks",) if "sinks" in options else ())
    grads = emu.gradients(q, k, v, dout, varlen=cu, wrt=wrt, **options)
    for n in ("q", "k", "v"):
        _check(f"{name} d{n}", grads[n], ref[f"d{n}"], mx.float32)
    if "sinks" in options:
        _check(f"{name} dsinks", grads["sinks"], ref["dsinks"], mx.float32)


def test_metal_attention_dlse():
    """A cotangent on lse enters delta (dO . O - dlse)."""
    rng = np.random.default_rng(7)
    q, k, v = (_rand(rng, (1, 2, 19, 32), mx.float32) for _ in range(3))
    dout = _rand(rng, (1, 2, 19, 32), mx.float32)
    dlse = _rand(rng, (1, 2, 19), mx.float32)
    grads = _emu().gradients(q, k, v, dout, dlse=dlse, causal=True)
    ref = reference_np.attention_np(q, k, v, dout=dout, dlse=dlse, causal=True)
    for n in ("q", "k", "v"):
        _check(f"dlse d{n}", grads[n], ref[f"d{n}"], mx.float32)


def test_metal_decode_launches():
    """Few query rows take the split-key decode path; GQA packs the group's heads."""
    from mlx_flash.backends import metal

    def launch(B, Hq, Hkv, Nq, Nk, cores=metal.DEFAULT_GPU_CORES, **options):
        q, k = mx.zeros((B, Hq, Nq, 64)), mx.zeros((B, Hkv, Nk, 64))
        spec, _ = validate_attention(q, k, k, **options)
        return metal._forward_launch(spec, metal.tile_sizes(64, 64, 4), cores)

    # The split count follows the GPU's core count: about 4 threadgroups per core.
    small, big = launch(1, 2, 2, 1, 4096, cores=8), launch(1, 2, 2, 1, 4096, cores=32)
    assert small.splits * 2 >= 4 * 8 and big.splits > small.splits
    assert metal.gpu_core_count() >= 1

    assert launch(1, 8, 8, 100, 1000).splits == 1
    dec = launch(1, 8, 2, 1, 1000)
    assert dec.splits > 1 and dec.pack_gqa and dec.rows == 4 and dec.heads == 2
    assert not launch(1, 8, 2, 1, 1000, block_mask=mx.ones((1, 1), mx.bool_), block_size=(1, 1000)).pack_gqa


def test_metal_tile_sizes_fit_threadgroup_memory():
    """Every head-dim pair and dtype gets tiles within 32 KiB of threadgroup memory."""
    from mlx_flash.backends import metal

    for itemsize in (2, 4):
        for dqk in range(1, 257, 7):
            for dv in (dqk, 1, 256):
                t = metal.tile_sizes(dqk, dv, itemsize)
                ld = lambda d: -(-d // 8) * 8 + 16 // itemsize
                assert metal.fwd_tg_bytes(dqk, dv, 4, t.fwd_bk, itemsize) <= 32768
                for nsg in (1, 2, 3):  # decode: 1 simdgroup, or packed GQA rows
                    assert metal.fwd_tg_bytes(dqk, dv, nsg, t.fwd_bk, itemsize) <= 32768
                assert t.dq_bk * (ld(dqk) + ld(dv)) * itemsize <= 32768
                assert t.dkdv_bq * (ld(dqk) + ld(dv)) * itemsize + 8 * t.dkdv_bq <= 32768


def test_metal_tile_sizes_match_header():
    """metal.py's tile table is the one the MSL headers compute (attention.metal uses the latter)."""
    from metal_emu import harness

    from mlx_flash.backends import metal

    kernel = harness.metal_kernel(
        name="mlxf_tile_sizes", input_names=["unused"], output_names=["tiles"], header=metal.header_text(),
        source=("tiles[0] = mlxf::fwd_block_k(DQK, DV, SIZE);\n"
                "tiles[1] = mlxf::dq_block_k(DQK, DV, SIZE);\n"
                "tiles[2] = mlxf::dkdv_block_q(DQK, DV, SIZE);\n"
                "(void)unused;\n"),
    )
    for dqk, dv, size in ((8, 8, 4), (24, 40, 4), (64, 64, 4), (128, 128, 4), (256, 256, 4),
                          (64, 64, 2), (96, 24, 2), (128, 128, 2), (192, 192, 2), (256, 256, 2),
                          (576, 512, 4), (576, 512, 2), (320, 256, 4), (300, 257, 2), (64, 512, 4)):
        (got,) = kernel(inputs=[mx.zeros((8,))], template=[("DQK", dqk), ("DV", dv), ("SIZE", size)],
                        grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(3,)], output_dtypes=[mx.int32])
        t = metal.tile_sizes(dqk, dv, size)
        assert got.tolist() == [t.fwd_bk, t.dq_bk, t.dkdv_bq], (dqk, dv, size)


def test_metallib_entry_points_compile_under_emulation():
    """attention.metal (the metallib's [[kernel]] instantiations of the same
    templates, every dtype x head dim x mask type) type-checks against the MSL
    emulation. Apple's compiler is not available here: this catches template
    and signature mistakes, not Metal-only restrictions."""
    import os
    import subprocess

    from metal_emu import harness

    from mlx_flash import _sources

    src = _sources.metal_source("attention.metal")
    for name in ("attention_common.h", "attention_fwd.h", "attention_bwd.h"):
        src = src.replace(f'#include "{name}"', _sources.metal_source(name))
    # MLX's utils.h only supplies bfloat16_t here; the emulation preamble has it.
    src = src.replace('#include "mlx/backend/metal/kernels/utils.h"', "")
    clang, _ = harness._toolchain()
    include = os.path.join(os.path.dirname(harness.__file__), "include")
    proc = subprocess.run(
        [clang, "-std=c++20", "-fsyntax-only", "-Wno-unknown-attributes", "-Wno-ignored-attributes",
         "-I", include, "-x", "c++", "-"],
        input=harness.translation_unit(src), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[:4000]


@pytest.mark.parametrize("nq, nk", [(0, 5), (5, 0), (0, 0)])
def test_metal_attention_empty_sequences(nq, nk):
    """No queries or no keys: empty or zero outputs, lse = sink (or -inf), zero grads."""
    rng = np.random.default_rng(nq * 10 + nk)
    q, k, v = _rand(rng, (1, 2, nq, 8), mx.float32), _rand(rng, (1, 2, nk, 8), mx.float32), _rand(rng, (1, 2, nk, 8), mx.float32)
    sinks = mx.array([0.5, -1.0])
    out, lse = _emu().forward(q, k, v, sinks=sinks)
    assert out.shape == (1, 2, nq, 8) and lse.shape == (1, 2, nq)
    assert np.all(_np(out) == 0) and np.allclose(_np(lse), np.broadcast_to(np.array([0.5, -1.0])[None, :, None], (1, 2, nq)))
    grads = _emu().gradients(q, k, v, _rand(rng, (1, 2, nq, 8), mx.float32), sinks=sinks)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert grads[name].shape == x.shape and np.all(_np(grads[name]) == 0)


# ---- the non-finite contract (docs/metal.md; issue 13) through the Metal kernels ----
def _nonfinite_forward_np(q, k, v, keep, scale, additive=None):
    """float64 (out, lse) of the non-finite contract's rules 1-5 for one head:
    `keep` [Nq, Nk] is the structural keep pattern; kept logits follow IEEE
    arithmetic, -inf logits are dropped, dropped keys are never read."""
    with np.errstate(all="ignore"):
        s = scale * np.einsum("id,jd->ij", q, k)
        if additive is not None:
            s = s + additive
    nq, dv = q.shape[0], v.shape[1]
    out, lse = np.zeros((nq, dv)), np.full(nq, -np.inf)
    for i in range(nq):
        kept = keep[i] & ~np.isneginf(s[i]) & ~(np.isnan(s[i]) & ~keep[i])
        if not kept.any():
            continue
        si = s[i, kept]
        if np.isnan(si).any() or np.isposinf(si).any():
            out[i], lse[i] = np.nan, np.nan
            continue
        m = si.max()
        p = np.exp(si - m)
        with np.errstate(all="ignore"):
            out[i] = (p[:, None] * v[kept]).sum(0) / p.sum()
        lse[i] = m + np.log(p.sum())
    return out, lse


def _check_nonfinite(got, want, what):
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN pattern differs"
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), f"{what}: infinities differ"
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all(), f"{what}: unexpected non-finite values"
    if fin.any():
        err = np.abs(got[fin] - want[fin]).max() / max(np.abs(want[fin]).max(), 0.1)
        assert err <= FP32_TOL, f"{what}: relative error {err:.2e}"


NONFINITE_CASES = ["causal", "bool-mask", "additive-inf", "window-decode", "sinks-nan"]


@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_metal_forward_nonfinite_contract(case):
    """NaN/inf in q, k, v and the mask: dropped keys contribute nothing (no
    0 x NaN), kept NaN/+inf logits make the row NaN, -inf logits are dropped
    keys, fully masked rows stay 0 / -inf even with a NaN q row."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    nq, nk, d = (1, 150, 32) if case == "window-decode" else (21, 37, 32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    k = rng.standard_normal((nk, d)).astype(np.float32)
    v = rng.standard_normal((nk, d)).astype(np.float32)
    pos = np.arange(nq)[:, None] + nk - nq
    j = np.arange(nk)[None, :]
    options, additive = {}, None
    if case == "causal":
        options["causal"] = True
        keep = j <= pos
        k[nk - 1, 3] = np.nan   # dropped by every row but the last
        v[nk - 2, 5] = np.inf   # kept only by the last two rows
        v[nk - 3, :] = np.nan   # kept by the last three rows
        q[4, 0] = np.nan        # a row with kept keys: NaN
        k[2, 7] = -np.inf       # -inf or +inf logits depending on q's sign
    elif case == "bool-mask":
        keep = rng.random((nq, nk)) < 0.6
        keep[6] = False
        q[6, :] = np.nan        # fully masked row with a NaN q: still 0 / -inf
        dropped = np.nonzero(~keep[0])[0]
        v[dropped[0]] = np.nan  # dropped by row 0, maybe kept by others
        k[dropped[1]] = np.inf
        options["mask"] = mx.array(keep)
    elif case == "additive-inf":
        keep = np.ones((nq, nk), bool)
        additive = rng.standard_normal((nq, nk)).astype(np.float32)
        additive[:, 9] = -np.inf
        v[9] = np.nan           # dropped by the -inf logit (rule 3)
        additive[3, :] = -np.inf  # a fully dropped row
        additive[5, 11] = np.nan
        additive[7, 12] = np.inf
        options["mask"] = mx.array(additive)
    elif case == "window-decode":
        options["window"] = (60, 0)
        keep = (j <= pos) & (j >= pos - 60)
        v[:nk - 61] = np.nan    # every key left of the window holds NaN
        k[:nk - 61] = np.inf
        v[nk - 61:nk - 55, 2] = 1e30  # large but finite, kept
        v[nk - 10, 4] = np.nan        # kept: column 4 of the output is NaN, the rest finite
    else:  # sinks-nan
        keep = np.ones((nq, nk), bool)
        options["sinks"] = mx.array([np.nan])
        options["causal"] = True
        keep = j <= pos
    scale = 1 / np.sqrt(d)
    if case == "sinks-nan":
        want_out, want_lse = np.full((nq, d), np.nan), np.full(nq, np.nan)
    else:
        want_out, want_lse = _nonfinite_forward_np(q.astype(np.float64), k.astype(np.float64),
                                                   v.astype(np.float64), keep, scale, additive)
    to = lambda x: mx.array(x)[None, None]
    out, lse = _emu().forward(to(q), to(k), to(v), **options)
    _check_nonfinite(_np(out)[0, 0], want_out, f"{case} out")
    _check_nonfinite(_np(lse)[0, 0], want_lse, f"{case} lse")


# ---- resource table (tools/metal_resources.py, docs/metal.md) ----
def test_metal_resources_within_limits():
    """Every shipped configuration (dtype x head dims x the tiles the wrappers
    pick; forward, decode, backward, matmul) stays within 32 KiB of
    threadgroup memory and 96 fp32 fragment registers per thread, counted
    from the kernels' own constexprs."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "metal_resources.py"
    spec = importlib.util.spec_from_file_location("metal_resources", path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("metal_resources", tool)  # dataclasses look their module up
    spec.loader.exec_module(tool)
    rows = tool.evaluate(tool.configurations())
    assert len(rows) > 100 and {r.kernel for r in rows} >= {"forward", "decode", "bwd_dq", "bwd_dkdv", "matmul2d"}
    assert all(r.tg_bytes > 0 and r.regs > 0 for r in rows if r.kernel != "bwd_delta")
    over = [(r.kernel, r.dtype, r.dqk, r.dv, r.tg_bytes, r.regs) for r in tool.violations(rows)]
    assert not over, f"over {tool.TG_LIMIT} threadgroup bytes or {tool.REG_LIMIT} fragment floats: {over}"


def _nonfinite_grads_np(q, k, v, dout, keep, scale):
    """float64 dq, dk, dv of sum(out * dout) under the contract: dropped pairs
    (structural, or rows with no kept key) contribute nothing, whatever
    q, k, v, dO hold; kept pairs follow IEEE arithmetic."""
    with np.errstate(all="ignore"):
        s = np.where(keep, scale * np.einsum("id,jd->ij", q, k), -np.inf)
        m = np.where(keep.any(1, keepdims=True), s.max(1, keepdims=True), 0.0)
        p = np.where(keep, np.exp(s - m), 0.0)
        p = np.where(keep.any(1, keepdims=True), p / p.sum(1, keepdims=True), 0.0)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        out = np.zeros((q.shape[0], v.shape[1]))
        for i in range(q.shape[0]):
            kept = keep[i]
            if kept.any():
                out[i] = (p[i, kept][:, None] * v[kept]).sum(0)
        for i in range(q.shape[0]):
            for j in np.nonzero(keep[i])[0]:
                dv[j] += p[i, j] * dout[i]
                dp = dout[i] @ v[j]
                delta = dout[i] @ out[i]
                ds = p[i, j] * (dp - delta)
                dq[i] += scale * ds * k[j]
                dk[j] += scale * ds * q[i]
    return dq, dk, dv


# 256 (fp32): dK/dV in two D blocks, K/V read from device memory. 576/512
# (fp32): dQ in three column blocks, V (dQ) and dO (dK/dV) read from device
# memory, so the exact paths read their operand there.
@pytest.mark.parametrize("d, dv", [(16, 16), (256, 256), (576, 512)])
def test_metal_backward_nonfinite_contract(d, dv):
    """A NaN/inf in q, k, v or dO of dropped pairs adds nothing to dq/dk/dv
    (no 0 x NaN in the backward's products); a fully masked row's gradients
    stay 0 even with a NaN q and dO."""
    rng = np.random.default_rng(7 + d)
    nq, nk = 21, 37
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32)
                     for shape in ((nq, d), (nk, d), (nk, dv), (nq, dv)))
    keep = rng.random((nq, nk)) < 0.6
    keep[:, nk - 1] = False      # a key nobody keeps
    k[nk - 1] = np.nan
    v[nk - 1] = np.inf
    keep[5] = False              # a row that keeps nothing
    q[5] = np.nan
    dout[5] = np.nan
    keep[13] = False             # another, with a finite q: only its dO row is NaN
    dout[13] = np.nan
    scale = 1 / np.sqrt(d)
    want = _nonfinite_grads_np(*(x.astype(np.float64) for x in (q, k, v, dout)), keep, scale)
    to = lambda x: mx.array(x)[None, None]
    grads = _emu().gradients(to(q), to(k), to(v), to(dout), mask=mx.array(keep))
    for name, w in zip("qkv", want):
        _check_nonfinite(_np(grads[name])[0, 0], w, f"d{name}")
