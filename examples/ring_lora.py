"""LoRA fine-tuning of an mlx-lm model on a sequence split across processes.

    mlx.launch -n 2 --backend ring --python "$(which python)" examples/ring_lora.py [--seq-len 2048]

Each process holds 1/W of the sequence (zigzag layout: chunks r and 2W-1-r
of 2W) and runs the whole model on it. Two things make that equal to the
model run on the whole sequence in one process:

* attention goes through `ring_flash_attention` (every query still sees
  every earlier key, wherever it lives), and
* rotary embeddings are applied at each token's global position.

`context_parallel(model, group, layout)` swaps both in for the duration of a
`with` block. The loss is each rank's share of the mean over all tokens, so
the total loss and the LoRA gradients are `all_sum`s over ranks. The script
checks them against a one-process step on the full sequence (every rank
computes that too, to compare), then takes a few optimizer steps.

A small random-initialised Llama-style model stands in for a real one (no
download).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_flash.distributed import in_ring_order, ring_flash_attention, shard
from mlx_flash.distributed.layout import chunks_per_rank, rank_chunks

SDPA_NAME = "scaled_dot_product_attention"


class GlobalRoPE:
    """A model's RoPE applied at the global positions of this rank's tokens.

    Not an `nn.Module`, so that it does not change the model's parameter tree.
    """

    def __init__(self, rope, layout: str, world: int, rank: int):
        self.rope, self.layout, self.world, self.rank = rope, layout, world, rank

    def __call__(self, x, offset: int = 0):
        chunk = x.shape[-2] // chunks_per_rank(self.layout)
        parts = [self.rope(x[..., i * chunk:(i + 1) * chunk, :], offset=offset + c * chunk)
                 for i, c in enumerate(rank_chunks(self.layout, self.world, self.rank))]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)


def _ring_sdpa(group, layout):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if cache is not None:
            raise ValueError("cache: context_parallel is for training / prefill without a KV cache")
        if mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise ValueError("mask: only mlx-lm's 'causal' mask shards; got an array mask")
        # mlx-lm passes no mask when a rank's shard is one token long: still causal globally.
        return ring_flash_attention(queries, keys, values, group=group, layout=layout, scale=scale,
                                    causal=True, sinks=sinks)

    return scaled_dot_product_attention


@contextlib.contextmanager
def context_parallel(model, group, layout: str = "zigzag"):
    """Run `model` (an mlx-lm model whose attention modules have `rope` and call
    their module's `scaled_dot_product_attention`) on a sharded sequence."""
    world, rank = group.size(), group.rank()
    swapped_rope, swapped_sdpa = [], {}
    for _, module in model.named_modules():
        if hasattr(module, "rope") and isinstance(module.rope, nn.Module):
            swapped_rope.append(module)
            # An instance attribute shadows the child module without leaving the tree.
            object.__setattr__(module, "rope", GlobalRoPE(module.rope, layout, world, rank))
            home = sys.modules[type(module).__module__]
            if hasattr(home, SDPA_NAME) and home not in swapped_sdpa:
                swapped_sdpa[home] = getattr(home, SDPA_NAME)
    if not swapped_rope:
        raise ValueError("model: found no attention module with a `rope` to place tokens globally")
    for home in swapped_sdpa:
        setattr(home, SDPA_NAME, _ring_sdpa(group, layout))
    try:
        yield model
    finally:
        for module in swapped_rope:
            object.__delattr__(module, "rope")
        for home, original in swapped_sdpa.items():
            setattr(home, SDPA_NAME, original)


def token_loss_sum(model, inputs, targets):
    """Sum of next-token cross-entropies over `inputs`' positions."""
    return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="sum")


def one_process_step(model, tokens):
    """Mean next-token loss over the whole sequence and its LoRA gradients."""
    n = tokens[:, 1:].size
    step = nn.value_and_grad(model, lambda x, y: token_loss_sum(model, x, y) / n)
    return step(tokens[:, :-1], tokens[:, 1:])


def context_parallel_step(model, tokens, group, layout: str = "zigzag"):
    """The same loss and gradients, each rank running its shard of the sequence."""
    n = tokens[:, 1:].size
    inputs, targets = (shard(t, group, layout, axis=1) for t in (tokens[:, :-1], tokens[:, 1:]))
    with context_parallel(model, group, layout):
        step = nn.value_and_grad(model, lambda x, y: token_loss_sum(model, x, y) / n)
        loss, grads = step(inputs, targets)
    # Through in_ring_order: the loss's all_sum does not depend on the backward's ring
    # transfers, and with the ring backend the two must not share its sockets at once.
    total = lambda x: in_ring_order(mx.distributed.all_sum, x, group=group)
    return total(loss), tree_map(total, grads)


def max_rel_diff(grads_a, grads_b) -> float:
    a, b = dict(tree_flatten(grads_a)), dict(tree_flatten(grads_b))
    return max(float(mx.abs(a[k] - b[k]).max()) / max(float(mx.abs(b[k]).max()), 1e-30) for k in b)


def main():
    from mlx_flash.bench.lm import MODEL_CONFIG, add_lora, random_model, random_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *a, **k: None)
    model = add_lora(random_model(), MODEL_CONFIG["num_hidden_layers"])  # same seed on every rank
    tokens = random_tokens(args.seq_len + 1, MODEL_CONFIG["vocab_size"])
    say(f"{group.size()} processes, sequence {args.seq_len} ({args.layout}), {mx.default_device()}")

    loss_1, grads_1 = one_process_step(model, tokens)
    loss_w, grads_w = context_parallel_step(model, tokens, group, args.layout)
    mx.eval(loss_1, grads_1, loss_w, grads_w)
    say(f"loss: one process {loss_1.item():.6f}, {group.size()} processes {loss_w.item():.6f}; "
        f"LoRA gradients max relative difference {max_rel_diff(grads_w, grads_1):.2e}")

    optimizer = optim.Adam(learning_rate=1e-3)
    for i in range(args.steps):
        start = time.perf_counter()
        loss, grads = context_parallel_step(model, tokens, group, args.layout)
        optimizer.update(model, grads)  # the same summed gradients on every rank
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        say(f"step {i}: loss {loss.item():.5f}, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
