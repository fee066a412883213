"""Greedy generation with mlx-lm, with and without mlx_flash.patch_mlx_lm().

    python examples/generate.py [--prompt-len 2048] [--new-tokens 32] [--model llama] [--fp8]

Each row changes one thing against the row it is compared with:

* `mlx-lm` vs `mlx_flash attention`: the same float32 model (Linear layers
  through MLX's `mx.matmul`); only the attention differs (MLX's own vs
  `flash_attention` through the patch). Their tokens must be identical.
* With `--fp8`, two more rows, both patched and with every Linear layer
  through `mlx_flash.matmul2d`: `fp16 weights` and `fp8 weights` (E4M3,
  per-channel scales: `mlx_flash.nn.FP8Linear`, what
  `patch_mlx_lm(fp8_weights=True)` gives models loaded through mlx-lm). They
  differ only in the weight format (2 bytes vs 1 a weight), so their ratio
  is what fp8 buys. Their gap to the rows above is the matmul kernel
  (`matmul2d` vs MLX's CPU matmul), not fp8. Rounded weights may change the
  tokens.

Uses a small random-initialised model (no download needed), so the tokens
are gibberish; what matters is that both runs produce the same tokens and
how fast and how much memory each takes. On a real model the one line that
matters is `mlx_flash.patch_mlx_lm()` before generating.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.generate import generate_step

import mlx_flash
from mlx_flash.bench.lm import MODEL_CONFIG, random_model, random_tokens


class Matmul2dLinear(nn.Module):
    """An nn.Linear whose product runs through `mlx_flash.matmul2d` with a
    float16 weight: FP8Linear's kernel without its format, to compare with."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.astype(mx.float16)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x):
        y = mlx_flash.matmul2d(x, self.weight, transpose_b=True, out_dtype=x.dtype)
        return y + self.bias if "bias" in self else y


def linears_through_matmul2d(model):
    swap = lambda _, m: Matmul2dLinear(m) if isinstance(m, nn.Linear) else m  # noqa: E731
    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    mx.eval(model.parameters())
    return model


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
    parser.add_argument("--fp8", action="store_true",
                        help="also run the Linear layers through matmul2d with fp16 and with fp8 (E4M3) weights")
    args = parser.parse_args()

    config = dict(MODEL_CONFIG, model_type=args.model)
    model = random_model(config)
    prompt = random_tokens(args.prompt_len, MODEL_CONFIG["vocab_size"])[0]

    def measure(name, model):
        print(f"  {name} ...", flush=True)
        run(model, prompt[:32], 2)  # warm-up
        results[name] = run(model, prompt, args.new_tokens)

    print(f"{args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new, on {mx.default_device()}")
    results = {}
    measure("mlx-lm", model)
    with mlx_flash.patch_mlx_lm():
        measure("mlx_flash attention", model)
        if args.fp8:
            measure("+ matmul2d, fp16 weights", linears_through_matmul2d(random_model(config)))
            measure("+ matmul2d, fp8 weights", mlx_flash.convert_model_to_fp8(random_model(config)))

    for name, r in results.items():
        print(f"  {name:26s} prompt {r['prompt tok/s']:8.1f} tok/s  decode {r['decode tok/s']:6.1f} tok/s  "
              f"total {r['total s']:6.2f} s  extra peak {r['extra peak MiB']:7.1f} MiB")
    same = results["mlx-lm"]["tokens"] == results["mlx_flash attention"]["tokens"]
    print(f"  mlx_flash attention vs mlx-lm (same weights, same mx.matmul): attention only; "
          f"tokens identical: {same}")
    if args.fp8:
        f16, f8 = results["+ matmul2d, fp16 weights"], results["+ matmul2d, fp8 weights"]
        print(f"  fp8 vs fp16 weights (same matmul2d kernel): the weight format only; total time "
              f"fp8 / fp16 = {f8['total s'] / f16['total s']:.2f}")
        print("  the matmul2d rows vs the rows above: matmul2d replacing MLX's matmul, not fp8")
    print(f"  routing: {mlx_flash.patch_stats()}")


if __name__ == "__main__":
    main()
