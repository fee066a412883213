"""Helpers every benchmark module shares: timing, memory, machine facts,
the GEMM ceiling, progress lines and JSON files.

Nothing here knows about attention; `cpu_attention.py` (and the CUDA,
matmul and LM benchmarks) build on these pieces. Only the standard library
and numpy are needed; MLX, torch and threadpoolctl are used when present.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# Repository root when run from a checkout: only to record its git commit.
# Results go where --out says (by default the current directory), never here.
REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class TimingPolicy:
    """How long to measure one thing.

    One warm-up call, then repeats until `budget_s` is spent, at least
    `min_repeats` and at most `max_repeats` of them. A warm-up longer than
    `long_call_s` is counted as the only sample: at that length the
    warm-up effects (thread start, first allocations) are noise, and a
    second call would double the cost of the largest sizes.
    """

    budget_s: float = 3.0
    min_repeats: int = 3
    max_repeats: int = 10
    long_call_s: float = 3.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


TIMING_RULE = (
    "each implementation of a config gets one warm-up call (memory is measured on it); then "
    "the implementations are timed in interleaved rounds (one call of each per round, so a "
    "change of load on a shared machine hits all of them alike) until each has spent budget_s "
    "(at least min_repeats, at most max_repeats calls); time_s is the median; a warm-up longer "
    "than long_call_s is that implementation's only sample (warmup_counted)"
)


def _summary(samples: list[float], warm_s: float, counted: bool) -> dict:
    return {
        "time_s": statistics.median(samples),
        "min_s": min(samples),
        "times_s": [round(t, 6) for t in samples],
        "repeats": len(samples),
        "warmup_s": round(warm_s, 6),
        "warmup_counted": counted,
    }


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(calls: dict, policy: TimingPolicy, warmups: dict | None = None) -> dict:
    """Median wall time of each blocking call in `calls` ({name: fn}), timed in rounds.

    `warmups[name]` (default the call itself) runs once first; callers pass a
    wrapped call there to measure memory on it. Returns {name: timing dict},
    or {name: the exception} for a call that raised (the others go on).
    """
    warmups = warmups or {}
    out, samples, warm = {}, {}, {}
    for name, fn in calls.items():
        try:
            warm[name] = _timed(warmups.get(name) or fn)
        except Exception as exc:  # one failing implementation must not lose the others
            out[name] = exc
            continue
        samples[name] = [warm[name]] if warm[name] >= policy.long_call_s else []
    active = [n for n in samples if not samples[n]]

    def finished(name):
        got = samples[name]
        return len(got) >= policy.max_repeats or (len(got) >= policy.min_repeats and sum(got) >= policy.budget_s)

    while active:
        for name in list(active):
            try:
                samples[name].append(_timed(calls[name]))
            except Exception as exc:
                out[name] = exc
                active.remove(name)
                continue
            if finished(name):
                active.remove(name)
    for name, got in samples.items():
        if name not in out:
            out[name] = _summary(got, warm[name], warm[name] >= policy.long_call_s)
    return out


def time_call(fn: Callable[[], object], policy: TimingPolicy, warmup: Callable[[], object] | None = None) -> dict:
    """Median wall time of one blocking call `fn()` (see `time_interleaved`); raises what it raises."""
    res = time_interleaved({"fn": fn}, policy, {"fn": warmup} if warmup else None)["fn"]
    if isinstance(res, Exception):
        raise res
    return res


# --------------------------------------------------------------------------- memory

MLX_MEMORY_METHOD = (
    "MLX allocator: mx.reset_peak_memory() before the warm-up call, then "
    "extra = mx.get_peak_memory() - mx.get_active_memory() taken before the call "
    "(inputs and cotangent already allocated are not counted; outputs, lse, grads and workspace are)"
)

RSS_MEMORY_METHOD = (
    "process RSS: peak (VmHWM, reset through /proc/self/clear_refs) during the warm-up call "
    "minus VmRSS before it; approximate, and an underestimate when the allocator reuses "
    "memory it already holds"
)


def mlx_extra_peak(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap `fn` so that calling it records MLX's extra peak memory in `.result`."""
    import mlx.core as mx

    def wrapped():
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        out = fn()
        wrapped.result = {"peak_bytes": int(mx.get_peak_memory()), "baseline_bytes": int(before),
                          "extra_peak_bytes": int(mx.get_peak_memory() - before)}
        return out

    wrapped.result = None
    return wrapped


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_supported() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def rss_extra_peak(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap `fn` so that calling it records the process's extra peak RSS in `.result`."""

    def wrapped():
        before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        peak = _proc_status_kib("VmHWM")
        wrapped.result = None if before is None or peak is None else {
            "extra_peak_bytes": max(0, (peak - before) * 1024), "baseline_bytes": before * 1024}
        return out

    wrapped.result = None
    return wrapped


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for these kernels, as /proc/cpuinfo lists them."""
    wanted = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # a broken optional install must not stop the benchmark
        return None
    return getattr(mod, "__version__", "unknown")


def git_state() -> dict | None:
    """Commit of the checkout being measured, and whether its kernels (csrc/) differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "csrc_modified": bool(git("status", "--porcelain", "--", "csrc"))}
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU, cores, OS and library versions of this run."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
    }
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
    except Exception:
        info["mlx"] = None
    try:
        import mlx_flash
        from mlx_flash import _ext

        info["mlx_flash"] = mlx_flash.__version__
        info["mlx_flash_cpu_kernel_isa"] = _ext.cpu_kernel_isa()
        info["mlx_flash_cpu_threads"] = _ext.num_threads()
    except Exception as exc:
        info["mlx_flash_ext_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    info["git"] = git_state()
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- GEMM ceiling

# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE may be set on these machines for the
# sake of older OpenBLAS builds; they slow a current numpy, so the ceiling is
# measured in a child process without them (the parent keeps its environment).
OPENBLAS_ENV_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_GEMM_SCRIPT = r"""
import json, sys, time
import numpy as np
sizes = json.loads(sys.argv[1]); repeats = int(sys.argv[2])
rng = np.random.default_rng(0)
rates = {}
for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
    rates[str(n)] = {"best_s": best, "gflops": 2.0 * n ** 3 / best / 1e9}
blas = None
try:
    import threadpoolctl
    blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")}
            for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    source = "threadpoolctl"
except Exception:
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        np.show_config()
    blas = buf.getvalue()[-2000:]
    source = "numpy.show_config"
print(json.dumps({"rates": rates, "blas": blas, "blas_info_source": source, "numpy": np.__version__}))
"""


def measure_gemm(sizes=(1024, 2048, 4096), repeats: int = 3, timeout_s: float = 600.0) -> dict:
    """The machine's fp32 GEMM rate through numpy (OpenBLAS), best over `sizes`.

    Runs in a subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed,
    and records which of them were set and which OpenBLAS kernel ran.
    """
    env = dict(os.environ)
    removed = {k: env.pop(k) for k in OPENBLAS_ENV_OVERRIDES if k in env}
    try:
        proc = subprocess.run([sys.executable, "-c", _GEMM_SCRIPT, json.dumps(list(sizes)), str(repeats)],
                              env=env, capture_output=True, text=True, timeout=timeout_s, check=True)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "env_removed": removed}
    best_n, best = max(data["rates"].items(), key=lambda kv: kv[1]["gflops"])
    return {
        "status": "ok",
        "dtype": "float32",
        "sizes": list(sizes),
        "rates": data["rates"],
        "best_gflops": best["gflops"],
        "best_size": int(best_n),
        "blas": data["blas"],
        "blas_info_source": data["blas_info_source"],
        "numpy": data["numpy"],
        "env_removed": removed,
        "note": "measured in a child process with " + " and ".join(OPENBLAS_ENV_OVERRIDES)
                + " unset (they slow a current numpy); env_removed lists the values the parent had",
    }


# --------------------------------------------------------------------------- progress

class Progress:
    """One line per step on stderr: `[ 3/40  7%  elapsed 0:12] label ... result`.

    Plain lines (no terminal control) so logs of background runs stay readable.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = max(total, 1)
        self.done = 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled

    def _prefix(self) -> str:
        elapsed = int(time.perf_counter() - self.start)
        pct = 100 * self.done // self.total
        width = len(str(self.total))
        return f"[{self.done:>{width}}/{self.total} {pct:3d}% {elapsed // 60}:{elapsed % 60:02d}]"

    def begin(self, label: str) -> None:
        if self.enabled:
            print(f"{self._prefix()} {label} ...", file=self.stream, flush=True)

    def end(self, label: str, result: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"{self._prefix()} {label}: {result}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


# --------------------------------------------------------------------------- files

def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a killed run never leaves half a file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"
