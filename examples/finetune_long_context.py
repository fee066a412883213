"""LoRA fine-tuning at a long sequence length, with and without mlx_flash.

    python examples/finetune_long_context.py [--seq-len 4096] [--steps 2]

mlx-lm's attention materialises the `[B, H, N, N]` scores in training (and
MLX has no fused attention backward on Metal or CPU), so activation memory
grows with N^2. Patched, the forward keeps only O(N) statistics and the
fused backward recomputes the scores tile by tile. Same model, same data,
same optimizer: the losses match, the peak memory does not.

A small random-initialised model stands in for a real one (no download).
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.trainer import default_loss

import mlx_flash
from mlx_flash.bench.lm import MODEL_CONFIG, add_lora, random_model, random_tokens


def train(seq_len, steps, batch):
    model = add_lora(random_model(), MODEL_CONFIG["num_hidden_layers"])
    optimizer = optim.Adam(learning_rate=1e-3)
    loss_and_grad = nn.value_and_grad(model, lambda *a: default_loss(model, *a)[0])
    data = random_tokens(seq_len + 1, MODEL_CONFIG["vocab_size"], batch)
    lengths = mx.array([[0, seq_len]] * batch)
    mx.eval(data, lengths)

    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # weights, adapters, data
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        loss, grads = loss_and_grad(data, lengths)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        losses.append(loss.item())
    seconds = (time.perf_counter() - start) / steps
    return losses, seconds, (mx.get_peak_memory() - before) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    print(f"LoRA, sequence length {args.seq_len}, batch {args.batch}, on {mx.default_device()}")
    results = {"mlx-lm": train(args.seq_len, args.steps, args.batch)}
    with mlx_flash.patch_mlx_lm():
        results["mlx_flash"] = train(args.seq_len, args.steps, args.batch)
    for name, (losses, seconds, peak) in results.items():
        shown = ", ".join(f"{x:.5f}" for x in losses)
        print(f"  {name:10s} losses [{shown}]  {seconds:7.2f} s/step  extra peak {peak:8.1f} MiB")
    ratio = results["mlx_flash"][2] / results["mlx-lm"][2]
    print(f"  extra peak memory patched / unpatched: {ratio:.2f}; routing: {mlx_flash.patch_stats()}")


if __name__ == "__main__":
    main()
