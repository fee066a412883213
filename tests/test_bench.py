"""Smoke tests of the benchmark harness (mlx_flash.bench): a tiny sweep, the
JSON schema, resume, the targets report and the plots. No timing assertions."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_flash._ext", reason="the C++ extension is not built (tools/build_inplace.sh)")

from mlx_flash.bench import common, cpu_attention  # noqa: E402

TINY = ["--n", "64", "--d", "64", "--dtype", "fp32", "--mode", "fwd,fwdbwd", "--causal", "both",
        "--no-gemm", "--no-plots", "--budget", "0.01", "--min-repeats", "1", "--max-repeats", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert cpu_attention.main(TINY + ["--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_tiny_sweep_schema(tiny_run):
    _, doc = tiny_run
    assert doc["schema"] == cpu_attention.SCHEMA
    for key in ("created", "machine", "settings", "notes", "results", "targets"):
        assert key in doc
    assert doc["machine"]["mlx_flash_cpu_kernel_isa"] and doc["machine"]["cpu_model"]
    assert "flop_counting" in doc["settings"] and "memory_methods" in doc["settings"]
    assert len(doc["results"]) == 4  # {fwd, fwdbwd} x {full, causal}
    for key, entry in doc["results"].items():
        cfg = cpu_attention.Config.from_dict(entry["config"])
        assert cfg.key == key and cfg.N == 64 and cfg.H == 8
        assert entry["flops"] == cfg.flops
        assert set(entry["impls"]) == set(cpu_attention.IMPLS)
        ours = entry["impls"]["mlx_flash"]
        assert ours["status"] == "ok", ours
        assert ours["time_s"] > 0 and ours["gflops"] > 0 and 1 <= ours["repeats"] <= 2
        assert ours["memory"]["method"] == "mlx" and ours["memory"]["extra_peak_bytes"] > 0
        assert entry["impls"]["mx_fast_sdpa"]["status"] == "ok"
        assert entry["speedup"]["mx_fast_sdpa"] > 0
        torch_rec = entry["impls"]["torch_sdpa"]
        assert torch_rec["status"] in ("ok", "skipped")
        if torch_rec["status"] == "ok":
            assert entry["speedup"]["torch_sdpa"] > 0
    fwd = doc["results"]["fwd-fp32-full-B1-H8-N64-D64"]
    if "max_abs_diff_vs_torch" in fwd:
        assert fwd["max_abs_diff_vs_torch"] < 1e-4


def test_flop_counting():
    full = cpu_attention.Config("fwd", "fp32", False, 1, 8, 4096, 64)
    assert full.flops == 4 * 8 * 4096 * 4096 * 64
    causal = cpu_attention.Config("fwd", "fp32", True, 1, 8, 4096, 64)
    assert causal.flops == full.flops / 2
    both = cpu_attention.Config("fwdbwd", "fp32", False, 1, 8, 4096, 64)
    assert both.flops == full.flops * (1 + cpu_attention.BACKWARD_FLOP_FACTOR)


def test_resume_keeps_measurements(tiny_run, tmp_path):
    src, doc = tiny_run
    out = tmp_path / "resumed.json"
    out.write_text(src.read_text())
    assert cpu_attention.main(TINY + ["--out", str(out), "--resume", "--n", "64 96", "--mode", "fwd",
                                      "--causal", "no", "--impl", "mlx_flash"]) == 0
    resumed = json.loads(out.read_text())
    key = "fwd-fp32-full-B1-H8-N64-D64"
    assert resumed["results"][key]["impls"]["mlx_flash"] == doc["results"][key]["impls"]["mlx_flash"]
    assert resumed["results"]["fwd-fp32-full-B1-H8-N96-D64"]["impls"]["mlx_flash"]["status"] == "ok"
    assert resumed["settings"]["resumed"]


def test_mx_fast_cap_is_recorded():
    m = cpu_attention.Measurement(cpu_attention.Config("fwd", "fp32", False, 1, 8, 4096, 64), "mx_fast_sdpa")
    assert "N > 2048" in cpu_attention.skip_reason(m, 2048, set())
    forced = cpu_attention.Measurement(m.config, "mx_fast_sdpa", force=True)
    assert cpu_attention.skip_reason(forced, 2048, set()) is None


def test_targets_report():
    doc = {"gemm": {"best_gflops": 100.0}, "results": {}}

    def put(cfg, impl, time_s, memory=None):
        rec = {"status": "ok", "time_s": time_s, "gflops": cfg.flops / time_s / 1e9}
        if memory is not None:
            rec["memory"] = {"extra_peak_bytes": memory, "method": "mlx"}
        cpu_attention.record(doc, cpu_attention.Measurement(cfg, impl), rec)

    fast = cpu_attention.Config("fwd", "fp32", False, 1, 8, 4096, 64)
    put(fast, "mlx_flash", 1.0)
    put(fast, "torch_sdpa", 1.5)
    put(fast, "mx_fast_sdpa", 20.0)
    mem = cpu_attention.TARGET_MEMORY_CONFIG
    put(mem, "mlx_flash", 30.0, memory=10 * 2**20)
    targets = {t["target"]: t for t in cpu_attention.check_targets(doc)}
    assert targets[f"{fast.label} vs torch SDPA"]["status"] == "met"
    assert targets[f"{fast.label} vs torch SDPA"]["ratio"] == pytest.approx(1.5)
    assert targets[f"{fast.label} vs mx.fast SDPA"]["status"] == "missed"  # 20x < 30x
    assert targets[f"{fast.label} vs GEMM rate"]["status"] == "missed"     # 34 of 100 GFLOP/s
    assert targets[f"{mem.label} extra peak memory"]["status"] == "met"
    assert targets[f"{cpu_attention.TARGET_LONG_CONFIG.label} completes"]["status"] == "not measured"
    text = cpu_attention.format_targets(list(targets.values()))
    assert "met" in text and "missed" in text and "not measured" in text


def test_check_targets_from_file(tiny_run, capsys):
    src, _ = tiny_run
    assert cpu_attention.main(["--from", str(src), "--check-targets"]) == 0
    assert "CPU performance targets" in capsys.readouterr().out
    assert cpu_attention.main(["--from", str(src), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| fwd | fp32 | full | 1,8,64,64 |" in table and "| fwdbwd | fp32 | causal | 1,8,64,64 |" in table


def test_time_call_policy():
    calls = []
    timing = common.time_call(lambda: calls.append(1), common.TimingPolicy(budget_s=0.0, min_repeats=3, max_repeats=5))
    assert timing["repeats"] == 3 and len(calls) == 4  # warm-up + 3
    assert not timing["warmup_counted"]


def test_gemm_runs_without_openblas_overrides(monkeypatch):
    # Start from none of the overrides, whatever the caller's environment holds, then set one.
    for name in common.OPENBLAS_ENV_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")
    gemm = common.measure_gemm(sizes=(64,), repeats=1)
    assert gemm["status"] == "ok", gemm
    assert gemm["best_gflops"] > 0 and gemm["best_size"] == 64
    assert gemm["env_removed"] == {"OPENBLAS_L2_SIZE": "1048576"}
    assert os.environ["OPENBLAS_L2_SIZE"] == "1048576"  # the parent keeps its environment
    assert gemm["blas"]


def test_gemm_ceiling_keeps_the_best_run(monkeypatch):
    rates = iter([50.0, 80.0])
    monkeypatch.setattr(common, "measure_gemm", lambda: {"status": "ok", "best_gflops": next(rates), "best_size": 4096})
    doc = {"results": {}}
    progress = common.Progress(2, enabled=False)
    cpu_attention._gemm_ceiling(doc, progress, "start")
    cpu_attention._gemm_ceiling(doc, progress, "end")
    assert [r["when"] for r in doc["gemm_runs"]] == ["start", "end"]
    assert doc["gemm"]["best_gflops"] == 80.0


def test_plots(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_flash.bench import plots

    _, doc = tiny_run
    paths = plots.write_cpu_attention_plots(doc, tmp_path)
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tracked_results():
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    return {p.name: p.read_bytes() for p in results.glob("*.json")}


def test_default_output_goes_to_the_current_directory(tmp_path, monkeypatch):
    """Without --out nothing is written into the package or over committed results."""
    before = _tracked_results()
    monkeypatch.chdir(tmp_path)
    plots = importlib.util.find_spec("matplotlib") is not None  # plots follow the same rule
    argv = [a for a in TINY if a != "--no-plots"] + ["--n", "32", "--mode", "fwd", "--causal", "no"]
    assert cpu_attention.main(argv + (["--plots"] if plots else ["--no-plots"])) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written[0].startswith("cpu_attention_") and written[0].endswith(".json"), written
    if plots:
        assert "cpu_attention_throughput.png" in written, written
    assert _tracked_results() == before


@pytest.mark.usefixtures("cpu_default_device")  # main() makes the CPU the default device; restored after
def test_matmul_bench_default_output(tmp_path, monkeypatch, capsys):
    from mlx_flash.bench import matmul_cpu

    monkeypatch.chdir(tmp_path)
    assert matmul_cpu.main(["--sizes", "32", "--repeats", "1"]) == 0
    [written] = list(tmp_path.iterdir())
    assert written.name.startswith("matmul_cpu_") and json.loads(written.read_text())["sizes"]
    assert f"wrote {written.name}" in capsys.readouterr().out


def test_cuda_bench_output_path():
    cuda = pytest.importorskip("mlx_flash.bench.cuda")
    assert cuda.out_path(".", "NVIDIA H200") == os.path.join(".", "cuda_nvidia_h200.json")
    assert cuda.out_path("runs/h200.json", "NVIDIA H200") == "runs/h200.json"


def test_skipped_anchor_says_why(tmp_path, monkeypatch, capsys):
    reason = "torch is not installed (pip install 'mlx_flash[bench]')"
    monkeypatch.setattr(cpu_attention, "_torch_missing", lambda: reason)
    argv = [a for a in TINY if a != "--quiet"] + ["--out", str(tmp_path / "t.json"), "--mode", "fwd", "--causal", "no"]
    assert cpu_attention.main(argv) == 0
    assert f"torch_sdpa: skipped: {reason}" in capsys.readouterr().err


def test_torch_missing_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails as if not installed
    assert cpu_attention._torch_missing.__wrapped__() == "torch is not installed (pip install 'mlx_flash[bench]')"


def test_cuda_bench_chained_decode_feeds_each_output_to_the_next_call():
    """The chained decode step (a model's: each layer's query is the previous
    layer's output) really threads the outputs; its rows carry both step forms."""
    import mlx.core as mx

    cuda = pytest.importorskip("mlx_flash.bench.cuda")
    seen = []

    def call(i, x):
        seen.append(x)
        return x + 11.0 * (i + 1)

    q = mx.array([1.0])
    out = cuda.chained_step(call, q, 3)
    assert seen[0] is q and seen[1] is not q and len(seen) == 3
    assert out.item() == 1.0 + sum(11.0 * i for i in range(1, 4))
    rec = cuda.Recorder()
    cuda.bench_decode(rec, B=1, Hq=4, Hkv=2, Nk=67, D=32, layers=3)
    for row in rec.rows:
        assert row["ours_chained_us_per_call"] > 0 and row["mx_fast_chained_us_per_call"] > 0
        assert row["chained_ratio_vs_mx_fast"] > 0


def test_cuda_bench_times_contenders_in_turn():
    """time_interleaved runs every contender once a round, in turn (so that a
    drift of the card falls on all alike), and reports each one's median and
    peak memory."""
    import mlx.core as mx

    cuda = pytest.importorskip("mlx_flash.bench.cuda")
    order = []

    def contender(name, n):
        def fn():
            order.append(name)
            return mx.ones((n,)) * 2.0
        return fn

    got = cuda.time_interleaved({"a": ("mlx", contender("a", 1 << 16)), "b": ("mlx", contender("b", 4))},
                                rounds=3, per_round=2)
    # Warm-up: 2 calls + 1 for the peak each, then the rounds alternate.
    assert order == ["a"] * 3 + ["b"] * 3 + (["a"] * 2 + ["b"] * 2) * 3
    assert set(got) == {"a", "b"}
    for seconds, peak in got.values():
        assert seconds > 0 and peak > 0
    assert got["a"][1] >= got["b"][1]


def test_cuda_plot_draws_only_the_sections_a_run_holds(tmp_path):
    """A run of some sections (fwd and fwdbwd only) plots those panels; a run with nothing to plot is an error
    naming the file."""
    pytest.importorskip("matplotlib")
    from mlx_flash.bench import cuda_plot

    row = dict(dtype="float16", shape=[1, 2, 64, 32], causal=False, ours_tflops=1.0, mx_fast_tflops=2.0,
               torch_tflops=3.0)
    data = {"card": "test card", "mlx": "0", "rows": [dict(row, section="fwd"), dict(row, section="fwdbwd")]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    out = cuda_plot.plot(str(path))
    assert out == str(tmp_path / "run.png") and (tmp_path / "run.png").stat().st_size > 1000
    path.write_text(json.dumps({**data, "rows": [{"section": "decode"}]}))
    with pytest.raises(ValueError, match="run.json: no fwd"):
        cuda_plot.plot(str(path))


def test_cuda_matmul_bench_steady_time_leaves_out_the_start_up(monkeypatch):
    """time_steady's difference of two batches drops what a batch pays once
    (session 10's 4096^3 rows held MLX's first graph recording in every
    call's share); interleave samples every case in turn and keeps going
    past one that raises."""
    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    clock = [0.0]

    def prepare(n):
        def run():
            clock[0] += 5.0 + 0.25 * n  # a fixed start-up of 5 s, then 0.25 s a call
        return run

    monkeypatch.setattr(cm.time, "perf_counter", lambda: clock[0])
    assert cm.time_steady(prepare, 4, 20) == pytest.approx(0.25)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="small < large"):
        cm.time_steady(prepare, 8, 8)
    order = []

    def sample(name, call):
        order.append(name)
        return call()

    def broken():
        raise RuntimeError("no kernel")

    got = cm.interleave({"a": lambda: 1.0, "bad": broken, "b": lambda: 2.0}, 3, sample)
    assert order == ["a", "bad", "b", "a", "b", "a", "b"]
    assert got["a"] == [1.0] * 3 and got["b"] == [2.0] * 3
    assert isinstance(got["bad"], RuntimeError)


def test_cuda_matmul_bench_targets_on_the_cpu():
    """The targets section runs end to end where MLX has no GPU (its torch and
    CUPTI rows need one): every case of ours checked against float32 of its
    operands, a ratio row per pair."""
    import json

    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    from mlx_flash.bench.cuda import Recorder

    rec = Recorder()
    cm.bench_targets(rec, [17], rounds=2)
    rows = {r["case"]: r for r in rec.rows if r["section"] == "targets"}
    assert {"mlx_fp16", "ours_fp16", "ours_e4m3_fast", "ours_e4m3_fast_rowcol_scales_bf16"} <= set(rows)
    for name, row in rows.items():
        assert "error" not in row, row
        # A difference of two batch times: at this size on the CPU it is noise and may fall below 0.
        assert math.isfinite(row["ms"]) and len(row["ms_rounds"]) == 2
        if name.startswith("ours"):
            assert row["rel_diff_vs_fp32"] < 1e-2, row
    ratios = [r for r in rec.rows if r["section"] == "targets_ratio"]
    assert {r["case"] for r in ratios} >= {"ours_fp16_vs_mlx_fp16"}
    json.dumps(rec.rows)


def test_cuda_matmul_bench_prefill_on_the_cpu():
    """The prefill section runs end to end where MLX has no GPU: both fp8
    decode variants checked against float32, a ratio row each against MLX's
    fp16 matmul, and each case's peak memory recorded."""
    import json

    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    from mlx_flash.bench.cuda import Recorder
    from mlx_flash.backends import cuda_matmul as backend

    rec = Recorder()
    settings = backend.CVT_RAW_SLOTS, backend.CVT_RAW_MAX_ROWS
    cm.bench_prefill(rec, ((33, 48, 80), (512, 32, 17)), rounds=2)
    assert (backend.CVT_RAW_SLOTS, backend.CVT_RAW_MAX_ROWS) == settings  # the variants put the settings back
    rows = [r for r in rec.rows if r["section"] == "prefill"]
    assert {r["case"] for r in rows} == {"mlx_fp16", "ours_routed", "ours_in_kernel", "ours_decode_first"}
    assert len(rows) == 8
    for row in rows:
        assert "error" not in row, row
        # (time_steady's difference of two batches: noise at this size, may fall below 0)
        assert math.isfinite(row["us"]) and len(row["us_rounds"]) == 2 and row["peak_mib"] >= 0
        if row["case"] != "mlx_fp16":
            assert row["rel_diff_vs_fp32"] < 1e-2, row
    ratios = {(r["m"], r["case"]) for r in rec.rows if r["section"] == "prefill_ratio"}
    assert ratios == {(m, f"{c}_vs_mlx_fp16") for m in (33, 512)
                      for c in ("ours_routed", "ours_in_kernel", "ours_decode_first")}
    json.dumps(rec.rows)


def test_cuda_matmul_bench_llama_prefill_on_the_cpu():
    """The llama_prefill section runs end to end where MLX has no GPU, on a
    two-layer Llama: fp16 and FP8Linear with stream-K off and on, every case
    timed, the switch put back, the fp8 cases' logits compared (stream-K's
    reordered sums never reach the CPU's product, so there they agree exactly);
    quantized activations only where a call has more than 16 rows."""
    import json

    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    try:
        cm._mlx_lm_llama()
    except ImportError:
        pytest.skip("mlx_lm is not importable")
    from mlx_flash.backends import cuda_matmul as backend
    from mlx_flash.bench.cuda import Recorder

    tiny = dict(cm.LLAMA_CONFIGS["llama_1b"], hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300)
    rec = Recorder()
    from mlx_flash import nn as fnn

    settings = (backend.WA_SK, backend.WA_SK_SPLITS, backend.WA_SK_WAVES, backend.WA_TILE_FIT, fnn.SHARE_ACT_QUANT)
    cm.bench_llama_prefill(rec, ("tiny",), (1, 17), rounds=2, configs={"tiny": tiny},
                           variants=(("s4", 4, True),), wa_variants=(("nofit", not backend.WA_TILE_FIT),),
                           act_unshared=True)
    assert settings == (backend.WA_SK, backend.WA_SK_SPLITS, backend.WA_SK_WAVES, backend.WA_TILE_FIT,
                        fnn.SHARE_ACT_QUANT), "the cases put cuda_matmul's and nn's settings back"
    rows = [r for r in rec.rows if r["section"] == "llama_prefill"]
    assert [(r["prompt"], r["case"]) for r in rows] == [
        (p, c) for p in (1, 17) for c in ("fp16", "fp8_e4m3", "fp8_e4m3_stream_k", "fp8_e4m3_act_e4m3",
                                          "fp8_e4m3_act_e4m3_unshared", "fp8_e4m3_sk_s4", "fp8_e4m3_wa_nofit")]
    by_case = {(r["prompt"], r["case"]): r for r in rows}
    for p in (1, 17):  # one quantization shared or one a layer: the same bits
        assert (by_case[(p, "fp8_e4m3_act_e4m3_unshared")]["max_abs_logit_diff_vs_fp8_e4m3"]
                == by_case[(p, "fp8_e4m3_act_e4m3")]["max_abs_logit_diff_vs_fp8_e4m3"])
    for row in rows:
        assert "error" not in row, row
        assert len(row["seconds_all"]) == 2 and row["prompt_tokens_per_s"] > 0 and row["vs_fp16"] > 0
        if row["case"] in ("fp8_e4m3_stream_k", "fp8_e4m3_sk_s4", "fp8_e4m3_wa_nofit"):
            assert row["max_abs_logit_diff_vs_fp8_e4m3"] == 0.0
        if row["case"] in ("fp8_e4m3_act_e4m3", "fp8_e4m3_act_e4m3_unshared"):
            # 17 tokens quantize the activations (1 does not: a decode-sized call)
            assert (row["max_abs_logit_diff_vs_fp8_e4m3"] > 0) == (row["prompt"] == 17), row
            assert row["max_abs_logit_diff_vs_fp16"] < 2.0, row
        elif row["case"] != "fp16":
            # e4m3 weights move a random model's logits, but not by their own size
            assert 0 < row["max_abs_logit_diff_vs_fp16"] < 1.0, row
    json.dumps(rec.rows)
    for bad in ("s2:2", "s2:2:yes", "s1:1:0", "s2:two:0"):  # named before any GPU is looked for
        with pytest.raises(SystemExit) as info:
            cm.main(["--sections", "llama_prefill", "--llama-sk-variants", bad])
        assert info.value.code == 2, bad
    for bad in ("a", "a:16:1", "a:yes"):
        with pytest.raises(SystemExit) as info:
            cm.main(["--sections", "llama_prefill", "--llama-wa-variants", bad])
        assert info.value.code == 2, bad


def test_cuda_matmul_plot_draws_the_panels_a_run_holds(tmp_path):
    """A targets-only run plots its wall and GPU-time panels, a prefill run its ratios to MLX, a model run its
    ratios to the fp16 model and its profile's kernel classes, a wa_tiles run its plans' ratios to MLX; a run
    with nothing to plot is an error naming the file."""
    import json

    pytest.importorskip("matplotlib")
    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    rows = [dict(section="targets", case=c, n=n, tflops=t, gpu_tflops=t * 1.1)
            for n in (4096, 8192) for c, t in (("ours_e4m3_fast", 900.0), ("torch_scaled_mm_fast_accum_false", 1300.0))]
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"card": "H100", "mlx": "0", "time": "t", "rows": rows}))
    png = cm.plot(str(path))
    assert png.endswith("targets.png") and (tmp_path / "targets.png").stat().st_size > 1000
    prefill = [dict(section="prefill_ratio", m=m, k=4096, n=4096, case=f"{c}_vs_mlx_fp16", wall=w)
               for m in (128, 512) for c, w in (("ours_wa", 1.1), ("ours_decode_first", 0.6))]
    path = tmp_path / "prefill.json"
    path.write_text(json.dumps({"card": "H100", "mlx": "0", "time": "t", "rows": prefill}))
    assert cm.plot(str(path)).endswith("prefill.png") and (tmp_path / "prefill.png").stat().st_size > 1000
    model = [dict(section="llama_prefill", model="llama_8b", prompt=p, case=c, vs_fp16=v)
             for p in (512, 2048) for c, v in (("fp16", 1.0), ("fp8_e4m3", 0.9), ("fp8_e4m3_act_e4m3", 0.95))]
    model += [dict(section="llama_prefill_profile", model="llama_8b", prompt=512, case=c, busy_us=900.0,
                   by_class_us=classes) for c, classes in (("fp16", {"gemm": 800.0, "other": 150.0}),
                                                           ("fp8_e4m3", {"ours_fp8_weight": 850.0, "other": 150.0}))]
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"card": "H100", "mlx": "0", "time": "t", "rows": model}))
    assert cm.plot(str(path)).endswith("model.png") and (tmp_path / "model.png").stat().st_size > 1000
    tiles = [dict(section="wa_tiles", m=m, k=3072, n=3072, case=c, gpu_us=us, vs_mlx_fp16=r)
             for m in (512, 2048) for c, us, r in (("default_nofit", 85.6, 0.62), ("default", 70.7, 0.76))]
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"card": "H100", "mlx": "0", "time": "t", "rows": tiles}))
    assert cm.plot(str(path)).endswith("tiles.png") and (tmp_path / "tiles.png").stat().st_size > 1000
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"card": "H100", "mlx": "0", "time": "t", "rows": [{"section": "device"}]}))
    with pytest.raises(ValueError, match="empty.json"):
        cm.plot(str(empty))


def test_cuda_matmul_bench_gpu_time_runs_each_call_alone(monkeypatch):
    """gpu_time_per_call prepares one call at a time (so no two kernels share the card), runs them all under
    the profiler, and sums the GPU events per call by name; host-side events do not count. A stand-in torch
    (none here) records what the profiler saw."""
    import sys
    import types

    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    CUDA, CPU = "cuda", "cpu"

    class Event:
        def __init__(self, name, start, end, device):
            self.name, self.device_type = name, device
            self.time_range = types.SimpleNamespace(start=start, end=end)

    trace, prepared = [], []

    class Profile:
        def __init__(self, activities):
            assert activities == ["CUDA"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return trace

    profiler = types.SimpleNamespace(ProfilerActivity=types.SimpleNamespace(CUDA="CUDA"), profile=Profile)
    torch = types.SimpleNamespace(autograd=types.SimpleNamespace(DeviceType=types.SimpleNamespace(CUDA=CUDA)),
                                  profiler=profiler)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.profiler", profiler)

    def prepare(n):
        prepared.append(n)

        def run():
            t = 100.0 * len(trace)
            trace.extend([Event("gemm", t, t + 40.0, CUDA), Event("fill", t + 40, t + 42.0, CUDA),
                          Event("host", t, t + 500.0, CPU)])
        return run

    got = cm.gpu_time_per_call(prepare, 3, torch)
    assert prepared == [1, 1, 1]
    assert got["gpu_us_per_call"] == pytest.approx(42.0)
    assert got["gpu_kernels"] == {"gemm": {"count": 3, "us": 40.0}, "fill": {"count": 3, "us": 2.0}}


def test_cuda_matmul_bench_profile_summary_splits_calls_and_finds_the_waits():
    """llama_prefill_profile's arithmetic on made-up CUPTI events: two calls
    told apart by the widest gap, the shorter one kept; busy time is the union
    of overlapping kernels (the sum counts both), the rest of the span the
    GPU's wait; kernels put in classes by name."""
    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    call1 = [(0.0, 10.0, "void mlx_flash::matmul_wgmma_wa<...>"), (5.0, 12.0, "sm90_xmma_gemm_f16f16"),
             (20.0, 30.0, "cudnn_generated_fort_native_sdpa"), (31.0, 32.0, "rms_norm_kernel")]
    call2 = [(s + 1000.0, e + 1000.0, n) for s, e, n in call1] + [(1040.0, 1050.0, "Memset (Device)")]
    got = cm.profile_summary(call2 + call1, reps=2)
    assert got["span_us"] == 32.0 and got["kernels"] == 4
    assert got["busy_us"] == 12.0 + 10.0 + 1.0
    assert got["kernel_sum_us"] == 10.0 + 7.0 + 10.0 + 1.0
    assert got["by_class_us"] == {"ours_fp8_weight": 10.0, "gemm": 7.0, "attention": 10.0, "other": 1.0}
    assert [t["name"] for t in got["top"]][:2] == ["void mlx_flash::matmul_wgmma_wa<...>",
                                                   "cudnn_generated_fort_native_sdpa"]
    one = cm.profile_summary(call1, reps=1)
    assert one["span_us"] == 32.0 and one["busy_us"] == 23.0
    assert cm.kernel_class("Memcpy DtoD (Device -> Device)") == "copy_fill"
    assert cm.kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert cm.kernel_class("nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_TNN") == "gemm"
    assert cm.kernel_class("custom_kernel_mlx_flash_fp8_quantize_rows_float16_t_8_1") == "ours_quantize"
    assert cm.kernel_class("custom_kernel_mlx_flash_matmul_wgmma_ws_uint8_t_uint8_t_float16_t") == "ours_other"


def test_cuda_matmul_bench_llama_prefill_profile_cases_on_the_cpu(monkeypatch):
    """The llama_prefill_profile section's cases on a two-layer Llama where
    there is no GPU (the profiler stubbed: torch is an optional extra): fp16,
    FP8Linear, and FP8Linear with quantized activations, each forward a
    different model's (the activations switched on for its case only)."""
    cm = pytest.importorskip("mlx_flash.bench.cuda_matmul")
    try:
        cm._mlx_lm_llama()
    except ImportError:
        pytest.skip("mlx_lm is not importable")
    from mlx_flash.bench.cuda import Recorder

    outs = []

    def fake_profile(call, torch, reps=2):
        outs.append(call())
        return {"span_us": 1.0, "busy_us": 1.0, "kernel_sum_us": 1.0, "kernels": 1, "by_class_us": {}, "top": []}

    monkeypatch.setattr(cm, "_torch", lambda: (None, object()))
    monkeypatch.setattr(cm, "forward_profile", fake_profile)
    tiny = dict(cm.LLAMA_CONFIGS["llama_1b"], hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300)
    rec = Recorder()
    cm.bench_llama_prefill_profile(rec, ("tiny",), (17,), configs={"tiny": tiny})
    assert [r["case"] for r in rec.rows] == ["fp16", "fp8_e4m3", "fp8_e4m3_act_e4m3"]
    import numpy as np

    fp16, fp8, act = (np.array(o) for o in outs)
    assert np.all(np.isfinite(act)) and not np.array_equal(fp16, fp8) and not np.array_equal(fp8, act)
