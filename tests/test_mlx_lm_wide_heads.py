"""Multi-head latent attention at DeepSeek-V3 / Kimi K2's widths, patched.

mlx-lm runs MLA's decode "absorbed": queries are projected into the
512-wide latent and attend over the latent cache as MQA, so the attention
call has Dqk = Dv = kv_lora_rank = 512 (the RoPE part arrives as an
additive mask); prefill attends with Dqk = qk_nope_head_dim, Dv =
v_head_dim. With head dims up to 576/512 on the CPU every call is fused,
and logits match mlx-lm's own.
"""

from __future__ import annotations

import pytest

mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as lm_cache  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash import _lm_attend  # noqa: E402

from test_mlx_lm_patch import assert_close, build, run_chunks, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_only", "fresh_stats")

# The real models' attention widths (kv_lora_rank 512, nope 128, rope 64, v 128)
# on a tiny body: 2 layers, 4 heads, hidden 64.
WIDE_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


# mlx-lm maps Kimi K2's model_type onto deepseek_v3's code.
@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k2"])
def test_mla_prefill_and_absorbed_decode_fused_and_match(model_type, monkeypatch):
    model = build("deepseek_v3", model_type=model_type, **WIDE_MLA)
    x = tokens(19)
    chunks = [x[:, :11], x[:, 11:14]] + [x[:, i:i + 1] for i in range(14, 19)]
    expected = run_chunks(model, chunks, lm_cache.make_prompt_cache(model))
    dims = []
    original = _lm_attend.flash_attention
    monkeypatch.setattr(_lm_attend, "flash_attention",
                        lambda q, k, v, **kw: dims.append((q.shape[-1], v.shape[-1])) or original(q, k, v, **kw))
    with mlx_flash.patch_mlx_lm():
        got = run_chunks(model, chunks, lm_cache.make_prompt_cache(model))
    for g, e in zip(got, expected):
        assert_close(g, e, tol=5e-5)
    stats = mlx_flash.patch_stats()
    assert stats["flash_calls"] == len(chunks) * 2 and stats["fallback_calls"] == 0, stats
    assert set(dims) == {(128, 128), (512, 512)}  # prefill chunks, then absorbed decode steps


def test_metal_takes_mla_widths_and_the_quantized_path_keeps_its_own(monkeypatch):
    """On Metal the patch hands MLA's 576/512 and 512/512 calls to the fused op
    (its kernels take them); only a quantized cache past the quantized
    kernels' 256 still goes back to mlx-lm, saying why."""
    import mlx.core as mx

    from mlx_flash import dispatch

    monkeypatch.setattr(dispatch, "backend_name", lambda stream: "metal")
    for dqk, dv in ((576, 512), (512, 512), (192, 128)):
        q, v = mx.zeros((1, 4, 1, dqk)), mx.zeros((1, 1, 3, dv))
        k = mx.zeros((1, 1, 3, dqk))
        assert _lm_attend.unsupported_reason(q, k, v, None, 0.1, mask=None) is None, (dqk, dv)
    wide = mx.zeros((1, 2, 1, 640))
    assert _lm_attend.unsupported_reason(wide, wide, wide, None, 0.1, mask=None) == \
        "head dims 640/640 over metal's 576/512"
    cache = lm_cache.QuantizedKVCache(group_size=64, bits=4)
    q = mx.zeros((1, 4, 1, 576))
    assert _lm_attend.unsupported_reason(q, q, q, cache, 0.1, mask=None) == "head dim 576 over metal's 256"
