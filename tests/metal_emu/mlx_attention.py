"""MLX's own Metal attention kernels (steel attention, sdpa_vector and its
2-pass variant, from the headers of the pinned macOS wheel), launched
through the emulation the way MLX's host code launches them
(mlx/backend/metal/scaled_dot_product_attention.cpp): the same template
arguments, function constants, buffer indices, parameter structs and grids.

Inputs are mx arrays [B, H, N, D] (row-contiguous copies are taken, as the
host code makes them); results come back as float32 numpy arrays.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import mlx.core as mx
import numpy as np

from . import harness, library

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import macos_mlx  # noqa: E402

_MSL_TYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.bool_: "bool"}


def unavailable_reason() -> Optional[str]:
    """None when MLX's kernels can run here, else why not."""
    reason = harness.unavailable_reason()
    if reason:
        return reason
    root, why = macos_mlx.macos_mlx_root()
    if root is None:
        return f"MLX's Metal kernel headers are not available: {why}"
    return None


def _include_dir() -> str:
    root, why = macos_mlx.macos_mlx_root()
    if root is None:
        raise RuntimeError(why)
    return str(macos_mlx.include_dir(root))


@functools.lru_cache(maxsize=None)
def _compiled(header: str, name: str, template_args: tuple, constants: tuple) -> library.KernelFunction:
    source = f'#include "mlx/backend/metal/kernels/utils.h"\n#include "mlx/backend/metal/kernels/{header}"\n'
    return library.kernel_function(source, name, template_args=list(template_args),
                                   function_constants=dict(constants), include_dirs=[_include_dir()])


def _host(x: mx.array) -> np.ndarray:
    return harness._to_bytes(x).reshape(-1)


def _result(buf: np.ndarray, shape, dtype) -> np.ndarray:
    out = harness._from_bytes(buf, shape, dtype)
    return np.array(out.astype(mx.float32))


def _poisoned(count: int, dtype) -> np.ndarray:
    return harness.Kernel._output_buffer((count,), dtype, None)


# AttnParams / AttnMaskParams of steel/attn/params.h, with C layout.
_ATTN_PARAMS = np.dtype(
    [(n, np.int32) for n in ("B", "H", "D", "qL", "kL", "gqa_factor")]
    + [("scale", np.float32)]
    + [(n, np.int32) for n in ("NQ", "NK", "NQ_aligned", "NK_aligned", "qL_rem", "kL_rem", "qL_off")]
    + [(n, np.int64, (3,)) for n in ("Q_strides", "K_strides", "V_strides", "O_strides")],
    align=True,
)


def _strides(shape) -> list:
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * shape[d + 1]
    return out


def _mask_buffer(mask: mx.array, B, H, Nq, Nk):
    """The mask as MLX's host passes it: its own elements with the strides of
    its broadcast view (0 along broadcast dimensions)."""
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    strides = _strides(m.shape)
    strides = [0 if m.shape[d] == 1 and full > 1 else s for d, (s, full) in enumerate(zip(strides, (B, H, Nq, Nk)))]
    return _host(m), strides


def steel_tiles(D: int, dtype) -> dict:
    """The tile sizes MLX's host picks for its steel attention (non-NAX
    path): bq 32, bk 32 below D 128 else 16, 4 simdgroups along Q."""
    return {"bq": 32, "bk": 32 if D < 128 else 16, "wm": 4, "wn": 1}


def steel_attention(q, k, v, *, scale: float, causal: bool = False, mask=None, sinks=None, save_lse: bool = False,
                    seed=None, return_launch=False):
    """MLX's steel attention forward: (out [B, Hq, Nq, Dv] float32, lse or None)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    t = steel_tiles(D, q.dtype)
    bq, bk, wm, wn = t["bq"], t["bk"], t["wm"], t["wn"]
    mask_type = _MSL_TYPES[mask.dtype if mask is not None else q.dtype]
    constants = {
        "align_Q": Nq % bq == 0,
        "align_K": Nk % bk == 0,
        "has_mask": mask is not None,
        "do_causal": bool(causal),
        "has_sinks": sinks is not None,
        "save_lse": bool(save_lse),
    }
    fn = _compiled("steel/attn/kernels/steel_attention.h", "attention",
                   (_MSL_TYPES[q.dtype], bq, bk, D, Dv, wm, wn, mask_type, "float"),
                   tuple(sorted(constants.items())))
    NQ, NK = -(-Nq // bq), -(-Nk // bk)
    params = np.zeros(1, _ATTN_PARAMS)
    p = params[0]
    p["B"], p["H"], p["D"], p["qL"], p["kL"], p["gqa_factor"] = B, Hq, D, Nq, Nk, Hq // Hkv
    p["scale"] = scale
    p["NQ"], p["NK"], p["NQ_aligned"], p["NK_aligned"] = NQ, NK, Nq // bq, Nk // bk
    p["qL_rem"], p["kL_rem"], p["qL_off"] = Nq - (Nq // bq) * bq, Nk - (Nk // bk) * bk, Nk - Nq
    p["Q_strides"] = _strides(q.shape)[:3]
    p["K_strides"] = _strides(k.shape)[:3]
    p["V_strides"] = _strides(v.shape)[:3]
    p["O_strides"] = _strides((B, Hq, Nq, Dv))[:3]
    out = _poisoned(B * Hq * Nq * Dv, q.dtype)
    buffers = {0: _host(q), 1: _host(k), 2: _host(v), 3: out, 4: params.view(np.uint8)}
    if mask is not None:
        m, m_strides = _mask_buffer(mask, B, Hq, Nq, Nk)
        buffers[5] = np.array(m_strides[:3], dtype=np.int64)
        buffers[6] = m
    if sinks is not None:
        buffers[7] = _host(sinks.astype(q.dtype))
    lse = None
    if save_lse:
        lse = _poisoned(B * Hq * Nq, mx.float32)
        buffers[8] = lse
    launch = fn(buffers=buffers, threadgroups=(NQ, Hq, B), threadgroup=(32, wm, wn), seed=seed)
    result = (_result(out, (B, Hq, Nq, Dv), q.dtype), None if lse is None else lse.reshape(B, Hq, Nq))
    return (result, launch) if return_launch else result


def _vector_constants(mask, causal, sinks, blocks):
    has_mask = mask is not None
    bool_mask = has_mask and mask.dtype == mx.bool_
    return {
        "has_mask": has_mask,
        "query_transposed": False,
        "do_causal": bool(causal),
        "bool_mask": bool_mask,
        "float_mask": has_mask and not bool_mask,
        "has_sinks": sinks is not None,
        "blocks": int(blocks),
    }


def _vector_mask_buffers(buffers, first, mask, q, Nk):
    """The mask buffer and its three int32 strides at `first`.. as the
    vector host code binds them (bool at `first`, float at `first` + 1)."""
    B, Hq, Nq = q.shape[:3]
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    m = mx.broadcast_to(m, (m.shape[0], m.shape[1], Nq, Nk))  # MLX copies what is not row-contiguous per head
    s = _strides(m.shape)
    kv_seq = s[3] if m.shape[3] > 1 else 0
    q_seq = s[2] if m.shape[2] > 1 else 0
    head = s[1] if m.shape[1] > 1 else (s[0] if m.shape[0] > 1 else 0)
    buffers[first + (0 if mask.dtype == mx.bool_ else 1)] = _host(m if mask.dtype == mx.bool_ else m.astype(q.dtype))
    for i, value in enumerate((kv_seq, q_seq, head)):
        buffers[first + 2 + i] = np.array([value], dtype=np.int32)


def sdpa_vector(q, k, v, *, scale: float, causal: bool = False, mask=None, sinks=None, seed=None):
    """MLX's one-pass vector kernel (Nq <= 8): out [B, Hq, Nq, Dv] float32."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    fn = _compiled("sdpa_vector.h", "sdpa_vector", (_MSL_TYPES[q.dtype], D, Dv),
                   tuple(sorted(_vector_constants(mask, causal, sinks, 32).items())))
    out = _poisoned(B * Hq * Nq * Dv, q.dtype)
    buffers = {0: _host(q), 1: _host(k), 2: _host(v), 3: out,
               4: np.array([Hq // Hkv], np.int32), 5: np.array([Nk], np.int32),
               6: np.array([Nk * D], np.uint64), 7: np.array([D], np.uint64),
               8: np.array([Nk * Dv], np.uint64), 9: np.array([Dv], np.uint64),
               10: np.array([scale], np.float32)}
    if mask is not None:
        _vector_mask_buffers(buffers, 11, mask, q, Nk)
    if sinks is not None:
        buffers[16] = _host(sinks.astype(q.dtype))
        buffers[17] = np.array([Hq], np.int32)
    fn(buffers=buffers, threadgroups=(B * Hq, Nq, 1), threadgroup=(1024, 1, 1), seed=seed)
    return _result(out, (B, Hq, Nq, Dv), q.dtype)


# Heads per thread of MLX's instantiations of sdpa_vector_2pass_1_gqa (G = 8).
_GQA_HEADS_PER_THREAD = {64: 8, 128: 4}


def sdpa_vector_2pass(q, k, v, *, scale: float, causal: bool = False, mask=None, sinks=None, blocks: int = 32,
                      gqa_kernel: bool = False, seed=None):
    """MLX's 2-pass vector kernel (keys split over `blocks` threadgroups,
    then merged): out [B, Hq, Nq, Dv] float32. `gqa_kernel`: the first pass
    by sdpa_vector_2pass_1_gqa, which MLX picks for one query row, GQA
    factor 8, D 64 or 128, no mask or sinks and long caches."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if blocks % 32:
        raise ValueError(f"sdpa_vector_2pass: blocks must be a multiple of 32 (as MLX rounds it), got {blocks}")
    gqa = Hq // Hkv
    t = _MSL_TYPES[q.dtype]
    constants = tuple(sorted(_vector_constants(mask, causal, sinks, blocks).items()))
    if gqa_kernel:
        if not (Nq == 1 and gqa == 8 and D == Dv and D in _GQA_HEADS_PER_THREAD and mask is None and sinks is None):
            raise ValueError("sdpa_vector_2pass: the GQA kernel takes Nq 1, GQA factor 8, D = Dv in {64, 128}, "
                             f"no mask or sinks; got Nq {Nq}, factor {gqa}, D {D}/{Dv}")
        first = _compiled("sdpa_vector.h", "sdpa_vector_2pass_1_gqa", (t, D, Dv, 8, _GQA_HEADS_PER_THREAD[D]),
                          constants)
    else:
        first = _compiled("sdpa_vector.h", "sdpa_vector_2pass_1", (t, D, Dv), constants)
    partials = _poisoned(B * Hq * Nq * blocks * Dv, q.dtype)
    sums = _poisoned(B * Hq * Nq * blocks, mx.float32)
    maxs = _poisoned(B * Hq * Nq * blocks, mx.float32)
    buffers = {0: _host(q), 1: _host(k), 2: _host(v), 3: partials, 4: sums, 5: maxs,
               7: np.array([Nk], np.int32), 8: np.array([Nk * D], np.uint64), 9: np.array([D], np.uint64),
               10: np.array([Nk * Dv], np.uint64), 11: np.array([Dv], np.uint64),
               12: np.array([scale], np.float32)}
    if mask is not None:
        _vector_mask_buffers(buffers, 13, mask, q, Nk)
    if sinks is not None:
        buffers[18] = _host(sinks.astype(q.dtype))
    first(buffers=buffers, threadgroups=(Hkv, B, blocks), threadgroup=(32, gqa, Nq), seed=seed)
    second = _compiled("sdpa_vector.h", "sdpa_vector_2pass_2", (t, Dv),
                       tuple(sorted(_vector_constants(mask, causal, sinks, blocks).items())))
    out = _poisoned(B * Hq * Nq * Dv, q.dtype)
    second(buffers={0: partials, 1: sums, 2: maxs, 3: out, 4: np.array([blocks], np.int32)},
           threadgroups=(B * Hq, Nq, 1), threadgroup=(1024, 1, 1), seed=seed)
    return _result(out, (B, Hq, Nq, Dv), q.dtype)
