"""Greedy generation with mlx-lm, with and without mlx_flash.patch_mlx_lm().

    python examples/generate.py [--prompt-len 2048] [--new-tokens 32] [--model llama]

With `--fp8`, a third run also converts the model's Linear layers to
`mlx_flash.nn.FP8Linear` (what `patch_mlx_lm(fp8_weights=True)` does to
models loaded through mlx-lm): fp8 weights are a quarter of float32's bytes,
and the tokens may differ since the weights do.

Uses a small random-initialised model (no download needed), so the tokens
are gibberish; what matters is that both runs produce the same tokens and
how fast and how much memory each takes. On a real model the one line that
matters is `mlx_flash.patch_mlx_lm()` before generating.
"""

import argparse
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_flash
from mlx_flash.bench.lm import MODEL_CONFIG, random_model, random_tokens


def run(model, prompt, new_tokens):
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=new_tokens, prefill_step_size=len(prompt))
    tokens = [int(next(steps)[0])]
    first = time.perf_counter()
    tokens += [int(token) for token, _ in steps]
    end = time.perf_counter()
    return {
        "tokens": tokens,
        "prompt tok/s": len(prompt) / (first - start),
        "decode tok/s": (len(tokens) - 1) / (end - first),
        "total s": end - start,
        "extra peak MiB": (mx.get_peak_memory() - before) / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default="llama", help="an mlx-lm model_type with MODEL_CONFIG's fields")
    parser.add_argument("--fp8", action="store_true", help="also run with fp8 (E4M3) Linear weights")
    args = parser.parse_args()

    model = random_model(dict(MODEL_CONFIG, model_type=args.model))
    prompt = random_tokens(args.prompt_len, MODEL_CONFIG["vocab_size"])[0]

    run(model, prompt[:32], 2)  # warm-up
    results = {"mlx-lm": run(model, prompt, args.new_tokens)}
    with mlx_flash.patch_mlx_lm():
        run(model, prompt[:32], 2)
        results["mlx_flash"] = run(model, prompt, args.new_tokens)
        if args.fp8:
            fp8_model = mlx_flash.convert_model_to_fp8(random_model(dict(MODEL_CONFIG, model_type=args.model)))
            run(fp8_model, prompt[:32], 2)
            results["+fp8"] = run(fp8_model, prompt, args.new_tokens)

    print(f"{args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new, on {mx.default_device()}")
    for name, r in results.items():
        print(f"  {name:10s} prompt {r['prompt tok/s']:8.1f} tok/s  decode {r['decode tok/s']:6.1f} tok/s  "
              f"total {r['total s']:6.2f} s  extra peak {r['extra peak MiB']:7.1f} MiB")
    same = results["mlx-lm"]["tokens"] == results["mlx_flash"]["tokens"]
    print(f"  tokens identical: {same}; routing: {mlx_flash.patch_stats()}")


if __name__ == "__main__":
    main()
