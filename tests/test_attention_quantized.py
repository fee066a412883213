"""flash_attention_quantized: attention from mx.quantize'd K/V, against float64.

Every case dequantizes the triples with mx.dequantize and compares with the
float64 NumPy reference on those operands (reference_np), forward and dq /
dsinks / dmask; k and v are constants. Runs on the CPU and, for the cases
that take a `backend`, on the Metal kernels too (an Apple GPU, or on Linux
the same source through the MSL emulation harness, metal_emu, with tiny
sizes: emulation is slow) and on CUDA (a GPU; the CUDA kernels also run on
the CPU through the CUDA emulation in test_cuda_quant_emu.py). A backend
without the kernel must refuse clearly.
"""

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from helpers import FP32_TOL, check_close, is_emulated, plain_errors, randn, reference_error, rng, to_np
from reference_np import attention_np

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)

pytestmark = pytest.mark.usefixtures("cpu_default_device")


@pytest.fixture(params=["cpu", "cuda", "metal:stream", "metal:tiled", "metal_emu:stream", "metal_emu:tiled"])
def backend(request, monkeypatch):
    """The backends with their forward paths: Metal's streaming kernel (decode:
    registers only, key splits) and its tiled one (prefill) are each forced
    here whatever the size; skipped where the backend cannot run."""
    import backends

    name, _, path = request.param.partition(":")
    reason = backends.skip_reason(name)
    if reason:
        pytest.skip(reason)
    if path:
        from mlx_flash.backends import metal_quant

        monkeypatch.setattr(metal_quant, "TILE_MIN_ROWS", 1 if path == "tiled" else 1 << 30)
    return name


def quantized_case(key, B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=mx.float32, bits=4, group_size=64):
    """q, the k/v triples, and the dequantized k/v the reference reads."""
    gen = rng("quantized", *key)
    Dv = D if Dv is None else Dv
    q = randn(gen, (B, Hq, Nq, D), dtype)
    k = randn(gen, (B, Hkv, Nk, D), dtype)
    v = randn(gen, (B, Hkv, Nk, Dv), dtype)
    kq = tuple(mx.quantize(k, group_size=group_size, bits=bits))
    vq = tuple(mx.quantize(v, group_size=group_size, bits=bits))
    kd = mx.dequantize(*kq, group_size=group_size, bits=bits)
    vd = mx.dequantize(*vq, group_size=group_size, bits=bits)
    mx.eval(q, kq, vq, kd, vd)
    return q, kq, vq, kd, vd


def skip_unless_quantized(backend):
    """Skip backends without a quantized-KV kernel."""
    from mlx_flash import dispatch

    if backend in ("cuda", "metal") and backend not in dispatch.QUANTIZED_KV_BACKENDS:
        pytest.skip(f"no quantized-KV kernel on {backend} yet")


def run_emulated(q, kq, vq, bits, group_size, dout=None, **options):
    """`run` on the Metal kernels through the emulation harness."""
    from metal_emu import quantized as emu

    if dout is None:
        out, lse = emu.forward(q, kq, vq, bits=bits, group_size=group_size, **options)
        return {"out": to_np(out), "lse": to_np(lse)}
    wrt = ("q",) + (("sinks",) if "sinks" in options else ()) + (
        ("mask",) if "mask" in options and options["mask"].dtype != mx.bool_ else ())
    out, lse, grads = emu.gradients(q, kq, vq, dout, bits=bits, group_size=group_size, wrt=wrt, **options)
    names = {"q": "dq", "sinks": "dsinks", "mask": "dmask"}
    return {"out": to_np(out), "lse": to_np(lse), **{names[n]: to_np(g) for n, g in grads.items()}}


def run(q, kq, vq, bits, group_size, dout=None, backend="cpu", **options):
    """out, lse and, with dout, dq (and dsinks / dmask where those are given),
    on `backend` (cpu, metal, metal_emu)."""
    if is_emulated(backend):
        return run_emulated(q, kq, vq, bits, group_size, dout, **options)
    skip_unless_quantized(backend)
    stream = mx.cpu if backend == "cpu" else mx.gpu
    sinks, mask = options.pop("sinks", None), options.pop("mask", None)

    def f(q, sinks, mask):
        extra = {name: x for name, x in (("sinks", sinks), ("mask", mask)) if x is not None}
        return mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=group_size,
                                                   return_lse=True, stream=stream, **options, **extra)

    out, lse = f(q, sinks, mask)
    res = {"out": to_np(out), "lse": to_np(lse)}
    if dout is not None:
        names, argnums = ["dq"], [0]
        if sinks is not None:
            names, argnums = names + ["dsinks"], argnums + [1]
        if mask is not None and mask.dtype != mx.bool_:
            names, argnums = names + ["dmask"], argnums + [2]
        loss = lambda q, s, m: mx.sum(f(q, s, m)[0].astype(mx.float32) * dout.astype(mx.float32))
        grads = mx.grad(loss, argnums=argnums)(q, sinks, mask)
        grads = grads if isinstance(grads, (tuple, list)) else (grads,)
        res.update({name: to_np(g) for name, g in zip(names, grads)})
    return res


def expected(q, kd, vd, dout=None, **options):
    want = attention_np(q, kd, vd, dout=dout, **options)
    if "mask" in options and dout is not None:
        m = options["mask"]
        full = want["dmask_full"]
        axes = tuple(a for a in range(4) if (m.reshape((1,) * (4 - m.ndim) + m.shape)).shape[a] == 1 and full.shape[a] != 1)
        want["dmask"] = full.sum(axis=axes, keepdims=True).reshape(m.shape) if axes else full
    return want


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_every_bits_and_group_size(bits, group_size, backend):
    """Every packing (3/5/6 bits straddle words) against mx.dequantize + float64, forward and dq."""
    q, kq, vq, kd, vd = quantized_case(("bits", bits, group_size), 1, 4, 2, 7, 45, 128, bits=bits, group_size=group_size)
    dout = randn(rng("bits-dout", bits, group_size), q.shape)
    got = run(q, kq, vq, bits, group_size, dout=dout, backend=backend, causal=True)
    want = expected(q, kd, vd, dout=dout, causal=True)
    for name in ("out", "lse", "dq"):
        check_close(name, got[name], want, mx.float32)


SHAPES = [
    # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 1, 1, 1, 1, 32, 32),
    (2, 4, 2, 17, 113, 64, 64),
    (1, 6, 2, 113, 17, 64, 32),     # Nq > Nk, Dv != D
    (1, 8, 1, 1, 3001, 128, 128),  # decode, MQA: keys split over chunks
    (2, 4, 4, 300, 301, 32, 96),
]

FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (20, 3)},
    "softcap": {"softcap": 3.0},
    "alibi": {"alibi": True},
    "sinks": {"sinks": True},
    "bool_mask": {"bool_mask": True},
    "additive_mask": {"additive_mask": True},
    "causal_sinks_softcap": {"causal": True, "sinks": True, "softcap": 2.5},
    "window_alibi_mask": {"window": (40, 0), "alibi": True, "additive_mask": True},
}


def options_for(feature, gen, B, Hq, Nq, Nk):
    spec = FEATURES[feature]
    opts = {k: spec[k] for k in ("causal", "window", "softcap") if k in spec}
    if spec.get("alibi"):
        opts["alibi_slopes"] = mx.array(gen.uniform(0.01, 0.2, (Hq,)).astype(np.float32))
    if spec.get("sinks"):
        opts["sinks"] = mx.array(gen.standard_normal(Hq).astype(np.float32))
    if spec.get("bool_mask"):
        m = gen.random((B, 1, Nq, Nk)) < 0.7
        m[..., 0] = True  # no empty rows here (those have their own test)
        opts["mask"] = mx.array(m)
    if spec.get("additive_mask"):
        opts["mask"] = mx.array(gen.standard_normal((1, Hq, Nq, Nk)).astype(np.float32))
    return opts


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_and_dq_float32(shape, feature):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, kq, vq, kd, vd = quantized_case((shape, feature), B, Hq, Hkv, Nq, Nk, D, Dv, group_size=32)
    gen = rng("quantized-options", shape, feature)
    opts = options_for(feature, gen, B, Hq, Nq, Nk)
    dout = randn(gen, (B, Hq, Nq, Dv))
    got = run(q, kq, vq, 4, 32, dout=dout, **dict(opts))
    want = expected(q, kd, vd, dout=dout, **opts)
    for name in ("out", "lse", "dq") + (("dsinks",) if "sinks" in opts else ()) + (
            ("dmask",) if "mask" in opts and opts["mask"].dtype != mx.bool_ else ()):
        check_close(name, got[name], want, mx.float32)


# The Metal kernels' cases: small (emulation runs every thread on the CPU) but
# odd, GQA, Dv != D, Nq > Nk, one key.
GPU_SHAPES = [
    (1, 1, 1, 1, 1, 32, 32),
    (1, 4, 2, 5, 37, 64, 32),
    (2, 2, 2, 9, 7, 32, 64),
]


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_and_dq_float32_gpu(shape, feature, backend):
    if backend == "cpu":
        pytest.skip("the CPU runs the larger cases of test_forward_and_dq_float32")
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, kq, vq, kd, vd = quantized_case((shape, feature, "gpu"), B, Hq, Hkv, Nq, Nk, D, Dv, group_size=32, bits=3)
    gen = rng("quantized-options-gpu", shape, feature)
    opts = options_for(feature, gen, B, Hq, Nq, Nk)
    dout = randn(gen, (B, Hq, Nq, Dv))
    got = run(q, kq, vq, 3, 32, dout=dout, backend=backend, **dict(opts))
    want = expected(q, kd, vd, dout=dout, **opts)
    for name in ("out", "lse", "dq") + (("dsinks",) if "sinks" in opts else ()) + (
            ("dmask",) if "mask" in opts and opts["mask"].dtype != mx.bool_ else ()):
        check_close(name, got[name], want, mx.float32)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_q(dtype, causal, backend):
    B, Hq, Hkv, Nq, Nk, D = (1, 4, 2, 65, 190, 64) if not is_emulated(backend) else (1, 4, 2, 9, 41, 64)
    q, kq, vq, kd, vd = quantized_case(("half", dtype, causal, Nq), B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
    dout = randn(rng("half-dout", dtype, causal, Nq), (B, Hq, Nq, D), dtype)
    opts = {"causal": causal}
    got = run(q, kq, vq, 4, 64, dout=dout, backend=backend, **opts)
    want = expected(q, kd, vd, dout=dout, **opts)
    plain = plain_errors(q, kd, vd, dout, opts, dtype)
    for name in ("out", "dq"):
        check_close(name, got[name], want, dtype, plain)
    assert reference_error("lse", got["lse"], want) < 1e-2


def test_k_and_v_are_constants():
    q, kq, vq, _, _ = quantized_case(("const",), 1, 2, 1, 3, 40, 32, group_size=32)

    def loss(*ops):
        q, kw, ks, kb, vw, vs, vb = ops
        return mx.sum(mlx_flash.flash_attention_quantized(q, (kw, ks, kb), (vw, vs, vb), bits=4, group_size=32))

    grads = mx.grad(loss, argnums=tuple(range(7)))(q, *kq, *vq)
    assert float(mx.abs(grads[0]).max()) > 0
    for g in grads[1:]:
        assert not np.any(to_np(g))


def test_strided_cache_views(backend):
    """mlx-lm's cache hands over [..., :offset, :] slices of a larger buffer; a
    transposed words array (last-dim stride != 1) is read correctly too."""
    B, Hq, Hkv, N, D = 1, 4, 2, 50, 64
    q, kq, vq, kd, vd = quantized_case(("strided",), B, Hq, Hkv, 3, 80, D, bits=5)
    k_view = tuple(x[:, :, :N, :] for x in kq)
    v_view = tuple(x[:, :, :N, :] for x in vq)
    words_t = mx.contiguous(k_view[0].swapaxes(-1, -2)).swapaxes(-1, -2)
    got = run(q, (words_t,) + k_view[1:], v_view, 5, 64, backend=backend)
    want = expected(q, kd[:, :, :N], vd[:, :, :N])
    check_close("out", got["out"], want, mx.float32)


def test_fully_masked_rows_and_empty_keys(backend):
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 4, 33, 32
    q, kq, vq, kd, vd = quantized_case(("masked",), B, Hq, Hkv, Nq, Nk, D, group_size=32)
    m = np.ones((Nq, Nk), bool)
    m[1] = False
    got = run(q, kq, vq, 4, 32, dout=mx.ones((B, Hq, Nq, D)), backend=backend, mask=mx.array(m))
    assert np.all(got["out"][:, :, 1] == 0) and np.all(got["lse"][:, :, 1] == -np.inf)
    assert np.all(got["dq"][:, :, 1] == 0)
    assert np.all(np.isfinite(got["out"][:, :, [0, 2, 3]]))


def test_nan_value_of_a_dropped_key_does_not_leak(backend):
    """Rule 1 of the non-finite contract: key j's NaN value (a NaN scale)
    reaches exactly the rows that keep j, forward and dq."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 6, 6, 32
    q, kq, vq, _, _ = quantized_case(("nan",), B, Hq, Hkv, Nq, Nk, D, group_size=32)
    j = 3
    vs = np.array(vq[1])
    vs[:, :, j] = np.nan
    ks = np.array(kq[1])
    ks[:, :, j] = np.nan
    vq = (vq[0], mx.array(vs), vq[2])
    kq = (kq[0], mx.array(ks), kq[2])
    got = run(q, kq, vq, 4, 32, dout=mx.ones((B, Hq, Nq, D)), backend=backend, causal=True)
    for i in range(Nq):
        sees = j <= i
        for name in ("out", "dq"):
            assert np.all(np.isnan(got[name][:, :, i])) == sees and (sees or np.all(np.isfinite(got[name][:, :, i]))), (name, i)


def test_decode_split_matches_single_task(backend):
    """Decode over many keys (split into chunks) gives the reference's result
    with sinks and a window that leaves some chunks empty."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 1, 2, 5000, 64
    q, kq, vq, kd, vd = quantized_case(("split",), B, Hq, Hkv, Nq, Nk, D, bits=8)
    opts = {"window": (1500, 0), "sinks": mx.array([0.5, -1.0, 2.0, -mx.inf])}
    dout = randn(rng("split-dout"), q.shape)
    got = run(q, kq, vq, 8, 64, dout=dout, backend=backend, **dict(opts))
    want = expected(q, kd, vd, dout=dout, **opts)
    for name in ("out", "lse", "dq", "dsinks"):  # dq: split over keys too (Metal)
        check_close(name, got[name], want, mx.float32)


# ---- bad input ---------------------------------------------------------------

def _good():
    q, kq, vq, _, _ = quantized_case(("errors",), 1, 2, 1, 3, 8, 64)
    return q, kq, vq


@pytest.mark.parametrize("bad, kwargs, match", [
    ("bits", {"bits": 7}, r"bits: expected one of \[2, 3, 4, 5, 6, 8\], got 7"),
    ("group_size", {"group_size": 16}, r"group_size: expected one of \[32, 64, 128\], got 16"),
    ("bits_mismatch", {"bits": 8}, r"k: data's last dim 8 holds D=32 values at bits=8, not a multiple of group_size=64"),
    ("bits_mismatch_q", {"bits": 2, "group_size": 32}, r"k: scales must have shape \[1, 1, 8, 4\]"),
    ("group_mismatch", {"group_size": 32}, r"k: scales must have shape \[1, 1, 8, 2\]"),
])
def test_bad_bits_and_group_size(bad, kwargs, match):
    q, kq, vq = _good()
    args = dict(bits=4, group_size=64)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        mlx_flash.flash_attention_quantized(q, kq, vq, **args)


def test_bad_triples():
    q, kq, vq = _good()
    call = lambda k, v: mlx_flash.flash_attention_quantized(q, k, v, bits=4, group_size=64)
    with pytest.raises(TypeError, match=r"k: expected the \(data, scales, biases\) triple"):
        call(kq[0], vq)
    with pytest.raises(TypeError, match=r"v: expected the \(data, scales, biases\) triple .* length 2"):
        call(kq, vq[:2])
    with pytest.raises(TypeError, match=r"k: data must be uint32"):
        call((kq[0].astype(mx.int32),) + kq[1:], vq)
    with pytest.raises(TypeError, match=r"v: scales and biases must share one dtype"):
        call(kq, (vq[0], vq[1], vq[2].astype(mx.float16)))
    with pytest.raises(ValueError, match=r"k: biases must have shape"):
        call((kq[0], kq[1], kq[2][:, :, :4]), vq)
    with pytest.raises(ValueError, match=r"k, v: \[B, Hkv, Nk\] must match"):
        call(kq, tuple(x[:, :, :5] for x in vq))
    with pytest.raises(ValueError, match=r"v: data must have rank 4"):
        call(kq, (vq[0][0],) + vq[1:])
    with pytest.raises(ValueError, match=r"q: head dim must equal k's dequantized head dim \(64\), got 32"):
        mlx_flash.flash_attention_quantized(q[..., :32], kq, vq, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"sinks: expected shape"):
        mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, sinks=mx.zeros((3,)))


def test_backend_without_the_kernel_refuses_clearly(monkeypatch):
    from mlx_flash import dispatch

    q, kq, vq = _good()
    monkeypatch.setattr(dispatch, "QUANTIZED_KV_BACKENDS", ("cpu",))
    for backend in ("cuda", "metal"):
        monkeypatch.setattr(dispatch, "backend_name", lambda stream, b=backend: b)
        with pytest.raises(NotImplementedError, match=f"flash_attention_quantized: no {backend} kernel yet"):
            mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64)


# ---- memory ----------------------------------------------------------------------

@pytest.mark.parametrize("nq", [1, 256])
def test_no_full_precision_copy_of_the_cache(nq, backend):
    """Nk = 32768: the extra peak stays far below one dequantized K."""
    if is_emulated(backend):
        pytest.skip("Nk = 32768 is too large for the Metal emulation (the CPU and a real GPU run it)")
    skip_unless_quantized(backend)
    stream = mx.cpu if backend == "cpu" else mx.gpu
    B, Hq, Hkv, Nk, D = 1, 8, 2, 32768, 128
    gen = rng("quant-memory", nq)
    q = randn(gen, (B, Hq, nq, D), mx.float16)
    kq = mx.quantize(randn(gen, (B, Hkv, Nk, D), mx.float16), group_size=64, bits=4)
    vq = mx.quantize(randn(gen, (B, Hkv, Nk, D), mx.float16), group_size=64, bits=4)
    mx.eval(q, kq, vq)
    # One call first: a process's first split decode on CUDA allocates the
    # stream's ticket pool (4 MiB, held for the process: cuda.py's
    # _ticket_region), once, not per call; measured without it, the check
    # depended on which tests the process had run before.
    mx.eval(mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, causal=True, stream=stream))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, causal=True, stream=stream)
    mx.eval(out)
    extra = mx.get_peak_memory() - base
    dequantized_k = B * Hkv * Nk * D * 2  # one fp16 copy of K
    assert extra < dequantized_k / 10, f"extra peak {extra / 2**20:.2f} MiB vs dequantized K {dequantized_k / 2**20:.0f} MiB"
    # The backward (dq) too: forward outputs, dq and O(tile) scratch only.
    loss = lambda q: mx.sum(mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, causal=True,
                                                                stream=stream).astype(mx.float32))
    del out
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.grad(loss)(q))
    extra = mx.get_peak_memory() - base
    assert extra < dequantized_k / 4, f"backward extra peak {extra / 2**20:.2f} MiB vs dequantized K {dequantized_k / 2**20:.0f} MiB"


def test_cache_views_are_read_in_place(backend):
    """A decode over mlx-lm's cache slices (`keys[..., :offset, :]` of a
    preallocated buffer, 4-bit, Nk = 32768) has the same extra peak as over
    dense arrays: the kernels read the views, no copy of the cache (whose
    smallest array, K's scales, is 1 MiB) is made."""
    if is_emulated(backend):
        pytest.skip("Nk = 32768 is too large for the Metal emulation (test_cuda_quant_emu covers views)")
    skip_unless_quantized(backend)
    stream = mx.cpu if backend == "cpu" else mx.gpu
    B, Hq, Hkv, Nk, D, capacity = 1, 32, 8, 32768, 128, 32768 + 512
    gen = rng("quant-views")
    q = randn(gen, (B, Hq, 1, D), mx.float16)
    buffers = [mx.quantize(randn(gen, (B, Hkv, capacity, D), mx.float16), group_size=64, bits=4) for _ in "kv"]
    views = [tuple(x[..., :Nk, :] for x in t) for t in buffers]
    dense = [tuple(mx.contiguous(x) for x in t) for t in views]
    mx.eval(q, buffers, views, dense)

    def extra_peak(kq, vq):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, stream=stream)
        mx.eval(out)
        return mx.get_peak_memory() - base, out

    dense_peak, want = extra_peak(*dense)
    view_peak, got = extra_peak(*views)
    assert np.array_equal(to_np(got), to_np(want))
    assert view_peak <= dense_peak + 64 * 1024, (
        f"extra peak over views {view_peak / 2**20:.2f} MiB vs dense {dense_peak / 2**20:.2f} MiB: a copy?")


def test_inside_compile_and_grad():
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 9, 70, 64
    q, kq, vq, kd, vd = quantized_case(("compile",), B, Hq, Hkv, Nq, Nk, D, bits=6)

    def loss(q):
        return mx.sum(mlx_flash.flash_attention_quantized(q, kq, vq, bits=6, group_size=64, causal=True) ** 2)

    got = mx.compile(mx.value_and_grad(loss))(q)
    want_out = attention_np(q, kd, vd, causal=True)["out"]
    want = attention_np(q, kd, vd, causal=True, dout=mx.array(2 * want_out.astype(np.float32)))
    assert abs(got[0].item() - float((want_out ** 2).sum())) < 1e-4 * float((want_out ** 2).sum())
    check_close("dq", to_np(got[1]), want, mx.float32)


def test_benchmark_quick_run(tmp_path):
    """python -m mlx_flash.bench.quantized_kv --quick writes its JSON (no timing assertions)."""
    from mlx_flash.bench import quantized_kv

    out = tmp_path / "q.json"
    result = quantized_kv.main(["--quick", "--keys", "256", "--out", str(out)])
    assert out.exists() and result["cases"]
    for case in result["cases"]:
        ours = case["results"]["flash_quantized"]
        assert ours["time_s"] > 0 and ours["extra_peak_bytes"] > 0
        for name, entry in case["results"].items():
            assert "error" not in entry, (name, entry)
        # mlx-lm's quantized path reads the same codes (the float-cache ones
        # differ by the quantization error itself).
        if "mlx_lm_quantized" in case["results"]:
            diff = case["results"]["mlx_lm_quantized"]["max_abs_diff_vs_flash_quantized"]
            assert diff < (1e-4 if case["dtype"] == "float32" else 2e-2), (case["case"], diff)


def test_reference_function_and_nan_sink(backend):
    """reference_attention_quantized (the materialised oracle) agrees with the
    float64 reference; a NaN sink makes its head's rows NaN (a NaN logit)."""
    from mlx_flash.attention_quantized import reference_attention_quantized

    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 5, 40, 32
    q, kq, vq, kd, vd = quantized_case(("reference",), B, Hq, Hkv, Nq, Nk, D, bits=3, group_size=32)
    out = reference_attention_quantized(q, kq, vq, bits=3, group_size=32, causal=True)
    check_close("out", to_np(out), attention_np(q, kd, vd, causal=True), mx.float32)
    got = run(q, kq, vq, 3, 32, backend=backend, sinks=mx.array([float("nan"), 0.5]))
    assert np.all(np.isnan(got["out"][:, 0])) and np.all(np.isnan(got["lse"][:, 0]))
    assert np.all(np.isfinite(got["out"][:, 1]))


@pytest.mark.parametrize("cache_dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_float32_q_over_a_half_precision_cache(cache_dtype, backend):
    """Scales/biases in another dtype than q (a half cache, an fp32 query)."""
    gen = rng("mixed", cache_dtype)
    q = randn(gen, (1, 4, 9, 64))
    kq = tuple(mx.quantize(randn(gen, (1, 2, 77, 64), cache_dtype), group_size=32, bits=4))
    vq = tuple(mx.quantize(randn(gen, (1, 2, 77, 64), cache_dtype), group_size=32, bits=4))
    kd, vd = (mx.dequantize(*t, group_size=32, bits=4).astype(mx.float32) for t in (kq, vq))
    got = run(q, kq, vq, 4, 32, backend=backend, causal=True)
    want = expected(q, kd, vd, causal=True)
    # The kernel dequantizes in fp32, mx.dequantize rounds to the half dtype: allow that rounding.
    assert reference_error("out", got["out"], want) < (2e-3 if cache_dtype == mx.float16 else 1.6e-2)


# ---- non-finite contract (issue 13) ------------------------------------------------

def _nonfinite_case(case):
    """q, k/v triples with NaN/inf planted (in q, a scale, the mask, a sink,
    an ALiBi slope), the dequantized k/v and the options."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 11, 37, 32
    q, kq, vq, _, _ = quantized_case(("nonfinite", case), B, Hq, Hkv, Nq, Nk, D, group_size=32)
    gen = rng("quantized-nonfinite", case)
    qn, ks, vs = np.array(q), np.array(kq[1]), np.array(vq[1])
    opts = {"causal": True}
    if case == "nan_q_row_masked":
        keep = gen.random((Nq, Nk)) < 0.8
        keep[0] = False  # row 0 sees nothing: its NaN q must not matter
        qn[0, 2, 0] = np.nan
        qn[0, 1, 5, 3] = np.nan
        opts["mask"] = mx.array(keep)
    elif case == "nan_k_dropped_and_kept":
        ks[0, 0, Nk - Nq + 4] = np.nan  # kept from query 4 on (causal), dropped before
        ks[0, 1, Nk - 1] = np.inf       # kept by the last query only
    elif case == "inf_v_kept":
        vs[0, 1, Nk - Nq + 6] = np.inf
    elif case == "nan_mask_entry":
        m = gen.standard_normal((1, Hq, Nq, Nk)).astype(np.float32)
        m[0, 0, 3, 10] = np.nan  # kept (query 3 sees keys 9..29): a NaN row
        m[0, 0, 4, 2] = np.nan   # dropped by the window: no effect
        m[0, 1, :, 5] = -np.inf  # -inf: a dropped key
        m[0, 2, 7, 1] = np.inf   # dropped by the window: no effect
        m[0, 2, 8, 30] = np.inf  # kept: inf - inf in the softmax, a NaN row
        opts = {"mask": mx.array(m), "window": (20, 0)}
    elif case == "nan_and_inf_sinks_and_alibi":
        opts["sinks"] = mx.array([np.nan, np.inf, -np.inf, 0.5], dtype=mx.float32)
        opts["alibi_slopes"] = mx.array([0.1, 0.2, 0.3, np.nan], dtype=mx.float32)
    q = mx.array(qn)
    kq = (kq[0], mx.array(ks), kq[2])
    vq = (vq[0], mx.array(vs), vq[2])
    kd, vd = (mx.dequantize(*t, group_size=32, bits=4) for t in (kq, vq))
    return q, kq, vq, kd, vd, opts


@pytest.mark.parametrize("case", ["nan_q_row_masked", "nan_k_dropped_and_kept", "inf_v_kept", "nan_mask_entry",
                                  "nan_and_inf_sinks_and_alibi"])
def test_nonfinite_contract(case, backend):
    """Elementwise against the float64 reference (which implements the contract):
    NaN exactly where it is NaN, the same inf, the usual tolerance elsewhere."""
    from test_attention_nonfinite import check_elementwise

    q, kq, vq, kd, vd, opts = _nonfinite_case(case)
    dout = randn(rng("quantized-nonfinite-dout", case), q.shape)
    got = run(q, kq, vq, 4, 32, dout=dout, backend=backend, **dict(opts))
    want = expected(q, kd, vd, dout=dout, **opts)
    assert np.isnan(want["out"]).any() or np.isinf(want["out"]).any() or np.isneginf(want["lse"]).any(), \
        "the case must plant something the reference shows"
    names = ("out", "lse", "dq") + (("dsinks",) if "sinks" in opts else ()) + (
        ("dmask",) if "mask" in opts and opts["mask"].dtype != mx.bool_ else ())
    for name in names:
        check_elementwise(name, got[name], want, mx.float32)


def test_metal_launch_geometry():
    """The Metal wrapper's path choice (no GPU needed): decode streams with
    enough key splits to fill the GPU, prefill takes the tiles, and the tile
    sizes fit the threadgroup memory for every head dim."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import metal_quant

    def spec(Hq, Hkv, Nq, Nk, D):
        q = mx.zeros((1, Hq, Nq, D), mx.float16)
        kv = tuple(mx.quantize(mx.zeros((1, Hkv, Nk, D), mx.float16), group_size=64, bits=4))
        return validate_attention_quantized(q, kv, kv, bits=4, group_size=64, causal=True)[0].attention

    decode = spec(32, 8, 1, 32768, 128)
    assert not metal_quant._use_tiles(decode)
    splits, per = metal_quant._splits(decode)
    assert splits * per >= 32768 and (splits - 1) * per < 32768
    assert metal_quant._row_blocks(decode) * 8 * splits >= metal_quant.SPLIT_TARGET_GROUPS
    assert metal_quant._use_tiles(spec(32, 8, 2048, 32768, 128))
    assert metal_quant._splits(spec(32, 8, 2048, 4096, 128)) == (1, 0)  # enough row blocks: no split
    for d in (64, 128, 192, 256):
        bk = metal_quant.tile_keys(d, d)
        fwd = (bk * (d + 4) + metal_quant.TILE_NSG * 8 * bk) * 4
        dq = fwd + metal_quant.TILE_NSG * 8 * bk * 4
        assert max(fwd, dq) <= 32 * 1024, (d, bk)


@pytest.mark.parametrize("nq, nk", [(0, 5), (3, 0)])
def test_empty_queries_or_keys(nq, nk, backend):
    """No queries: empty outputs. No keys: out 0, lse -inf, dq 0 (rule 5)."""
    gen = rng("quantized-empty", nq, nk)
    q = randn(gen, (1, 2, nq, 32))
    kq = tuple(mx.quantize(randn(gen, (1, 1, nk, 32)), group_size=32, bits=4))
    got = run(q, kq, kq, 4, 32, dout=randn(gen, (1, 2, nq, 32)), backend=backend)
    assert got["out"].shape == (1, 2, nq, 32) and got["lse"].shape == (1, 2, nq) and got["dq"].shape == q.shape
    assert np.all(got["out"] == 0) and np.all(np.isneginf(got["lse"])) and np.all(got["dq"] == 0)


# ---- CUDA: the tensor-core prefill kernel forced on moderate sizes ---------------------

_MMA_CASES = {  # bits, group, q dtype, options
    "4bit_causal": (4, 64, mx.float16, lambda g, Hq, Nq, Nk: {"causal": True}),
    "8bit_bf16_causal": (8, 64, mx.bfloat16, lambda g, Hq, Nq, Nk: {"causal": True}),
    "3bit_window_softcap_alibi_sinks": (3, 32, mx.float16, lambda g, Hq, Nq, Nk: {
        "window": (300, 40), "softcap": 4.0, "alibi_slopes": mx.array(g.uniform(0.01, 0.1, (Hq,)).astype(np.float32)),
        "sinks": mx.array(g.standard_normal(Hq).astype(np.float32))}),
    "6bit_bf16_additive_mask": (6, 128, mx.bfloat16, lambda g, Hq, Nq, Nk: {
        "mask": mx.array(g.standard_normal((1, Hq, Nq, Nk)).astype(np.float32))}),
    "2bit_bool_mask": (2, 32, mx.float16, lambda g, Hq, Nq, Nk: {"mask": mx.array(g.random((Nq, Nk)) < 0.9)}),
}


@pytest.mark.parametrize("tile", [(8, 64), (4, 32)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", list(_MMA_CASES))
def test_cuda_tensor_core_prefill(case, tile, monkeypatch):
    """attention_quant_fwd_mma on a GPU (its plan picks it for prefill chunks
    of thousands of rows; forced here on 301 x 1000): both tiles, several
    tiles per block with a ragged end, every feature family."""
    import backends
    from mlx_flash.backends import cuda_quant

    reason = backends.skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    monkeypatch.setitem(cuda_quant.TUNING, "mma", True)
    monkeypatch.setitem(cuda_quant.TUNING, "mma_warps", tile[0])
    monkeypatch.setitem(cuda_quant.TUNING, "mma_bn", tile[1])
    bits, gs, dtype, make = _MMA_CASES[case]
    B, Hq, Hkv, Nq, Nk, D = 1, 8, 2, 301, 1000, 128
    q, kq, vq, kd, vd = quantized_case(("cuda-mma", case), B, Hq, Hkv, Nq, Nk, D, dtype=dtype, bits=bits,
                                       group_size=gs)
    opts = make(rng("cuda-mma-opts", case), Hq, Nq, Nk)
    got = run(q, kq, vq, bits, gs, backend="cuda", **dict(opts))
    want = expected(q, kd, vd, **opts)
    plain = plain_errors(q, kd, vd, mx.ones(q.shape, dtype), opts, dtype)
    check_close("out", got["out"], want, dtype, plain)
    assert reference_error("lse", got["lse"], want) < 1e-3
