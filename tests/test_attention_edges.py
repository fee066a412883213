"""Edge behaviour: fully masked rows, huge logits, strided inputs, varlen,
gradients of sinks / additive masks / lse, and mx.compile."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from features import FEATURES
from helpers import check_close, is_emulated, plain_errors, qkv, randn, rel_error, rng, to_np
from reference_np import attention_np, attention_varlen_np

import backends


def test_fully_masked_rows_give_zero_and_minus_inf(backend):
    """Rows that see no key: out 0, lse -inf, zero gradients, never NaN."""
    gen = rng("masked")
    B, H, Nq, Nk, D = 1, 2, 20, 12, 16
    q, k, v = qkv(gen, B, H, H, Nq, Nk, D)
    mask = np.ones((Nq, Nk), bool)
    mask[3] = False  # one row masked by the bool mask
    # causal with Nq > Nk: the first Nq - Nk rows see nothing as well.
    options = {"mask": mx.array(mask), "causal": True}
    out, lse = backends.forward(backend, q, k, v, **options)
    out, lse = to_np(out), to_np(lse)
    dead = [3] + list(range(Nq - Nk))
    assert np.all(out[:, :, dead] == 0) and np.all(np.isneginf(lse[:, :, dead]))
    assert np.isfinite(out).all()
    grads = backends.gradients(backend, q, k, v, randn(gen, out.shape), **options)
    assert np.all(to_np(grads["q"])[:, :, dead] == 0)
    for g in grads.values():
        assert np.isfinite(to_np(g)).all()


def test_window_that_sees_nothing(backend):
    gen = rng("empty-window")
    q, k, v = qkv(gen, 1, 1, 1, 8, 8, 16)
    # Keys j in [p - 0, p + 0] with p = i: itself only; with mask dropping the diagonal: nothing.
    options = {"window": (0, 0), "mask": mx.array(~np.eye(8, dtype=bool))}
    out, lse = backends.forward(backend, q, k, v, **options)
    assert np.all(to_np(out) == 0) and np.all(np.isneginf(to_np(lse)))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_large_logits_do_not_overflow(backend, dtype):
    gen = rng("large", str(dtype))
    q, k, v = qkv(gen, 1, 2, 2, 33, 47, 32, dtype=dtype, scale=30.0)  # logits ~ 1e3..1e4
    out, lse = backends.forward(backend, q, k, v)
    want = attention_np(q, k, v)
    assert np.isfinite(to_np(out)).all() and np.isfinite(to_np(lse)).all()
    plain = plain_errors(q, k, v, mx.ones(out.shape, dtype), {}, dtype)
    if dtype == mx.float32:
        # Logits of 1e3..1e4 make the output ill-conditioned: any fp32 kernel
        # rounds q . k with an error up to D * 2^-24 * sum_d |q_d k_d|, and the
        # softmax passes it on. "Twice the plain computation's error" compares
        # two summation orders of equal accuracy, which failed by chance for
        # 2 to 5 seeds in 40; the rounding bound is the honest yardstick
        # (docs/metal.md, "Accuracy at large logits").
        plain["out"] = max(plain["out"], logit_rounding_bound(q, k, v) / 2)
    check_close("out", to_np(out), want, dtype, plain)
    assert rel_error(to_np(lse), want["lse"]) < 1e-5


def logit_rounding_bound(q, k, v):
    """First-order bound on the relative output error that fp32 rounding of
    the logits s_ij = scale * q_i . k_j alone causes: |d out_i| <=
    sum_j p_ij |ds_ij| |v_j - out_i| with |ds_ij| <= D u scale sum_d |q_id k_jd|."""
    q, k, v = (np.asarray(to_np(x), np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1])
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    ds = q.shape[-1] * 2.0**-24 * np.einsum("bhid,bhjd->bhij", np.abs(q), np.abs(k)) * scale
    err = np.einsum("bhij,bhijd->bhid", p * ds, np.abs(v[:, :, None] - out[:, :, :, None]))
    return float(err.max() / max(np.abs(out).max(), 0.1))


def test_strided_inputs(backend):
    """Transposed and sliced views (mlx-lm's [B, N, H, D] -> [B, H, N, D] layout)."""
    gen = rng("strided")
    B, N, H, D = 2, 37, 4, 24
    q = randn(gen, (B, N, H, D)).transpose(0, 2, 1, 3)
    k = randn(gen, (B, N + 5, H, 2 * D))[..., ::2].transpose(0, 2, 1, 3)[:, :, 5:]
    v = randn(gen, (B, H, D, N)).swapaxes(-1, -2)
    options = {"causal": True}
    out, lse = backends.forward(backend, q, k, v, **options)
    dout = randn(gen, out.shape)
    want = attention_np(q, k, v, dout=dout, **options)
    check_close("out", to_np(out), want, mx.float32)
    grads = backends.gradients(backend, q, k, v, dout, **options)
    for name in "qkv":
        check_close("d" + name, to_np(grads[name]), want, mx.float32)


VARLEN_OPTIONS = {
    "none": {},
    "causal": {"causal": True},
    "window_softcap": {"window": (6, 2), "softcap": 4.0},
    "alibi_sinks": {"causal": True, "sinks": "sinks", "alibi_slopes": "alibi"},
}


@pytest.mark.parametrize("case", list(VARLEN_OPTIONS))
@pytest.mark.parametrize("lengths", [[(5, 9), (0, 4), (17, 17), (40, 23)], [(1, 1)], [(33, 70)]], ids=str)
def test_varlen_matches_per_sequence(backend, case, lengths):
    gen = rng("varlen", case, lengths)
    H, Hkv, D, Dv = 4, 2, 32, 16
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    q = randn(gen, (int(cu_q[-1]), H, D))
    k = randn(gen, (int(cu_k[-1]), Hkv, D))
    v = randn(gen, (int(cu_k[-1]), Hkv, Dv))
    options = dict(VARLEN_OPTIONS[case])
    if options.get("sinks"):
        options["sinks"] = randn(gen, (H,))
        options["alibi_slopes"] = mx.array(gen.uniform(0.05, 0.5, (len(lengths), H)), mx.float32)
    varlen = (mx.array(cu_q), mx.array(cu_k))
    out, lse = backends.forward(backend, q, k, v, varlen=varlen, **options)
    dout = randn(gen, out.shape)
    want = attention_varlen_np(q, k, v, cu_q, cu_k, dout=dout, **options)
    check_close("out", to_np(out), want, mx.float32)
    check_close("lse", to_np(lse), want, mx.float32)
    wrt = ("q", "k", "v", "sinks") if "sinks" in options else ("q", "k", "v")
    grads = backends.gradients(backend, q, k, v, dout, varlen=varlen, wrt=wrt, **options)
    for name in wrt:
        check_close("d" + name, to_np(grads[name]), want, mx.float32)


@pytest.mark.parametrize("feature", ["sinks", "combined_causal_softcap_alibi_sinks", "combined_mask_window_sinks"])
def test_sinks_gradient(backend, feature):
    gen = rng("dsinks", feature)
    B, H, Nq, Nk, D = 2, 3, 29, 41, 16
    q, k, v = qkv(gen, B, H, H, Nq, Nk, D)
    options = FEATURES[feature](gen, B, H, Nq, Nk)
    dout = randn(gen, (B, H, Nq, D))
    grads = backends.gradients(backend, q, k, v, dout, wrt=("q", "sinks"), **options)
    want = attention_np(q, k, v, dout=dout, **options)
    check_close("dsinks", to_np(grads["sinks"]), want, mx.float32)
    check_close("dq", to_np(grads["q"]), want, mx.float32)


@pytest.mark.parametrize("Nk", [1, 3, 200])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_peaked_short_rows_keep_their_gradients(backend, Nk, dtype, request):
    """Rows whose mass sits on one key beside a sink: dS = P (dP - delta)
    cancels to ~P (1 - P) dP there, so a delta taken as dO . O from the output
    rounded to 16 bits is off by a rounding of O divided by 1 - P. Here one key
    of each row holds 1 - P ~ 2^-9 of sink mass and the rest much less, so
    that path's dq is ~100 % off; computing delta as sum P dP in float32 (what
    the CPU backward does where a sequence's keys fit one key tile, 256) keeps
    it within twice the materialised computation's error."""
    if backend == "cuda":  # must fail there until it is fixed: then this marker goes
        request.applymarker(pytest.mark.xfail(strict=True, reason="the CUDA backward takes delta = dO . O from "
                                              "the 16-bit output (docs/cuda.md, Known limits)"))
    elif backend != "cpu":
        pytest.skip("the Metal backward takes delta = dO . O from the 16-bit output, as the CUDA one does "
                    "(docs/metal.md, Known limits)")
    gen = rng("peaked-short-rows", Nk, str(dtype))
    B, H, Nq, D = 1, 2, 37, 32
    q, k, v = qkv(gen, B, H, H, Nq, Nk, D, dtype=dtype)
    # Logits: key 0 at ~12 for every query (the queries lie near one direction
    # u, key 0 along u), the others ~N(0, 1); the sink at 12 - 6.2 leaves key 0
    # 1 - P ~ e^-6.2 ~ 2^-9.
    u = gen.standard_normal((B, H, 1, D)).astype(np.float32)
    qn = to_np(q) * 0.05 + u
    kn = to_np(k)
    kn[:, :, 0] = u[:, :, 0] * (12.0 * np.sqrt(D) / np.sum(u[:, :, 0] ** 2, axis=-1, keepdims=True))
    q, k = mx.array(qn).astype(dtype), mx.array(kn).astype(dtype)
    options = {"sinks": mx.array(np.full((H,), 12.0 - 6.2, np.float32))}
    # dO nearly orthogonal to v_0: dP_0 = dO . v_0 and delta = dO . O ~ P_0 dP_0
    # are small beside |dO| |O|, which sets the size of O's rounding in dO . O.
    w = gen.standard_normal((B, H, Nq, D))
    v0 = to_np(v)[:, :, :1].astype(np.float64)
    w -= np.sum(w * v0, axis=-1, keepdims=True) / np.sum(v0 * v0, axis=-1, keepdims=True) * v0
    dout = mx.array(w.astype(np.float32)).astype(dtype)
    got = backends.gradients(backend, q, k, v, dout, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = plain_errors(q, k, v, dout, options, dtype)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(got[name]), want, dtype, plain)


@pytest.mark.parametrize("mask_shape", [(1, 1, 19, 23), (2, 3, 19, 23), (3, 1, 23), (1, 23)], ids=str)
def test_additive_mask_gradient(backend, mask_shape):
    gen = rng("dmask", mask_shape)
    B, H, Nq, Nk, D = 2, 3, 19, 23, 16
    q, k, v = qkv(gen, B, H, H, Nq, Nk, D)
    mask = randn(gen, mask_shape)
    dout = randn(gen, (B, H, Nq, D))
    grads = backends.gradients(backend, q, k, v, dout, wrt=("mask",), mask=mask, causal=True)
    want = attention_np(q, k, v, dout=dout, mask=mask, causal=True)
    full = want["dmask_full"]
    axes = tuple(a for a, n in enumerate((1,) * (4 - len(mask_shape)) + mask_shape) if n == 1)
    expected = full.sum(axis=axes, keepdims=True).reshape(mask_shape)
    check_close("dmask", to_np(grads["mask"]), expected, mx.float32)


def test_gradient_through_lse(backend):
    gen = rng("dlse")
    q, k, v = qkv(gen, 1, 2, 2, 31, 45, 16)
    dout = randn(gen, (1, 2, 31, 16))
    dlse = randn(gen, (1, 2, 31))
    grads = backends.gradients(backend, q, k, v, dout, dlse=dlse, causal=True)
    want = attention_np(q, k, v, dout=dout, dlse=dlse, causal=True)
    for name in "qkv":
        check_close("d" + name, to_np(grads[name]), want, mx.float32)


def test_inside_compile(backend):
    if is_emulated(backend):
        pytest.skip("mx.compile needs a real MLX device")
    gen = rng("compile")
    q, k, v = qkv(gen, 1, 2, 1, 40, 50, 32)
    stream = mx.cpu if backend == "cpu" else mx.gpu

    def loss(q, k, v):
        return mx.sum(mlx_flash.flash_attention(q, k, v, causal=True, softcap=3.0, stream=stream) ** 2)

    eager = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert abs(eager[0].item() - compiled[0].item()) < 1e-4 * abs(eager[0].item())
    for a, b in zip(eager[1], compiled[1]):
        assert rel_error(to_np(b), to_np(a)) < 1e-5
