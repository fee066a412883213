"""GPU check of the warp-specialised forward at wide heads (96, 192, 256,
192 / 128): kernel builds in parallel processes, then its timing.

    python3 tools/cuda_ws_wide_check.py build I N [J,K,..]   # share I of N of the kernels (tiny calls), or jobs J, K
    python3 tools/cuda_ws_wide_check.py bench OUT.json [CASES [ws_only]]   # bench.cuda's wide_heads section

build fills MLX's on-disk kernel cache (MLX_PTX_CACHE_DIR, fresh per run:
MLX keys it by kernel name only) with every wide ws instance (fp16/bf16,
dense / windowed) and the attention_fwd_mma instances the benchmark times
beside them, so the tests and timings that follow load rather than compile.
CASES: indices into bench.cuda.WIDE_HEADS_CASES, comma-separated (default all);
ws_only: time the ws kernel alone (a tile variant chosen by cuda_fwd_ws's knobs).
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402

import mlx_flash  # noqa: E402
from mlx_flash.backends import cuda_fwd_ws as ws  # noqa: E402


def build(index: int, count: int, only: str | None = None):
    """Builds share `index` of `count` of the jobs (dtype, pair, causal, route),
    pair-major, or with `only` the listed job indices (comma-separated)."""
    jobs = [(dt, pair, causal, mode) for pair in ws.WIDE_PAIRS for dt in (mx.float16, mx.bfloat16)
            for causal in (False, True) for mode in ("all", "0")]
    chosen = [jobs[int(i)] for i in only.split(",")] if only else jobs[index::count]
    for dt, (d, dv), causal, mode in chosen:
        ws.WIDE_MODE = mode
        q = mx.random.normal((1, 2, 200, d)).astype(dt)
        k = mx.random.normal((1, 2, 200, d)).astype(dt)
        v = mx.random.normal((1, 2, 200, dv)).astype(dt)
        t0 = time.perf_counter()
        try:
            mx.eval(mlx_flash.flash_attention(q, k, v, causal=causal))
            print(f"built {dt} {d}/{dv} causal={int(causal)} {'ws' if mode == 'all' else 'old'} "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 (report, keep building the others)
            print(f"build {dt} {d}/{dv} causal={int(causal)} mode={mode} FAILED: {e}", flush=True)


def _card() -> str:
    """The GPU's name: nvidia-smi's (bench.cuda.card_name), else torch's (the
    lent machines may lack nvidia-smi)."""
    from mlx_flash.bench import cuda as bc

    name = bc.card_name()
    if name == "cuda":
        try:
            import torch

            name = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            pass
    return name


def bench(path: str, cases: str | None, others: bool = True):
    from mlx_flash.bench import cuda as bc

    chosen = None if not cases else [bc.WIDE_HEADS_CASES[int(i)] for i in cases.split(",")]
    card = _card()

    class Saving(bc.Recorder):
        """Rewrites the JSON after every row: a job killed at its time limit keeps what it measured."""

        def add(self, **row):
            super().add(**row)
            with open(path, "w") as f:
                json.dump({"card": card, "mlx": mx.__version__,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": self.rows}, f, indent=1)

    bc.bench_wide_heads(Saving(), cases=chosen, others=others)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        bench(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None, "ws_only" not in sys.argv[4:])
