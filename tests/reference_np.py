"""Float64 NumPy reference of the attention contract (ARCHITECTURE.md), forward and backward.

Independent of the package's own MLX reference: it reads the raw user
arguments, so a bug in argument normalisation shows up too.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
    import mlx.core as mx

    if isinstance(x, mx.array):
        x = np.array(x.astype(mx.float32)) if x.dtype != mx.bool_ else np.array(x)
    return np.asarray(x).astype(np.float64) if np.asarray(x).dtype != np.bool_ else np.asarray(x)


def _broadcast4(x, shape):
    x = np.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return np.broadcast_to(x, shape)


def kept_matmul(kept, a, b):
    """sum_j a[..., i, j] * b[..., j, d] over the kept pairs (i, j) only.

    IEEE per element for kept pairs (a kept zero times a NaN or inf in b is
    NaN); a dropped pair contributes nothing whatever a or b hold (the
    contract's rule 1), which a plain matmul over a zeroed `a` would break
    (0 * NaN = NaN). The finite case is one matmul; otherwise the finite part
    of b goes through the matmul and the non-finite entries are classified by
    counting matmuls of 0/1 indicators.
    """
    a = np.where(kept, a, 0.0)
    if np.isfinite(b).all():
        return a @ b
    base = a @ np.where(np.isfinite(b), b, 0.0)
    ind = lambda x: x.astype(np.float64)
    bad_b = ~np.isfinite(b)
    nan = ind(kept & np.isnan(a)) @ ind(bad_b) + ind(kept) @ ind(np.isnan(b)) + ind(kept & (a == 0)) @ ind(np.isinf(b))
    pos = ind(kept & (a > 0)) @ ind(b == np.inf) + ind(kept & (a < 0)) @ ind(b == -np.inf)
    neg = ind(kept & (a > 0)) @ ind(b == -np.inf) + ind(kept & (a < 0)) @ ind(b == np.inf)
    term = np.where((nan > 0) | ((pos > 0) & (neg > 0)), np.nan, np.where(pos > 0, np.inf, np.where(neg > 0, -np.inf, 0.0)))
    return base + term


def attention_np(q, k, v, *, scale=None, mask=None, causal=False, window=None, softcap=None,
                 alibi_slopes=None, sinks=None, block_mask=None, block_size=(64, 64), key_start=None,
                 key_len=None, dout=None, dlse=None):
    """Returns dict with out, lse and, if dout is given, dq, dk, dv, dsinks, dmask (float64).

    Non-finite values follow the contract (ARCHITECTURE.md, issue 13): a
    structurally dropped key and a -inf logit contribute nothing to a row,
    forward or backward, whatever its k, v (or the row's q, dO) hold; a NaN
    or +inf among a row's kept logits (or its sink) makes the row NaN; a row
    with nothing kept is out 0, lse -inf, zero gradients.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    ke = np.repeat(k, G, axis=1)
    ve = np.repeat(v, G, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        s0 = scale * np.einsum("bhid,bhjd->bhij", q, ke)
        s = s0
        if softcap:
            t = np.tanh(s0 / softcap)
            s = softcap * t
        p_pos = (np.arange(Nq) + Nk - Nq)[:, None]
        j = np.arange(Nk)[None, :]
        if alibi_slopes is not None:
            a = _f64(alibi_slopes)
            a = np.broadcast_to(a.reshape((1,) * (2 - a.ndim) + a.shape), (B, Hq))
            s = s - a[:, :, None, None] * np.abs(p_pos - j)
        keep = np.ones((B, Hq, Nq, Nk), dtype=bool)
        if mask is not None:
            m = _f64(mask)
            if m.dtype == np.bool_:
                keep &= _broadcast4(m, keep.shape)
            else:
                s = s + _broadcast4(m, keep.shape)
    if causal:
        keep &= j <= p_pos
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep &= j >= p_pos - left
        if right is not None and right >= 0:
            keep &= j <= p_pos + right
    if block_mask is not None:
        bq, bk = block_size
        bm = _broadcast4(_f64(block_mask), (B, Hq, -(-Nq // bq), -(-Nk // bk)))
        keep &= bm[:, :, np.arange(Nq) // bq][:, :, :, np.arange(Nk) // bk]
    if key_start is not None or key_len is not None:
        start = np.zeros(B, np.int64) if key_start is None else np.asarray(key_start).astype(np.int64)
        end = Nk if key_len is None else start + np.asarray(key_len).astype(np.int64)
        end = np.broadcast_to(end, (B,))
        keep &= ((j >= start[:, None, None, None]) & (j < end[:, None, None, None]))
    keep &= s != -np.inf  # rule 3: a -inf logit is a dropped key
    s = np.where(keep, s, -np.inf)
    # Rule 4: a NaN or +inf kept logit (or sink) makes the whole row NaN.
    poisoned = (keep & (np.isnan(s) | (s == np.inf))).any(-1, keepdims=True)
    sk = None
    if sinks is not None:
        sk = _f64(sinks)[None, :, None, None]
        poisoned = poisoned | np.isnan(sk) | (sk == np.inf)
    s_ok = np.where(poisoned, -np.inf, s)
    m = s_ok.max(axis=-1, keepdims=True, initial=-np.inf)
    if sk is not None:
        m = np.maximum(m, np.where(poisoned, -np.inf, sk))
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s_ok - m)
    den = e.sum(-1, keepdims=True)
    if sk is not None:
        den = den + np.exp(np.where(poisoned, -np.inf, sk) - m)
    with np.errstate(divide="ignore"):
        lse = (np.log(den) + m)[..., 0]
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    p = np.where(poisoned & keep, np.nan, p)
    lse = np.where(poisoned[..., 0], np.nan, lse)
    with np.errstate(invalid="ignore", over="ignore"):
        out = kept_matmul(keep, p, ve)
        out = np.where(poisoned, np.nan, out)
        # "mag_*" are the same sums over absolute values: the scale that rounding
        # errors are relative to, also where the exact result cancels to ~0.
        res = {"out": out, "lse": lse, "mag_out": _finite_mag(kept_matmul(keep, p, np.abs(ve))), "keep": keep}
    if dout is None:
        return res
    do = _f64(dout)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = (do * out).sum(-1)
        if dlse is not None:
            delta = delta - _f64(dlse)
        dp = np.einsum("bhid,bhjd->bhij", do, ve)
        ds = np.where(keep, p * (dp - delta[..., None]), 0.0)  # gradient w.r.t. the final logits
        dve = kept_matmul(keep.swapaxes(-1, -2), p.swapaxes(-1, -2), do)
        ds0 = np.where(keep, ds * (1 - t**2), 0.0) if softcap else ds
        dq = scale * kept_matmul(keep, ds0, ke)
        dke = scale * kept_matmul(keep.swapaxes(-1, -2), ds0.swapaxes(-1, -2), q)
        ds_mag = np.where(keep, p * (np.abs(dp) + np.abs(delta[..., None])), 0.0)
        if softcap:
            ds_mag = np.where(keep, ds_mag * (1 - t**2), 0.0)
        mag = lambda a, b: _finite_mag(kept_matmul(keep, a, b))
        magT = lambda a, b: _finite_mag(kept_matmul(keep.swapaxes(-1, -2), a.swapaxes(-1, -2), b))
        res["mag_dq"] = scale * mag(ds_mag, np.abs(ke))
        res["mag_dk"] = (scale * magT(ds_mag, np.abs(q))).reshape(B, Hkv, G, Nk, D).sum(2)
        res["mag_dv"] = magT(p, np.abs(do)).reshape(B, Hkv, G, Nk, v.shape[-1]).sum(2)
        res["dq"] = dq
        res["dk"] = dke.reshape(B, Hkv, G, Nk, D).sum(2)
        res["dv"] = dve.reshape(B, Hkv, G, Nk, v.shape[-1]).sum(2)
        res["dmask_full"] = ds
        if sinks is not None:
            # A -inf sink is a dropped logit: it adds nothing to its gradient either.
            sink = _f64(sinks)[None, :, None]
            psink = np.exp(sink - lse)
            res["dsinks"] = -np.where(sink == -np.inf, 0.0, psink * delta).sum(axis=(0, 2))
            # delta_i = dO_i . O_i cancels; its rounding scales with the sum of
            # |dO_i| |O_i| (bf16 out, seed 325211505: dsinks judged against its
            # own cancelled value failed by 0.0178 > 0.0156, the kernels agreeing).
            delta_mag = (np.abs(do) * np.abs(out)).sum(-1)
            res["mag_dsinks"] = _finite_mag(np.where(sink == -np.inf, 0.0, psink * delta_mag)).sum(axis=(0, 2))
    return res


def _finite_mag(x):
    """Magnitude sums, with non-finite entries (where the result itself is
    non-finite) set to 0 so they do not set the error scale."""
    return np.where(np.isfinite(x), x, 0.0)


def attention_varlen_np(q, k, v, cu_q, cu_k, *, alibi_slopes=None, dout=None, dlse=None, **options):
    """Per-sequence reference for packed `[total, H, D]` inputs."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    cu_q, cu_k = [int(x) for x in np.asarray(cu_q)], [int(x) for x in np.asarray(cu_k)]
    do = None if dout is None else _f64(dout)
    dl = None if dlse is None else _f64(dlse)
    keys = ("out", "lse", "dq", "dk", "dv", "mag_out", "mag_dq", "mag_dk", "mag_dv")
    parts = {key: [] for key in keys}
    dsinks = mag_dsinks = 0.0
    for b in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        t = lambda x, s: x[s].transpose(1, 0, 2)[None]
        slopes = None
        if alibi_slopes is not None:
            a = _f64(alibi_slopes)
            slopes = a if a.ndim == 1 else a[b]
        r = attention_np(
            t(q, sq), t(k, sk), t(v, sk), alibi_slopes=slopes,
            dout=None if do is None else t(do, sq),
            dlse=None if dl is None else dl[:, sq][None], **options,
        )
        for key in keys:
            if key in r:
                x = r[key][0]
                parts[key].append(x.transpose(1, 0, 2) if x.ndim == 3 else x)
        if "dsinks" in r:
            dsinks = dsinks + r["dsinks"]
            mag_dsinks = mag_dsinks + r["mag_dsinks"]
    res = {}
    for key in keys:
        if parts[key]:
            res[key] = np.concatenate(parts[key], axis=1 if key == "lse" else 0)
    if do is not None and options.get("sinks") is not None:
        res["dsinks"] = dsinks
        res["mag_dsinks"] = mag_dsinks
    return res
