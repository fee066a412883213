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
