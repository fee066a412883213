"""Where a CUDA decode call's time goes: Python wrapper, MLX launch, GPU (GPU machine).

    python tools/cuda_decode_profile.py OUT_DIR [--sweep] [--no-lm]  # host timings + cProfile (+ launch-plan sweep)
    ncu ... python tools/cuda_decode_profile.py OUT_DIR --kernels-step [--plans JSON] [--bits 4,8]  # each plan's kernel
    python tools/cuda_decode_profile.py OUT_DIR --step [--bits 4,8] [--plans JSON] [--no-lm | --lm-first] [--fp16-ours] [--tag T]
                 [--chain] [--fp16-plans JSON] [--hkv 8]   # a 32-layer decode step, plans side by side
                                                           # (--chain: each layer's query is the last one's output)
    ncu --metrics gpu__time_duration.sum --csv python tools/cuda_decode_profile.py OUT_DIR --kernels
                                                           # GPU time of each kernel

For the decode step of issues 14/16 (B 1, GQA 32:8, 1 query, Nk 32768, D 128,
fp16; 4- and 8-bit group 64 for the quantized op) it times, per call:
  build    graph construction only (Python + MLX's op assembly),
  batched  20 calls queued per eval (a call then costs max(host, GPU)),
for mx.fast SDPA, flash_attention, flash_attention_quantized (its
tensor-core decode, attention_quant_decode, and main's SIMT split kernel +
attention_combine, `*_simt`), mlx-lm's quantized_scaled_dot_product_attention,
and the quantized op's kernels launched directly with prepared inputs (what
is left without the Python wrapper). `check` holds each quantized result's
largest difference from mx.fast SDPA over the dequantized fp16 cache;
`first_call_s` the first call of each (NVRTC compilation included). A cProfile of the wrapper (no eval) goes to
OUT_DIR/decode_cprofile.txt. With --kernels it only makes three calls of
each, for a profiler to time the kernels.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import mlx.core as mx

import mlx_flash
import mlx_flash.attention_quantized
from mlx_flash.backends import cuda_quant as cq
from mlx_flash.bench.cuda import chained_step


def step_bench(out_dir, plans, bits_list=(4,), layers=32, lm=False, ours_fp16=False, rounds=9, nk=32768,
               tag="", chain=False, hkv=8):
    """A model's decode step: `layers` distinct caches (each layer its own K/V,
    so no call finds its cache in L2 from the call before: 38 MB of 4-bit
    cache per layer, 134 MB fp16), one call per layer, then one eval. Per
    call: eval_us (the eval of the step / layers: the GPU time where it
    exceeds MLX's launch cost) and step_us (graph build + eval / layers).
    The calls of a step are independent unless `chain`: then each layer's
    query is the previous layer's output (same shape and dtype), so the
    kernels run one after the other as in a model, where the next layer's
    query depends on this one's output. Independent calls MLX may run
    concurrently in its CUDA graph, which fills the SMs that one
    low-occupancy kernel leaves idle: throughput, not a model's step.
    `plans`: {name: TUNING dict} for the quantized decode, timed side by side
    with mx.fast SDPA over the fp16 caches (and mlx-lm's quantized path with
    `lm`: its first call compiles for tens of seconds). `hkv`: KV heads
    (32 query heads)."""
    B, Hq, Hkv, Nk, D = 1, 32, hkv, nk, 128
    s = D ** -0.5
    q = mx.random.normal((B, Hq, 1, D), key=mx.random.key(7)).astype(mx.float16)
    fp16 = []
    for i in range(layers):
        kk, kv = mx.random.split(mx.random.key(1000 + i))
        fp16.append((mx.random.normal((B, Hkv, Nk, D), key=kk).astype(mx.float16),
                     mx.random.normal((B, Hkv, Nk, D), key=kv).astype(mx.float16)))
        mx.eval(fp16[-1])
    quant = {bits: [] for bits in bits_list}
    for bits in bits_list:
        for k, v in fp16:
            quant[bits].append((tuple(mx.quantize(k, group_size=64, bits=bits)),
                                tuple(mx.quantize(v, group_size=64, bits=bits))))
            mx.eval(quant[bits][-1])
    res = {"card": mx.device_info().get("device_name", "?"),
           "shape": f"B1 GQA 32:{Hkv} Nq 1 Nk {Nk} D128 fp16 q, group 64, {layers} layers (distinct caches) a step",
           "step": {}, "check": {}, "first_call_s": {}, "plans": {n: dict(t) for n, t in plans.items()}}
    path = os.path.join(out_dir, f"decode_step{'_' + tag if tag else ''}.json")
    res["chain"] = chain

    def dump():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    def run(name, fn, want=None):
        t0 = time.perf_counter()
        try:
            got = fn(0)
            mx.eval(got)
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            res["step"][name] = {"error": repr(e)[:300]}
            print("step", name, res["step"][name], flush=True)
            dump()
            return
        res["first_call_s"][name] = time.perf_counter() - t0
        if want is not None:
            res["check"][name] = mx.max(mx.abs(got.astype(mx.float32) - want)).item()
        build, ev, step = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            if chain:
                outs = [chained_step(fn, q, layers)]
            else:
                outs = [fn(i) for i in range(layers)]
            t1 = time.perf_counter()
            mx.eval(outs)
            t2 = time.perf_counter()
            build.append((t1 - t0) / layers)
            ev.append((t2 - t1) / layers)
            step.append((t2 - t0) / layers)
        # latency_us: one call per eval (launch + kernel + sync; no overlap with other calls).
        lat = []
        for i in range(2 * layers):
            out = fn(i % layers)
            t0 = time.perf_counter()
            mx.eval(out)
            lat.append(time.perf_counter() - t0)
        res["step"][name] = {"build_us": statistics.median(build) * 1e6, "eval_us": statistics.median(ev) * 1e6,
                             "step_us": statistics.median(step) * 1e6, "eval_min_us": min(ev) * 1e6,
                             "latency_us": statistics.median(lat) * 1e6}
        print("step", name, {k: round(x, 1) for k, x in res["step"][name].items()}, "first call",
              round(res["first_call_s"][name], 2), "s max |diff|", res["check"].get(name), flush=True)
        dump()

    run("mx_fast_fp16", lambda i, q=q: mx.fast.scaled_dot_product_attention(q, *fp16[i], scale=s))
    wants = {}
    for bits in bits_list:
        kq, vq = quant[bits][0]
        kd = mx.dequantize(*kq, group_size=64, bits=bits)
        vd = mx.dequantize(*vq, group_size=64, bits=bits)
        wants[bits] = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=s).astype(mx.float32)
        mx.eval(wants[bits])

    def run_lm():
        lm_name, lm_qsdpa = mlx_lm_path()
        for bits in bits_list:
            run(f"{lm_name}_quantized_{bits}bit", lambda i, q=q, bits=bits: lm_qsdpa(
                q, *quant[bits][i], s, 64, bits), wants[bits])

    if lm == "first":  # its first call compiles for tens of seconds: measured before the plans
        run_lm()
    for pname, tuning in plans.items():
        for bits in bits_list:
            cq.TUNING.clear()
            cq.TUNING.update(tuning)
            cq.decode_plan.cache_clear()
            try:
                run(f"quant_{bits}bit_{pname}", lambda i, q=q, bits=bits: mlx_flash.flash_attention_quantized(
                    q, *quant[bits][i], bits=bits, group_size=64, scale=s), wants[bits])
                spec = mlx_flash.attention_quantized.validate_attention_quantized(
                    q, *quant[bits][0], bits=bits, group_size=64)[0]
                res["step"].get(f"quant_{bits}bit_{pname}", {})["plan"] = list(cq.decode_plan(spec))
            finally:
                cq.TUNING.clear()
                cq.decode_plan.cache_clear()
    dump()
    if ours_fp16:
        # ours_fp16: True (the routed plan) or {name: cuda.DECODE_TUNING dict} (plans; {} the routed one).
        from mlx_flash.backends import cuda as cb

        for pname, tuning in (ours_fp16 if isinstance(ours_fp16, dict) else {"": {}}).items():
            cb.DECODE_TUNING.clear()
            cb.DECODE_TUNING.update(tuning)
            try:
                run("flash_attention_fp16" + (f"_{pname}" if pname else ""),
                    lambda i, q=q: mlx_flash.flash_attention(q, *fp16[i], scale=s))
            finally:
                cb.DECODE_TUNING.clear()
    if lm and lm != "first":
        run_lm()
    base = res["step"].get("mx_fast_fp16", {}).get("eval_us")
    lm_name = mlx_lm_path()[0]
    for name, r in res["step"].items():
        if base and "eval_us" in r and name.startswith("quant_"):
            r["speedup_eval_vs_mx_fast_fp16"] = base / r["eval_us"]
            r["speedup_step_vs_mx_fast_fp16"] = res["step"]["mx_fast_fp16"]["step_us"] / r["step_us"]
            bits = name.split("_")[1].replace("bit", "")
            lmr = res["step"].get(f"{lm_name}_quantized_{bits}bit", {})
            if "step_us" in lmr:
                r["speedup_step_vs_mlx_lm"] = lmr["step_us"] / r["step_us"]
    dump()
    return res


def per_call(fn, calls=20, rounds=15):
    mx.eval(fn())
    build, wall, ev = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        build.append((t1 - t0) / calls)
        wall.append((t2 - t0) / calls)
        ev.append((t2 - t1) / calls)
    # eval_us: the eval alone per call, max(MLX's launch cost, GPU time): the
    # GPU time wherever it is the larger.
    return {"build_us": statistics.median(build) * 1e6, "batched_us": statistics.median(wall) * 1e6,
            "eval_us": statistics.median(ev) * 1e6}


def sweep(q, quant, s, res):
    """The decode kernel's launch plan: warps per block, prefetch, key splits (TUNING)."""
    res["sweep"] = {}
    for bits, (kq, vq) in quant.items():
        fn = lambda kq=kq, vq=vq, bits=bits: mlx_flash.flash_attention_quantized(  # noqa: E731
            q, kq, vq, bits=bits, group_size=64, scale=s)
        variants = [(4, False), (4, True), (8, False)] if bits == 4 else [(4, False)]
        for nw, pf in variants:
            for splits in (None, 16, 32, 64, 128, 256) if (nw, pf) == (4, False) else (None, 32, 128):
                cq.TUNING.clear()
                cq.TUNING.update(dec_warps=nw, dec_prefetch=pf)
                if splits:
                    cq.TUNING["dec_splits"] = splits
                cq.decode_plan.cache_clear()
                name = f"{bits}bit_w{nw}_pf{int(pf)}_splits{splits or 'default'}"
                try:
                    res["sweep"][name] = dict(per_call(fn, rounds=5), plan=list(cq.decode_plan(
                        mlx_flash.attention_quantized.validate_attention_quantized(
                            q, kq, vq, bits=bits, group_size=64)[0])))
                except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                    res["sweep"][name] = {"error": repr(e)[:300]}
                print("sweep", name, res["sweep"][name], flush=True)
    cq.TUNING.clear()
    cq.decode_plan.cache_clear()


def setup():
    B, Hq, Hkv, Nk, D = 1, 32, 8, 32768, 128
    ks = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((B, Hq, 1, D), key=ks[0]).astype(mx.float16)
    k = mx.random.normal((B, Hkv, Nk, D), key=ks[1]).astype(mx.float16)
    v = mx.random.normal((B, Hkv, Nk, D), key=ks[2]).astype(mx.float16)
    quant = {bits: (tuple(mx.quantize(k, group_size=64, bits=bits)), tuple(mx.quantize(v, group_size=64, bits=bits)))
             for bits in (4, 8)}
    mx.eval(q, k, v, quant)
    return q, k, v, quant, D ** -0.5


def direct_kernels(q, kq, vq, bits, s):
    """The quantized op's two launches with every input prepared once."""
    from mlx_flash import _spec  # noqa: F401  (the wrapper's own objects, captured below)

    captured = {}
    real = cq._strided_kernel

    def spy(body, inputs, outputs, smem):
        kern = real(body, inputs, outputs, smem)

        def call(**kw):
            captured.setdefault(body, (kern, kw))
            return kern(**kw)
        return call

    cq._strided_kernel = spy
    real_k = cq._kernel

    def spy_k(body, inputs, outputs, smem, row_contiguous=True):
        kern = real_k(body, inputs, outputs, smem, row_contiguous)

        def call(**kw):
            captured.setdefault(body, (kern, kw))
            return kern(**kw)
        return call

    cq._kernel = spy_k
    try:
        mx.eval(mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=64, scale=s))
    finally:
        cq._strided_kernel, cq._kernel = real, real_k
    return captured


# A one-line kernel (y = x + 1) as PTX for sm_90 (nvcc 13 -ptx), to time MLX's
# precompiled-kernel launch next to cuda_kernel's.
_PROBE_PTX = r"""//
// Generated by NVIDIA NVVM Compiler
//
// Compiler Build ID: CL-36424714
// Cuda compilation tools, release 13.0, V13.0.88
// Based on NVVM 7.0.1
//

.version 9.0
.target sm_90
.address_size 64

	// .globl	mlx_flash_probe_add

.visible .entry mlx_flash_probe_add(
	.param .u64 mlx_flash_probe_add_param_0,
	.param .u64 mlx_flash_probe_add_param_1,
	.param .u32 mlx_flash_probe_add_param_2
)
{
	.reg .pred 	%p<2>;
	.reg .f32 	%f<3>;
	.reg .b32 	%r<6>;
	.reg .b64 	%rd<8>;


	ld.param.u64 	%rd1, [mlx_flash_probe_add_param_0];
	ld.param.u64 	%rd2, [mlx_flash_probe_add_param_1];
	ld.param.u32 	%r2, [mlx_flash_probe_add_param_2];
	mov.u32 	%r3, %ctaid.x;
	mov.u32 	%r4, %ntid.x;
	mov.u32 	%r5, %tid.x;
	mad.lo.s32 	%r1, %r3, %r4, %r5;
	setp.ge.u32 	%p1, %r1, %r2;
	@%p1 bra 	$L__BB0_2;

	cvta.to.global.u64 	%rd3, %rd1;
	mul.wide.u32 	%rd4, %r1, 4;
	add.s64 	%rd5, %rd3, %rd4;
	ld.global.f32 	%f1, [%rd5];
	add.f32 	%f2, %f1, 0f3F800000;
	cvta.to.global.u64 	%rd6, %rd2;
	add.s64 	%rd7, %rd6, %rd4;
	st.global.f32 	[%rd7], %f2;

$L__BB0_2:
	ret;

}

"""
_PROBE_SRC = "unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n[0]) y[i] = x[i] + 1.f;"


def launch_floor(res):
    x = mx.ones((16,), mx.float32)
    n = mx.array([16], mx.int32)
    mx.eval(x, n)
    jit = mx.fast.cuda_kernel(name="mlx_flash_probe_jit", input_names=["x", "n"], output_names=["y"], source=_PROBE_SRC)
    ptx = _PROBE_PTX.encode()
    fns = {
        "cuda_kernel_trivial": lambda: jit(inputs=[x, n], grid=(16, 1, 1), threadgroup=(16, 1, 1),
                                           output_shapes=[(16,)], output_dtypes=[mx.float32])[0],
        "precompiled_trivial": lambda: mx.fast.precompiled_cuda_kernel(
            name="mlx_flash_probe_add", compiled_source=ptx, inputs=[x], output_shapes=[(16,)],
            output_dtypes=[mx.float32], scalars=[16], grid=(16, 1, 1), threadgroup=(16, 1, 1))[0],
    }
    for name, fn in fns.items():
        try:
            assert mx.array_equal(fn(), x + 1).item()
            res["calls"][name] = per_call(fn)
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            res["calls"][name] = {"error": repr(e)[:300]}
        print(name, res["calls"][name], flush=True)


def _quantized_matmul_attention(q, kq, vq, scale, group_size, bits):
    """mlx-lm's quantized path, algorithm for algorithm (its
    quantized_scaled_dot_product_attention without a mask: scores by
    mx.quantized_matmul against the K triple, a precise softmax over the
    materialised scores, mx.quantized_matmul against the V triple), for a
    machine where mlx-lm is not installed."""
    B, Hq, L, D = q.shape
    Hkv = kq[0].shape[1]
    G = Hq // Hkv
    qs = (q * scale).reshape(B, Hkv, G, L, D)
    kk = tuple(mx.expand_dims(x, 2) for x in kq)
    vv = tuple(mx.expand_dims(x, 2) for x in vq)
    scores = mx.quantized_matmul(qs, *kk, transpose=True, group_size=group_size, bits=bits)
    p = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(p, *vv, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, Hq, L, -1)


def mlx_lm_path():
    """(name, fn(q, kq, vq, scale, group_size, bits)): mlx-lm's own function, or its algorithm re-expressed."""
    try:
        from mlx_lm.models.base import quantized_scaled_dot_product_attention as f
    except ImportError:
        return "mlx_lm_algorithm", _quantized_matmul_attention
    return "mlx_lm", lambda q, kq, vq, scale, group_size, bits: f(
        mx.array(q), kq, vq, scale=scale, mask=None, group_size=group_size, bits=bits)


def simt(fn):
    """fn with the quantized op routed to main's SIMT split kernel (no tensor-core decode)."""
    def call():
        cq.TUNING["decode"] = False
        try:
            return fn()
        finally:
            cq.TUNING.pop("decode", None)
    return call


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out_dir, exist_ok=True)
    if "--kernels-step" in sys.argv:  # for a profiler: each plan's kernel (and mx.fast's) a few times, one layer
        args = sys.argv
        plans = json.loads(args[args.index("--plans") + 1]) if "--plans" in args else {"default": {}}
        q, k, v, quant, s = setup()
        for _ in range(2):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=s))
        for name, tuning in plans.items():
            for bits in (tuple(int(b) for b in args[args.index("--bits") + 1].split(",")) if "--bits" in args
                         else (4, 8)):
                cq.TUNING.clear()
                cq.TUNING.update(tuning)
                cq.decode_plan.cache_clear()
                for _ in range(2):
                    mx.eval(mlx_flash.flash_attention_quantized(q, *quant[bits], bits=bits, group_size=64, scale=s))
                mx.synchronize()
                print("kernels-step", name, bits, "plan", cq.decode_plan(
                    mlx_flash.attention_quantized.validate_attention_quantized(q, *quant[bits], bits=bits,
                                                                               group_size=64)[0]), flush=True)
        cq.TUNING.clear()
        return
    if "--step" in sys.argv:
        args = sys.argv
        bits = tuple(int(b) for b in args[args.index("--bits") + 1].split(",")) if "--bits" in args else (4,)
        plans = json.loads(args[args.index("--plans") + 1]) if "--plans" in args else {"default": {}}
        opt = lambda name, d: int(args[args.index(name) + 1]) if name in args else d  # noqa: E731
        step_bench(out_dir, plans, bits, layers=opt("--layers", 32),
                   lm="first" if "--lm-first" in args else "--no-lm" not in args,
                   ours_fp16=(json.loads(args[args.index("--fp16-plans") + 1]) if "--fp16-plans" in args
                              else "--fp16-ours" in args), nk=opt("--nk", 32768),
                   tag=args[args.index("--tag") + 1] if "--tag" in args else "", chain="--chain" in args,
                   hkv=opt("--hkv", 8))
        return
    q, k, v, quant, s = setup()
    lm_name, lm_qsdpa = mlx_lm_path()
    calls = {
        "mx_fast_fp16": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s),
        "flash_attention_fp16": lambda: mlx_flash.flash_attention(q, k, v, scale=s),
    }
    for bits, (kq, vq) in quant.items():
        calls[f"flash_quantized_{bits}bit"] = (
            lambda kq=kq, vq=vq, bits=bits: mlx_flash.flash_attention_quantized(
                q, kq, vq, bits=bits, group_size=64, scale=s))
        calls[f"flash_quantized_{bits}bit_simt"] = simt(calls[f"flash_quantized_{bits}bit"])
        calls[f"{lm_name}_quantized_{bits}bit"] = (
            lambda kq=kq, vq=vq, bits=bits: lm_qsdpa(q, kq, vq, s, 64, bits))
    if "--no-lm" in sys.argv:  # mlx-lm's algorithm compiles for tens of seconds on its first call
        calls = {n: f for n, f in calls.items() if "mlx_lm" not in n}
    if "--kernels" in sys.argv:
        for name, fn in calls.items():
            for _ in range(3):
                mx.eval(fn())
            mx.synchronize()
        return
    res = {"card": mx.device_info().get("device_name", "?"), "shape": "B1 GQA 32:8 Nq 1 Nk 32768 D128 fp16",
           "calls": {}, "check": {}, "first_call_s": {}}
    # Most important first (each first call compiles its kernels with NVRTC,
    # seconds each): the JSON is rewritten after every measurement.
    order = ["mx_fast_fp16", "flash_quantized_4bit", "flash_quantized_8bit", "flash_quantized_4bit_simt",
             "flash_quantized_8bit_simt", "flash_attention_fp16", f"{lm_name}_quantized_4bit",
             f"{lm_name}_quantized_8bit"]
    order = [n for n in order if n in calls]
    wants = {}
    for name in order:
        fn = calls[name]
        t0 = time.perf_counter()
        try:
            got = fn()
            mx.eval(got)
        except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
            res["calls"][name] = {"error": repr(e)[:300]}
            print(name, res["calls"][name], flush=True)
            continue
        res["first_call_s"][name] = time.perf_counter() - t0
        bits = 4 if "4bit" in name else 8 if "8bit" in name else None
        if bits is not None:  # against mx.fast over the dequantized fp16 cache
            if bits not in wants:
                kq, vq = quant[bits]
                kd = mx.dequantize(*kq, group_size=64, bits=bits)
                vd = mx.dequantize(*vq, group_size=64, bits=bits)
                wants[bits] = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=s).astype(mx.float32)
            res["check"][name] = mx.max(mx.abs(got.astype(mx.float32) - wants[bits])).item()
        res["calls"][name] = per_call(fn)
        print(name, res["calls"][name], "first call", round(res["first_call_s"][name], 2), "s",
              "max |diff| vs mx.fast(dequantized)", res["check"].get(name), flush=True)
        _dump(res, out_dir)
    _dump(res, out_dir)
    try:
        direct(q, quant, s, res)
    except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
        res["direct_error"] = repr(e)[:500]
        print("direct failed", res["direct_error"], flush=True)
    _dump(res, out_dir)
    if "--sweep" in sys.argv:
        sweep(q, quant, s, res)
        _dump(res, out_dir)
    launch_floor(res)
    _profile(calls, out_dir)
    _dump(res, out_dir)


def direct(q, quant, s, res):
    """The kernels launched directly: the decode's one launch; main's SIMT forward and combine."""
    for bits, (kq, vq) in quant.items():
        cap = direct_kernels(q, kq, vq, bits, s)
        dec_k, dec_kw = cap["attention_quant_decode"]
        res["calls"][f"direct_decode_{bits}bit"] = per_call(lambda: dec_k(**dec_kw))  # noqa: B023
        print(f"direct_decode_{bits}bit", res["calls"][f"direct_decode_{bits}bit"], flush=True)
        cq.TUNING["decode"] = False
        try:
            cap = direct_kernels(q, kq, vq, bits, s)
        finally:
            cq.TUNING.pop("decode", None)
        fwd_k, fwd_kw = cap["attention_quant_fwd"]
        comb_k, comb_kw = cap["attention_combine"]
        fwd_only = lambda: fwd_k(**fwd_kw)  # noqa: E731
        part = fwd_only()
        mx.eval(part)
        comb_kw = dict(comb_kw, inputs=[part[0], part[1]] + list(comb_kw["inputs"][2:]))
        both = lambda: comb_k(**dict(comb_kw, inputs=list(fwd_k(**fwd_kw)) + list(comb_kw["inputs"][2:])))  # noqa: E731
        for name, fn in ((f"direct_fwd_{bits}bit", fwd_only), (f"direct_combine_{bits}bit", lambda: comb_k(**comb_kw)),
                         (f"direct_both_{bits}bit", both)):
            res["calls"][name] = per_call(fn)
            print(name, res["calls"][name], flush=True)


def _profile(calls, out_dir):
    # cProfile of the wrapper alone (graph building, no eval).
    fn = calls["flash_quantized_4bit"]
    prof = cProfile.Profile()
    prof.enable()
    outs = [fn() for _ in range(300)]
    prof.disable()
    mx.eval(outs)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
    with open(os.path.join(out_dir, "decode_cprofile.txt"), "w") as f:
        f.write(buf.getvalue())


def _dump(res, out_dir):
    """Write what is measured so far (a killed run keeps its numbers)."""
    with open(os.path.join(out_dir, "decode_profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
