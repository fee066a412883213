"""Small inputs of the Metal kernels: parameter arrays and placeholders.

MLX hands a kernel input of fewer than 8 elements over in the constant
address space, so every parameter array and every placeholder for an absent
optional input has at least MIN_DEVICE_ELEMS elements.

A decode step calls attention once per layer with the same shapes and
options, and each call used to build about ten such arrays (~1 us each of
host time, most of a decode call's Python on top of the kernels). MLX arrays
are immutable values, so one array per distinct content serves every call
that needs it: the kernels only read them. They are row-contiguous by
construction, which `is_constant` lets the wrappers skip checking.
"""

from __future__ import annotations

import collections
import math

import mlx.core as mx

MIN_DEVICE_ELEMS = 8
# Distinct parameter arrays kept (a decode step of a growing cache makes a new
# one per token; a model's layers share it within the step).
_CAPACITY = 256

_by_key: "collections.OrderedDict[tuple, mx.array]" = collections.OrderedDict()
# id() of every array in _by_key: an array leaves both together, so an id
# here always belongs to a live constant (never to a reused address).
_ids: set = set()


def _constant(key: tuple, make) -> mx.array:
    a = _by_key.get(key)
    if a is not None:
        _by_key.move_to_end(key)
        return a
    a = make()
    _by_key[key] = a
    _ids.add(id(a))
    if len(_by_key) > _CAPACITY:
        _, old = _by_key.popitem(last=False)
        _ids.discard(id(old))
    return a


def is_constant(a) -> bool:
    """Whether `a` is one of this module's arrays (row-contiguous, >= MIN_DEVICE_ELEMS)."""
    return id(a) in _ids


_placeholders: dict = {}  # dtype -> array, kept for the process (a handful)


def placeholder(dtype) -> mx.array:
    """Zeros of `dtype` for an optional input the kernel never reads."""
    a = _placeholders.get(dtype)
    if a is None:
        a = _placeholders[dtype] = mx.array([0] * MIN_DEVICE_ELEMS, dtype=dtype)
        _ids.add(id(a))  # never dropped: the id stays this array's
    return a


def int_params(values: tuple) -> mx.array:
    """An int32 parameter array holding `values`, zero-padded to MIN_DEVICE_ELEMS."""
    return _constant(("int32", values), lambda: mx.array(
        list(values) + [0] * (MIN_DEVICE_ELEMS - len(values)), dtype=mx.int32))


def float_params(values: tuple) -> mx.array:
    """A float32 parameter array holding `values`, zero-padded to MIN_DEVICE_ELEMS."""
    return _constant(("float32", values), lambda: mx.array(
        list(values) + [0.0] * (MIN_DEVICE_ELEMS - len(values)), dtype=mx.float32))


def broadcast_strides(name: str, shape) -> tuple:
    """Row-major element strides of an array of `shape` (None: absent, all 0),
    0 on dims of size 1 (they broadcast), as the kernels index masks."""
    if shape is None:
        return (0, 0, 0, 0)
    size = math.prod(shape)
    if size > 2**31 - 1:
        raise ValueError(
            f"{name}: {size} elements exceed the Metal kernels' 32-bit indexing (2^31 - 1); "
            f"pass it with size-1 (broadcast) dimensions where it does not vary"
        )
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(0 if n == 1 else step)
        step *= n
    return tuple(strides[::-1])
