"""Does a decode call at a new KV-cache length stall a pipelined generation loop? (issue 14, host cost)

    python tools/cuda_new_length_probe.py OUT.json

At a key count it had not seen, the CUDA path ran its Python path (validation,
plans, mx.custom_function; 50-120 us) and, before session 27, made the call's
int parameter block by a GPU op evaluated at once (mx.eval), which waits for
everything already queued on the stream. mlx-lm builds step t + 1 while the GPU
runs step t (mx.async_eval), and every step's first layer meets a new length.
Since session 28 the C++ replay serves every key count of a recorded decode
call's range (backends/cuda_host.py, "key-count families").

Measured on MLX's CUDA backend, fp16, B 1, GQA 32:8, D 128:
  host_us:  building one flash_attention call (no eval) at a new length, at a
            repeated one, each with the GPU idle and with ~BUSY_MS of matmuls
            queued (async_eval) just before;
  step:     a generation-like loop of STEPS steps, LAYERS layers each
            (x W_q -> attention over a cache one key longer each step ->
            x W_o), built while the previous step runs (async_eval, then the
            previous step's eval, as mlx-lm's generate_step): ms a step for
            mx.fast and ours, each way of building a new length (_use_params:
            "family", main's; "device", main before session 28; "eval",
            before session 27).
host_us's calls at a new length are compared with mx.fast's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx

import mlx_flash
from mlx_flash.backends import cuda, cuda_host

HQ, HKV, D, LAYERS, STEPS, NK0 = 32, 8, 128, 32, 48, 8192
BUSY_MS = 30


def _busy(a, reps):
    y = a
    for _ in range(reps):
        y = (y @ a) * 1e-3
    mx.async_eval(y)
    return y


def _use_params(kind):
    """How a call at a new length gets built from here on: 'family' (this main: the C++ replay serves
    every key count of a recorded decode call's range, cuda.decode_key_range, writing its int block on
    the host), 'device' (no key-count families, as main before session 28: the Python path at each new
    length, its int block host-written by length_array), 'eval' (no families, the int block by
    const_array, evaluated on the GPU at each new length: main before session 27). The C++ records
    are dropped, so each variant starts from none."""
    cuda_host.KEY_COUNTS = kind == "family"
    cuda.length_array = cuda_const if kind == "eval" else cuda_length
    cuda._param_arrays.cache_clear()
    if cuda_host.HOST is not None:
        cuda_host.HOST.clear()


cuda_const = cuda.const_array
cuda_length = cuda.length_array


def host_times(kcache, vcache, big, reps):
    rows = {}
    q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
    mx.eval(q)
    n = NK0 + 3000
    for kind in ("family", "device"):
        _use_params(kind)
        for busy in (False, True):
            new, rep, diff = [], [], 0.0
            for _ in range(7):
                n += 1
                mx.eval(mlx_flash.flash_attention(q, kcache[:, :, :n - 1], vcache[:, :, :n - 1]))  # n - 1 seen
                y = _busy(big, reps) if busy else None
                t0 = time.perf_counter()
                out = mlx_flash.flash_attention(q, kcache[:, :, :n], vcache[:, :, :n])  # n: new
                t1 = time.perf_counter()
                out2 = mlx_flash.flash_attention(q, kcache[:, :, :n - 1], vcache[:, :, :n - 1])  # repeated
                t2 = time.perf_counter()
                new.append((t1 - t0) * 1e6)
                rep.append((t2 - t1) * 1e6)
                want = mx.fast.scaled_dot_product_attention(q, kcache[:, :, :n], vcache[:, :, :n], scale=D ** -0.5)
                diff = max(diff, mx.abs(out.astype(mx.float32) - want.astype(mx.float32)).max().item())
                mx.eval(out2)
                if y is not None:
                    mx.eval(y)
            rows[f"{kind}_{'busy' if busy else 'idle'}"] = dict(new_length_us=statistics.median(new),
                                                               repeated_us=statistics.median(rep),
                                                               max_abs_diff_vs_mx_fast=diff)
    _use_params("family")
    return rows


def step_loop(attend, kcaches, vcaches, wq, wo, x0, base):
    def build(x, n):
        for layer in range(LAYERS):
            q = (x @ wq).reshape(1, HQ, 1, D)
            o = attend(q, kcaches[layer][:, :, :n], vcaches[layer][:, :, :n])
            x = o.reshape(1, HQ * D) @ wo
        return x

    x = x0
    prev = None
    times = []
    for s in range(STEPS):
        t0 = time.perf_counter()
        x = build(x, base + s)  # lengths no earlier run met (the C++ replay would have them recorded)
        mx.async_eval(x)
        if prev is not None:
            mx.eval(prev)
        prev = x
        times.append(time.perf_counter() - t0)
    mx.eval(prev)
    return statistics.median(times[4:]) * 1e3, prev


def main(out_path):
    mx.random.seed(0)
    nk = NK0 + 4000
    kcaches = [mx.random.normal((1, HKV, nk, D)).astype(mx.float16) for _ in range(LAYERS)]
    vcaches = [mx.random.normal((1, HKV, nk, D)).astype(mx.float16) for _ in range(LAYERS)]
    wq = (mx.random.normal((HQ * D, HQ * D)) * 0.02).astype(mx.float16)
    wo = (mx.random.normal((HQ * D, HQ * D)) * 0.02).astype(mx.float16)
    x0 = mx.random.normal((1, HQ * D)).astype(mx.float16)
    big = mx.random.normal((8192, 8192)).astype(mx.float16) * 0.01
    mx.eval(kcaches, vcaches, wq, wo, x0, big)
    # matmuls for ~BUSY_MS: time one
    t0 = time.perf_counter()
    mx.eval(_busy(big, 4))
    per = (time.perf_counter() - t0) / 4
    reps = max(1, int(BUSY_MS / 1e3 / per))
    from mlx_flash.bench.cuda import card_name

    result = {"card": card_name(), "mlx": mx.__version__,
              "busy_reps": reps, "busy_matmul_ms": per * 1e3,
              "host": host_times(kcaches[0], vcaches[0], big, reps) if "--no-host" not in sys.argv else None}
    fast = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
    ours = lambda q, k, v: mlx_flash.flash_attention(q, k, v)
    steps = {}
    run = 0
    for rnd in range(2):
        for name in ("mx_fast", "ours_family", "ours_device", "ours_eval"):
            if name != "mx_fast":
                _use_params(name.split("_")[1])
            ms, _ = step_loop(fast if name == "mx_fast" else ours, kcaches, vcaches, wq, wo, x0,
                                NK0 + 100 * run)
            run += 1
            steps.setdefault(name, []).append(ms)
            print(name, rnd, round(ms, 3), flush=True)
    result["key_count_stats"] = cuda_host.stats()  # hit counts over every variant (only "family" adds to them)
    _use_params("family")
    result["step_ms"] = {k: min(v) for k, v in steps.items()}
    result["step_ms_all"] = steps
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])  # --no-host: the step loops only
