"""Ring attention over real processes (mlx.launch, ring backend, this machine).

Each launch runs one suite of tests/distributed_worker.py on W processes and
is bounded by a timeout: a deadlocked worker makes its test fail (the whole
process group is killed), never hang. World sizes 2 and 4; cases cover
causal or not, both layouts, GQA, Dv != D, window, sinks, softcap, ALiBi,
odd chunk sizes (17), float16/bfloat16 and both transports. Planning and
argument checks run in this process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from helpers import BASE_SEED, qkv, rel_error, rng, to_np

import mlx_flash
from mlx_flash.distributed import ring_flash_attention, shard, unshard
from mlx_flash.distributed.blocks import Rules, plan_step, steps_needed
from mlx_flash.distributed.layout import rank_chunks
from mlx_flash.distributed.ring import messages_per_call, return_hops

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCHER = Path(sys.executable).with_name("mlx.launch")


def _free_ports(count: int) -> int:
    """A base port with `count` free ports after it (the ring backend listens on base + rank)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        sockets = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range found")


def launch(world: int, *args: str, timeout: float):
    """Run the worker on `world` processes; (returncode or None on timeout, output).

    mlx.launch exits 0 even when a worker fails, so callers count results too.
    """
    cmd = [str(LAUNCHER), "-n", str(world), "--backend", "ring", "--starting-port", str(_free_ports(world)),
           "--python", sys.executable, str(WORKER), *args]
    # Every rank draws the same inputs from the session seed.
    env = dict(os.environ, PYTHONPATH=str(REPO), MLX_FLASH_NUM_THREADS="1", MLX_FLASH_TEST_SEED=str(BASE_SEED))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker it started
        out, _ = proc.communicate()
        return None, out


def results(output: str) -> list:
    return [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]


def run_suite(world: int, suite: str, cases=None, timeout: float = 90.0) -> list:
    args = [suite, str(BASE_SEED)] + ([json.dumps(cases)] if cases is not None else [])
    rc, out = launch(world, *args, timeout=timeout)
    assert rc is not None, f"{suite} on {world} ranks did not finish in {timeout} s (deadlock?)\n{out[-3000:]}"
    found = results(out)
    bad = [r for r in found if not r["ok"]]
    assert rc == 0 and not bad, f"{suite} on {world} ranks: rc {rc}, failures {bad}\n{out[-3000:]}"
    return found


def _case(layout, n_local, options=None, dtype="float32", transport=None, B=1, Hq=4, Hkv=2, D=16, Dv=None):
    case = dict(layout=layout, N_local=n_local, options=options or {}, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, D=D)
    if Dv is not None:
        case["Dv"] = Dv
    if transport is not None:
        case["transport"] = transport
    return case


# Chunks of 17 tokens: a contiguous shard is one chunk, a zigzag shard two.
CASES_2 = [
    _case("contiguous", 17, {"causal": True}),
    _case("zigzag", 34, {"causal": True}, Dv=8),
    _case("zigzag", 34, {}, B=2, Hq=2, Hkv=2),
    _case("contiguous", 17, {"window": [7, 5]}, Hkv=1),
    _case("zigzag", 34, {"causal": True, "window": [20, None], "sinks": True, "softcap": 3.0}),
    _case("zigzag", 34, {"causal": True, "alibi_slopes": True}),
    _case("contiguous", 17, {"alibi_slopes": True, "window": [30, 9]}),
    _case("zigzag", 34, {"causal": True}, dtype="float16"),
    _case("contiguous", 17, {"causal": True, "window": [11, None]}, dtype="bfloat16"),
    _case("zigzag", 34, {"causal": True, "sinks": True}, transport="gather"),
]
CASES_4 = [
    _case("zigzag", 34, {"causal": True}, Hq=4, Hkv=1),
    _case("contiguous", 17, {"causal": True, "window": [25, None], "alibi_slopes": True}),
    _case("zigzag", 34, {"softcap": 2.0, "sinks": True}, dtype="bfloat16"),
    _case("contiguous", 17, {"causal": True}, dtype="float16", transport="gather"),
    # Two steps: the dK/dV sums go home backwards (1 hop, not 3).
    _case("contiguous", 17, {"causal": True, "window": [10, None]}, B=2),
    _case("zigzag", 34, {"window": [3, 2]}),
]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)], ids=["W2", "W4"])
def test_ring_matches_single_process(world, cases):
    found = run_suite(world, "attention", cases, timeout=120.0)
    assert len(found) == world * len(cases)


def test_lora_step_matches_one_process():
    found = run_suite(2, "lora", timeout=120.0)
    assert len(found) == 2 * 2


def test_ranks_that_disagree_get_a_clear_error():
    found = run_suite(2, "mismatch", timeout=60.0)
    assert len(found) == 2


def test_a_deadlocked_launch_fails_instead_of_hanging():
    # Both ranks sending 256 MiB before receiving: what the ring's parity order avoids.
    rc, out = launch(2, "deadlock", str(BASE_SEED), timeout=12.0)
    assert rc is None, f"expected the launch to be killed at the timeout, got rc {rc}\n{out[-2000:]}"


# --- in this process ------------------------------------------------------------

def _work(calls):
    return sum(c.q_rows * c.k_rows for c in calls)


def test_zigzag_balances_causal_work():
    world, n_local = 4, 32
    work = {}
    for layout, chunk in (("zigzag", n_local // 2), ("contiguous", n_local)):
        rules = Rules(chunk=chunk, window_left=-1, window_right=0, scale=1.0, softcap=None, has_alibi=False)
        chunks = lambda r: rank_chunks(layout, world, r)
        work[layout] = [sum(_work(plan_step(chunks(r), chunks((r - t) % world), rules)) for t in range(world))
                        for r in range(world)]
    assert len(set(work["zigzag"])) == 1, work
    assert work["contiguous"] == sorted(work["contiguous"]) and work["contiguous"][0] < work["contiguous"][-1]
    # Diagonal pairs are counted whole (the kernel skips their masked tiles).
    assert sum(work["zigzag"]) <= sum(work["contiguous"])


def test_dkv_sums_take_the_short_way_home():
    assert return_hops(4, 4) == 1      # the full ring: one more hop onwards
    assert return_hops(4, 2) == -1     # two steps: one hop back instead of three onwards
    assert return_hops(8, 1) == 0      # no step past the own shard: already home
    assert messages_per_call(4, 4) == {"forward_kv": 3, "backward_kv": 3, "backward_dkv": 4}


def test_window_ends_the_ring_early():
    world, chunk = 8, 16
    chunks = lambda r: rank_chunks("contiguous", world, r)
    rules = Rules(chunk=chunk, window_left=20, window_right=0, scale=1.0, softcap=None, has_alibi=False)
    assert steps_needed(chunks, world, rules) == 3  # 20 keys back reach two chunks back
    causal = rules._replace(window_left=-1)
    assert steps_needed(chunks, world, causal) == world


def test_partial_pairs_are_cropped_to_the_band():
    # Query chunk 1 against key chunk 0, 5 keys of look-back: only queries 0..4
    # see anything (keys 11+i..15), so the call keeps 5 query rows; in its frame
    # (Nq 5, Nk 16, aligned position i + 11) that is the window (0, 5).
    rules = Rules(chunk=16, window_left=5, window_right=0, scale=1.0, softcap=None, has_alibi=False)
    (call,) = plan_step((1,), (0,), rules)
    assert (call.q_rows, call.k_rows, call.window, call.delta) == (5, 16, (0, 5), 16)
    # Look-ahead of 5 into the next chunk: keys 0..4 only, for queries 11..15;
    # frame Nq 16, Nk 5, aligned position i - 11: the window (5, 0).
    rules = Rules(chunk=16, window_left=0, window_right=5, scale=1.0, softcap=None, has_alibi=False)
    (call,) = plan_step((0,), (1,), rules)
    assert (call.q_rows, call.k_rows, call.window) == (16, 5, (5, 0))
    # Fully visible pairs without ALiBi are merged into one call.
    rules = rules._replace(window_left=-1, window_right=-1)
    assert plan_step((0, 3), (1, 2), rules) == [plan_step((0, 3), (1, 2), rules)[0]]


def test_single_process_group_equals_flash_attention():
    group = mx.distributed.init()
    assert group.size() == 1
    gen = rng("ring-single")
    q, k, v = qkv(gen, 1, 4, 2, 34, 34, 16)
    for opts in ({"causal": True}, {"window": (5, 3), "softcap": 2.0}):
        want = mlx_flash.flash_attention(q, k, v, **opts)
        got = ring_flash_attention(q, k, v, group=group, **opts)
        assert rel_error(to_np(got), to_np(want)) < 2e-5
    assert rel_error(to_np(unshard(shard(q, group), group)), to_np(q)) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": mx.ones((34, 34), mx.bool_)}, "mask: not supported"),
    ({"block_mask": mx.ones((1, 1), mx.bool_)}, "block_mask: not supported"),
    ({"layout": "striped"}, "layout: expected"),
    ({"transport": "carrier-pigeon"}, "transport: expected"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    q = mx.ones((1, 2, 34, 8))
    with pytest.raises(ValueError, match=match):
        ring_flash_attention(q, q, q, **kwargs)


def test_group_must_be_a_group():
    q = mx.ones((1, 2, 34, 8))
    with pytest.raises(TypeError, match="group: expected an mx.distributed.Group"):
        ring_flash_attention(q, q, q, group=4)


def test_shard_lengths_that_do_not_split():
    q = mx.ones((1, 2, 17, 8))
    with pytest.raises(ValueError, match="N_local must be a positive multiple of 2"):
        ring_flash_attention(q, q, q, layout="zigzag")
    with pytest.raises(ValueError, match="k: ring attention shards one sequence"):
        ring_flash_attention(q, mx.ones((1, 2, 16, 8)), mx.ones((1, 2, 16, 8)), layout="contiguous")


def test_benchmark_records_and_table(capsys):
    from mlx_flash.bench import distributed as bench

    bench.worker([128], repeats=1)  # not launched: the one-process baseline
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]
    one = json.loads(line[len("RESULT "):])
    assert one["world"] == 1 and one["step_peak_extra_bytes"] > 0 and len(one["step"]["wall_s"]) == 1
    timing = {"wall_s": [0.2], "cpu_s": [0.1]}
    ranks = [dict(one, world=2, rank=r, N_local=64, forward_compute_only=timing, forward_transfers_only=timing,
                  forward_bytes=1 << 20, backward_bytes=3 << 20) for r in (0, 1)]
    rows = bench.summarise([one] + ranks)
    assert [(r["N"], r["world"]) for r in rows] == [(128, 1), (128, 2)]
    assert rows[1]["bytes_sent_per_rank_backward"] == 3 << 20
    assert rows[1]["step_cpu_s_all_ranks"] == 2 * one["step"]["cpu_s"][0]
    assert bench.table(rows).count("\n") == 3
