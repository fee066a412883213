"""The compiled extension: ABI-matched to MLX, lazily imported, primitive vjp."""

import subprocess
import sys

import pytest

import mlx.core as mx
import numpy as np

from helpers import qkv, randn, rel_error, rng, run_tests_under_cpu_isa, to_np


def test_extension_accepts_mlx_arrays():
    """A nanobind/MLX ABI mismatch builds but rejects every array argument."""
    from mlx_flash import _ext

    q, k, v = qkv(rng("abi"), 1, 2, 1, 5, 7, 8)
    out, lse = _ext.attention_forward(q, k, v, batch=1, scale=0.5, window_left=-1, window_right=-1,
                                      softcap=0.0, block_q=64, block_k=64)
    assert out.shape == (1, 2, 5, 8) and lse.shape == (1, 2, 5)
    assert _ext.cpu_kernel_isa() in ("generic", "avx2", "avx512") and _ext.num_threads() >= 1


@pytest.mark.usefixtures("cpu_default_device")  # the primitive evaluates on the CPU here
def test_primitive_vjp_matches_python_vjp():
    """C++ callers differentiating the primitive directly get the fused backward too."""
    import mlx_flash
    from mlx_flash import _ext

    gen = rng("prim-vjp")
    q, k, v = qkv(gen, 1, 2, 2, 9, 13, 16)
    dout = randn(gen, (1, 2, 9, 16))

    def through_primitive(q, k, v):
        out, _ = _ext.attention_forward(q, k, v, batch=1, scale=0.25, window_left=-1, window_right=0,
                                        softcap=0.0, block_q=64, block_k=64)
        return mx.sum(out * dout)

    def through_api(q, k, v):
        return mx.sum(mlx_flash.flash_attention(q, k, v, scale=0.25, causal=True) * dout)

    a = mx.grad(through_primitive, argnums=(0, 1, 2))(q, k, v)
    b = mx.grad(through_api, argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(a, b):
        assert rel_error(to_np(x), to_np(y)) < 1e-6


def test_import_does_not_need_the_extension():
    """A CUDA-only install may lack _ext: importing mlx_flash must still work,
    and a CPU call must say what is missing."""
    code = (
        "import sys; sys.modules['mlx_flash._ext'] = None\n"
        "import mlx.core as mx, mlx_flash\n"
        "try:\n"
        "    mlx_flash.flash_attention(mx.ones((1,1,2,4)), mx.ones((1,1,2,4)), mx.ones((1,1,2,4)), stream=mx.cpu)\n"
        "except ImportError as e:\n"
        "    print('ImportError', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ImportError" in result.stdout and "_ext" in result.stdout


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_cpu_variants_are_exact_too(isa):
    """The kernels a CPU without AVX-512 (avx2) or without AVX2 (generic) runs,
    forced through MLX_FLASH_CPU_ISA; the default variant runs everywhere else."""
    run_tests_under_cpu_isa(isa, (
        "import test_attention_values as t, features\n"
        "for f in ('none', 'combined_everything', 'additive_mask'):\n"
        "    for dt in ('float32', 'float16'):\n"
        "        t.test_forward_features('cpu', f, t.FEATURE_SHAPES[0], dt)\n"
        "        t.test_gradient_features('cpu', f, t.FEATURE_SHAPES[1], dt)\n"
        "t.test_decode_features('cpu', 'causal', 'bfloat16')\n"
    ), timeout=300)


def test_missing_mlx_backend_names_the_fix():
    """`pip install mlx_flash` on Linux without [cpu] (or mlx[cuda]) leaves mlx
    without libmlx.so; importing mlx_flash must say what to install."""
    code = (
        "import sys\n"
        "class NoLibmlx:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx.core':\n"
        "            raise ImportError('libmlx.so: cannot open shared object file: No such file or directory')\n"
        "sys.meta_path.insert(0, NoLibmlx())\n"
        "try:\n"
        "    import mlx_flash\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "    print('cause:', e.__cause__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "mlx_flash[cpu]" in message and "mlx[cuda]" in message, message
    assert "cause: libmlx.so: cannot open" in message, message  # the original error stays attached


def test_other_import_errors_pass_through():
    code = (
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx.core':\n"
        "            raise ImportError('something else entirely')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "try:\n"
        "    import mlx_flash\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ImportError: something else entirely", result


@pytest.mark.parametrize("variable, value, expected", [
    ("MLX_FLASH_CPU_ISA", "bogus", "expected one of generic, avx2, avx512"),
    ("MLX_FLASH_CPU_ISA", "AVX2", "expected one of generic, avx2, avx512"),
    ("MLX_FLASH_NUM_THREADS", "two", "expected a positive integer"),
    ("MLX_FLASH_NUM_THREADS", "0", "expected a positive integer"),
])
def test_bad_cpu_environment_is_an_error(variable, value, expected):
    """A misspelt MLX_FLASH_CPU_ISA / MLX_FLASH_NUM_THREADS fails the first CPU call,
    naming the variable, the valid values and what came, instead of being ignored."""
    import os

    code = (
        "import mlx.core as mx, mlx_flash\n"
        "x = mx.ones((1, 1, 2, 4))\n"
        "try:\n"
        "    mlx_flash.flash_attention(x, x, x, stream=mx.cpu)\n"
        "except ImportError as e:\n"
        "    print('error:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_FLASH_")}
    env[variable] = value
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert f"error: {variable}: {expected}" in result.stdout and f"got '{value}'" in result.stdout, result.stdout


def test_cpu_environment_accepts_every_documented_value():
    import os

    for variable, value in [("MLX_FLASH_CPU_ISA", "avx512"), ("MLX_FLASH_CPU_ISA", ""),
                            ("MLX_FLASH_CPU_ISA", "generic"), ("MLX_FLASH_NUM_THREADS", "3")]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_FLASH_")}
        env[variable] = value
        code = "from mlx_flash import _ext; print(_ext.cpu_kernel_isa(), _ext.num_threads())"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, (variable, value, result.stderr)
        isa, threads = result.stdout.split()
        if value == "generic":
            assert isa == "generic"
        if variable == "MLX_FLASH_NUM_THREADS":
            assert threads == value


def test_packaging_metadata_names_an_existing_licence():
    """pyproject's licence is an SPDX expression with its file in the tree (CI checks that
    the built wheel carries it under .dist-info/licenses/)."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    root = pathlib.Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License") and "mlx_flash authors" in text
    assert project["authors"] and any(c.startswith("Operating System") for c in project["classifiers"])
