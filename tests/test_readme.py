"""Every code block of README.md works as written: the python blocks run
unchanged in a fresh interpreter each (the arrays they leave are evaluated,
MLX being lazy, and must hold no NaN), and the shell commands name extras,
files, modules and flags that exist."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)

# Appended to a block: compute what it left (MLX builds graphs lazily) and look for NaN.
EVALUATE_WHAT_IS_LEFT = """
import mlx.core as _mx
_arrays = [v for v in list(globals().values()) if isinstance(v, _mx.array)]
_mx.eval(_arrays)
_nan = [a.shape for a in _arrays if _mx.issubdtype(a.dtype, _mx.floating) and _mx.any(_mx.isnan(a)).item()]
assert not _nan, f"NaN in arrays of shapes {_nan}"
print("README block ok:", len(_arrays), "arrays")
"""


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def test_readme_has_the_blocks():
    assert len(PYTHON_BLOCKS) >= 2 and BASH_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path):
    code = PYTHON_BLOCKS[index]
    if "patch_mlx_lm" in code:
        pytest.importorskip("mlx_lm", reason="the block patches mlx-lm (pip install mlx_flash[lm])")
    # A scratch directory as cwd: a block must not need (or write into) the checkout.
    result = subprocess.run([sys.executable, "-c", code + EVALUATE_WHAT_IS_LEFT], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README python block {index + 1} failed:\n{code}\n{result.stderr[-3000:]}"
    assert "README block ok" in result.stdout


def _commands():
    """Shell commands of the bash blocks, split at && and ;, comments dropped."""
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for command in re.split(r"&&|;", line):
                if command.strip():
                    yield shlex.split(command)


def test_shell_commands_name_what_exists():
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    # Install lines anywhere in the README (the Mac variant is in prose).
    for spec in re.findall(r'pip install -e "\.\[([\w,-]+)\]"', README):
        assert set(spec.split(",")) <= extras, f"README installs extras {spec}; pyproject has {sorted(extras)}"
    checked = 0
    for argv in _commands():
        if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
            assert (ROOT / argv[1]).is_file(), f"README runs {argv[1]}, which does not exist"
            checked += 1
        if argv[:3] == ["python", "-m", "pytest"]:
            # Positional arguments only: the values of -k/-m/-p name no path.
            args, paths = argv[3:], []
            for i, a in enumerate(args):
                if not a.startswith("-") and not (i and args[i - 1] in ("-k", "-m", "-p")):
                    paths.append(a)
            assert all((ROOT / p).exists() for p in paths), argv
            checked += 1
    assert checked >= 2


def test_module_commands_accept_their_flags():
    """`python -m mlx_flash...` commands quoted in the README exist and take the flags shown."""
    quoted = re.findall(r"`python -m (mlx_flash[\w.]*)([^`]*)`", README)
    assert quoted
    for module, rest in quoted:
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"python -m {module} --help: {result.stderr[-2000:]}"
        for flag in re.findall(r"--[\w-]+", rest):
            assert flag in result.stdout, f"README shows `python -m {module} {rest.strip()}`; {flag} is not in its --help"
