"""Non-finite input cases of the CUDA kernels (the contract of issue 13,
ARCHITECTURE.md), shared by the emulated runs (tests/test_cuda_emu.py) and the
GPU runs (tests/test_cuda_specific.py); every case is compared with
reference_np.attention_np, which implements the contract in float64."""

import mlx.core as mx
import numpy as np

from helpers import check_close, randn, rng


def check_contract(name, got, want, dtype):
    """Rule 7: NaN where the reference is NaN, the same inf where it is inf,
    elsewhere finite and within the dtype's tolerance."""
    ref = want[name]
    got = np.asarray(got, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), (
        f"{name}: NaN at {np.argwhere(np.isnan(got) != np.isnan(ref))[:5].tolist()} (op NaN / reference NaN differ)")
    inf = np.isinf(ref)
    assert np.array_equal(got[inf], ref[inf]), f"{name}: infinities differ"
    finite = np.isfinite(ref)
    assert np.isfinite(got[finite]).all(), f"{name}: non-finite where the reference is finite"
    masked = {name: np.where(finite, ref, 0.0)}
    if "mag_" + name in want:
        masked["mag_" + name] = want["mag_" + name]
    check_close(name, np.where(finite, got, 0.0), masked, dtype)


def decode_case(case, dtype):
    """(q, k, v, options) of one named non-finite case; decode-like shapes
    (few query rows per KV head, keys split over blocks)."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 3, 700, 64
    gen = rng("cuda-emu-nonfinite", case, str(dtype))
    q, k, v = (np.array(randn(gen, s, mx.float32)) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))
    options = {}
    if case == "nan_q_row":  # row 1 of head 2 is NaN; its head-mates and the other rows are not
        q[0, 2, 1, 5] = np.nan
    elif case == "nan_k_causal":  # key 698 is seen by the last query row only (causal, Nq = 3)
        k[0, 1, 698, 0] = np.nan
        options["causal"] = True
    elif case == "nan_inf_v_past_causal":  # the last key is visible to the last row only
        v[0, 0, 699, :7] = np.nan
        v[0, 1, 699, 3] = np.inf
        options["causal"] = True
    elif case == "nan_v_bool_masked":  # keys masked out for every row hold NaN / inf
        keep = gen.random((B, Hq, Nq, Nk)) < 0.7
        keep[..., 17] = False
        keep[..., 400] = False
        v[0, :, 17, :] = np.nan
        v[0, :, 400, 9] = -np.inf
        k[0, :, 400, :] = np.nan
        options["mask"] = mx.array(keep)
    elif case == "inf_k":  # +inf logits (NaN rows) and -inf ones (dropped keys)
        k[0, 0, 123, 0] = np.inf
        v[0, 0, 123, :] = np.nan  # a -inf logit's v is never read
    elif case == "additive_nan_neginf":
        m = 0.5 * np.array(randn(gen, (B, Hq, Nq, Nk), mx.float32))
        m[0, 0, 0, 50] = np.nan
        m[..., 600:610] = -np.inf
        v[0, :, 600:610, :] = np.nan
        m[0, 3, 2, :] = -np.inf  # a row with nothing kept
        options["mask"] = mx.array(m)
    elif case == "window_nan_outside":  # NaN in q, k, v outside the window
        options["window"] = (40, 0)
        k[0, :, :600, 1] = np.nan
        v[0, :, :600, 2] = np.inf
    elif case == "sinks_nonfinite":
        options["sinks"] = mx.array([np.nan, -np.inf, np.inf, 0.5], mx.float32)
    elif case == "masked_row_nan_q_neginf_sink":  # fully masked rows stay 0 / -inf, NaN q or not
        keep = np.ones((B, Hq, Nq, Nk), bool)
        keep[0, 1] = False
        q[0, 1, 0, :] = np.nan
        v[0, :, 0, 0] = np.nan
        keep[0, :, :, 0] = False
        options["mask"] = mx.array(keep)
        options["sinks"] = mx.array([0.1, -np.inf, 0.3, 0.0], mx.float32)
    else:
        raise KeyError(case)
    return mx.array(q).astype(dtype), mx.array(k).astype(dtype), mx.array(v).astype(dtype), options


DECODE_CASES = ["nan_q_row", "nan_k_causal", "nan_inf_v_past_causal", "nan_v_bool_masked", "inf_k",
                   "additive_nan_neginf", "window_nan_outside", "sinks_nonfinite", "masked_row_nan_q_neginf_sink"]


def prefill_case(case, dtype, D=64, size="small"):
    """(q, k, v, dout, options): a prefill shape (the tensor-core forward and
    backward for fp16, the SIMT ones for float32) with one named non-finite
    input. Causal or masked partial tiles put kept and dropped pairs side by side."""
    B, Hq, Hkv = 1, 2, 1
    # small: one (partial) tile of the big-tile kernels; large: full tiles beside partial ones.
    Nq, Nk = (70, 90) if size == "small" else (300, 700)
    gen = rng("cuda-emu-nonfinite-prefill", case, str(dtype), D, size)
    q, k, v, do = (np.array(randn(gen, s, mx.float32)) for s in
                   ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, Hq, Nq, D)))
    options = {"causal": True}
    if case == "nan_q_row_causal":  # row 40 reads keys <= 60: dk/dv of later keys must stay finite
        q[0, 1, 40, 3] = np.nan
    elif case == "nan_k_causal":  # key 75 is kept by rows >= 55 only
        k[0, 0, 75, 0] = np.nan
    elif case == "nan_v_causal":
        v[0, 0, 80, 5] = np.nan
        v[0, 0, 89, :] = np.inf  # the last key: kept by the last row only
    elif case == "nan_dout_causal":
        do[0, 0, 10, 2] = np.nan
    elif case == "inf_k":
        options = {}
        k[0, 0, 33, 1] = np.inf
    elif case == "masked_rows_nan":  # rows with nothing kept stay 0 / -inf with 0 gradients, NaN q or not
        keep = gen.random((B, Hq, Nq, Nk)) < 0.6
        keep[0, 0, 5:9, :] = False
        q[0, 0, 5:9, :] = np.nan
        keep[:, :, :, 50] = False
        v[0, 0, 50, :] = np.nan
        k[0, 0, 50, :] = np.nan
        options = {"mask": mx.array(keep)}
    elif case == "additive_nan_neginf":
        m = 0.5 * np.array(randn(gen, (B, Hq, Nq, Nk), mx.float32))
        m[0, 1, 20, 30] = np.nan
        m[..., 60:64] = -np.inf  # -inf logits: v never read (a NaN k would make them NaN: IEEE)
        v[0, 0, 60:62, :] = np.inf
        v[0, 0, 62:64, :] = np.nan
        options = {"mask": mx.array(m)}
    elif case == "inf_k_softcap":  # tanh(+-inf) = +-1: finite logits, but dq meets dS = 0 times inf
        options = {"softcap": 3.0, "causal": True}
        k[0, 0, 40, 4] = np.inf
    else:
        raise KeyError(case)
    cast = lambda x: mx.array(x).astype(dtype)
    return cast(q), cast(k), cast(v), cast(do), options


PREFILL_CASES = ["nan_q_row_causal", "nan_k_causal", "nan_v_causal", "nan_dout_causal", "inf_k", "inf_k_softcap",
                 "masked_rows_nan", "additive_nan_neginf"]
