"""The session seed is where a reader of `pytest -q` output looks: in the
summary of every run and in the report of each failing test."""

import os
import pathlib
import re
import subprocess
import sys

TESTS = pathlib.Path(__file__).parent

PROBE = '''
def test_passes():
    pass

def test_fails():
    assert False, "probe failure"
'''


def _run_probe(tmp_path, select):
    (tmp_path / "test_probe.py").write_text(PROBE)
    # Load this suite's conftest as a plugin so the probe gets exactly its hooks.
    env = dict(os.environ, MLX_FLASH_TEST_SEED="424242",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)  # the caller's pytest options must not change the probe's output
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py"), "-k", select]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_seed_in_quiet_summary(tmp_path):
    result = _run_probe(tmp_path, "passes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MLX_FLASH_TEST_SEED=424242" in result.stdout, result.stdout


def test_seed_in_failure_report(tmp_path):
    result = _run_probe(tmp_path, "fails")
    assert result.returncode == 1, result.stdout + result.stderr
    # The failing test's own report has a section naming the seed (a separator line, then the seed).
    assert re.search(r"-{3,} mlx_flash test seed -{3,}\n[^\n]*MLX_FLASH_TEST_SEED=424242\n", result.stdout), result.stdout


def test_xdist_workers_share_the_printed_seed(tmp_path):
    """Under pytest-xdist every worker draws from the seed the summary and the
    failure reports print (workers are fresh processes, which would otherwise
    each draw their own)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist not installed")
    # Failing probes print their worker's seed; the controller's is in the summary.
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "from helpers import BASE_SEED\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_seed(i):\n"
        "    assert False, f'worker seed {BASE_SEED}'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("MLX_FLASH_TEST_SEED", None)  # a fresh seed, as in an ordinary run
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-n", "2",
           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    printed = set(re.findall(r"replay with MLX_FLASH_TEST_SEED=(\d+)", result.stdout))
    workers = set(re.findall(r"worker seed (\d+)", result.stdout))
    assert result.returncode == 1 and len(printed) == 1 and workers == printed, result.stdout + result.stderr
