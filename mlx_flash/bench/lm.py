"""mlx-lm end to end, patched (`mlx_flash.patch_mlx_lm`) vs mlx-lm's own attention.

    python -m mlx_flash.bench.lm [--quick] [--out PATH]   # JSON by default in ./lm_cpu_<date>.json
    python -m mlx_flash.bench.lm --sections kv [--device gpu] [--kv-context 32768] [--kv-bits 4,8]

Two measurements on one small random-initialised Llama-style model (no
downloads), each run unpatched then patched in the same process:

* LoRA training step (loss + gradients) at a long sequence length: time and
  extra peak memory (`mx.get_peak_memory()` minus the memory held before the
  step: weights, LoRA parameters, tokens), with the loss and gradients of the
  two runs compared.
* Greedy generation from a long prompt (mlx-lm's `generate_step`): prompt
  processing and decoding time, tokens/s and extra peak memory.
* `--sections lora_gemma3` (opt-in): the LoRA step on a Gemma-3-style model
  (a sliding layer with window 1024, a global one) at 16K tokens, where
  mlx-lm's masks are N x N and the patched step builds none.
* Long-context generation over a quantized KV cache (`--sections kv`, opt-in):
  `generate_step(kv_bits=4|8, quantized_kv_start=0)` from a 32K-token prompt
  (mlx-lm's 2048-token prefill steps), mlx-lm's own quantized attention
  (unpatched) against `flash_attention_quantized` (patched), and the
  unquantized cache both ways; prompt/decode tokens/s, extra peak memory and
  whether the greedy tokens agree. `--device gpu` runs it on a CUDA card
  (float16 weights), where a 32K context takes seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

import mlx_flash
from mlx_flash import dispatch

from . import common

# Llama-style, GQA (8 query heads of 64 over 2 key/value heads), 2 layers,
# narrow (MLX's CPU matmul is slow: keep the projections from drowning the
# attention it is about).
MODEL_CONFIG = dict(
    model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
    vocab_size=1024, tie_word_embeddings=False,
)
LORA_CONFIG = {"rank": 8, "scale": 2.0, "dropout": 0.0}
# Gemma-3-style (gemma3_text's body): layer 0 slides over a 1024-key window,
# layer 1 is global; same widths as MODEL_CONFIG.
GEMMA3_CONFIG = dict(
    model_type="gemma3_text", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=1024,
    sliding_window=1024, sliding_window_pattern=2, query_pre_attn_scalar=64,
)


def random_model(config=None, seed: int = 0, dtype=mx.float32):
    """An mlx-lm model built from a config dict, with random weights."""
    from mlx_lm.utils import _get_classes

    config = dict(MODEL_CONFIG if config is None else config)
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def add_lora(model, num_layers: int, seed: int = 1):
    """mlx-lm LoRA adapters on the last `num_layers` blocks, B made non-zero
    (it starts at zero, which would make A's gradient zero)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, num_layers, LORA_CONFIG)
    mx.random.seed(seed)
    lora_b = [(k, 0.02 * mx.random.normal(v.shape, dtype=v.dtype))
              for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.load_weights(lora_b, strict=False)
    mx.eval(model.parameters())
    return model


def random_tokens(n: int, vocab: int, batch: int = 1, seed: int = 2):
    return mx.random.randint(0, vocab, (batch, n), key=mx.random.key(seed))


def _fresh_memory():
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


def _max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        scale = max(mx.max(mx.abs(b[key])).item(), 1e-30)
        worst = max(worst, mx.max(mx.abs(a[key] - b[key])).item() / scale)
    return worst


def lora_step(seq_len: int, patched: bool, batch: int = 1, config=None, dtype=mx.float32):
    """One LoRA loss+gradient evaluation; returns (record, loss, grads)."""
    from mlx_lm.tuner.trainer import default_loss

    config = MODEL_CONFIG if config is None else config
    model = add_lora(random_model(config, dtype=dtype), config["num_hidden_layers"])
    tokens = random_tokens(seq_len + 1, config["vocab_size"], batch)
    lengths = mx.array([[0, seq_len]] * batch)
    mx.eval(tokens, lengths)
    loss_and_grad = nn.value_and_grad(model, lambda *a: default_loss(model, *a)[0])
    baseline = _fresh_memory()
    stats_before = mlx_flash.patch_stats()
    with mlx_flash.patch_mlx_lm() if patched else _nothing():
        start = time.perf_counter()
        loss, grads = loss_and_grad(tokens, lengths)
        mx.eval(loss, grads)
        seconds = time.perf_counter() - start
    record = {
        "patched": patched, "seq_len": seq_len, "batch": batch, "seconds": seconds,
        "baseline_bytes": baseline, "extra_peak_bytes": mx.get_peak_memory() - baseline,
        "loss": loss.item(), "model_type": config["model_type"], "dtype": str(dtype).split(".")[-1],
    }
    if patched:
        record.update(_patch_calls(stats_before))
    return record, loss, dict(tree_flatten(grads))


def _patch_calls(before: dict) -> dict:
    """The patch's counters for one run: fused calls, calls handed back to
    mlx-lm, and masks built as arrays (all but the first should be 0)."""
    now = mlx_flash.patch_stats()
    return {key: now[key] - before[key] for key in ("flash_calls", "fallback_calls", "mask_materialisations")}


def bench_lora(seq_len: int, config=None, dtype=mx.float32) -> dict:
    if mx.default_device() == mx.gpu:  # compile every kernel of both paths before measuring
        lora_step(256, patched=False, config=config, dtype=dtype)
        lora_step(256, patched=True, config=config, dtype=dtype)
    plain, plain_loss, plain_grads = lora_step(seq_len, patched=False, config=config, dtype=dtype)
    fused, fused_loss, fused_grads = lora_step(seq_len, patched=True, config=config, dtype=dtype)
    return {
        "unpatched": plain, "patched": fused,
        "extra_peak_ratio": fused["extra_peak_bytes"] / plain["extra_peak_bytes"],
        "speedup": plain["seconds"] / fused["seconds"],
        "loss_abs_diff": abs(fused_loss.item() - plain_loss.item()),
        "grads_max_rel_diff": _max_rel_diff(fused_grads, plain_grads),
        "num_grad_arrays": len(plain_grads),
    }


def generate(prompt_len: int, new_tokens: int, patched: bool, fp8: bool = False, kv_bits=None,
             prefill_step: int | None = None, dtype=mx.float32) -> tuple[dict, list]:
    """Greedy generation with mlx-lm's generate_step; prompt and decode timed apart.

    `fp8`: the model's Linear layers as `FP8Linear` (E4M3 weights).
    `kv_bits`: mlx-lm's quantized KV cache from the first token on.
    `prefill_step`: prompt tokens per forward pass (default: the whole prompt).
    """
    from mlx_lm.generate import generate_step

    model = random_model(dtype=dtype)
    if fp8:
        mlx_flash.convert_model_to_fp8(model)
        mx.eval(model.parameters())
    prompt = random_tokens(prompt_len, MODEL_CONFIG["vocab_size"])[0]
    mx.eval(prompt)
    baseline = _fresh_memory()
    stats_before = mlx_flash.patch_stats()
    with mlx_flash.patch_mlx_lm() if patched else _nothing():
        start = time.perf_counter()
        quant = {} if kv_bits is None else dict(kv_bits=kv_bits, kv_group_size=64, quantized_kv_start=0)
        steps = generate_step(prompt, model, max_tokens=new_tokens,
                              prefill_step_size=prefill_step or prompt_len, **quant)
        out = [int(next(steps)[0])]
        first = time.perf_counter()
        out += [int(tok) for tok, _ in steps]
        end = time.perf_counter()
    record = {
        "patched": patched, "fp8_weights": fp8, "kv_bits": kv_bits, "prompt_len": prompt_len,
        "new_tokens": len(out),
        "prompt_seconds": first - start, "decode_seconds": end - first,
        "total_seconds": end - start,
        "prompt_tokens_per_s": prompt_len / (first - start),
        "decode_tokens_per_s": (len(out) - 1) / (end - first),
        "extra_peak_bytes": mx.get_peak_memory() - baseline,
    }
    if patched:
        record.update(_patch_calls(stats_before))
    return record, out


def bench_generation(prompt_len: int, new_tokens: int) -> dict:
    generate(64, 4, patched=False)  # warm up both paths (allocator, kernels)
    generate(64, 4, patched=True)
    generate(64, 4, patched=True, fp8=True)
    plain, plain_tokens = generate(prompt_len, new_tokens, patched=False)
    fused, fused_tokens = generate(prompt_len, new_tokens, patched=True)
    fp8, _ = generate(prompt_len, new_tokens, patched=True, fp8=True)
    return {
        "unpatched": plain, "patched": fused,
        # Different (fp8) weights: its tokens are not expected to match.
        "patched_fp8_weights": fp8,
        "total_speedup": plain["total_seconds"] / fused["total_seconds"],
        "prompt_speedup": plain["prompt_seconds"] / fused["prompt_seconds"],
        "decode_speedup": plain["decode_seconds"] / fused["decode_seconds"],
        "tokens_identical": plain_tokens == fused_tokens,
    }


KV_PREFILL_STEP = 2048  # mlx-lm's default prefill_step_size


def bench_kv_cache(context: int, new_tokens: int, bits_list, dtype) -> dict:
    """Generation over a `context`-token prompt: quantized caches (each of
    `bits_list`) and the unquantized one, mlx-lm's attention vs patched."""
    for kv_bits in (None, *bits_list):  # warm up every path (allocator, kernels)
        for patched in (False, True):
            try:
                generate(4 * 128 + 1, 2, patched=patched, kv_bits=kv_bits, prefill_step=128, dtype=dtype)
            except RuntimeError:  # recorded by the measured run below
                pass
    result = {"context": context, "new_tokens": new_tokens, "prefill_step": KV_PREFILL_STEP,
              "dtype": str(dtype).split(".")[-1], "runs": {}}
    for kv_bits in (*bits_list, None):
        name = "unquantized" if kv_bits is None else f"kv_bits_{kv_bits}"
        runs = {}
        for label, patched in (("mlx_lm", False), ("patched", True)):
            try:
                rec, toks = generate(context, new_tokens, patched=patched, kv_bits=kv_bits,
                                     prefill_step=KV_PREFILL_STEP, dtype=dtype)
            except RuntimeError as exc:  # e.g. MLX's CUDA quantized_matmul refusing a shape
                runs[label] = ({"patched": patched, "kv_bits": kv_bits, "error": str(exc)}, None)
                print(f"  {name:12s} {label:8s} failed: {exc}", flush=True)
                continue
            runs[label] = (rec, toks)
            print(f"  {name:12s} {label:8s} prompt {rec['prompt_tokens_per_s']:9.1f} tok/s  decode "
                  f"{rec['decode_tokens_per_s']:7.1f} tok/s  extra peak {common.fmt_bytes(rec['extra_peak_bytes'])}",
                  flush=True)
        (plain, plain_toks), (fused, fused_toks) = runs["mlx_lm"], runs["patched"]
        if "error" in plain or "error" in fused:
            result["runs"][name] = {"mlx_lm": plain, "patched": fused}
            continue
        result["runs"][name] = {
            "mlx_lm": plain, "patched": fused,
            "prompt_speedup": plain["prompt_seconds"] / fused["prompt_seconds"],
            "decode_speedup": plain["decode_seconds"] / fused["decode_seconds"],
            "extra_peak_ratio": fused["extra_peak_bytes"] / max(plain["extra_peak_bytes"], 1),
            "tokens_identical": plain_toks == fused_toks,
        }
    return result


def kv_table(r: dict) -> str:
    lines = [f"generation over a {r['context']}-token prompt ({r['prefill_step']}-token prefill steps) "
             f"+ {r['new_tokens']} tokens, {r['dtype']} weights:",
             f"  {'cache':12s} {'':8s} {'prompt tok/s':>13s} {'decode tok/s':>13s} {'extra peak':>11s}"]
    for name, run in r["runs"].items():
        for label in ("mlx_lm", "patched"):
            rec = run[label]
            if "error" in rec:
                lines.append(f"  {name:12s} {label:8s} failed: {rec['error']}")
                continue
            lines.append(f"  {name:12s} {label:8s} {rec['prompt_tokens_per_s']:13.1f} {rec['decode_tokens_per_s']:13.1f} "
                         f"{common.fmt_bytes(rec['extra_peak_bytes']):>11s}")
        if "prompt_speedup" not in run:
            continue
        lines.append(f"  {'':12s} patched: prompt {run['prompt_speedup']:.2f}x, decode {run['decode_speedup']:.2f}x, "
                     f"peak {run['extra_peak_ratio']:.2f}x of mlx-lm's; greedy tokens "
                     f"{'identical' if run['tokens_identical'] else 'DIFFER'}")
    return "\n".join(lines)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def machine() -> dict:
    import mlx_lm

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "device": str(mx.default_device()), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
    }


def lora_table(r: dict) -> str:
    plain, fused = r["unpatched"], r["patched"]
    return "\n".join([
        f"LoRA step (loss + gradients) at {plain['seq_len']} tokens:",
        f"  {'':20s} {'mlx-lm':>12s} {'patched':>12s}",
        f"  {'time':20s} {common.fmt_time(plain['seconds']):>12s} {common.fmt_time(fused['seconds']):>12s}"
        f"   {r['speedup']:.2f}x faster",
        f"  {'extra peak memory':20s} {common.fmt_bytes(plain['extra_peak_bytes']):>12s} "
        f"{common.fmt_bytes(fused['extra_peak_bytes']):>12s}   {r['extra_peak_ratio']:.2f}x",
        f"  loss differs by {r['loss_abs_diff']:.2g}; gradients by at most {r['grads_max_rel_diff']:.2g} "
        f"(relative, {r['num_grad_arrays']} arrays)",
    ])


def generation_table(r: dict) -> str:
    rows = [("mlx-lm", r["unpatched"]), ("patched", r["patched"]),
            ("patched, FP8Linear", r["patched_fp8_weights"])]
    first = r["unpatched"]
    lines = [f"greedy generation, {first['prompt_len']}-token prompt + {first['new_tokens']} tokens:",
             f"  {'':22s} {'prompt':>10s} {'tok/s':>8s} {'decode':>10s} {'tok/s':>8s} {'total':>10s} {'extra peak':>11s}"]
    for name, rec in rows:
        lines.append(f"  {name:22s} {common.fmt_time(rec['prompt_seconds']):>10s} {rec['prompt_tokens_per_s']:8.1f} "
                     f"{common.fmt_time(rec['decode_seconds']):>10s} {rec['decode_tokens_per_s']:8.1f} "
                     f"{common.fmt_time(rec['total_seconds']):>10s} {common.fmt_bytes(rec['extra_peak_bytes']):>11s}")
    lines.append(f"  patched vs mlx-lm: {r['total_speedup']:.2f}x faster in total; greedy tokens "
                 f"{'identical' if r['tokens_identical'] else 'DIFFER'} (fp8 weights are other weights: "
                 "their tokens are not compared)")
    lines.append("  FP8Linear row: fp8 weights multiplied by mlx_flash.matmul2d instead of MLX's matmul, so its "
                 "time mixes the kernel and the format (examples/generate.py --fp8 separates them)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sequences (a smoke run)")
    parser.add_argument("--train-seq", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-context", type=int, default=32768, help="prompt tokens of the kv section")
    parser.add_argument("--kv-bits", default="4,8", help="quantized caches of the kv section (comma list)")
    parser.add_argument("--sections", default="lora,generation",
                        help="comma list of lora, lora_gemma3, generation, kv (kv: a 32K context, "
                             "lora_gemma3: a 16K-token step; minutes on a CPU)")
    parser.add_argument("--gemma-seq", type=int, default=16384, help="tokens of the lora_gemma3 step")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: a CUDA card (the kv section in float16; the JSON names the card)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default ./lm_<device>_<date>.json in the current directory)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"lora", "lora_gemma3", "generation", "kv"}
    if unknown:
        parser.error(f"--sections: expected lora, lora_gemma3, generation or kv, got {sorted(unknown)}")
    bits_list = tuple(int(b) for b in args.kv_bits.split(","))
    if args.quick:
        args.train_seq, args.prompt, args.new_tokens, args.kv_context, args.gemma_seq = 512, 256, 8, 2048, 2048
    tag = "cpu"
    if args.device == "gpu":
        from .cuda import card_name, slug

        if not dispatch.cuda_available():
            raise SystemExit("--device gpu: no CUDA GPU visible to MLX")
        tag = slug(card_name())
    out = args.out if args.out is not None else Path(f"lm_{tag}_{common.today()}.json")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    result = {
        "benchmark": "mlx_lm_patch", "machine": machine(), "model": MODEL_CONFIG,
        "lora": dict(LORA_CONFIG, layers=MODEL_CONFIG["num_hidden_layers"]),
        "dtype": "float32",
    }
    if args.device == "gpu":
        result["card"] = card_name()
    if "lora" in sections:
        print(f"LoRA step at N={args.train_seq} ...", flush=True)
        result["lora_step"] = bench_lora(args.train_seq)
        print(lora_table(result["lora_step"]), flush=True)
    if "lora_gemma3" in sections:
        dtype = mx.bfloat16 if args.device == "gpu" else mx.float32
        print(f"Gemma-3-style LoRA step (window {GEMMA3_CONFIG['sliding_window']}) at N={args.gemma_seq} ...",
              flush=True)
        result["lora_step_gemma3"] = dict(bench_lora(args.gemma_seq, GEMMA3_CONFIG, dtype), model=GEMMA3_CONFIG)
        print(lora_table(result["lora_step_gemma3"]), flush=True)
    if "generation" in sections:
        print(f"generation, prompt {args.prompt} + {args.new_tokens} tokens ...", flush=True)
        result["generation"] = bench_generation(args.prompt, args.new_tokens)
        print(generation_table(result["generation"]), flush=True)
    if "kv" in sections:
        kv_dtype = mx.float16 if args.device == "gpu" else mx.float32
        print(f"generation over a {args.kv_context}-token prompt, kv_bits {bits_list} and unquantized ...",
              flush=True)
        result["kv_cache"] = bench_kv_cache(args.kv_context, args.new_tokens, bits_list, kv_dtype)
        print(kv_table(result["kv_cache"]), flush=True)
    result["patch_stats"] = mlx_flash.patch_stats()
    common.write_json(out, result)
    print(f"wrote {out} (every number above, and the machine)")
    return result


if __name__ == "__main__":
    main()
