"""Non-finite inputs (the contract of issue 13), forward and gradients, on every backend.

Each case plants NaN or inf somewhere a row reads (q row, a kept key or
value, the additive mask, a sink, an ALiBi slope, dO) or somewhere rows must
not read (keys dropped by a bool mask, causal, a window, a block mask, the
next packed sequence), and compares elementwise with the float64 reference
(tests/reference_np.py), which implements the contract: where it is NaN the
op must be NaN, where it is +-inf the same inf, elsewhere finite and within
the usual tolerance. Every case also checks that its reference result holds
the pattern the case is about, so a case cannot pass vacuously.
"""

import mlx.core as mx
import numpy as np
import pytest

from helpers import DTYPES, check_close, is_emulated, plain_errors, randn, rng, run_tests_under_cpu_isa, to_np
from reference_np import attention_np, attention_varlen_np

import backends

NAN, INF = np.nan, np.inf
# (B, Hq, Hkv, Nq, Nk, D): tiny for the Metal emulator; "large" spans several
# 256-key CPU tiles and partial (diagonal) tiles, Nq != Nk.
SIZES = {"small": (1, 4, 2, 21, 29, 16), "large": (1, 4, 2, 150, 530, 32)}


def _np_qkv(gen, size):
    B, Hq, Hkv, Nq, Nk, D = SIZES[size]
    return (gen.standard_normal((B, Hq, Nq, D)), gen.standard_normal((B, Hkv, Nk, D)),
            gen.standard_normal((B, Hkv, Nk, D)))


def _bool_keep(gen, shape, p=0.8):
    return gen.random(shape) < p


# Each case: (gen, size) -> dict(q, k, v (numpy), options, optional dout
# poison, wrt, expect). `expect` says what the reference must show:
# "mixed" (some NaN and some finite output rows), "finite" (no NaN at all).

def nan_q_row(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    keep = _bool_keep(gen, (Nq, Nk))
    keep[0] = False  # row 0 sees nothing: its NaN q must not matter
    q[0, 1, 5, 3] = NAN
    q[0, 2, 0, :] = NAN
    q[0, 3, 7, :] = INF
    return dict(q=q, k=k, v=v, options={"mask": keep, "causal": True}, expect="mixed",
                check=lambda w: np.all(w["out"][0, 2, 0] == 0) and np.isneginf(w["lse"][0, 2, 0]))


def nan_k_kept(gen, size):
    q, k, v = _np_qkv(gen, size)
    j = k.shape[2] - q.shape[2] + 10
    k[0, 0, j, 2] = NAN  # kept by the causal rows from query 10 on, of heads 0 and 1
    return dict(q=q, k=k, v=v, options={"causal": True}, expect="mixed")


def nan_v_kept(gen, size):
    q, k, v = _np_qkv(gen, size)
    j = k.shape[2] - q.shape[2] + 10
    v[0, 1, j, 3] = NAN  # only element 3 of the rows that keep key j becomes NaN
    return dict(q=q, k=k, v=v, options={"causal": True}, expect="mixed",
                check=lambda w: np.isfinite(w["out"][..., :3]).all())


def inf_k(gen, size):
    q, k, v = _np_qkv(gen, size)
    off = k.shape[2] - q.shape[2]
    k[0, 1, off + 7, 4] = INF   # +inf logit (row NaN) where q[..., 4] > 0, -inf (key dropped) where < 0
    k[0, 0, off + 3, :] = -INF  # all dims: mixed signs of q give NaN logits
    return dict(q=q, k=k, v=v, options={"window": (40, 3)}, expect="mixed")


def inf_k_softcap(gen, size):
    q, k, v = _np_qkv(gen, size)
    k[0, 1, k.shape[2] - q.shape[2] + 7, 4] = INF  # tanh(+-inf) = +-1: a finite logit, but dq meets 0 * inf
    return dict(q=q, k=k, v=v, options={"softcap": 3.0, "causal": True}, expect="finite")


def inf_v(gen, size):
    q, k, v = _np_qkv(gen, size)
    off = k.shape[2] - q.shape[2]
    v[0, 1, off + 7, 2] = INF
    v[0, 1, off + 9, 2] = -INF  # rows that keep both keys: inf - inf = NaN; only the first: +inf
    v[0, 0, off + 4, 5] = -INF
    return dict(q=q, k=k, v=v, options={"causal": True}, expect="finite",
                check=lambda w: np.isposinf(w["out"]).any() and np.isneginf(w["out"]).any()
                and np.isnan(w["out"]).any())


def nan_additive_mask(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    mask = gen.standard_normal((1, 1, Nq, Nk))
    mask[..., 3, 8] = NAN
    mask[..., 4, :] = -INF  # a row masked by -inf logits only: 0 / -inf
    mask[..., 5, 2] = INF   # a +inf logit: NaN row
    mask[..., 6, 1::2] = -INF
    return dict(q=q, k=k, v=v, options={"mask": mask.astype(np.float32)}, expect="mixed", wrt=("q", "k", "v", "mask"),
                check=lambda w: np.isneginf(w["lse"][..., 4]).all() and np.isnan(w["lse"][..., 5]).all())


def nan_sinks(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    sinks = gen.standard_normal(q.shape[1])
    sinks[1], sinks[2], sinks[3] = NAN, -INF, INF
    keep = _bool_keep(gen, (Nq, Nk))
    keep[2] = False  # no kept key: 0 / -inf with the -inf sink, NaN with the NaN one
    return dict(q=q, k=k, v=v, options={"sinks": sinks.astype(np.float32), "mask": keep}, expect="mixed",
                wrt=("q", "k", "v", "sinks"),
                check=lambda w: np.isneginf(w["lse"][0, 2, 2]) and np.isfinite(w["lse"][0, 0]).all())


def nan_alibi(gen, size):
    q, k, v = _np_qkv(gen, size)
    slopes = gen.uniform(0.05, 0.5, q.shape[1])
    slopes[0] = NAN
    return dict(q=q, k=k, v=v, options={"alibi_slopes": slopes.astype(np.float32), "causal": True}, expect="mixed")


def garbage_dropped_bool_mask(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    keep = _bool_keep(gen, (1, q.shape[1], Nq, Nk))
    keep[..., [2, 11]] = False  # keys 2 and 11 dropped by every row: their garbage must not leak
    keep[..., 5:9, 13] = False  # key 13 dropped by some rows only
    k[0, :, 2] = NAN
    v[0, :, 2, 1] = INF
    v[0, :, 11] = NAN
    k[0, :, 13, 0] = NAN
    v[0, :, 13, 1] = NAN
    return dict(q=q, k=k, v=v, options={"mask": keep}, expect="mixed")


def garbage_dropped_causal(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    j = Nk - Nq + 4  # seen only by query rows >= 4
    k[0, 0, j] = NAN
    v[0, 1, j + 1] = NAN
    v[0, 1, j + 2, 0] = INF
    return dict(q=q, k=k, v=v, options={"causal": True}, expect="mixed")


def garbage_dropped_window(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nk, off = k.shape[2], k.shape[2] - q.shape[2]
    k[0, 0, off + 3] = INF
    v[0, 1, off + 4] = NAN
    v[0, 1, Nk - 1, 2] = -INF
    return dict(q=q, k=k, v=v, options={"window": (5, 2)}, expect="mixed")


def garbage_dropped_block_mask(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq, Nk = q.shape[2], k.shape[2]
    bq, bk = 8, 16
    blocks = _bool_keep(gen, (1, 1, -(-Nq // bq), -(-Nk // bk)), 0.6)
    blocks[..., 1] = False
    blocks[..., 0, 0] = False
    blocks[..., 1, 0] = True
    k[0, 0, bk + 3] = NAN  # in a key block nobody keeps
    v[0, 1, 5] = NAN       # in key block 0: kept by some query blocks only
    return dict(q=q, k=k, v=v, options={"block_mask": blocks, "block_size": (bq, bk)}, expect="mixed")


def nan_dout(gen, size):
    q, k, v = _np_qkv(gen, size)
    Nq = q.shape[2]
    keep = _bool_keep(gen, (Nq, k.shape[2]))
    keep[1] = False
    dout = gen.standard_normal((q.shape[0], q.shape[1], Nq, v.shape[3]))
    dout[0, 0, 0, 2] = NAN  # row 0 keeps the first keys only (causal): dv/dk of later keys stay finite
    dout[0, 1, 1] = NAN     # a row with no kept key: nothing reaches any gradient
    return dict(q=q, k=k, v=v, options={"causal": True, "mask": keep}, dout=dout, expect="finite",
                check=lambda w: np.isnan(w["dv"]).any() and np.isfinite(w["dv"][0, 0, -1]).all())


CASES = {f.__name__: f for f in (
    nan_q_row, nan_k_kept, nan_v_kept, inf_k, inf_k_softcap, inf_v, nan_additive_mask, nan_sinks, nan_alibi,
    garbage_dropped_bool_mask, garbage_dropped_causal, garbage_dropped_window, garbage_dropped_block_mask, nan_dout,
)}


def _to_mx(x, dtype):
    if isinstance(x, np.ndarray):
        return mx.array(x) if x.dtype == np.bool_ else mx.array(x.astype(np.float32)).astype(dtype)
    return x


def _clean(x):
    """Same array with every non-finite entry replaced by a finite value: the
    yardstick problem for fp16/bf16 tolerances (the plain computation's
    rounding error depends on shapes and dtype, not on the planted values)."""
    if isinstance(x, np.ndarray) and x.dtype != np.bool_:
        return np.where(np.isfinite(x), x, 0.5)
    return x


def check_elementwise(name, got, want, dtype, plain=None):
    """NaN exactly where the reference is NaN, the same inf where it is inf,
    the usual tolerance (helpers.check_close) on the finite rest."""
    ref = want[name] if isinstance(want, dict) else want
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    nan_got, nan_ref = np.isnan(got), np.isnan(ref)
    if not np.array_equal(nan_got, nan_ref):
        extra, missing = np.argwhere(nan_got & ~nan_ref), np.argwhere(nan_ref & ~nan_got)
        raise AssertionError(f"{name}: NaN pattern differs: {len(extra)} unexpected NaN (first {extra[:3].tolist()}), "
                             f"{len(missing)} missing NaN (first {missing[:3].tolist()})")
    inf_ref = np.isinf(ref)
    assert np.array_equal(got[inf_ref], ref[inf_ref]), f"{name}: inf entries differ"
    assert np.isfinite(got[~nan_ref & ~inf_ref]).all(), f"{name}: inf where the reference is finite"
    fin = np.isfinite(ref)
    zeroed = {name: np.where(fin, ref, 0.0)}
    if isinstance(want, dict) and "mag_" + name in want:
        zeroed["mag_" + name] = want["mag_" + name]
    check_close(name, np.where(fin, got, 0.0), zeroed, dtype, plain)


def _build(case, size, dtype, seed_key):
    gen = rng("nonfinite", case, size, str(dtype), *seed_key)
    c = CASES[case](gen, size)
    q, k, v = (_to_mx(c[n], dtype) for n in "qkv")
    options = {}
    for name, x in c["options"].items():
        options[name] = _to_mx(x, mx.float32 if name in ("sinks", "alibi_slopes") else dtype)
    return c, gen, q, k, v, options


def _skip_emulated(backend, size):
    if is_emulated(backend) and size != "small":
        pytest.skip("large shapes are too slow under Metal emulation (covered on real devices)")


def _assert_expected(c, want):
    out = want["out"]
    if c["expect"] == "mixed":
        assert np.isnan(out).any() and np.isfinite(out).any(), "case must give some NaN and some finite rows"
    else:
        assert np.isfinite(want["lse"][~np.isneginf(want["lse"])]).all(), "case must keep every lse finite"
    if "check" in c:
        assert c["check"](want), "the reference does not show the case's pattern"


def _plain(c, q, k, v, dout, options, dtype):
    if dtype == mx.float32:
        return None
    clean = lambda x: _to_mx(_clean(np.array(x.astype(mx.float32)) if x.dtype != mx.bool_ else np.array(x)), x.dtype)
    opts = {n: clean(x) if isinstance(x, mx.array) else x for n, x in options.items()}
    return plain_errors(clean(q), clean(k), clean(v), clean(dout), opts, dtype)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_forward_and_gradients(backend, case, dtype, size):
    _skip_emulated(backend, size)
    dtype = DTYPES[dtype]
    c, gen, q, k, v, options = _build(case, size, dtype, ())
    out, lse = backends.forward(backend, q, k, v, **options)
    dout = _to_mx(np.asarray(c.get("dout", gen.standard_normal(out.shape))), dtype)
    want = attention_np(q, k, v, dout=dout, **options)
    _assert_expected(c, want)
    plain = _plain(c, q, k, v, dout, options, dtype)
    check_elementwise("out", to_np(out), want, dtype, plain)
    check_elementwise("lse", to_np(lse), want, mx.float32)
    assert out.dtype == dtype and lse.dtype == mx.float32

    wrt = c.get("wrt", ("q", "k", "v"))
    grads = backends.gradients(backend, q, k, v, dout, wrt=wrt, **options)
    for name in ("q", "k", "v"):
        check_elementwise("d" + name, to_np(grads[name]), want, dtype, plain)
    if "sinks" in wrt:
        check_elementwise("dsinks", to_np(grads["sinks"]), want, dtype, plain)
    if "mask" in wrt:
        full = want["dmask_full"]
        expected = full.sum(axis=tuple(a for a in range(4) if options["mask"].shape[a] == 1), keepdims=True)
        check_elementwise("dmask", to_np(grads["mask"]), expected, dtype if dtype == mx.float32 else mx.float32,
                          None if dtype == mx.float32 else {"dmask": 0.05})


def test_fully_masked_rows_with_nan_inputs_stay_zero(backend):
    """Masking is not a NaN: rows with no kept key are out 0, lse -inf and
    give zero gradients even when their q and dO rows are NaN."""
    gen = rng("nonfinite-masked-rows")
    B, H, Nq, Nk, D = 1, 2, 19, 13, 16
    q = gen.standard_normal((B, H, Nq, D))
    k, v = gen.standard_normal((B, H, Nk, D)), gen.standard_normal((B, H, Nk, D))
    q[:, :, :Nq - Nk] = NAN  # causal with Nq > Nk: these rows see no key
    q[:, :, 9] = NAN         # and row 9 is masked by the bool mask
    keep = np.ones((Nq, Nk), bool)
    keep[9] = False
    dout = gen.standard_normal((B, H, Nq, D))
    dout[:, :, :Nq - Nk] = NAN
    q, k, v, dout = (_to_mx(x, mx.float32) for x in (q, k, v, dout))
    options = {"causal": True, "mask": mx.array(keep)}
    out, lse = backends.forward(backend, q, k, v, **options)
    dead = list(range(Nq - Nk)) + [9]
    out, lse = to_np(out), to_np(lse)
    assert np.all(out[:, :, dead] == 0) and np.all(np.isneginf(lse[:, :, dead]))
    assert np.isfinite(out).all()
    grads = backends.gradients(backend, q, k, v, dout, **options)
    assert np.all(to_np(grads["q"])[:, :, dead] == 0)
    want = attention_np(q, k, v, dout=dout, **options)
    for name in "qkv":
        assert np.isfinite(to_np(grads[name])).all()
        check_close("d" + name, to_np(grads[name]), want, mx.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nonfinite_varlen(backend, dtype):
    """Packed sequences: garbage in one sequence's keys never reaches the next;
    a NaN q row poisons its own row only; a sequence with no keys stays 0."""
    dtype = DTYPES[dtype]
    gen = rng("nonfinite-varlen", str(dtype))
    lengths = [(5, 9), (3, 0), (17, 12), (9, 20)]
    H, Hkv, D = 4, 2, 16
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    q = gen.standard_normal((int(cu_q[-1]), H, D))
    k = gen.standard_normal((int(cu_k[-1]), Hkv, D))
    v = gen.standard_normal((int(cu_k[-1]), Hkv, D))
    k[3] = NAN             # sequence 0's keys: only sequence 0 may see them
    v[8, 1] = INF
    v[cu_k[2] + 2, 0, 1] = NAN  # sequence 2, key 2: the causal rows that keep it
    q[cu_q[1]] = NAN       # sequence 1 has no keys: stays 0 / -inf
    q[cu_q[3] + 4, 2] = NAN
    q, k, v = (_to_mx(x, dtype) for x in (q, k, v))
    options = {"causal": True}
    varlen = (mx.array(cu_q), mx.array(cu_k))
    out, lse = backends.forward(backend, q, k, v, varlen=varlen, **options)
    dout = _to_mx(gen.standard_normal(out.shape), dtype)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, dout=dout, **options)
    assert np.isnan(want["out"]).any() and np.isfinite(want["out"][cu_q[2]:cu_q[3]]).any()
    assert np.all(want["out"][cu_q[1]:cu_q[2]] == 0)
    plain = None
    if dtype != mx.float32:
        # The yardstick: the plain computation on one clean [1, H, N, D] problem of the largest sequence.
        cq, ck, cv = (_to_mx(gen.standard_normal(s), dtype) for s in ((1, H, 17, D), (1, Hkv, 20, D), (1, Hkv, 20, D)))
        plain = plain_errors(cq, ck, cv, _to_mx(gen.standard_normal((1, H, 17, D)), dtype), options, dtype)
    check_elementwise("out", to_np(out), want, dtype, plain)
    check_elementwise("lse", to_np(lse), want, mx.float32)
    grads = backends.gradients(backend, q, k, v, dout, varlen=varlen, **options)
    for name in "qkv":
        check_elementwise("d" + name, to_np(grads[name]), want, dtype, plain)


@pytest.mark.parametrize("case", ["garbage_dropped_bool_mask", "nan_v_kept", "nan_q_row", "nan_sinks"])
def test_nonfinite_decode_shapes(backend, case):
    """Few query rows against many keys (the CPU's decode path splits the keys)."""
    if is_emulated(backend):
        pytest.skip("long key sequences are too slow under Metal emulation (covered on real devices)")
    gen = rng("nonfinite-decode", case)
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 2, 700, 32
    q, k, v = gen.standard_normal((B, Hq, Nq, D)), gen.standard_normal((B, Hkv, Nk, D)), gen.standard_normal((B, Hkv, Nk, D))
    keep = _bool_keep(gen, (1, Hq, Nq, Nk))
    keep[..., [3, 400]] = False
    k[0, :, 3] = NAN
    v[0, :, 400] = NAN
    options = {"mask": mx.array(keep)}
    if case == "nan_v_kept":
        v[0, 1, 500, 4] = NAN
        keep[..., 500] = True
    elif case == "nan_q_row":
        q[0, 3, 1] = NAN
        q[0, 5, 0, 2] = INF
    elif case == "nan_sinks":
        options["sinks"] = mx.array(np.array([0.5, NAN, -INF, INF, 1, 2, 3, -1], np.float32))
    options["mask"] = mx.array(keep)
    q, k, v = (_to_mx(x, mx.float32) for x in (q, k, v))
    out, lse = backends.forward(backend, q, k, v, **options)
    want = attention_np(q, k, v, **options)
    assert np.isfinite(want["out"]).any()
    check_elementwise("out", to_np(out), want, mx.float32)
    check_elementwise("lse", to_np(lse), want, mx.float32)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_nonfinite_on_other_cpu_variants(isa):
    """The same contract from the kernels a CPU without AVX-512 (avx2) or
    without AVX2 (generic) runs, forced through MLX_FLASH_CPU_ISA."""
    run_tests_under_cpu_isa(isa, (
        "import test_attention_nonfinite as t\n"
        "for case in ('nan_q_row', 'inf_v', 'nan_sinks', 'garbage_dropped_bool_mask', 'nan_dout'):\n"
        "    for size in ('small', 'large'):\n"
        "        t.test_nonfinite_forward_and_gradients('cpu', case, 'float32', size)\n"
        "t.test_nonfinite_forward_and_gradients('cpu', 'nan_additive_mask', 'float16', 'small')\n"
        "t.test_nonfinite_varlen('cpu', 'bfloat16')\n"
        "t.test_nonfinite_decode_shapes('cpu', 'garbage_dropped_bool_mask')\n"
    ), timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_reference_follows_the_contract(case, cpu_default_device):
    """mlx_flash.reference (pure MLX, materialised) gives the float64
    reference's values and NaN/inf pattern on every case, varlen too."""
    from mlx_flash import reference

    c, gen, q, k, v, options = _build(case, "small", mx.float32, ("mlx-reference",))
    out, lse = reference.flash_attention(q, k, v, return_lse=True, **options)
    want = attention_np(q, k, v, **options)
    check_elementwise("out", to_np(out), want, mx.float32)
    check_elementwise("lse", to_np(lse), want, mx.float32)


def test_mlx_reference_varlen_follows_the_contract(cpu_default_device):
    from mlx_flash import reference

    gen = rng("nonfinite-mlx-reference-varlen")
    cu_q, cu_k = np.array([0, 5, 8, 25], np.int32), np.array([0, 9, 9, 21], np.int32)
    q, k, v = gen.standard_normal((25, 4, 16)), gen.standard_normal((21, 2, 16)), gen.standard_normal((21, 2, 16))
    k[3], v[12, 1, 2], q[6], q[10, 1] = NAN, INF, NAN, NAN
    q, k, v = (_to_mx(x, mx.float32) for x in (q, k, v))
    out, lse = reference.flash_attention_varlen(q, k, v, mx.array(cu_q), mx.array(cu_k), causal=True, return_lse=True)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, causal=True)
    assert np.isnan(want["out"]).any() and np.all(want["out"][5:8] == 0)
    check_elementwise("out", to_np(out), want, mx.float32)
    check_elementwise("lse", to_np(lse), want, mx.float32)
