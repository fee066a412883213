"""The warp-specialised Hopper forward (cuda_src/attention_fwd_ws.cuh): which
calls it serves, its tensor-map templates and its launch.

It serves fp16/bf16 calls with Dqk = Dv in {64, 128} on sm_90, and the wide
heads (Dqk, Dv) in WIDE_PAIRS (96, 192, 256 and DeepSeek's 192 / 128), that carry no
optional array and no logit rule beyond causal / sliding windows: no mask,
block mask, softcap, ALiBi, sinks, varlen or key ranges, and a positive
scale (the kernel folds scale * log2(e) into its exponent and row maxima).
Every other Hopper call keeps attention_fwd_wgmma (backends/cuda.py). By
default fp16/bf16 at D = 128, and at D = 64 with at least MIN_KEYS_D64 keys,
come here (where it timed faster); MLX_FLASH_CUDA_FWD_WS=all adds the short
D = 64 calls, =0 routes every call to attention_fwd_wgmma. Wide heads: the
pairs in WIDE_CHECKED by default, MLX_FLASH_CUDA_FWD_WS_WIDE=all every pair
of WIDE_PAIRS, =0 none (they keep attention_fwd_mma). Dense D = 64 calls
run its three-warpgroup instances (WG3_D64); the opt-in variants below
(EXP2_POLY, KEYS_DENSE_D64 / _D128, CHAINS_D128) are for timing runs;
RESCALE_EARLY and TURNS_CONTINUOUS are on by default where they timed faster.

Q, K and V reach the kernel through TMA: per operand a 3-D tensor map
(head dim, sequence, batch * heads) whose boxes are 64 head dims by 128 rows
(BN for K and V) in the 128-byte-swizzled layout wgmma reads, and whose rows
past the sequence's end (and columns past a head dim of 96) read as zeros. The host encodes them with a placeholder
address (cuda_matmul's libcuda handle); each block writes the real addresses
into its slot of the `tmaps` workspace output (cuda_src/tma.cuh).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import mlx.core as mx

from .._spec import AttentionSpec
from . import cuda as _cuda

THREADS = 384       # two consumer warpgroups + the producer warpgroup
TMAP_BYTES = 3 * 128  # kWsTmapBytes: Q, K, V maps per block
SLOT_BYTES = TMAP_BYTES + 128  # kWsSlotBytes: a block's workspace (its maps, then its trace)
TMPL_BYTES = TMAP_BYTES + 16  # `tmpl`: the three map templates; heads per section, trace and dynamic switches (int32)
ROWS = 128          # query rows per block
INPUTS = ("q", "k", "v", "ip", "fp", "tmpl", "tk")
OUTPUTS = ("out", "lse", "tmaps")

# Which calls it takes: "0" none; "1" (default) the cases where it timed
# faster than the wgmma kernel on the H200 (2026-12-04, docs/cuda.md): fp16
# and bf16 at D = 128 (1.3-1.5x), and at D = 64 from MIN_KEYS_D64 keys on
# (1.06-1.26x at 4-16K; at 1K keys it ran 0.65x, its items too short for its
# fixed cost per item); "all" every case it can serve. Each of these passed
# test_ws_forward_on_gpu against float64 on the H200.
_MODE = os.environ.get("MLX_FLASH_CUDA_FWD_WS", "1")
if _MODE not in ("0", "1", "all"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS: expected 0, 1 or all, got {_MODE!r}")
_ENABLED = _MODE != "0"
CHECKED_ONLY = _MODE == "1"
MIN_KEYS_D64 = 2048


# Wide heads (Dqk, Dv) the kernel takes, each with its key tile: the O
# accumulator (Dv / 2 fp32 per consumer thread) leaves room for S (BN / 2)
# and P (BN / 4) within 240 registers at these; shared memory (Q, two K and V
# tiles) stays within 227 KiB at two stages.
# MLX_FLASH_CUDA_FWD_WS_KEYS_D96 / _D192 choose the dense tile at D 96 (128 or
# 176) and D 192 (96 or 112) for timing runs.
_KEY_CHOICES = {96: (128, 176), 192: (96, 112)}
WIDE_KEYS = {(96, 96): 128, (192, 192): 96, (256, 256): 80, (192, 128): 128}
for _d, _choices in _KEY_CHOICES.items():
    _n = os.environ.get(f"MLX_FLASH_CUDA_FWD_WS_KEYS_D{_d}", str(WIDE_KEYS[(_d, _d)]))
    if _n not in tuple(map(str, _choices)):
        raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_KEYS_D{_d}: expected one of {_choices}, got {_n!r}")
    WIDE_KEYS[(_d, _d)] = int(_n)
# Under causal / window rules the softmax also keeps the tile's drop bits and
# the exact P V path is compiled in: at D = 256 an 80-key tile spilled (16 bytes)
# there, a 64-key one does not.
WIDE_KEYS_WINDOW = {(96, 96): 128, (192, 192): 96, (256, 256): 64, (192, 128): 128}
WIDE_PAIRS = tuple(WIDE_KEYS)
WIDE_STAGES = 2
# The wide pairs routed here by default: those whose float64 checks passed on
# the H200 (2026-12-04 round A: test_ws_wide_forward_on_gpu 40/40, fp16 and
# bf16, dense / causal / windows; non-finite 15/15) and that timed faster
# than attention_fwd_mma, the route they replace (1.95-2.85x at N = 8192 in
# rounds A and B, docs/cuda.md, benchmarks/results/cuda_wide_heads_ws_nvidia_h200.json).
WIDE_CHECKED: tuple = ((256, 256), (192, 192), (192, 128), (96, 96))
_WIDE = os.environ.get("MLX_FLASH_CUDA_FWD_WS_WIDE", "auto")
if _WIDE not in ("0", "auto", "all"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_WIDE: expected 0, auto or all, got {_WIDE!r}")
WIDE_MODE = _WIDE


def wide(spec: AttentionSpec) -> bool:
    return (spec.head_dim_qk, spec.head_dim_v) in WIDE_KEYS


# K/V ring depth per head dim (each stage holds a K and a V tile of 128 keys:
# 64 KiB at D = 128, 32 KiB at D = 64), and the depths the header declares.
STAGE_CHOICES = {128: (2, 3), 64: (2, 4)}
STAGES = {128: int(os.environ.get("MLX_FLASH_CUDA_FWD_WS_STAGES_D128", "2")),
          64: int(os.environ.get("MLX_FLASH_CUDA_FWD_WS_STAGES_D64", "4"))}
for _d, _n in STAGES.items():
    if _n not in STAGE_CHOICES[_d]:
        raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_STAGES_D{_d}: expected one of {STAGE_CHOICES[_d]}, got {_n}")


# Keys per tile: 128, or 176 for D = 128 without windows (fewer, longer
# iterations; the causal diagonal wants the square tile). The header declares both.
# 144 and 160 (opt-in, timing only until checked on the GPU): 12 or 24 fewer
# registers of S and P than 176, room for the softmax's parallel chains.
KEYS_D128_CHOICES = (128, 144, 160, 176)
_keys = os.environ.get("MLX_FLASH_CUDA_FWD_WS_KEYS_D128", "176")
if _keys not in tuple(map(str, KEYS_D128_CHOICES)):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_KEYS_D128: expected one of {KEYS_D128_CHOICES}, got {_keys!r}")
KEYS_DENSE_D128 = int(_keys)
# D = 64 (opt-in, timing only until checked on the GPU): 192-key dense tiles,
# 1.5x the work per tile for the same barriers and turn hand-offs
# (registers: O 32 + S 96 + P 48 per thread).
KEYS_D64_CHOICES = (128, 192)
_keys = os.environ.get("MLX_FLASH_CUDA_FWD_WS_KEYS_D64", "128")
if _keys not in tuple(map(str, KEYS_D64_CHOICES)):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_KEYS_D64: expected one of {KEYS_D64_CHOICES}, got {_keys!r}")
KEYS_DENSE_D64 = int(_keys)


# Opt-in (timing only until its GPU check): n of every 4 columns of eight
# keys take 2^x on the FMA pipes (ws_exp2_poly) instead of the MUFU's ex2,
# at D = 64 (the exp-bound head dim; at D = 128 the 176-key tile spilled
# with it); MLX_FLASH_CUDA_FWD_WS_EXP2_POLY_D64=n (0, 1 or 2). 0 (the default)
# builds the unchanged kernels. The instances exist at the default ring
# depth (the header declares them).
EXP2_POLY_CHOICES = (0, 1, 2)
EXP2_POLY = {}
for _d in (64,):
    _v = os.environ.get(f"MLX_FLASH_CUDA_FWD_WS_EXP2_POLY_D{_d}", "0")
    if _v not in tuple(map(str, EXP2_POLY_CHOICES)):
        raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_EXP2_POLY_D{_d}: expected one of {EXP2_POLY_CHOICES}, got {_v!r}")
    EXP2_POLY[_d] = int(_v)
_DEFAULT_STAGES = {128: 2, 64: 4}


# Three consumer warpgroups at D = 64 (192 query rows per block, 512
# threads, 160 registers per consumer thread, 96-key dense tiles, 64 under
# causal / window rules): each K/V tile serves 1.5x the rows and the
# exponentials spread over 12 warps. MLX_FLASH_CUDA_FWD_WS_WG3_D64: "auto"
# (default) for dense calls, where it timed 1.12-1.15x the two-warpgroup
# kernel on the H200 (2026-12-04 round B, fp16 16K and 4K, queued; round C
# 1.03-1.14x fp16 and bf16; docs/cuda.md) and passed the float64 and
# non-finite checks in both rounds; under causal / window
# rules it ran 0.76-0.96x, so those keep two warpgroups. "1" every D = 64
# call, "0" none. At the default ring depth only.
WG3_D64 = os.environ.get("MLX_FLASH_CUDA_FWD_WS_WG3_D64", "auto")
if WG3_D64 not in ("0", "1", "auto"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_WG3_D64: expected 0, 1 or auto, got {WG3_D64!r}")


# Opt-in (timing only until its GPU check): two row-max and two row-sum
# chains in the softmax of the 176-key D = 128 tile (one each by default,
# for registers; ptxas fits two without spills). MLX_FLASH_CUDA_FWD_WS_CHAINS_D128=2.
_CHAINS = os.environ.get("MLX_FLASH_CUDA_FWD_WS_CHAINS_D128", "1")
if _CHAINS not in ("1", "2"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_CHAINS_D128: expected 1 or 2, got {_CHAINS!r}")
CHAINS_D128 = int(_CHAINS)


# O's rescale by the new row maxima moved from after the softmax into the
# next turn, after S's product is issued and before P V's (FlashAttention-3's
# order), off the consumer's path from one softmax to its next turn;
# bit-identical results. MLX_FLASH_CUDA_FWD_WS_RESCALE: "auto" (default) at
# D = 64, where it timed 1.02-1.08x alone and, with the continuous turns below,
# 1.02-1.08x the old route on every row (H200, session 10 round A, fp16 and
# bf16, 4K / 16K, dense and causal; benchmarks/results/cuda_fwd_ws_nvidia_h200_s10.json);
# at D = 128 it timed 0.95-1.05x (noise), so not there. "early" at both (the
# default routes' instances: D 128 dense 176 / ruled 128 keys, D 64 dense on
# three warpgroups and ruled on two, at the default ring depths), "late" at none.
_RESCALE = os.environ.get("MLX_FLASH_CUDA_FWD_WS_RESCALE", "auto")
if _RESCALE not in ("auto", "late", "early"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_RESCALE: expected auto, late or early, got {_RESCALE!r}")
RESCALE_EARLY = None if _RESCALE == "auto" else _RESCALE == "early"  # None: D 64 only
RESCALE_EARLY_HEAD_DIMS = (64,)

# The consumer warpgroups' turns run on across a persistent block's items
# (TURNS 1) instead of starting again in each, so the first warpgroup issues
# an item's first S once the last one issued the previous item's last P V,
# not after its epilogue too; bit-identical results.
# MLX_FLASH_CUDA_FWD_WS_TURNS: "continuous" (default; the persistent grid
# with them timed 1.01-1.10x the old D 128 route, fp16, and 0.99-1.04x alone
# at D 64, session 10 round A) on the same instances as the early rescale;
# "item" builds the old kernels.
_TURNS = os.environ.get("MLX_FLASH_CUDA_FWD_WS_TURNS", "continuous")
if _TURNS not in ("item", "continuous"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_TURNS: expected item or continuous, got {_TURNS!r}")
TURNS_CONTINUOUS = _TURNS == "continuous"


def rescale_early(spec: AttentionSpec, nwg: int, keys: int) -> bool:
    """Whether the call's instance rescales O early (RESCALE 1): the setting
    asks for it at the call's head dim and the call runs one of the default
    routes' instances."""
    on = spec.head_dim_qk in RESCALE_EARLY_HEAD_DIMS if RESCALE_EARLY is None else RESCALE_EARLY
    return on and _default_instance(spec, nwg, keys)


def turns_continuous(spec: AttentionSpec, nwg: int, keys: int) -> bool:
    """Whether the call's instance runs its turns across items (TURNS 1)."""
    return TURNS_CONTINUOUS and _default_instance(spec, nwg, keys)


def _default_instance(spec: AttentionSpec, nwg: int, keys: int) -> bool:
    """The call runs one of the default routes' instances (those the RESCALE
    and TURNS variants exist for)."""
    if wide(spec) or exp2_poly(spec) or chains(spec, keys) != 1:
        return False
    d = spec.head_dim_qk
    if stages(d) != _DEFAULT_STAGES.get(d):
        return False
    if d == 128:
        return keys == (128 if spec.has_window else 176)
    return (nwg, keys, spec.has_window) in ((3, 96, False), (2, 128, True))


def chains(spec: AttentionSpec, keys: int | None = None) -> int:
    """The CHAINS template value of a call (1: the default kernel); `keys`:
    keys_per_tile(spec) where the caller has it."""
    if CHAINS_D128 == 2 and spec.head_dim_qk == 128 and not wide(spec) and (
            keys_per_tile(spec) if keys is None else keys) == 176:
        return 2
    return 1


def warpgroups(spec: AttentionSpec) -> int:
    """Consumer warpgroups of the call's instance (64 query rows each)."""
    if (spec.head_dim_qk == 64 and spec.head_dim_v == 64 and stages(64) == _DEFAULT_STAGES[64]
            and (WG3_D64 == "1" or (WG3_D64 == "auto" and not spec.has_window))):
        return 3
    return 2


def exp2_poly(spec: AttentionSpec) -> int:
    """The EXP2POLY template value of a call (0: the default kernel)."""
    d = spec.head_dim_qk
    if wide(spec) or d not in EXP2_POLY or stages(d) != _DEFAULT_STAGES[d]:
        return 0
    return EXP2_POLY[d]


# Persistent grid: one block per SM taking work items (sections of heads, the
# longest row blocks first in each) one after the other, so an item's epilogue
# and the next one's first loads overlap and the tensor maps are published
# once per SM; =1 everywhere, =0 one block per item, auto (default) as below.
_PERSISTENT = os.environ.get("MLX_FLASH_CUDA_FWD_WS_PERSISTENT", "auto")
if _PERSISTENT not in ("0", "1", "auto"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_PERSISTENT: expected 0, 1 or auto, got {_PERSISTENT!r}")
PERSISTENT = None if _PERSISTENT == "auto" else _PERSISTENT == "1"
# "auto": persistent at D = 64, whose short items it ran 1-30% faster on the
# H200 (2026-12-04), and at D = 128 since session 10 (round A, interleaved
# A/B: 1.00-1.06x one block per item on all ten fp16 / bf16 rows, 1.01-1.10x
# with the continuous turns; it had timed +-8% in single runs before).
PERSISTENT_HEAD_DIMS = (64, 128)
# Persistent blocks claim their next item with an atomic ticket (the stream's
# ticket pool, backends/cuda.py) instead of striding by the grid, so blocks
# that drew short (causal) items take more of them.
_DYNAMIC = os.environ.get("MLX_FLASH_CUDA_FWD_WS_DYNAMIC", "1")
if _DYNAMIC not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_DYNAMIC: expected 0 or 1, got {_DYNAMIC!r}")
DYNAMIC = _DYNAMIC == "1"

# Tests: True fills out and lse with NaN before the kernel runs, so a row or
# column it leaves unwritten fails the float64 check instead of passing on
# whatever the allocator held.
POISON_OUTPUTS = False

# Profiling: a list here makes each call record its blocks' timelines (the
# kernel's WsTrace slots) and append its workspace output (uint8, SLOT_BYTES
# per block) to the list; tools/cuda_wgmma_check.py's `trace` part reads them.
TRACE = None


# Work order: the heads are cut into sections whose K and V fit in L2 together
# (L2_BUDGET bytes of it), and a section's row blocks (longest first) come
# before the next section's, so the blocks resident at once read the same K/V
# tiles. MLX_FLASH_CUDA_FWD_WS_HEAD_GROUP=n fixes the heads per section
# instead (0: all heads in one section, longest row blocks of every head first).
L2_BUDGET = 24 << 20
_HEAD_GROUP = os.environ.get("MLX_FLASH_CUDA_FWD_WS_HEAD_GROUP", "auto")
if _HEAD_GROUP != "auto" and not _HEAD_GROUP.isdigit():
    raise ValueError(f"MLX_FLASH_CUDA_FWD_WS_HEAD_GROUP: expected auto or a count of heads, got {_HEAD_GROUP!r}")
HEAD_GROUP = None if _HEAD_GROUP == "auto" else int(_HEAD_GROUP)


def heads_per_section(batch: int, heads_q: int, heads_kv: int, nk: int, d: int) -> int:
    """Heads (of batch * heads_q) per section of the work order."""
    heads = batch * heads_q
    if HEAD_GROUP is not None:
        return heads if HEAD_GROUP == 0 else min(HEAD_GROUP, heads)
    kv_head_bytes = 2 * nk * d * 2  # K and V of one KV head, 16-bit
    return max(1, min(heads, L2_BUDGET // kv_head_bytes * (heads_q // heads_kv)))


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Multiprocessors of device 0 (MLX's GPU), through libcuda; 0 if unknown."""
    from .cuda_matmul import _libcuda

    lib, dev, count = _libcuda(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return 0
    if lib.cuDeviceGetAttribute(ctypes.byref(count), 16, dev) != 0:  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        return 0
    return count.value


def persistent(head_dim: int) -> bool:
    # Wide heads: one block per item whatever the setting (a persistent run
    # once showed an unexplained bit mismatch there; their items are long).
    if head_dim not in STAGES:
        return False
    return head_dim in PERSISTENT_HEAD_DIMS if PERSISTENT is None else PERSISTENT


def blocks_for(items: int, head_dim: int = 128) -> int:
    """Grid size for `items` work items."""
    if persistent(head_dim) and sm_count() > 0:
        return min(items, sm_count())
    return items


def stages(head_dim: int) -> int:
    return STAGES.get(head_dim, WIDE_STAGES)


def keys_per_tile(spec: AttentionSpec, nwg: int | None = None) -> int:
    """Keys per K/V tile; `nwg`: warpgroups(spec) where the caller has it."""
    if wide(spec):
        return (WIDE_KEYS_WINDOW if spec.has_window else WIDE_KEYS)[(spec.head_dim_qk, spec.head_dim_v)]
    if spec.head_dim_qk == 128 and not spec.has_window and stages(128) == 2:
        return KEYS_DENSE_D128
    if (warpgroups(spec) if nwg is None else nwg) == 3:
        # 160 registers per consumer thread: S, P and O fit at 96 keys dense,
        # 64 under causal / window rules (their drop bits; 96 spilled there).
        return 64 if spec.has_window else 96
    if spec.head_dim_qk == 64 and not spec.has_window:
        return KEYS_DENSE_D64
    return 128


def _cols(d: int) -> int:
    return -(-d // 64) * 64  # ws_cols: whole 64-column swizzle blocks


def smem_bytes(head_dim: int, keys: int, head_dim_v: int | None = None, rows: int = ROWS) -> int:
    """ws_fwd_smem() of attention_fwd_ws.cuh."""
    dv = head_dim if head_dim_v is None else head_dim_v
    return 2 * (rows * _cols(head_dim) + stages(head_dim) * keys * (_cols(head_dim) + _cols(dv))) + 1024


def _head_dims_served(spec: AttentionSpec) -> bool:
    pair = (spec.head_dim_qk, spec.head_dim_v)
    if pair in ((64, 64), (128, 128)):
        return spec.head_dim_qk == 128 or spec.seqlen_k >= MIN_KEYS_D64 or not CHECKED_ONLY
    if pair in WIDE_KEYS:
        return WIDE_MODE == "all" or (WIDE_MODE == "auto" and (pair in WIDE_CHECKED or not CHECKED_ONLY))
    return False


def serves(spec: AttentionSpec) -> bool:
    """Whether the call runs on the warp-specialised kernel (see the module doc)."""
    return (_ENABLED and spec.dtype in (mx.float16, mx.bfloat16) and _head_dims_served(spec)
            and spec.softcap == 0 and not spec.has_alibi
            and spec.mask_kind == "none" and not spec.has_block_mask and not spec.has_sinks and not spec.varlen
            and not spec.has_key_range and spec.scale > 0 and _tma_available())


def _tma_available() -> bool:
    return _cuda_matmul()._tma_available()


@functools.lru_cache(maxsize=None)
def _cuda_matmul():
    """cuda_matmul, imported on first use (it imports cuda, which imports this
    module lazily): one cached call per forward instead of an import statement."""
    from . import cuda_matmul

    return cuda_matmul


@functools.lru_cache(maxsize=1024)
def tensor_map_3d(elem_bytes: int, inner: int, rows: int, slabs: int, box_rows: int) -> bytes:
    """A 3-D CUtensorMap (128 bytes) of a row-major [slabs][rows][inner] operand,
    boxes of 64 x box_rows x 1 elements, 128-byte swizzle, zero fill out of
    bounds; a placeholder address that each block replaces."""
    from .cuda_matmul import _libcuda

    buf = (ctypes.c_ubyte * 192)()
    base = (ctypes.addressof(buf) + 63) // 64 * 64  # CUtensorMap is 64-byte aligned
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    rc = _libcuda().cuTensorMapEncodeTiled(
        ctypes.c_void_p(base), ctypes.c_int(1), u32(3), ctypes.c_void_p(1 << 20),  # UINT16 elements
        (u64 * 3)(inner, rows, slabs), (u64 * 2)(inner * elem_bytes, rows * inner * elem_bytes),
        (u32 * 3)(64, box_rows, 1), (u32 * 3)(1, 1, 1),
        ctypes.c_int(0), ctypes.c_int(3), ctypes.c_int(2), ctypes.c_int(0))  # no interleave, 128B swizzle, L2 128B
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({rc}) for [{slabs}][{rows}][{inner}] x {elem_bytes} "
                           f"bytes, box [1][{box_rows}][64]")
    return bytes((ctypes.c_ubyte * 128).from_address(base))


@functools.lru_cache(maxsize=1024)
def _templates(batch: int, heads_q: int, heads_kv: int, nq: int, nk: int, d: int, dv: int, keys: int,
               group: int, trace: bool, dynamic: bool, rows: int = ROWS) -> mx.array:
    """Q, K, V templates, the heads per section, the trace and dynamic-schedule
    switches as one uint8 input (the kernel's `tmpl`)."""
    tq = tensor_map_3d(2, d, nq, batch * heads_q, rows)
    tk = tensor_map_3d(2, d, nk, batch * heads_kv, keys)
    tv = tk if dv == d else tensor_map_3d(2, dv, nk, batch * heads_kv, keys)
    tmpl = tq + tk + tv + b"".join(int(x).to_bytes(4, "little") for x in (group, trace, dynamic))
    return _cuda.const_array(tuple(tmpl.ljust(TMPL_BYTES, b"\0")), mx.uint8)


def template(spec: AttentionSpec, nwg: int | None = None, keys: int | None = None) -> list:
    """The kernel's template values. Their order and values make MLX's kernel
    name, which the header's launch-bound declarations spell out: keep them in step.
    `nwg`, `keys`: warpgroups(spec) and keys_per_tile(spec) where the caller has them."""
    d = spec.head_dim_qk
    nwg = warpgroups(spec) if nwg is None else nwg
    keys = keys_per_tile(spec, nwg) if keys is None else keys
    values = [("BF16", spec.dtype == mx.bfloat16), ("D", d), ("DV", spec.head_dim_v), ("WINDOW", spec.has_window),
              ("STAGES", stages(d)), ("BN", keys)]
    poly = exp2_poly(spec)
    # Only where set: the default instances keep their names (and their code).
    early, turns = rescale_early(spec, nwg, keys), turns_continuous(spec, nwg, keys)
    if early or turns:
        values = values + [("EXP2POLY", 0), ("WARPGROUPS", nwg), ("CHAINS", 1), ("RESCALE", int(early))]
        return values + [("TURNS", 1)] if turns else values
    if nwg == 3:
        return values + [("EXP2POLY", poly), ("WARPGROUPS", 3)]
    if chains(spec, keys) == 2:
        return values + [("EXP2POLY", poly), ("WARPGROUPS", 2), ("CHAINS", 2)]
    return values + [("EXP2POLY", poly)] if poly else values


def mlx_kernel_name(values: list) -> str:
    """The name MLX's cuda_kernel gives an instance: "custom_kernel_" + our
    name + each template value (ints as numbers, bools as t / f)."""
    return "custom_kernel_mlx_flash_attention_fwd_ws" + "".join(
        "_" + (("t" if v else "f") if isinstance(v, bool) else str(v)) for _, v in values)


@functools.lru_cache(maxsize=None)
def _kernel(smem: int):
    return _cuda._kernel("attention_fwd_ws", INPUTS, OUTPUTS, smem)


def forward(q, k, v, spec: AttentionSpec, out_shape, lse_shape, stream):
    """(out, lse) of a call that serves() accepts."""
    d, dv = spec.head_dim_qk, spec.head_dim_v
    nwg = warpgroups(spec)
    rows, threads = 64 * nwg, 128 * (nwg + 1)
    row_blocks = math.ceil(spec.seqlen_q / rows)
    ip, fp = _cuda._param_arrays(spec, _cuda._NO_DIMS, _cuda._NO_DIMS)
    keys = keys_per_tile(spec, nwg)
    group = heads_per_section(spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_k, (d + dv) // 2)
    items = row_blocks * spec.heads_q * spec.batch
    blocks = blocks_for(items, d)
    dynamic = DYNAMIC and blocks < items
    tmpl = _templates(spec.batch, spec.heads_q, spec.heads_kv, spec.seqlen_q, spec.seqlen_k, d, dv, keys, group,
                      TRACE is not None, dynamic, rows)
    tickets = _cuda._ticket_region(stream) if dynamic else _cuda._placeholder(mx.uint32)
    kernel, inputs = _kernel(smem_bytes(d, keys, dv, rows)), [q, k, v, ip, fp, tmpl, tickets]
    values = template(spec, nwg, keys)
    grid, tg = (blocks * threads, 1, 1), (threads, 1, 1)
    shapes, dtypes = [out_shape, lse_shape, (blocks * SLOT_BYTES,)], [spec.dtype, mx.float32, mx.uint8]
    init = float("nan") if POISON_OUTPUTS else None
    outputs = kernel(inputs=inputs, template=values, grid=grid, threadgroup=tg, output_shapes=shapes,
                     output_dtypes=dtypes, init_value=init, stream=stream)
    if TRACE is not None:
        TRACE.append(outputs[2])
    elif _cuda._host.RECORDING is not None and _cuda._host.PREFILL:  # cuda_host.py replays the call (the default)
        _cuda._host.note_launch(kernel, inputs, outputs, stream, values, grid, tg, shapes, dtypes, init)
    return outputs[0], outputs[1]
