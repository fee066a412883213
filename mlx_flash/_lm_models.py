"""Fused attention for mlx-lm models that compute attention inline.

Most mlx-lm models call `mlx_lm.models.base.scaled_dot_product_attention`,
which the patch swaps. A few build the scores themselves, because MLX's
fused op lacks a feature they need; those get their attention module's
`__call__` replaced here, keeping their projections, RoPE and cache update
as they are and handing the score-softmax-value part to the op.

`INLINE_ATTENTION` maps a module name to `{class name: replacement}`; a
replacement receives the original method as `original`, so a call the op
cannot take (e.g. head dims over 256) still runs mlx-lm's code, counted.
"""

from __future__ import annotations

from ._lm_attend import fused, stats, unsupported_reason
from ._lm_masks import as_array


def _split_heads(x, batch, length, heads):
    """[B, L, H * D] -> [B, H, L, D] (a transposed view, as mlx-lm makes)."""
    return x.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


def gemma2_attention(original, self, x, mask=None, cache=None):
    """Gemma 2: logits softcapped (`c * tanh(s / c)`) before the mask.

    MLX has no fused softcap, so mlx-lm materialises `[B, H, L, Nk]` scores;
    the op applies the softcap inside its tiles, forward and backward.
    """
    B, L, _ = x.shape
    queries = _split_heads(self.q_proj(x), B, L, self.n_heads)
    keys = _split_heads(self.k_proj(x), B, L, self.n_kv_heads)
    values = _split_heads(self.v_proj(x), B, L, self.n_kv_heads)
    # Decide before the cache is updated: the fallback updates it itself.
    # (Unused projections cost nothing: MLX evaluates lazily.)
    reason = unsupported_reason(queries, keys, values, cache, self.scale, mask=None)
    if reason is not None:
        stats.count_fallback(reason)
        return original(self, x, as_array(mask), cache)
    offset = 0 if cache is None else cache.offset
    queries = self.rope(queries, offset=offset)
    keys = self.rope(keys, offset=offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    out = fused(queries, keys, values, scale=self.scale, mask=mask,
                softcap=self.attn_logit_softcapping, cache=cache)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


INLINE_ATTENTION = {
    "mlx_lm.models.gemma2": {"Attention": gemma2_attention},
}
