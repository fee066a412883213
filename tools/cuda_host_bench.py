"""Decode host cost with and without the C++ replay (mlx_flash._cuda_host), on the GPU machine.

    python tools/cuda_host_bench.py OUT.json

The decode step of issues 14/16 (B 1, 1 query, Nk 32768, D 128, GQA 32:8 and
32:4; fp16, bf16, and the quantized op at 4 and 8 bits, group 64), per call:
  build    graph construction only (20 calls, nothing evaluated),
  batched  20 calls queued per eval (a call costs max(host, GPU)),
  eval     the eval of the 20 prebuilt calls alone,
  step     32 calls on 32 distinct caches (a 32-layer model's step), graph
           building and eval in series, per call,
for mx.fast SDPA (the anchor, fp16/bf16 caches), flash_attention and
flash_attention_quantized with the replay ("replay") and with the extension
switched off ("python": the Python path, same kernels); "replay_kernel" is the
replay through mx::fast::cuda_kernel per call (MLX_FLASH_CUDA_HOST_KERNEL=1)
instead of sharing the recorded kernel node's primitive. Every replayed result
is checked bit for bit against the Python path's, and the JSON names the card.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import mlx.core as mx

import mlx_flash
from mlx_flash import attention, attention_quantized
from mlx_flash.backends import cuda_host

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_decode_profile import per_call  # noqa: E402  (20 calls queued per eval: build, batched, eval)

HOST = cuda_host.HOST
N_K, D, LAYERS = 32768, 128, 32
MODES = ("python", "replay", "replay_kernel")


def step(fns, rounds=10):
    """32 calls over 32 caches per eval, build + eval in series, per call."""
    mx.eval([f() for f in fns])
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval([f() for f in fns])
        times.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(times) * 1e6


def set_replay(mode):
    """"python" (extension off), "replay" (kernel nodes share the recorded
    primitive) or "replay_kernel" (mx::fast::cuda_kernel per replayed call)."""
    HOST.set_enabled(mode != "python")
    HOST.set_reuse_primitives(mode != "replay_kernel")
    HOST.clear()


def build_only(fn, calls=2000, rounds=5):
    """Graph building alone, best of `rounds` means (microseconds per call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        outs = []
        t0 = time.perf_counter()
        for _ in range(calls):
            outs.append(fn())
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        del outs
    return best


def breakdown(res):
    """Where a replayed call's host time goes (fp16 decode 32:8, 4K keys):
    the public call, the extension's entry alone, its key alone, and MLX's
    own floors (a trivial mx.fast.cuda_kernel call, mx.custom_function)."""
    q = mx.random.normal((1, 32, 1, D)).astype(mx.float16)
    k, v = (mx.random.normal((1, 8, 4096, D)).astype(mx.float16) for _ in range(2))
    mx.eval(q, k, v)
    set_replay("replay")
    args = (q, k, v, 0.088, None, False, None, None, None, None, None, None, None, None, False, None)
    row = {"flash_attention (replayed)": build_only(lambda: mlx_flash.flash_attention(q, k, v, scale=0.088)),
           "extension entry alone (replayed)": build_only(lambda: HOST.attention(*args))}
    neg = (q, k, v, 0.5, None, False, None, None, None, None, None, None, None, None, False, None)
    HOST.record(HOST.attention(*neg), [q, k, v] + [None] * 6, (q, k), [], None)  # refused: key cost alone
    row["key + lookup alone"] = build_only(lambda: HOST.attention(*neg))
    set_replay("replay_kernel")
    row["flash_attention (replayed through cuda_kernel)"] = build_only(
        lambda: mlx_flash.flash_attention(q, k, v, scale=0.088))
    set_replay("python")
    row["flash_attention (python path)"] = build_only(lambda: mlx_flash.flash_attention(q, k, v, scale=0.088),
                                                      calls=500)
    trivial = mx.fast.cuda_kernel(name="hostc_trivial", input_names=["x"], output_names=["y"], source="y[0] = x[0];")
    x = mx.zeros((1,), mx.float32)
    row["mx.fast.cuda_kernel trivial call"] = build_only(lambda: trivial(
        inputs=[x], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32]))

    @mx.custom_function
    def fn(a, b, c):
        return x, x

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        return primals

    row["mx.custom_function, 3 inputs"] = build_only(lambda: fn(q, k, v), calls=500)
    row["mx.fast SDPA"] = build_only(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088))
    res["breakdown_us"] = row
    print("breakdown", json.dumps(row), flush=True)


def main():
    out_path = sys.argv[1]
    info = mx.device_info(mx.gpu)
    res = {"device": info.get("device_name", str(info)), "host_extension": HOST is not None,
           "cases": {}, "identical": {}}
    print("device", res["device"], "extension", HOST is not None, flush=True)
    # The entry points use the extension only where cuda_host found a CUDA GPU at import.
    assert attention._HOST is HOST and attention_quantized._HOST is HOST, "replay not active"
    breakdown(res)
    dump(res, out_path)
    gen = mx.random.key(0)
    for hkv in (8, 4):
        keys = mx.random.split(gen, 3 * LAYERS + 1)
        q = mx.random.normal((1, 32, 1, D), key=keys[0]).astype(mx.float16)
        caches = [(mx.random.normal((1, hkv, N_K, D), key=keys[1 + 2 * i]).astype(mx.float16),
                   mx.random.normal((1, hkv, N_K, D), key=keys[2 + 2 * i]).astype(mx.float16))
                  for i in range(LAYERS)]
        mx.eval(q, caches)
        s = D ** -0.5
        for dtype in (mx.float16, mx.bfloat16):
            name = f"32:{hkv} {'fp16' if dtype == mx.float16 else 'bf16'}"
            qd = q.astype(dtype)
            cd = [(k.astype(dtype), v.astype(dtype)) for k, v in caches] if dtype != mx.float16 else caches
            mx.eval(qd, cd)
            k0, v0 = cd[0]
            row = {}
            row["mx.fast"] = per_call(lambda: mx.fast.scaled_dot_product_attention(qd, k0, v0, scale=s))
            row["mx.fast"]["step_us"] = step([lambda k=k, v=v: mx.fast.scaled_dot_product_attention(
                qd, k, v, scale=s) for k, v in cd])
            for mode in MODES:
                set_replay(mode)
                row[mode] = per_call(lambda: mlx_flash.flash_attention(qd, k0, v0, scale=s))
                row[mode]["step_us"] = step([lambda k=k, v=v: mlx_flash.flash_attention(qd, k, v, scale=s)
                                             for k, v in cd])
                row[mode]["stats"] = cuda_host.stats()
            finish_case(res, name, row, lambda: mlx_flash.flash_attention(qd, k0, v0, scale=s, return_lse=True),
                        out_path)
        if hkv != 8:
            continue
        for bits in (4, 8):
            name = f"32:{hkv} {bits}-bit"
            quant = [(tuple(mx.quantize(k, group_size=64, bits=bits)), tuple(mx.quantize(v, group_size=64, bits=bits)))
                     for k, v in caches]
            mx.eval(quant)
            kq, vq = quant[0]
            row = {}
            for mode in MODES:
                set_replay(mode)
                row[mode] = per_call(lambda: mlx_flash.flash_attention_quantized(
                    q, kq, vq, bits=bits, group_size=64, scale=s))
                row[mode]["step_us"] = step([lambda k=k, v=v: mlx_flash.flash_attention_quantized(
                    q, k, v, bits=bits, group_size=64, scale=s) for k, v in quant])
                row[mode]["stats"] = cuda_host.stats()
            finish_case(res, name, row, lambda: mlx_flash.flash_attention_quantized(  # noqa: B023
                q, kq, vq, bits=bits, group_size=64, scale=s, return_lse=True), out_path)
            del quant
        del caches
    dump(res, out_path)


def finish_case(res, name, row, call, out_path):
    """Whether replayed calls equal the Python path's bit for bit (`call` returns (out, lse)),
    then the case's row stored, printed and written."""
    set_replay("python")
    want = call()
    set_replay("replay")
    got = [call() for _ in range(2)]
    mx.eval(want, got)
    res["identical"][name] = all(bool(mx.array_equal(w, g[i], equal_nan=True)) for g in got for i, w in enumerate(want))
    res["cases"][name] = row
    print(name, json.dumps(row), "identical", res["identical"][name], flush=True)
    dump(res, out_path)


def dump(res, path):
    """Written after every case: a run cut short keeps what it measured."""
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
