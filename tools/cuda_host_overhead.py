"""Host (graph-construction) cost of one mlx_flash call on the CUDA path, in microseconds.

    python tools/cuda_host_overhead.py            # on the GPU machine: real mx.fast.cuda_kernel
    python tools/cuda_host_overhead.py --fake     # anywhere: fake kernels, Python cost only
    python tools/cuda_host_overhead.py --fake --profile [case]   # cProfile of one case

Nothing is evaluated: each number is the time to build the lazy graph of one
call (validation, dispatch, launch configuration, kernel call). With the real
kernels that includes MLX's per-launch work (assembling the kernel source from
the header, signature and body); with --fake, mx.fast.cuda_kernel is replaced
by a factory whose kernels return lazy zeros of the requested shapes and the
dispatcher is forced to the CUDA backend, so only mlx_flash's Python remains.
Also prints the header text each kernel hands to MLX (bytes).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import mlx.core as mx

CASES = {
    # name: (B, Hq, Hkv, Nq, Nk, D, dtype, backward). "growing": Nk one longer
    # at every call (k, v are slices of a longer cache); "32 layers": one longer
    # every 32 calls, as in generation with a 32-layer model.
    "decode 32:4 Nk=32768 D128": (1, 32, 4, 1, 32768, 128, mx.float16, False),
    "decode growing Nk": (1, 32, 4, 1, 32768, 128, mx.float16, False),
    "decode growing, 32 layers": (1, 32, 4, 1, 32768, 128, mx.float16, False),
    "tiny (1,1,64,64)": (1, 1, 1, 64, 64, 64, mx.float16, False),
    "fwd (4,16,1024,64)": (4, 16, 16, 1024, 1024, 64, mx.float16, False),
    "bwd (4,16,1024,64)": (4, 16, 16, 1024, 1024, 64, mx.float16, True),
    "bwd fp32 (1,4,256,64)": (1, 4, 4, 256, 256, 64, mx.float32, True),
}


REPEATS = 7


def install_fakes():
    """Fake kernels and a dispatcher that always answers 'cuda' (no GPU needed)."""
    from mlx_flash import dispatch

    class FakeKernel:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                     init_value=None, verbose=False, stream=None):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    mx.fast.cuda_kernel = lambda **kwargs: FakeKernel(**kwargs)
    real_device_of = dispatch.device_of

    def backend_name(stream):
        real_device_of(stream)  # the real per-call work: find the device ...
        mx.metal.is_available()  # ... and ask which GPU backend exists
        return "cuda"

    dispatch.backend_name = backend_name


def make_case(name, calls):
    import mlx_flash

    B, Hq, Hk, Nq, Nk, D, dtype, backward = CASES[name]
    q = mx.random.normal((B, Hq, Nq, D)).astype(dtype)
    k = mx.random.normal((B, Hk, Nk + calls, D)).astype(dtype)
    v = mx.random.normal((B, Hk, Nk + calls, D)).astype(dtype)
    mx.eval(q, k, v)
    s = D ** -0.5
    if "growing" in name:
        per_length = 32 if "layers" in name else 1
        views = iter([(k[:, :, :n], v[:, :, :n]) for n in (Nk + i // per_length for i in range(calls))])

        def step():
            kn, vn = next(views)
            return mlx_flash.flash_attention(q, kn, vn, scale=s)
        return step
    k, v = k[:, :, :Nk], v[:, :, :Nk]
    mx.eval(k, v)
    if backward:
        grad = mx.grad(lambda q, k, v: mlx_flash.flash_attention(q, k, v, scale=s).sum(), argnums=(0, 1, 2))
        return lambda: grad(q, k, v)
    return lambda: mlx_flash.flash_attention(q, k, v, scale=s)


def build_us(fn, iters, repeats=REPEATS):
    """Best of `repeats` means over `iters` graph builds (microseconds per call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def header_sizes():
    from mlx_flash.backends import cuda as cb

    sizes = {}
    bodies = ("attention_fwd_mma", "attention_fwd_mma2", "attention_fwd_simt", "attention_combine",
              "attention_bwd_mma", "attention_bwd_simt")
    for body in bodies:
        if hasattr(cb, "kernel_headers"):
            sizes[body] = len(cb._header(cb.kernel_headers(body)))
        else:
            sizes[body] = len(cb._header())
    return sizes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake", action="store_true", help="fake kernels, force the CUDA backend (no GPU)")
    parser.add_argument("--profile", nargs="?", const="decode 32:4 Nk=32768 D128", default=None,
                        help="cProfile one case (name prefix)")
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    if args.fake:
        install_fakes()
    elif not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise SystemExit("no CUDA GPU visible to MLX; use --fake for the Python cost alone")
    for body, size in header_sizes().items():
        print(f"header {body:22s} {size:6d} bytes")
    if args.profile:
        name = next(n for n in CASES if n.startswith(args.profile))
        fn = make_case(name, args.iters + 1)
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            fn()
        prof.disable()
        print(name)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    for name, spec in CASES.items():
        iters = args.iters // 3 if spec[-1] else args.iters
        fn = make_case(name, iters * REPEATS + 1)
        print(f"{name:28s} {build_us(fn, iters):8.1f} us/call (graph build)")


if __name__ == "__main__":
    main()
