"""CPU attention benchmark: mlx_flash beside PyTorch SDPA and mx.fast SDPA.

    python -m mlx_flash.bench                 # full sweep + the performance targets
    python -m mlx_flash.bench --quick         # a minute or two
    python -m mlx_flash.bench --only-targets --check-targets
    python -m mlx_flash.bench --check-targets --from benchmarks/results/cpu_attention_latest.json

Every (config, implementation) pair is one measurement: a warm-up call
(on which peak memory is taken), then the median of repeats within a time
budget (`common.TimingPolicy`). Results are written after every
measurement, so an interrupted run continues with `--resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import sys
from pathlib import Path

import numpy as np

from . import common

SCHEMA = "mlx_flash.bench.cpu_attention/1"
IMPLS = ("mlx_flash", "torch_sdpa", "mx_fast_sdpa")
ANCHORS = ("torch_sdpa", "mx_fast_sdpa")
MODES = ("fwd", "fwdbwd")
DTYPES = ("fp32", "bf16")
SWEEP_N = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_D = (64, 128)
HEADS_FOR_D = {64: 8, 128: 4}
QUICK_N = (512, 1024)
MX_FAST_MAX_N = 2048

# The backward does five N x N x D products (QK^T recomputed, dV, dP, dQ, dK)
# against the forward's two: 2.5x the forward's FLOPs, as FlashAttention's
# benchmarks count it; forward+backward is then 1 + 2.5 = 3.5x.
BACKWARD_FLOP_FACTOR = 2.5
FLOP_COUNTING = (
    "forward: 4*B*H*Nq*Nk*D (two matmuls), halved when causal; backward: 2.5x the forward "
    "(five matmuls incl. the QK^T recompute, FlashAttention's convention); "
    "fwdbwd counts forward + backward = 3.5x the forward"
)


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str      # "fwd" or "fwdbwd"
    dtype: str     # "fp32" or "bf16"
    causal: bool
    B: int
    H: int
    N: int
    D: int

    @property
    def key(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.mode}-{self.dtype}-{mask}-B{self.B}-H{self.H}-N{self.N}-D{self.D}"

    @property
    def flops(self) -> float:
        fwd = 4.0 * self.B * self.H * self.N * self.N * self.D / (2 if self.causal else 1)
        return fwd if self.mode == "fwd" else fwd * (1 + BACKWARD_FLOP_FACTOR)

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.mode:6s} {self.dtype} {mask:6s} B{self.B} H{self.H} N{self.N} D{self.D}"

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Measurement:
    config: Config
    impl: str
    force: bool = False  # run mx.fast beyond its size cap (the targets need N=4096)


# --------------------------------------------------------------------------- plans

def sweep_plan(ns, ds, dtypes, modes, causals, batch=1, heads=None) -> list[Measurement]:
    """N outermost: an interrupted sweep still has whole curves up to some N."""
    plan = []
    for n in sorted(ns):
        for dtype in dtypes:
            for mode in modes:
                for d in ds:
                    for causal in causals:
                        h = heads or HEADS_FOR_D.get(d, 8)
                        cfg = Config(mode, dtype, causal, batch, h, n, d)
                        plan.extend(Measurement(cfg, impl) for impl in IMPLS)
    return plan


# The configurations of the CPU performance targets (docs/performance_cpu.md, "Targets";
# check_targets holds the thresholds).
TARGET_SPEED_CONFIGS = (
    dict(causal=False, B=1, H=8, N=4096, D=64),
    dict(causal=True, B=1, H=8, N=4096, D=64),
    dict(causal=False, B=1, H=4, N=4096, D=128),
)
TARGET_MEMORY_CONFIG = Config("fwdbwd", "fp32", False, 1, 8, 16384, 64)
TARGET_LONG_CONFIG = Config("fwdbwd", "fp32", True, 1, 4, 65536, 64)


def targets_plan() -> list[Measurement]:
    plan = []
    for mode in MODES:
        for c in TARGET_SPEED_CONFIGS:
            cfg = Config(mode, "fp32", **c)
            plan.append(Measurement(cfg, "mlx_flash"))
            plan.append(Measurement(cfg, "torch_sdpa"))
            if mode == "fwd":
                plan.append(Measurement(cfg, "mx_fast_sdpa", force=True))
    plan.append(Measurement(TARGET_MEMORY_CONFIG, "mlx_flash"))
    plan.append(Measurement(TARGET_LONG_CONFIG, "mlx_flash"))
    return plan


def merge_plans(*plans) -> list[Measurement]:
    """Union of plans, grouped by config (inputs are built once per config), forced wins."""
    order: dict[str, dict[str, Measurement]] = {}
    for plan in plans:
        for m in plan:
            per_cfg = order.setdefault(m.config.key, {})
            old = per_cfg.get(m.impl)
            if old is None or (m.force and not old.force):
                per_cfg[m.impl] = m
    return [m for per_cfg in order.values() for m in per_cfg.values()]


# --------------------------------------------------------------------------- implementations

def _torch():
    """torch, or None where it cannot be imported (`_torch_missing` says why)."""
    return None if _torch_missing() else __import__("torch")


@functools.lru_cache(maxsize=None)
def _torch_missing() -> str | None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            return "torch is not installed (pip install 'mlx_flash[bench]')"
        return f"torch does not import: {exc}"
    except Exception as exc:  # a broken install must not stop the other measurements
        return f"torch does not import: {type(exc).__name__}: {exc}"
    return None


class Inputs:
    """q, k, v and the output cotangent for one config, in MLX and (if present) torch."""

    def __init__(self, cfg: Config, seed: int = 0):
        import mlx.core as mx

        rng = np.random.default_rng(seed)
        shape = (cfg.B, cfg.H, cfg.N, cfg.D)
        arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
        mx_dtype = {"fp32": mx.float32, "bf16": mx.bfloat16}[cfg.dtype]
        self.mx = [mx.array(a).astype(mx_dtype) for a in arrays]
        mx.eval(self.mx)
        self.torch = None
        torch = _torch()
        if torch is not None:
            t_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
            self.torch = [torch.from_numpy(a).to(t_dtype) for a in arrays]
        self.bytes_per_tensor = self.mx[0].nbytes


def _mlx_runner(cfg: Config, inputs: Inputs, attention, keep: dict):
    """A blocking call of `attention(q, k, v)` (forward, or forward + vjp)."""
    import mlx.core as mx

    q, k, v, dout = inputs.mx
    if cfg.mode == "fwd":
        def run():
            out = attention(q, k, v)
            mx.eval(out)
            keep["out"] = out
    else:
        def run():
            out, grads = mx.vjp(lambda q, k, v: attention(q, k, v), [q, k, v], [dout])
            mx.eval(out, grads)
    return run


def make_runner(cfg: Config, impl: str, inputs: Inputs, keep: dict):
    """The blocking call to time, and how its memory is measured (None: not measured)."""
    import mlx.core as mx

    scale = 1.0 / float(np.sqrt(cfg.D))
    cpu = mx.Device(mx.cpu)
    if impl == "mlx_flash":
        from mlx_flash import flash_attention

        fn = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=cfg.causal, stream=cpu)
        return _mlx_runner(cfg, inputs, fn, keep), "mlx"
    if impl == "mx_fast_sdpa":
        mask = "causal" if cfg.causal else None
        fn = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=cpu)
        return _mlx_runner(cfg, inputs, fn, keep), "mlx"
    if impl == "torch_sdpa":
        torch = _torch()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv, tdout = inputs.torch
        if cfg.mode == "fwd":
            def run():
                with torch.inference_mode():
                    keep["out"] = sdpa(tq, tk, tv, is_causal=cfg.causal, scale=scale)
        else:
            leaves = [t.detach().requires_grad_(True) for t in (tq, tk, tv)]

            def run():
                for t in leaves:
                    t.grad = None
                out = sdpa(*leaves, is_causal=cfg.causal, scale=scale)
                out.backward(tdout)
        return run, "rss" if common.rss_peak_supported() else None
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def skip_reason(m: Measurement, mx_fast_max_n: int, disabled: set) -> str | None:
    if m.impl in disabled:
        return f"{m.impl} disabled on the command line"
    if m.impl == "torch_sdpa" and _torch_missing():
        return _torch_missing()
    if m.impl == "mx_fast_sdpa" and not m.force and m.config.N > mx_fast_max_n:
        return (f"N > {mx_fast_max_n}: mx.fast SDPA on the CPU materialises the N x N scores through "
                f"MLX's reference BLAS (~50x slower); raise --mx-fast-max-n to measure it")
    return None


def measure_config(measurements: list[Measurement], inputs: Inputs, policy: common.TimingPolicy,
                   keep_by_impl: dict) -> dict:
    """Time every implementation of one config in interleaved rounds: {impl: record}."""
    calls, warmups, mem_kinds, records = {}, {}, {}, {}
    for m in measurements:
        keep = keep_by_impl.setdefault(m.impl, {})
        try:
            run, mem_kind = make_runner(m.config, m.impl, inputs, keep)
        except Exception as exc:
            records[m.impl] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        calls[m.impl], mem_kinds[m.impl] = run, mem_kind
        warmups[m.impl] = {"mlx": common.mlx_extra_peak, "rss": common.rss_extra_peak}.get(mem_kind, lambda f: f)(run)
    timings = common.time_interleaved(calls, policy, warmups)
    for m in measurements:
        if m.impl in records:
            continue
        timing = timings[m.impl]
        if isinstance(timing, Exception):
            records[m.impl] = {"status": "error", "reason": f"{type(timing).__name__}: {timing}"}
            continue
        rec = {"status": "ok", **timing, "gflops": m.config.flops / timing["time_s"] / 1e9,
               "loadavg_1min": round(os.getloadavg()[0], 2)}
        mem = getattr(warmups[m.impl], "result", None)
        if mem:
            rec["memory"] = {**mem, "method": mem_kinds[m.impl]}
        if m.force:
            rec["forced_beyond_cap"] = True
        records[m.impl] = rec
    return records


def measure(m: Measurement, inputs: Inputs, policy: common.TimingPolicy, keep: dict) -> dict:
    """One implementation alone (see measure_config)."""
    keep_by_impl = {m.impl: keep}
    return measure_config([m], inputs, policy, keep_by_impl)[m.impl]


# --------------------------------------------------------------------------- results document

def new_document(args_dict: dict, policy: common.TimingPolicy) -> dict:
    return {
        "schema": SCHEMA,
        "created": common.now_iso(),
        "updated": common.now_iso(),
        "machine": common.machine_info(),
        "gemm": None,
        "settings": {
            "timing": policy.as_dict(),
            "timing_rule": common.TIMING_RULE,
            "mx_fast_max_n": args_dict.get("mx_fast_max_n"),
            "flop_counting": FLOP_COUNTING,
            "backward_flop_factor": BACKWARD_FLOP_FACTOR,
            "memory_methods": {"mlx": common.MLX_MEMORY_METHOD, "rss": common.RSS_MEMORY_METHOD},
            "inputs": "standard normal q, k, v and output cotangent (numpy seed 0), cast to the dtype; scale 1/sqrt(D)",
            "fwdbwd": "mlx_flash / mx.fast: mx.vjp with a random cotangent, outputs and grads evaluated; "
                      "torch: sdpa then out.backward(cotangent) through autograd",
            "command": " ".join(sys.argv),
        },
        "notes": [
            "Both cores of the 2-core machine are shared with other work during runs: timings are noisy.",
            "speedup.<anchor> = anchor time / mlx_flash time (> 1 means mlx_flash is faster).",
            "gemm_fraction = mlx_flash GFLOP/s / the best numpy fp32 GEMM GFLOP/s of the same run "
            "(measured at its start and its end; gemm_runs has both).",
        ],
        "results": {},
    }


def summarize_entry(entry: dict, gemm_gflops: float | None) -> None:
    """Fill speedups over each anchor and the fraction of the GEMM rate."""
    impls = entry["impls"]
    ours = impls.get("mlx_flash", {})
    entry["speedup"] = {}
    if ours.get("status") == "ok":
        for anchor in ANCHORS:
            rec = impls.get(anchor, {})
            if rec.get("status") == "ok":
                entry["speedup"][anchor] = rec["time_s"] / ours["time_s"]
        if gemm_gflops:
            entry["gemm_fraction"] = ours["gflops"] / gemm_gflops


def record(doc: dict, m: Measurement, rec: dict) -> None:
    entry = doc["results"].setdefault(m.config.key, {
        "config": dataclasses.asdict(m.config), "flops": m.config.flops, "impls": {}})
    entry["impls"][m.impl] = rec
    gemm = doc.get("gemm") or {}
    summarize_entry(entry, gemm.get("best_gflops"))
    doc["updated"] = common.now_iso()


def done(doc: dict, m: Measurement) -> bool:
    rec = doc["results"].get(m.config.key, {}).get("impls", {}).get(m.impl)
    return bool(rec) and rec.get("status") == "ok"


def _compare_forward(doc: dict, cfg: Config, keep_by_impl: dict) -> None:
    """Sanity check: mlx_flash's forward output against torch's (max abs difference)."""
    ours, theirs = keep_by_impl.get("mlx_flash"), keep_by_impl.get("torch_sdpa")
    if ours is None or theirs is None:
        return
    import mlx.core as mx

    a = np.array(ours.astype(mx.float32))
    b = theirs.float().numpy()
    doc["results"][cfg.key]["max_abs_diff_vs_torch"] = float(np.max(np.abs(a - b)))


# --------------------------------------------------------------------------- targets

def _entry(doc, cfg: Config):
    return doc["results"].get(cfg.key)


def _target(name, requirement, ratio, threshold, higher_is_better=True, detail=""):
    if ratio is None:
        status = "not measured"
    else:
        status = "met" if (ratio >= threshold if higher_is_better else ratio <= threshold) else "missed"
    return {"target": name, "requirement": requirement, "ratio": ratio, "threshold": threshold,
            "status": status, "detail": detail}


def check_targets(doc: dict) -> list[dict]:
    """The CPU performance targets (speed against torch SDPA, mx.fast SDPA and the GEMM rate;
    peak memory; the longest run completing), each met / missed / not measured, with the measured ratio."""
    out = []
    for mode, need in (("fwd", 1.2), ("fwdbwd", 1.0)):
        for c in TARGET_SPEED_CONFIGS:
            cfg = Config(mode, "fp32", **c)
            e = _entry(doc, cfg) or {}
            ratio = e.get("speedup", {}).get("torch_sdpa")
            detail = ""
            if ratio is not None:
                detail = (f"mlx_flash {common.fmt_time(e['impls']['mlx_flash']['time_s'])}, "
                          f"torch {common.fmt_time(e['impls']['torch_sdpa']['time_s'])}")
            out.append(_target(f"{cfg.label} vs torch SDPA", f">= {need}x torch", ratio, need, detail=detail))
    gemm = doc.get("gemm") or {}
    for key, e in sorted(doc["results"].items(), key=lambda kv: (kv[1]["config"]["D"], kv[1]["config"]["causal"], kv[1]["config"]["N"])):
        cfg = Config.from_dict(e["config"])
        if cfg.mode == "fwd" and cfg.dtype == "fp32" and cfg.N >= 4096 and "mlx_flash" in e["impls"]:
            frac = e.get("gemm_fraction")
            detail = ""
            if frac is not None:
                detail = f"{e['impls']['mlx_flash']['gflops']:.1f} GFLOP/s of {gemm.get('best_gflops', 0):.1f} (numpy GEMM)"
            out.append(_target(f"{cfg.label} vs GEMM rate", ">= 0.60 of fp32 GEMM", frac, 0.60, detail=detail))
    for c in TARGET_SPEED_CONFIGS:
        cfg = Config("fwd", "fp32", **c)
        e = _entry(doc, cfg) or {}
        ratio = e.get("speedup", {}).get("mx_fast_sdpa")
        detail = ""
        if ratio is not None:
            detail = f"mx.fast {common.fmt_time(e['impls']['mx_fast_sdpa']['time_s'])}"
        out.append(_target(f"{cfg.label} vs mx.fast SDPA", ">= 30x mx.fast (CPU)", ratio, 30.0, detail=detail))
    # Extra peak memory of forward+backward against the bytes it must hold.
    cfg = TARGET_MEMORY_CONFIG
    e = _entry(doc, cfg) or {}
    rec = e.get("impls", {}).get("mlx_flash", {})
    ratio = detail = None
    if rec.get("status") == "ok" and "memory" in rec:
        elem = 4 if cfg.dtype == "fp32" else 2
        tensor = cfg.B * cfg.H * cfg.N * cfg.D * elem
        lse = cfg.B * cfg.H * cfg.N * 4
        needed = 7 * tensor + lse  # q, k, v, out, dq, dk, dv + lse
        ratio = rec["memory"]["extra_peak_bytes"] / needed
        detail = (f"extra peak {common.fmt_bytes(rec['memory']['extra_peak_bytes'])} vs "
                  f"q,k,v,out,lse,dq,dk,dv {common.fmt_bytes(needed)}")
    out.append(_target(f"{cfg.label} extra peak memory", "<= 1.5x bytes of q,k,v,out,lse,dq,dk,dv",
                       ratio, 1.5, higher_is_better=False, detail=detail or ""))
    cfg = TARGET_LONG_CONFIG
    e = _entry(doc, cfg) or {}
    rec = e.get("impls", {}).get("mlx_flash", {})
    if rec.get("status") == "ok":
        mem = rec.get("memory", {}).get("extra_peak_bytes")
        out.append({"target": f"{cfg.label} completes", "requirement": "completes", "ratio": None,
                    "threshold": None, "status": "met",
                    "detail": f"{common.fmt_time(rec['time_s'])}, extra peak {common.fmt_bytes(mem)}"})
    else:
        out.append({"target": f"{cfg.label} completes", "requirement": "completes", "ratio": None,
                    "threshold": None, "status": "not measured" if not rec else "missed",
                    "detail": rec.get("reason", "")})
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["CPU performance targets (docs/performance_cpu.md):"]
    for t in targets:
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.3g}"
        lines.append(f"  [{t['status']:>12s}] {t['target']:60s} {t['requirement']:42s} {ratio:>7s}  {t['detail']}")
    counts = {s: sum(t["status"] == s for t in targets) for s in ("met", "missed", "not measured")}
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


def format_markdown(doc: dict) -> str:
    """A Markdown table of every config (for docs/performance_cpu.md)."""
    def cell(rec):
        if not rec:
            return "-"
        if rec.get("status") != "ok":
            return rec.get("status", "-")
        return f"{common.fmt_time(rec['time_s'])} ({rec['gflops']:.1f})"

    gemm = (doc.get("gemm") or {}).get("best_gflops")
    lines = [
        f"Machine: {doc['machine'].get('cpu_model')}, {doc['machine'].get('usable_cores')} cores, "
        f"kernel ISA {doc['machine'].get('mlx_flash_cpu_kernel_isa')}, mlx {doc['machine'].get('mlx')}, "
        f"torch {doc['machine'].get('torch')}; numpy fp32 GEMM {gemm and round(gemm, 1)} GFLOP/s; {doc.get('created')}.",
        "",
        "| mode | dtype | mask | B,H,N,D | mlx_flash (GFLOP/s) | torch SDPA | speedup | mx.fast SDPA | speedup "
        "| of GEMM | mlx_flash extra peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = sorted(doc["results"].values(), key=lambda e: (
        e["config"]["mode"], e["config"]["dtype"], e["config"]["D"], e["config"]["causal"], e["config"]["N"]))
    for e in entries:
        c, impls, sp = e["config"], e["impls"], e.get("speedup", {})
        ours = impls.get("mlx_flash") or {}
        mem = (ours.get("memory") or {}).get("extra_peak_bytes")
        frac = e.get("gemm_fraction")
        torch_sp = f"{sp['torch_sdpa']:.2f}x" if "torch_sdpa" in sp else "-"
        fast_sp = f"{sp['mx_fast_sdpa']:.1f}x" if "mx_fast_sdpa" in sp else "-"
        of_gemm = f"{frac:.0%}" if frac is not None and c["dtype"] == "fp32" else "-"
        shape = f"{c['B']},{c['H']},{c['N']},{c['D']}"
        lines.append(f"| {c['mode']} | {c['dtype']} | {'causal' if c['causal'] else 'full'} | {shape} "
                     f"| {cell(ours)} | {cell(impls.get('torch_sdpa'))} | {torch_sp} "
                     f"| {cell(impls.get('mx_fast_sdpa'))} | {fast_sp} | {of_gemm} | {common.fmt_bytes(mem)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver

def _describe(rec: dict, impl: str, entry: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {rec.get('reason', '')}"
    text = f"{common.fmt_time(rec['time_s'])} {rec['gflops']:.1f} GFLOP/s ({rec['repeats']} samples)"
    mem = rec.get("memory", {}).get("extra_peak_bytes")
    if mem is not None:
        text += f", +{common.fmt_bytes(mem)}"
    if impl in entry.get("speedup", {}):
        text += f"; mlx_flash {entry['speedup'][impl]:.2f}x"
    return text


def run_plan(doc: dict, plan: list[Measurement], policy: common.TimingPolicy, out_path: Path,
             mx_fast_max_n: int, disabled: set, progress: common.Progress) -> None:
    by_config: dict[str, list[Measurement]] = {}
    for m in plan:
        by_config.setdefault(m.config.key, []).append(m)
    for measurements in by_config.values():
        cfg = measurements[0].config
        todo = [m for m in measurements if not done(doc, m)]
        for m in measurements:
            if m not in todo:
                progress.end(f"{cfg.label} | {m.impl}", "kept from --resume")
        if not todo:
            continue
        inputs = Inputs(cfg)
        keep_by_impl = {}
        runnable = []
        for m in todo:
            reason = skip_reason(m, mx_fast_max_n, disabled)
            if reason:
                record(doc, m, {"status": "skipped", "reason": reason})
                progress.end(f"{cfg.label} | {m.impl}", f"skipped: {reason}")
            else:
                runnable.append(m)
        if runnable:
            progress.begin(f"{cfg.label} | {', '.join(m.impl for m in runnable)}")
            records = measure_config(runnable, inputs, policy, keep_by_impl)
            for m in runnable:
                record(doc, m, records[m.impl])
            for m in runnable:
                progress.end(f"{cfg.label} | {m.impl}", _describe(records[m.impl], m.impl, doc["results"][cfg.key]))
            common.write_json(out_path, doc)
        if cfg.mode == "fwd":
            _compare_forward(doc, cfg, {impl: keep.get("out") for impl, keep in keep_by_impl.items()})
        del inputs, keep_by_impl
        gc.collect()
        import mlx.core as mx

        mx.clear_cache()  # hand freed buffers back, so the next config's RSS baseline is honest
        common.write_json(out_path, doc)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _str_list(choices):
    def parse(text: str) -> list[str]:
        items = [x for x in text.replace(",", " ").split()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {', '.join(bad)}")
        return items
    return parse


def _causal_list(text: str) -> list[bool]:
    table = {"yes": [True], "no": [False], "both": [False, True], "true": [True], "false": [False],
             "1": [True], "0": [False]}
    out = []
    for x in text.replace(",", " ").split():
        if x.lower() not in table:
            raise argparse.ArgumentTypeError(f"expected yes, no or both, got {x!r}")
        out += [c for c in table[x.lower()] if c not in out]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench",
        description="CPU attention benchmark: mlx_flash beside torch SDPA and mx.fast SDPA and against the "
                    "machine's fp32 GEMM rate, with the performance targets (--check-targets).")
    p.add_argument("--quick", action="store_true", help=f"small sweep: N {QUICK_N}, D 64, fp32, 1 s budget")
    p.add_argument("--n", type=_int_list, help=f"sequence lengths (default {' '.join(map(str, SWEEP_N))})")
    p.add_argument("--d", type=_int_list, help="head dims (default 64 128)")
    p.add_argument("--heads", type=int, help="heads for every D (default H8 for D64, H4 for D128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", type=_str_list(DTYPES), help="fp32, bf16 (default both)")
    p.add_argument("--mode", type=_str_list(MODES), help="fwd, fwdbwd (default both)")
    p.add_argument("--causal", type=_causal_list, help="yes, no or both (default both)")
    p.add_argument("--impl", type=_str_list(IMPLS), help=f"implementations to run (default {' '.join(IMPLS)})")
    p.add_argument("--mx-fast-max-n", type=int, default=MX_FAST_MAX_N,
                   help="largest N for the mx.fast anchor in the sweep (the targets still run it at 4096)")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--only-targets", action="store_true",
                         help="measure only the target configs: fp32 fwd and fwd+bwd at B1 H8 N4096 D64 (full, "
                              "causal) and B1 H4 N4096 D128, fwd+bwd memory at B1 H8 N16384 D64, "
                              "causal fwd+bwd at B1 H4 N65536 D64 (~10 min on 2 cores)")
    targets.add_argument("--with-targets", action="store_true",
                         help="add the target configs to a subset sweep (default when no subset flag is given)")
    targets.add_argument("--no-targets", action="store_true", help="never add the target configs")
    p.add_argument("--check-targets", action="store_true", help="print each target as met / missed")
    p.add_argument("--from", dest="from_path", type=Path,
                   help="read this results JSON instead of measuring (with --check-targets and/or --plots)")
    p.add_argument("--markdown", action="store_true", help="with --from: print the results as a Markdown table")
    p.add_argument("--out", type=Path,
                   help="results JSON (default ./cpu_attention_<date>.json in the current directory; "
                        "./cpu_targets_<date>.json with --only-targets)")
    p.add_argument("--resume", action="store_true", help="keep measurements already in --out and run the rest")
    p.add_argument("--budget", type=float,
                   help="seconds of repeats per measurement (default 3; --quick 1; --only-targets 8)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=10)
    p.add_argument("--long-call", type=float,
                   help="a warm-up longer than this many seconds is the only sample (default 3; --only-targets 12)")
    p.add_argument("--no-gemm", action="store_true", help="skip the numpy GEMM ceiling")
    p.add_argument("--plots", dest="plots", action="store_true", default=None, help="write PNG plots")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--plots-dir", type=Path, default=Path("."),
                   help="where the PNG plots go (default the current directory)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def plan_from_args(args) -> list[Measurement]:
    subset = any(x is not None for x in (args.n, args.d, args.dtype, args.mode, args.causal, args.heads)) or args.quick
    if args.only_targets:
        return targets_plan()
    ns = args.n or (QUICK_N if args.quick else SWEEP_N)
    ds = args.d or ((64,) if args.quick else SWEEP_D)
    dtypes = args.dtype or (("fp32",) if args.quick else DTYPES)
    modes = args.mode or MODES
    causals = args.causal or [False, True]
    plan = sweep_plan(ns, ds, dtypes, modes, causals, batch=args.batch, heads=args.heads)
    if args.with_targets or (not subset and not args.no_targets):
        plan = merge_plans(targets_plan(), plan)  # targets first: they matter most if a run is cut short
    if args.impl:
        plan = [m for m in plan if m.impl in args.impl]
    return plan


def default_out(only_targets: bool) -> Path:
    """In the current directory: never into an installed package or over a checkout's
    committed results (those are updated by passing --out explicitly)."""
    stem = "cpu_targets" if only_targets else "cpu_attention"
    return Path(f"{stem}_{common.today()}.json")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_path is not None:
        doc = common.read_json(args.from_path)
        if doc.get("schema") != SCHEMA:
            print(f"--from: expected a {SCHEMA} document, got schema {doc.get('schema')!r}", file=sys.stderr)
            return 2
        if args.plots:
            _write_plots(doc, args.plots_dir)
        if args.markdown:
            print(format_markdown(doc))
        if args.check_targets or not (args.plots or args.markdown):
            print(format_targets(check_targets(doc)))
        return 0

    # The targets are few and decide met / missed: they get more samples by default.
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 8.0 if args.only_targets else 3.0)
    long_call = args.long_call if args.long_call is not None else (12.0 if args.only_targets else 3.0)
    policy = common.TimingPolicy(budget_s=budget, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                                 long_call_s=long_call)
    out_path = args.out if args.out is not None else default_out(args.only_targets)
    plan = plan_from_args(args)
    doc = None
    if args.resume and out_path.exists():
        doc = common.read_json(out_path)
        if doc.get("schema") != SCHEMA:
            print(f"--resume: {out_path} is not a {SCHEMA} document", file=sys.stderr)
            return 2
        doc["settings"].setdefault("resumed", []).append({"at": common.now_iso(), "command": " ".join(sys.argv)})
    if doc is None:
        doc = new_document(vars(args), policy)

    progress = common.Progress(len(plan) + (0 if args.no_gemm else 2), enabled=not args.quiet)
    if not args.no_gemm:
        _gemm_ceiling(doc, progress, "start")
        common.write_json(out_path, doc)

    disabled = set(IMPLS) - set(args.impl) if args.impl else set()
    run_plan(doc, plan, policy, out_path, args.mx_fast_max_n, disabled, progress)
    if not args.no_gemm:
        _gemm_ceiling(doc, progress, "end")

    targets = check_targets(doc)
    doc["targets"] = targets
    common.write_json(out_path, doc)
    progress.note(f"results: {out_path}")
    if args.plots or (args.plots is None and args.out is None and not args.only_targets):
        _write_plots(doc, args.plots_dir)
    if args.check_targets:
        print(format_targets(targets))
    return 0


def _gemm_ceiling(doc: dict, progress: common.Progress, when: str) -> None:
    """Measure the GEMM ceiling (at the start and the end of a run: the load of a shared
    machine moves it) and keep the best run as doc["gemm"]; every run is in doc["gemm_runs"]."""
    label = f"numpy fp32 GEMM ceiling ({when} of run)"
    progress.begin(label)
    g = common.measure_gemm()
    g["when"] = when
    g["at"] = common.now_iso()
    runs = doc.setdefault("gemm_runs", [])
    if not runs and (doc.get("gemm") or {}).get("status") == "ok":
        runs.append(doc["gemm"])  # a document from before gemm_runs existed
    runs.append(g)
    ok = [r for r in runs if r.get("status") == "ok"]
    doc["gemm"] = max(ok, key=lambda r: r["best_gflops"]) if ok else g
    progress.end(label, f"{g['best_gflops']:.1f} GFLOP/s at {g['best_size']}" if g["status"] == "ok" else g["reason"])
    for entry in doc["results"].values():
        summarize_entry(entry, (doc.get("gemm") or {}).get("best_gflops"))


def _write_plots(doc: dict, plots_dir: Path) -> None:
    from . import plots

    try:
        paths = plots.write_cpu_attention_plots(doc, plots_dir)
    except ImportError as exc:
        print(f"plots skipped: {exc} (pip install 'mlx_flash[plots]')", file=sys.stderr)
        return
    for p in paths:
        print(f"plot: {p}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
