"""Record and replay of CUDA launches: a repeated decode call built in C++.

A decode step calls attention once per layer with the same shapes and
options; the Python path (validation, plan lookups, mx.custom_function, the
kernel call) costs 15-50 us of host time per call on the H200, more than the
~50 us kernel where calls are queued. With the extension
`mlx_flash._cuda_host` (csrc/cuda_host.cpp) the entry points first ask it for
the call:

* a *hit* (a call whose key was recorded: same array shapes and dtypes, same
  option values and types, same stream or default device and stream) gets
  the recorded call's graph built in C++: the kernel nodes with the Python
  path's kernel primitives (same name, source, launch shape), over the same
  inputs (the caller's arrays, the same mx.contiguous nodes, the very constant
  arrays the Python path made, the ticket pool's next region), inside the
  custom function's own stop_gradient and CustomTransforms primitives (its
  Python vjp gives the gradients); where no input is a tracer (no grad,
  vmap or compile follows the call) those three nodes are left out and the
  kernel's out and lse are returned (MLX_FLASH_CUDA_HOST_SHORT=0 keeps
  them). Same kernels, bit-identical results, no
  validation (a hit has the shapes, dtypes and options of a call that passed
  it; values are never validated);
* a call whose key was not recorded but differs from a recorded decode call
  only in its key count (k's and v's axis 2; a KV cache one key longer each
  generation step) replays that call where the count lies in its *key-count
  family*'s range: the decode launch sites note (`note_key_count`) the int
  parameter block and the key counts their launch serves unchanged (the same
  split count: cuda.decode_key_range, cuda_quant.decode_key_range), and the
  replay writes that block anew on the host for the new count (as the Python
  path's length_array). Untraced calls only (a traced one needs the custom
  function's vjp, whose closure holds the recorded count), and only calls
  whose shapes and checks depend on the key count through k and v alone (no
  mask, block mask, key ranges or varlen);
* a *miss* runs the Python path while the launch sites note what they launch
  (`note_launch`, `note_ticket_region`), then `record` stores the call. A
  call whose forward is not exactly noted launches over caller arrays and
  constants (a prefill kernel without a hook, a dtype cast in validation, the
  same array passed twice, ...) is stored as "always Python";
* without the extension (macOS, a build with -DMLXF_CUDA_HOST=OFF, or
  MLX_FLASH_CUDA_HOST=0) every call takes the Python path: the same kernels
  and the same numbers, only slower to build.

Replay is off while cuda.DECODE_TUNING or cuda_quant.TUNING hold overrides
(tuning sweeps change plans without changing keys). Every other module
setting the plans read (the attributes of cuda, cuda_fwd_ws, cuda_quant and
this module, and cuda_fwd_ws's plan dicts) is watched: any assignment bumps
SETTINGS_EPOCH, which every key holds, so a call recorded under the old
settings is another key and is recorded anew.
"""

from __future__ import annotations

import atexit
import os
import types

try:
    if os.environ.get("MLX_FLASH_CUDA_HOST", "1") == "0":
        raise ImportError("MLX_FLASH_CUDA_HOST=0")
    from .. import _cuda_host as HOST
except ImportError:  # not built (macOS, MLXF_CUDA_HOST=OFF) or switched off: the Python path
    HOST = None

# On by default since session 12 (MLX_FLASH_CUDA_HOST_PREFILL=0 turns it off):
# the tensor-core forwards (the warp-specialised, wgmma and mma kernels of
# prefill and training calls) note their launch too, so their repeated calls
# replay like decode calls. On an H100 (session 12) the replay's GPU tests
# passed bit-identical to the Python path, and the host-bound (4,16,1024,64)
# forward went from 0.52-0.60x mx.fast to 0.75-0.81x (fwd+bwd within noise;
# benchmarks/results/cuda_small_prefill_nvidia_h100_s12.json). Off, those
# calls note nothing and their keys are stored "always Python". A recorded
# forward replays with the plan it was recorded with; any assignment to a
# watched module's setting (cuda_fwd_ws's knobs, POISON_OUTPUTS) bumps
# SETTINGS_EPOCH, which every key holds, so the call is recorded anew.
# cuda_fwd_ws.TRACE calls are never noted.
_PREFILL = os.environ.get("MLX_FLASH_CUDA_HOST_PREFILL", "1")
if _PREFILL not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_HOST_PREFILL: expected 0 or 1, got {_PREFILL!r}")
PREFILL = _PREFILL == "1"

# Key-count families (the module docstring): MLX_FLASH_CUDA_HOST_KEY_COUNTS=0
# records each key count of a growing cache anew (the Python path once a step).
_KEY_COUNTS = os.environ.get("MLX_FLASH_CUDA_HOST_KEY_COUNTS", "1")
if _KEY_COUNTS not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_HOST_KEY_COUNTS: expected 0 or 1, got {_KEY_COUNTS!r}")
KEY_COUNTS = _KEY_COUNTS == "1"

# Untraced replays without the custom function's nodes (see set_short_graph below).
_SHORT = os.environ.get("MLX_FLASH_CUDA_HOST_SHORT", "1")
if _SHORT not in ("0", "1"):
    raise ValueError(f"MLX_FLASH_CUDA_HOST_SHORT: expected 0 or 1, got {_SHORT!r}")

# Creation arguments of every kernel object cuda.py's _kernel made, by id():
# (name, input names, output names, source, header, ensure_row_contiguous, shared memory).
# The objects live in _kernel's cache for the process, so their ids stay theirs.
KERNEL_SPECS: dict = {}

# While a missed call runs the Python path: the launches noted so far, and
# the ticket pool region taken (None otherwise).
RECORDING = None
_TICKET = None
_KEY_COUNT = None  # note_key_count's (block, values, index, lo, hi), or None


def note_launch(kernel, inputs, outputs, stream, template=None, grid=None, threadgroup=None, output_shapes=None,
                output_dtypes=None, init_value=None):
    """Called by a launch site right after `kernel(...)` while RECORDING is not None."""
    RECORDING.append((KERNEL_SPECS.get(id(kernel)), list(inputs), list(outputs),
                      None if template is None else list(template), tuple(grid), tuple(threadgroup),
                      [tuple(s) for s in output_shapes], list(output_dtypes), init_value, stream))


def note_ticket_region(pool, region):
    """Called by cuda._ticket_region while RECORDING is not None."""
    global _TICKET
    _TICKET = (pool, region)


def note_key_count(block, values, index, lo, hi):
    """Called by the decode launch while RECORDING is not None: the recorded
    launches serve every key count in lo..hi but for the int parameter block
    `block` (a launch input holding `values`, the key count at `index`), which
    a replay at another key count of the range writes anew on the host."""
    global _KEY_COUNT
    if KEY_COUNTS:
        _KEY_COUNT = (block, list(values), index, lo, hi)


# The settings generation every key holds (csrc/cuda_host.cpp reads it per call).
SETTINGS_EPOCH = [0]


def _bump():
    SETTINGS_EPOCH[0] += 1


class _WatchedModule(types.ModuleType):
    """A settings module whose attribute assignments (module.X = ...,
    monkeypatch.setattr) bump SETTINGS_EPOCH. The modules never rebind their
    own settings (`global` writes would bypass this)."""

    def __setattr__(self, name, value):
        _bump()
        super().__setattr__(name, value)

    def __delattr__(self, name):
        _bump()
        super().__delattr__(name)


class _WatchedDict(dict):
    """A plan dict (cuda_fwd_ws.STAGES, ...) whose changes bump SETTINGS_EPOCH."""

    def _changing(method):  # noqa: N805 (a decorator inside the class body)
        def changed(self, *args, **kwargs):
            _bump()
            return method(self, *args, **kwargs)

        return changed

    __setitem__ = _changing(dict.__setitem__)
    __delitem__ = _changing(dict.__delitem__)
    __ior__ = _changing(dict.__ior__)
    update = _changing(dict.update)
    pop = _changing(dict.pop)
    popitem = _changing(dict.popitem)
    clear = _changing(dict.clear)
    setdefault = _changing(dict.setdefault)
    del _changing


# The modules whose settings the recorded plans read, with their mutable plan dicts.
_WATCHED = {"mlx_flash.backends.cuda": (),
            "mlx_flash.backends.cuda_fwd_ws": ("WIDE_KEYS", "WIDE_KEYS_WINDOW", "STAGES", "EXP2_POLY"),
            "mlx_flash.backends.cuda_quant": (),
            __name__: ()}


def watch_settings():
    """Make the settings modules bump SETTINGS_EPOCH on every change (once,
    before the first record: a change before any record needs no new key)."""
    import importlib

    for name, dicts in _WATCHED.items():
        module = importlib.import_module(name)
        for d in dicts:
            if not isinstance(getattr(module, d), _WatchedDict):
                setattr(module, d, _WatchedDict(getattr(module, d)))
        if not isinstance(module, _WatchedModule):
            module.__class__ = _WatchedModule
    HOST.set_settings_epoch(SETTINGS_EPOCH)


def _tuning_dicts() -> list:
    from . import cuda, cuda_quant

    return [cuda.DECODE_TUNING, cuda_quant.TUNING]


def _cuda_available() -> bool:
    import mlx.core as mx

    return hasattr(mx, "cuda") and mx.cuda.is_available()


# The entry points (attention.py, attention_quantized.py) ask the extension
# only where MLX has a CUDA GPU: elsewhere nothing would ever be recorded.
ACTIVE = HOST if HOST is not None and _cuda_available() else None
_TUNING_SET = False

if HOST is not None:
    # Replayed kernel nodes share the Python path's CustomKernel primitive (same
    # name, source and launch shape; MLX assembles no source per call), or with
    # MLX_FLASH_CUDA_HOST_KERNEL=1 are built by mx::fast::cuda_kernel per call
    # from the kernel object's creation arguments (KERNEL_SPECS): same node state.
    HOST.set_reuse_primitives(os.environ.get("MLX_FLASH_CUDA_HOST_KERNEL", "0") != "1")
    # An untraced replay (no primal is a tracer: no grad, vmap or compile is
    # following the call) returns the kernel's out and lse without the custom
    # function's three nodes (MLX_FLASH_CUDA_HOST_SHORT=0 keeps them); a
    # traced one builds them, so gradients still run the custom vjp.
    HOST.set_short_graph(_SHORT == "1")
    atexit.register(HOST.clear)  # records hold Python objects: drop them while Python runs


def recorded(key, slots, run):
    """Run the Python path (`run()` -> (out, lse) of the custom function) for a
    missed call and record it under `key`. `slots` are the call's array
    arguments in the extension's order. Returns (out, lse) and why the call is
    not replayable ("" when it is)."""
    global RECORDING, _TICKET, _KEY_COUNT, _TUNING_SET
    if not _TUNING_SET:  # here, not at import: cuda.py and cuda_quant.py import this module
        HOST.set_tuning(_tuning_dicts())
        watch_settings()
        _TUNING_SET = True
    RECORDING, _TICKET, _KEY_COUNT = [], None, None
    try:
        out, lse = run()
        launches, ticket, key_count = RECORDING, _TICKET, _KEY_COUNT
    finally:
        RECORDING, _TICKET, _KEY_COUNT = None, None, None
    try:
        reason = HOST.record(key, slots, (out, lse), launches, ticket, key_count)
    except Exception as error:  # noqa: BLE001 (an argument the record cannot take: the key stays Python's)
        reason = f"{type(error).__name__}: {error}"
    return out, lse, reason


def stats() -> dict:
    """Hits, misses and records so far (for tools/host_cost.py); empty without the extension."""
    if HOST is None:
        return {}
    hits, misses, records, replayable = HOST.stats()
    shorts, short_on = HOST.short_graph_stats()
    key_count_hits, families = HOST.key_count_stats()
    return {"hits": hits, "misses": misses, "records": records, "replayable": replayable, "short_replays": shorts,
            "short_graph": short_on, "key_count_hits": key_count_hits, "key_count_families": families}
