"""Ring attention on W processes of this machine vs one process at the same N.

    PYTHONPATH=$PWD python -m mlx_flash.bench.distributed [--quick] [--sizes 4096 8192]
        [--worlds 2 4] [--out benchmarks/results/distributed_cpu.json]

For each total sequence length N: one process runs `flash_attention` on the
whole sequence (all cores), then W processes (started with `mlx.launch
--backend ring`, one kernel thread each) run `ring_flash_attention` on
their zigzag shards (causal, GQA 8/2 heads, D 64, float32). Per rank:

* forward and forward+backward time (median of fixed repeats, ranks started
  together by a barrier; the slowest rank is the step time),
* peak MLX memory of forward+backward above what was held before,
* the forward's attention alone (the same kernel calls on local data, no
  transfers) and its transfers alone (the K/V shifts, no attention), to
  see how much of the transfer time the overlap hides,
* the bytes each rank sends per step, counted from the plan,
* wall and CPU time (user + system of the process, all threads): on a
  shared machine the wall time also counts waiting for a core, the CPU
  time is the work; the load average is recorded with the results.

On a 2-core machine W processes share 2 cores, so a speed-up is not what
this can show; it shows overhead, memory per rank and overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

CONFIG = dict(batch=1, heads_q=8, heads_kv=2, head_dim=64, causal=True, layout="zigzag", dtype="float32")
DEFAULT_SIZES = (4096, 8192)
QUICK_SIZES = (1024,)


def _inputs(n_local: int, seed: int):
    key = mx.random.key(seed)
    kq, kk, kv, kd = mx.random.split(key, 4)
    B, Hq, Hkv, D = CONFIG["batch"], CONFIG["heads_q"], CONFIG["heads_kv"], CONFIG["head_dim"]
    return (mx.random.normal((B, Hq, n_local, D), key=kq), mx.random.normal((B, Hkv, n_local, D), key=kk),
            mx.random.normal((B, Hkv, n_local, D), key=kv), mx.random.normal((B, Hq, n_local, D), key=kd))


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _timed(fn, barrier, repeats: int) -> dict:
    """Wall and CPU seconds (this process, all threads) of each repeat.

    On a shared machine the wall time also counts waiting for a core; the
    CPU time is the work itself.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        barrier()
        start, start_cpu = time.perf_counter(), _cpu_s()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(_cpu_s() - start_cpu)
    return {"wall_s": wall, "cpu_s": cpu}


def _peak_extra(fn) -> int:
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    return mx.get_peak_memory() - before


def _plan_bytes(group, n_local: int, k, v) -> dict:
    """Bytes this rank sends per call, from the plan the op runs."""
    from mlx_flash.distributed import blocks
    from mlx_flash.distributed.layout import chunks_per_rank, rank_chunks
    from mlx_flash.distributed.ring import messages_per_call

    world = group.size()
    rules = blocks.Rules(chunk=n_local // chunks_per_rank(CONFIG["layout"]), window_left=-1, window_right=0,
                         scale=1.0, softcap=None, has_alibi=False)
    steps = blocks.steps_needed(lambda r: rank_chunks(CONFIG["layout"], world, r), world, rules)
    kv_bytes = k.nbytes + v.nbytes
    dkv_bytes = 4 * (k.size + v.size)
    count = messages_per_call(world, steps)
    return {"steps": steps, "forward_bytes": count["forward_kv"] * kv_bytes,
            "backward_bytes": count["backward_kv"] * kv_bytes + count["backward_dkv"] * dkv_bytes,
            "kv_message_bytes": kv_bytes, "dkv_message_bytes": dkv_bytes}


def _local_forward_compute(group, q, k, v):
    """The forward's kernel calls and merges of this rank, on local K/V (no transfers)."""
    from mlx_flash.distributed import blocks
    from mlx_flash.distributed.layout import chunks_per_rank, rank_chunks

    world, rank, layout = group.size(), group.rank(), CONFIG["layout"]
    n_local = q.shape[2]
    C = n_local // chunks_per_rank(layout)
    rules = blocks.Rules(chunk=C, window_left=-1, window_right=0, scale=q.shape[-1] ** -0.5, softcap=None,
                         has_alibi=False)
    mine = rank_chunks(layout, world, rank)
    acc = [None] * len(mine)
    for t in range(world):
        for call in blocks.plan_step(mine, rank_chunks(layout, world, (rank - t) % world), rules):
            out, lse = blocks.block_forward(call, q, k, v, rules, None, None)
            for c in range(call.q_count):
                rows = slice(c * C, (c + 1) * C)
                acc[call.q_first + c] = blocks.merge(acc[call.q_first + c], out[:, :, rows], lse[:, :, rows])
    return acc


def worker(sizes, repeats: int) -> None:
    """One rank (or the single process when not launched): print one RESULT line per size."""
    import mlx_flash
    from mlx_flash.distributed import ring_flash_attention
    from mlx_flash.distributed.transport import Ring, pack

    launched = "MLX_RANK" in os.environ
    group = mx.distributed.init(strict=True, backend="ring") if launched else None
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    barrier = (lambda: mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))) if group else (lambda: None)
    for n in sizes:
        q, k, v, dout = _inputs(n // world, seed=rank)
        mx.eval(q, k, v, dout)
        if group:
            attend = lambda q, k, v: ring_flash_attention(q, k, v, group=group, layout=CONFIG["layout"],
                                                          causal=CONFIG["causal"])
        else:
            attend = lambda q, k, v: mlx_flash.flash_attention(q, k, v, causal=CONFIG["causal"])
        forward = lambda: mx.eval(attend(q, k, v))
        step = lambda: mx.eval(mx.vjp(attend, [q, k, v], [dout]))
        forward()  # warm-up (first calls build caches)
        record = {"rank": rank, "world": world, "N": n, "N_local": n // world,
                  "forward": _timed(forward, barrier, repeats)}
        barrier()
        record["step_peak_extra_bytes"] = _peak_extra(step)
        record["step"] = _timed(step, barrier, repeats)
        if group:
            record.update(_plan_bytes(group, n // world, k, v))
            compute = lambda: mx.eval(_local_forward_compute(group, q, k, v))
            record["forward_compute_only"] = _timed(compute, barrier, repeats)

            def transfers():
                ring, kv = Ring(group), pack(k, v)
                for _ in range(record["steps"] - 1):
                    kv = ring.shift(kv)
                mx.eval(ring.close(kv))

            record["forward_transfers_only"] = _timed(transfers, barrier, repeats)
        print("RESULT " + json.dumps(record), flush=True)


def _launch(world: int, sizes, repeats: int, timeout: float) -> list:
    from mlx_flash.bench.common import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    script = [str(Path(__file__).resolve()), "--worker", "--repeats", str(repeats), "--sizes", *map(str, sizes)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        env["MLX_FLASH_NUM_THREADS"] = "1"  # W processes share the cores
        launcher = Path(sys.executable).with_name("mlx.launch")
        cmd = [str(launcher), "-n", str(world), "--backend", "ring", "--python", sys.executable, *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    found = [json.loads(l[7:]) for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if len(found) != world * len(sizes):
        raise RuntimeError(f"W={world}: expected {world * len(sizes)} results\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return found


def summarise(records: list) -> list:
    """One row per (N, W): the slowest rank's medians, the sum of CPU over ranks, the largest peak."""
    rows = []
    for key in sorted({(r["N"], r["world"]) for r in records}):
        ranks = [r for r in records if (r["N"], r["world"]) == key]
        slowest = lambda name, kind: max(statistics.median(r[name][kind]) for r in ranks)
        total = lambda name, kind: sum(statistics.median(r[name][kind]) for r in ranks)
        row = {"N": key[0], "world": key[1],
               "forward_wall_s": slowest("forward", "wall_s"), "forward_cpu_s_all_ranks": total("forward", "cpu_s"),
               "step_wall_s": slowest("step", "wall_s"), "step_cpu_s_slowest_rank": slowest("step", "cpu_s"),
               "step_cpu_s_all_ranks": total("step", "cpu_s"),
               "peak_extra_bytes_per_rank": max(r["step_peak_extra_bytes"] for r in ranks)}
        if key[1] > 1:
            compute, transfer = slowest("forward_compute_only", "wall_s"), slowest("forward_transfers_only", "wall_s")
            row.update({
                "forward_compute_only_wall_s": compute, "forward_transfers_only_wall_s": transfer,
                "forward_transfers_only_cpu_s_all_ranks": total("forward_transfers_only", "cpu_s"),
                # Share of the transfer time that did not add to the forward's (wall) time.
                "transfer_hidden": max(0.0, min(1.0, (compute + transfer - row["forward_wall_s"]) / transfer))
                if transfer > 0 else None,
                "bytes_sent_per_rank_forward": ranks[0]["forward_bytes"],
                "bytes_sent_per_rank_backward": ranks[0]["backward_bytes"],
            })
        rows.append(row)
    return rows


def table(rows: list) -> str:
    from mlx_flash.bench.common import fmt_bytes, fmt_time

    lines = ["| N | processes | fwd+bwd wall | fwd+bwd CPU, slowest rank / all ranks | forward wall | "
             "peak extra / rank | sent / rank fwd, bwd | fwd: attention only, transfers only (wall) | transfer hidden |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        multi = r["world"] > 1
        sent = (f"{fmt_bytes(r['bytes_sent_per_rank_forward'])}, {fmt_bytes(r['bytes_sent_per_rank_backward'])}"
                if multi else "-")
        parts = (f"{fmt_time(r['forward_compute_only_wall_s'])}, {fmt_time(r['forward_transfers_only_wall_s'])}"
                 if multi else "-")
        hidden = "-" if r.get("transfer_hidden") is None else f"{100 * r['transfer_hidden']:.0f}%"
        lines.append(f"| {r['N']} | {r['world']} | {fmt_time(r['step_wall_s'])} | "
                     f"{fmt_time(r['step_cpu_s_slowest_rank'])} / {fmt_time(r['step_cpu_s_all_ranks'])} | "
                     f"{fmt_time(r['forward_wall_s'])} | {fmt_bytes(r['peak_extra_bytes_per_rank'])} | {sent} | "
                     f"{parts} | {hidden} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_SIZES}, 2 repeats")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/distributed_cpu.json)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = 2 if args.quick and args.repeats == 3 else args.repeats
    if args.worker:
        worker(sizes, repeats)
        return 0
    from mlx_flash.bench.common import RESULTS_DIR, git_state, machine_info, now_iso, write_json

    for n in sizes:
        for w in args.worlds:
            if n % (2 * w):
                parser.error(f"--sizes: {n} is not a multiple of 2 * {w} (zigzag shards)")
    load_before = os.getloadavg()
    records = []
    for world in [1, *args.worlds]:
        print(f"W={world} ...", flush=True)
        records += _launch(world, sizes, repeats, args.timeout)
    rows = summarise(records)
    print(table(rows))
    out = args.out or RESULTS_DIR / "distributed_cpu.json"
    # Other work on a shared machine shows up in every number: keep the load with them.
    write_json(out, {"benchmark": "distributed", "date": now_iso(), "config": CONFIG, "repeats": repeats,
                     "machine": machine_info(), "git": git_state(),
                     "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
                     "summary": rows, "per_rank": records})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
