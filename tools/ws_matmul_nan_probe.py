"""Which cause gives the warp-specialised matmul's NaN of session 10?

Session 10's route suite (`pytest -n 6`, H200 shared with another process)
had 17 outputs of cuda_src/matmul_wgmma_ws.cuh (plans bn256_st4_pr0 and
bn128_st6_pr0 for 16-bit, bn128_st6_pr2 and bn192_st5_pr2 for native fp8)
holding the test's NaN poison in the bottom-right tile; the same cases passed
alone and in the CPU emulation. docs/matmul.md ("The ws NaN of session 10")
has the analysis. Every failing case had an odd persistent grid (1, 9 or 15
blocks; the last block owns the bottom-right tile), every passing case at
those shapes an even one, and the suite ran the opt-in cluster plans
(__cluster_dims__(2, 1, 1)) between the plain ones in one process. The
suspected cause is MLX's CUDA-graph reuse: one cached graph exec per graph
topology, cudaGraphExecUpdate()d to the next graph of the same shape; a
kernel node that keeps a cluster kernel's cluster shape when updated to a
plain kernel runs an odd grid in clusters of two and drops its last block
(ml-explore/mlx PR #2813: "thread block cluster dimensions are not correctly
updated by cudaGraphExecUpdate"; MLX guards captured subgraphs' cluster
attribute, not a raw mx.fast.cuda_kernel node whose kernel has compile-time
__cluster_dims__).
The cluster matmul is gone since session 11, so our kernels no longer mix.
GPU machine:

    python3 tools/ws_matmul_nan_probe.py OUT.json [--phases a,b,...]

The default phase, cluster_carry, takes about 10 s; the replay phases
(alone,load,nograph,keep_tmaps,gpu_default) about 100 s more (the first
compiles 24 kernels into a PTX cache the others share):

  cluster_carry  the mechanism alone: tiny plain kernels of 1, 3, 9 blocks
               before and after a tiny __cluster_dims__(2, 1, 1) kernel,
               each its own evaluation, with MLX's graphs on and then off
               (MLX_USE_CUDA_GRAPHS=0); reports the blocks that never ran.
               Missing blocks after the cluster kernel with graphs on and
               none with graphs off confirm the cause (MLX's, to report
               upstream; nothing of ours launches clusters now).

The other phases replay the failing workers' order of calls (the tests'
cases in collection order, a float32 output first, as
test_matmul_cuda_routes.py calls them; no cluster plans now) with outputs
poisoned by a finite sentinel (-7680, exact in fp16, bf16 and fp32):

  alone        one process, nothing else on the GPU (round B's setting);
  load         four replay processes at once and a fifth running large
               matmuls (round A's setting: -n 6 beside another process);
  nograph      as load, MLX_USE_CUDA_GRAPHS=0 in the replay processes;
  keep_tmaps   as load, every call's tensor-map workspace kept alive, so no
               workspace address (and no tensor map the TMA unit may have
               cached at it) is ever reused by a later call;
  gpu_default  (not by default) as load, the GPU the default device (the
               slice and reshape of the output on the GPU stream, no
               GPU-to-CPU fence inside the call's evaluation).

Each bad output is classified: `sentinel` elements were never written by
the kernel (or read before it finished), `nonfinite` ones were computed as
NaN/Inf, `far` ones are finite but off by more than 5% of max|ref|. For a
bad output the script synchronises, waits 50 ms and reads the same array
again (elements right on the re-read were read before they were written:
an ordering bug of the reader, not the kernel), and names the tiles and
the persistent blocks that own the bad elements. With the cause above the
replay phases are clean; bad outputs there (sentinel in a last block's
tile) would mean another cause: gone in keep_tmaps -> a stale tensor map
at a reused workspace address; gone in nograph -> another graph-update
fault; nonfinite without sentinel -> operands read wrong.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

SENTINEL = -7680.0
WS_16 = [(256, 4, 0, True, True), (128, 6, 0, True, True)]
WS_FP8 = [(128, 6, 2, True, True), (192, 5, 2, True, True)]
SHAPES_16 = [(1, 1, 1), (130, 200, 70), (300, 1000, 513), (2000, 136, 2100)]
SHAPES_FP8 = [(1, 1, 1), (129, 1, 513), (300, 1000, 258), (257, 4096, 384), (2000, 256, 2100)]


def cases():
    """The tests' cases in pytest's collection order (the last parametrize
    varies slowest: transpose_b, then shape, then dtype, then plan)."""
    out = []
    for transpose_b in (True, False):
        for M, K, N in SHAPES_16:
            for ka in ("float16", "bfloat16"):
                for plan in WS_16:
                    out.append(("16", plan, ka, ka, M, K, N, transpose_b))
    for M, K, N in SHAPES_FP8:
        for ka, kb in (("e4m3", "e4m3"), ("e5m2", "e4m3")):
            for plan in WS_FP8:
                out.append(("fp8", plan, ka, kb, M, K, N, True))
    return out


def owners(bad_rows, bad_cols, M, Np, bn, blocks):
    """(tile row, tile column, unit, block) of each bad tile (tile_origin of
    matmul_wgmma_ws.cuh, clusters of one)."""
    units_m, tiles_n = math.ceil(M / 128), math.ceil(Np / bn)
    where = {}
    for unit in range(units_m * tiles_n):
        group, in_group = unit // (8 * tiles_n), unit % (8 * tiles_n)
        first_m = group * 8
        rows = min(units_m - first_m, 8)
        where[(first_m + in_group % rows, in_group // rows)] = unit
    tiles = sorted({(r // 128, c // bn) for r, c in zip(bad_rows.tolist(), bad_cols.tolist())})
    return [(tm, tn, where[(tm, tn)], where[(tm, tn)] % blocks) for tm, tn in tiles]


def replay(mode: str, repeats: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_flash import fp8
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    emulate = os.environ.get("WS_NAN_PROBE_EMULATE") == "1"  # offline check of this script (CPU emulation)
    if mode != "gpu_default" or emulate:
        mx.set_default_device(mx.cpu)  # as the tests' cpu_default_device fixture
    cuda_matmul.POISON = SENTINEL
    kept = []
    if mode == "keep_tmaps":
        make = cuda_matmul._kernel_object

        def keeping(*args, **kwargs):
            kernel = make(*args, **kwargs)

            def call(**kw):
                outs = kernel(**kw)
                kept.append(outs[-1])  # the tmaps workspace: never freed, never reused
                return outs
            return call
        cuda_matmul._kernel_object = keeping
    gpu = mx.cpu if emulate else mx.Device(mx.gpu)
    if emulate:
        import contextlib

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from cuda_emu import harness
        ctx = contextlib.ExitStack()
        ctx.enter_context(harness.patched_hopper())
    gen = np.random.default_rng(int(time.time() * 1e6) % 2**32)
    report = {"mode": mode, "calls": 0, "bad": []}

    def operand(shape, kind):
        x = gen.standard_normal(shape).astype(np.float32)
        if kind in ("e4m3", "e5m2"):
            codes = fp8.encode(mx.array(x), kind)
            return codes, kind, fp8.decode_table(kind)[np.array(codes)].astype(np.float64)
        arr = mx.array(x).astype(getattr(mx, kind))
        return arr, None, np.array(arr.astype(mx.float32)).astype(np.float64)

    for rep in range(repeats):
        for family, plan, ka, kb, M, K, N, transpose_b in cases():
            if emulate and M * K * N > 200_000:
                continue
            a, a_fmt, a64 = operand((M, K), ka)
            b, b_fmt, b64 = operand((N, K) if transpose_b else (K, N), kb)
            sa = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
            sb = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
            ref = (a64 * sa) @ (b64.T if transpose_b else b64) * sb
            route = "wgmma" if family == "16" else "wgmma_fp8"
            for out_dtype in (mx.float32, None if family == "16" else mx.float16):
                spec, a3, b3, sa3, sb3, _ = validate_matmul(
                    a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(sa), b_scale=mx.array(sb),
                    transpose_b=transpose_b, out_dtype=out_dtype)
                out = cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, gpu, route=route, plan=plan)
                mx.eval(out)
                out = out.reshape(M, N)
                got = np.array(out.astype(mx.float32)).astype(np.float64)
                report["calls"] += 1
                scale = max(np.abs(ref).max(), 1e-30)
                wrong = (got == SENTINEL) | ~np.isfinite(got) | (np.abs(got - ref) > 0.05 * scale)
                if not wrong.any():
                    continue
                mx.synchronize()
                time.sleep(0.05)
                again = np.array(out.astype(mx.float32)).astype(np.float64)
                rows, cols = np.nonzero(wrong)
                Np = -(-N // 16) * 16
                blocks = min(math.ceil(M / 128) * math.ceil(Np / plan[0]), cuda_matmul.sm_count())
                report["bad"].append({
                    "rep": rep, "family": family, "plan": list(plan), "ka": ka, "kb": kb, "M": M, "K": K, "N": N,
                    "transpose_b": transpose_b, "out_dtype": str(spec.out_dtype),
                    "sentinel": int((got == SENTINEL).sum()), "nonfinite": int((~np.isfinite(got)).sum()),
                    "far": int(wrong.sum() - (got == SENTINEL).sum() - (~np.isfinite(got)).sum()),
                    "rows": [int(rows.min()), int(rows.max())], "cols": [int(cols.min()), int(cols.max())],
                    "tiles_unit_block": owners(rows, cols, M, Np, plan[0], blocks), "blocks": blocks,
                    "reread_still_bad": int(((again == SENTINEL) | ~np.isfinite(again)
                                             | (np.abs(again - ref) > 0.05 * scale)).sum()),
                    "reread_sentinel": int((again == SENTINEL).sum())})
    return report


# A kernel that records which blocks ran; the same body with __cluster_dims__
# (2, 1, 1) given by a header, as the removed cluster matmul did (mx.fast.
# cuda_kernel launches take no cluster attribute).
_BLOCKS_BODY = "if (threadIdx.x == 0) out[blockIdx.x] = (float)blockIdx.x + x[0];"
_CLUSTER_HEADER = ("#ifdef __CUDA_ARCH__\n#undef __global__\n"
                   "#define __global__ __location__(global) __cluster_dims__(2, 1, 1)\n#endif\n")


def cluster_carry() -> dict:
    """The suspected cause: MLX keeps one CUDA-graph exec per graph topology
    and cudaGraphExecUpdate()s it with the next graph of the same shape; if a
    kernel node built for a __cluster_dims__ kernel keeps its cluster shape
    when updated to a plain kernel, a plain launch of an odd grid runs in
    clusters of two and its last block (all of it, at one block) never runs.
    Every failing case of session 10 had an odd persistent grid (1, 9 or 15
    blocks: its last block owns the bottom-right tile), every passing one at
    those shapes an even grid, and the route tests ran the cluster plans
    between the plain ones. Here: plain kernels of 1, 3 and 9 blocks before
    and after a cluster kernel of 2, each in its own evaluation (the same
    graph topology: the poison fill and the kernel)."""
    import mlx.core as mx
    import numpy as np

    mx.set_default_device(mx.gpu)
    x = mx.zeros((1,), mx.float32)
    mx.eval(x)
    plain = mx.fast.cuda_kernel(name="ws_nan_probe_plain", input_names=["x"], output_names=["out"],
                                source=_BLOCKS_BODY)
    clustered = mx.fast.cuda_kernel(name="ws_nan_probe_cluster2", input_names=["x"], output_names=["out"],
                                    source=_BLOCKS_BODY, header=_CLUSTER_HEADER)

    def launch(kernel, blocks):
        (out,) = kernel(inputs=[x], grid=(32 * blocks, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(blocks,)],
                        output_dtypes=[mx.float32], init_value=SENTINEL)
        mx.eval(out)
        got = np.array(out)
        return [int(i) for i in np.nonzero(got != np.arange(blocks))[0]]  # blocks that did not run

    steps = []
    for kernel, name, blocks in ((plain, "plain", 1), (plain, "plain", 3), (plain, "plain", 9),
                                 (clustered, "cluster2", 2), (plain, "plain", 1), (plain, "plain", 3),
                                 (plain, "plain", 9), (plain, "plain", 2), (clustered, "cluster2", 4),
                                 (plain, "plain", 9)):
        try:
            steps.append({"kernel": name, "blocks": blocks, "missing": launch(kernel, blocks)})
        except Exception as e:  # a launch error is an answer too
            steps.append({"kernel": name, "blocks": blocks, "error": repr(e)[:300]})
            break
    return {"mode": "cluster_carry", "steps": steps,
            "plain_after_cluster_missing_blocks": sum(len(s.get("missing", [])) for s in steps[4:] if s["kernel"] == "plain")}


def hog(seconds: float):
    """Large matmuls back to back on the GPU (round A's neighbour process)."""
    import mlx.core as mx

    a = mx.random.normal((8192, 8192)).astype(mx.float16)
    end = time.time() + seconds
    while time.time() < end:
        mx.eval(a @ a)


def main(argv):
    if len(argv) >= 2 and argv[0] == "--child":
        if argv[1] == "hog":
            hog(float(argv[2]))
            return
        if argv[1] == "cluster_carry":
            print(json.dumps(cluster_carry()))
            return
        print(json.dumps(replay(argv[1], int(argv[2]))))
        return
    phases = "cluster_carry"
    if "--phases" in argv:
        i = argv.index("--phases")
        phases = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    out_path = argv[0] if argv else "ws_nan_probe.json"
    env = dict(os.environ)
    env.setdefault("MLX_PTX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ws_nan_probe_ptx"))
    me = [sys.executable, os.path.abspath(__file__), "--child"]

    def run_phase(mode, procs, repeats, load, extra_env=None):
        start = time.time()
        penv = dict(env, **(extra_env or {}))
        hogp = subprocess.Popen(me + ["hog", "25"], env=env) if load else None
        kids = [subprocess.Popen(me + [mode, str(repeats)], env=penv, stdout=subprocess.PIPE, text=True)
                for _ in range(procs)]
        reports = []
        for k in kids:
            stdout, _ = k.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            reports.append(json.loads(lines[-1]) if lines and k.returncode == 0 else {"rc": k.returncode})
        if hogp:
            hogp.kill()
            hogp.wait()
        bad = [b for r in reports for b in r.get("bad", [])]
        calls = sum(r.get("calls", 0) for r in reports)
        summary = {"mode": mode, "processes": procs, "repeats": repeats, "load": load, "calls": calls,
                   "bad_calls": len(bad), "seconds": round(time.time() - start, 1), "bad": bad,
                   "failed_processes": [r for r in reports if "rc" in r]}
        print(f"{mode:12s} calls {calls:5d} bad {len(bad):3d} ({summary['seconds']} s)"
              + "".join(f"\n    {b['plan']} {b['ka']}/{b['kb']} {b['M']}x{b['K']}x{b['N']} T{int(b['transpose_b'])} "
                        f"{b['out_dtype']}: sentinel {b['sentinel']} nonfinite {b['nonfinite']} far {b['far']} "
                        f"rows {b['rows']} cols {b['cols']} tiles {b['tiles_unit_block']} "
                        f"re-read bad {b['reread_still_bad']} (sentinel {b['reread_sentinel']})" for b in bad[:8]),
              flush=True)
        return summary

    def run_carry(extra_env):
        penv = dict(env, **extra_env)
        done = subprocess.run(me + ["cluster_carry"], env=penv, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else {"rc": done.returncode, "stderr": done.stderr[-2000:]}
        report["env"] = extra_env
        print(f"cluster_carry {extra_env or 'graphs on'}: "
              + "; ".join(f"{s['kernel']} x{s['blocks']}: " + (f"missing {s['missing']}" if "missing" in s
                                                                else s.get("error", "?"))
                          for s in report.get("steps", [])) + (f" {report}" if "steps" not in report else ""),
              flush=True)
        return report

    result = {"phases": []}
    for mode in phases.split(","):
        if mode == "cluster_carry":
            result["phases"].append(run_carry({}))
            result["phases"].append(run_carry({"MLX_USE_CUDA_GRAPHS": "0"}))
        elif mode == "alone":
            result["phases"].append(run_phase("alone", 1, 1, False))  # also fills the PTX cache
        else:
            extra = {"MLX_USE_CUDA_GRAPHS": "0"} if mode == "nograph" else None
            result["phases"].append(run_phase(mode, 4, 1, True, extra))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
