"""Host (graph-building) cost of one CUDA-path call, split into stages, in microseconds.

    python tools/host_cost.py [--stub] [--json OUT.json] [--profile CASE]
    python tools/host_cost.py --compare BEFORE_DIR ROUNDS OUT.json [--stub ...]

On a machine without a CUDA GPU (or with --stub) the kernel objects are
stubbed (backends.cuda._kernel, backends.cuda_quant._kernel/_strided_kernel
return a callable that gives mx.zeros of the output shapes) and dispatch
answers "cuda" (on an H200's routes: Hopper, TMA with fixed tensor-map bytes,
132 SMs; FP8Linear's direct path sees the CPU device as its GPU), so the
exact CUDA-path Python runs on the CPU: only MLX's
own launch work (source assembly and hashing inside mx.fast.cuda_kernel,
about 2 us a launch on the H200) is missing; the stub hands out outputs made
once, so its own cost (printed) is next to nothing. On the GPU machine without --stub the real kernels are used.
Nothing is evaluated in the timed loops (graph building only).

Stages (each timed alone over the same prepared arguments):
  validate   _spec.validate_attention / _quant_spec.validate_attention_quantized
  dispatch   backend_name, extras packing, the cached custom_function lookup
  backend    the CUDA wrapper (attention_forward / quantized_attention_forward)
             called directly with the validated spec and inputs
  full       the public call; "rest" = full - the three stages above, i.e.
             mx.custom_function's own per-call cost and the glue between
Where the C++ replay serves calls (mlx_flash._cuda_host on a CUDA GPU,
backends/cuda_host.py), each case also says which path its full call took
("replay" or "python") and times the full call with the replay switched off.
The "growing" cases time only the full call, over k/v views one key longer
every 32 calls (generation with a 32-layer model: one new shape per step) or
at every call. The mx.fast cases time MLX's own SDPA entry point on the same
arrays (the anchor), the other cases the prefill and backward paths; the
header sizes each kernel hands MLX are printed first. (This tool replaces
tools/cuda_host_overhead.py.)

--compare BEFORE_DIR ROUNDS OUT.json runs this tool ROUNDS times on the
package in BEFORE_DIR and on this tree's, interleaved, each in its own
process, and keeps per case the minimum (benchmarks/results/host_cost_cpu_stub_s9.json).
--replay (with --stub) switches the C++ replay on over the stubs, prefill
forwards included: the replayed node calls the stub back, an upper bound.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import sys
import time

import mlx.core as mx

import mlx_flash
from mlx_flash import attention, attention_quantized, dispatch
from mlx_flash._quant_spec import validate_attention_quantized
from mlx_flash._spec import validate_attention
from mlx_flash.backends import cuda as cb
from mlx_flash.backends import cuda_host
from mlx_flash.backends import cuda_quant as cq

# name: (op, B, Hq, Hkv, Nq, Nk, D, bits, causal); fp16, scale given, group size 64.
CASES = {
    "decode fp16 (1,32:8,1,32768,128)": ("plain", 1, 32, 8, 1, 32768, 128, None, False),
    "decode 4-bit (1,32:8,1,32768,128)": ("quant", 1, 32, 8, 1, 32768, 128, 4, False),
    "decode 8-bit (1,32:8,1,32768,128)": ("quant", 1, 32, 8, 1, 32768, 128, 8, False),
    # Generation: the cache one key longer every 32 calls (a 32-layer model), k and v
    # views of a longer buffer: the first layer of a step meets a new shape.
    "decode fp16 growing, 32 layers": ("plain-grow", 1, 32, 8, 1, 32768, 128, None, False),
    "decode 4-bit growing, 32 layers": ("quant-grow", 1, 32, 8, 1, 32768, 128, 4, False),
    # The anchor: MLX's own C++ entry point for the same decode call.
    "mx.fast decode fp16 (1,32:8,1,32768,128)": ("mx.fast", 1, 32, 8, 1, 32768, 128, None, False),
    "mx.fast decode fp16 growing, 32 layers": ("mx.fast-grow", 1, 32, 8, 1, 32768, 128, None, False),
    "decode fp16 growing every call": ("plain-grow1", 1, 32, 8, 1, 32768, 128, None, False),
    "tiny fp16 (1,1,64,64)": ("plain", 1, 1, 1, 64, 64, 64, None, False),
    "forward fp16 (4,16,1024,64)": ("plain", 4, 16, 16, 1024, 1024, 64, None, False),
    "forward+backward fp16 (4,16,1024,64)": ("grad", 4, 16, 16, 1024, 1024, 64, None, False),
    "prefill fp16 causal (1,32:8,2048,2048,128)": ("plain", 1, 32, 8, 2048, 2048, 128, None, True),
    "prefill 4-bit causal (1,32:8,2048,8192,128)": ("quant", 1, 32, 8, 2048, 8192, 128, 4, True),
    # The warp-specialised forward (cuda_fwd_ws.py): D 64 at 1K keys is routed
    # there only with MLX_FLASH_CUDA_FWD_WS=all (the case sets it for its run);
    # D 128 is its default route. fwd+bwd: the graph of mx.vjp (building only).
    "forward fp16 ws (4,16,1024,64)": ("plain-ws", 4, 16, 16, 1024, 1024, 64, None, False),
    "forward+backward fp16 ws (4,16,1024,64)": ("vjp-ws", 4, 16, 16, 1024, 1024, 64, None, False),
    "forward fp16 (1,16,8192,128)": ("plain", 1, 16, 16, 8192, 8192, 128, None, False),
    # FP8Linear's direct few-rows path (compiled, the default) next to
    # nn.Linear on the same fp16 input: (op, M, K, N) in the B / Nq / D slots.
    "FP8Linear M=1 (4096x4096)": ("fp8linear", 1, 0, 0, 1, 0, 4096, None, False),
    "nn.Linear M=1 (4096x4096)": ("linear", 1, 0, 0, 1, 0, 4096, None, False),
    "FP8Linear M=16 (4096x4096)": ("fp8linear", 1, 0, 0, 16, 0, 4096, None, False),
    "nn.Linear M=16 (4096x4096)": ("linear", 1, 0, 0, 16, 0, 4096, None, False),
}
GROUP_SIZE = 64


class _StubKernel:
    """Stands in for an mx.fast.cuda_kernel object: zeros of the output shapes,
    made once per (shapes, dtypes) and handed out again (nothing is evaluated),
    so the stub costs next to nothing and the numbers are mlx_flash's Python
    and MLX's graph ops; a real launch adds MLX's own launch work."""

    calls = 0

    def __init__(self):
        self.outputs = {}

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        _StubKernel.calls += 1
        key = (tuple(map(tuple, output_shapes)), tuple(output_dtypes))
        outs = self.outputs.get(key)
        if outs is None:
            outs = self.outputs[key] = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return list(outs)


def install_stubs():
    """Stub kernels and a dispatcher that answers 'cuda' after doing its real per-call work."""
    stub = _StubKernel()
    cb._kernel = lambda *a, **kw: stub
    cq._kernel = lambda *a, **kw: stub
    cq._strided_kernel = lambda *a, **kw: stub
    for cached in (cb._wgmma_fwd_config, cb._mma_fwd_config, cb._simt_fwd_config, cb._wgmma_bwd_config,
                   cb._mma_bwd_config, cb._simt_bwd_config, cb._decode_launch_cached):
        cached.cache_clear()
    # The H200's routes: Hopper (wgmma, the warp-specialised forward), TMA
    # (tensor maps made once per shape through libcuda, here fixed bytes) and
    # 132 SMs (persistent grids).
    from mlx_flash.backends import cuda_fwd_ws, cuda_matmul

    cb._is_hopper = lambda: True
    cuda_matmul._tma_available = lambda: True
    cuda_fwd_ws.sm_count = lambda: 132
    cuda_matmul.sm_count = lambda: 132
    cuda_fwd_ws.tensor_map_3d = functools.lru_cache(maxsize=1024)(lambda *a: bytes(128))
    for cached in ("_templates", "_launch"):
        if hasattr(getattr(cuda_fwd_ws, cached, None), "cache_clear"):
            getattr(cuda_fwd_ws, cached).cache_clear()
    # FP8Linear's direct path asks for a CUDA GPU as the default device: the
    # CPU device stands in (nn.py's own `mx` name, a copy of the module's
    # attributes with gpu = cpu: lookups cost as before).
    import types

    import mlx_flash.nn as fnn
    fnn.mx = types.SimpleNamespace(**{n: getattr(mx, n) for n in dir(mx) if not n.startswith("__")})
    fnn.mx.gpu = mx.cpu
    fnn.cuda_available = lambda: True
    real_device_of = dispatch.device_of

    def backend_name(stream):
        real_device_of(stream)  # the real per-call work: find the device ...
        mx.metal.is_available()  # ... and ask which GPU backend exists
        return "cuda"

    dispatch.backend_name = backend_name
    return stub


def growing_case(op, q, k, v, bits, s, calls, per_length=32):
    """Only the full call: views one key longer every `per_length` calls."""
    if op.endswith("grow1"):
        per_length = 1
    nk = k.shape[2] - calls // per_length - 1
    if op == "quant-grow":
        k = tuple(mx.quantize(k, group_size=GROUP_SIZE, bits=bits))
        v = tuple(mx.quantize(v, group_size=GROUP_SIZE, bits=bits))
        mx.eval(k, v)
        views = [(tuple(a[:, :, :n] for a in k), tuple(a[:, :, :n] for a in v))
                 for n in (nk + i // per_length for i in range(calls))]
        it = iter(views)

        def step():
            kn, vn = next(it)
            return mlx_flash.flash_attention_quantized(q, kn, vn, bits=bits, group_size=GROUP_SIZE, scale=s)
        return {"full": step}
    mx.eval(k, v)
    views = [(k[:, :, :n], v[:, :, :n]) for n in (nk + i // per_length for i in range(calls))]
    it = iter(views)

    def step():
        kn, vn = next(it)
        if op.startswith("mx.fast"):
            return mx.fast.scaled_dot_product_attention(q, kn, vn, scale=s)
        return mlx_flash.flash_attention(q, kn, vn, scale=s)
    return {"full": step}


def linear_case(op, M, K):
    """FP8Linear (direct few-rows path) or nn.Linear, K x K, fp16 input of M rows."""
    import mlx.nn as nn

    from mlx_flash.nn import FP8Linear

    x = mx.random.normal((1, M, K), key=mx.random.key(3)).astype(mx.float16)
    layer = nn.Linear(K, K, bias=False)
    layer.set_dtype(mx.float16)
    if op == "fp8linear":
        layer = FP8Linear.from_linear(layer)
    mx.eval(x, layer.parameters())
    return {"full": lambda: layer(x)}


def ws_all(on: bool):
    """Route D 64 at 1K keys to the warp-specialised forward (MLX_FLASH_CUDA_FWD_WS=all) or not."""
    from mlx_flash.backends import cuda_fwd_ws

    cuda_fwd_ws.CHECKED_ONLY = not on


def make_case(name, calls):
    op, B, Hq, Hkv, Nq, Nk, D, bits, causal = CASES[name]
    if op in ("fp8linear", "linear"):
        return linear_case(op, Nq, D)
    ws_all(op.endswith("-ws"))
    op = op.removesuffix("-ws")
    keys = mx.random.split(mx.random.key(7), 3)
    q = mx.random.normal((B, Hq, Nq, D), key=keys[0]).astype(mx.float16)
    k = mx.random.normal((B, Hkv, Nk, D), key=keys[1]).astype(mx.float16)
    v = mx.random.normal((B, Hkv, Nk, D), key=keys[2]).astype(mx.float16)
    s = D ** -0.5
    if "grow" in op:
        mx.eval(q)
        return growing_case(op, q, k, v, bits, s, calls)
    if op == "mx.fast":
        mx.eval(q, k, v)
        return {"full": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s)}
    if op == "vjp":
        mx.eval(q, k, v)
        cot = mx.zeros((B, Hq, Nq, D), mx.float16)
        mx.eval(cot)
        def vjp():
            return mx.vjp(lambda q, k, v: mlx_flash.flash_attention(q, k, v, scale=s), [q, k, v], [cot])
        return {"full": vjp}
    if op == "grad":
        mx.eval(q, k, v)
        grad = mx.grad(lambda q, k, v: mlx_flash.flash_attention(q, k, v, scale=s).sum(), argnums=(0, 1, 2))
        return {"full": lambda: grad(q, k, v)}
    if op == "plain":
        mx.eval(q, k, v)
        spec, inputs = validate_attention(q, k, v, scale=s, causal=causal)
        stages = {
            "validate": lambda: validate_attention(q, k, v, scale=s, causal=causal),
            "dispatch": lambda: attention._differentiable(spec, attention._pack_extras(inputs)[0],
                                                          dispatch.backend_name(None), None),
            "backend": lambda: cb.attention_forward(q, k, v, spec, inputs, None),
            "full": lambda: mlx_flash.flash_attention(q, k, v, scale=s, causal=causal),
        }
        return stages
    kq = tuple(mx.quantize(k, group_size=GROUP_SIZE, bits=bits))
    vq = tuple(mx.quantize(v, group_size=GROUP_SIZE, bits=bits))
    mx.eval(q, kq, vq)
    qspec, inputs, kt, vt = validate_attention_quantized(q, kq, vq, bits=bits, group_size=GROUP_SIZE, scale=s,
                                                         causal=causal)
    return {
        "validate": lambda: validate_attention_quantized(q, kq, vq, bits=bits, group_size=GROUP_SIZE, scale=s,
                                                         causal=causal),
        "dispatch": lambda: attention_quantized._differentiable(qspec, (), dispatch.backend_name(None), None),
        "backend": lambda: cq.quantized_attention_forward(q, kt, vt, qspec, inputs, None),
        "full": lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=GROUP_SIZE,
                                                            scale=s, causal=causal),
    }


def custom_function_floor(iters: int, repeats: int) -> dict:
    """What mx.custom_function itself costs per call (flattening, a stop_gradient
    per output, the CustomTransforms node), for 3 inputs (flash_attention) and
    7 (flash_attention_quantized): the part of "rest" no Python change removes."""
    x = mx.zeros((1, 32, 1, 128), mx.float16)
    outs = (mx.zeros((1, 32, 1, 128), mx.float16), mx.zeros((1, 32, 1), mx.float32))

    @mx.custom_function
    def fn(*args):
        return outs

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        return primals

    return {n: build_us(lambda n=n: fn(*[x] * n), iters, repeats) for n in (3, 7)}


def header_sizes() -> dict:
    """Bytes of the header text each kernel hands MLX (minified .cuh files; MLX
    gets a one-line #include of it where NVRTC can read files)."""
    return {body: len(cb._header(cb.kernel_headers(body)))
            for body in ("attention_fwd_decode", "attention_fwd_mma2", "attention_fwd_wgmma", "attention_fwd_simt",
                         "attention_combine", "attention_bwd_mma", "attention_quant_fwd")}


def build_us(fn, iters: int, repeats: int) -> float:
    """Best of `repeats` means over `iters` graph builds (microseconds per call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        outs = []
        t0 = time.perf_counter()
        for _ in range(iters):
            outs.append(fn())
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
        del outs
    return best


def compare(before: str, rounds: int, out: str, argv: list) -> None:
    """Before/after, interleaved: `rounds` times this tool on the package in
    `before` (a directory holding an mlx_flash/) and then on this tree's, each
    in its own process; per case and stage the minimum over the rounds (each
    already a best-of-N mean) is kept, written to `out` with the machine named."""
    import os
    import platform
    import subprocess
    import tempfile

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for side, root in (("before", before), ("after", here)):
                path = os.path.join(tmp, f"{side}{r}.json")
                # The caller's PYTHONPATH stays behind root (a sitecustomize there may point an editable
                # install's import hook at root: otherwise both sides could import the installed tree).
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
                subprocess.run([sys.executable, os.path.abspath(__file__), "--json", path] + argv, env=env,
                               check=True, stdout=subprocess.DEVNULL)
                with open(path) as f:
                    runs[side].append(json.load(f))
    best = {}
    for side, results in runs.items():
        best[side] = {}
        for res in results:
            for name, row in res["cases"].items():
                cell = best[side].setdefault(name, {})
                for stage, us in row.items():
                    if isinstance(us, float) and stage != "rest":
                        cell[stage] = round(min(cell.get(stage, float("inf")), us), 2)
        for row in best[side].values():
            if all(s in row for s in ("full", "validate", "dispatch", "backend")):
                row["rest"] = round(row["full"] - row["validate"] - row["dispatch"] - row["backend"], 2)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import mlx.core as mx

    result = {
        "tool": "tools/host_cost.py --compare (" + " ".join(argv) + ")",
        "machine": f"{cpu}, {os.cpu_count()} cores (shared); python {platform.python_version()}, mlx {mx.__version__}",
        "method": f"min over {rounds} interleaved rounds (before = {before}, after = this tree) of best-of-N means "
                  "of graph builds, us per call",
        "mode": runs["after"][0]["mode"],
        "before": best["before"], "after": best["after"],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'case':44s} {'before':>7s} {'after':>7s}  (full call, us)")
    for name, row in best["after"].items():
        print(f"{name:44s} {best['before'].get(name, {}).get('full', float('nan')):7.2f} {row['full']:7.2f}")


def main():
    if "--compare" in sys.argv:  # --compare BEFORE_DIR ROUNDS OUT.json [other options for each run]
        i = sys.argv.index("--compare")
        before, rounds, out = sys.argv[i + 1:i + 4]
        compare(before, int(rounds), out, sys.argv[1:i] + sys.argv[i + 4:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--stub", action="store_true", help="stub kernels, force the CUDA backend (no GPU needed)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", default=None, help="cProfile the full call of the case with this name prefix")
    parser.add_argument("--cases", default=None, help="only the cases whose names start with one of these (comma-separated)")
    parser.add_argument("--replay", action="store_true",
                        help="with --stub: the C++ record/replay on (prefill forwards too, as with "
                             "MLX_FLASH_CUDA_HOST_PREFILL=1); its kernel nodes call the stub back through Python, "
                             "where a real replay shares the kernel's primitive: an upper bound")
    args = parser.parse_args()
    gpu = hasattr(mx, "cuda") and mx.cuda.is_available()
    stub = install_stubs() if (args.stub or not gpu) else None
    mode = "stub kernels, dispatch forced to cuda" if stub else "real CUDA kernels"
    card = mx.device_info().get("device_name", "cpu") if gpu else "cpu (no GPU)"
    print(f"host_cost: {mode}; device {card}; best of {args.repeats} x {args.iters} builds, us per call")
    if args.profile:
        name = next(n for n in CASES if n.startswith(args.profile))
        fn = make_case(name, args.iters + 2)["full"]
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            fn()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)
        return
    host = cuda_host.ACTIVE  # the C++ replay, where it serves calls (a CUDA GPU and the extension)
    if args.replay:
        if not (stub and cuda_host.HOST is not None and hasattr(cuda_host, "PREFILL")):
            sys.exit("--replay needs --stub, the extension mlx_flash._cuda_host and cuda_host.PREFILL")
        host = cuda_host.HOST
        cuda_host.KERNEL_SPECS[id(stub)] = stub  # record the stub's launches; replay calls it back
        cuda_host.PREFILL = True
        attention._HOST = attention_quantized._HOST = host
    res = {"mode": mode, "card": card, "cases": {}, "replay": host is not None}
    print("C++ replay (mlx_flash._cuda_host): " + ("on; 'full' is the call as users get it, 'python' the same "
                                                 "call with the replay off" if host is not None else "off"))
    if stub:
        one = lambda: stub(inputs=[], output_shapes=[(1, 32, 1, 128), (1, 32, 1)],  # noqa: E731
                           output_dtypes=[mx.float16, mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
        res["stub_launch_us"] = build_us(one, args.iters, args.repeats)
        print(f"{'(one stub launch, 2 outputs)':44s} {res['stub_launch_us']:6.1f}")
        print("(a real launch adds MLX's work: a trivial mx.fast.cuda_kernel took 2.1 us on the H200)")
    res["header_bytes"] = header_sizes()
    print("header bytes: " + ", ".join(f"{b} {n}" for b, n in res["header_bytes"].items()))
    res["custom_function_floor_us"] = custom_function_floor(args.iters, args.repeats)
    print("(mx.custom_function with a vjp, forward returning 2 ready arrays, by inputs: "
          + ", ".join(f"{n}: {us:.1f}" for n, us in res["custom_function_floor_us"].items()) + ")")
    print(f"{'case':44s} {'valid':>6s} {'disp':>6s} {'backend':>7s} {'rest':>6s} {'full':>6s}  launches")
    for name in CASES:
        if args.cases and not any(name.startswith(c) for c in args.cases.split(",")):
            continue
        # (Growing cases hand out one view per call: enough for the replay-off timing too.)
        stages = make_case(name, (args.iters * args.repeats + 2) * (2 if host is not None else 1) + 1)
        row = {}
        for stage, fn in stages.items():
            row[stage] = build_us(fn, args.iters, args.repeats)
        if host is not None and name.split()[0] not in ("mx.fast",):
            # Which path served the full call (the C++ replay of backends/cuda_host.py
            # or the Python path), and the full call with the replay switched off.
            key_counts = getattr(host, "key_count_stats", lambda: (0, 0))  # (a --compare tree's older module has none)
            served = lambda: host.stats()[0] + key_counts()[0]  # noqa: E731 (replays at any key count)
            hits = served()
            stages["full"]()
            row["path"] = "replay" if served() > hits else "python"
            host.set_enabled(False)
            row["full_python"] = build_us(stages["full"], args.iters, args.repeats)
            host.set_enabled(True)
        if len(stages) > 1:
            row["rest"] = row["full"] - row["validate"] - row["dispatch"] - row["backend"]
        if stub and len(stages) > 1:
            before = _StubKernel.calls
            stages["full"]()
            row["launches"] = _StubKernel.calls - before
        res["cases"][name] = row
        cells = " ".join(f"{row[c]:{w}.1f}" if c in row else f"{'-':>{w}s}"
                         for c, w in (("validate", 6), ("dispatch", 6), ("backend", 7), ("rest", 6), ("full", 6)))
        if "path" in row:
            cells += f"  [{row['path']}; python path {row['full_python']:.1f}]"
        print(f"{name:44s} {cells}  {row.get('launches', '')}", flush=True)
        if args.json:  # after every case: a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
