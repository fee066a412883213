"""The Hopper (H100/H200) attention kernels, run on the CPU through the CUDA
emulation (tests/cuda_emu), against the float64 reference.

The CUDA wrappers route as on an H200 (harness.patched_hopper: sm_90, TMA,
three SMs, tensor maps in the emulation's encoding) and hand MLX the kernel
text they always do; the emulation rewrites its inline PTX (ptx_asm.py) into
hopper_emu.cuh: TMA tile loads with zero fill that land late, mbarriers,
named barriers, setmaxnreg, wgmma SS and RS executed at their wait, whose
shared-memory operands and A registers must not change in flight.

  forward   attention_fwd_ws.cuh as routed by default (D 64: three consumer
            warpgroups dense, two under causal / window rules; D 128: the
            176-key dense tile, 128 under rules; the wide heads), short D 64
            calls on attention_fwd_wgmma.cuh, and the opt-in variants
            (MLX_FLASH_CUDA_FWD_WS_*, set here on the module as the variable
            would at import);
  backward  attention_bwd_wgmma.cuh (default) for dq, dk, dv;
  non-finite the contract cases of nonfinite_cases.py through the forward.

Outputs are poisoned (NaN) before each launch. What this cannot show: timing,
the tensor cores' own rounding, and races outside wgmma's in-flight rule
(the fibers' cooperative schedule orders the rest). GPU twins:
tests/test_cuda_specific.py (test_ws_forward_on_gpu, ...).
"""

import mlx.core as mx
import numpy as np
import pytest

from helpers import check_close, plain_errors, randn, rng, to_np
from reference_np import attention_np

from cuda_emu import harness
from cuda_emu.nonfinite_cases import PREFILL_CASES, check_contract, prefill_case

pytestmark = [pytest.mark.usefixtures("cpu_default_device"),
              pytest.mark.skipif(harness.unavailable_reason() is not None,
                                 reason=f"CUDA emulation unavailable: {harness.unavailable_reason()}")]

F16, B16 = mx.float16, mx.bfloat16


@pytest.fixture(autouse=True)
def hopper_defaults(monkeypatch):
    """The wrappers' default settings whatever the caller's environment holds
    (they are read at import), and poisoned outputs."""
    from mlx_flash.backends import cuda as cuda_backend
    from mlx_flash.backends import cuda_fwd_ws as ws

    for name, value in (("POISON_OUTPUTS", True), ("_ENABLED", True), ("CHECKED_ONLY", True), ("WIDE_MODE", "auto"),
                        ("STAGES", {128: 2, 64: 4}), ("KEYS_DENSE_D128", 176), ("KEYS_DENSE_D64", 128),
                        ("EXP2_POLY", {64: 0}), ("WG3_D64", "auto"), ("CHAINS_D128", 1), ("PERSISTENT", None),
                        ("DYNAMIC", True), ("HEAD_GROUP", None), ("TRACE", None), ("RESCALE_EARLY", None),
                        ("TURNS_CONTINUOUS", True),
                        ("WIDE_KEYS", {(96, 96): 128, (192, 192): 96, (256, 256): 80, (192, 128): 128})):
        monkeypatch.setattr(ws, name, value)
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 0)
    monkeypatch.setattr(cuda_backend, "_BWD_DV_EARLY", 0)
    monkeypatch.setattr(cuda_backend, "_BWD_DQ_V4", 0)
    monkeypatch.setattr(cuda_backend, "_WGMMA", True)
    monkeypatch.setattr(cuda_backend, "_WGMMA_BWD", True)
    return ws


def _inputs(tag, B, Hq, Hkv, Nq, Nk, D, Dv, dtype):
    gen = rng("cuda-emu-hopper", tag, B, Hq, Hkv, Nq, Nk, D, Dv, str(dtype))
    return (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
            randn(gen, (B, Hkv, Nk, Dv), dtype), randn(gen, (B, Hq, Nq, Dv), dtype))


def _run(q, k, v, options, dout=None, sm_count=3):
    """(out, lse[, dq, dk, dv]) through the CUDA wrappers as on an H200, and the launches."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda as cuda_backend

    harness.LAUNCHES.clear()
    with harness.patched_hopper(sm_count=sm_count):
        spec, inputs = validate_attention(q, k, v, **options)
        out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.cpu)
        results = [out, lse]
        if dout is not None:
            results += cuda_backend.attention_backward(q, k, v, out, lse, dout, None, spec, inputs, mx.cpu)
        mx.eval(*results)
    return results, [(name, t) for name, t in harness.LAUNCHES if name.startswith("mlx_flash_attention")]


def _check_forward(q, k, v, options, dtype, results):
    out, lse = results[:2]
    want = attention_np(q, k, v, **options)
    check_close("out", to_np(out), want, dtype, plain_errors(q, k, v, mx.ones(out.shape, dtype), options, dtype))
    check_close("lse", to_np(lse), want, mx.float32)
    return want


def _kernel_of(launches, body):
    """Template of the one launch of kernel `body`."""
    found = [t for name, t in launches if name == "mlx_flash_" + body]
    assert len(found) == 1, f"expected one {body} launch, got {[n for n, _ in launches]}"
    return found[0]


# (B, Hq, Hkv, Nq, Nk, D, Dv, dtype, options, instance): instance = the ws
# template values (WINDOW, BN, WARPGROUPS) the default routing must pick.
# Odd sizes, Nq != Nk, partial row blocks and key tiles, several blocks and
# items per persistent block (three SMs), GQA and MHA.
FORWARD = [
    (1, 1, 1, 100, 2100, 64, 64, F16, {}, (False, 96, 3)),          # default D 64 route (>= 2048 keys)
    (2, 2, 2, 197, 301, 64, 64, B16, {}, (False, 96, 3)),
    (2, 2, 1, 150, 140, 64, 64, F16, {"causal": True}, (True, 128, 2)),
    (1, 4, 2, 130, 257, 64, 64, B16, {"window": (70, 20)}, (True, 128, 2)),
    (1, 2, 2, 130, 357, 128, 128, B16, {}, (False, 176, 2)),
    (1, 4, 2, 150, 140, 128, 128, F16, {"causal": True}, (True, 128, 2)),
    (1, 2, 1, 129, 300, 128, 128, F16, {"window": (50, 0), "scale": 0.3}, (True, 128, 2)),
    (1, 2, 1, 70, 200, 96, 96, F16, {}, (False, 128, 2)),           # 96: the TMA's zero-filled columns
    (1, 2, 1, 70, 150, 192, 128, B16, {"causal": True}, (True, 128, 2)),
    (1, 1, 1, 90, 170, 256, 256, F16, {"window": (40, 40)}, (True, 64, 2)),
]


@pytest.mark.parametrize("case", FORWARD, ids=lambda c: "x".join(map(str, c[:7])) + f"-{c[7]}".replace("mlx.core.", "")
                         + "-" + ("_".join(c[8]) or "dense"))
def test_ws_forward(case, hopper_defaults):
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, options, instance = case
    if Nk < 2048 and D == 64:  # short D 64 calls: the kernel MLX_FLASH_CUDA_FWD_WS=all gives them
        hopper_defaults.CHECKED_ONLY = False
    q, k, v, _ = _inputs("fwd", B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    results, launches = _run(q, k, v, options)
    t = _kernel_of(launches, "attention_fwd_ws")
    assert (t["WINDOW"], t["BN"], t.get("WARPGROUPS", 2)) == instance
    if D in (64, 128):  # the default turns across items, and the early rescale at D 64
        assert (t["TURNS"], t["RESCALE"]) == (1, int(D == 64))
    _check_forward(q, k, v, options, dtype, results)


def test_short_d64_forward_routes_to_wgmma():
    """Short D 64 calls keep attention_fwd_wgmma (the default below 2048 keys), sinks too."""
    gen = rng("cuda-emu-hopper-wgmma")
    q, k, v, _ = _inputs("wgmma", 1, 2, 1, 150, 260, 64, 64, F16)
    options = {"causal": True, "sinks": randn(gen, (2,))}
    results, launches = _run(q, k, v, options)
    _kernel_of(launches, "attention_fwd_wgmma")
    _check_forward(q, k, v, options, F16, results)


# The default Hopper backward (attention_bwd_wgmma), after the ws forward.
BACKWARD = [
    (1, 2, 1, 150, 200, 64, F16, {}),
    (1, 2, 2, 130, 140, 128, B16, {"causal": True}),
    (2, 2, 1, 97, 260, 64, B16, {"window": (60, 10)}),
]


@pytest.mark.parametrize("case", BACKWARD, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}".replace("mlx.core.", "")
                         + "-" + ("_".join(c[7]) or "dense"))
def test_wgmma_backward(case, hopper_defaults):
    B, Hq, Hkv, Nq, Nk, D, dtype, options = case
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do = _inputs("bwd", B, Hq, Hkv, Nq, Nk, D, D, dtype)
    results, launches = _run(q, k, v, options, dout=do)
    _kernel_of(launches, "attention_fwd_ws")
    _kernel_of(launches, "attention_bwd_wgmma")
    _check_forward(q, k, v, options, dtype, results)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_close(name, to_np(got), want, dtype)


# attention_bwd_wgmma at D 128 with one logit rule alone, as the NVRTC survey's
# "bwd D128 bf16 bool mask" / "fp16 alibi" instances (tests/test_cuda_nvrtc.py):
# the instances whose register pressure the 32-bit Q / dO offsets relieve.
@pytest.mark.parametrize("rule", ["bool_mask", "alibi"])
def test_wgmma_backward_d128_rules(rule, hopper_defaults):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 130, 201, 128
    dtype = B16 if rule == "bool_mask" else F16
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do = _inputs("bwd-rules-" + rule, B, Hq, Hkv, Nq, Nk, D, D, dtype)
    gen = rng("cuda-emu-hopper-rules", rule)
    options = ({"mask": mx.array(gen.random((B, Hq, Nq, Nk)) < 0.7)} if rule == "bool_mask" else
               {"alibi_slopes": mx.array(gen.uniform(0.01, 0.2, (Hq,)), mx.float32)})
    results, launches = _run(q, k, v, options, dout=do)
    _kernel_of(launches, "attention_bwd_wgmma")
    _check_forward(q, k, v, options, dtype, results)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_close(name, to_np(got), want, dtype)


# The opt-in variants of attention_bwd_wgmma, alone and together, each giving
# the default's bits: the early dV (MLX_FLASH_BWD_DV_EARLY=1: dV += P^T dO
# issued before dS^T is packed and stored; exact tiles keep their scalar
# products) and float4 dQ atomics (MLX_FLASH_BWD_DQ_V4=1: a lane exchange,
# then one float4 add where the default makes two float2 adds; rows past Nq
# skipped by the lane that owns them). Dense, causal, windows, GQA, a partial
# last query tile, and the non-finite cases (exact tiles' dQ too).
BACKWARD_VARIANTS = BACKWARD + [(1, 4, 2, 130, 300, 128, F16, {}), (2, 2, 1, 200, 97, 64, F16, {"causal": True}),
                                (1, 2, 1, 100, 150, 128, B16, {"softcap": 20.0}),
                                (1, 2, 1, 17, 150, 128, B16, {"causal": True})]
# variant: the wrapper's settings it sets to 1 and the kernel template each turns on.
VARIANT_SETTINGS = {"dv_early": {"_BWD_DV_EARLY": "DV_EARLY"}, "dq_v4": {"_BWD_DQ_V4": "DQ_V4"},
                    "both": {"_BWD_DV_EARLY": "DV_EARLY", "_BWD_DQ_V4": "DQ_V4"}}


def _set_variant(monkeypatch, variant, on):
    from mlx_flash.backends import cuda as cuda_backend

    for setting in VARIANT_SETTINGS[variant]:
        monkeypatch.setattr(cuda_backend, setting, int(on))


def _check_variant_template(launches, variant, on):
    kernel = _kernel_of(launches, "attention_bwd_wgmma")
    for template in VARIANT_SETTINGS[variant].values():
        assert kernel[template] is on, template


@pytest.mark.parametrize("variant", list(VARIANT_SETTINGS))
@pytest.mark.parametrize("case", BACKWARD_VARIANTS, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}".replace(
    "mlx.core.", "") + "-" + ("_".join(c[7]) or "dense"))
def test_wgmma_backward_variants(case, variant, hopper_defaults, monkeypatch):
    B, Hq, Hkv, Nq, Nk, D, dtype, options = case
    _set_variant(monkeypatch, variant, True)
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do = _inputs("bwd-dv-early", B, Hq, Hkv, Nq, Nk, D, D, dtype)
    results, launches = _run(q, k, v, options, dout=do)
    _check_variant_template(launches, variant, True)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_close(name, to_np(got), want, dtype)
    # The same operations per accumulator in the same order, and each dQ
    # element the same values added: the default's bits (dQ's atomics are
    # added in one order by the emulation's schedule too).
    _set_variant(monkeypatch, variant, False)
    default, launches = _run(q, k, v, options, dout=do)
    _check_variant_template(launches, variant, False)
    for name, a, b in zip(("dq", "dk", "dv"), results[2:], default[2:]):
        assert np.array_equal(to_np(a), to_np(b), equal_nan=True), name


@pytest.mark.parametrize("variant", ["dv_early", "dq_v4"])
@pytest.mark.parametrize("case", ["nan_v_causal", "inf_k", "masked_rows_nan", "nan_dout_causal"])
def test_nonfinite_backward_variants(case, variant, hopper_defaults, monkeypatch):
    """The non-finite contract with each variant (D 128): exact tiles (no
    wgmma dV; their dQ through the same atomics) beside tiles that take it."""
    _set_variant(monkeypatch, variant, True)
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do, options = prefill_case(case, F16, D=128)
    results, launches = _run(q, k, v, options, dout=do)
    _check_variant_template(launches, variant, True)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_contract(name, to_np(got), want, F16)


# The opt-in warp-specialised backward (MLX_FLASH_BWD_WS=1: attention_bwd_ws),
# its dQ by the bulk-reduction writer warp (MLX_FLASH_BWD_WS_DQ=1, default) or atomics.
BACKWARD_WS = [
    (1, 2, 1, 150, 200, 64, F16, {}, 1),
    (1, 2, 1, 150, 200, 128, B16, {"causal": True}, 1),
    (2, 2, 2, 97, 260, 64, B16, {"window": (60, 10)}, 0),
    (1, 4, 2, 130, 140, 128, F16, {"causal": True}, 0),
]


@pytest.mark.parametrize("case", BACKWARD_WS, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}".replace(
    "mlx.core.", "") + "-" + ("_".join(c[7]) or "dense") + f"-dqw{c[8]}")
def test_ws_backward(case, hopper_defaults, monkeypatch):
    from mlx_flash.backends import cuda as cuda_backend

    B, Hq, Hkv, Nq, Nk, D, dtype, options, dqw = case
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 1)
    monkeypatch.setattr(cuda_backend, "_BWD_WS_DQ", dqw)
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do = _inputs("bwd-ws", B, Hq, Hkv, Nq, Nk, D, D, dtype)
    results, launches = _run(q, k, v, options, dout=do)
    assert _kernel_of(launches, "attention_bwd_ws")["DQW"] == bool(dqw)
    _check_forward(q, k, v, options, dtype, results)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_close(name, to_np(got), want, dtype)


# The forward's opt-in settings (module values the MLX_FLASH_CUDA_FWD_WS_*
# variables set at import): (attribute, value, D, options, instance key/values).
OPT_IN = [
    ("KEYS_DENSE_D128", 144, 128, {}, {"BN": 144}),
    ("KEYS_DENSE_D128", 160, 128, {}, {"BN": 160}),
    ("CHAINS_D128", 2, 128, {}, {"BN": 176, "CHAINS": 2}),
    ("STAGES", {128: 3, 64: 4}, 128, {"causal": True}, {"STAGES": 3}),
    ("EXP2_POLY", {64: 1}, 64, {}, {"EXP2POLY": 1, "WARPGROUPS": 3}),
    ("EXP2_POLY", {64: 2}, 64, {"causal": True}, {"EXP2POLY": 2, "WINDOW": True}),
    ("WG3_D64", "0", 64, {}, {"BN": 128, "WINDOW": False}),
    ("WG3_D64", "1", 64, {"causal": True}, {"BN": 64, "WARPGROUPS": 3}),
    ("KEYS_DENSE_D64", 192, 64, {}, {"BN": 192}),
    ("PERSISTENT", False, 64, {}, {"WARPGROUPS": 3}),
    ("DYNAMIC", False, 64, {"causal": True}, {"WINDOW": True}),
    ("HEAD_GROUP", 1, 128, {}, {"BN": 176}),
    ("STAGES", {128: 2, 64: 2}, 64, {}, {"STAGES": 2, "BN": 128}),
    ("WIDE_KEYS", {(96, 96): 176, (192, 192): 96, (256, 256): 80, (192, 128): 128}, 96, {}, {"BN": 176}),
    ("WIDE_KEYS", {(96, 96): 128, (192, 192): 112, (256, 256): 80, (192, 128): 128}, 192, {}, {"BN": 112}),
    ("RESCALE_EARLY", True, 128, {"causal": True}, {"BN": 128, "RESCALE": 1}),
    ("RESCALE_EARLY", True, 64, {"window": (90, 30)}, {"WINDOW": True, "WARPGROUPS": 2, "RESCALE": 1}),
    ("RESCALE_EARLY", False, 64, {"causal": True}, {"RESCALE": 0, "TURNS": 1}),   # =late
    ("TURNS_CONTINUOUS", False, 64, {}, {"RESCALE": 1, "TURNS": None}),        # =item
    ("TURNS_CONTINUOUS", False, 128, {}, {"BN": 176, "RESCALE": None, "TURNS": None}),
]


@pytest.mark.parametrize("setting", OPT_IN, ids=lambda s: f"{s[0]}-D{s[2]}-" + "_".join(f"{k}{v}" for k, v in s[4].items())
                         + "".join("-" + k for k in s[3]))
def test_ws_forward_opt_in(setting, hopper_defaults):
    name, value, D, options, expect = setting
    setattr(hopper_defaults, name, value)
    if name == "KEYS_DENSE_D64":
        hopper_defaults.WG3_D64 = "0"  # the 192-key tile is a two-warpgroup instance
    hopper_defaults.CHECKED_ONLY = False
    dtype = B16 if OPT_IN.index(setting) % 2 else F16  # both dtypes across the settings
    q, k, v, _ = _inputs("opt-" + name, 1, 2, 1, 140, 333, D, D, dtype)
    results, launches = _run(q, k, v, options)
    t = _kernel_of(launches, "attention_fwd_ws")
    assert {key: t.get(key) for key in expect} == expect
    _check_forward(q, k, v, options, dtype, results)


@pytest.mark.parametrize("case", [c for c in FORWARD if c[5] in (64, 128)],
                         ids=lambda c: "x".join(map(str, c[:7])) + f"-{c[7]}".replace("mlx.core.", "")
                         + "-" + ("_".join(c[8]) or "dense"))
def test_ws_forward_rescale_early_is_bit_identical(case, hopper_defaults):
    """MLX_FLASH_CUDA_FWD_WS_RESCALE=early moves O's rescale into the next
    turn on every default D 64 / 128 route: the same multiplies on the same
    O, so out and lse equal the default kernel's bit for bit (and float64)."""
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, options, instance = case
    q, k, v, _ = _inputs("fwd", B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    hopper_defaults.CHECKED_ONLY = False
    hopper_defaults.RESCALE_EARLY = hopper_defaults.TURNS_CONTINUOUS = False  # the old kernel
    default, launches = _run(q, k, v, options)
    assert _kernel_of(launches, "attention_fwd_ws").get("RESCALE") is None
    hopper_defaults.RESCALE_EARLY = True
    early, launches = _run(q, k, v, options)
    t = _kernel_of(launches, "attention_fwd_ws")
    assert (t["WINDOW"], t["BN"], t.get("WARPGROUPS", 2), t["RESCALE"]) == instance + (1,)
    for name, a, b in zip(("out", "lse"), default, early):
        assert np.array_equal(to_np(a), to_np(b), equal_nan=True), name
    _check_forward(q, k, v, options, dtype, early)


# Every default D 64 / 128 route with the default rescale order, and one
# dense and one ruled route with the early one.
_TURNS_CASES = ([(c, False) for c in FORWARD if c[5] in (64, 128)]
                + [(FORWARD[0], True), (FORWARD[5], True)])


@pytest.mark.parametrize("case,early", _TURNS_CASES, ids=lambda c: (
    "x".join(map(str, c[:7])) + f"-{c[7]}".replace("mlx.core.", "") + "-" + ("_".join(c[8]) or "dense"))
    if isinstance(c, tuple) else ("early" if c else "late"))
def test_ws_forward_turns_continuous_is_bit_identical(case, early, hopper_defaults):
    """MLX_FLASH_CUDA_FWD_WS_TURNS=continuous (the warpgroups' turns run on
    across a persistent block's items; here three SMs, so blocks take several
    items) only reorders when each warpgroup issues: out and lse equal the
    default kernel's bit for bit, with either rescale order."""
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype, options, instance = case
    q, k, v, _ = _inputs("fwd", B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    hopper_defaults.CHECKED_ONLY = False
    hopper_defaults.PERSISTENT = True
    hopper_defaults.RESCALE_EARLY = hopper_defaults.TURNS_CONTINUOUS = False  # the old kernel
    default, launches = _run(q, k, v, options)
    assert _kernel_of(launches, "attention_fwd_ws").get("TURNS") is None
    hopper_defaults.TURNS_CONTINUOUS = True
    hopper_defaults.RESCALE_EARLY = early
    turns, launches = _run(q, k, v, options)
    t = _kernel_of(launches, "attention_fwd_ws")
    assert (t["WINDOW"], t["BN"], t.get("WARPGROUPS", 2), t["RESCALE"], t["TURNS"]) == instance + (int(early), 1)
    for name, a, b in zip(("out", "lse"), default, turns):
        assert np.array_equal(to_np(a), to_np(b), equal_nan=True), name
    _check_forward(q, k, v, options, dtype, turns)


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("D", [64, 128])
def test_nonfinite_forward_rescale_early(case, D, hopper_defaults):
    """The non-finite contract through the early-rescale instances (fp16),
    several key tiles a row block, so the moved rescale runs in the loop."""
    hopper_defaults.CHECKED_ONLY = False
    hopper_defaults.RESCALE_EARLY = True
    q, k, v, _, options = prefill_case(case, F16, D=D, size="large")  # several key tiles: the main loop
    results, launches = _run(q, k, v, options)
    if any(name == "mlx_flash_attention_fwd_ws" for name, _ in launches):
        assert _kernel_of(launches, "attention_fwd_ws")["RESCALE"] == 1
    want = attention_np(q, k, v, **options)
    check_contract("out", to_np(results[0]), want, F16)
    check_contract("lse", to_np(results[1]), want, mx.float32)


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("D", [64, 128])
def test_nonfinite_forward_backward(case, D, hopper_defaults):
    """The non-finite contract through the Hopper routes: the ws forward for
    causal / dense cases, attention_fwd_wgmma for masks and softcap, then
    attention_bwd_wgmma (gradients too)."""
    from mlx_flash.backends import cuda_fwd_ws

    hopper_defaults.CHECKED_ONLY = False
    q, k, v, do, options = prefill_case(case, F16, D=D)
    results, launches = _run(q, k, v, options, dout=do)
    names = {n for n, _ in launches} - {"mlx_flash_attention_bwd_wgmma", "mlx_flash_attention_bwd_delta"}
    from mlx_flash._spec import validate_attention

    spec, _ = validate_attention(q, k, v, **options)
    with harness.patched_hopper():
        ws = cuda_fwd_ws.serves(spec)
    assert names == {"mlx_flash_attention_fwd_ws" if ws else "mlx_flash_attention_fwd_wgmma"}
    _kernel_of(launches, "attention_bwd_wgmma")
    want = attention_np(q, k, v, dout=do, **options)
    check_contract("out", to_np(results[0]), want, F16)
    check_contract("lse", to_np(results[1]), want, mx.float32)
    for name, got in zip(("dq", "dk", "dv"), results[2:]):
        check_contract(name, to_np(got), want, F16)


def test_deadlock_fails_the_launch(hopper_defaults, monkeypatch):
    """A wait nothing can complete fails with a message instead of hanging:
    the K tiles' "full" barriers expect twice the bytes the TMA delivers."""
    hopper_defaults.CHECKED_ONLY = False
    q, k, v, _ = _inputs("deadlock", 1, 1, 1, 64, 100, 128, 128, F16)
    from cuda_emu import ptx_asm

    original = ptx_asm.translate
    monkeypatch.setattr(ptx_asm, "translate", lambda text: original(text).replace(
        "mbar_arrive((smem_addr(bar)), (bytes))", "mbar_arrive((smem_addr(bar)), 2 * (bytes))"))
    with pytest.raises(RuntimeError, match="deadlock: an mbarrier wait"):
        _run(q, k, v, {})


@pytest.mark.parametrize("tma_early", [False, True])
def test_forward_with_tma_landing_at_issue(tma_early, hopper_defaults, monkeypatch):
    """The same results whether TMA bytes land at issue or at the first poll
    of their barrier (each catches a different ordering mistake)."""
    monkeypatch.setattr(harness, "TMA_EARLY", tma_early)
    q, k, v, _ = _inputs("early", 1, 2, 1, 140, 900, 128, 128, B16)
    results, launches = _run(q, k, v, {"causal": True, "window": (500, 0)})
    _kernel_of(launches, "attention_fwd_ws")
    _check_forward(q, k, v, {"causal": True, "window": (500, 0)}, B16, results)


def test_race_on_an_operand_in_flight_fails(hopper_defaults, monkeypatch):
    """A consumer that hands a V buffer back (v_empty) before its P V wgmma
    finished lets the producer's next TMA load overwrite the operand in
    flight: the emulated wgmma sees its shared memory change and fails."""
    from cuda_emu import ptx_asm

    original = ptx_asm.translate
    release = "if (signals) ws_mbar_arrive(&v_empty[pst]);\n"

    def racy(text):
        text = original(text)
        if "attention_fwd_ws(" not in text:
            return text
        late = release + "rescale_pack(ruled);"
        early = "softmax(tile_start(t), ruled);\nwgmma_wait<0>();"
        assert text.count(late) == 1 and text.count(early) == 1
        return text.replace(late, "rescale_pack(ruled);").replace(early, release + early)

    monkeypatch.setattr(ptx_asm, "translate", racy)
    monkeypatch.setattr(harness, "TMA_EARLY", True)
    q, k, v, _ = _inputs("race", 1, 1, 1, 64, 900, 128, 128, F16)
    with pytest.raises(RuntimeError, match="changed before its wgmma_wait"):
        _run(q, k, v, {})


def test_unknown_ptx_fails_loudly():
    """PTX the emulation does not know stops the build with its text, never runs as a no-op."""
    from cuda_emu import ptx_asm

    with pytest.raises(AssertionError, match="no emulation for the PTX 'brkpt;'"):
        ptx_asm.translate('if (x) asm volatile("brkpt;\\n" ::: "memory");')
    assert ptx_asm.translate('asm volatile("bar.sync 1, 256;\\n" ::: "memory");') == (
        "do { ::emu_hopper::named_barrier(1, 256, true); } while (0);")
