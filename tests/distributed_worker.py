"""Worker of tests/test_distributed.py, one per rank, started by `mlx.launch`.

    mlx.launch -n W --backend ring --python PY tests/distributed_worker.py SUITE SEED [CASES_JSON]

Suites:
  attention  each case of CASES_JSON: the same full q, k, v (seeded) on
             every rank; ring_flash_attention on this rank's shard must
             give this rank's rows of single-process flash_attention on the
             full tensors: out, lse and (through mx.vjp with cotangents for
             both) dq, dk, dv, and the sum over ranks of d sinks. float32
             against flash_attention itself (FP32_TOL); float16/bfloat16
             against the float64 reference, within twice the error of the
             plain materialised computation in that dtype (as elsewhere).
             unshard(out) is evaluated together with the gradients, so its
             all_gather is pending while the backward's transfers are: the
             ordering that keeps them off the sockets at the same time
             (in_ring_order) is under test too.
  lora       examples/ring_lora.py's context-parallel LoRA step on a tiny
             mlx-lm model vs the one-process step.
  mismatch   ranks pass different shard lengths: every rank must raise the
             clear error, not wait.
  deadlock   both ranks send a large message before receiving (what the
             parity order avoids): hangs, so the launcher's timeout must
             turn it into a failure.
Prints one line per result, "RESULT <json>", and exits non-zero on an
unexpected exception.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import mlx_flash  # noqa: E402
from mlx_flash.distributed import in_ring_order, local_positions, ring_flash_attention, shard, unshard  # noqa: E402

from helpers import DTYPES, FP32_TOL, check_close, plain_errors, rel_error, rng  # noqa: E402


def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def case_inputs(case, seed, world):
    gen = rng(seed, json.dumps(case, sort_keys=True))
    B, Hq, Hkv, D, Dv = case["B"], case["Hq"], case["Hkv"], case["D"], case.get("Dv", case["D"])
    N = case["N_local"] * world
    dtype = DTYPES[case.get("dtype", "float32")]
    arrays = [gen.standard_normal(s).astype(np.float32)
              for s in ((B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv), (B, Hq, N, Dv), (B, Hq, N))]
    q, k, v, dout, dlse = (mx.array(a) for a in arrays)
    q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))
    options = dict(case.get("options", {}))
    if "alibi_slopes" in options:
        options["alibi_slopes"] = mx.array(gen.uniform(0.02, 0.5, Hq).astype(np.float32))
    if "sinks" in options:
        options["sinks"] = mx.array(gen.standard_normal(Hq).astype(np.float32))
    if "window" in options:
        options["window"] = tuple(options["window"])
    return q, k, v, dout, dlse * 0.3, options, dtype


def run_attention_case(case, seed, group):
    world, rank = group.size(), group.rank()
    layout, transport = case["layout"], case.get("transport")
    q, k, v, dout, dlse, options, dtype = case_inputs(case, seed, world)
    sinks = options.get("sinks")
    rows = np.array(local_positions(case["N_local"], layout, world, rank))
    take = lambda x, axis=2: np.take(np.array(x.astype(mx.float32)), rows, axis=axis)

    def ring(q, k, v, *s):
        opts = dict(options, sinks=s[0]) if s else options
        return ring_flash_attention(q, k, v, group=group, layout=layout, return_lse=True,
                                    transport=transport, **opts)

    local = [shard(x, group, layout) for x in (q, k, v)]
    extra = [sinks] if sinks is not None else []
    (out, lse), grads = mx.vjp(ring, local + extra, [shard(dout, group, layout), shard(dlse, group, layout, -1)])
    got = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if sinks is not None:
        got["dsinks"] = in_ring_order(mx.distributed.all_sum, grads[3], group=group)
    got["unshard"] = unshard(out, group, layout)
    mx.eval(got)
    errors = {}
    if dtype == mx.float32:
        def single(q, k, v, *s):
            opts = dict(options, sinks=s[0]) if s else options
            return mlx_flash.flash_attention(q, k, v, return_lse=True, **opts)

        (w_out, w_lse), w_grads = mx.vjp(single, [q, k, v] + extra, [dout, dlse])
        want = {"out": take(w_out), "lse": take(w_lse), "dq": take(w_grads[0]), "dk": take(w_grads[1]),
                "dv": take(w_grads[2])}
        if sinks is not None:
            want["dsinks"] = np.array(w_grads[3])
        for name, w in want.items():
            err = rel_error(np.array(got[name].astype(mx.float32)), w)
            assert err <= FP32_TOL[name], f"{name}: relative error {err:.3g} > {FP32_TOL[name]:.3g}"
            errors[name] = err
        full = np.array(w_out)
    else:
        from reference_np import attention_np

        ref = attention_np(q, k, v, dout=dout, dlse=dlse, **options)
        plain = plain_errors(q, k, v, dout, options, dtype)
        for name in ("out", "lse", "dq", "dk", "dv"):
            want = {name: np.take(ref[name], rows, axis=2)}
            if "mag_" + name in ref:
                want["mag_" + name] = np.take(ref["mag_" + name], rows, axis=2)
            errors[name] = check_close(name, np.array(got[name].astype(mx.float32)), want, dtype, plain)
        full = ref["out"]
    # unshard puts every rank's rows back in sequence order.
    errors["unshard"] = rel_error(np.array(got["unshard"].astype(mx.float32)), full)
    assert errors["unshard"] <= (FP32_TOL["out"] if dtype == mx.float32 else 2.0**-6), errors
    return errors


def suite_attention(cases, seed, group):
    failed = 0
    for case in cases:
        try:
            errors = run_attention_case(case, seed, group)
            report(rank=group.rank(), case=case, ok=True, errors=errors)
        except AssertionError as e:
            failed += 1
            report(rank=group.rank(), case=case, ok=False, error=str(e))
    return failed


def suite_lora(seed, group):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    from ring_lora import context_parallel_step, max_rel_diff, one_process_step

    from mlx_flash.bench.lm import add_lora, random_model, random_tokens

    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  vocab_size=97, tie_word_embeddings=False)
    failed = 0
    for layout, n in (("zigzag", 4 * 17 * group.size() // 2), ("contiguous", 37 * group.size())):
        model = add_lora(random_model(config, seed=seed % 1000), 2, seed=seed % 1000 + 1)
        tokens = random_tokens(n + 1, config["vocab_size"], seed=seed % 1000 + 2)
        loss_1, grads_1 = one_process_step(model, tokens)
        loss_w, grads_w = context_parallel_step(model, tokens, group, layout)
        mx.eval(loss_1, grads_1, loss_w, grads_w)
        loss_err = abs(loss_w.item() - loss_1.item()) / abs(loss_1.item())
        grad_err = max_rel_diff(grads_w, grads_1)
        ok = loss_err < 1e-5 and grad_err < 1e-4
        failed += not ok
        report(rank=group.rank(), case={"lora": layout, "seq_len": n}, ok=ok,
               errors={"loss": loss_err, "grads": grad_err})
    return failed


def suite_mismatch(seed, group):
    n = 8 + 2 * group.rank()  # every rank a different shard length
    q = mx.ones((1, 2, n, 8))
    try:
        mx.eval(ring_flash_attention(q, q, q, group=group, causal=True))
    except ValueError as e:
        ok = "N_local" in str(e) and "disagree" in str(e)
        report(rank=group.rank(), case={"mismatch": True}, ok=ok, error=str(e))
        return 0 if ok else 1
    report(rank=group.rank(), case={"mismatch": True}, ok=False, error="no error raised")
    return 1


def suite_deadlock(seed, group):
    big = mx.ones((64, 1024, 1024), mx.float32)  # 256 MiB: far past any socket buffer
    other = (group.rank() + 1) % group.size()
    sent = mx.distributed.send(big, other, group=group)
    got = mx.distributed.recv_like(big, other, group=group)
    mx.eval(mx.depends([got], [sent])[0])
    report(rank=group.rank(), case={"deadlock": True}, ok=True)
    return 0


def main():
    suite, seed = sys.argv[1], int(sys.argv[2])
    group = mx.distributed.init(strict=True, backend="ring")
    if suite == "attention":
        failed = suite_attention(json.loads(sys.argv[3]), seed, group)
    else:
        failed = {"lora": suite_lora, "mismatch": suite_mismatch, "deadlock": suite_deadlock}[suite](seed, group)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
