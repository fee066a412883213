"""Plot a cuda_<card>.json from mlx_flash.bench.cuda as a PNG.

    python -m mlx_flash.bench.cuda_plot cuda_nvidia_h200.json [--out cuda_nvidia_h200.png]

The PNG goes next to the JSON (same name, .png) unless --out says where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def plot(path: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, section in zip(axes[0], ("fwd", "fwdbwd")):
        sel = [r for r in rows if r.get("section") == section and r.get("dtype") == "float16"]
        labels = [f'{"x".join(map(str, r["shape"]))}{" c" if r["causal"] else ""}' for r in sel]
        x = range(len(sel))
        w = 0.27
        ax.bar([i - w for i in x], [r["ours_tflops"] for r in sel], w, label="mlx_flash")
        ax.bar(list(x), [r["mx_fast_tflops"] for r in sel], w, label="mx.fast SDPA (cuDNN)")
        ax.bar([i + w for i in x], [r.get("torch_tflops", 0) for r in sel], w, label="torch SDPA")
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"attention {'forward' if section == 'fwd' else 'forward+backward'}, fp16 ([B,H,N,D], c = causal)")
        ax.legend(fontsize=8)
    feats = [r for r in rows if r.get("section") == "features"]
    ax = axes[1][0]
    ax.bar([r["feature"] for r in feats], [r["speedup_vs_reference"] for r in feats])
    ax.axhline(5, color="k", lw=0.8, ls="--")
    ax.set_ylabel("speedup vs materialised MLX")
    ax.set_title("features at N=8192 (fp16, 1x16x8192x128); dashed: 5x target")
    mm = [r for r in rows if r.get("section") == "matmul" and r["n"] == 8192]
    ax = axes[1][1]
    ax.bar([r["case"] for r in mm], [r["tflops"] for r in mm])
    ax.set_xticks(range(len(mm)), [r["case"] for r in mm], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s")
    ax.set_title("matmul 8192^3")
    fig.suptitle(f'mlx_flash CUDA backend on {data["card"]} (MLX {data["mlx"]}, torch {data.get("torch", "-")})')
    fig.tight_layout()
    out = out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_flash.bench.cuda_plot", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="results of python -m mlx_flash.bench.cuda")
    parser.add_argument("--out", help="PNG path (default the JSON's path with .png)")
    args = parser.parse_args(argv)
    print(plot(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
