"""mlx-lm's causal masks described, not built, while the patch is on.

mlx-lm builds every non-trivial attention mask with
`mlx_lm.models.base.create_causal_mask(N, offset, window_size,
right_padding, left_padding)`: an `[N, offset + N]` (or `[B, 1, N, offset +
N]`) bool array for sliding windows, `return_array=True` callers and
`BatchKVCache`'s left padding. While patched, that function returns a
`CausalMaskDescription`: an `mx.array` that is mlx-lm's own mask, still
lazy, carrying what it means. The attention replacement reads the meaning
(`op_arguments`: `causal` + `window` + per-batch `key_start` / `key_len`)
and never touches the array, so MLX never evaluates it: no N x N array
exists and the kernels skip the tiles outside the window.

Model code that uses the mask as an array gets exactly mlx-lm's array
(MLX evaluates it then), through any MLX function, as it would unpatched:
the description *is* an `mx.array` (a duck-typed stand-in was not enough:
many `mx.*` functions accept only real arrays). The first use through
Python (indexing, operators, array methods such as `astype`) counts in
`patch_stats()["mask_materialisations"]`; an `mx.*` function given the mask
(`mx.where(mask, ...)`) uses it too but MLX has no hook to count that, so
the count is a lower bound. `shape`, `dtype` and `ndim` cost nothing.
"""

from __future__ import annotations

import numbers

import mlx.core as mx


class CausalMaskDescription(mx.array):
    """`create_causal_mask(n, offset, window_size, right_padding, left_padding)`'s
    (lazy) array, with those arguments attached."""

    def __init__(self, lazy_mask: mx.array, n, offset, window_size, right_padding, left_padding):
        super().__init__(lazy_mask)
        self.n, self.offset, self.window_size = n, offset, window_size
        self.right_padding, self.left_padding = right_padding, left_padding
        self.counted = False

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

    def count_use(self):
        """Count this mask as built (once): model code used it as an array."""
        if not self.counted:
            self.counted = True
            from ._lm_attend import stats  # (that module imports this one)

            stats.count_materialisation()

    def __repr__(self):
        return (f"CausalMaskDescription(n={self.n}, offset={self.offset}, window_size={self.window_size}, "
                f"left_padding={self.left_padding is not None}, right_padding={self.right_padding is not None})")


def _counted(name):
    method = getattr(mx.array, name)

    def use(self, *args, **kwargs):
        self.count_use()
        return method(self, *args, **kwargs)

    use.__name__ = name
    return use


# Python-level uses of the mask as an array: counted, then the array's own.
_ARRAY_USES = (
    "__getitem__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__invert__",
    "__neg__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__matmul__", "__rmatmul__",
    "astype", "reshape", "flatten", "squeeze", "swapaxes", "transpose", "moveaxis", "sum", "any", "all",
    "max", "min", "tolist", "item", "__array__",
)
for _name in _ARRAY_USES:
    if hasattr(mx.array, _name):
        setattr(CausalMaskDescription, _name, _counted(_name))
CausalMaskDescription.__hash__ = mx.array.__hash__


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
        right_padding, left_padding = snapshot(right_padding), snapshot(left_padding)
        lazy_mask = original(N, offset, window_size, right_padding, left_padding)
        return CausalMaskDescription(lazy_mask, int(N), int(offset), window_size, right_padding, left_padding)

    create_causal_mask.__wrapped__ = original
    create_causal_mask.__doc__ = original.__doc__
    return create_causal_mask


def as_array(mask):
    """The mask as mlx-lm's own code takes it (a plain array, a string or None)."""
    if isinstance(mask, CausalMaskDescription):
        mask.count_use()
        return mx.array(mask)
    return mask


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
