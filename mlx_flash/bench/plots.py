"""PNG figures of benchmark results (matplotlib, the optional `plots` extra).

`line_grid` is generic (one panel per group, one line per series) so other
benchmark modules can draw their own results with it; the CPU attention
figures are built on it.
"""

from __future__ import annotations

from pathlib import Path

IMPL_STYLE = {
    "mlx_flash": dict(color="tab:blue", marker="o", label="mlx_flash"),
    "torch_sdpa": dict(color="tab:orange", marker="s", label="torch SDPA (CPU)"),
    "mx_fast_sdpa": dict(color="tab:green", marker="^", label="mx.fast SDPA (CPU)"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_grid(panels: dict, path: Path, *, title: str, xlabel: str, ylabel: str, styles: dict,
              hlines: dict | None = None, logy: bool = False, ncols: int = 4) -> Path:
    """Draw `panels` = {panel title: {series: [(x, y), ...]}} as a grid of log2-x line plots.

    `hlines` = {label: y} draws the same horizontal reference lines on every panel.
    """
    plt = _pyplot()
    names = list(panels)
    ncols = min(ncols, max(len(names), 1))
    nrows = max(1, -(-len(names) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for series, points in panels[name].items():
            points = sorted(points)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], **styles.get(series, {"label": series}))
        for label, y in (hlines or {}).items():
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for points in panels[name].values() for p in points})
        if xs:
            ax.set_xticks(xs, [f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs])
            ax.minorticks_off()
        if logy:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 4), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _panel_name(cfg: dict, with_mode=True, with_dtype=True) -> str:
    parts = []
    if with_mode:
        parts.append("fwd+bwd" if cfg["mode"] == "fwdbwd" else "fwd")
    if with_dtype:
        parts.append(cfg["dtype"])
    parts.append(f"D{cfg['D']} H{cfg['H']} B{cfg['B']}")
    parts.append("causal" if cfg["causal"] else "full")
    return " ".join(parts)


def _machine_line(doc: dict) -> str:
    m = doc.get("machine", {})
    return f"{m.get('cpu_model', '?')}, {m.get('usable_cores', '?')} cores, {doc.get('created', '')[:10]}"


def _sort_key(entry):
    c = entry["config"]
    return (c["mode"], {"fp32": 0, "bf16": 1}.get(c["dtype"], 2), c["D"], c["causal"], c["B"], c["H"])


def throughput_panels(doc: dict) -> dict:
    panels: dict = {}
    for entry in sorted(doc["results"].values(), key=_sort_key):
        cfg = entry["config"]
        panel = panels.setdefault(_panel_name(cfg), {})
        for impl, rec in entry["impls"].items():
            if rec.get("status") == "ok":
                panel.setdefault(impl, []).append((cfg["N"], rec["gflops"]))
    return {k: v for k, v in panels.items() if any(len(p) > 1 for p in v.values())} or panels


def memory_panels(doc: dict) -> tuple[dict, dict]:
    panels: dict = {}
    styles = {}
    for entry in sorted(doc["results"].values(), key=_sort_key):
        cfg = entry["config"]
        panel = panels.setdefault(_panel_name(cfg, with_dtype=False), {})
        for impl, rec in entry["impls"].items():
            mem = rec.get("memory") if rec.get("status") == "ok" else None
            # torch's RSS deltas are too rough to draw beside the MLX allocator's
            # exact counts (they stay in the JSON with their caveat).
            if not mem or mem.get("method") != "mlx":
                continue
            series = f"{impl} {cfg['dtype']}"
            style = dict(IMPL_STYLE[impl])
            style["label"] = f"{style['label']} {cfg['dtype']}"
            style["linestyle"] = "-" if cfg["dtype"] == "fp32" else ":"
            styles[series] = style
            panel.setdefault(series, []).append((cfg["N"], mem["extra_peak_bytes"] / 2**20))
    panels = {k: v for k, v in panels.items() if any(len(p) > 1 for p in v.values())} or panels
    return panels, styles


def write_cpu_attention_plots(doc: dict, out_dir: Path) -> list[Path]:
    """benchmarks/cpu_attention_throughput.png and cpu_attention_memory.png."""
    out_dir = Path(out_dir)
    gemm = (doc.get("gemm") or {}).get("best_gflops")
    hlines = {f"numpy fp32 GEMM ({gemm:.0f} GFLOP/s)": gemm} if gemm else None
    paths = [line_grid(
        throughput_panels(doc), out_dir / "cpu_attention_throughput.png",
        title=f"CPU attention throughput (higher is better) - {_machine_line(doc)}",
        xlabel="N (= Nq = Nk)", ylabel="GFLOP/s", styles=IMPL_STYLE, hlines=hlines)]
    panels, styles = memory_panels(doc)
    paths.append(line_grid(
        panels, out_dir / "cpu_attention_memory.png",
        title=f"CPU attention extra peak memory, MLX allocator (lower is better) - {_machine_line(doc)}",
        xlabel="N (= Nq = Nk)", ylabel="MiB above the inputs", styles=styles, logy=True))
    return paths
