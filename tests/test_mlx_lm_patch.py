"""mlx_flash.patch_mlx_lm(): patched models match mlx-lm's own attention.

Small random-initialised models built from config dicts (no downloads), one
per attention flavour mlx-lm has: plain causal (llama), GQA + q/k norms
(qwen3), sliding window with rotating caches (mistral via llama's
layer_types; gemma3_text's alternating pattern), softcapped inline attention (gemma2), attention sinks with
sliding layers (gpt_oss), latent attention with an additive mask
(deepseek_v3). All in float32 on the CPU, where the op and MLX's
materialised attention agree to rounding.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

mlx_lm = pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.models import base as lm_base  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.utils import _get_classes  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash import _lm_attend  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_only", "fresh_stats")

WINDOW = 8  # small, so short prompts already roll the rotating caches

_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, vocab_size=97)
CONFIGS = {
    "llama": dict(_COMMON, model_type="llama", tie_word_embeddings=False),
    "qwen3": dict(_COMMON, model_type="qwen3", max_position_embeddings=512,
                  tie_word_embeddings=True, rope_theta=10000.0),
    "mistral": dict(_COMMON, model_type="mistral", sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),
    # A small softcap so tanh bends the logits of a random model.
    "gemma2": dict(_COMMON, model_type="gemma2", attn_logit_softcapping=0.7,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16.0),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=WINDOW, rope_theta=10000),
    # Sliding layers (window 8, rotating caches) alternating with global ones.
    "gemma3_text": dict(_COMMON, model_type="gemma3_text", sliding_window=WINDOW,
                        sliding_window_pattern=2, query_pre_attn_scalar=16.0),
    # Multi-head latent attention: the RoPE part of the logits arrives as an
    # additive [B, H, Nq, Nk] mask (differentiated through), Dv != Dqk, and
    # decode attends over the latent cache as MQA.
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_key_value_heads=4,
                        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=24, max_position_embeddings=512),
}
MODELS = sorted(CONFIGS)


def build(name: str, seed: int = 0, **overrides):
    mx.random.seed(seed)
    config = dict(CONFIGS[name], **overrides)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    # Norm weights start at 1 (0 in Gemma's 1 + w) and sinks at 0: make every
    # parameter random so each feature actually moves the result.
    params = tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters())
    model.update(params)
    mx.eval(model.parameters())
    return model


def tokens(n: int, seed: int = 1, batch: int = 1):
    return mx.random.randint(0, 97, (batch, n), key=mx.random.key(seed))


def assert_close(a, b, tol=2e-5):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    err = mx.max(mx.abs(a - b)).item()
    scale = max(mx.max(mx.abs(b)).item(), 1.0)
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


def run_chunks(model, chunks, cache):
    """Logits of each chunk fed in turn through the cache."""
    outs = []
    for chunk in chunks:
        out = model(chunk, cache=cache)
        mx.eval(out)
        outs.append(out)
    return outs


def assert_all_fused():
    stats = mlx_flash.patch_stats()
    assert stats["flash_calls"] > 0 and stats["fallback_calls"] == 0, stats


# ---------------------------------------------------------------- logits

@pytest.mark.parametrize("name", MODELS)
def test_prompt_logits_match(name):
    model, x = build(name), tokens(23)
    expected = model(x)
    with mlx_flash.patch_mlx_lm():
        got = model(x)
    assert_close(got, expected)
    assert_all_fused()


# (Not the MoE models: MLX's CPU gather_mm is float32-only.)
@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_logits_as_accurate_as_mlx_lm(name, dtype):
    """In fp16/bf16 the patched model is no further from the float32 logits
    than mlx-lm's own attention in that dtype (twice its error at most)."""
    model, x = build(name), tokens(40)
    exact = model(x)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    plain = model(x)
    with mlx_flash.patch_mlx_lm():
        fused = model(x)
    err = lambda y: mx.max(mx.abs(y.astype(mx.float32) - exact)).item()  # noqa: E731
    assert fused.dtype == plain.dtype == dtype
    assert err(fused) <= 2 * err(plain) + 1e-3, (err(fused), err(plain))
    assert_all_fused()


@pytest.mark.parametrize("name", MODELS)
def test_cached_prefill_chunk_and_decode_match(name):
    """Prefill, a second multi-token chunk (Nq < Nk: bottom-right causal after
    the cache offset), then single-token decode steps past the window."""
    model, x = build(name), tokens(23)
    chunks = [x[:, :13], x[:, 13:18]] + [x[:, i:i + 1] for i in range(18, 23)]
    expected = run_chunks(model, chunks, lm_cache.make_prompt_cache(model))
    with mlx_flash.patch_mlx_lm():
        got = run_chunks(model, chunks, lm_cache.make_prompt_cache(model))
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_all_fused()


def test_rotating_cache_with_max_kv_size_matches():
    """A rotating cache on every layer (generate's max_kv_size), rotated in place."""
    model, x = build("llama"), tokens(30)
    chunks = [x[:, :12]] + [x[:, i:i + 1] for i in range(12, 30)]

    def caches():
        return lm_cache.make_prompt_cache(model, max_kv_size=16)

    expected = run_chunks(model, chunks, caches())
    with mlx_flash.patch_mlx_lm():
        got = run_chunks(model, chunks, caches())
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_all_fused()


def test_window_smaller_than_rotating_cache_matches():
    """A sliding layer whose rotating cache is larger than its window: decode
    steps get mlx-lm's rolled 1-D key mask."""
    model, x = build("mistral"), tokens(30)
    chunks = [x[:, :6]] + [x[:, i:i + 1] for i in range(6, 30)]

    def caches():
        return [lm_cache.RotatingKVCache(max_size=2 * WINDOW) if layer.use_sliding
                else lm_cache.KVCache() for layer in model.layers]

    expected = run_chunks(model, chunks, caches())
    with mlx_flash.patch_mlx_lm():
        got = run_chunks(model, chunks, caches())
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_all_fused()


def test_batch_cache_with_left_padding_matches():
    """BatchKVCache: per-row offsets arrive as a [B, 1, Nq, Nk] bool mask."""
    model = build("qwen3")
    x = tokens(11, batch=2)
    padding = [0, 4]

    def run():
        cache = [lm_cache.BatchKVCache(padding) for _ in model.layers]
        outs = run_chunks(model, [x[:, :9], x[:, 9:10], x[:, 10:11]], cache)
        # Padded query rows are garbage by design: compare real tokens only.
        return [outs[0][1:, 4:], outs[0][:1], outs[1], outs[2]]

    expected = run()
    with mlx_flash.patch_mlx_lm():
        got = run()
    for g, e in zip(got, expected):
        assert_close(g, e)
    assert_all_fused()


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_token_identical(name):
    from mlx_lm.generate import generate_step

    model, prompt = build(name), tokens(19)[0]

    def generate():
        steps = generate_step(prompt, model, max_tokens=12, prefill_step_size=8)
        return [int(tok) for tok, _ in steps]

    expected = generate()
    with mlx_flash.patch_mlx_lm():
        got = generate()
    assert got == expected
    assert_all_fused()


# ---------------------------------------------------------------- LoRA gradients

@pytest.mark.parametrize("name", MODELS)
def test_lora_gradients_match(name):
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build(name)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # LoRA's B starts at zero, which would zero the gradient of A.
    lora_b = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in
              tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.load_weights(lora_b, strict=False)
    batch, lengths = tokens(33, batch=2), mx.array([[0, 32], [0, 25]])

    loss_and_grad = nn.value_and_grad(model, lambda *a: default_loss(model, *a)[0])
    expected_loss, expected = loss_and_grad(batch, lengths)
    with mlx_flash.patch_mlx_lm():
        got_loss, got = loss_and_grad(batch, lengths)
    assert_close(got_loss, expected_loss)
    expected, got = dict(tree_flatten(expected)), dict(tree_flatten(got))
    assert expected.keys() == got.keys() and len(expected) > 0
    for key in expected:
        assert_close(got[key], expected[key], tol=1e-4)
    assert_all_fused()


# ---------------------------------------------------------------- restoring

def _attention_entry_points():
    from mlx_lm.models import gemma2, gpt_oss, llama, qwen3

    return {
        "base": lm_base.scaled_dot_product_attention,
        "llama": llama.scaled_dot_product_attention,
        "qwen3": qwen3.scaled_dot_product_attention,
        "gpt_oss": gpt_oss.scaled_dot_product_attention,
        "gemma2": gemma2.Attention.__call__,
    }


def test_originals_restored_after_context_manager():
    before = _attention_entry_points()
    with mlx_flash.patch_mlx_lm() as patch:
        assert patch.active and mlx_flash.is_mlx_lm_patched()
        during = _attention_entry_points()
        assert all(during[k] is not before[k] for k in before)
    assert _attention_entry_points() == before
    assert not mlx_flash.is_mlx_lm_patched()


def test_originals_restored_after_exception():
    before = _attention_entry_points()
    with pytest.raises(RuntimeError, match="boom"):
        with mlx_flash.patch_mlx_lm():
            raise RuntimeError("boom")
    assert _attention_entry_points() == before


def test_global_patch_and_nested_handle():
    before = _attention_entry_points()
    mlx_flash.patch_mlx_lm()
    mlx_flash.patch_mlx_lm()  # a second global call is one more layer, not an error
    with mlx_flash.patch_mlx_lm() as inner:
        assert inner.active and not inner.routes_attention
    # Leaving the nested handle keeps the outer patch.
    assert mlx_flash.is_mlx_lm_patched()
    assert _attention_entry_points()["llama"] is not before["llama"]
    assert mlx_flash.unpatch_mlx_lm()
    assert _attention_entry_points() == before
    assert not mlx_flash.unpatch_mlx_lm()


def _loads_fp8(path) -> bool:
    from mlx_lm import utils as lm_utils

    from mlx_flash.nn import FP8Linear

    model, _ = lm_utils.load_model(path)
    return isinstance(model.layers[0].self_attn.q_proj, FP8Linear)


def test_fp8_weights_scoped_inside_a_patch(tmp_path):
    """README's order: a global patch, then fp8 loading for one block only, and the reverse."""
    from mlx_lm import utils as lm_utils

    original_load = lm_utils.load_model
    _save_model(build("llama"), CONFIGS["llama"], tmp_path)
    before = _attention_entry_points()
    mlx_flash.patch_mlx_lm()
    routed = _attention_entry_points()
    with mlx_flash.patch_mlx_lm(fp8_weights=True):
        assert _loads_fp8(tmp_path) and _attention_entry_points() == routed
    assert not _loads_fp8(tmp_path) and lm_utils.load_model is original_load
    assert _attention_entry_points() == routed  # the global patch is still on
    mlx_flash.unpatch_mlx_lm()
    assert _attention_entry_points() == before

    with mlx_flash.patch_mlx_lm(fp8_weights=True):
        with mlx_flash.patch_mlx_lm(fp8_weights=False):
            assert not _loads_fp8(tmp_path) and lm_utils.load_model is original_load
        assert _loads_fp8(tmp_path)
    assert lm_utils.load_model is original_load and _attention_entry_points() == before


def test_restoring_an_outer_layer_restores_the_inner_ones():
    from mlx_lm import utils as lm_utils

    original_load = lm_utils.load_model
    before = _attention_entry_points()
    outer = mlx_flash.patch_mlx_lm()
    inner = mlx_flash.patch_mlx_lm(fp8_weights=True)
    assert lm_utils.load_model is not original_load
    outer.restore()
    assert not inner.active and not mlx_flash.is_mlx_lm_patched()
    assert lm_utils.load_model is original_load and _attention_entry_points() == before
    inner.restore()  # already off: a no-op
    assert _attention_entry_points() == before


def test_import_time_behaviour_in_a_fresh_interpreter():
    """Patching imports no model module; gemma2 (inline attention, via the
    import hook) and qwen2 (binds base's function at import) first imported
    while patched are patched, and restored on exit."""
    script = textwrap.dedent("""
        import sys
        import mlx_flash
        from mlx_lm.models import base
        models = lambda: {m for m in sys.modules if m.startswith("mlx_lm.models.")}
        before = models()
        with mlx_flash.patch_mlx_lm():
            pass
        assert models() == before, sorted(models() - before)
        original = base.scaled_dot_product_attention
        assert "mlx_lm.models.gemma2" not in sys.modules
        assert "mlx_lm.models.qwen2" not in sys.modules
        with mlx_flash.patch_mlx_lm():
            from mlx_lm.models import gemma2, qwen2
            assert qwen2.scaled_dot_product_attention is not original
            patched = gemma2.Attention.__call__
            assert patched.__wrapped__.__module__ == "mlx_lm.models.gemma2"
        assert qwen2.scaled_dot_product_attention is original
        assert gemma2.Attention.__call__ is patched.__wrapped__
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_cache_runs_fused(name, bits):
    """QuantizedKVCache calls go to flash_attention_quantized (no fallback)
    and match mlx-lm's own quantized path (Gemma 2's own attention cannot
    read a quantized cache at all; it is checked against a float cache
    holding the dequantized keys and values)."""
    # MLX quantizes along the head dim in groups of 32, 64 or 128.
    model, x = build(name, head_dim=32), tokens(9)
    chunks = [x[:, :7], x[:, 7:8], x[:, 8:9]]

    def caches():
        return [lm_cache.QuantizedKVCache(group_size=32, bits=bits) for _ in model.layers]

    with mlx_flash.patch_mlx_lm():
        got = run_chunks(model, chunks, caches())
    calls = len(chunks) * len(model.layers)
    assert mlx_flash.patch_stats() == {"flash_calls": calls, "fallback_calls": 0, "fallbacks": {},
                                       "mask_materialisations": 0}
    if name in ("gemma2", "gpt_oss"):
        # gpt_oss has sinks, which mlx-lm's quantized path refuses; gemma2
        # cannot read the triples. Reference: the same model with a float
        # cache whose contents are the quantize-dequantize round trip.
        expected = run_chunks(model, chunks, [_RoundTripCache(bits) for _ in model.layers])
    else:
        expected = run_chunks(model, chunks, caches())
    for g, e in zip(got, expected):
        assert_close(g, e, tol=1e-4)


class _RoundTripCache(lm_cache.KVCache):
    """A float KV cache that stores what a QuantizedKVCache would give back."""

    def __init__(self, bits):
        super().__init__()
        self._bits = bits

    def update_and_fetch(self, keys, values):
        rt = lambda x: mx.dequantize(*mx.quantize(x, group_size=32, bits=self._bits), group_size=32, bits=self._bits)
        return super().update_and_fetch(rt(keys), rt(values))


@pytest.mark.parametrize("kv_bits", [4, 8])
def test_greedy_generation_with_kv_bits_token_identical(kv_bits):
    """generate(..., kv_bits) through the patch gives mlx-lm's own tokens."""
    from mlx_lm.generate import generate_step

    model, prompt = build("llama", head_dim=64), tokens(19)[0]

    def generate():
        steps = generate_step(prompt, model, max_tokens=12, prefill_step_size=8, kv_bits=kv_bits,
                              kv_group_size=64, quantized_kv_start=0)
        return [int(tok) for tok, _ in steps]

    expected = generate()
    with mlx_flash.patch_mlx_lm():
        got = generate()
    assert got == expected
    stats = mlx_flash.patch_stats()
    assert stats["flash_calls"] > 0 and stats["fallback_calls"] == 0, stats


def test_quantized_kv_cache_on_gpu_backends_goes_back_counted(monkeypatch):
    """Metal has a quantized kernel: the patch routes there. Until the CUDA
    one exists, the patch hands those calls back to mlx-lm and says why."""
    from mlx_flash import dispatch

    cache = lm_cache.QuantizedKVCache(group_size=32, bits=4)
    q = mx.zeros((1, 2, 1, 32))
    monkeypatch.setattr(dispatch, "backend_name", lambda stream: "metal")
    assert _lm_attend.unsupported_reason(q, q, q, cache, 0.1, mask=None) is None
    if "cuda" not in dispatch.QUANTIZED_KV_BACKENDS:
        monkeypatch.setattr(dispatch, "backend_name", lambda stream: "cuda")
        reason = _lm_attend.unsupported_reason(q, q, q, cache, 0.1, mask=None)
        assert reason == "quantized KV cache on cuda (no kernel yet)"


def test_head_dim_over_the_backends_limit_falls_back():
    q = mx.random.normal((1, 2, 5, 640))
    expected = lm_base.scaled_dot_product_attention(q, q, q, cache=None, scale=0.1, mask="causal")
    with mlx_flash.patch_mlx_lm():
        got = lm_base.scaled_dot_product_attention(q, q, q, cache=None, scale=0.1, mask="causal")
    assert_close(got, expected)
    assert mlx_flash.patch_stats()["fallbacks"] == {"head dims 640/640 over cpu's 576/512": 1}


def test_stats_reset():
    model = build("llama")
    with mlx_flash.patch_mlx_lm():
        model(tokens(5))
    assert mlx_flash.patch_stats()["flash_calls"] == 2
    mlx_flash.reset_patch_stats()
    assert mlx_flash.patch_stats() == {"flash_calls": 0, "fallback_calls": 0, "fallbacks": {},
                                       "mask_materialisations": 0}


def test_unsupported_reason_accepts_mlx_lm_masks():
    q, k = mx.zeros((2, 4, 3, 8)), mx.zeros((2, 2, 10, 8))
    ok = lambda mask: _lm_attend.unsupported_reason(q, k, k, None, 0.3, mask)  # noqa: E731
    assert ok(None) is None and ok("causal") is None
    assert ok(mx.ones((10,), mx.bool_)) is None  # rotating cache decode step
    assert ok(mx.ones((3, 10), mx.bool_)) is None
    assert ok(mx.zeros((2, 1, 3, 10))) is None
    assert ok("sliding") == "mask string 'sliding'"
    assert ok(mx.ones((3, 10), mx.int32)) == "mask dtype mlx.core.int32"
    assert ok(mx.ones((3, 9), mx.bool_)).startswith("mask shape")



def test_unsupported_reason_remembers_answers_per_call_shape(monkeypatch):
    """The answers are cached per (shapes, dtypes, scale type, mask kind,
    backend): asked again, in any order, each call gets what the checks
    themselves say, and a change of backend is another question."""
    from mlx_flash import dispatch

    q, k = mx.zeros((2, 4, 3, 8)), mx.zeros((2, 2, 10, 8))
    calls = [(q, k, k, 0.3, None), (q, k, k, 0.3, "causal"), (q, k, k, 0.3, "sliding"),
             (q, k, k, 0.3, mx.ones((3, 10), mx.bool_)), (q, k, k, 0.3, mx.ones((3, 9), mx.bool_)),
             (q, k, k, 0.3, mx.ones((3, 10), mx.int32)), (q, k, k, "0.3", None), (q, k, k, 1, None),
             (q, mx.zeros((2, 3, 10, 8)), k, 0.3, None), (q, k.astype(mx.int32), k, 0.3, None),
             (mx.zeros((2, 4, 3, 640)), mx.zeros((2, 2, 10, 640)), mx.zeros((2, 2, 10, 640)), 0.3, None)]
    direct = [_lm_attend._float_reason(a, b, c, s, m) for a, b, c, s, m in calls]
    assert direct[0] is None and direct[2] == "mask string 'sliding'" and direct[6] == "scale of type str"
    for order in (calls, calls[::-1], calls):
        got = [_lm_attend.unsupported_reason(a, b, c, None, s, m) for a, b, c, s, m in order]
        assert got == (direct if order is calls else direct[::-1])
    monkeypatch.setattr(dispatch, "backend_name", lambda stream: "metal")
    wide = calls[-1]
    assert _lm_attend.unsupported_reason(wide[0], wide[1], wide[2], None, 0.3, None) == \
        _lm_attend._float_reason(*wide)

# ---------------------------------------------------------------- examples and benchmark

def test_benchmark_functions_small():
    from mlx_flash.bench import lm

    lora = lm.bench_lora(64)
    assert lora["loss_abs_diff"] < 1e-4 and lora["grads_max_rel_diff"] < 1e-4
    # Gemma-3-style (a sliding layer): the patched step fuses every call and builds no mask.
    gemma = lm.bench_lora(80, lm.GEMMA3_CONFIG)
    assert gemma["loss_abs_diff"] < 1e-4 and gemma["grads_max_rel_diff"] < 1e-4
    assert gemma["patched"]["fallback_calls"] == 0 and gemma["patched"]["mask_materialisations"] == 0
    assert gemma["patched"]["flash_calls"] > 0
    generation = lm.bench_generation(48, 3)
    assert generation["tokens_identical"]
    # The kv section: quantized caches through flash_attention_quantized (patched)
    # give mlx-lm's own greedy tokens, and so does the unquantized cache.
    kv = lm.bench_kv_cache(300, 3, (4, 8), mx.float32)
    assert set(kv["runs"]) == {"kv_bits_4", "kv_bits_8", "unquantized"}
    for name, run in kv["runs"].items():
        assert run["tokens_identical"], name
        assert run["patched"]["kv_bits"] == (None if name == "unquantized" else int(name[-1]))
        assert run["patched"]["fallback_calls"] == 0 and run["patched"]["flash_calls"] > 0, run["patched"]


def test_benchmark_prints_tables_and_writes_json_here(tmp_path):
    """`python -m mlx_flash.bench.lm`: tables on stdout, the JSON in the current directory."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    result = subprocess.run([sys.executable, "-m", "mlx_flash.bench.lm", "--train-seq", "64", "--prompt", "48",
                             "--new-tokens", "3"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [written] = list(tmp_path.glob("lm_cpu_*.json"))
    doc = json.loads(written.read_text())
    assert doc["generation"]["tokens_identical"] and doc["lora_step"]["patched"]["seq_len"] == 64
    out = result.stdout
    assert "extra peak memory" in out and "patched, FP8Linear" in out and "{" not in out, out


@pytest.mark.parametrize("script, args, expected", [
    ("generate.py", ["--prompt-len", "48", "--new-tokens", "3", "--fp8"],
     ["tokens identical: True", "fp8 vs fp16 weights (same matmul2d kernel)", "+ matmul2d, fp16 weights"]),
    ("finetune_long_context.py", ["--seq-len", "64", "--steps", "2"], []),
])
def test_examples_run(script, args, expected):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    result = subprocess.run([sys.executable, str(root / "examples" / script), *args],
                            capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "fallback_calls': 0" in result.stdout, result.stdout
    for text in expected:
        assert text in result.stdout, result.stdout


# ---------------------------------------------------------------- fp8 weights

def _save_model(model, config, path):
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_fp8_weights_for_models_loaded_while_patched(name, tmp_path):
    from mlx_lm import utils as lm_utils

    from mlx_flash.nn import FP8Linear

    _save_model(build(name), CONFIGS[name], tmp_path)
    with mlx_flash.patch_mlx_lm(fp8_weights=True):
        model, _ = lm_utils.load_model(tmp_path)
        x = tokens(21)
        got = model(x)
    fp8_layers = {k: m for k, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
                  if isinstance(m, FP8Linear)}
    assert fp8_layers and not any(isinstance(m, nn.Linear) for _, m in
                                  tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    # Oracle: the same model, unpatched, computing with the decoded fp8 weights.
    reference, _ = lm_utils.load_model(tmp_path)
    assert isinstance(dict(tree_flatten(reference.leaf_modules(), is_leaf=nn.Module.is_module))[
        next(iter(fp8_layers))], nn.Linear)  # loading is back to normal
    reference.load_weights([(k + ".weight", m.dequantized_weight()) for k, m in fp8_layers.items()],
                           strict=False)
    assert_close(got, reference(x), tol=1e-4)
    assert_all_fused()


def test_fp8_weights_option_checked():
    with pytest.raises(TypeError, match="fp8_weights"):
        mlx_flash.patch_mlx_lm(fp8_weights=1)
    assert not mlx_flash.is_mlx_lm_patched()
