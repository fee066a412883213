"""Counted work of attention forwards in the emulation: ours (mlx_flash's
Metal kernels through metal_emu.attention) and MLX's steel attention
(metal_emu.mlx_attention), on the same shapes.

Counts, not speed: 8x8 simdgroup multiplies, device bytes read and written
(data buffers: Q, K, V, O, lse, masks; parameter buffers apart), threadgroup
bytes, threadgroup barriers and transcendental calls, as the instrumented
emulation sees them (docs/metal_emulation.md, "Counting").

Large grids are counted exactly without running every threadgroup. Both
kernels give threadgroup x of the grid one query block (and y, z heads and
batch, all alike here), and a query block's counts depend only on which
key tiles it visits:
- non-causal: every query block does the same work (N divides by the
  block sizes); the first and the last block are counted and must agree,
  and the total is that times the number of threadgroups;
- causal: block i visits ceil((i + 1) BQ / BK) key tiles, so its counts
  are linear in i within each residue class of i modulo P = 8 (any BK / BQ
  ratio up to 8); blocks 0 .. 2P - 1 are counted, the line of each class is
  extended to all blocks, and the last block (the costliest) is counted
  too and must match the prediction exactly, else the tool fails.

Run `python tools/metal_counts.py` (writes the table into docs/metal.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import harness, mlx_attention

PERIOD = 8
COUNTERS = ("simdgroup_mma", "device_read_bytes", "device_write_bytes", "param_read_bytes", "threadgroup_read_bytes",
            "threadgroup_write_bytes", "barriers", "exp", "exp2", "log", "log2", "tanh", "other_math")
# MLX's steel attention binds its buffers by index (steel_attention.h).
_MLX_BUFFERS = {"buffer(0)": "q", "buffer(1)": "k", "buffer(2)": "v", "buffer(3)": "out", "buffer(4)": "params",
                "buffer(5)": "mask_params", "buffer(6)": "mask", "buffer(7)": "sinks", "buffer(8)": "lse"}


def _is_param(name: str) -> bool:
    return "param" in name


def _flatten(records) -> dict:
    """One dict of COUNTERS summed over the launches of one call."""
    out = dict.fromkeys(COUNTERS, 0)
    for r in records:
        for key in ("simdgroup_mma", "threadgroup_read_bytes", "threadgroup_write_bytes", "barriers", "exp", "exp2",
                    "log", "log2", "tanh", "other_math"):
            out[key] += r[key]
        for name, (read, written) in r["buffers"].items():
            name = _MLX_BUFFERS.get(name, name)
            if _is_param(name):
                out["param_read_bytes"] += read
            else:
                out["device_read_bytes"] += read
                out["device_write_bytes"] += written
    return out


def _inputs(N: int, D: int, dtype, B: int = 1, H: int = 1):
    g = np.random.default_rng(0)
    return [mx.array(g.standard_normal((B, H, N, D)).astype(np.float32)).astype(dtype) for _ in range(3)]


def _run_ours(q, k, v, causal):
    from . import attention as emu

    emu.forward(q, k, v, causal=causal)


def _run_mlx(q, k, v, causal):
    mlx_attention.steel_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal)


KERNELS: dict = {"ours": _run_ours, "mlx": _run_mlx}


def _block_sizes(records, N: int) -> tuple:
    """(BQ, BK) of the (first) launch: BQ from the grid, BK from the
    template (ours: "BK"; MLX's attention<T, BQ, BK, ...>)."""
    r = records[0]
    bq = -(-N // r["threadgroups_per_grid"][0])
    t = r["template"]
    bk = int(t["BK"]) if isinstance(t, dict) else int(t[2])
    return bq, bk


def count_blocks(kernel: Callable, q, k, v, causal: bool, blocks) -> tuple:
    """({block: counts} for the query blocks listed, the first launch records)."""
    out = {}
    first = None
    for i in blocks:
        with harness.counting(only_threadgroups=lambda name, tgs, i=i: [(i, 0, 0)]) as records:
            kernel(q, k, v, causal)
        if first is None:
            first = records
        out[i] = _flatten(records)
    return out, first


def count_forward(which: str, N: int, D: int, causal: bool, dtype=mx.float16) -> dict:
    """Exact totals over the whole grid of one forward ([1, 1, N, D])."""
    kernel = KERNELS[which]
    q, k, v = _inputs(N, D, dtype)
    _, records = count_blocks(kernel, q, k, v, causal, [0])
    bq, bk = _block_sizes(records, N)
    nq = -(-N // bq)
    if N % bq or N % bk:
        raise ValueError(f"count_forward: N={N} must be a multiple of the block sizes {bq} x {bk}")
    if not causal:
        c, _ = count_blocks(kernel, q, k, v, causal, [0, nq - 1])
        if c[0] != c[nq - 1]:
            raise AssertionError(f"{which}: first and last query block differ without causal: {c[0]} vs {c[nq - 1]}")
        per_block = [c[0]] * nq
    else:
        sample = sorted(set(range(min(2 * PERIOD, nq))) | {nq - 1})
        c, _ = count_blocks(kernel, q, k, v, causal, sample)

        def predict(i):
            r = i % PERIOD
            if i < 2 * PERIOD:
                return c[i]
            steps = (i - r) // PERIOD
            return {n: c[r][n] + (c[r + PERIOD][n] - c[r][n]) * steps for n in COUNTERS}

        if nq > 2 * PERIOD and predict(nq - 1) != c[nq - 1]:
            raise AssertionError(f"{which}: causal counts are not linear per residue class: block {nq - 1} "
                                 f"predicted {predict(nq - 1)}, counted {c[nq - 1]}")
        per_block = [predict(i) for i in range(nq)]
    total = {n: sum(b[n] for b in per_block) for n in COUNTERS}
    tiles = sum(min(N // bk, -(-((i + 1) * bq) // bk)) if causal else N // bk for i in range(nq))
    total.update(kernel=which, N=N, D=D, causal=causal, dtype=str(dtype).split(".")[-1], block_q=bq, block_k=bk,
                 threadgroups=nq, key_tiles=tiles, barriers_per_key_tile=total["barriers"] / tiles,
                 barriers_per_1024_keys=total["barriers"] / (tiles * bk / 1024))
    return total


# --------------------------------------------------------------------------
# The docs table

BEGIN = "<!-- metal-counts:begin (generated by tools/metal_counts.py) -->"
END = "<!-- metal-counts:end -->"


def _mib(x) -> str:
    return f"{x / 2**20:.2f}"


def table(rows) -> str:
    head = ("| D | causal | kernel | BQ x BK | 8x8 MMAs (M) | device read MiB | device written MiB | param read KiB "
            "| tg read MiB | tg written MiB | barriers / threadgroup | barriers / key tile | barriers / 1024 keys "
            "| exp+exp2 (M) | log+log2 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['D']} | {'yes' if r['causal'] else 'no'} | {r['kernel']} | {r['block_q']} x {r['block_k']} "
            f"| {r['simdgroup_mma'] / 1e6:.3f} | {_mib(r['device_read_bytes'])} | {_mib(r['device_write_bytes'])} "
            f"| {r['param_read_bytes'] / 1024:.1f} | {_mib(r['threadgroup_read_bytes'])} "
            f"| {_mib(r['threadgroup_write_bytes'])} | {r['barriers'] / r['threadgroups']:.1f} "
            f"| {r['barriers_per_key_tile']:.2f} "
            f"| {r['barriers_per_1024_keys']:.1f} | {(r['exp'] + r['exp2']) / 1e6:.3f} | {r['log'] + r['log2']} |")
    return head + "\n".join(lines) + "\n"


def write_docs(path: str, rows, note: str) -> None:
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{note}\n\n{table(rows)}{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def _commit() -> str:
    """The checkout's commit (with "+changes" when metal_src/ is modified), or "unknown"."""
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "metal_src"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--docs", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs", "metal.md"),
                        help="markdown file whose generated block is replaced")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    reason = mlx_attention.unavailable_reason()
    if reason:
        print(f"cannot count: {reason}", file=sys.stderr)
        return 1
    dtype = getattr(mx, args.dtype)
    rows = []
    for D in args.dims:
        for causal in (False, True):
            for which in ("ours", "mlx"):
                t = time.time()
                rows.append(count_forward(which, args.n, D, causal, dtype))
                print(f"D={D} causal={causal} {which}: {time.time() - t:.0f} s", file=sys.stderr)
    note = (f"Kernels of metal_src/ at commit {_commit()}. "
            f"B = H = 1, Nq = Nk = {args.n}, {args.dtype}, forward only (ours: every launch of the forward). "
            "Counted by the instrumented emulation, totals over the whole grid (exact scaling from a few "
            "threadgroups, see tests/metal_emu/counts.py). Device bytes are the data buffers (Q, K, V, O, lse); "
            "parameter structs apart. These are counts of work issued, not a speed claim: they say nothing of "
            "latency hiding, occupancy, caches or what Apple's compiler makes of the code.")
    print(table(rows))
    if not args.no_write:
        write_docs(os.path.normpath(args.docs), rows, note)
    return 0
