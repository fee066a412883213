"""CPU matmul2d against numpy's (OpenBLAS) fp32 GEMM, in the same run.

    python -m mlx_flash.bench.matmul_cpu [--sizes 512 1024 2048] [--repeats 5]
                                         [--out PATH] [--check-targets]

For each n it times n x n x n products: numpy fp32 (the machine's ceiling),
mlx_flash fp32, fp16 and bf16 activations times an e4m3 weight (per output
channel scales, `[N, K]` layout as an nn.Linear weight), and bf16 x bf16,
plus one decode step (M = 1 through a 4096 x 4096 weight) in fp16 and fp8;
each timing is the best of `--repeats`, the variants measured in turn
within each repeat so that they share the machine's noise. Reports GFLOP/s
(2 n^3 / s), the ratio to numpy, and the bytes an n x n weight takes in fp8
(plus its scales) against fp16. Writes JSON naming the machine (by default into
the current directory).

`--cpu-time` times by process CPU time; with `MLX_FLASH_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1` that gives per-core efficiency, which other jobs on
a shared machine disturb far less than wall time (OpenBLAS's idle threads
spin, so do not compare CPU times with more than one thread).

OpenBLAS may be pinned to an older kernel here by OPENBLAS_CORETYPE (see the
environment notes); for a fair ceiling run this command with it unset, e.g.
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m ...`. The JSON
records the kernel numpy actually used (threadpoolctl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import fp8
from ..matmul import matmul2d

TARGETS = {"float32": 0.7, "float16 x e4m3": 0.6}  # ratio to numpy fp32 at the largest size


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    try:
        m = re.search(r"flags\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        flags = set()
    return sorted(f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile"))


def blas_info():
    try:
        import threadpoolctl

        return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        return "threadpoolctl not installed"


def machine() -> dict:
    from .. import _ext

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags(), "platform": platform.platform(),
        "numpy": np.__version__, "numpy_blas": blas_info(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "mlx": mx.__version__,
        "mlx_flash_isa": _ext.cpu_kernel_isa(), "mlx_flash_threads": _ext.num_threads(),
        # Other processes share the cores: timings taken under load are noisy.
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def operands(n: int, rng):
    a32 = rng.standard_normal((n, n)).astype(np.float32)
    w32 = rng.standard_normal((n, n)).astype(np.float32)
    a, w = mx.array(a32), mx.array(w32)
    codes, scale = fp8.quantize(w, fmt="e4m3", axis=0)  # [N, K] weight, [N, 1] scales
    ops = {
        "numpy float32": (lambda: a32 @ w32),
        "float32": (lambda x=a, y=w: mx.eval(matmul2d(x, y))),
        "float16 x e4m3": (lambda x=a.astype(mx.float16), s=scale.reshape(1, -1):
                           mx.eval(matmul2d(x, codes, b_fmt="e4m3", b_scale=s, transpose_b=True))),
        "bfloat16 x e4m3": (lambda x=a.astype(mx.bfloat16), s=scale.reshape(1, -1):
                            mx.eval(matmul2d(x, codes, b_fmt="e4m3", b_scale=s, transpose_b=True))),
        "bfloat16": (lambda x=a.astype(mx.bfloat16), y=w.astype(mx.bfloat16): mx.eval(matmul2d(x, y))),
    }
    mx.eval(codes, scale)
    return ops, codes, scale


_clock = time.perf_counter  # --cpu-time switches to time.process_time

# OpenBLAS's worker threads spin for a while after each call (up to about
# 2^28 cycles, OPENBLAS_THREAD_TIMEOUT): a product timed right after numpy's
# shares the cores with them. So numpy runs last in each round, followed by
# this pause.
_AFTER_NUMPY_S = 0.3


def _best_times(ops: dict, repeats: int) -> dict:
    """Best time of each op over `repeats` rounds (numpy's op last in a round)."""
    order = [n for n in ops if not n.startswith("numpy")] + [n for n in ops if n.startswith("numpy")]
    for name in order:  # warm-up (and build any lazy inputs)
        ops[name]()
    time.sleep(_AFTER_NUMPY_S)
    best = {name: float("inf") for name in ops}
    for _ in range(repeats):
        for name in order:
            t0 = _clock()
            ops[name]()
            best[name] = min(best[name], _clock() - t0)
            if name.startswith("numpy"):
                time.sleep(_AFTER_NUMPY_S)
    return best


def bench_size(n: int, repeats: int, rng) -> dict:
    ops, codes, scale = operands(n, rng)
    best = _best_times(ops, repeats)
    flops = 2.0 * n**3
    ceiling = best["numpy float32"]
    rows = {name: {"best_s": t, "gflops": flops / t / 1e9, "ratio_to_numpy_fp32": ceiling / t}
            for name, t in best.items()}
    weight = {"fp8_bytes": int(codes.nbytes + scale.nbytes), "fp16_bytes": 2 * n * n,
              "fp32_bytes": 4 * n * n}
    weight["fp8_over_fp16"] = weight["fp8_bytes"] / weight["fp16_bytes"]
    return {"n": n, "results": rows, "weight_memory": weight}


def bench_decode(k: int, n: int, repeats: int, rng) -> dict:
    """One token through an [n, k] weight (M = 1): the LLM decode case, bound
    by reading the weight, so fp8's half-size weight shows up in time."""
    x32 = rng.standard_normal((1, k)).astype(np.float32)
    w32 = rng.standard_normal((n, k)).astype(np.float32)
    x16, w = mx.array(x32).astype(mx.float16), mx.array(w32)
    codes, scale = fp8.quantize(w, fmt="e4m3", axis=0)
    w16 = w.astype(mx.float16)
    s = scale.reshape(1, -1)
    mx.eval(x16, codes, s, w16)
    ops = {
        "numpy float32": lambda: x32 @ w32.T,
        "float16 x float16": lambda: mx.eval(matmul2d(x16, w16, transpose_b=True)),
        "float16 x e4m3": lambda: mx.eval(matmul2d(x16, codes, b_fmt="e4m3", b_scale=s, transpose_b=True)),
    }
    best = _best_times(ops, repeats)
    return {"k": k, "n": n, "results": {name: {"best_ms": t * 1e3} for name, t in best.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default ./matmul_cpu_<cpu>_<cores>c.json in the current directory)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU time instead of wall time: with MLX_FLASH_NUM_THREADS=1 "
                        "OPENBLAS_NUM_THREADS=1 this measures per-core efficiency, which other jobs on "
                        "the machine disturb less than wall time")
    p.add_argument("--check-targets", action="store_true",
                   help=f"exit 1 unless the largest size meets {TARGETS} (ratio to numpy fp32)")
    args = p.parse_args(argv)
    global _clock
    _clock = time.process_time if args.cpu_time else time.perf_counter
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    info = machine()
    info["timer"] = "process CPU time" if args.cpu_time else "wall time"
    info["OPENBLAS_NUM_THREADS"] = os.environ.get("OPENBLAS_NUM_THREADS")
    print(f"# {info['cpu']}, {info['cores']} cores, mlx_flash ISA {info['mlx_flash_isa']}, "
          f"numpy BLAS {info['numpy_blas']}, OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}")
    sizes = []
    for n in args.sizes:
        r = bench_size(n, args.repeats, rng)
        sizes.append(r)
        for name, row in r["results"].items():
            print(f"n={n:5d}  {name:16s} {row['gflops']:7.1f} GFLOP/s  x{row['ratio_to_numpy_fp32']:.2f} of numpy")
        w = r["weight_memory"]
        print(f"n={n:5d}  weight bytes fp8 {w['fp8_bytes']} vs fp16 {w['fp16_bytes']} ({w['fp8_over_fp16']:.3f})")
    decode = bench_decode(4096, 4096, args.repeats, rng)
    info["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for name, row in decode["results"].items():
        print(f"decode 1x4096 @ 4096x4096^T  {name:18s} {row['best_ms']:7.2f} ms")
    report = {"benchmark": "matmul2d CPU vs numpy fp32 GEMM", "machine": info, "targets": TARGETS,
              "sizes": sizes, "decode": decode, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")
        tag = "_cputime_1thread" if args.cpu_time and info["mlx_flash_threads"] == 1 else ""
        out = Path(f"matmul_cpu_{slug}_{info['cores']}c{tag}.json")  # cwd: never into the package
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.check_targets:
        last = sizes[-1]["results"]
        missed = {k: last[k]["ratio_to_numpy_fp32"] for k, t in TARGETS.items() if last[k]["ratio_to_numpy_fp32"] < t}
        if missed:
            print(f"targets missed: {missed}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
