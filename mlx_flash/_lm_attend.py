"""Route one mlx-lm attention call to `flash_attention`, or back to mlx-lm.

mlx-lm hands attention `queries [B, Hq, Nq, D]`, `keys`/`values`
`[B, Hkv, Nk, D]` (transposed views), a `cache`, a `scale` and a `mask` that
is None, the string "causal", a `CausalMaskDescription` (`_lm_masks`: what
`create_causal_mask` returns while patched) or an array (bool, or additive,
broadcastable to `[B, Hq, Nq, Nk]`; 1-D for a rotating cache's decode step).
Every such call maps onto the op contract except the cases
`unsupported_reason` names; those run mlx-lm's own code and are counted
(`stats`) and logged once per reason, never hidden.

Dtypes follow `mx.fast.scaled_dot_product_attention`: q, k and v may differ
(float32 with float16 k/v, bf16 with f16, ...); the result has their
promoted type, computed in it, and an additive mask must promote to it
(MLX's error otherwise).

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
from ._lm_masks import CausalMaskDescription, as_array
from ._quant_spec import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ._spec import FLOAT_DTYPES
from .attention import flash_attention
from .attention_quantized import flash_attention_quantized

log = logging.getLogger("mlx_flash.mlx_lm")


class PatchStats:
    """How many attention calls ran fused, and why the others did not."""

    def __init__(self):
        self.flash_calls = 0
        self.fallbacks = Counter()
        self.materialisations = 0
        self._logged = set()

    def count_flash(self):
        self.flash_calls += 1

    def count_materialisation(self):
        """A described mask was used as an array (built N x N after all)."""
        self.materialisations += 1

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
            "mask_materialisations": self.materialisations,
        }

    def reset(self):
        self.flash_calls = 0
        self.materialisations = 0
        self.fallbacks.clear()
        self._logged.clear()


stats = PatchStats()


@functools.lru_cache(maxsize=None)
def _backend_present(name: str) -> bool:
    # A backend module still being written (e.g. on a branch not merged yet)
    # is a reason to hand the call back, not to fail the model.
    return importlib.util.find_spec(dispatch._BACKENDS[name]) is not None


def promoted_dtype(*dtypes):
    """The float dtype MLX promotes these to (float16 with bfloat16 is float32)."""
    first = dtypes[0]
    for d in dtypes:
        if d != first:
            return mx.float32
    return first


def _mask_reason(mask, shape) -> str | None:
    if mask is None or isinstance(mask, CausalMaskDescription):
        return None  # a description that does not fit the call becomes its array
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
    key = _call_key(queries, keys, values, scale, mask)
    if key is None:
        return _float_reason(queries, keys, values, scale, mask)
    reason = _REASONS.get(key, _UNKNOWN)
    if reason is _UNKNOWN:
        reason = _float_reason(queries, keys, values, scale, mask)
        if len(_REASONS) >= _MAX_REASONS:
            _REASONS.clear()
        _REASONS[key] = reason
    return reason


# The answer of _float_reason depends only on what _call_key holds: every
# layer of a decode step (and every step of a static cache) asks the same
# question, so it is answered once (~3 us of checks a call otherwise).
_REASONS: dict = {}
_MAX_REASONS = 1024
_UNKNOWN = object()


def _call_key(queries, keys, values, scale, mask):
    """What the float checks read of a call, or None where they read more
    (a mask of another kind than None, a string, a description or an array)."""
    if queries.__class__ is not mx.array or keys.__class__ is not mx.array or values.__class__ is not mx.array:
        return None
    if mask is None or isinstance(mask, (str, CausalMaskDescription)):
        mask_key = mask if mask is None or isinstance(mask, str) else CausalMaskDescription
    elif mask.__class__ is mx.array:
        mask_key = (tuple(mask.shape), mask.dtype)
    else:
        return None
    return (tuple(queries.shape), tuple(keys.shape), tuple(values.shape), queries.dtype, keys.dtype, values.dtype,
            scale.__class__, mask_key, dispatch.backend_name(None))


def _float_reason(queries, keys, values, scale, mask) -> str | None:
    if not all(isinstance(a, mx.array) for a in (queries, keys, values)):
        return "non-array queries/keys/values"
    if queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        return "queries/keys/values not rank 4"
    if any(a.dtype not in FLOAT_DTYPES for a in (queries, keys, values)):
        return f"dtypes {queries.dtype}/{keys.dtype}/{values.dtype}"
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
    max_qk, max_v = dispatch.head_dim_limits(backend)
    if queries.shape[-1] > max_qk or values.shape[-1] > max_v:
        return f"head dims {queries.shape[-1]}/{values.shape[-1]} over {backend}'s {max_qk}/{max_v}"
    return None


def _quantized_reason(queries, keys, cache, scale, mask) -> str | None:
    """QuantizedKVCache (keys/values are (data, scales, biases) triples): the
    quantized op takes it on the backends of dispatch.QUANTIZED_KV_BACKENDS
    (CPU, Metal, CUDA); elsewhere the call goes back to mlx-lm, counted.
    Shapes of the
    triples are checked by the op itself."""
    backend = dispatch.backend_name(None)
    if backend not in dispatch.QUANTIZED_KV_BACKENDS:
        return f"quantized KV cache on {backend} (no kernel yet)"
    if cache.bits not in SUPPORTED_BITS or cache.group_size not in SUPPORTED_GROUP_SIZES:
        return f"quantized KV cache with bits={cache.bits}, group_size={cache.group_size}"
    if not isinstance(queries, mx.array) or queries.ndim != 4 or queries.dtype not in FLOAT_DTYPES:
        return "queries not a rank-4 float array"
    max_qk, _ = dispatch.quantized_head_dim_limits(backend)
    if queries.shape[-1] > max_qk:
        return f"head dim {queries.shape[-1]} over {backend}'s {max_qk}"
    if not isinstance(scale, numbers.Real):
        return f"scale of type {type(scale).__name__}"
    nk = (keys[0] if isinstance(keys, (tuple, list)) else keys).shape[2]
    return _mask_reason(mask, (queries.shape[0], queries.shape[1], queries.shape[2], nk))


def _mask_arguments(mask, nq: int, nk: int) -> dict:
    """flash_attention's mask keywords for mlx-lm's mask."""
    if mask is None:
        return {}
    if isinstance(mask, str):
        # mlx-lm aligns "causal" bottom-right after a KV-cache offset, as the op does.
        return {"causal": True}
    if isinstance(mask, CausalMaskDescription):
        described = mask.op_arguments(nq, nk)
        return described if described is not None else {"mask": as_array(mask)}
    return {"mask": mask}


def fused(queries, keys, values, *, scale, mask, sinks=None, softcap=None, cache=None):
    """`flash_attention` with mlx-lm's arguments (counted), in the promoted dtype;
    with a QuantizedKVCache, `flash_attention_quantized` on its triples."""
    stats.count_flash()
    if hasattr(cache, "bits"):
        options = _mask_arguments(mask, queries.shape[2], keys[0].shape[2])
        if "key_start" in options or "key_len" in options:
            # The quantized op has no per-batch key ranges (yet): the mask's own array.
            options = {"mask": as_array(mask)}
        return flash_attention_quantized(queries, keys, values, bits=cache.bits, group_size=cache.group_size,
                                         scale=float(scale), sinks=sinks, softcap=softcap, **options)
    qd, kd, vd = queries.dtype, keys.dtype, values.dtype
    dtype = qd if qd == kd and qd == vd else promoted_dtype(qd, kd, vd)
    options = _mask_arguments(mask, queries.shape[2], keys.shape[2])
    additive = options.get("mask")
    if additive is not None and additive.dtype != mx.bool_ and promoted_dtype(additive.dtype, dtype) != dtype:
        raise ValueError(f"[scaled_dot_product_attention] Mask type must promote to output type {dtype}.")
    if dtype != qd or dtype != kd or dtype != vd:  # mixed dtypes: computed in the promoted one, as MLX does
        queries, keys, values = (a if a.dtype == dtype else a.astype(dtype) for a in (queries, keys, values))
    return flash_attention(queries, keys, values, scale=float(scale), sinks=sinks, softcap=softcap, **options)


def attend(queries, keys, values, *, cache, scale, mask, fallback, sinks=None, softcap=None):
    """Fused attention with mlx-lm's arguments, or `fallback(mask)` (counted)
    with the mask as mlx-lm's own code takes it (a plain array, not a description)."""
    reason = unsupported_reason(queries, keys, values, cache, scale, mask)
    if reason is not None:
        stats.count_fallback(reason)
        return fallback(as_array(mask))
    return fused(queries, keys, values, scale=scale, mask=mask, sinks=sinks, softcap=softcap, cache=cache)
