"""Shared test utilities: fresh random inputs, dtype-aware comparisons."""

from __future__ import annotations

import os
import zlib

import mlx.core as mx
import numpy as np

import mlx_flash
from mlx_flash import reference
from mlx_flash._spec import validate_attention


def _base_seed() -> int:
    """A new base seed every session (printed in pytest's header, its summary
    and each failure's report); MLX_FLASH_TEST_SEED=<n> replays one."""
    given = os.environ.get("MLX_FLASH_TEST_SEED")
    if given is None:
        return int(np.random.SeedSequence().entropy % 2**31)
    try:
        return int(given)
    except ValueError:
        raise ValueError(f"MLX_FLASH_TEST_SEED must be a non-negative integer, got {given!r}") from None


BASE_SEED = _base_seed()

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def rng(*key) -> np.random.Generator:
    """A generator seeded by the session seed and a per-case key."""
    return np.random.default_rng([BASE_SEED, zlib.crc32(repr(key).encode())])


def randn(gen, shape, dtype=mx.float32, scale=1.0) -> mx.array:
    return mx.array((gen.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=mx.float32, scale=1.0):
    Dv = D if Dv is None else Dv
    return (randn(gen, (B, Hq, Nq, D), dtype, scale), randn(gen, (B, Hkv, Nk, D), dtype, scale),
            randn(gen, (B, Hkv, Nk, Dv), dtype))


def to_np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32)) if x.dtype not in (mx.bool_,) else np.array(x)


def rel_error(got, want, floor=0.1) -> float:
    """max |got - want| / max(max |want|, floor) over finite entries; inf
    entries must match exactly. The floor keeps a result that is zero in exact
    arithmetic (e.g. dq with a single key) from turning rounding noise into a
    huge relative error; test inputs are O(1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    inf = ~np.isfinite(want)
    assert np.array_equal(got[inf], want[inf]), "non-finite entries differ"
    assert np.all(np.isfinite(got[~inf])), "unexpected NaN/inf in result"
    if not (~inf).any():
        return 0.0
    denom = max(np.abs(want[~inf]).max(), floor)
    return float(np.abs(got[~inf] - want[~inf]).max() / denom)


# fp32 results must be well under 1e-4 relative.
FP32_TOL = {"out": 2e-5, "lse": 2e-6, "dq": 5e-5, "dk": 5e-5, "dv": 5e-5, "dsinks": 5e-5, "dmask": 5e-5}


def plain_errors(q, k, v, dout, options, dtype):
    """Errors of the plain materialised computation in `dtype` vs float64:
    the yardstick for fp16/bf16 (ours may be at most twice as far off)."""
    from reference_np import attention_np

    spec, inputs = validate_attention(q, k, v, **options)

    def f(q, k, v):
        out, _ = reference.attention_dense(q, k, v, spec, inputs, dtype=dtype)
        return out

    (out,), vjps = mx.vjp(f, [q, k, v], [dout])
    want = attention_np(q, k, v, dout=dout, **options)
    errs = {"out": reference_error("out", to_np(out), want)}
    for name, g in zip(("dq", "dk", "dv"), vjps):
        errs[name] = reference_error(name, to_np(g), want)
    return errs


def reference_error(name, got, want):
    """rel_error against reference_np's result dict (or a bare array), scaled by
    the "mag_<name>" sums of absolute terms where the reference has them."""
    mag = None
    if isinstance(want, dict):
        mag = want.get("mag_" + name)
        want = want[name]
    if mag is None and name == "lse":
        # lse is a sum of O(1) logits (q.k, mask, ALiBi) that can cancel to
        # near 0: its error scales with those terms, not with its value
        # (seed 1970057176: lse -0.095 from one key plus an additive mask).
        return rel_error(got, want, floor=1.0)
    return rel_error(got, want) if mag is None else rel_error(got, want, floor=max(float(np.max(mag, initial=0.0)), 1e-6))


def check_close(name, got, want, dtype, plain=None):
    """Assert `got` matches the float64 reference for this dtype's tolerance.

    `want` is the reference array, or the dict from reference_np: then its
    "mag_<name>" (the sum over absolute terms) sets the error's scale, so a
    result that cancels to ~0 is judged against the size of what cancelled.
    """
    err = reference_error(name, got, want)
    if dtype == mx.float32:
        tol = FP32_TOL[name]
        if plain and name in plain:  # ill-conditioned cases: fp32's own rounding dominates
            tol = max(tol, 2 * plain[name])
    else:
        # Twice the plain computation's error, with a floor of a few ulps of
        # the dtype so an exact plain result does not demand exactness.
        eps = 2.0**-10 if dtype == mx.float16 else 2.0**-7
        tol = max(2 * plain[name] if plain and name in plain else 0.0, 2 * eps)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({dtype})"
    return err


def is_emulated(backend: str) -> bool:
    return backend == "metal_emu"


def run_tests_under_cpu_isa(isa: str, body: str, timeout: int) -> None:
    """Runs `body` (Python calling test functions of tests/) in a fresh process
    whose CPU kernels are capped at `isa` by MLX_FLASH_CPU_ISA: the variant is
    chosen once per process, so another variant needs its own process. Skips
    avx2 off x86-64; fails with the process's stderr unless `body` ran through."""
    import pathlib
    import platform
    import subprocess
    import sys

    import pytest

    if isa == "avx2" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("avx2 variant exists on x86-64 only")
    code = (
        f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        f"from mlx_flash import _ext; assert _ext.cpu_kernel_isa() == {isa!r}, _ext.cpu_kernel_isa()\n"
        + body + "print('ok')\n"
    )
    env = dict(os.environ, MLX_FLASH_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
