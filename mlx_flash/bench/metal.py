"""Metal benchmark (the Mac verification kit): mlx_flash vs MLX on one Apple GPU.

    python -m mlx_flash.bench.metal [--sections fwd,train,decode,features,wide,key_ranges] [--out DIR]
    python -m mlx_flash.bench.metal --dry-run      # no Mac: tiny shapes through the emulation

Sections:
- fwd:      our forward vs `mx.fast.scaled_dot_product_attention` (MLX's fused kernels);
- train:    forward + backward (gradients of q, k, v) through ours (fused backward) vs
            through `mx.fast` SDPA (MLX trains through its unfused, materialised path),
            with peak memory (`mx.get_peak_memory`) of each;
- decode:   one query row against a long K/V cache (GQA), ours vs `mx.fast`;
- features: window, softcap, ALiBi, block-sparse (ours vs the materialised MLX
            reference, the only way to get them from MLX) and causal, sinks (vs `mx.fast`);
- wide:     MLA's widths (Dqk 576, Dv 512, MQA over the latent), decode and causal
            prefill, ours vs `mx.fast` (which MLX does not fuse at these widths);
- key_ranges: a left-padded batch (causal prefill), ours with per-batch `key_start`
            vs `mx.fast` with the equivalent [B, 1, N, N] bool mask mlx-lm would build.
Every row also records the largest difference between ours and the other result.

Writes benchmarks/results/metal_<chip>.json (under --out, default the current
directory; the chip from `mx.device_info()`) and benchmarks/metal_<chip>.png
(if matplotlib is installed). TFLOP/s count attention as 4*B*H*Nq*Nk*D (half of
it under causal), forward+backward as 3.5x that.

--dry-run runs the same sections on tiny shapes on the CPU: our Metal kernels
through the MSL emulation harness of a checkout (tests/metal_emu), MLX's side
on MLX's CPU backend. Its times mean nothing; it checks that the kit runs end to
end, that ours agrees with MLX on every row, and that the JSON and plot are written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import mlx.core as mx

MIB = 1024 * 1024
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}
# Largest |ours - theirs| accepted in the dry run, relative to max |theirs|.
DRY_RUN_TOL = {mx.float16: 2e-2, mx.bfloat16: 6e-2, mx.float32: 1e-4}


class Shapes:
    """What each section runs: real sizes on a Mac, tiny ones in the dry run."""

    def __init__(self, dry_run: bool):
        if dry_run:
            self.fwd = [(1, 2, 40, 32), (1, 1, 33, 64)]
            self.train = [(1, 2, 24, 32)]
            self.decode = [(1, 4, 2, 70, 64)]
            self.features = (1, 2, 48, 32)
            self.wide = [(1, 4, 1, 40), (1, 2, 17, 17)]
            self.key_ranges = (3, 2, 40, 32)
            self.dtypes = {"float16": mx.float16}
            self.iters = 1
        else:
            self.fwd = [(4, 16, 1024, 64), (2, 16, 4096, 64), (2, 16, 4096, 128), (1, 16, 8192, 128)]
            self.train = [(4, 16, 1024, 64), (2, 16, 2048, 128), (1, 16, 4096, 128)]
            self.decode = [(1, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
            self.features = (1, 16, 4096, 128)
            # (B, Hq, Nq, Nk): DeepSeek-V3 decodes with 128 query heads over one latent head
            self.wide = [(1, 128, 1, 4096), (1, 128, 1, 32768), (1, 16, 2048, 2048)]
            self.key_ranges = (4, 16, 2048, 128)
            self.dtypes = DTYPES
            self.iters = 10


# --------------------------------------------------------------------------- how ours runs


class OnGPU:
    """Ours through the public op (the Metal backend on the default GPU)."""

    name = "metal"

    def forward(self, q, k, v, **options):
        import mlx_flash

        return mlx_flash.flash_attention(q, k, v, **options)

    def gradients(self, q, k, v, dout, **options):
        import mlx_flash

        def loss(a, b, c):
            return mx.sum(mlx_flash.flash_attention(a, b, c, **options).astype(mx.float32) * dout)

        return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)


class Emulated:
    """Ours through the MSL emulation harness (a checkout's tests/metal_emu)."""

    name = "metal_emu"

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        tests = os.path.join(root, "tests")
        if not os.path.isdir(os.path.join(tests, "metal_emu")):
            raise SystemExit("--dry-run needs a checkout of mlx_flash (tests/metal_emu), not an installed wheel")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        from metal_emu import attention, harness

        reason = harness.unavailable_reason()
        if reason:
            raise SystemExit(f"--dry-run: the Metal emulation cannot run here: {reason}")
        self._emu = attention

    def forward(self, q, k, v, **options):
        return self._emu.forward(q, k, v, **options)[0]

    def gradients(self, q, k, v, dout, **options):
        g = self._emu.gradients(q, k, v, dout, **options)
        return g["q"], g["k"], g["v"]


# --------------------------------------------------------------------------- measuring


def measure(fn, iters):
    """(seconds per call, peak MiB of one call) of a callable returning arrays."""
    mx.eval(fn())
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    peak = mx.get_peak_memory() / MIB
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) / iters, peak


def max_rel_diff(a, b) -> float:
    a = [a] if isinstance(a, mx.array) else list(a)
    b = [b] if isinstance(b, mx.array) else list(b)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        scale = max(float(mx.max(mx.abs(y)).item()), 1e-6)
        worst = max(worst, float(mx.max(mx.abs(x - y)).item()) / scale)
    return worst


def attn_flops(B, H, Nq, Nk, D, causal):
    return 4 * B * H * Nq * Nk * D * (0.5 if causal else 1.0)


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0, Dv=None):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((B, Hq, Nq, D), key=k1).astype(dtype)
    k = mx.random.normal((B, Hkv, Nk, D), key=k2).astype(dtype)
    v = mx.random.normal((B, Hkv, Nk, D if Dv is None else Dv), key=k3).astype(dtype)
    mx.eval(q, k, v)
    return q, k, v


def mx_fast(q, k, v, causal=False, sinks=None):
    kwargs = {"sinks": sinks} if sinks is not None else {}
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                mask="causal" if causal else None, **kwargs)


class Recorder:
    def __init__(self, dry_run: bool):
        self.rows = []
        self.dry_run = dry_run

    def add(self, dtype=None, **row):
        if self.dry_run and "max_rel_diff" in row and row["max_rel_diff"] > DRY_RUN_TOL[dtype]:
            raise AssertionError(f"dry run: ours and MLX disagree: {row}")
        self.rows.append(row)
        print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- sections


def bench_fwd(rec, ours, shapes):
    for dname, dtype in shapes.dtypes.items():
        for B, H, N, D in shapes.fwd:
            for causal in (False, True):
                q, k, v = qkv(B, H, H, N, N, D, dtype)
                t_ours, m_ours = measure(lambda: ours.forward(q, k, v, causal=causal), shapes.iters)
                t_fast, m_fast = measure(lambda: mx_fast(q, k, v, causal), shapes.iters)
                flops = attn_flops(B, H, N, N, D, causal)
                rec.add(dtype, section="fwd", dtype_name=dname, shape=[B, H, N, D], causal=causal,
                        ours_ms=t_ours * 1e3, ours_tflops=flops / t_ours / 1e12, ours_peak_mib=m_ours,
                        mx_fast_ms=t_fast * 1e3, mx_fast_tflops=flops / t_fast / 1e12, mx_fast_peak_mib=m_fast,
                        speedup_vs_mx_fast=t_fast / t_ours,
                        max_rel_diff=max_rel_diff(ours.forward(q, k, v, causal=causal), mx_fast(q, k, v, causal)))


def bench_train(rec, ours, shapes):
    for dname, dtype in shapes.dtypes.items():
        for B, H, N, D in shapes.train:
            for causal in (False, True):
                q, k, v = qkv(B, H, H, N, N, D, dtype)
                dout = mx.random.normal((B, H, N, D), key=mx.random.key(9))

                def mlx_grads():
                    loss = lambda a, b, c: mx.sum(mx_fast(a, b, c, causal).astype(mx.float32) * dout)
                    return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

                t_ours, m_ours = measure(lambda: ours.gradients(q, k, v, dout, causal=causal), shapes.iters)
                t_mlx, m_mlx = measure(mlx_grads, shapes.iters)
                flops = 3.5 * attn_flops(B, H, N, N, D, causal)
                rec.add(dtype, section="train", dtype_name=dname, shape=[B, H, N, D], causal=causal,
                        ours_ms=t_ours * 1e3, ours_tflops=flops / t_ours / 1e12, ours_peak_mib=m_ours,
                        mlx_ms=t_mlx * 1e3, mlx_tflops=flops / t_mlx / 1e12, mlx_peak_mib=m_mlx,
                        speedup_vs_mlx=t_mlx / t_ours, memory_ratio_mlx_over_ours=m_mlx / max(m_ours, 1e-9),
                        max_rel_diff=max_rel_diff(ours.gradients(q, k, v, dout, causal=causal), mlx_grads()))


def bench_decode(rec, ours, shapes):
    for dname, dtype in shapes.dtypes.items():
        for B, Hq, Hkv, Nk, D in shapes.decode:
            q, k, v = qkv(B, Hq, Hkv, 1, Nk, D, dtype)
            t_ours, _ = measure(lambda: ours.forward(q, k, v), shapes.iters * 5)
            t_fast, _ = measure(lambda: mx_fast(q, k, v), shapes.iters * 5)
            kv_bytes = 2 * B * Hkv * Nk * D * q.dtype.size
            rec.add(dtype, section="decode", dtype_name=dname, shape=[B, Hq, Hkv, 1, Nk, D], ours_us=t_ours * 1e6,
                    ours_gbps=kv_bytes / t_ours / 1e9, mx_fast_us=t_fast * 1e6, speedup_vs_mx_fast=t_fast / t_ours,
                    max_rel_diff=max_rel_diff(ours.forward(q, k, v), mx_fast(q, k, v)))


def _feature_options(name, H, N):
    if name == "window":
        return {"window": (max(N // 8, 1), 0)}
    if name == "softcap":
        return {"softcap": 30.0}
    if name == "alibi":
        return {"alibi_slopes": mx.array([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], mx.float32)}
    if name == "block_sparse":
        bs = 16 if N < 256 else 128
        nb = -(-N // bs)
        keep = mx.random.uniform(shape=(1, 1, nb, nb), key=mx.random.key(3)) < 0.3
        return {"block_mask": keep | mx.eye(nb, dtype=mx.bool_)[None, None], "block_size": (bs, bs)}
    raise ValueError(name)


def bench_features(rec, ours, shapes):
    from mlx_flash import reference

    B, H, N, D = shapes.features
    dtype = mx.float16
    q, k, v = qkv(B, H, H, N, N, D, dtype)
    for name in ("window", "softcap", "alibi", "block_sparse"):
        opts = _feature_options(name, H, N)
        t_ours, m_ours = measure(lambda: ours.forward(q, k, v, **opts), shapes.iters)
        t_ref, m_ref = measure(lambda: reference.flash_attention(q, k, v, **opts), max(1, shapes.iters // 2))
        rec.add(dtype, section="features", feature=name, baseline="materialised MLX", shape=[B, H, N, D],
                ours_ms=t_ours * 1e3, ours_peak_mib=m_ours, baseline_ms=t_ref * 1e3, baseline_peak_mib=m_ref,
                speedup=t_ref / t_ours,
                max_rel_diff=max_rel_diff(ours.forward(q, k, v, **opts), reference.flash_attention(q, k, v, **opts)))
    sinks = mx.random.normal((H,), key=mx.random.key(4)).astype(dtype)  # mx.fast wants the output dtype
    for name, opts, theirs in (("causal", {"causal": True}, lambda: mx_fast(q, k, v, causal=True)),
                               ("sinks", {"sinks": sinks}, lambda: mx_fast(q, k, v, sinks=sinks))):
        t_ours, m_ours = measure(lambda: ours.forward(q, k, v, **opts), shapes.iters)
        t_fast, m_fast = measure(theirs, shapes.iters)
        rec.add(dtype, section="features", feature=name, baseline="mx.fast SDPA", shape=[B, H, N, D],
                ours_ms=t_ours * 1e3, ours_peak_mib=m_ours, baseline_ms=t_fast * 1e3, baseline_peak_mib=m_fast,
                speedup=t_fast / t_ours, max_rel_diff=max_rel_diff(ours.forward(q, k, v, **opts), theirs()))


def bench_wide(rec, ours, shapes):
    for dname, dtype in shapes.dtypes.items():
        for B, Hq, Nq, Nk in shapes.wide:
            q, k, v = qkv(B, Hq, 1, Nq, Nk, 576, dtype, Dv=512)
            causal = Nq > 1
            t_ours, m_ours = measure(lambda: ours.forward(q, k, v, causal=causal), shapes.iters)
            t_fast, m_fast = measure(lambda: mx_fast(q, k, v, causal), shapes.iters)
            kv_bytes = B * Nk * (576 + 512) * q.dtype.size
            rec.add(dtype, section="wide", dtype_name=dname, shape=[B, Hq, 1, Nq, Nk, 576, 512], causal=causal,
                    ours_ms=t_ours * 1e3, ours_peak_mib=m_ours, ours_kv_gbps=kv_bytes / t_ours / 1e9,
                    mx_fast_ms=t_fast * 1e3, mx_fast_peak_mib=m_fast, speedup_vs_mx_fast=t_fast / t_ours,
                    max_rel_diff=max_rel_diff(ours.forward(q, k, v, causal=causal), mx_fast(q, k, v, causal)))


def bench_key_ranges(rec, ours, shapes):
    B, H, N, D = shapes.key_ranges
    dtype = mx.float16
    q, k, v = qkv(B, H, H, N, N, D, dtype)
    start = mx.array([(b * N) // (2 * B) for b in range(B)], mx.int32)  # left padding up to half the keys
    j = mx.arange(N)
    keep = (j[None, :] <= j[:, None])[None] & (j >= start[:, None])[:, None, :]  # causal & not padding
    keep = keep[:, None]
    t_ours, m_ours = measure(lambda: ours.forward(q, k, v, causal=True, key_start=start), shapes.iters)
    theirs = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=keep)
    t_fast, m_fast = measure(theirs, shapes.iters)
    ours_out = ours.forward(q, k, v, causal=True, key_start=start)
    # Rows whose every key is padding are 0 in ours and NaN (0/0) in mx.fast: compare the others.
    live = (j[None, :] >= start[:, None])[:, None, :, None]
    rec.add(dtype, section="key_ranges", shape=[B, H, N, D], left_padding=start.tolist(), ours_ms=t_ours * 1e3,
            ours_peak_mib=m_ours, mx_fast_ms=t_fast * 1e3, mx_fast_peak_mib=m_fast,
            speedup_vs_mx_fast=t_fast / t_ours,
            max_rel_diff=max_rel_diff(mx.where(live, ours_out, 0), mx.where(live, theirs(), 0)))


SECTIONS = {"fwd": bench_fwd, "train": bench_train, "decode": bench_decode, "features": bench_features,
            "wide": bench_wide, "key_ranges": bench_key_ranges}


# --------------------------------------------------------------------------- output


def device_info() -> dict:
    """MLX's description of the GPU (`mx.device_info()`; `mx.metal.device_info()`
    before MLX deprecated it)."""
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()}


def chip_name(dry_run: bool) -> str:
    if dry_run:
        return "emulated"
    info = device_info()
    return str(info.get("device_name") or info.get("architecture") or "apple_gpu")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def plot(result: dict, path: str):
    """A PNG of the speedups (and training memory); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    panels = (("fwd", "speedup_vs_mx_fast", "forward: mx.fast time / ours"),
              ("train", "speedup_vs_mlx", "forward+backward: MLX time / ours"),
              ("train", "memory_ratio_mlx_over_ours", "forward+backward: MLX peak memory / ours"),
              ("decode", "speedup_vs_mx_fast", "decode: mx.fast time / ours"))
    for ax, (section, key, title) in zip(axes.flat, panels):
        sel = [r for r in rows if r.get("section") == section and key in r]
        labels = [f'{r.get("dtype_name", "")} {"x".join(map(str, r["shape"]))}{" c" if r.get("causal") else ""}'
                  for r in sel]
        ax.bar(range(len(sel)), [r[key] for r in sel])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(sel)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f'mlx_flash Metal kernels on {result["chip"]} (MLX {result["mlx"]}); above 1: ours is better')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", default=".")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes through the emulation, no Mac needed")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}, expected some of {list(SECTIONS)}")
    if args.dry_run:
        mx.set_default_device(mx.cpu)
        ours = Emulated()
    else:
        if not mx.metal.is_available():
            raise SystemExit("mlx_flash.bench.metal: MLX sees no Metal GPU (use --dry-run to check the kit)")
        ours = OnGPU()
    shapes = Shapes(args.dry_run)
    rec = Recorder(args.dry_run)
    for name in sections:
        try:
            SECTIONS[name](rec, ours, shapes)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 (record the failure, keep the other sections)
            if args.dry_run:
                raise
            rec.add(section=name, error=f"{type(e).__name__}: {e}")
    chip = chip_name(args.dry_run)
    result = {"chip": chip, "mlx": mx.__version__, "ours": ours.name, "dry_run": args.dry_run,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rec.rows}
    if not args.dry_run:
        result["device_info"] = device_info()
    base = os.path.join(args.out, "benchmarks")
    path = os.path.join(base, "results", f"metal_{slug(chip)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    png = plot(result, os.path.join(base, f"metal_{slug(chip)}.png"))
    print(f"wrote {png}" if png else "no plot (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
