"""mlx-lm's causal masks described, not built, while the patch is on.

mlx-lm builds every non-trivial attention mask with
`mlx_lm.models.base.create_causal_mask(N, offset, window_size,
right_padding, left_padding)`: an `[N, offset + N]` (or `[B, 1, N, offset +
N]`) bool array for sliding windows, `return_array=True` callers and
`BatchKVCache`'s left padding. While patched, that function returns a
`CausalMaskDescription` instead. The attention replacement reads it as
`causal` + `window` + per-batch `key_start` / `key_len` (`op_arguments`), so
no N x N array exists and the kernels skip the tiles outside the window.

Model code that uses the mask as an array (`mask[..., -n:]`, `mask + x`,
`mx.where(mask, ...)`, `mask.astype(...)`, ...) still gets one: the
description builds it with mlx-lm's own function the first time, counts
that in `patch_stats()["mask_materialisations"]` and keeps it. `shape`,
`dtype`, `ndim` and `size` are answered without building anything.
"""

from __future__ import annotations

import numbers
import operator

import mlx.core as mx


class CausalMaskDescription:
    """What `create_causal_mask(n, offset, window_size, right_padding,
    left_padding)` would return, without the array until one is needed."""

    def __init__(self, build, n, offset, window_size, right_padding, left_padding):
        self._build = build  # mlx-lm's create_causal_mask
        self.n, self.offset, self.window_size = n, offset, window_size
        self.right_padding, self.left_padding = right_padding, left_padding
        self._array = None

    # ---- read by the patch's attention

    def op_arguments(self, nq: int, nk: int):
        """`flash_attention` keyword arguments meaning this mask for a call with
        nq queries and nk keys, or None if the call's shape is not the mask's."""
        if nq != self.n or nk != self.offset + self.n:
            return None
        args = {"causal": True}
        if self.window_size is not None:
            # mlx-lm keeps key j for query position p when p - j < window_size.
            args["window"] = (self.window_size - 1, 0)
        if self.left_padding is not None or self.right_padding is not None:
            start = self.left_padding if self.left_padding is not None else mx.zeros_like(self.right_padding)
            end = nk if self.right_padding is None else nk - self.right_padding
            args["key_start"], args["key_len"] = start, end - start
        return args

    # ---- an array when used as one

    def array(self) -> mx.array:
        if self._array is None:
            from ._lm_attend import stats  # (that module imports this one)

            stats.count_materialisation()
            self._array = self._build(self.n, self.offset, self.window_size,
                                      self.right_padding, self.left_padding)
        return self._array

    def __mlx_array__(self):
        return self.array()

    @property
    def shape(self):
        cols = self.offset + self.n
        padding = self.left_padding if self.left_padding is not None else self.right_padding
        return (self.n, cols) if padding is None else (padding.shape[0], 1, self.n, cols)

    @property
    def dtype(self):
        return mx.bool_

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        size = 1
        for d in self.shape:
            size *= d
        return size

    def __getitem__(self, index):
        return self.array()[index]

    def __getattr__(self, name):
        # astype, reshape, sum, ... : those of the array (built once).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.array(), name)

    def __repr__(self):
        return (f"CausalMaskDescription(n={self.n}, offset={self.offset}, window_size={self.window_size}, "
                f"left_padding={self.left_padding is not None}, right_padding={self.right_padding is not None})")


def _forward(op):
    return lambda self, other: op(self.array(), other)


def _reflected(op):
    return lambda self, other: op(other, self.array())


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("and", operator.and_), ("or", operator.or_),
                   ("xor", operator.xor)):
    setattr(CausalMaskDescription, f"__{_name}__", _forward(_op))
    setattr(CausalMaskDescription, f"__r{_name}__", _reflected(_op))
for _name, _op in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt), ("le", operator.le),
                   ("gt", operator.gt), ("ge", operator.ge)):
    setattr(CausalMaskDescription, f"__{_name}__", _forward(_op))
CausalMaskDescription.__invert__ = lambda self: ~self.array()
CausalMaskDescription.__hash__ = object.__hash__


def _describable(n, offset, window_size, right_padding, left_padding) -> bool:
    ints = isinstance(n, numbers.Integral) and isinstance(offset, numbers.Integral)
    window_ok = window_size is None or (isinstance(window_size, numbers.Integral) and window_size >= 1)
    pads = [p for p in (right_padding, left_padding) if p is not None]
    pads_ok = all(isinstance(p, mx.array) and p.ndim == 1 and mx.issubdtype(p.dtype, mx.integer) for p in pads)
    same_batch = len(pads) < 2 or pads[0].shape == pads[1].shape
    return ints and window_ok and pads_ok and same_batch


def make_describing_create_causal_mask(original):
    """A `create_causal_mask` (same signature) that returns a description."""

    def create_causal_mask(N, offset=0, window_size=None, right_padding=None, left_padding=None):
        if not _describable(N, offset, window_size, right_padding, left_padding):
            return original(N, offset, window_size, right_padding, left_padding)
        # Snapshots: caches update their padding arrays in place (`-=`), and the
        # description may be read after the update.
        snapshot = lambda p: None if p is None else mx.array(p)  # noqa: E731
        return CausalMaskDescription(original, int(N), int(offset), window_size, snapshot(right_padding),
                                     snapshot(left_padding))

    create_causal_mask.__wrapped__ = original
    create_causal_mask.__doc__ = original.__doc__
    return create_causal_mask


def as_array(mask):
    """The mask as mlx-lm's own code takes it (an array, a string or None)."""
    return mask.array() if isinstance(mask, CausalMaskDescription) else mask


def batch_rotating_make_mask(original, self, N, window_size=None, return_array=False):
    """`BatchRotatingKVCache.make_mask` while patched: a description unless rotated.

    mlx-lm builds this mask inline: causal over `min(max_size - 1, offset) +
    N` keys, the window (default max_size), and left padding shifted by what
    the update will trim. Only a single-token step over a rotated buffer
    needs its own (rolled) array, which is `[B, 1, 1, Nk]`, never N x N.
    """
    if N == 1 and (self.rotated or self._idx >= self.max_size):
        return original(self, N, window_size=window_size, return_array=return_array)
    left_padding = self.left_padding
    trim = self._idx - self.max_size + int(N > 1)
    if trim > 0:
        left_padding = left_padding - trim
    offset = min(self.max_size - 1, self._offset)
    window = window_size or self.max_size
    from mlx_lm.models import base  # its create_causal_mask: the describing one while patched

    return base.create_causal_mask(N, offset, window, None, left_padding)


# Cache methods replaced while patched: {module: {(class, method): replacement}};
# a replacement receives the original method first.
CACHE_METHODS = {
    "mlx_lm.models.cache": {("BatchRotatingKVCache", "make_mask"): batch_rotating_make_mask},
}
