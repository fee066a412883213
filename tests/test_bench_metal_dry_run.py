"""The Mac verification kit (`python -m mlx_flash.bench.metal`) runs end to
end in its dry run: every section on tiny shapes, our Metal kernels through
the emulation, MLX on the CPU; ours must agree with MLX on every row (the
kit raises otherwise), and the JSON and the plot are written."""

from __future__ import annotations

import json

import pytest

from metal_emu import harness

_reason = harness.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def test_metal_kit_dry_run(tmp_path):
    from mlx_flash.bench import metal as kit

    assert kit.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmarks" / "results" / "metal_emulated.json").read_text())
    assert result["chip"] == "emulated" and result["dry_run"] and result["ours"] == "metal_emu"
    sections = {r["section"] for r in result["rows"]}
    assert sections == {"fwd", "train", "decode", "features", "wide", "key_ranges"}
    assert not [r for r in result["rows"] if "error" in r]
    features = {r["feature"] for r in result["rows"] if r["section"] == "features"}
    assert features == {"window", "softcap", "alibi", "block_sparse", "causal", "sinks"}
    train = [r for r in result["rows"] if r["section"] == "train"]
    assert train and all(r["ours_peak_mib"] > 0 and r["mlx_peak_mib"] > 0 for r in train)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "benchmarks" / "metal_emulated.png").stat().st_size > 10_000


def test_metal_kit_rejects_unknown_sections(tmp_path):
    from mlx_flash.bench import metal as kit

    with pytest.raises(SystemExit, match="unknown"):
        kit.main(["--dry-run", "--sections", "fwd,speed", "--out", str(tmp_path)])


def test_metal_kit_dry_run_fails_when_ours_is_wrong(tmp_path, monkeypatch):
    from mlx_flash.bench import metal as kit

    right = kit.Emulated.forward
    monkeypatch.setattr(kit.Emulated, "forward", lambda self, q, k, v, **o: right(self, q, k, v, **o) * 1.05)
    with pytest.raises(AssertionError, match="disagree"):
        kit.main(["--dry-run", "--sections", "fwd", "--out", str(tmp_path)])
