"""A model of Hopper's fp8 wgmma accumulation, fitted to the card's own
results (tools/fp8_accum_dump.py's npz), offline:

    python tools/fp8_accum_model.py DUMP.npz

Model (one k32 wgmma, per output): the 32 products (exact: e4m3 x e4m3 needs
8 significant bits) and the running accumulator are aligned to the largest
exponent among them, each cut to BITS fraction bits below that exponent
(toward zero), and summed exactly; the accumulator keeps the sum (it fits
fp32). DeepSeek-V3's report ("around 14 bits") and SageAttention2 (a 13-bit
mantissa) describe this; which BITS, and whether the accumulator itself is
cut, is what the fit tells. Promotion (the kernels' PROMOTE, in stages of
128 K = 4 instructions; PROMOTE < 0: every -PROMOTE instructions) restarts
the accumulator and adds it to fp32 sums with round-to-nearest float32 adds,
as the kernels do.
"""

from __future__ import annotations

import sys

import numpy as np


def _decode_e4m3():
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val


E4M3 = _decode_e4m3()


def decode(codes, fmt):
    """float64 values of fp8 codes ("e4m3" here; "e5m2" from mlx_flash.fp8)."""
    if fmt == "e4m3":
        return E4M3[codes]
    from mlx_flash import fp8

    return fp8.decode_table(fmt).astype(np.float64)[codes]


def _cut(x, ulp):
    """x toward zero to a multiple of ulp (elementwise, float64 exact)."""
    return np.trunc(x / ulp) * ulp


def wgmma_k32(acc, prods, bits, cut_acc=True):
    """One instruction: acc [M, N] float64 (values of fp32), prods [M, N, 32]."""
    terms_max = np.maximum(np.abs(prods).max(axis=2), np.abs(acc))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(terms_max > 0, terms_max, 1.0)))
    ulp = 2.0 ** (e - bits)
    s = _cut(prods, ulp[..., None]).sum(axis=2)
    return s + (_cut(acc, ulp) if cut_acc else acc)


def native(a_codes, b_codes, promote, bits, cut_acc=True, a_fmt="e4m3", b_fmt="e4m3"):
    """out [M, N] float32 of the native route's model: a [M, K], b [N, K] codes."""
    a, b = decode(a_codes, a_fmt), decode(b_codes, b_fmt)
    M, K = a.shape
    N = b.shape[0]
    # The kernels run whole stages of 128 K (4 instructions), zeros past K:
    # those instructions still align (and may cut) the accumulator.
    pad = -K % 128
    a, b = np.pad(a, ((0, 0), (0, pad))), np.pad(b, ((0, 0), (0, pad)))
    inst = (K + pad) // 32
    per = promote * 4 if promote > 0 else (-promote if promote < 0 else inst)  # instructions per interval
    total = np.zeros((M, N), np.float32)
    d = np.zeros((M, N))
    for i in range(inst):
        if i % per == 0:
            d = np.zeros((M, N))
        ka, kb = a[:, 32 * i:32 * i + 32], b[:, 32 * i:32 * i + 32]
        prods = ka[:, None, :] * kb[None, :, :]
        d = wgmma_k32(d, prods, bits, cut_acc).astype(np.float32).astype(np.float64)
        if i % per == per - 1 or i == inst - 1:
            total = (total + d.astype(np.float32)).astype(np.float32)
    return total


def fit(path):
    z = np.load(path)
    for dist in ("normal", "positive"):
        a, b = z[f"{dist}_a"], z[f"{dist}_b"]
        ref = E4M3[a] @ E4M3[b].T
        for promote in (0, 1, 2):
            key = f"{dist}_native_promote{promote}"
            if key not in z:
                continue
            card = z[key].astype(np.float64)
            print(f"{dist} promote {promote}: card rel_err {np.abs(card - ref).max() / np.abs(ref).max():.3e}")
            for bits in range(10, 17):
                for cut_acc in (True, False):
                    model = native(a, b, promote, bits, cut_acc).astype(np.float64)
                    same = np.mean(model == card)
                    print(f"  bits {bits} cut_acc {int(cut_acc)}: identical {same:.4f}, max |model - card| / max|ref| "
                          f"{np.abs(model - card).max() / np.abs(ref).max():.2e}, model rel_err "
                          f"{np.abs(model - ref).max() / np.abs(ref).max():.3e}")
        for name in ("scaled_mm_fast0", "scaled_mm_fast1", "exact"):
            key = f"{dist}_{name}"
            if key in z:
                print(f"{dist} {name}: rel_err {np.abs(z[key] - ref).max() / np.abs(ref).max():.3e}")


if __name__ == "__main__":
    fit(sys.argv[1])
