"""CUDA-backend specifics that the behaviour tests do not cover.

* Compile check: every kernel source of cuda_src/ is wrapped exactly the way
  mx.fast.cuda_kernel wraps it (same signature text, same template constants)
  and compiled with nvcc for sm_90a, where nvcc exists. This catches compile
  errors on machines without a GPU.
* On a CUDA GPU: the decode (split-key) path and the tensor-core path against
  the float64 reference at sizes the behaviour tests do not reach.
"""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.backends import cuda as cuda_backend

_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
               mx.bool_: "bool", mx.int32: "int32_t", mx.uint8: "uint8_t"}


def wrap_like_mlx(name, body, inputs, outputs, template, headers=cuda_backend.ATTENTION_HEADERS):
    """The translation unit mx.fast.cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp).

    inputs/outputs: lists of (name, dtype); template: list of (name, value).
    """
    src = ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", "#include <cstdint>",
           "#include <cooperative_groups.h>", cuda_backend._header(headers),
           "namespace mlx::core::cu {", "namespace cg = cooperative_groups;",
           f"__global__ void {name}("]
    params = [f"    const {_CUDA_TYPES[d]}* {n}" for n, d in inputs] + [f"    {_CUDA_TYPES[d]}* {n}" for n, d in outputs]
    src.append(",\n".join(params) + ") {")
    for n, val in template:
        if isinstance(val, bool):
            src.append(f"  constexpr bool {n} = {'true' if val else 'false'};")
        elif isinstance(val, int):
            src.append(f"  constexpr int {n} = {val};")
        else:
            src.append(f"  using {n} = {_CUDA_TYPES[val]};")
    src += [body, "}", "}"]
    return "\n".join(src)


def _attention_cases():
    f = mx.float32
    attn_in = [(n, d) for n, d in zip(cuda_backend._ATTN_INPUTS, (None,) * 11)]
    features = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 2), ("WINDOW", True),
                ("BLOCK_MASK", True), ("VARLEN", False)]
    for T in (mx.float16, mx.bfloat16):
        dims = [("D", 72), ("DV", 40)]
        yield ("attention_fwd_mma", T, mx.float32, features + [("SINKS", True)] + dims + [("NW", 4), ("BN", 64)],
               ("out", "lse"))
        yield ("attention_bwd_mma", T, mx.float32, features + dims + [("NW", 4)], ("dq_acc", "dk", "dv"))
    yield ("attention_fwd_simt", mx.float32, mx.bool_,
           [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 1), ("WINDOW", True), ("BLOCK_MASK", True),
            ("VARLEN", True), ("SINKS", True), ("D", 33), ("DV", 7), ("W", 4), ("SPLITS", 3)],
           ("out", "lse", "part_o", "part_lse"))
    yield ("attention_bwd_simt", mx.float32, mx.bool_,
           features + [("D", 33), ("DV", 7), ("W", 2), ("HAS_DLSE", True)], ("dq_acc", "dk", "dv"))


def _input_dtypes(body, T, MT):
    if body in ("attention_fwd_mma", "attention_fwd_simt"):
        names, dtypes = cuda_backend._ATTN_INPUTS, (T, T, T, MT, mx.float32, mx.float32, mx.bool_,
                                                     mx.int32, mx.int32, mx.int32, mx.float32)
    elif body == "attention_bwd_mma":
        names, dtypes = cuda_backend._BWD_MMA_INPUTS, (T, T, T, MT, mx.float32, mx.bool_, mx.int32, mx.int32,
                                                        mx.int32, mx.float32, T, mx.float32, mx.float32)
    else:
        names, dtypes = cuda_backend._BWD_SIMT_INPUTS, (T, T, T, MT, mx.float32, mx.bool_, mx.int32, mx.int32,
                                                         mx.int32, mx.float32, T, mx.float32, T, mx.float32)
    return list(zip(names, dtypes))


def _output_dtypes(outputs, T):
    return [(n, mx.float32 if n in ("lse", "part_o", "part_lse", "dq_acc") else T) for n in outputs]


def _nvcc_compile(tmp_path, name, source):
    path = tmp_path / f"{name}.cu"
    path.write_text(source)
    result = subprocess.run(
        ["nvcc", "-arch=sm_90a", "-std=c++17", "-c", "-o", str(tmp_path / f"{name}.o"), str(path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _matmul_cases():
    f16, b16, u8 = mx.float16, mx.bfloat16, mx.uint8
    for ta, tb, c, fa, fb in ((f16, f16, f16, 0, 0), (f16, u8, f16, 0, 1), (b16, u8, b16, 0, 2),
                              (u8, b16, b16, 1, 0), (u8, u8, f16, 1, 1), (u8, u8, f16, 1, 2)):
        for trans in (False, True):
            for native in ((False, True) if fa and fb else (False,)):
                yield [("TA", ta), ("TB", tb), ("C", c), ("TO", mx.float32 if fa and fb else c), ("FA", fa),
                       ("FB", fb), ("TRANS_B", trans), ("AS", True), ("BS", fa == 1), ("NATIVE_FP8", native)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_matmul_compiles_as_mlx_wraps_it(tmp_path):
    body = cuda_backend._read("matmul.cu")
    for i, template in enumerate(_matmul_cases()):
        t = dict(template)
        ins = [("a", t["TA"]), ("b", t["TB"]), ("a_scale", mx.float32), ("b_scale", mx.float32), ("ip", mx.int32)]
        source = wrap_like_mlx(f"mm{i}", body, ins, [("out", t["TO"])], template, cuda_backend.MATMUL_HEADERS)
        _nvcc_compile(tmp_path, f"mm{i}", source)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_as_mlx_wraps_them(tmp_path):
    parts = []
    for i, (body, T, MT, template, outputs) in enumerate(_attention_cases()):
        template = [("T", T), ("MT", MT)] + template
        parts.append((f"k{i}_{body}", body, _input_dtypes(body, T, MT), _output_dtypes(outputs, T), template))
    for i, (name, body, ins, outs, template) in enumerate(parts):
        _nvcc_compile(tmp_path, name, wrap_like_mlx(name, cuda_backend._read(body + ".cu"), ins, outs, template))
