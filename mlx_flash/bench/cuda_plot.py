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

    def attention(ax, section):
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

    def features(ax, feats):
        ax.bar([r["feature"] for r in feats], [r["speedup_vs_reference"] for r in feats])
        ax.axhline(5, color="k", lw=0.8, ls="--")
        ax.set_ylabel("speedup vs materialised MLX")
        ax.set_title("features at N=8192 (fp16, 1x16x8192x128); dashed: 5x target")

    def matmul(ax, mm):
        ax.bar([r["case"] for r in mm], [r["tflops"] for r in mm])
        ax.set_xticks(range(len(mm)), [r["case"] for r in mm], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title("matmul 8192^3")

    # One panel a section the run holds (a run of some sections draws no empty axes).
    panels = [(lambda ax, s=s: attention(ax, s)) for s in ("fwd", "fwdbwd")
              if any(r.get("section") == s and r.get("dtype") == "float16" for r in rows)]
    feats = [r for r in rows if r.get("section") == "features" and "speedup_vs_reference" in r]
    if feats:
        panels.append(lambda ax: features(ax, feats))
    mm = [r for r in rows if r.get("section") == "matmul" and r.get("n") == 8192 and "tflops" in r]
    if mm:
        panels.append(lambda ax: matmul(ax, mm))
    if not panels:
        raise ValueError(f"{path}: no fwd, fwdbwd, features or matmul rows to plot")
    ncols = min(2, len(panels))
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.5 * nrows), squeeze=False)
    for i, draw in enumerate(panels):
        draw(axes[i // 2][i % 2])
    if len(panels) % 2 and ncols == 2:
        axes[-1][-1].set_visible(False)
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
