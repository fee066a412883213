"""Run every mlx-lm model's attention through `mlx_flash.flash_attention`.

    import mlx_flash
    mlx_flash.patch_mlx_lm()            # from here on, for the whole process
    with mlx_flash.patch_mlx_lm():      # or only inside the block
        ...

Calls nest: a scoped patch inside a global one (or another scoped one)
applies its own `fp8_weights` inside its block and leaves the outer patch as
it was on exit.

What gets swapped:

* `mlx_lm.models.base.scaled_dot_product_attention`, which nearly every
  model calls. Model modules bind it by name at import
  (`from .base import scaled_dot_product_attention`), so the binding in every
  module already in `sys.modules` is swapped too; modules imported later
  read the patched base and bind the replacement themselves.
* `mlx_lm.models.base.create_causal_mask` (and its binding in
  `mlx_lm.models.cache`) and `BatchRotatingKVCache.make_mask`, which then
  return `_lm_masks.CausalMaskDescription`: mlx-lm's lazy mask array with
  its meaning (causal offset, window, per-sequence padding) attached, which
  the attention reads as `causal`/`window`/`key_start`/`key_len` without
  evaluating the array.
* `mlx_flash.nn.FP8Linear` gains `to_lora` (`_lm_lora`), so mlx-lm's
  `linear_to_lora_layers` (`mlx_lm.lora`, `load_adapters`) puts LoRA on
  fp8-weight layers: the fp8 matmul forward, gradients to the adapters only.
* Attention modules that compute attention inline (`_lm_models`, e.g.
  Gemma 2's softcapped scores): their `__call__` is replaced, in modules
  already imported and, through an import hook, in ones imported later.

With `patch_mlx_lm(fp8_weights=True)`, models loaded through mlx-lm
(`mlx_lm.load` / `mlx_lm.utils.load_model`) while patched also get their
`nn.Linear` layers converted to `mlx_flash.nn.FP8Linear` (fp8 E4M3 weights,
per-channel scales); `convert_model_to_fp8(model)` does the same to a model
already in memory. Restoring does not convert a model back.

Calls with a `QuantizedKVCache` (`generate(..., kv_bits=...)`) go to
`flash_attention_quantized` on the cache's (data, scales, biases) triples
(CPU, Metal and CUDA; on a backend without that kernel they go back to
mlx-lm, counted).

No model module is imported to do this (some exit the process when an
optional dependency is missing). Calls the op cannot take (head dims over
the backend's limit, quantized KV caches on a backend without that kernel,
...) run mlx-lm's own code and are counted in
`patch_stats()` and logged once per reason. Leaving the context manager (or
`unpatch_mlx_lm()`) restores every original, including bindings made by
modules imported while patched.

Not covered: the few models that call `mx.fast.scaled_dot_product_attention`
directly (deepseek_v41, muse_spark, plamo2) or do inline attention not listed
in `_lm_models` (olmo, phi3small); they keep MLX's attention (a mask
description is an `mx.array`, so they read it as before).
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from typing import Callable, List

from . import _lm_attend
from ._lm_masks import CACHE_METHODS, make_describing_create_causal_mask
from ._lm_models import INLINE_ATTENTION

SDPA_NAME = "scaled_dot_product_attention"
MASK_NAME = "create_causal_mask"
_ABSENT = object()  # an attribute the patch added (removed again on restore)


def _method_patches(module_name) -> dict:
    """{(class name, method name): replacement} for one module."""
    patches = {(cls, "__call__"): r for cls, r in INLINE_ATTENTION.get(module_name, {}).items()}
    patches.update(CACHE_METHODS.get(module_name, {}))
    return patches


def _make_flash_sdpa(original: Callable) -> Callable:
    """A drop-in for mlx-lm's `scaled_dot_product_attention` (same signature)."""

    @functools.wraps(original)
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        return _lm_attend.attend(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks,
            fallback=lambda mask_array: original(queries, keys, values, cache, scale, mask_array, sinks),
        )

    return scaled_dot_product_attention


def _fp8_to_lora(self, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
    """`FP8Linear.to_lora` while patched (see `_lm_lora`)."""
    # Imported on use: mlx-lm's tuner imports a model module, which patching must not.
    from ._lm_lora import fp8_to_lora

    return fp8_to_lora(self, r=r, scale=scale, dropout=dropout)


def _bind_original(original: Callable, replacement: Callable) -> Callable:
    def __call__(self, *args, **kwargs):
        return replacement(original, self, *args, **kwargs)

    functools.update_wrapper(__call__, original)
    return __call__


class _PatchingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then patches the fresh module."""

    def __init__(self, loader, on_load):
        self._loader = loader
        self._on_load = on_load

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._on_load(module)

    def __getattr__(self, name):
        # get_source, get_code, resource readers, ...: the real loader's.
        return getattr(self._loader, name)


class _InlineModelHook(importlib.abc.MetaPathFinder):
    """Import hook for the modules in INLINE_ATTENTION / CACHE_METHODS imported while patched."""

    def __init__(self, on_load):
        self._on_load = on_load

    def find_spec(self, fullname, path, target=None):
        if fullname not in INLINE_ATTENTION and fullname not in CACHE_METHODS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, self._on_load)
        return spec


class MlxLmPatch:
    """One layer of the patch; a context manager that takes its layer off on exit.

    The first `patch_mlx_lm()` routes attention (and, with `fp8_weights`,
    model loading). A `patch_mlx_lm()` while patched adds a layer that
    changes only what it asks differently (fp8 loading switched on or off for
    its scope) and leaves the rest to the layers below. Layers come off in
    reverse order: restoring one also restores every layer made after it, so
    `unpatch_mlx_lm()` (restoring the first) puts mlx-lm back entirely.
    """

    def __init__(self, fp8_weights: bool, routes_attention: bool):
        self.fp8_weights = fp8_weights
        self.routes_attention = routes_attention  # the first layer; the others keep its routing
        self._undo = []  # (object, attribute, value to put back)
        self._swaps = {}  # module-level name -> (function in place before, replacement)
        self._hook = None

    def _apply(self, fp8_below: bool):
        if self.routes_attention:
            from mlx_lm.models import base  # imports no model module

            self._swap(base, SDPA_NAME, _make_flash_sdpa)
            # Bound by name in mlx_lm.models.cache too; both are swapped below.
            self._swap(base, MASK_NAME, make_describing_create_causal_mask)
            # mlx-lm's linear_to_lora_layers converts layers that have `to_lora`.
            from .nn import FP8Linear

            self._set(FP8Linear, "to_lora", _fp8_to_lora)
        if self.fp8_weights != fp8_below:
            from mlx_lm import utils as lm_utils  # `mlx_lm.load` calls it by this name

            # On: wrap the loader. Off inside an fp8 layer: put the unwrapped loader in place.
            self._swap(lm_utils, "load_model",
                       _converting_to_fp8 if self.fp8_weights else (lambda converting: converting.__wrapped__))
        for module in list(sys.modules.values()):
            if module is not None:
                self._patch_module(module)
        if self.routes_attention:
            self._hook = _InlineModelHook(self._patch_module)
            sys.meta_path.insert(0, self._hook)

    def _swap(self, module, name, make_replacement):
        current = getattr(module, name)
        self._swaps[name] = (current, make_replacement(current))

    def _set(self, obj, name, value):
        self._undo.append((obj, name, getattr(obj, name, _ABSENT)))
        setattr(obj, name, value)

    def _patch_module(self, module):
        # vars(), not getattr(): lazy modules (transformers) import on getattr.
        namespace = getattr(module, "__dict__", {})
        for name, (current, replacement) in self._swaps.items():
            if namespace.get(name) is current:
                self._set(module, name, replacement)
        if not self.routes_attention:
            return
        for (class_name, method), replacement in _method_patches(namespace.get("__name__")).items():
            cls = namespace.get(class_name)
            if cls is not None:
                self._set(cls, method, _bind_original(getattr(cls, method), replacement))

    @property
    def active(self) -> bool:
        return self in _layers

    def restore(self):
        """Take this layer and every layer made after it off (a no-op once off)."""
        if self not in _layers:
            return
        while True:
            layer = _layers.pop()
            layer._take_off()
            if layer is self:
                return

    def _take_off(self):
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        for obj, name, value in reversed(self._undo):
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        # Modules imported while patched bound the replacements themselves.
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", {})
            for name, (current, replacement) in self._swaps.items():
                if namespace.get(name) is replacement:
                    setattr(module, name, current)
        self._undo.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def convert_model_to_fp8(model, fmt: str = "e4m3", activations=None):
    """Swap an mlx-lm model's `nn.Linear` layers for `FP8Linear`, in place.

    Layers the model keeps unquantized (its `quant_predicate`, e.g. MoE
    routers) stay as they are. `activations` as FP8Linear's (None, or an fp8
    format: prefill and training calls quantize their input). Returns the model.
    """
    from .nn import convert_to_fp8

    keep = getattr(model, "quant_predicate", None)
    predicate = None if keep is None else (lambda path, module: bool(keep(path, module)))
    return convert_to_fp8(model, fmt=fmt, predicate=predicate, activations=activations)


def _converting_to_fp8(load_model: Callable) -> Callable:
    @functools.wraps(load_model)
    def wrapper(*args, **kwargs):
        model, config = load_model(*args, **kwargs)
        return convert_model_to_fp8(model), config

    return wrapper


_layers: List[MlxLmPatch] = []  # the active patch, first layer first


def patch_mlx_lm(*, fp8_weights: bool = False) -> MlxLmPatch:
    """Route mlx-lm attention through `flash_attention` from now on.

    Args:
      fp8_weights: also convert the `nn.Linear` layers of models loaded
        through mlx-lm while patched to `mlx_flash.nn.FP8Linear`.

    Returns a handle; use it as a context manager (or call `.restore()`) to
    undo it. Calls nest: inside an active patch (global or scoped) another
    `patch_mlx_lm(...)` applies its own `fp8_weights` for its scope and, on
    exit, leaves the outer patch as it was. Needs mlx-lm
    (`pip install mlx_flash[lm]`).
    """
    if not isinstance(fp8_weights, bool):
        raise TypeError(f"fp8_weights: expected a bool, got {type(fp8_weights).__name__}")
    layer = MlxLmPatch(fp8_weights, routes_attention=not _layers)
    try:
        layer._apply(fp8_below=_layers[-1].fp8_weights if _layers else False)
    except BaseException:
        layer._take_off()
        raise
    _layers.append(layer)
    return layer


def unpatch_mlx_lm() -> bool:
    """Restore mlx-lm entirely (every layer); False if it was not patched."""
    if not _layers:
        return False
    _layers[0].restore()
    return True


def is_mlx_lm_patched() -> bool:
    return bool(_layers)


def patch_stats() -> dict:
    """Calls routed since the last reset: `{"flash_calls", "fallback_calls",
    "fallbacks": {reason: count}, "mask_materialisations"}` (the last: masks
    described by the patch that model code then used as arrays). Counted when
    the Python code runs (once per trace under `mx.compile`)."""
    return _lm_attend.stats.snapshot()


def reset_patch_stats() -> None:
    _lm_attend.stats.reset()
