"""examples/mlx_flash_tour.ipynb runs top to bottom without errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "mlx_flash_tour.ipynb"


def test_tour_notebook_executes(monkeypatch):
    # The kernel is a fresh process: let it import mlx_flash from this
    # checkout (a source tree with an in-place build) as well as an install.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "identical: True" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the memory plot was not drawn"
