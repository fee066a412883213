"""Route one mlx-lm attention call to `flash_attention`, or back to mlx-lm.

mlx-lm hands attention `queries [B, Hq, Nq, D]`, `keys`/`values`
`[B, Hkv, Nk, D]` (transposed views), a `cache`, a `scale` and a `mask` that
is None, the string "causal" or an array from `create_attention_mask`
(bool, or additive, broadcastable to `[B, Hq, Nq, Nk]`; 1-D for a rotating
cache's decode step). Every such call maps onto the op contract except the
cases `unsupported_reason` names; those run mlx-lm's own code and are
counted (`stats`) and logged once per reason, never hidden.

Counting happens when the Python function runs: once per call eagerly, once
per trace under `mx.compile`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import numbers
from collections import Counter

import mlx.core as mx

from . import dispatch
from ._quant_spec import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ._spec import FLOAT_DTYPES, MAX_HEAD_DIM
from .attention import flash_attention
from .attention_quantized import flash_attention_quantized

log = logging.getLogger("mlx_flash.mlx_lm")


class PatchStats:
    """How many attention calls ran fused, and why the others did not."""

    def __init__(self):
        self.flash_calls = 0
        self.fallbacks = Counter()
        self._logged = set()

    def count_flash(self):
        self.flash_calls += 1

    def count_fallback(self, reason: str):
        self.fallbacks[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("mlx_flash: attention handed back to mlx-lm (%s); "
                        "see mlx_flash.patch_stats()", reason)

    def snapshot(self) -> dict:
        return {
            "flash_calls": self.flash_calls,
            "fallback_calls": sum(self.fallbacks.values()),
            "fallbacks": dict(self.fallbacks),
        }

    def reset(self):
        self.flash_calls = 0
        self.fallbacks.clear()
        self._logged.clear()


stats = PatchStats()


@functools.lru_cache(maxsize=None)
def _backend_present(name: str) -> bool:
    # A backend module still being written (e.g. on a branch not merged yet)
    # is a reason to hand the call back, not to fail the model.
    return importlib.util.find_spec(dispatch._BACKENDS[name]) is not None


def _mask_reason(mask, shape) -> str | None:
    if mask is None:
        return None
    if isinstance(mask, str):
        return None if mask == "causal" else f"mask string {mask!r}"
    if not isinstance(mask, mx.array):
        return f"mask of type {type(mask).__name__}"
    if mask.dtype != mx.bool_ and mask.dtype not in FLOAT_DTYPES:
        return f"mask dtype {mask.dtype}"
    if mask.ndim > 4:
        return f"mask rank {mask.ndim}"
    full = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if any(m not in (1, t) for m, t in zip(full, shape)):
        return f"mask shape {list(mask.shape)} vs {list(shape)}"
    return None


def unsupported_reason(queries, keys, values, cache, scale, mask) -> str | None:
    """Why this call cannot go through `flash_attention`, or None if it can.

    `mask` may be None to check everything else (before a cache update).
    """
    if hasattr(cache, "bits"):
        return _quantized_reason(queries, keys, cache, scale, mask)
    if not all(isinstance(a, mx.array) for a in (queries, keys, values)):
        return "non-array queries/keys/values"
    if queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        return "queries/keys/values not rank 4"
    if not (queries.dtype == keys.dtype == values.dtype) or queries.dtype not in FLOAT_DTYPES:
        return f"dtypes {queries.dtype}/{keys.dtype}/{values.dtype}"
    if max(queries.shape[-1], values.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM}"
    if keys.shape[1] == 0 or queries.shape[1] % keys.shape[1]:
        return "query heads not a multiple of key/value heads"
    if not isinstance(scale, numbers.Real):
        return f"scale of type {type(scale).__name__}"
    B, Hq, Nq, _ = queries.shape
    reason = _mask_reason(mask, (B, Hq, Nq, keys.shape[2]))
    if reason is not None:
        return reason
    backend = dispatch.backend_name(None)
    if not _backend_present(backend):
        return f"no mlx_flash backend for {backend}"
    return None


def _quantized_reason(queries, keys, cache, scale, mask) -> str | None:
    """QuantizedKVCache (keys/values are (data, scales, biases) triples): the
    quantized op takes it on the CPU and CUDA; its Metal kernel is not written
    yet, so there the call goes back to mlx-lm, counted. Shapes of the
    triples are checked by the op itself."""
    backend = dispatch.backend_name(None)
    if backend not in dispatch.QUANTIZED_KV_BACKENDS:
        return f"quantized KV cache on {backend} (no kernel yet)"
    if cache.bits not in SUPPORTED_BITS or cache.group_size not in SUPPORTED_GROUP_SIZES:
        return f"quantized KV cache with bits={cache.bits}, group_size={cache.group_size}"
    if not isinstance(queries, mx.array) or queries.ndim != 4 or queries.dtype not in FLOAT_DTYPES:
        return "queries not a rank-4 float array"
    if queries.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM}"
    if not isinstance(scale, numbers.Real):
        return f"scale of type {type(scale).__name__}"
    nk = (keys[0] if isinstance(keys, (tuple, list)) else keys).shape[2]
    return _mask_reason(mask, (queries.shape[0], queries.shape[1], queries.shape[2], nk))


def fused(queries, keys, values, *, scale, mask, sinks=None, softcap=None, cache=None):
    """`flash_attention` with mlx-lm's arguments (counted); with a
    QuantizedKVCache, `flash_attention_quantized` on its triples.

    The string mask "causal" becomes `causal=True`: mlx-lm aligns it
    bottom-right after a KV-cache offset, and so does the op.
    """
    stats.count_flash()
    causal = isinstance(mask, str)
    if hasattr(cache, "bits"):
        return flash_attention_quantized(
            queries, keys, values, bits=cache.bits, group_size=cache.group_size, scale=float(scale),
            mask=None if causal else mask, causal=causal, sinks=sinks, softcap=softcap,
        )
    return flash_attention(
        queries, keys, values, scale=float(scale), mask=None if causal else mask,
        causal=causal, sinks=sinks, softcap=softcap,
    )


def attend(queries, keys, values, *, cache, scale, mask, fallback, sinks=None, softcap=None):
    """Fused attention with mlx-lm's arguments, or `fallback()` (counted)."""
    reason = unsupported_reason(queries, keys, values, cache, scale, mask)
    if reason is not None:
        stats.count_fallback(reason)
        return fallback()
    return fused(queries, keys, values, scale=scale, mask=mask, sinks=sinks, softcap=softcap, cache=cache)
