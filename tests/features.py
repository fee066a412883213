"""The feature matrix of the attention contract, as option builders.

Each builder takes (gen, B, Hq, Nq, Nk) and returns the keyword options of
one call; `FEATURES` maps a name to a builder, alone and combined.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from helpers import randn


def _bool_mask(gen, shape, keep=0.7):
    return mx.array(gen.random(shape) < keep)


def none(gen, B, H, Nq, Nk):
    return {}


def causal(gen, B, H, Nq, Nk):
    return {"causal": True}


def window_left(gen, B, H, Nq, Nk):
    return {"window": (16, 0)}


def window_both(gen, B, H, Nq, Nk):
    return {"window": (7, 9)}


def window_right_only(gen, B, H, Nq, Nk):
    return {"window": (-1, 4)}


def softcap(gen, B, H, Nq, Nk):
    return {"softcap": 5.0}


def alibi(gen, B, H, Nq, Nk):
    return {"alibi_slopes": mx.array(2.0 ** (-8.0 * (np.arange(H) + 1) / H), mx.float32)}


def alibi_per_batch(gen, B, H, Nq, Nk):
    return {"alibi_slopes": mx.array(gen.uniform(0.01, 0.3, (B, H)), mx.float32)}


def sinks(gen, B, H, Nq, Nk):
    return {"sinks": randn(gen, (H,))}


def bool_mask(gen, B, H, Nq, Nk):
    return {"mask": _bool_mask(gen, (Nq, Nk))}


def bool_mask_per_head(gen, B, H, Nq, Nk):
    return {"mask": _bool_mask(gen, (B, H, Nq, Nk))}


def additive_mask(gen, B, H, Nq, Nk):
    return {"mask": randn(gen, (B, 1, Nq, Nk))}


def additive_mask_with_inf(gen, B, H, Nq, Nk):
    m = gen.standard_normal((Nq, Nk)).astype(np.float32)
    m[gen.random((Nq, Nk)) < 0.3] = -np.inf
    return {"mask": mx.array(m)}


def block_sparse(gen, B, H, Nq, Nk):
    bq, bk = 16, 32
    shape = (1, H, -(-Nq // bq), -(-Nk // bk))
    return {"block_mask": _bool_mask(gen, shape, 0.6), "block_size": (bq, bk)}


def combined_causal_softcap_alibi_sinks(gen, B, H, Nq, Nk):
    return {**causal(gen, B, H, Nq, Nk), **softcap(gen, B, H, Nq, Nk),
            **alibi(gen, B, H, Nq, Nk), **sinks(gen, B, H, Nq, Nk)}


def combined_mask_window_sinks(gen, B, H, Nq, Nk):
    return {**bool_mask(gen, B, H, Nq, Nk), **window_both(gen, B, H, Nq, Nk), **sinks(gen, B, H, Nq, Nk)}


def combined_blocks_causal_additive(gen, B, H, Nq, Nk):
    return {**block_sparse(gen, B, H, Nq, Nk), **causal(gen, B, H, Nq, Nk),
            **additive_mask(gen, B, H, Nq, Nk), "scale": 0.3}


def combined_everything(gen, B, H, Nq, Nk):
    return {**combined_causal_softcap_alibi_sinks(gen, B, H, Nq, Nk), "window": (20, 0),
            **bool_mask_per_head(gen, B, H, Nq, Nk), **block_sparse(gen, B, H, Nq, Nk)}


FEATURES = {f.__name__: f for f in (
    none, causal, window_left, window_both, window_right_only, softcap, alibi, alibi_per_batch, sinks,
    bool_mask, bool_mask_per_head, additive_mask, additive_mask_with_inf, block_sparse,
    combined_causal_softcap_alibi_sinks, combined_mask_window_sinks, combined_blocks_causal_additive,
    combined_everything,
)}
