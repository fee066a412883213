"""examples/demo.py (README's first command) runs and reports what it says.
(generate.py and finetune_long_context.py are run by test_mlx_lm_patch.py,
the notebook by test_notebook.py.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_small_and_shows_progress(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--n", "113", "--causal"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("mlx_flash", "mx.fast SDPA", "reference"):
        # A line per implementation, announced before it runs and completed with its time.
        assert re.search(rf"{re.escape(name)}: forward\+backward \.\.\. +[\d.]+ ms", out), out
    errors = re.search(r"mlx_flash: max \|error\| vs reference: out (\S+), dq (\S+), dk (\S+), dv (\S+)", out)
    assert errors and max(float(e.rstrip(",")) for e in errors.groups()) < 1e-4, out
