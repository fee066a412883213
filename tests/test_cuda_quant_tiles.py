"""The quantized decode's opt-in TILES 2 (cuda_quant TUNING "dec_tiles"; issue 16):
the register path takes two of a warp's interleaved 16-key tiles an iteration
as one softmax step; and LATE ("dec_late_scales"): a tile's scales stay raw
bits until staged, so no load is waited on where it is issued. Run on the CPU through the CUDA emulation against the
float64 reference (test_cuda_quant_emu.py's cases and yardsticks), and on a
CUDA GPU where there is one (skipped otherwise). TILES 1 (the default) is
main's loop; where a warp has a single tile, TILES 2 must give its bits.
"""

import mlx.core as mx
import numpy as np
import pytest

import test_cuda_quant_emu as tq
from test_cuda_quant_emu import B16, DECODE, DECODE_FEATURES, DECODE_SHAPES, F16, emulated, on_gpu

TILES = {"dec_tiles": 2}
# DECODE_SHAPES the setting takes (head dims <= 128): odd key counts, a warp's
# last pair of tiles with one or both past the split's end, GQA / MQA, two or
# three queries a row group, Dv != D, every group size, bf16, 1-8 warps.
SHAPES = [s for s in DECODE_SHAPES if max(s[5], s[6]) <= 128]
# The one-tile prefetch (dec_prefetch) then loads both next tiles during the current pair.
PREFETCH = {"dec_prefetch": True, "dec_pool": False}
LATE = {"dec_late_scales": True}
EXTRAS = {"plain": {}, "fold": {"dec_fold": True}, "prefetch_late": {**PREFETCH, **LATE}, "prefetch": PREFETCH,
          "late": LATE, "tiles1_late": {"dec_tiles": 1, **LATE}, "tiles1_prefetch_late": {"dec_tiles": 1, **PREFETCH, **LATE}}
# Variants every shape runs; the rest alternate between shapes (CI time).
EVERY = ("plain", "fold", "prefetch_late")


def _extras(bits):
    """EXTRAS a cache of `bits` takes: TILES 2 with the prefetch is 4-bit only (8-bit spills)."""
    return {n: e for n, e in EXTRAS.items() if bits == 4 or "prefetch" not in n or e.get("dec_tiles") == 1}


@emulated
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_tiles_shapes(shape):
    q, kq, vq, kd, vd, bits, gs, dtype, plan = tq._decode_case(shape)
    assert tq._uses_decode(q, kq, vq, bits, gs)
    for k, (name, extra) in enumerate(_extras(bits).items()):
        if name not in EVERY and (k + SHAPES.index(shape)) % 2:
            continue
        got = tq._emu(q, kq, vq, bits, gs, tuning={**plan, **TILES, **extra})
        tq._check_decode(q, kd, vd, got, dtype, {})


@emulated
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("feature", list(DECODE_FEATURES))
def test_decode_tiles_features(feature, bits):
    """Two queries a row group (causal bottom-right; a window that empties
    some splits and one tile of a pair), softcap, sinks (one -inf), combined."""
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 2, 211, 128
    gen, q, kq, vq, kd, vd = tq._case(("decode-tiles-feature", feature, bits), B, Hq, Hkv, Nq, Nk, D, dtype=F16,
                                      bits=bits, group_size=64)
    opts = DECODE_FEATURES[feature](gen, Hq)
    for extra in ({"dec_splits": 3}, {"dec_splits": 2, "dec_fold": True, **(PREFETCH if bits == 4 else {}), **LATE}):
        got = tq._emu(q, kq, vq, bits, 64, tuning={**DECODE, **TILES, **extra}, **opts)
        tq._check_decode(q, kd, vd, got, F16, opts)


@emulated
@pytest.mark.parametrize("extra", [{}, {"dec_fold": True}, {**PREFETCH, **LATE}, {"dec_tiles": 1, **LATE}],
                         ids=["plain", "fold", "prefetch_late", "tiles1_late"])
def test_decode_tiles_nonfinite(extra):
    """test_cuda_quant_emu's non-finite contract (NaN scales of one key reach
    exactly the rows that keep it; dropped NaN keys, the padding's stand-in
    among them, leak nowhere; a NaN sink) with two tiles an iteration."""
    tq.test_decode_nonfinite({**TILES, **extra})


@emulated
@pytest.mark.parametrize("layout", tq.LAYOUTS)
def test_decode_tiles_strided_cache_views(layout):
    """Views read in place (word by word where not dense), 4- and 8-bit."""
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 1, 90, 128
    for bits in (4, 8):
        gen, q, kq, vq, kd, vd = tq._case(("decode-tiles-strided", layout, bits), B, Hq, Hkv, Nq, Nk, D, dtype=F16,
                                          bits=bits, group_size=64)
        if layout == "batch_broadcast":
            kq, vq, kd, vd = tq._first_batch_for_all(kq, vq, kd, vd)
        kv, vv = tq._views(gen, kq, vq, layout)
        for extra in ({}, LATE):
            got = tq._emu(q, kv, vv, bits, 64, tuning={**DECODE, **TILES, "dec_splits": 2, **extra})
            tq._check_decode(q, kd, vd, got, F16, {})


@emulated
@pytest.mark.parametrize("opts", [{}, {"softcap": 2.0, "sinks": True}], ids=["plain", "softcap_sinks"])
def test_decode_tiles_one_tile_bit_identical(opts):
    """Where every warp has at most one tile (40 keys, 4 warps, one split),
    the second tile of TILES 2 is all dropped keys: out and lse are TILES 1's
    bit for bit (its zeros add nothing; the sums keep main's order)."""
    gen, q, kq, vq, kd, vd = tq._case(("decode-tiles-one",), 1, 8, 2, 1, 40, 128, dtype=F16, bits=4, group_size=64)
    if opts.get("sinks"):
        opts = {**opts, "sinks": mx.array(gen.standard_normal(8).astype(np.float32))}
    plan = {**DECODE, "dec_warps": 4, "dec_splits": 1}
    one = tq._emu(q, kq, vq, 4, 64, tuning={**plan, "dec_tiles": 1}, **opts)
    two = tq._emu(q, kq, vq, 4, 64, tuning={**plan, **TILES}, **opts)
    for name in ("out", "lse"):
        assert np.array_equal(one[name], two[name]), name
    tq._check_decode(q, kd, vd, two, F16, opts)


@emulated
@pytest.mark.parametrize("scales", [F16, tq.F32], ids=["fp16_scales", "fp32_scales"])
def test_decode_late_scales_bit_identical(scales):
    """LATE converts the same scale bits, later: out and lse are bit for bit
    those of main's conversion at load, with TILES 1 and 2 and the prefetch
    (211 keys, 3 splits: partial tiles, a pair's second tile past the end)."""
    gen, q, kq, vq, kd, vd = tq._case(("decode-late", str(scales)), 1, 8, 2, 2, 211, 128, dtype=F16, bits=4,
                                      group_size=64, scale_dtype=scales)
    opts = {"softcap": 2.0, "window": (150, 0)}
    for tiles in (1, 2):
        plan = {**DECODE, "dec_splits": 3, "dec_tiles": tiles, **PREFETCH}
        main = tq._emu(q, kq, vq, 4, 64, tuning=plan, **opts)
        late = tq._emu(q, kq, vq, 4, 64, tuning={**plan, **LATE}, **opts)
        for name in ("out", "lse"):
            assert np.array_equal(main[name], late[name]), (tiles, name)
        tq._check_decode(q, kd, vd, late, F16, opts)


def test_decode_tiles_options():
    """The launch's TILES and scale stages; 2 only where it applies (an error naming the setting elsewhere)."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant as cq

    def spec(D, bits=4):
        _, q, kq, vq, _, _ = tq._case(("decode-tiles-options", D, bits), 1, 8, 2, 1, 4096, D, dtype=F16, bits=bits)
        return validate_attention_quantized(q, kq, vq, bits=bits, group_size=64)[0]

    q128, q256 = spec(128), spec(256)
    saved = dict(cq.TUNING)
    try:
        cq.TUNING.clear()
        assert cq._DEC_TILES == 1 and cq.decode_tiles(q128, 0, 0) == 1  # not routed
        cq.decode_plan.cache_clear()
        smem1 = cq.decode_plan(q128)[2]
        cq.TUNING.update(TILES)
        assert cq.decode_tiles(q128, 0, 0) == 2
        cq.decode_plan.cache_clear()
        # One more scale stage a warp: 32 lanes x (NG + NGV) floats.
        assert cq.decode_plan(q128)[2] == smem1 + 4 * cq._DEC_WARPS * 32 * (128 // 64 + 128 // 64)
        for args in ((q128, 1, 0), (q128, 2, 0), (q128, 0, 2), (q256, 0, 0)):
            with pytest.raises(ValueError, match="dec_tiles"):
                cq.decode_tiles(*args)
        for bad in (3, 0, True, "2"):
            cq.TUNING["dec_tiles"] = bad
            with pytest.raises(ValueError, match="dec_tiles"):
                cq.decode_tiles(q128, 0, 0)
        cq.TUNING.update(dec_tiles=2, dec_keys_m=1)  # asked with KEYS_M: the error before anything is built
        cq.decode_plan.cache_clear()
        with pytest.raises(ValueError, match="dec_tiles"):
            cq.decode_plan(q128)
        _, q, kq, vq, _, _ = tq._case(("decode-tiles-options-8",), 1, 8, 2, 1, 64, 128, dtype=F16, bits=8)
        q8 = validate_attention_quantized(q, kq, vq, bits=8, group_size=64)[0]
        cq.TUNING.clear()
        cq.TUNING.update(TILES, **PREFETCH)
        assert cq.decode_tiles(q128, 0, 0) == 2
        with pytest.raises(ValueError, match="dec_prefetch"):
            cq.decode_tiles(q8, 0, 0)
        cq.TUNING.clear()
        assert cq._DEC_LATE_SCALES is False and cq.decode_late_scales() is False  # not routed
        cq.TUNING.update(LATE)
        assert cq.decode_late_scales() is True
    finally:
        cq.TUNING.clear()
        cq.TUNING.update(saved)
        cq.decode_plan.cache_clear()


@emulated
def test_decode_tiles_routing_every_bits():
    """The setting changes no route: 2-, 3-, 5- and 6-bit caches (and 8-bit
    over bf16) keep the other kernels, and 3-bit still matches the reference."""
    for bits in (2, 3, 5, 6):
        _, q, kq, vq, _, _ = tq._case(("decode-tiles-route", bits), 1, 8, 2, 1, 40, 128, dtype=F16, bits=bits)
        assert not tq._uses_decode(q, kq, vq, bits, 64)
    _, q, kq, vq, _, _ = tq._case(("decode-tiles-route-b16",), 1, 8, 2, 1, 40, 128, dtype=B16, bits=8)
    assert not tq._uses_decode(q, kq, vq, 8, 64)
    gen, q, kq, vq, kd, vd = tq._case(("decode-tiles-3bit",), 1, 8, 2, 1, 70, 128, dtype=F16, bits=3)
    got = tq._emu(q, kq, vq, 3, 64, tuning=TILES)
    tq._check_decode(q, kd, vd, got, F16, {})


# ---- on a CUDA GPU (skipped without one) ------------------------------------------

@on_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_tiles_gpu(shape):
    q, kq, vq, kd, vd, bits, gs, dtype, plan = tq._decode_case(shape)
    for extra in _extras(bits).values():
        got = tq._gpu(q, kq, vq, bits, gs, tuning={**plan, **TILES, **extra})
        tq._check_decode(q, kd, vd, got, dtype, {})


@on_gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("feature", list(DECODE_FEATURES))
def test_decode_tiles_features_gpu(feature, bits):
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 2, 3001, 128
    gen, q, kq, vq, kd, vd = tq._case(("decode-tiles-feature-gpu", feature), B, Hq, Hkv, Nq, Nk, D, dtype=F16,
                                      bits=bits, group_size=64)
    opts = DECODE_FEATURES[feature](gen, Hq)
    for extra in ({}, {"dec_fold": True}, LATE if bits == 8 else {**PREFETCH, **LATE}, {"dec_tiles": 1, **PREFETCH, **LATE}):
        got = tq._gpu(q, kq, vq, bits, 64, tuning={**TILES, **extra}, **opts)
        tq._check_decode(q, kd, vd, got, F16, opts)


@on_gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_tiles_long_context_gpu(bits):
    """Issue 16's shape (GQA 32:8, Nk 32768, D 128) with the routed plan's splits: every split merged; every
    TILES / LATE / prefetch variant."""
    B, Hq, Hkv, Nq, Nk, D = 1, 32, 8, 1, 32768, 128
    gen, q, kq, vq, kd, vd = tq._case(("decode-long-gpu",), B, Hq, Hkv, Nq, Nk, D, dtype=F16, bits=bits, group_size=64)
    for extra in _extras(bits).values():
        got = tq._gpu(q, kq, vq, bits, 64, tuning={**TILES, **extra})
        tq._check_decode(q, kd, vd, got, F16, {})
