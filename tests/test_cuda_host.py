"""The C++ record/replay of repeated CUDA calls (mlx_flash._cuda_host, backends/cuda_host.py).

* Everywhere the extension is built (every Linux build): the call key has
  every argument the Python path reads (a change of any option, dtype or
  shape is another key; arguments the key cannot judge exactly go the Python
  way), and a call the Python path serves without noted launches (the CPU
  backend here) is stored as "always Python" and still gives its result.
* On a CUDA GPU: a replayed call gives bit-identical outputs (and lse, and
  gradients) to the Python path for fp16/bf16 decode (GQA, odd Nk, causal,
  window, sinks, return_lse) and the quantized decode (4/8-bit), really
  replays (hit counts), and advances the decode ticket pool exactly as the
  Python path does.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from helpers import randn, rng
from mlx_flash import attention, attention_quantized
from mlx_flash.backends import cuda_host

HOST = cuda_host.HOST
needs_host = pytest.mark.skipif(HOST is None, reason="mlx_flash._cuda_host is not built")
ON_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not (ON_CUDA and HOST is not None), reason="needs a CUDA GPU and _cuda_host")

try:
    from mlx_flash import _ext  # noqa: F401 (the CPU backend: not built on the GPU machine)

    HAS_CPU_BACKEND = True
except ImportError:
    HAS_CPU_BACKEND = False
needs_cpu_backend = pytest.mark.skipif(not HAS_CPU_BACKEND, reason="needs the CPU backend (mlx_flash._ext)")

_ATTN_DEFAULTS = dict(scale=None, mask=None, causal=False, window=None, softcap=None, alibi_slopes=None, sinks=None,
                      block_mask=None, block_size=None, key_start=None, key_len=None, return_lse=False, stream=None)


def _attention_key(q, k, v, **options):
    """What the extension answers for a call it has no record of: the key bytes (or None)."""
    o = {**_ATTN_DEFAULTS, **options}
    return HOST.attention(q, k, v, o["scale"], o["mask"], o["causal"], o["window"], o["softcap"], o["alibi_slopes"],
                          o["sinks"], o["block_mask"], o["block_size"], o["key_start"], o["key_len"],
                          o["return_lse"], o["stream"])


@pytest.fixture
def fresh_host(monkeypatch):
    """The extension with no records, switched on, untraced replays short, key-count families on (whatever
    MLX_FLASH_CUDA_HOST_SHORT / _KEY_COUNTS the caller set); every record dropped again after."""
    monkeypatch.setattr(cuda_host, "KEY_COUNTS", True)
    HOST.clear()
    HOST.set_enabled(True)
    short = HOST.short_graph_stats()[1]
    HOST.set_short_graph(True)  # the default, whatever MLX_FLASH_CUDA_HOST_SHORT the caller set
    yield HOST
    HOST.clear()
    HOST.set_enabled(True)
    HOST.set_short_graph(short)


@needs_host
def test_key_holds_every_option_shape_and_dtype(fresh_host):
    gen = rng("host-key")
    q, k, v = (randn(gen, s, mx.float16) for s in ((1, 4, 1, 64), (1, 2, 17, 64), (1, 2, 17, 64)))
    base = _attention_key(q, k, v, stream=mx.cpu)
    assert isinstance(base, bytes)
    assert _attention_key(q, k, v, stream=mx.cpu) == base  # same call, same key
    # Other arrays of the same shapes and dtypes: the same key (that is what replays).
    q2, k2, v2 = (randn(gen, x.shape, mx.float16) for x in (q, k, v))
    assert _attention_key(q2, k2, v2, stream=mx.cpu) == base
    mask = mx.ones((1, 1, 1, 17), mx.bool_)
    variants = {
        "scale": dict(scale=0.5), "scale value": dict(scale=0.25), "causal": dict(causal=True),
        "window": dict(window=(4, None)), "window right": dict(window=(4, 0)), "softcap": dict(softcap=30.0),
        "mask": dict(mask=mask), "mask dtype": dict(mask=mask.astype(mx.float16)),
        "mask shape": dict(mask=mx.ones((1, 4, 1, 17), mx.bool_)),
        "alibi": dict(alibi_slopes=mx.ones((4,), mx.float32)), "sinks": dict(sinks=mx.zeros((4,), mx.float32)),
        "block_mask": dict(block_mask=mx.ones((1, 1, 1, 1), mx.bool_)), "block_size": dict(block_size=(16, 16)),
        "key_start": dict(key_start=mx.zeros((1,), mx.int32)), "key_len": dict(key_len=mx.ones((1,), mx.int32)),
        "return_lse": dict(return_lse=True), "stream": dict(stream=mx.Device(mx.cpu, 0)),
    }
    if ON_CUDA:
        variants["stream kind"] = dict(stream=mx.gpu)
    keys = {name: _attention_key(q, k, v, **dict(dict(stream=mx.cpu), **opts)) for name, opts in variants.items()}
    for name, key in keys.items():
        assert isinstance(key, bytes) and key != base, name
    assert len(set(keys.values())) == len(keys), "two different options gave one key"
    # Shapes and dtypes of q, k, v.
    assert _attention_key(q.astype(mx.bfloat16), k.astype(mx.bfloat16), v.astype(mx.bfloat16), stream=mx.cpu) != base
    k18, v18 = (randn(gen, (1, 2, 18, 64), mx.float16) for _ in range(2))
    assert _attention_key(q, k18, v18, stream=mx.cpu) != base
    assert _attention_key(q, k, v[..., :32], stream=mx.cpu) != base


@needs_host
def test_key_refuses_what_it_cannot_judge_exactly(fresh_host):
    """Values the checks could tell apart from equal-comparing ones (1 vs 1.0,
    1 vs True), non-array inputs and odd containers go the Python way (None)."""
    gen = rng("host-key-odd")
    q, k, v = (randn(gen, (1, 2, 3, 32), mx.float32) for _ in range(3))
    assert _attention_key(q, k, v, scale=1, stream=mx.cpu) is None
    assert _attention_key(q, k, v, causal=1, stream=mx.cpu) is None
    assert _attention_key(q, k, v, window=[2, 2], stream=mx.cpu) is None
    assert _attention_key(q, k, v, window=(2.0, 2), stream=mx.cpu) is None
    assert _attention_key(q, k, v, softcap=np.float32(3.0), stream=mx.cpu) is None
    assert _attention_key(np.zeros((1, 2, 3, 32), np.float32), k, v, stream=mx.cpu) is None
    assert _attention_key(q, k, v, return_lse=1, stream=mx.cpu) is None
    assert _attention_key(q, k, v, stream="gpu") is None
    if not ON_CUDA:  # no GPU stream to run on: the Python path says so
        assert _attention_key(q, k, v, stream=mx.gpu) is None
    # The quantized entry: k and v must be triples of arrays.
    wq = mx.quantize(randn(gen, (1, 2, 64, 64), mx.float16), group_size=64, bits=4)
    args = (4, 64, None, None, False, None, None, None, None, False, mx.cpu)
    assert isinstance(HOST.attention_quantized(q, wq, wq, *args), bytes)
    assert isinstance(HOST.attention_quantized(q, list(wq), list(wq), *args), bytes)
    assert HOST.attention_quantized(q, wq[:2], wq, *args) is None
    assert HOST.attention_quantized(q, wq, (wq[0], wq[1], None), *args) is None
    assert HOST.attention_quantized(q, wq, wq, 4.0, *args[1:]) is None
    assert HOST.attention_quantized(q, wq, wq, 4, 64, None, None, False, None, None, None, None, False,
                                    mx.cpu) != HOST.attention_quantized(q, wq, wq, 8, 64, None, None, False, None,
                                                                        None, None, None, False, mx.cpu)


@needs_host
@needs_cpu_backend
def test_call_without_noted_launches_stays_python(fresh_host, monkeypatch):
    """A call served without noted CUDA launches (here: the CPU backend) is
    recorded as "always Python": its result is the Python path's, the next
    call of its key is answered None (no second recording attempt)."""
    monkeypatch.setattr(attention, "_HOST", HOST)
    gen = rng("host-cpu-call")
    q, k, v = (randn(gen, (1, 2, 5, 32), mx.float32) for _ in range(3))
    want = attention._run(q, k, v, *attention.validate_attention(q, k, v), mx.cpu)[0]
    got = mlx_flash.flash_attention(q, k, v, stream=mx.cpu)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    hits, misses, records, replayable = HOST.stats()
    assert records == 1 and replayable == 0
    assert _attention_key(q, k, v, stream=mx.cpu) is None
    again = mlx_flash.flash_attention(q, k, v, stream=mx.cpu)
    np.testing.assert_array_equal(np.array(again), np.array(want))
    assert HOST.stats()[0] == hits  # no replay


@needs_host
@needs_cpu_backend
def test_refusal_reason_is_reported(fresh_host):
    gen = rng("host-refusal")
    q, k, v = (randn(gen, (1, 2, 5, 32), mx.float32) for _ in range(3))
    key = _attention_key(q, k, v, stream=mx.cpu)
    fn = attention._differentiable(*attention._function_key(*attention.validate_attention(q, k, v), mx.cpu)[0])
    out, lse, reason = cuda_host.recorded(key, [q, k, v] + [None] * 6, lambda: fn(q, k, v))
    assert "no kernel launch" in reason
    # Outputs that are not one custom function's: refused before anything else.
    reason = HOST.record(key, [q, k, v] + [None] * 6, (q, k), [], None)
    assert "custom function" in reason


# ---------------------------------------------------------------------------
# The CUDA path on the CPU: fake kernels that compute with MLX ops.

class _FakeKernel:
    """Stands in for every CUDA kernel object: each output is a function of
    every input's values (weighted by position) and of the launch shape, so
    a replay that wires an input, a constant or the launch differently gives
    other numbers; an output of q's shape (out) also holds sin(q) element by
    element, so new q values show in any dtype. Registered as its own spec:
    the extension calls it back."""

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                 verbose=False, stream=None):
        total = mx.array(1e-3 * (sum(grid) + 3 * sum(threadgroup) + 7 * len(template or ()) + (init_value or 0)))
        for i, x in enumerate(inputs):
            total = total + (i + 1) * mx.mean(mx.sin(x.astype(mx.float32)), stream=stream)
        outputs = []
        for j, (s, d) in enumerate(zip(output_shapes, output_dtypes)):
            value = total + j
            if tuple(s) == tuple(inputs[0].shape):
                value = value + mx.sin(inputs[0].astype(mx.float32))
            outputs.append(mx.broadcast_to(value, tuple(s)).astype(d))
        return outputs


@pytest.fixture
def fake_cuda(fresh_host, monkeypatch):
    """dispatch answers "cuda", the CUDA wrappers get _FakeKernel objects, and
    both entry points ask the extension (as on a CUDA machine)."""
    from mlx_flash import dispatch
    from mlx_flash.backends import cuda as cb
    from mlx_flash.backends import cuda_quant as cq

    fake = _FakeKernel()
    monkeypatch.setitem(cuda_host.KERNEL_SPECS, id(fake), fake)
    monkeypatch.setattr(cb, "_kernel", lambda *a, **kw: fake)
    monkeypatch.setattr(cq, "_kernel", lambda *a, **kw: fake)
    monkeypatch.setattr(cq, "_strided_kernel", lambda *a, **kw: fake)
    monkeypatch.setattr(dispatch, "backend_name", lambda stream: "cuda")
    monkeypatch.setattr(attention, "_HOST", HOST)
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    monkeypatch.setattr(cb, "_TICKET_POOLS", {})
    cached = (cb._wgmma_fwd_config, cb._mma_fwd_config, cb._simt_fwd_config, cb._wgmma_bwd_config,
              cb._mma_bwd_config, cb._simt_bwd_config, cb._decode_launch_cached, cq._decode_launch,
              attention._differentiable, attention_quantized._differentiable)
    for c in cached:
        c.cache_clear()
    yield cb
    for c in cached:
        c.cache_clear()


def _decode_qkv(gen, hq, hkv, nq, nk, d, dtype):
    """Fresh q [1, hq, nq, d] and k, v [1, hkv, nk, d]."""
    return randn(gen, (1, hq, nq, d), dtype), randn(gen, (1, hkv, nk, d), dtype), randn(gen, (1, hkv, nk, d), dtype)


FAKE_CASES = {
    "fp16 32:8": (mx.float16, 32, 8, 1, 4099, 128, {}),
    "bf16 causal lse": (mx.bfloat16, 8, 2, 2, 517, 64, dict(causal=True, return_lse=True)),
    "fp16 window sinks": (mx.float16, 16, 4, 1, 2049, 128, dict(window=(300, 0), sinks="f32")),
    "fp16 unsplit": (mx.float16, 4, 2, 1, 1, 64, dict(scale=0.3)),
}


@needs_host
@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_replay_on_fake_kernels_matches_python_path(fake_cuda, case):
    dtype, hq, hkv, nq, nk, d, options = FAKE_CASES[case]
    gen = rng("host-fake", case)
    q, k, v = _decode_qkv(gen, hq, hkv, nq, nk, d, dtype)
    options = dict(options)
    if options.get("sinks") == "f32":
        options["sinks"] = randn(gen, (hq,), mx.float32)
    call = lambda: mlx_flash.flash_attention(q, k, v, **options)  # noqa: E731
    want, first, replayed = _both_paths(call)
    _assert_identical(want, first)
    _assert_identical(want, replayed)
    # New values under the same key: the replay reads them (not the recorded call's).
    q2 = randn(gen, q.shape, dtype)
    HOST.set_enabled(False)
    want2 = mlx_flash.flash_attention(q2, k, v, **options)
    HOST.set_enabled(True)
    got2 = mlx_flash.flash_attention(q2, k, v, **options)
    _assert_identical(want2, got2)
    assert not np.array_equal(np.array((want2[0] if isinstance(want2, tuple) else want2).astype(mx.float32)),
                              np.array((want[0] if isinstance(want, tuple) else want).astype(mx.float32)))
    # A changed option is another key: recorded anew, not replayed.
    hits = HOST.stats()[0]
    mx.eval(mlx_flash.flash_attention(q, k, v, **dict(options, softcap=5.0)))
    assert HOST.stats()[0] == hits


@needs_host
def test_replay_on_fake_kernels_gradients_and_ticket_pool(fake_cuda):
    cb = fake_cuda
    gen = rng("host-fake-grad")
    q, k, v = _decode_qkv(gen, 32, 8, 1, 8192, 128, mx.float16)
    sinks = randn(gen, (32,), mx.float32)
    spec, _ = attention.validate_attention(q, k, v)
    assert cb.decode_plan(spec)[-1] > 1  # a split call: it takes a ticket region
    grad = mx.grad(lambda q, sinks: mlx_flash.flash_attention(q, k, v, sinks=sinks).astype(mx.float32).sum(),
                   argnums=(0, 1))
    want, first, replayed = _both_paths(lambda: grad(q, sinks))
    _assert_identical(want, first)
    _assert_identical(want, replayed)
    pool = cb._TICKET_POOLS[None]
    start = pool[2]
    outs = [mlx_flash.flash_attention(q, k, v) for _ in range(6)]  # one recorded (a new key), five replayed
    assert pool[2] == start + 6
    HOST.set_enabled(False)
    mlx_flash.flash_attention(q, k, v)
    assert pool[2] == start + 7  # the Python path counts on from where the replays left it
    HOST.set_enabled(True)
    _assert_identical(outs[0], outs[-1])


@needs_host
@pytest.mark.parametrize("bits", [4, 8])
def test_replay_on_fake_kernels_quantized_decode(fake_cuda, bits):
    gen = rng("host-fake-quant", bits)
    q = randn(gen, (1, 32, 1, 128), mx.float16)
    kq = mx.quantize(randn(gen, (1, 8, 1000, 128), mx.float16), group_size=64, bits=bits)
    vq = mx.quantize(randn(gen, (1, 8, 1000, 128), mx.float16), group_size=64, bits=bits)
    sinks = randn(gen, (32,), mx.float32)
    for options in ({}, dict(sinks=sinks, return_lse=True)):
        call = lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=64, **options)  # noqa: E731
        want, first, replayed = _both_paths(call)
        _assert_identical(want, first)
        _assert_identical(want, replayed)
    # A view of the cache (mlx-lm's keys[..., :offset, :]) replays through the same key
    # as any array of its shape; gradients to q.
    kv = tuple(a[:, :, :700] for a in kq)
    vv = tuple(a[:, :, :700] for a in vq)
    qgrad = mx.grad(lambda q: mlx_flash.flash_attention_quantized(q, kv, vv, bits=bits, group_size=64).astype(
        mx.float32).sum())
    want, first, replayed = _both_paths(lambda: qgrad(q))
    _assert_identical(want, first)
    _assert_identical(want, replayed)


def _short_replays():
    return HOST.short_graph_stats()[0]


def _check_short_graph(call, grad_call, compiled_call):
    """An untraced replay leaves out the custom function's nodes (one more short
    replay) with the Python path's values; a replay under mx.grad or inside
    an mx.compile trace keeps them (no short replay) with the Python path's
    gradients and values; MLX_FLASH_CUDA_HOST_SHORT=0's switch keeps them
    everywhere. `compiled_call` must trace anew each time (a new function)."""
    want, first, replayed = _both_paths(call)  # recorded, then one replay (untraced)
    _assert_identical(want, replayed)
    shorts = _short_replays()
    _assert_identical(want, call())
    assert _short_replays() == shorts + 1, "an untraced replay built the custom function's nodes"
    for traced in (grad_call, compiled_call):
        HOST.set_enabled(False)
        want_traced = traced()
        mx.eval(want_traced)
        HOST.set_enabled(True)
        mx.eval(traced())  # records the key the traced call makes, if it is new
        shorts, hits = _short_replays(), HOST.stats()[0]
        got = traced()
        assert HOST.stats()[0] > hits, "the traced call was not replayed"
        assert _short_replays() == shorts, "a traced replay left out the custom function's nodes"
        if traced is grad_call:
            # dQ (and the sinks' gradient) are float32 atomic sums over key
            # blocks on the GPU: no two runs, replayed or not, add in one order.
            _assert_same_but_for_sum_order(want_traced, got)
        else:
            _assert_identical(want_traced, got)
    HOST.set_short_graph(False)
    try:
        shorts = _short_replays()
        _assert_identical(want, call())
        assert _short_replays() == shorts
    finally:
        HOST.set_short_graph(True)


def _short_graph_cases(gen, nk):
    """_check_short_graph over flash_attention (sinks, lse) and the 4-bit
    quantized op at a 32:8 decode of `nk` keys: plain, under mx.grad, in mx.compile."""
    q, k, v = _decode_qkv(gen, 32, 8, 1, nk, 128, mx.float16)
    sinks = randn(gen, (32,), mx.float32)
    w = randn(gen, (1, 32, 1, 128), mx.float32)
    call = lambda: mlx_flash.flash_attention(q, k, v, sinks=sinks, return_lse=True)  # noqa: E731
    grad = mx.grad(lambda q, sinks: (mlx_flash.flash_attention(q, k, v, sinks=sinks).astype(mx.float32) * w).sum(),
                   argnums=(0, 1))
    # A new function each time: mx.compile traces (and so calls attention) once per function.
    compiled = lambda: mx.compile(lambda q: mlx_flash.flash_attention(q, k, v, sinks=sinks, return_lse=True))(q)  # noqa: E731
    _check_short_graph(call, lambda: grad(q, sinks), compiled)
    kq = mx.quantize(k, group_size=64, bits=4)
    vq = mx.quantize(v, group_size=64, bits=4)
    qcall = lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64)  # noqa: E731
    qgrad = mx.grad(lambda q: (mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64).astype(
        mx.float32) * w).sum())
    qcompiled = lambda: mx.compile(lambda q: mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64))(q)  # noqa: E731
    _check_short_graph(qcall, lambda: qgrad(q), qcompiled)


@needs_host
def test_untraced_replay_leaves_out_the_custom_function_nodes_on_fake_kernels(fake_cuda):
    _short_graph_cases(rng("host-fake-short"), 2051)


@needs_host
def test_untraced_inputs_inside_a_trace_replay_short(fake_cuda):
    """A call inside mx.grad whose arrays are all outside the trace (a closure's)
    cannot carry a gradient: it replays short, and the traced parts still get
    theirs."""
    gen = rng("host-fake-closure")
    q, k, v = _decode_qkv(gen, 8, 2, 1, 999, 64, mx.float16)
    x = randn(gen, (1, 8, 1, 64), mx.float32)
    mx.eval(mlx_flash.flash_attention(q, k, v), mlx_flash.flash_attention(q, k, v))  # recorded and replayed
    HOST.set_enabled(False)
    want_out = mlx_flash.flash_attention(q, k, v).astype(mx.float32)
    HOST.set_enabled(True)
    shorts = _short_replays()
    grad = mx.grad(lambda x: (x * mlx_flash.flash_attention(q, k, v).astype(mx.float32)).sum())(x)
    assert _short_replays() == shorts + 1
    _assert_identical(want_out, grad)


def test_key_count_ranges_hold_one_split_count():
    """decode_key_range's bounds (cuda._decode_splits_until, cuda_quant's) against every key count:
    over consecutive ranges from 1 key to 20000 (and past windows), each count of a range has the
    range's split count (the bound may end a range early, never late). Runs without a GPU."""
    from mlx_flash._quant_spec import QuantSpec
    from mlx_flash.backends import cuda as cb
    from mlx_flash.backends import cuda_quant as cq

    def ranges_hold(splits, until, rule):
        keys = 1
        while keys <= 20000:
            end, want = until(rule, keys), splits(rule, keys)
            assert end >= keys
            for e in range(keys + 1, min(end, 20001) + 1):
                assert splits(rule, e) == want, (rule, keys, end, e)
            keys = end + 1

    for (nw, bn), cap, tiles, forced in itertools.product(((4, 16), (8, 32)), (0, 1, 5, 16, 33, 128), (1, 2),
                                                          (None, 7, 500)):
        ranges_hold(cb._decode_splits, cb._decode_splits_until, (nw, bn, 3, 0, 1, cap, tiles, forced))
    for rule in itertools.product((0, 1, 16, 66, 400), (4, 8), (None, 9), (3, 1024)):  # cap, nw, forced, limit
        ranges_hold(cq._decode_splits, cq._decode_splits_until, rule)
    # Whole specs, windows among them: every key count of a range has the range's plan.
    gen = rng("key-count-ranges")
    for hkv, nk, options in ((8, 1, {}), (8, 8190, {}), (4, 30000, {}), (2, 1500, dict(window=(300, 0))),
                             (2, 200, dict(window=(300, 0))), (2, 5000, dict(window=(1000, None))),
                             (8, 600, dict(causal=True))):
        q = randn(gen, (1, 32, 1, 128), mx.float16)
        k = mx.zeros((1, hkv, nk, 128), mx.float16)
        spec, _ = attention.validate_attention(q, k, k, **options)
        lo, hi = cb.decode_key_range(spec, cb._decode_tuning())
        assert lo == nk and hi >= nk
        plan = cb.decode_plan(spec)
        for n in list(range(nk, min(hi, nk + 3000) + 1)) + [hi]:
            assert cb.decode_plan(spec._replace(seqlen_k=n)) == plan, (hkv, nk, options, n)
        qspec = QuantSpec(spec, 4, 64)
        lo, hi = cq.decode_key_range(qspec)
        assert lo == nk and hi >= nk
        plan = cq.decode_plan(qspec)
        for n in list(range(nk, min(hi, nk + 3000) + 1)) + [hi]:
            assert cq.decode_plan(QuantSpec(spec._replace(seqlen_k=n), 4, 64)) == plan, (hkv, nk, options, n)


# A KV cache one key longer every call (generation): (dtype, Hq, Hkv, Nq, first Nk, D, options).
KEY_COUNT_CASES = {
    "fp16 32:8 across a split count": (mx.float16, 32, 8, 1, 8189, 128, {}),
    "bf16 causal 2 queries lse": (mx.bfloat16, 8, 2, 2, 637, 64, dict(causal=True, return_lse=True)),
    "fp16 window sinks": (mx.float16, 16, 4, 1, 1500, 128, dict(window=(300, 0), sinks="f32")),
    "fp16 softcap from one key": (mx.float16, 4, 2, 1, 1, 64, dict(softcap=20.0, scale=0.3)),
}


def _key_count_stats():
    return HOST.key_count_stats()[0], HOST.stats()[2]  # key-count replays, records


def _growing_cache_case(cb, case):
    """Calls over k / v views one key longer each time, from the case's first
    key count past the end of its recorded range (cuda.decode_key_range) into
    the next range: each is bit-identical to the Python path at that count;
    inside the range each new count replays from C++ without a record, the
    first count past it is recorded anew (its own family), the next replays
    again; a traced call at a new count takes the Python path (its vjp)."""
    dtype, hq, hkv, nq, nk, d, options = KEY_COUNT_CASES[case]
    gen = rng("host-key-count", case)
    q = randn(gen, (1, hq, nq, d), dtype)
    cache_k, cache_v = (randn(gen, (1, hkv, nk + 140, d), dtype) for _ in range(2))
    options = dict(options)
    if options.get("sinks") == "f32":
        options["sinks"] = randn(gen, (hq,), mx.float32)
    checks = {o: options[o] for o in ("scale", "causal", "window", "softcap", "sinks") if o in options}
    spec, _ = attention.validate_attention(q, cache_k[:, :, :nk], cache_v[:, :, :nk], **checks)
    lo, hi = cb.decode_key_range(spec, cb._decode_tuning())
    assert lo == nk and hi > nk
    crosses = hi + 2 <= cache_k.shape[2]
    counts = [nk, nk + 1, nk + 2, (nk + hi) // 2, hi] + ([hi + 1, hi + 2] if crosses else [])

    def call(n):
        return mlx_flash.flash_attention(q, cache_k[:, :, :n], cache_v[:, :, :n], **options)

    for i, n in enumerate(dict.fromkeys(counts)):
        HOST.set_enabled(False)
        want = call(n)
        mx.eval(want)
        HOST.set_enabled(True)
        replays, records = _key_count_stats()
        got = call(n)
        mx.eval(got)
        _assert_identical(want, got)
        new_family = i == 0 or n == hi + 1
        assert _key_count_stats() == ((replays, records + 1) if new_family else (replays + 1, records)), n
    # Another count of the range inside mx.grad: the Python path, recorded, with its own gradient.
    n = nk + 1 if not crosses else hi + 3
    grad = mx.grad(lambda q: mlx_flash.flash_attention(q, cache_k[:, :, :n], cache_v[:, :, :n],
                                                       **options)[0 if options.get("return_lse") else ...]
                   .astype(mx.float32).sum())
    HOST.set_enabled(False)
    want = grad(q)
    HOST.set_enabled(True)
    replays, records = _key_count_stats()
    got = grad(q)
    mx.eval(want, got)
    _assert_identical(want, got)
    assert _key_count_stats()[0] == replays
    return crosses


@needs_host
@pytest.mark.parametrize("case", list(KEY_COUNT_CASES))
def test_growing_cache_replays_new_key_counts_on_fake_kernels(fake_cuda, case):
    crosses = _growing_cache_case(fake_cuda, case)
    assert crosses or "window" in case  # a window's key count stops changing the plan once it is full


def _growing_quantized_cache_case(bits, options):
    """_growing_cache_case for flash_attention_quantized over views of a quantized cache (mlx-lm's
    QuantizedKVCache hands out keys[..., :offset, :] of each of the three arrays)."""
    from mlx_flash._quant_spec import validate_attention_quantized
    from mlx_flash.backends import cuda_quant as cq

    gen = rng("host-key-count-quant", bits, len(options))
    q = randn(gen, (1, 32, 1, 128), mx.float16)
    cache = [mx.quantize(randn(gen, (1, 8, 1700, 128), mx.float16), group_size=64, bits=bits) for _ in range(2)]
    options = dict(options)
    if options.get("sinks") == "f32":
        options["sinks"] = randn(gen, (32,), mx.float32)

    def views(n):
        return [tuple(a[:, :, :n] for a in c) for c in cache]

    nk = 1001
    qspec = validate_attention_quantized(q, *views(nk), bits=bits, group_size=64,
                                         **{o: options[o] for o in ("window", "sinks") if o in options})[0]
    lo, hi = cq.decode_key_range(qspec)
    assert lo == nk and nk < hi < 1698
    for i, n in enumerate((nk, nk + 1, (nk + hi) // 2, hi, hi + 1, hi + 2)):
        call = lambda: mlx_flash.flash_attention_quantized(q, *views(n), bits=bits, group_size=64,  # noqa: E731
                                                           **options)
        HOST.set_enabled(False)
        want = call()
        mx.eval(want)
        HOST.set_enabled(True)
        replays, records = _key_count_stats()
        got = call()
        mx.eval(got)
        _assert_identical(want, got)
        new_family = i == 0 or n == hi + 1
        assert _key_count_stats() == ((replays, records + 1) if new_family else (replays + 1, records)), n
    # k's arrays of two key counts: no family replay; the Python path's checks give their error.
    k = views(hi + 2)[0]
    with pytest.raises(ValueError):
        mlx_flash.flash_attention_quantized(q, (k[0], k[1][:, :, :hi + 1], k[2]), views(hi + 2)[1], bits=bits,
                                            group_size=64)


@needs_host
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("options", [{}, dict(return_lse=True, sinks="f32")], ids=["plain", "sinks lse"])
def test_growing_quantized_cache_replays_new_key_counts_on_fake_kernels(fake_cuda, bits, options):
    _growing_quantized_cache_case(bits, options)


@needs_host
@pytest.mark.parametrize("kv_bits", [None, 4], ids=["fp16 cache", "4-bit cache"])
def test_mlx_lm_generation_replays_each_new_key_count_on_fake_kernels(fake_cuda, kv_bits):
    """mlx-lm's greedy generation, patched, over fake CUDA kernels: the same tokens with the replay as
    through the Python path, and every decode step past the first served from C++ at its new key
    count (the cache is one token longer each step; the fp16 cache's keys are views of mlx-lm's
    pre-allocated buffer)."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import _get_classes

    config = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, vocab_size=97,
                  tie_word_embeddings=False)
    mx.random.seed(0)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, 97, (40,), key=mx.random.key(1))
    quant = {} if kv_bits is None else dict(kv_bits=kv_bits, kv_group_size=64, quantized_kv_start=0)

    def generate():
        with mlx_flash.patch_mlx_lm():
            return [int(tok) for tok, _ in generate_step(prompt, model, max_tokens=20, prefill_step_size=16,
                                                         **quant)]

    HOST.set_enabled(False)
    want = generate()
    HOST.set_enabled(True)
    replays = HOST.key_count_stats()[0]
    got = generate()
    assert got == want
    # 3 prompt chunks and 19 decode steps, 2 layers each: past each shape's first call, most calls meet a new key count.
    assert HOST.key_count_stats()[0] - replays >= 2 * 15


@needs_host
def test_key_count_replay_leaves_other_calls_alone(fake_cuda, monkeypatch):
    """Only the calls a family covers replay at another key count: k and v of
    different key counts get the Python path's error, masked calls (a mask
    follows the key count; both entries) record each count, a settings change
    makes a new family, and HOST.clear forgets them."""
    cb = fake_cuda
    gen = rng("host-key-count-others")
    q = randn(gen, (1, 8, 1, 64), mx.float16)
    k, v = (randn(gen, (1, 2, 300, 64), mx.float16) for _ in range(2))
    start = HOST.key_count_stats()[0]
    stats = lambda: (HOST.key_count_stats()[0] - start, HOST.key_count_stats()[1])  # noqa: E731
    mx.eval(mlx_flash.flash_attention(q, k[:, :, :200], v[:, :, :200]))
    assert stats() == (0, 1)
    with pytest.raises(ValueError, match="k"):
        mlx_flash.flash_attention(q, k[:, :, :201], v[:, :, :202])
    mx.eval(mlx_flash.flash_attention(q, k[:, :, :201], v[:, :, :201]))
    assert stats() == (1, 1)
    for n in (200, 201):  # masked: recorded per count, never a family
        mask = mx.ones((1, 1, 1, n), mx.bool_)
        mx.eval(mlx_flash.flash_attention(q, k[:, :, :n], v[:, :, :n], mask=mask))
    assert stats() == (1, 1)
    kq, vq = (mx.quantize(x, group_size=64, bits=4) for x in (k, v))
    for n in (200, 201):  # the quantized decode with a mask: not the decode kernel, no family
        mask = mx.ones((1, 1, 1, n), mx.bool_)
        mx.eval(mlx_flash.flash_attention_quantized(q, tuple(a[:, :, :n] for a in kq),
                                                    tuple(a[:, :, :n] for a in vq), bits=4, group_size=64,
                                                    mask=mask))
    assert stats() == (1, 1)
    records = HOST.stats()[2]
    monkeypatch.setattr(cb, "_SMS", cb._SMS)  # any settings assignment: a new epoch, so new keys and families
    mx.eval(mlx_flash.flash_attention(q, k[:, :, :202], v[:, :, :202]))
    assert stats() == (1, 2) and HOST.stats()[2] == records + 1
    HOST.clear()
    assert HOST.key_count_stats()[1] == 0
    monkeypatch.setattr(cuda_host, "KEY_COUNTS", False)  # MLX_FLASH_CUDA_HOST_KEY_COUNTS=0: no families
    for n in (210, 211):
        mx.eval(mlx_flash.flash_attention(q, k[:, :, :n], v[:, :, :n]))
    assert stats() == (1, 0) and HOST.stats()[2] == 2


@needs_host
@pytest.mark.parametrize("value, want", [("0", "False"), ("1", "True"), ("no", "ValueError")])
def test_key_count_switch_from_the_environment(value, want):
    import os
    import subprocess
    import sys

    code = "from mlx_flash.backends import cuda_host\nprint(cuda_host.KEY_COUNTS)"
    env = {**os.environ, "MLX_FLASH_CUDA_HOST_KEY_COUNTS": value}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if want == "ValueError":
        assert run.returncode != 0 and "MLX_FLASH_CUDA_HOST_KEY_COUNTS: expected 0 or 1" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == want


@needs_host
@pytest.mark.parametrize("value, want", [("0", "False"), ("1", "True"), ("2", "ValueError"), ("yes", "ValueError")])
def test_short_graph_switch_from_the_environment(value, want):
    """MLX_FLASH_CUDA_HOST_SHORT: 0 keeps the custom function's nodes on every
    replay, 1 (the default) leaves them out of untraced ones; anything else is
    an error naming the variable, at import."""
    import os
    import subprocess
    import sys

    code = ("from mlx_flash.backends import cuda_host\n"
            "print(cuda_host.HOST.short_graph_stats()[1])")
    env = {**os.environ, "MLX_FLASH_CUDA_HOST_SHORT": value}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if want == "ValueError":
        assert run.returncode != 0
        assert "MLX_FLASH_CUDA_HOST_SHORT: expected 0 or 1" in run.stderr and repr(value) in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == want


# ---------------------------------------------------------------------------
# On a CUDA GPU.

def _both_paths(call):
    """(Python path's result, the recording call's, a replayed call's), all evaluated."""
    HOST.set_enabled(False)
    want = call()
    mx.eval(want)
    HOST.set_enabled(True)
    first = call()
    hits = HOST.stats()[0]
    replayed = call()
    assert HOST.stats()[0] == hits + 1, "the second call was not replayed"
    mx.eval(first, replayed)
    return want, first, replayed


def _result_pairs(want, got):
    """(dtype, want, got) of each output, as float32 NumPy arrays, after checking count, dtypes and shapes."""
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        yield w.dtype, np.array(w.astype(mx.float32)), np.array(g.astype(mx.float32))


def _assert_identical(want, got):
    for _, w, g in _result_pairs(want, got):
        np.testing.assert_array_equal(g, w)  # bit for bit (NaN where NaN)


# Relative precision of each dtype (the spacing of its values at 1).
_EPS = {mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7, mx.float32: 2.0 ** -23}


def _assert_same_but_for_sum_order(want, got):
    """Equal but for the order of float32 atomic additions: each element
    within one rounding of its dtype plus a float32 sum's reordering error,
    1e-5 of the array's largest magnitude (far above 2^-23 times the few
    thousand terms of a row's sum, far below any wrong result)."""
    for dtype, w, g in _result_pairs(want, got):
        assert np.array_equal(np.isnan(w), np.isnan(g))
        tol = _EPS[dtype] * np.abs(w) + 1e-5 * np.nanmax(np.abs(w))
        bad = ~(np.abs(g - w) <= tol) & ~np.isnan(w)
        assert not bad.any(), f"{bad.sum()} elements differ by more than the sum order explains: " \
            f"max |diff| {np.nanmax(np.abs(g - w))}"


DECODE_CASES = {
    "fp16 32:8 Nk 4099": (mx.float16, 32, 8, 1, 4099, 128, {}),
    "bf16 32:4 Nk 1023": (mx.bfloat16, 32, 4, 1, 1023, 128, {}),
    "fp16 causal 2 queries": (mx.float16, 8, 2, 2, 517, 64, dict(causal=True)),
    "fp16 window": (mx.float16, 16, 4, 1, 2049, 128, dict(window=(300, 0))),
    "bf16 sinks lse": (mx.bfloat16, 8, 8, 1, 777, 128, dict(sinks="f32", return_lse=True)),
    "fp16 softcap scale lse": (mx.float16, 4, 1, 1, 33, 64, dict(softcap=20.0, scale=0.1, return_lse=True)),
    "fp16 Nk 1": (mx.float16, 4, 2, 1, 1, 64, {}),
}


@needs_cuda
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_replay_is_bit_identical_decode(fresh_host, monkeypatch, case):
    monkeypatch.setattr(attention, "_HOST", HOST)
    dtype, hq, hkv, nq, nk, d, options = DECODE_CASES[case]
    gen = rng("host-decode", case)
    q, k, v = _decode_qkv(gen, hq, hkv, nq, nk, d, dtype)
    options = dict(options)
    if options.get("sinks") == "f32":
        options["sinks"] = randn(gen, (hq,), mx.float32)
    want, first, replayed = _both_paths(lambda: mlx_flash.flash_attention(q, k, v, **options))
    _assert_identical(want, first)
    _assert_identical(want, replayed)
    # Other arrays of the same key replay too, with their own values.
    q2 = randn(gen, q.shape, dtype)
    HOST.set_enabled(False)
    want2 = mlx_flash.flash_attention(q2, k, v, **options)
    HOST.set_enabled(True)
    _assert_identical(want2, mlx_flash.flash_attention(q2, k, v, **options))


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("options", [{}, dict(return_lse=True, sinks="f32", window=(1000, 0))], ids=["plain", "features"])
def test_replay_is_bit_identical_quantized_decode(fresh_host, monkeypatch, bits, options):
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    gen = rng("host-quant", bits, len(options))
    q = randn(gen, (1, 32, 1, 128), mx.float16)
    kq = mx.quantize(randn(gen, (1, 8, 3001, 128), mx.float16), group_size=64, bits=bits)
    vq = mx.quantize(randn(gen, (1, 8, 3001, 128), mx.float16), group_size=64, bits=bits)
    options = dict(options)
    if options.get("sinks") == "f32":
        options["sinks"] = randn(gen, (32,), mx.float32)
    call = lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=bits, group_size=64, **options)  # noqa: E731
    want, first, replayed = _both_paths(call)
    _assert_identical(want, first)
    _assert_identical(want, replayed)


@needs_cuda
@pytest.mark.parametrize("case", list(KEY_COUNT_CASES))
def test_growing_cache_replay_is_bit_identical_on_gpu(fresh_host, monkeypatch, case):
    from mlx_flash.backends import cuda as cb

    monkeypatch.setattr(attention, "_HOST", HOST)
    _growing_cache_case(cb, case)


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_growing_quantized_cache_replay_is_bit_identical_on_gpu(fresh_host, monkeypatch, bits):
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    _growing_quantized_cache_case(bits, dict(return_lse=True, sinks="f32"))


@needs_cuda
def test_replay_through_cuda_kernel_calls_is_bit_identical(fresh_host, monkeypatch):
    """MLX_FLASH_CUDA_HOST_KERNEL=1's form: each replay calls mx::fast::cuda_kernel
    (kernel objects rebuilt from KERNEL_SPECS) instead of sharing the node's primitive."""
    monkeypatch.setattr(attention, "_HOST", HOST)
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    HOST.set_reuse_primitives(False)
    try:
        gen = rng("host-kernel-calls")
        q, k, v = _decode_qkv(gen, 32, 8, 1, 5000, 128, mx.float16)
        want, first, replayed = _both_paths(lambda: mlx_flash.flash_attention(q, k, v, return_lse=True))
        _assert_identical(want, replayed)
        kq, vq = mx.quantize(k, group_size=64, bits=4), mx.quantize(v, group_size=64, bits=4)
        want, first, replayed = _both_paths(
            lambda: mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64, return_lse=True))
        _assert_identical(want, replayed)
    finally:
        HOST.set_reuse_primitives(True)


@needs_cuda
def test_replay_gradients_equal_python_path(fresh_host, monkeypatch):
    monkeypatch.setattr(attention, "_HOST", HOST)
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    gen = rng("host-grad")
    q, k, v = _decode_qkv(gen, 8, 2, 1, 301, 128, mx.float16)
    sinks = randn(gen, (8,), mx.float32)
    dout = randn(gen, (1, 8, 1, 128), mx.float16)

    def loss(q, k, v, sinks):
        out, lse = mlx_flash.flash_attention(q, k, v, sinks=sinks, return_lse=True)
        return (out.astype(mx.float32) * dout.astype(mx.float32)).sum() + lse.sum()

    grad = mx.grad(loss, argnums=(0, 1, 2, 3))
    want, first, replayed = _both_paths(lambda: grad(q, k, v, sinks))
    # dQ (and the sinks') sums come from float32 atomics, whose order varies run to run: an H100 run of
    # session 16 had 2 of 1024 fp16 dq elements one rounding apart between two Python-path-equal calls.
    _assert_same_but_for_sum_order(want, first)
    _assert_same_but_for_sum_order(want, replayed)
    # The quantized op: gradients to q.
    kq = mx.quantize(k, group_size=64, bits=4)
    vq = mx.quantize(v, group_size=64, bits=4)
    qgrad = mx.grad(lambda q: mlx_flash.flash_attention_quantized(q, kq, vq, bits=4, group_size=64).astype(
        mx.float32).sum())
    want, first, replayed = _both_paths(lambda: qgrad(q))
    _assert_identical(want, first)
    _assert_identical(want, replayed)


@needs_cuda
def test_untraced_replay_is_short_and_bit_identical_on_gpu(fresh_host, monkeypatch):
    monkeypatch.setattr(attention, "_HOST", HOST)
    monkeypatch.setattr(attention_quantized, "_HOST", HOST)
    _short_graph_cases(rng("host-short-gpu"), 4099)


@needs_cuda
def test_replay_advances_the_ticket_pool_like_the_python_path(fresh_host, monkeypatch):
    from mlx_flash.backends import cuda

    monkeypatch.setattr(attention, "_HOST", HOST)
    gen = rng("host-pool")
    q, k, v = _decode_qkv(gen, 32, 8, 1, 8192, 128, mx.float16)
    spec, _ = attention.validate_attention(q, k, v)
    assert cuda.decode_plan(spec)[-1] > 1, "the case must split keys (the pool serves split calls)"
    HOST.set_enabled(False)
    want = mlx_flash.flash_attention(q, k, v)
    pool = cuda._TICKET_POOLS[None]
    HOST.set_enabled(True)
    start = pool[2]
    outs = [mlx_flash.flash_attention(q, k, v) for _ in range(5)]  # one recorded, four replayed
    assert pool[2] == start + 5
    assert HOST.stats()[0] >= 4
    mx.eval(outs)
    for out in outs:
        _assert_identical(want, out)
    # Many more calls than regions: every region is reset by its call's last block.
    outs = [mlx_flash.flash_attention(q, k, v) for _ in range(cuda._TICKET_REGIONS + 3)]
    mx.eval(outs)
    _assert_identical(want, outs[-1])
    assert not np.array(pool[0]).any()


@needs_cuda
def test_tuning_overrides_take_the_python_path(fresh_host, monkeypatch):
    from mlx_flash.backends import cuda

    monkeypatch.setattr(attention, "_HOST", HOST)
    gen = rng("host-tuning")
    q, k, v = _decode_qkv(gen, 8, 2, 1, 999, 64, mx.float16)
    mx.eval(mlx_flash.flash_attention(q, k, v), mlx_flash.flash_attention(q, k, v))
    hits = HOST.stats()[0]
    monkeypatch.setitem(cuda.DECODE_TUNING, "splits", 3)
    assert _attention_key(q, k, v) is None
    mx.eval(mlx_flash.flash_attention(q, k, v))
    assert HOST.stats()[0] == hits


# ---------------------------------------------------------------------------
# Replay of the tensor-core forwards (cuda_host.PREFILL, on by default;
# MLX_FLASH_CUDA_HOST_PREFILL=0 turns it off): prefill and training calls.

# (dtype, Hq, Hkv, Nq, Nk, D, options, route): the warp-specialised forward
# (D 64 from cuda_fwd_ws.MIN_KEYS_D64 keys: persistent, dynamic tickets),
# attention_fwd_wgmma (D 64, fewer keys) and, off Hopper, attention_fwd_mma.
PREFILL_CASES = {
    "ws D128 causal lse": (mx.float16, 4, 2, 150, 333, 128, dict(causal=True, return_lse=True), "ws"),
    "ws D64 long keys bf16": (mx.bfloat16, 2, 2, 70, 2100, 64, {}, "ws"),
    "wgmma D64 window": (mx.float16, 2, 1, 130, 200, 64, dict(window=(50, 0)), "wgmma"),
    "mma D96 GQA": (mx.float16, 4, 2, 40, 77, 96, dict(scale=0.2), "mma"),
}


def _prefill_call(case, gen):
    dtype, hq, hkv, nq, nk, d, options, route = PREFILL_CASES[case]
    q = randn(gen, (1, hq, nq, d), dtype)
    k, v = randn(gen, (1, hkv, nk, d), dtype), randn(gen, (1, hkv, nk, d), dtype)
    return q, k, v, options, route


def _route_of(q, k, v, options):
    from mlx_flash.backends import cuda as cb
    from mlx_flash.backends import cuda_fwd_ws

    spec, _ = attention.validate_attention(q, k, v, **{n: x for n, x in options.items() if n != "return_lse"})
    return "ws" if cb._uses_ws(spec) and cuda_fwd_ws.serves(spec) else "wgmma" if cb._uses_wgmma(spec) else "mma"


@pytest.fixture
def fake_prefill(fake_cuda, monkeypatch):
    """fake_cuda with the prefill replay on and the ws forward's defaults, TMA and an
    SM count stubbed (the tensor maps are fixed bytes here)."""
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(cuda_host, "PREFILL", True)
    for name, value in (("_ENABLED", True), ("CHECKED_ONLY", True), ("PERSISTENT", None), ("DYNAMIC", True),
                        ("HEAD_GROUP", None), ("TRACE", None), ("POISON_OUTPUTS", False), ("RESCALE_EARLY", None),
                        ("TURNS_CONTINUOUS", True)):
        monkeypatch.setattr(cuda_fwd_ws, name, value)
    monkeypatch.setattr(cuda_fwd_ws, "_tma_available", lambda: True)
    monkeypatch.setattr(cuda_fwd_ws, "sm_count", lambda: 4)
    monkeypatch.setattr(cuda_fwd_ws, "tensor_map_3d", lambda *a: bytes(range(128)))
    for c in (cuda_fwd_ws._templates, cuda_fwd_ws._kernel):
        c.cache_clear()
    yield fake_cuda
    for c in (cuda_fwd_ws._templates, cuda_fwd_ws._kernel):
        c.cache_clear()


@needs_host
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_replay_on_fake_kernels_matches_python_path(fake_prefill, monkeypatch, case):
    monkeypatch.setattr(fake_prefill, "_is_hopper", lambda: PREFILL_CASES[case][-1] != "mma")
    gen = rng("host-fake-prefill", case)
    q, k, v, options, route = _prefill_call(case, gen)
    assert _route_of(q, k, v, options) == route
    call = lambda: mlx_flash.flash_attention(q, k, v, **options)  # noqa: E731
    want, first, replayed = _both_paths(call)
    _assert_identical(want, first)
    _assert_identical(want, replayed)
    q2 = randn(gen, q.shape, q.dtype)  # new values, same key: the replay reads them
    HOST.set_enabled(False)
    want2 = mlx_flash.flash_attention(q2, k, v, **options)
    HOST.set_enabled(True)
    _assert_identical(want2, mlx_flash.flash_attention(q2, k, v, **options))
    # Gradients through a replayed forward (the custom function's Python vjp).
    first_output = (lambda r: r[0]) if options.get("return_lse") else (lambda r: r)  # noqa: E731
    grad = mx.grad(lambda q, k, v: first_output(mlx_flash.flash_attention(q, k, v, **options)).astype(
        mx.float32).sum(), argnums=(0, 1, 2))
    want, first, replayed = _both_paths(lambda: grad(q, k, v))
    _assert_identical(want, first)
    _assert_identical(want, replayed)


@needs_host
def test_prefill_stays_python_when_switched_off(fake_prefill, monkeypatch):
    monkeypatch.setattr(cuda_host, "PREFILL", False)
    monkeypatch.setattr(fake_prefill, "_is_hopper", lambda: True)
    q, k, v, options, _ = _prefill_call("ws D128 causal lse", rng("host-fake-prefill-off"))
    first = mlx_flash.flash_attention(q, k, v, **options)
    assert _attention_key(q, k, v, **options) is None  # recorded as "always Python"
    hits = HOST.stats()[0]
    _assert_identical(first, mlx_flash.flash_attention(q, k, v, **options))
    assert HOST.stats()[0] == hits



@needs_host
@pytest.mark.parametrize("change", ["attribute", "plan dict", "poison"])
def test_prefill_settings_change_makes_a_new_key(fake_prefill, monkeypatch, change):
    """A recorded ws forward is not replayed after a cuda_fwd_ws setting
    changes: the call is recorded anew and gives the new plan's numbers."""
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(fake_prefill, "_is_hopper", lambda: True)
    gen = rng("host-fake-prefill-settings", change)
    q, k, v, options, route = _prefill_call("ws D128 causal lse", gen)
    assert _route_of(q, k, v, options) == route == "ws"
    call = lambda: mlx_flash.flash_attention(q, k, v, **options)  # noqa: E731
    old, first, replayed = _both_paths(call)
    _assert_identical(old, replayed)
    hits, misses = HOST.stats()[:2]
    if change == "attribute":  # the other grid (persistent or one block per item): another launch shape
        monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", not cuda_fwd_ws.persistent(128))
    elif change == "plan dict":  # the same dict object, changed in place
        monkeypatch.setitem(cuda_fwd_ws.STAGES, 128, 3)
    else:
        monkeypatch.setattr(cuda_fwd_ws, "POISON_OUTPUTS", True)
    for c in (cuda_fwd_ws._templates, cuda_fwd_ws._kernel):
        c.cache_clear()
    got = call()
    mx.eval(got)
    assert HOST.stats()[:2] == (hits, misses + 1)  # a miss (a new key), not a replay
    HOST.set_enabled(False)
    want = call()
    HOST.set_enabled(True)
    _assert_identical(want, got)
    _assert_identical(want, call())  # the new record replays
    assert HOST.stats()[0] == hits + 1
    if change == "attribute":  # the fake kernels' numbers follow the launch shape
        assert not np.array_equal(np.array(want[0].astype(mx.float32)), np.array(old[0].astype(mx.float32)))


@needs_host
def test_settings_watch_keeps_module_behaviour(fresh_host):
    """The watched modules and dicts read and compare as before; a module
    rebinding or a dict change bumps the epoch, a read does not."""
    from mlx_flash.backends import cuda_fwd_ws

    cuda_host.watch_settings()
    epoch = cuda_host.SETTINGS_EPOCH[0]
    assert cuda_fwd_ws.STAGES == {128: cuda_fwd_ws.STAGES[128], 64: cuda_fwd_ws.STAGES[64]}
    assert isinstance(cuda_fwd_ws.STAGES, dict) and cuda_fwd_ws.RESCALE_EARLY in (True, False, None)
    assert cuda_host.SETTINGS_EPOCH[0] == epoch
    old = cuda_fwd_ws.STAGES.pop(64)
    cuda_fwd_ws.STAGES[64] = old
    cuda_fwd_ws.RESCALE_EARLY = cuda_fwd_ws.RESCALE_EARLY
    assert cuda_host.SETTINGS_EPOCH[0] == epoch + 3


GPU_PREFILL_CASES = {
    "fp16 (4,16,1024,64)": (mx.float16, 16, 16, 1024, 1024, 64, {}),  # wgmma by default; ws with FWD_WS=all
    "ws fp16 D128 8K causal lse": (mx.float16, 16, 16, 1000, 8192, 128, dict(causal=True, return_lse=True)),
    "ws bf16 D64 4K GQA": (mx.bfloat16, 16, 4, 777, 4096, 64, {}),
    "ws fp16 D128 window": (mx.float16, 8, 8, 513, 2049, 128, dict(window=(256, 0))),
    "fp16 D96": (mx.float16, 8, 8, 300, 700, 96, {}),  # ws (a checked wide pair)
}


@needs_cuda
@pytest.mark.parametrize("case", list(GPU_PREFILL_CASES))
def test_prefill_replay_is_bit_identical_on_gpu(fresh_host, monkeypatch, case):
    """With the opt-in: out, lse, dk and dv of replayed prefill calls equal the Python path's bit for bit, dq up to the order of its atomic adds."""
    monkeypatch.setattr(attention, "_HOST", HOST)
    monkeypatch.setattr(cuda_host, "PREFILL", True)
    dtype, hq, hkv, nq, nk, d, options = GPU_PREFILL_CASES[case]
    gen = rng("host-prefill", case)
    q = randn(gen, (4 if nq == 1024 else 1, hq, nq, d), dtype)
    k, v = (randn(gen, (q.shape[0], hkv, nk, d), dtype) for _ in range(2))
    options = dict(options, return_lse=True)
    want, first, replayed = _both_paths(lambda: mlx_flash.flash_attention(q, k, v, **options))
    _assert_identical(want, first)
    _assert_identical(want, replayed)
    dout = randn(gen, want[0].shape, dtype)

    def loss(q, k, v):
        out, lse = mlx_flash.flash_attention(q, k, v, **options)
        return (out.astype(mx.float32) * dout.astype(mx.float32)).sum() + lse.sum()

    grad = mx.grad(loss, argnums=(0, 1, 2))
    want, first, replayed = _both_paths(lambda: grad(q, k, v))
    # dQ is summed over key blocks by float32 atomics, whose order differs
    # from run to run: two Python-path runs differ in dq's last bit too (the
    # H200, session 10: up to 1 ulp of the dtype at 0.002-0.025% of
    # elements). dK and dV are written once per key block: bit for bit.
    _assert_within_atomic_order(want[0], first[0])
    _assert_within_atomic_order(want[0], replayed[0])
    _assert_identical(want[1:], first[1:])
    _assert_identical(want[1:], replayed[1:])


def _assert_within_atomic_order(want, got):
    """got equals want up to the rounding that a different order of float32
    atomic adds leaves after the cast to want's dtype: 2 ulps of the dtype at
    each element's magnitude, plus 2 ulps at a thousandth of the largest
    (a sum that cancels), and NaN exactly where want has NaN."""
    assert want.dtype == got.dtype and want.shape == got.shape
    eps = {mx.float16: 2.0 ** -10, mx.bfloat16: 2.0 ** -7, mx.float32: 2.0 ** -23}[want.dtype]
    w, g = np.array(want.astype(mx.float32)), np.array(got.astype(mx.float32))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    finite = np.isfinite(w)
    np.testing.assert_array_equal(g[~finite & ~np.isnan(w)], w[~finite & ~np.isnan(w)])
    scale = np.abs(w[finite]).max(initial=0.0)
    bound = 2 * eps * (np.abs(w[finite]) + 1e-3 * scale)
    excess = np.abs(g[finite] - w[finite]) - bound
    assert excess.max(initial=-1.0) <= 0, f"{int((excess > 0).sum())} elements past the atomic-order bound"
