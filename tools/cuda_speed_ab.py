"""A/B timing of the CUDA attention kernels of one source tree, for side-by-side
runs of two trees (alternate processes: the tree whose `mlx_flash` comes first
on PYTHONPATH is the one timed).

    PYTHONPATH=<tree> python3 tools/cuda_speed_ab.py LABEL OUT.json [iters]
    python3 tools/cuda_speed_ab.py --alt OTHER/cuda_src OUT.json [iters] [rounds]

--alt: one process, this tree's Python with two kernel source directories,
this tree's cuda_src ("new") and OTHER ("alt", e.g. an older commit's, with the
same kernel templates), alternated `rounds` times so that clock and
process-to-process noise falls on both alike (kernels named apart, so MLX
never mixes their compiled code).

Times, per shape (fp16 and bf16 where listed), causal and not: the forward and
forward + backward of mlx_flash.flash_attention and of
mx.fast.scaled_dot_product_attention (cuDNN) in the same process, one call per
mx.eval after warm-ups. Appends one record per shape to OUT.json (a list), so
several processes (trees, repetitions) can share one file.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx

import mlx_flash

SHAPES = [((2, 16, 4096, 128), mx.float16)]


def time_fn(fn, iters):
    """Milliseconds per call, one call per eval (cuda_overhead.latency's rule)."""
    from cuda_overhead import latency  # tools/ is this script's directory

    return latency(fn, iters) / 1e3


def use_sources(src_dir, tag, memo={}):
    """Route the CUDA backend's kernels to the sources in src_dir (None: its own)."""
    import functools
    import pathlib

    from mlx_flash.backends import cuda as cb

    if "own_read" not in memo:
        memo["own_read"] = cb._read
    read = memo["own_read"] if src_dir is None else functools.lru_cache(None)(
        lambda name: (pathlib.Path(src_dir) / name).read_text())

    def kernel(body, inputs, outputs, smem, headers=None):
        key = (tag, body, inputs, outputs, smem, headers)
        if key not in memo:
            memo[key] = mx.fast.cuda_kernel(
                name=f"mlx_flash_{body}{tag}", input_names=list(inputs), output_names=list(outputs),
                source=cb._read(body + ".cu"), header=cb._header(headers or cb.kernel_headers(body)),
                ensure_row_contiguous=True, shared_memory=smem)
        return memo[key]

    cb._read = read
    for value in vars(cb).values():  # launch configurations cache kernel objects
        if hasattr(value, "cache_clear"):
            value.cache_clear()
    cb._kernel = kernel


def main():
    if sys.argv[1] == "--alt":
        alt, out = sys.argv[2], sys.argv[3]
        iters = int(sys.argv[4]) if len(sys.argv) > 4 else 30
        rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
        for r in range(rounds):
            for label, src in (("new", None), ("alt", alt)):
                use_sources(src, "" if src is None else "_alt")
                run(f"{label}{r}", out, iters)
        return
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30)


def run(label, out, iters):
    shapes = SHAPES
    if os.environ.get("AB_SHAPES"):  # e.g. "2,16,4096,128,float16;4,16,1024,64,bfloat16"
        shapes = [(tuple(int(x) for x in s.split(",")[:4]), getattr(mx, s.split(",")[4]))
                  for s in os.environ["AB_SHAPES"].split(";")]
    records = []
    for (B, H, N, D), dtype in shapes:
        key = mx.random.key(1)
        kq, kk, kv = mx.random.split(key, 3)
        q, k, v = (mx.random.normal((B, H, N, D), key=x).astype(dtype) for x in (kq, kk, kv))
        mx.eval(q, k, v)
        s = D ** -0.5
        for causal in (False, True):
            mask = "causal" if causal else None
            ours = lambda a, b, c: mlx_flash.flash_attention(a, b, c, causal=causal, scale=s)  # noqa: E731
            fast = lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=s, mask=mask)  # noqa: E731
            res = {}
            for name, f in (("ours", ours), ("mx.fast", fast)):
                g = mx.grad(lambda a, b, c: mx.sum(f(a, b, c).astype(mx.float32)), argnums=(0, 1, 2))
                res[f"fwd_{name}_ms"] = time_fn(lambda: f(q, k, v), iters)
                res[f"fwdbwd_{name}_ms"] = time_fn(lambda: g(q, k, v), iters)
            rec = dict(tree=label, mlx_flash=os.path.dirname(mlx_flash.__file__), dtype=str(dtype).split(".")[-1],
                       shape=[B, H, N, D], causal=causal, iters=iters, **{k: round(v, 4) for k, v in res.items()})
            records.append(rec)
            print(f"{label:6s} {dtype} {[B, H, N, D]} causal={causal}: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    old = json.load(open(out)) if os.path.exists(out) else []
    with open(out, "w") as f:
        json.dump(old + records, f, indent=1)


if __name__ == "__main__":
    main()
