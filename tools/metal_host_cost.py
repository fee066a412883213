"""Host (graph-building) cost of one Metal-path call, in microseconds, on any machine.

    python tools/metal_host_cost.py [--json OUT.json] [--rounds 7] [--calls 2000]

On an Apple GPU a decode step calls attention once per layer, so what our
Python spends building each call's graph is paid 32-80 times a token. Here
the Metal kernels are stubbed (backends.metal's kernel factory returns a
callable that hands out zeros of the output shapes, made once) and dispatch
answers "metal", so the exact Metal-path Python of mlx_flash runs on the CPU;
only MLX's own per-launch work inside mx.fast.metal_kernel is missing.
Nothing is evaluated in the timed loops. Numbers are the calling thread's
CPU time per call, the minimum over `--rounds` of the mean over `--calls`
calls. The
stages: "backend" is metal.attention_forward / metal_quant's forward called
with a validated spec; "full" the public call; "fwd+bwd" builds the forward
and backward graph through mx.vjp. "mx.fast" times MLX's own SDPA entry on
the same arrays (on this machine's default device) as the anchor for what a
C++ entry point costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx

import mlx_flash
from mlx_flash import dispatch
from mlx_flash._quant_spec import validate_attention_quantized
from mlx_flash._spec import validate_attention
from mlx_flash.backends import metal, metal_quant

from host_cost import _StubKernel  # tools/, beside this file: zeros of the output shapes, made once

# name: (B, Hq, Hkv, Nq, Nk, D, bits, causal); fp16, scale given, group size 64.
CASES = {
    "decode fp16 (1,32:8,1,4096,128)": (1, 32, 8, 1, 4096, 128, None, False),
    "decode 4-bit (1,32:8,1,4096,128)": (1, 32, 8, 1, 4096, 128, 4, False),
    "prefill fp16 causal (1,32:8,512,4096,128)": (1, 32, 8, 512, 4096, 128, None, True),
    "forward fp16 (4,16,1024,64)": (4, 16, 16, 1024, 1024, 64, None, False),
}
GROUP_SIZE = 64


def install_stubs():
    stub = _StubKernel()  # takes mx.fast.metal_kernel's launch arguments too
    factory = lambda **kw: stub  # noqa: E731
    metal.set_kernel_factory(factory)  # metal_quant builds through metal's factory too
    real_device_of = dispatch.device_of

    def backend_name(stream):
        real_device_of(stream)  # the real per-call work: find the device
        return "metal"

    dispatch.backend_name = backend_name


def per_call_us(fn, calls, rounds):
    """Microseconds of this thread's CPU time per call (graph building runs in
    the calling thread; CPU time is not inflated by other processes on a
    shared machine the way wall time is), best round."""
    for _ in range(min(100, calls)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return round(best, 2)


def case_calls(B, Hq, Hkv, Nq, Nk, D, bits, causal):
    h = lambda *s: mx.random.normal(s).astype(mx.float16)  # noqa: E731
    q, k, v = h(B, Hq, Nq, D), h(B, Hkv, Nk, D), h(B, Hkv, Nk, D)
    mx.eval(q, k, v)
    s = D ** -0.5
    if bits is not None:
        kq = tuple(mx.quantize(k, group_size=GROUP_SIZE, bits=bits))
        vq = tuple(mx.quantize(v, group_size=GROUP_SIZE, bits=bits))
        mx.eval(kq, vq)
        opts = dict(bits=bits, group_size=GROUP_SIZE, scale=s, causal=causal)
        qspec, inputs, kq, vq = validate_attention_quantized(q, kq, vq, **opts)
        return {
            "backend": lambda: metal_quant.quantized_attention_forward(q, kq, vq, qspec, inputs, None),
            "full": lambda: mlx_flash.flash_attention_quantized(q, kq, vq, **opts),
        }
    spec, inputs = validate_attention(q, k, v, scale=s, causal=causal)
    mask = "causal" if causal else None
    return {
        "backend": lambda: metal.attention_forward(q, k, v, spec, inputs, None),
        "full": lambda: mlx_flash.flash_attention(q, k, v, scale=s, causal=causal),
        "fwd+bwd": lambda: mx.vjp(lambda a, b, c: mlx_flash.flash_attention(a, b, c, scale=s, causal=causal),
                                  [q, k, v], [q])[1],  # the cotangent has out's shape, q's here
        "mx.fast": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask=mask),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    install_stubs()
    result = {"tool": "tools/metal_host_cost.py (Metal kernels stubbed, dispatch answers metal)",
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(), "mlx": mx.__version__, "us_per_call": {}}
    for name, case in CASES.items():
        row = {}
        for stage, fn in case_calls(*case).items():
            row[stage] = per_call_us(fn, max(1, args.calls // (4 if stage == "fwd+bwd" else 1)), args.rounds)
        result["us_per_call"][name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
