"""CUDA-backend specifics that the behaviour tests do not cover.

* Compile check: every kernel source of cuda_src/ is wrapped exactly the way
  mx.fast.cuda_kernel wraps it (same signature text, same template constants,
  the same header text the backend hands MLX for that kernel) and compiled
  with nvcc for sm_90a, where nvcc exists. This catches compile errors on
  machines without a GPU.
* On a CUDA GPU: the decode (split-key) path and the tensor-core path against
  the float64 reference at sizes the behaviour tests do not reach, and the
  non-finite contract on every kernel the card selects (the Hopper ones too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import features
from cuda_emu import nonfinite_cases
from mlx_flash.backends import cuda as cuda_backend
from mlx_flash.backends import cuda_matmul

_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
               mx.bool_: "bool", mx.int32: "int32_t", mx.uint8: "uint8_t", mx.uint32: "uint32_t"}


def _prelude(headers):
    # MLX's device/utils.cuh defines Strides (kernels built with ensure_row_contiguous=False take them).
    return "\n".join(["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", "#include <cstdint>",
                      "#include <cuda/std/array>", "#include <cooperative_groups.h>",
                      "namespace mlx::core::cu { using Strides = cuda::std::array<int64_t, 10>; }",
                      cuda_backend._header(headers)])


def _kernel_text(name, body, inputs, outputs, template):
    """The kernel function mx.fast.cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp):
    inputs as `const T*`, outputs as `T*`, template constants declared at the top
    of the body. inputs/outputs: lists of (name, dtype); template: (name, value)."""
    src = ["namespace mlx::core::cu {", "namespace cg = cooperative_groups;", f"__global__ void {name}("]
    params = []
    for n, d in inputs:  # MLX adds `<name>_strides` where the body names it
        params.append(f"    const {_CUDA_TYPES[d]}* {n}")
        if n + "_strides" in body:
            params.append(f"    const __grid_constant__ Strides {n}_strides")
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in outputs]
    src.append(",\n".join(params) + ") {")
    for n, val in template:
        if isinstance(val, int) and not isinstance(val, bool) and val < 0:
            raise AssertionError(f"{name}: template {n} = {val}: MLX names the kernel after its template values "
                                 "and NVRTC cannot look up a name holding a minus sign")
        if isinstance(val, bool):
            src.append(f"  constexpr bool {n} = {'true' if val else 'false'};")
        elif isinstance(val, int):
            src.append(f"  constexpr int {n} = {val};")
        else:
            src.append(f"  using {n} = {_CUDA_TYPES[val]};")
    src += [body, "}", "}"]
    return "\n".join(src)


def wrap_like_mlx(name, body, inputs, outputs, template, headers=None):
    """One translation unit as MLX compiles it for kernel `body` (a cuda_src/ name
    without .cu), with the headers the backend gives that kernel unless `headers`."""
    headers = headers or cuda_backend.kernel_headers(body)
    return _prelude(headers) + "\n" + _kernel_text(name, cuda_backend._read(body + ".cu"), inputs, outputs, template)


def _attention_cases():
    f = mx.float32
    # Every feature, key ranges included; the float32 SIMT cases below compile
    # the kernels without key ranges (KEY_RANGE false) too.
    features = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 2), ("WINDOW", True),
                ("BLOCK_MASK", True), ("VARLEN", False), ("KEY_RANGE", True)]
    for T in (mx.float16, mx.bfloat16):
        dims = [("D", 72), ("DV", 40)]
        yield ("attention_fwd_mma", T, mx.float32,
               features + [("SINKS", True)] + dims + [("NW", 4), ("BN", 64), ("DVC", 40)], ("out", "lse"))
        yield ("attention_fwd_mma2", T, mx.float32, features + [("SINKS", True)] + dims + [("NW", 4), ("BN", 32)],
               ("out", "lse"))
        yield ("attention_bwd_mma", T, mx.float32, features + dims + [("NW", 4), ("NCH", 1)], ("dq_acc", "dk", "dv"))
        # Hopper forward: both schedules, both head dims and key tiles.
        for D, BN, stages, feats in ((128, 128, 3, [f for f in features if f[0] != "BLOCK_MASK"] +
                                      [("BLOCK_MASK", False)]),
                                     (64, 64, 2, features)):
            yield ("attention_fwd_wgmma", T, mx.float32,
                   feats + [("SINKS", True), ("D", D), ("DV", D), ("BN", BN), ("STAGES", stages)], ("out", "lse"))
        for D in (64, 128):
            yield ("attention_bwd_wgmma", T, mx.float32, features + [("D", D), ("DV", D), ("HEADS_FIRST", D == 64),
                                                                          ("DV_EARLY", D == 64),
                                                                          ("DQ_V4", D == 128)],
                   ("dq_acc", "dk", "dv"))
    # delta = rowsum(dO * O) - dlse: 16-byte chunks (8, 16 and 32 threads a row) and element by element.
    for T, dv, has_dlse in ((mx.float16, 128, False), (mx.bfloat16, 64, True), (mx.float16, 40, True),
                            (mx.bfloat16, 7, False), (mx.float16, 512, True)):
        yield ("attention_bwd_delta", T, None, [("DV", dv), ("HAS_DLSE", has_dlse)], ("delta",))
    yield ("attention_fwd_simt", mx.float32, mx.bool_,
           [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 1), ("WINDOW", True), ("BLOCK_MASK", True),
            ("VARLEN", True), ("KEY_RANGE", False), ("SINKS", True), ("D", 33), ("DV", 7), ("W", 4), ("SPLITS", 3)],
           ("out", "lse", "part_o", "part_lse"))
    yield ("attention_fwd_simt", mx.float16, mx.float16,
           features + [("SINKS", False), ("D", 40), ("DV", 33), ("W", 8), ("SPLITS", 1)],
           ("out", "lse", "part_o", "part_lse"))
    yield ("attention_bwd_simt", mx.float32, mx.bool_,
           features + [("D", 33), ("DV", 7), ("W", 2), ("HAS_DLSE", True), ("NCH", 1)], ("dq_acc", "dk", "dv"))
    yield ("attention_bwd_simt", mx.float16, mx.float16, [(n, False) for n in ("SOFTCAP", "ALIBI", "WINDOW",
           "BLOCK_MASK", "VARLEN", "KEY_RANGE")] + [("MASK_KIND", 0), ("D", 160), ("DV", 160), ("W", 1),
           ("HAS_DLSE", False), ("NCH", 1)], ("dq_acc", "dk", "dv"))


def _decode_cases():
    """attention_fwd_decode instances: (T, MT, template after T and MT)."""
    plain = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 0), ("WINDOW", False),
             ("BLOCK_MASK", False), ("SINKS", False), ("VARLEN", False), ("KEY_RANGE", False)]
    every = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 1), ("WINDOW", True),
             ("BLOCK_MASK", True), ("SINKS", True), ("VARLEN", False), ("KEY_RANGE", True)]
    varlen = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 2), ("WINDOW", True),
              ("BLOCK_MASK", False), ("SINKS", True), ("VARLEN", True), ("KEY_RANGE", False)]
    ranges = plain[:-1] + [("KEY_RANGE", True)]
    tiles = lambda d, dv, stages, split, bulk=False, kr=False: [("D", d), ("DV", dv), ("NW", 4), ("BN", 16),
                                                                ("STAGES", stages), ("SPLIT", split), ("DVC", dv),
                                                                ("BULK", bulk), ("KR", kr)]
    f16, b16 = mx.float16, mx.bfloat16
    yield f16, mx.bool_, plain + tiles(128, 128, 3, True)
    yield f16, mx.bool_, ranges + tiles(128, 128, 3, True)
    yield b16, mx.bool_, ranges + tiles(256, 256, 2, True)
    yield b16, mx.bool_, plain + tiles(128, 128, 3, False)
    yield f16, mx.bool_, plain + tiles(64, 64, 3, True)
    yield b16, mx.bool_, plain + tiles(256, 256, 2, True)
    yield f16, mx.bool_, every + tiles(128, 128, 3, True)
    yield b16, mx.bool_, every + tiles(64, 64, 3, False)
    yield f16, mx.float32, varlen + tiles(72, 40, 3, True)
    yield b16, mx.bfloat16, varlen + tiles(256, 256, 2, False)
    yield f16, mx.float16, every[:2] + [("MASK_KIND", 2)] + every[3:] + tiles(96, 128, 4, True)
    # Bulk (TMA) copies of the K/V rows.
    yield f16, mx.bool_, plain + tiles(128, 128, 3, True, True)
    yield b16, mx.bool_, every + tiles(128, 128, 3, True, True)
    yield f16, mx.float32, varlen + tiles(72, 40, 3, False, True)
    yield b16, mx.bool_, plain + tiles(64, 64, 4, True, True)
    # Keys as the mma's M (8-row blocks).
    yield f16, mx.bool_, plain + tiles(128, 128, 3, True, False, True)
    yield b16, mx.bool_, plain + tiles(128, 128, 3, True, True, True)
    yield f16, mx.bool_, every + tiles(128, 128, 3, True, True, True)
    yield b16, mx.float32, varlen + tiles(72, 40, 3, False, False, True)
    yield f16, mx.bool_, plain + tiles(256, 256, 2, True, True, True)
    # Tile variants tools/cuda_decode_check.py sweeps: 8 warps, 32-key warp tiles, 2 warps.
    yield f16, mx.bool_, plain + tiles(128, 128, 2, True)[:2] + [("NW", 8), ("BN", 16), ("STAGES", 2), ("SPLIT", True),
                                                                 ("DVC", 128), ("BULK", False), ("KR", False)]
    yield b16, mx.bool_, plain + tiles(128, 128, 2, True)[:2] + [("NW", 4), ("BN", 32), ("STAGES", 2), ("SPLIT", True),
                                                                 ("DVC", 128), ("BULK", False), ("KR", False)]
    yield f16, mx.bool_, plain + tiles(64, 64, 4, True)[:2] + [("NW", 2), ("BN", 16), ("STAGES", 4), ("SPLIT", True),
                                                               ("DVC", 64), ("BULK", False), ("KR", False)]


def _combine_cases():
    for T, dv, sinks, varlen in ((mx.float16, 128, False, False), (mx.bfloat16, 64, True, True),
                                 (mx.float16, 256, True, False), (mx.float32, 7, False, True),
                                 (mx.float32, 255, True, False), (mx.bfloat16, 40, False, False)):
        yield [("T", T), ("DV", dv), ("SINKS", sinks), ("VARLEN", varlen)]


def _input_dtypes(body, T, MT):
    if body == "attention_combine":
        return list(zip(("part_o", "part_lse", "sinks", "ip", "ns"),
                        (mx.float32, mx.float32, mx.float32, mx.int32, mx.int32)))
    if body == "attention_bwd_delta":
        return [("dout", T), ("out", T), ("dlse", mx.float32), ("n", mx.int32)]
    if body == "attention_fwd_decode":  # and the ticket pool's region (uint32)
        names, dtypes = cuda_backend._ATTN_INPUTS + ("tk",), (T, T, T, MT, mx.float32, mx.float32, mx.bool_,
                                                               mx.int32, mx.int32, mx.int32, mx.float32, mx.int32,
                                                               mx.int32, mx.uint32)
    elif body in ("attention_fwd_mma", "attention_fwd_mma2", "attention_fwd_wgmma", "attention_fwd_simt"):
        names, dtypes = cuda_backend._ATTN_INPUTS, (T, T, T, MT, mx.float32, mx.float32, mx.bool_,
                                                     mx.int32, mx.int32, mx.int32, mx.float32, mx.int32, mx.int32)
    elif body in ("attention_bwd_mma", "attention_bwd_wgmma"):
        names, dtypes = cuda_backend._BWD_MMA_INPUTS, (T, T, T, MT, mx.float32, mx.bool_, mx.int32, mx.int32,
                                                        mx.int32, mx.float32, T, mx.float32, mx.float32,
                                                        mx.int32, mx.int32)
    else:
        names, dtypes = cuda_backend._BWD_SIMT_INPUTS, (T, T, T, MT, mx.float32, mx.bool_, mx.int32, mx.int32,
                                                         mx.int32, mx.float32, T, mx.float32, T, mx.float32,
                                                         mx.int32, mx.int32)
    assert len(names) == len(dtypes), f"{body}: a dtype for every input"
    return list(zip(names, dtypes))


def _output_dtypes(outputs, T):
    return [(n, mx.float32 if n in ("lse", "part_o", "part_lse", "ws", "dq_acc", "delta") else T) for n in outputs]


def _matmul_cases():
    f16, b16, u8 = mx.float16, mx.bfloat16, mx.uint8
    # (TA, TB, C, FA, FB, TRANS_B, NATIVE_FP8): each load path of matmul.cuh once.
    for ta, tb, c, fa, fb, trans, native in (
        (f16, f16, f16, 0, 0, False, False), (b16, b16, b16, 0, 0, True, False),
        (f16, u8, f16, 0, 1, False, False), (b16, u8, b16, 0, 2, True, False),
        (u8, u8, f16, 1, 1, False, False), (u8, u8, f16, 1, 2, False, True), (u8, u8, f16, 2, 1, True, True),
    ):
        yield [("TA", ta), ("TB", tb), ("C", c), ("TO", mx.float32 if fa and fb else c), ("FA", fa),
               ("FB", fb), ("TRANS_B", trans), ("AS", True), ("BS", fa == 1), ("NATIVE_FP8", native)]


# How each kernel _kernel_text writes begins: _nvcc_compile cuts a unit's kernels apart there.
_KERNEL_START = "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n__global__ void "


def _translation_units(source, jobs):
    """`source` (a prelude, then kernels _kernel_text wrote, joined by newlines) as at most `jobs` units,
    each the prelude and every jobs-th kernel; the whole source where it holds one kernel or none."""
    first = source.find(_KERNEL_START)
    if first < 0 or jobs < 2:
        return [source]
    prelude, kernels = source[:first], [_KERNEL_START + k for k in source[first:].split(_KERNEL_START)[1:]]
    jobs = min(jobs, len(kernels))
    return [prelude + "\n".join(kernels[i::jobs]) for i in range(jobs)]


def _nvcc_compile(tmp_path, name, source, flags=(), arch="90a"):
    """nvcc -c of `source`; returns ptxas' log. arch: the card's compute
    capability ("90a" as MLX's NVRTC targets Hopper: wgmma needs the "a"
    features; "80" / "89" for the routes an A100 / L40 takes). The kernels are
    cut into one unit per CPU (at most 4), compiled side by side: ptxas takes a
    unit's kernels one after another, and the largest units took 3-10 minutes
    of the CI machine's time on one of its two cores. Objects: `name`.o for one
    unit, `name`.0.o, `name`.1.o, ... for more (_sass reads either)."""
    units = _translation_units(source, min(4, os.cpu_count() or 1))
    runs = []
    for i, unit in enumerate(units):
        stem = name if len(units) == 1 else f"{name}.{i}"
        path = tmp_path / f"{stem}.cu"
        path.write_text(unit)
        with open(tmp_path / f"{stem}.log", "w") as log:  # a file, not a pipe: no unit waits on a full one
            runs.append((stem, subprocess.Popen(
                ["nvcc", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-std=c++17", *flags, "-c", "-o",
                 str(tmp_path / f"{stem}.o"), str(path)],
                stdout=subprocess.DEVNULL, stderr=log)))
    logs = []
    for stem, run in runs:
        run.wait()
        err = (tmp_path / f"{stem}.log").read_text()
        assert run.returncode == 0, err[-4000:]
        logs.append(err)
    return "\n".join(logs)


def _sass(tmp_path, name):
    """cuobjdump -sass of what _nvcc_compile built for `name` (every unit's object)."""
    objects = [tmp_path / f"{name}.o"] if (tmp_path / f"{name}.o").exists() else sorted(
        tmp_path.glob(f"{name}.[0-9]*.o"), key=lambda p: int(p.name[len(name) + 1:-2]))
    assert objects, f"no object of {name} in {tmp_path}"
    tool = _cuobjdump()
    # cuobjdump runs nvdisasm: from PATH, or beside it (the nvidia-cuda-nvdisasm wheel shares its bin folder).
    env = dict(os.environ)
    if os.path.exists(os.path.join(os.path.dirname(tool), "nvdisasm")):
        env["NVDISASM_PATH"] = os.path.dirname(tool)
    return "\n".join(subprocess.run([tool, "-sass", str(o)], capture_output=True, text=True, check=True,
                                    env=env).stdout for o in objects)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@needs_nvcc
def test_matmul_compiles_as_mlx_wraps_it(tmp_path):
    body = cuda_backend._read("matmul.cu")
    kernels = []
    for i, template in enumerate(_matmul_cases()):
        t = dict(template)
        ins = matmul_inputs(t["TA"], t["TB"])
        kernels.append(_kernel_text(f"mm{i}", body, ins, [("out", t["TO"])], template))
    _nvcc_compile(tmp_path, "matmul", _prelude(cuda_backend.kernel_headers("matmul")) + "\n" + "\n".join(kernels))


def _matmul_wgmma_cases():
    """(TA, TB, C, FA, FB, TRANS_B, BN, STAGES, PROMOTE, NATIVE, TMA): every mode, b layout, load path and plan."""
    f16, b16, u8 = mx.float16, mx.bfloat16, mx.uint8
    yield f16, f16, f16, 0, 0, True, 256, 4, 0, False, False
    yield f16, f16, f16, 0, 0, False, 256, 4, 0, False, True
    yield b16, b16, b16, 0, 0, False, 128, 6, 0, False, False
    yield b16, b16, b16, 0, 0, True, 256, 4, 0, False, True
    yield u8, u8, f16, 1, 1, True, 256, 4, 0, True, True
    yield u8, u8, f16, 1, 2, True, 128, 6, 1, True, False
    yield u8, u8, f16, 2, 1, True, 128, 4, 2, True, True
    yield u8, u8, f16, 2, 2, True, 256, 4, 0, False, False   # fp8 x fp8 decoded to fp16 (exact)
    yield u8, u8, f16, 1, 2, False, 256, 4, 0, False, False
    yield f16, u8, f16, 0, 1, True, 256, 4, 0, False, False
    yield b16, u8, b16, 0, 2, False, 256, 4, 0, False, False
    yield f16, u8, f16, 0, 2, False, 128, 6, 0, False, False
    yield u8, b16, b16, 1, 0, True, 256, 4, 0, False, False
    yield u8, f16, f16, 2, 0, False, 128, 6, 0, False, False


def _matmul_ws_cases():
    """(TA, TB, FA, FB, TRANS_B, BN, STAGES, PROMOTE, NATIVE, ACC2[, RAW]) of the warp-specialised kernel."""
    f16, b16, u8 = mx.float16, mx.bfloat16, mx.uint8
    yield f16, f16, 0, 0, True, 256, 4, 0, False, False
    yield f16, f16, 0, 0, False, 256, 4, 0, False, False
    yield b16, b16, 0, 0, True, 256, 4, 0, False, False
    yield b16, b16, 0, 0, False, 128, 6, 0, False, False
    yield u8, u8, 1, 1, True, 128, 6, 2, True, False
    yield u8, u8, 1, 2, True, 192, 5, 2, True, False
    yield u8, u8, 1, 2, True, 192, 5, 4, True, False
    yield u8, u8, 2, 2, True, 256, 4, 0, True, False
    yield u8, u8, 2, 1, True, 192, 4, 1, True, False
    yield u8, u8, 1, 1, True, 192, 5, 1, True, False  # the native default (session 18)
    # Two accumulator sets alternating between promotion intervals.
    yield u8, u8, 1, 1, True, 128, 6, 2, True, True
    yield u8, u8, 2, 1, True, 128, 7, 4, True, True
    # Promotion every instruction / every two (MLX_FLASH_CUDA_FP8_PROMOTE_K 32 / 64).
    yield u8, u8, 1, 1, True, 128, 6, -1, True, False
    yield u8, u8, 1, 2, True, 128, 6, -2, True, False
    yield u8, u8, 1, 1, True, 192, 5, -1, True, False
    # fp8 b codes decoded in the kernel from RAW slots (FP8Linear's prefill; the cvt default is the first).
    yield f16, u8, 0, 1, True, 256, 4, 0, False, False, 2
    yield b16, u8, 0, 2, True, 256, 4, 0, False, False, 2
    yield b16, u8, 0, 1, True, 256, 3, 0, False, False, 4
    yield f16, u8, 0, 2, True, 128, 6, 0, False, False, 1


def _matmul_ws_sk_cases():
    """The native kernel's stream-K form (SK, matmul_wgmma_ws_sk.cu), in
    _matmul_ws_cases' form: BN 128 or 192, one accumulator set, promotion
    every stage (the default), every instruction or two, or none."""
    u8 = mx.uint8
    yield u8, u8, 1, 1, True, 192, 5, 1, True, False  # the native default plan
    yield u8, u8, 2, 2, True, 192, 5, 0, True, False
    yield u8, u8, 2, 1, True, 128, 6, 1, True, False
    yield u8, u8, 1, 1, True, 192, 5, -1, True, False
    yield u8, u8, 1, 2, True, 128, 6, -2, True, False
    yield u8, u8, 1, 2, True, 128, 6, 0, True, False


def _ws_compile_groups(make_kernel):
    """The warp-specialised cases as compile units: (unit name, headers, kernel
    texts). make_kernel(i, case, sk): the stream-K form's cases numbered on
    after the others (_ws_all_cases()[i])."""
    plain = list(_matmul_ws_cases())
    kernels = [make_kernel(i, case, False) for i, case in enumerate(plain)]
    yield "matmul_wgmma_ws_all", cuda_backend.kernel_headers("matmul_wgmma_ws"), kernels
    kernels = [make_kernel(len(plain) + i, case, True) for i, case in enumerate(_matmul_ws_sk_cases())]
    yield "matmul_wgmma_ws_sk", cuda_backend.kernel_headers("matmul_wgmma_ws_sk"), kernels


def _ws_all_cases():
    return list(_matmul_ws_cases()) + list(_matmul_ws_sk_cases())


def _ws_kernel_text(name, case, to, bs, sk):
    """A warp-specialised matmul instance as MLX wraps it: matmul_wgmma_ws.cu,
    or with sk its stream-K form (tickets in, partial sums out; the .cu fixes
    TRANS_B, NATIVE, ACC2 and RAW)."""
    ta, tb, fa, fb, trans, bn, stages, promote, native, acc2, *raw = case
    template = [("TA", ta), ("TB", tb), ("TO", to), ("FA", fa), ("FB", fb)] + ([] if sk else [("TRANS_B", trans)])
    template += [("AS", True), ("BS", bs), ("BN", bn), ("STAGES", stages)] + cuda_matmul.promote_template(promote)
    if not sk:
        template += [("NATIVE", native), ("ACC2", acc2), ("RAW", raw[0] if raw else 0)]
    body = cuda_backend._read("matmul_wgmma_ws_sk.cu" if sk else "matmul_wgmma_ws.cu")
    inputs = matmul_inputs(ta, tb) + [("tmpl", mx.uint8)] + ([("tickets", mx.uint32)] if sk else [])
    outputs = [("out", to), ("tmaps", mx.uint8)] + ([("part", mx.float32)] if sk else [])
    return _kernel_text(name, body, inputs, outputs, template)


def test_matmul_hopper_plans_unpack_by_position():
    """A plan's optional entries keep their defaults by position, and a plan
    of session 10's form with a cluster size (removed in session 11) is an
    error, not read as another entry."""
    from mlx_flash.backends.cuda_matmul import unpack_plan

    assert unpack_plan((128, 6, 2)) == (128, 6, 2, False, False, False)
    assert unpack_plan((256, 4, 0, True)) == (256, 4, 0, True, False, False)
    assert unpack_plan((256, 4, 0, True, True)) == (256, 4, 0, True, True, False)
    assert unpack_plan((128, 7, 4, True, True, True)) == (128, 7, 4, True, True, True)
    for bad in ((128, 6), (128, 7, 4, True, True, 2, True)):
        with pytest.raises(ValueError, match="3 to 6 entries"):
            unpack_plan(bad)
    for bad in ((256, 4, 0, True, True, 2), (256, 4, 0, True, True, 1), (256, 4, 0, 1)):
        with pytest.raises(ValueError, match="cluster-size entry was removed"):
            unpack_plan(bad)


def test_native_stream_k_plan_entry_is_checked():
    """A forced stream-K count (a plan's seventh entry) is for the native fp8
    warp-specialised kernel with one accumulator set and promotion every
    stage, instruction or none: elsewhere an error naming the plan, before
    any kernel is built."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    a8 = mx.to_fp8(mx.ones((4, 64)))
    a16 = mx.ones((4, 64), mx.float16)
    for a, fmt, route, plan in ((a16, None, "wgmma", (256, 4, 0, True, True, False, 2)),
                                (a8, "e4m3", "wgmma_fp8", (192, 5, 2, True, True, False, 2)),   # promotion every 256 K
                                (a8, "e4m3", "wgmma_fp8", (256, 4, 0, True, True, False, 2)),   # BN 256
                                (a8, "e4m3", "wgmma_fp8", (128, 6, 2, True, True, True, 2)),    # two accumulator sets
                                (a8, "e4m3", "wgmma_fp8", (192, 5, 1, False, True, False, 2)),  # cp.async, no TMA
                                (a8, "e4m3", "wgmma_fp8", (192, 5, 1, True, True, False, -1)),
                                (a8, "e4m3", "wgmma_fp8", (192, 5, 1, True, True, False, 1.5)),
                                (a8, "e4m3", "wgmma_fp8", (192, 5, 1, True, True, False, True))):
        spec, a3, b3, sa, sb, _ = validate_matmul(a, a, a_fmt=fmt, b_fmt=fmt, transpose_b=True, out_dtype=mx.float32)
        with pytest.raises(ValueError, match="seventh entry"):
            cuda_matmul.matmul2d(a3, b3, sa, sb, spec, mx.cpu, route=route, plan=plan)


def test_ws_plan_beyond_shared_memory_is_an_error():
    """A plan whose stages and slots of codes exceed a block's shared memory
    says so, before any kernel is built."""
    from mlx_flash.backends import cuda_matmul

    assert cuda_matmul.ws_smem(256, 4, 2) <= cuda_matmul._WS_MAX_DYNAMIC_SMEM  # the default cvt plan fits
    with pytest.raises(ValueError, match="BN 256 x 4 stages and 3 slots of fp8 codes need"):
        cuda_matmul._wgmma_ws(None, None, None, None, None, None, 256, 4, 0, False, True, None, 256, 0, 1, raw=3)


@pytest.mark.parametrize("value", ["5", "two", "-1"])
def test_cvt_raw_setting_outside_its_range_is_an_error(value):
    """MLX_FLASH_CUDA_CVT_RAW (slots of fp8 codes the ws kernel decodes, 0 to
    4) names itself, what it takes and what it got, at import."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MLX_FLASH_CUDA_CVT_RAW=value)
    got = subprocess.run([sys.executable, "-c", "import mlx_flash.backends.cuda_matmul"], capture_output=True,
                         text=True, env=env)
    assert got.returncode != 0
    assert "MLX_FLASH_CUDA_CVT_RAW must be 0 to 4" in got.stderr and repr(value) in got.stderr, got.stderr[-500:]


@pytest.mark.parametrize("name", ["MLX_FLASH_CUDA_FP8W_WA", "MLX_FLASH_CUDA_FP8W_WA_SK"])
def test_weight_as_a_settings_outside_0_1_are_errors(name):
    """The weight-as-A kernel's switches (the route; its stream-K) take 0 or 1
    and otherwise name themselves and the value, at import."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, **{name: "yes"})
    got = subprocess.run([sys.executable, "-c", "import mlx_flash.backends.cuda_matmul"], capture_output=True,
                         text=True, env=env)
    assert got.returncode != 0
    assert f"{name} must be 0 or 1, got 'yes'" in got.stderr, got.stderr[-500:]


def test_no_kernel_has_a_compile_time_cluster_shape():
    """No kernel of ours may carry a compile-time cluster shape (__cluster_dims__,
    .reqnctapercluster). MLX builds an mx.fast.cuda_kernel launch as a plain
    CUDA-graph kernel node and updates cached graph execs across kernels of the
    same graph shape; cudaGraphExecUpdate does not update cluster dimensions
    (ml-explore/mlx PR #2813), so a cluster kernel left plain kernels launched
    after it in clusters of two, dropping an odd grid's last block: session 10's
    NaN tiles of the warp-specialised matmul (docs/matmul.md)."""
    from mlx_flash._sources import source_dir

    offenders = [path.name for path in sorted(source_dir("cuda_src").glob("*.cu*"))
                 if re.search(r"__cluster_dims__|reqnctapercluster|cudaLaunchAttributeClusterDimension",
                              path.read_text())]
    assert not offenders, offenders


def test_native_promotion_by_instruction_is_checked():
    """Promotion every one or two instructions (a negative third plan entry,
    MLX_FLASH_CUDA_FP8_PROMOTE_K 32 / 64) exists only on the warp-specialised
    TMA kernel at BN 128 or 192: any other plan says so before building a kernel."""
    from mlx_flash._matmul_spec import validate_matmul
    from mlx_flash.backends import cuda_matmul

    a = mx.zeros((4, 64), mx.uint8)
    spec, a3, b3, sa3, sb3, _ = validate_matmul(a, a, a_fmt="e4m3", b_fmt="e4m3", transpose_b=True)
    for plan in ((128, 6, -1), (128, 6, -1, True), (256, 4, -1, True, True), (128, 6, -3, True, True),
                 (128, 6, -1, True, True, True)):
        with pytest.raises(ValueError, match="promotion every"):
            cuda_matmul.matmul2d(a3, b3, sa3, sb3, spec, mx.cpu, route="wgmma_fp8", plan=plan)


def test_gemv_plan_launch_bounds_are_checked():
    """A few-rows plan names launch bounds that exist (matmul_gemv_bounds<n>.cuh)
    and fit its block: 1 for up to 16 warps, 2 and 3 for up to 8; both the
    matmul2d route and the direct linear path check before building a kernel."""
    from mlx_flash.backends.cuda_matmul import _check_gemv_bounds, linear_few_rows

    for warps, bounds in ((16, 1), (8, 2), (8, 3), (4, 3), (16, 0), (32, 0)):
        _check_gemv_bounds((warps, 1, 1, 0, 0, bounds), warps, bounds)
    for warps, bounds, match in ((16, 2, "at most 8 warps"), (32, 1, "at most 16 warps"), (8, 4, "0 \\(none\\), 1, 2 or 3"),
                                 (8, -1, "0 \\(none\\), 1, 2 or 3")):
        with pytest.raises(ValueError, match=match):
            _check_gemv_bounds((warps, 1, 1, 0, 0, bounds), warps, bounds)
    x, w = mx.zeros((1, 32), mx.float16), mx.zeros((16, 32), mx.uint8)
    with pytest.raises(ValueError, match="launch bounds 2 are for at most 8 warps"):
        linear_few_rows(x, w, mx.ones((1,)), "e4m3", plan=(16, 1, 1, 0, 0, 2, 1))


def test_gemv_wide_plan_only_for_small_fp8_weights(monkeypatch):
    """MLX_FLASH_CUDA_GEMV_WIDE=1: sixteen warps (launch bounds 1) only where
    the default plan's row groups give no more blocks than SMs, fp8 weights
    only; off (the default), every plan is the default one."""
    from mlx_flash.backends import cuda_matmul as cm

    monkeypatch.setattr(cm, "sm_count", lambda: 132)
    monkeypatch.setattr(cm, "GEMV_PLAN", (8, 1, 4, 0, 0, 2, 1))
    monkeypatch.setattr(cm, "GEMV_PLAN_MT2", (8, 2, 1, 0, 0, 2, 1))
    for wide in ("0", "1"):
        monkeypatch.setattr(cm, "GEMV_WIDE", wide)
        assert cm.gemv_plan(16, True, 16384) == (8, 2, 1, 0, 0, 2, 1)
        assert cm.gemv_plan(1, True, 4096) == (8, 1, 4, 0, 0, 2, 1)  # 256 blocks
        assert cm.gemv_plan(16, False, 4096) == (8, 1, 4, 0, 0, 2, 1)  # 16-bit weight
        assert cm.gemv_plan(16, True) == (8, 2, 1, 0, 0, 2, 1)  # N unknown
        small = (16, 2, 1, 0, 0, 1, 1) if wide == "1" else (8, 2, 1, 0, 0, 2, 1)
        assert cm.gemv_plan(16, True, 4096) == small  # 128 blocks
        assert cm.gemv_plan(9, True, 4224) == small  # 132 blocks
        assert cm.gemv_plan(9, True, 4225) == (8, 2, 1, 0, 0, 2, 1)  # 133
        assert cm.gemv_plan(1, True, 2048) == ((16, 1, 4, 0, 0, 1, 1) if wide == "1" else (8, 1, 4, 0, 0, 2, 1))
    monkeypatch.setattr(cm, "GEMV_PLAN_MT2", (8, 2, 1, -1, 0, 2, 1))  # a capped grid stays as it is
    assert cm.gemv_plan(16, True, 4096) == (8, 2, 1, -1, 0, 2, 1)


def _matmul_gemv_cases():
    """(TA, TB, TO, FB, MT, W, RT, U, STAGES, BOUNDS): each operand kind, both row-tile counts of a, the plans
    the bench times (register loads with and without launch bounds, cp.async rings)."""
    f16, b16, u8 = mx.float16, mx.bfloat16, mx.uint8
    # The launch-bounded plans: the default (8, 1, 4) for every operand kind,
    # (8, 1, 8) for fp8 weights (with 16-bit weights and 16 rows it spills).
    yield f16, u8, f16, 1, 1, 8, 1, 4, 0, 2
    yield b16, u8, b16, 2, 2, 8, 1, 4, 0, 2
    yield f16, f16, mx.float32, 0, 2, 8, 1, 4, 0, 2
    yield b16, b16, b16, 0, 1, 8, 1, 4, 0, 2
    yield f16, u8, f16, 1, 1, 8, 1, 8, 0, 2
    # GEMV_PLAN_MT2, the default for 9-16 rows against fp8 weights.
    yield f16, u8, f16, 1, 2, 8, 2, 1, 0, 2
    yield b16, u8, mx.float32, 2, 2, 8, 2, 1, 0, 2
    yield b16, u8, mx.float32, 2, 2, 8, 1, 8, 0, 2
    # Sixteen warps a block under launch bounds 1 (512 threads: 128 registers).
    yield f16, u8, f16, 1, 2, 16, 2, 1, 0, 1
    yield b16, u8, b16, 2, 1, 16, 2, 1, 0, 1
    yield f16, u8, f16, 1, 1, 16, 1, 4, 0, 1
    yield f16, u8, f16, 1, 1, 8, 1, 4, 0, 0
    yield b16, b16, b16, 0, 2, 8, 1, 4, 0, 0
    for w, rt, u, st in ((8, 2, 2, 0), (4, 2, 4, 0), (8, 1, 1, 4), (4, 2, 1, 6), (8, 2, 1, 4), (4, 4, 1, 4)):
        yield f16, u8, f16, 1, 1, w, rt, u, st, 0
        yield f16, u8, f16, 1, 2, w, rt, u, st, 0
    yield b16, b16, b16, 0, 2, 4, 2, 1, 6, 0


def matmul_inputs(ta, tb):
    """The inputs of matmul.cu, matmul_gemv.cu and the wgmma matmuls (these add tmpl)."""
    return [("a", ta), ("b", tb), ("a_scale", mx.float32), ("b_scale", mx.float32), ("ip", mx.int32)]


def gemv_units(cases):
    """(unit name, launch bounds, headers, kernel texts) of matmul_gemv per
    launch-bounds header: each case of _matmul_gemv_cases in both weight
    layouts (SECTOR: whole-sector loads, cuda_matmul.GEMV_PLAN's 7th entry)."""
    body = cuda_backend._read("matmul_gemv.cu")
    for bounds in sorted({c[-1] for c in cases}):
        kernels = [_kernel_text(f"gemv{i}_s{int(sector)}", body, matmul_inputs(ta, tb), [("out", to)],
                                [("TA", ta), ("TB", tb), ("TO", to), ("FB", fb), ("AS", True), ("BS", True),
                                 ("MT", mt), ("W", w), ("RT", rt), ("U", u), ("STAGES", st), ("BOUNDS", bd),
                                 ("SECTOR", sector)])
                   for i, (ta, tb, to, fb, mt, w, rt, u, st, bd) in enumerate(cases) if bd == bounds
                   for sector in (False, True)]
        headers = cuda_backend.kernel_headers("matmul_gemv") + ((f"matmul_gemv_bounds{bounds}.cuh",) if bounds else ())
        yield f"matmul_gemv_b{bounds}", bounds, headers, kernels


def assert_warp_specialised_build(log, kernels):
    """ptxas' log of warp-specialised kernels (384-thread launch bounds): one entry
    a kernel, no serialisation or setmaxnreg warning, at most 168 registers
    (384 threads at launch; setmaxnreg moves registers to the consumers) and
    no spills."""
    assert "serializ" not in log and "setmaxnreg" not in log, log[-3000:]
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-2000:]
    for name, (regs, spill_st, spill_ld) in usage.items():
        assert regs <= 168 and spill_st == 0 and spill_ld == 0, \
            f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"


@needs_nvcc
def test_matmul_hopper_and_decode_kernels_compile_without_spills(tmp_path):
    """matmul_wgmma (every mode and plan) and matmul_gemv as MLX wraps them;
    no spills (the accumulators of a 128 x 256 tile take 128 registers) and
    no wgmma serialisation warning from ptxas."""
    ins = matmul_inputs
    body = cuda_backend._read("matmul_wgmma.cu")
    kernels = []
    for i, (ta, tb, c, fa, fb, trans, bn, stages, promote, native, tma) in enumerate(_matmul_wgmma_cases()):
        to = mx.float32 if fa and fb and i % 2 else c
        template = [("TA", ta), ("TB", tb), ("C", c), ("TO", to), ("FA", fa), ("FB", fb), ("TRANS_B", trans),
                    ("AS", True), ("BS", i % 2 == 0), ("BN", bn), ("STAGES", stages), ("PROMOTE", promote),
                    ("NATIVE", native), ("TMA", tma)]
        kernels.append(_kernel_text(f"wg{i}", body, ins(ta, tb) + [("tmpl", mx.uint8)],
                                    [("out", to), ("tmaps", mx.uint8)], template))
    log = _nvcc_compile(tmp_path, "matmul_wgmma",
                        _prelude(cuda_backend.kernel_headers("matmul_wgmma")) + "\n" + "\n".join(kernels),
                        ("-Xptxas", "-v"))
    assert "serializ" not in log, log[-3000:]
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-2000:]
    for name, (regs, spill_st, spill_ld) in usage.items():
        assert spill_st == 0 and spill_ld == 0, f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"

    def ws_kernel(i, case, sk):
        to = mx.float32 if i % 2 else (case[0] if not case[8] else mx.float16)
        return _ws_kernel_text(f"ws{i}", case, to, i % 2 == 0, sk)

    for unit, headers, kernels in _ws_compile_groups(ws_kernel):
        log = _nvcc_compile(tmp_path, unit, _prelude(headers) + "\n" + "\n".join(kernels), ("-Xptxas", "-v"))
        assert_warp_specialised_build(log, kernels)

    for unit, bounds, headers, kernels in gemv_units(list(_matmul_gemv_cases())):
        log = _nvcc_compile(tmp_path, unit, _prelude(headers) + "\n" + "\n".join(kernels), ("-Xptxas", "-v"))
        usage = ptxas_usage(log)
        assert len(usage) == len(kernels), log[-2000:]
        for name, (regs, spill_st, spill_ld) in usage.items():
            assert spill_st == 0 and spill_ld == 0, f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"
            threads = 512 if bounds == 1 else 256  # matmul_gemv_bounds<n>.cuh
            assert not bounds or regs <= 65536 // (threads * bounds), f"{name}: {regs} registers beyond the bounds"


@needs_nvcc
def test_attention_kernels_compile_as_mlx_wraps_them(tmp_path):
    # One translation unit per header set: each kernel sees exactly the header
    # text the backend hands MLX for it (kernel_headers), no more.
    units = {}
    for i, (body, T, MT, template, outputs) in enumerate(_attention_cases()):
        template = [("T", T)] + ([("MT", MT)] if MT is not None else []) + template
        units.setdefault(cuda_backend.kernel_headers(body), []).append(
            _kernel_text(f"k{i}_{body}", cuda_backend._read(body + ".cu"), _input_dtypes(body, T, MT),
                         _output_dtypes(outputs, T), template))
    for headers, kernels in units.items():
        _nvcc_compile(tmp_path, headers[-1].removesuffix(".cuh"), _prelude(headers) + "\n" + "\n".join(kernels))


def test_each_kernel_gets_only_its_headers():
    from mlx_flash._sources import source_dir

    bodies = sorted(p.stem for p in source_dir("cuda_src").glob("*.cu"))
    assert set(bodies) == set(cuda_backend._KERNEL_ROOTS), "a new kernel body needs a _KERNEL_ROOTS entry"
    for body in bodies:
        headers = cuda_backend.kernel_headers(body)
        assert headers[0] == "attention_common.cuh" and len(set(headers)) == len(headers)
    assert "attention_bwd_mma.cuh" not in cuda_backend.kernel_headers("attention_fwd_mma2")
    assert cuda_backend.kernel_headers("attention_combine") == ("attention_common.cuh", "attention_simt.cuh")


def test_header_text_keeps_code_and_drops_comments():
    src = ('#define F(x) (x) /* c */ + \\\n  1\n\n// line comment\nint a = 1;  // tail\n'
           'const char* s = "// not a comment /* */";\nchar c = \'"\';\n   /* multi\n line */ int b;\n'
           '#define G 2 \\\n\nint d;\n')
    assert cuda_backend._minify(src) == ('#define F(x) (x) + \\\n1\nint a = 1;\n'
                                         'const char* s = "// not a comment /* */";\nchar c = \'"\';\nint b;\n'
                                         '#define G 2 \\\n\nint d;')
    full = cuda_backend._header(cuda_backend.ATTENTION_HEADERS)
    assert "//" not in full and "/*" not in full and "\n\n" not in full


def ptxas_usage(ptxas_log):
    """{kernel: (registers, spill store bytes, spill load bytes)} from `nvcc -Xptxas -v` output."""
    usage, name = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name] = [None, int(m.group(1)), int(m.group(2))]
        m = re.search(r"Used (\d+) registers", line)
        if m and name in usage:
            usage[name][0] = int(m.group(1))
    return {k: tuple(v) for k, v in usage.items()}


@needs_nvcc
def test_decode_kernels_compile_without_spills(tmp_path):
    """attention_fwd_decode (its own header set, as _forward_simt builds it) and
    attention_combine, over feature sets, dtypes and head dims; the decode
    kernel keeps everything in registers (a spill would cost it bandwidth)."""
    decode_body = cuda_backend._read("attention_fwd_decode.cu")
    kernels = []
    for i, (T, MT, template) in enumerate(_decode_cases()):
        kernels.append(_kernel_text(f"decode{i}", decode_body, _input_dtypes("attention_fwd_decode", T, MT),
                                    _output_dtypes(("out", "lse", "ws"), T),
                                    [("T", T), ("MT", MT)] + template))
    log = _nvcc_compile(tmp_path, "decode", _prelude(cuda_backend.kernel_headers("attention_fwd_decode")) + "\n" + "\n".join(kernels),
                        ("-Xptxas", "-v"))
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-2000:]
    for name, (regs, spill_st, spill_ld) in usage.items():
        assert spill_st == 0 and spill_ld == 0, f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"

    combine_body = cuda_backend._read("attention_combine.cu")
    kernels = [_kernel_text(f"combine{i}", combine_body,
                            [("part_o", mx.float32), ("part_lse", mx.float32), ("sinks", mx.float32),
                             ("ip", mx.int32), ("ns", mx.int32)],
                            [("out", dict(t)["T"]), ("lse", mx.float32)], t)
               for i, t in enumerate(_combine_cases())]
    _nvcc_compile(tmp_path, "combine", _prelude(cuda_backend.kernel_headers("attention_combine")) + "\n" + "\n".join(kernels))


def _wide_head_cases():
    """Every kernel a wide-head call (Dqk up to 576, Dv up to 512) can select, with
    the tiles and column chunks the backend picks: (body, T, MT, template, outputs)."""
    from mlx_flash._spec import validate_attention

    every = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 2), ("WINDOW", True), ("BLOCK_MASK", True),
             ("VARLEN", False), ("KEY_RANGE", True)]
    plain = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 0), ("WINDOW", True), ("BLOCK_MASK", False),
             ("VARLEN", False), ("KEY_RANGE", False)]
    for (d, dv), T in (((576, 512), mx.float16), ((576, 512), mx.bfloat16), ((192, 128), mx.float16),
                       ((320, 256), mx.bfloat16), ((288, 96), mx.float16)):
        dims = [("D", d), ("DV", dv)]
        for feats in (every, plain):
            yield ("attention_fwd_mma", T, mx.float32, feats + [("SINKS", True)] + dims + [
                ("NW", 4), ("BN", 32), ("DVC", cuda_backend._column_chunk(dv))], ("out", "lse"))
            # As _mma_bwd_config picks: 4 warps without softcap where 64-key tiles fit.
            nch = cuda_backend._mma_bwd_chunks(d, dv)
            fits = cuda_backend._mma_bwd_smem(d, dv, 64, 64) <= cuda_backend._MAX_SMEM
            nw = 4 if nch == 1 or (fits and not dict(feats)["SOFTCAP"]) else 2
            yield ("attention_bwd_mma", T, mx.float32, feats + dims + [("NW", nw), ("NCH", nch)],
                   ("dq_acc", "dk", "dv"))
            spec, _ = validate_attention(mx.ones((1, 16, 1, d), T), mx.ones((1, 1, 4096, d), T),
                                         mx.ones((1, 1, 4096, dv), T))
            nw, bn, stages = cuda_backend._decode_config(spec, ())
            for split in (True, False):
                yield ("attention_fwd_decode", T, mx.float32, feats + [("SINKS", True)] + dims + [
                    ("NW", nw), ("BN", bn), ("STAGES", stages), ("SPLIT", split),
                    ("DVC", cuda_backend._column_chunk(dv)), ("BULK", False), ("KR", False)], ("out", "lse", "ws"))
    for d, dv in ((576, 512), (33, 511)):
        for w in (4, 8):
            yield ("attention_fwd_simt", mx.float32, mx.float32, every + [("SINKS", True), ("D", d), ("DV", dv),
                   ("W", w), ("SPLITS", 2)], ("out", "lse", "part_o", "part_lse"))
        nch = 1
        while cuda_backend._simt_bwd_smem(d, dv, 1, nch) > cuda_backend._MAX_SMEM:
            nch += 1
        yield ("attention_bwd_simt", mx.float32, mx.float32, every + [("D", d), ("DV", dv), ("W", 1),
               ("HAS_DLSE", True), ("NCH", nch)], ("dq_acc", "dk", "dv"))
    yield ("attention_fwd_simt", mx.float16, mx.bool_, plain + [("SINKS", False), ("D", 570), ("DV", 500),
           ("W", 8), ("SPLITS", 2)], ("out", "lse", "part_o", "part_lse"))


@needs_nvcc
def test_wide_head_kernels_compile_without_spills(tmp_path):
    """The kernels and tile plans of head dims past 256 compile as MLX wraps them
    and keep their accumulators in registers (no ptxas spill)."""
    units, described = {}, {}
    for i, (body, T, MT, template, outputs) in enumerate(_wide_head_cases()):
        name = f"wide{i}_{body}"
        described[name] = f"{body} {str(T).split('.')[-1]} " + " ".join(f"{k}={v}" for k, v in template[7:])
        units.setdefault(cuda_backend.kernel_headers(body), []).append(
            _kernel_text(name, cuda_backend._read(body + ".cu"), _input_dtypes(body, T, MT),
                         _output_dtypes(outputs, T), [("T", T), ("MT", MT)] + template))
    spills = []
    for headers, kernels in units.items():
        log = _nvcc_compile(tmp_path, "wide_" + headers[-1].removesuffix(".cuh"),
                            _prelude(headers) + "\n" + "\n".join(kernels), ("-Xptxas", "-v"))
        usage = ptxas_usage(log)
        assert len(usage) == len(kernels), log[-2000:]
        for mangled, (regs, spill_st, spill_ld) in usage.items():
            name = re.search(r"wide\d+_\w+?(?=E)", mangled).group(0)
            if spill_st or spill_ld:
                spills.append(f"{described[name]}: {regs} registers, spills {spill_st}/{spill_ld} bytes")
    assert not spills, "\n".join(spills)


def _hopper_bwd_cases():
    """(T, MT, template) of attention_bwd_wgmma instances: fp16/bf16, D 64/128,
    plain, causal, softcap and every feature at once, each in both block
    orders or with the early dV; at D 128 a bool mask alone and ALiBi alone
    (they spilled under both compilers until session 11, while the
    every-feature instance did not)."""
    plain = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 0), ("WINDOW", False), ("BLOCK_MASK", False),
             ("VARLEN", False), ("KEY_RANGE", False)]
    causal = [(n, True if n == "WINDOW" else v) for n, v in plain]
    every = [("SOFTCAP", True), ("ALIBI", True), ("MASK_KIND", 2), ("WINDOW", True), ("BLOCK_MASK", True),
             ("VARLEN", True), ("KEY_RANGE", True)]
    softcap = [(n, True if n == "SOFTCAP" else v) for n, v in plain]
    for T in (mx.float16, mx.bfloat16):
        for D in (64, 128):
            for feats in (plain, causal, softcap, every):
                # The default, the other block order, dV issued early (MLX_FLASH_BWD_DV_EARLY) and
                # float4 dQ atomics (MLX_FLASH_BWD_DQ_V4).
                for heads_first, dv_early, dq_v4 in ((False, False, False), (True, False, False),
                                                     (False, True, False), (False, False, True)):
                    yield T, mx.float32, feats + [("D", D), ("DV", D), ("HEADS_FIRST", heads_first),
                                                  ("DV_EARLY", dv_early), ("DQ_V4", dq_v4)]
        bool_mask = [(n, 1 if n == "MASK_KIND" else v) for n, v in plain]
        alibi = [(n, True if n == "ALIBI" else v) for n, v in plain]
        for MT, feats in ((mx.bool_, bool_mask), (mx.float32, alibi)):
            yield T, MT, feats + [("D", 128), ("DV", 128), ("HEADS_FIRST", False), ("DV_EARLY", False),
                                  ("DQ_V4", False)]


@needs_nvcc
def test_hopper_backward_compiles_without_spills(tmp_path):
    """Every attention_bwd_wgmma instance keeps its dK, dV accumulators and
    fragments in registers: a spill there is local-memory traffic in the
    kernel's inner loop (the softcap instance once spilled 72/104 bytes)."""
    body = cuda_backend._read("attention_bwd_wgmma.cu")
    kernels = [_kernel_text(f"hbwd{i}", body, _input_dtypes("attention_bwd_wgmma", T, MT),
                            _output_dtypes(("dq_acc", "dk", "dv"), T), [("T", T), ("MT", MT)] + template)
               for i, (T, MT, template) in enumerate(_hopper_bwd_cases())]
    log = _nvcc_compile(tmp_path, "hopper_bwd", _prelude(cuda_backend.kernel_headers("attention_bwd_wgmma")) +
                        "\n" + "\n".join(kernels), ("-Xptxas", "-v"))
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-2000:]
    spills = [f"{name}: {regs} registers, spills {st}/{ld} bytes" for name, (regs, st, ld) in usage.items() if st or ld]
    assert not spills, "\n".join(spills)


def _cuobjdump():
    """cuobjdump from PATH or from the nvidia-cuda-cuobjdump wheel, if either is there."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for candidate in sorted(__import__("pathlib").Path(root).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    return None


def _wgmma_sync_counts(sass):
    """{function: (wgmma count (HGMMA; QGMMA for fp8), WARPGROUP.DEPBAR count)} of a cuobjdump -sass listing."""
    counts, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            counts[name] = [0, 0]
        elif name and ("HGMMA" in line or "QGMMA" in line):
            counts[name][0] += 1
        elif name and "WARPGROUP.DEPBAR" in line:
            counts[name][1] += 1
    return {k: tuple(v) for k, v in counts.items()}


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not installed")
def test_hopper_kernels_keep_wgmma_asynchronous(tmp_path):
    """ptxas may serialise every wgmma of a kernel (a wait after each one),
    silently: no C7515 warning. It did so to the fp16 backward when its exact
    non-finite path kept packed fragments live next to the accumulators, which
    cost ~35%. Each Hopper kernel instance (fp16/bf16, D 64/128, plain and
    causal) must keep a handful of waits, far fewer than its wgmma instructions."""
    plain = [("SOFTCAP", False), ("ALIBI", False), ("MASK_KIND", 0), ("WINDOW", False), ("BLOCK_MASK", False),
             ("VARLEN", False), ("KEY_RANGE", False)]
    causal = [(n, True if n == "WINDOW" else v) for n, v in plain]
    for body in ("attention_fwd_wgmma", "attention_bwd_wgmma"):
        kernels = []
        for T in (mx.float16, mx.bfloat16):
            for D in (64, 128):
                for feats in (plain, causal):
                    template = [("T", T), ("MT", mx.bool_)] + feats
                    if body == "attention_fwd_wgmma":
                        template += [("SINKS", False), ("D", D), ("DV", D), ("BN", 128), ("STAGES", 3)]
                        outputs = ("out", "lse")
                    else:
                        template += [("D", D), ("DV", D), ("HEADS_FIRST", bool(len(kernels) % 2)),
                                     ("DV_EARLY", T == mx.bfloat16),  # (bf16: the early dV)
                                     ("DQ_V4", D == 128 and feats is causal)]  # (float4 dQ atomics)
                        outputs = ("dq_acc", "dk", "dv")
                    kernels.append(_kernel_text(f"{body}_{len(kernels)}", cuda_backend._read(body + ".cu"),
                                                _input_dtypes(body, T, mx.bool_), _output_dtypes(outputs, T),
                                                template))
        _nvcc_compile(tmp_path, body, _prelude(cuda_backend.kernel_headers(body)) + "\n" + "\n".join(kernels))
        sass = _sass(tmp_path, body)
        counts = _wgmma_sync_counts(sass)
        assert len(counts) == len(kernels), sass[:2000]
        for name, (hgmma, waits) in counts.items():
            assert hgmma >= 12 and waits <= 4, f"{name}: {hgmma} wgmma, {waits} waits (serialised)"

    # The warp-specialised matmul: 4 (16-bit) or 4 (fp8 k32) wgmma per stage,
    # one wait per stage (two with promotion), none between them.
    def ws_kernel(i, case, sk):
        return _ws_kernel_text(f"ws{i}", case, case[0] if not case[8] else mx.float16, True, sk)

    ws_cases = _ws_all_cases()
    for unit, headers, kernels in _ws_compile_groups(ws_kernel):
        _nvcc_compile(tmp_path, unit, _prelude(headers) + "\n" + "\n".join(kernels))
        sass = _sass(tmp_path, unit)
        counts = _wgmma_sync_counts(sass)
        assert len(counts) == len(kernels), sass[:2000]
        for name, (hgmma, waits) in counts.items():
            # Promotion every one or two instructions (PROMOTE -1 / -2) waits
            # after each interval by design (the other consumer warpgroup keeps
            # the tensor cores busy): one wait an interval, one more at the end.
            promote = ws_cases[int(re.search(r"\d+ws(\d+)E", name).group(1))][7]
            limit = 4 if promote >= 0 else hgmma // -promote + 1
            assert hgmma >= 4 and waits <= limit, f"{name}: {hgmma} wgmma, {waits} waits (serialised)"


def _matmul_wa_cases():
    """(TA, TO, FB, BT, STAGES) of the weight-as-A kernel (matmul_wgmma_wa.cuh); WA_PLANS' plans first."""
    f16, b16, f32 = mx.float16, mx.bfloat16, mx.float32
    yield f16, f16, 1, 128, 8
    yield b16, b16, 2, 256, 5
    yield f16, f32, 2, 256, 5
    yield b16, f32, 1, 128, 2
    yield f16, f16, 2, 256, 5


def test_weight_as_a_default_kernel_is_the_text_the_card_ran():
    """FP8Linear's default prefill kernel on Hopper is the text an H100 ran in
    part s20e (4cff346): the emulation and ptxas passed a variant that the
    card then got wrong (session 20's DEPTH 4), so a change to this kernel
    goes to the card before it becomes the default (its stream-K form,
    matmul_wgmma_wa_sk.cuh, is where new work goes). The hash covers what
    NVRTC gets (the minified header, comments dropped) and the body; change
    it only with a card run of the new text, named in docs/matmul.md."""
    import hashlib

    text = cuda_backend._minify(cuda_backend._read("matmul_wgmma_wa.cuh")) + "\n" + cuda_backend._read(
        "matmul_wgmma_wa.cu")
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "6cade07becf0c537e40ee2c979689e96af92fc21ef802e3840158e427c923ce8")


@needs_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not installed")
@pytest.mark.parametrize("kernel", ["matmul_wgmma_wa", "matmul_wgmma_wa_sk"])
def test_matmul_weight_as_a_kernel_compiles_bounded_and_asynchronous(kernel, tmp_path):
    """The weight-as-A kernel and its stream-K form as MLX wraps them: at
    most 168 registers at launch (384 threads; setmaxnreg moves them to the
    consumers), no spills (128 accumulators and two sets of 8 A-fragment
    registers at BT 256), no serialisation warning, and in the SASS four
    wgmma a stage (two halves of two) with a wait after each half, none
    between a half's two. The stream-K form also at BT 192."""
    body = cuda_backend._read(kernel + ".cu")
    sk = kernel.endswith("_sk")
    inputs = [("tmpl", mx.uint8)] + ([("tickets", mx.uint32)] if sk else [])
    outputs = [("tmaps", mx.uint8)] + ([("part", mx.float32)] if sk else [])
    kernels = []
    cases = list(_matmul_wa_cases())
    if sk:
        # Only the stream-K form has 192-token tiles (session 26).
        f16, b16, f32 = mx.float16, mx.bfloat16, mx.float32
        cases += [(f16, f16, 1, 192, 6), (b16, b16, 2, 192, 6), (b16, f32, 1, 192, 6)]
    for i, (ta, to, fb, bt, stages) in enumerate(cases):
        template = [("TA", ta), ("TO", to), ("FB", fb), ("AS", i % 2 == 0), ("BS", True), ("BT", bt),
                    ("STAGES", stages)]
        kernels.append(_kernel_text(f"wa{i}", body, matmul_inputs(ta, mx.uint8) + inputs, [("out", to)] + outputs,
                                    template))
    log = _nvcc_compile(tmp_path, kernel, _prelude(cuda_backend.kernel_headers(kernel)) + "\n" + "\n".join(kernels),
                        ("-Xptxas", "-v"))
    assert_warp_specialised_build(log, kernels)
    sass = _sass(tmp_path, kernel)
    counts = _wgmma_sync_counts(sass)
    assert len(counts) == len(kernels), sass[:2000]
    for name, (hgmma, waits) in counts.items():
        # One stage's code: 4 wgmma (two halves of 2), a wait after each half
        # and the tile's last: 3 (4 allowed).
        assert hgmma == 4 and waits <= 4, f"{name}: {hgmma} wgmma, {waits} waits (serialised)"


def _ws_instances():
    """Every instance of the warp-specialised forward the backend can build
    (over its knobs: ring depth, dense key tile, ping-pong, O's rescale, turns): (MLX's kernel
    name, T, template)."""
    from mlx_flash._spec import AttentionSpec
    from mlx_flash.backends import cuda_fwd_ws

    knobs = (dict(cuda_fwd_ws.STAGES), cuda_fwd_ws.KEYS_DENSE_D128, dict(cuda_fwd_ws.EXP2_POLY), cuda_fwd_ws.KEYS_DENSE_D64,
             cuda_fwd_ws.WG3_D64, cuda_fwd_ws.CHAINS_D128, cuda_fwd_ws.RESCALE_EARLY, cuda_fwd_ws.TURNS_CONTINUOUS)
    seen = set()
    try:
        for T, cuda_fwd_ws.RESCALE_EARLY, cuda_fwd_ws.TURNS_CONTINUOUS in (
                (T, r, c) for r in (False, True) for c in (False, True) for T in (mx.float16, mx.bfloat16)):
            for D in (64, 128):
                variants = ([(p, w, 1) for p in cuda_fwd_ws.EXP2_POLY_CHOICES for w in ("0", "1")]
                            if D in cuda_fwd_ws.EXP2_POLY else [(0, False, c) for c in (1, 2)])
                for poly, cuda_fwd_ws.WG3_D64, cuda_fwd_ws.CHAINS_D128 in variants:
                    if D in cuda_fwd_ws.EXP2_POLY:
                        cuda_fwd_ws.EXP2_POLY[D] = poly
                    for cuda_fwd_ws.STAGES[D] in cuda_fwd_ws.STAGE_CHOICES[D]:
                        for cuda_fwd_ws.KEYS_DENSE_D128, cuda_fwd_ws.KEYS_DENSE_D64 in (
                                [(k, 128) for k in cuda_fwd_ws.KEYS_D128_CHOICES] + [(176, 192)]):
                            for window in (False, True):
                                spec = AttentionSpec(1, 1, 1, 256, 256, D, D, T, D ** -0.5,
                                                     window_right=0 if window else -1)
                                template = cuda_fwd_ws.template(spec)
                                name = cuda_fwd_ws.mlx_kernel_name(template)
                                if name not in seen:
                                    seen.add(name)
                                    yield name, T, template
            # The wide heads: a tile plan per (Dqk, Dv), dense and windowed,
            # and the dense tiles MLX_FLASH_CUDA_FWD_WS_KEYS_D96 / _D192 choose.
            wide_keys = dict(cuda_fwd_ws.WIDE_KEYS)
            for D, DV in cuda_fwd_ws.WIDE_PAIRS:
                for keys in cuda_fwd_ws._KEY_CHOICES.get(D if D == DV else 0, (wide_keys[(D, DV)],)):
                    cuda_fwd_ws.WIDE_KEYS[(D, DV)] = keys
                    for window in (False, True):
                        spec = AttentionSpec(1, 1, 1, 256, 256, D, DV, T, D ** -0.5, window_right=0 if window else -1)
                        template = cuda_fwd_ws.template(spec)
                        name = cuda_fwd_ws.mlx_kernel_name(template)
                        if name not in seen:
                            seen.add(name)
                            yield name, T, template
                cuda_fwd_ws.WIDE_KEYS.update(wide_keys)
    finally:
        (stages, cuda_fwd_ws.KEYS_DENSE_D128, poly, cuda_fwd_ws.KEYS_DENSE_D64, cuda_fwd_ws.WG3_D64,
         cuda_fwd_ws.CHAINS_D128, cuda_fwd_ws.RESCALE_EARLY, cuda_fwd_ws.TURNS_CONTINUOUS) = knobs
        cuda_fwd_ws.STAGES.update(stages)
        cuda_fwd_ws.EXP2_POLY.update(poly)


def test_ws_forward_declares_each_instance_launch_bound():
    """The body cannot carry __launch_bounds__, so the header declares each
    instance (by the name MLX gives it) with the bound; an instance missing
    there would compile for 255 registers and fail to launch 384 threads."""
    from mlx_flash.backends import cuda_fwd_ws

    header = "".join(cuda_backend._read(h) for h in cuda_backend.kernel_headers("attention_fwd_ws"))
    declared = {"custom_kernel_mlx_flash_attention_fwd_ws" + m
                for m in re.findall(r"^MLX_FLASH_WS3?_DECLARE\((\w+),", header, re.M)}
    names = {name for name, _, _ in _ws_instances()}
    assert names == declared
    assert f"__launch_bounds__({cuda_fwd_ws.THREADS}, 1)" in header
    assert cuda_fwd_ws.mlx_kernel_name([("BF16", True), ("D", 128), ("DV", 128), ("WINDOW", False), ("STAGES", 2),
                                        ("BN", 176)]) == "custom_kernel_mlx_flash_attention_fwd_ws_t_128_128_f_2_176"


def test_ws_forward_serves_only_calls_without_extras(monkeypatch):
    """The warp-specialised forward takes plain, causal and window calls with a
    positive scale; every other feature (and MLX_FLASH_CUDA_FWD_WS=0, and no
    TMA) keeps the wgmma kernel."""
    from mlx_flash._spec import AttentionSpec
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(cuda_fwd_ws, "_tma_available", lambda: True)
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", False)
    base = AttentionSpec(2, 8, 2, 1024, 1024, 128, 128, mx.float16, 128 ** -0.5)
    # D = 64 below MIN_KEYS_D64 keys: the wgmma kernel by default (it timed faster there).
    unchecked = [base._replace(head_dim_qk=64, head_dim_v=64),
                 base._replace(dtype=mx.bfloat16, head_dim_qk=64, head_dim_v=64)]
    long_d64 = [u._replace(seqlen_k=cuda_fwd_ws.MIN_KEYS_D64) for u in unchecked]
    served = [base, base._replace(window_right=0), base._replace(window_left=16, window_right=0),
              base._replace(window_left=-1, window_right=4), base._replace(dtype=mx.bfloat16)] + unchecked + long_d64
    others = [base._replace(softcap=5.0), base._replace(has_alibi=True), base._replace(has_sinks=True),
              base._replace(mask_kind="bool"), base._replace(mask_kind="additive"),
              base._replace(has_block_mask=True), base._replace(varlen=True, max_seqlen_q=512, max_seqlen_k=512),
              base._replace(has_key_range=True), base._replace(scale=-0.1), base._replace(scale=0.0)]
    assert all(cuda_fwd_ws.serves(s) for s in served)
    assert not any(cuda_fwd_ws.serves(s) for s in others)
    # The default mode: the cases timed faster than the wgmma kernel (D = 128; D = 64 with enough keys).
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", True)
    assert all(cuda_fwd_ws.serves(s) for s in served if s not in unchecked)
    assert not any(cuda_fwd_ws.serves(s) for s in unchecked + others)
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", False)
    assert not cuda_fwd_ws.serves(base)
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "_tma_available", lambda: False)
    assert not cuda_fwd_ws.serves(base)


def test_ws_forward_serves_wide_heads(monkeypatch):
    """Wide heads (96, 192, 256, 192 / 128; fp16/bf16): the pairs in WIDE_CHECKED
    by default, every pair under MLX_FLASH_CUDA_FWD_WS_WIDE=all (or the
    unchecked mode MLX_FLASH_CUDA_FWD_WS=all), none under =0; other head dims,
    float32 and extras never; always one block per item."""
    from mlx_flash._spec import AttentionSpec
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(cuda_fwd_ws, "_tma_available", lambda: True)
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", True)
    monkeypatch.setattr(cuda_fwd_ws, "WIDE_CHECKED", ((256, 256),))
    spec = lambda d, dv, **kw: AttentionSpec(1, 4, 2, 1000, 1000, d, dv, mx.float16, d ** -0.5)._replace(**kw)
    pairs = [spec(d, dv) for d, dv in cuda_fwd_ws.WIDE_PAIRS]
    never = [spec(160, 160), spec(256, 128), spec(128, 192), spec(512, 512), spec(256, 256, dtype=mx.float32),
             spec(256, 256, softcap=5.0), spec(192, 128, has_sinks=True), spec(96, 96, mask_kind="bool")]
    for mode, want in (("auto", [p.head_dim_qk == 256 for p in pairs]), ("all", [True] * 4), ("0", [False] * 4)):
        monkeypatch.setattr(cuda_fwd_ws, "WIDE_MODE", mode)
        assert [cuda_fwd_ws.serves(p) for p in pairs] == want, mode
        assert not any(cuda_fwd_ws.serves(s) for s in never), mode
    monkeypatch.setattr(cuda_fwd_ws, "WIDE_MODE", "auto")
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", False)
    assert all(cuda_fwd_ws.serves(p) for p in pairs)
    assert all(cuda_fwd_ws.serves(p._replace(window_right=0, dtype=mx.bfloat16)) for p in pairs)
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", True)
    assert all(not cuda_fwd_ws.persistent(d) for d in (96, 192, 256)) and cuda_fwd_ws.persistent(128)
    # Tiles: 80 keys at D 256 (64 under rules), 96 at D 192, 128 at Dv 128 and D 96; within 227 KiB.
    assert [cuda_fwd_ws.keys_per_tile(p) for p in pairs] == [128, 96, 80, 128]
    assert cuda_fwd_ws.keys_per_tile(spec(256, 256, window_right=0)) == 64
    for p in pairs:
        assert cuda_fwd_ws.smem_bytes(p.head_dim_qk, cuda_fwd_ws.keys_per_tile(p), p.head_dim_v) <= 227 * 1024


def test_ws_forward_variant_settings(monkeypatch):
    """The opt-in variants of the narrow forward: which instance a call gets
    under each (template values, key tile, rows, shared memory), defaults
    untouched; each setting's bad values fail naming the variable."""
    import os
    import sys

    from mlx_flash._spec import AttentionSpec
    from mlx_flash.backends import cuda_fwd_ws as ws

    dense = AttentionSpec(1, 2, 2, 4096, 4096, 64, 64, mx.float16, 0.125)
    causal = dense._replace(window_right=0)
    d128 = AttentionSpec(1, 2, 2, 4096, 4096, 128, 128, mx.bfloat16, 0.125)
    # Defaults: three consumer warpgroups for dense D = 64 calls only; elsewhere
    # no EXP2POLY / WARPGROUPS values, the old names and tiles.
    assert ws.EXP2_POLY == {64: 0} and ws.WG3_D64 == "auto" and ws.KEYS_DENSE_D64 == 128 and ws.KEYS_DENSE_D128 == 176
    assert ws.CHAINS_D128 == 1
    # The default rescale (early at D = 64) and turns (across items), as the
    # settings' defaults give them whatever the caller's environment says.
    monkeypatch.setattr(ws, "RESCALE_EARLY", None)
    monkeypatch.setattr(ws, "TURNS_CONTINUOUS", True)
    assert ws.mlx_kernel_name(ws.template(dense)).endswith("_f_64_64_f_4_96_0_3_1_1_1")
    assert ws.mlx_kernel_name(ws.template(causal)).endswith("_f_64_64_t_4_128_0_2_1_1_1")
    assert ws.mlx_kernel_name(ws.template(d128)).endswith("_t_128_128_f_2_176_0_2_1_0_1")
    monkeypatch.setattr(ws, "RESCALE_EARLY", True)
    assert ws.mlx_kernel_name(ws.template(d128)).endswith("_t_128_128_f_2_176_0_2_1_1_1")
    # =late / =item: the old kernels.
    monkeypatch.setattr(ws, "RESCALE_EARLY", False)
    monkeypatch.setattr(ws, "TURNS_CONTINUOUS", False)
    assert ws.mlx_kernel_name(ws.template(dense)).endswith("_f_64_64_f_4_96_0_3") and ws.warpgroups(dense) == 3
    assert [n for n, _ in ws.template(causal)] == ["BF16", "D", "DV", "WINDOW", "STAGES", "BN"]
    assert ws.mlx_kernel_name(ws.template(causal)).endswith("_f_64_64_t_4_128") and ws.warpgroups(causal) == 2
    assert ws.keys_per_tile(d128) == 176 and ws.chains(d128) == 1 and ws.warpgroups(d128) == 2
    monkeypatch.setattr(ws, "WG3_D64", "0")
    assert ws.mlx_kernel_name(ws.template(dense)).endswith("_f_64_64_f_4_128") and ws.warpgroups(dense) == 2
    monkeypatch.setattr(ws, "CHAINS_D128", 2)
    assert ws.mlx_kernel_name(ws.template(d128)).endswith("_t_128_128_f_2_176_0_2_2")
    assert ws.chains(d128._replace(window_right=0)) == 1 and ws.chains(dense) == 1
    monkeypatch.setitem(ws.EXP2_POLY, 64, 1)
    monkeypatch.setattr(ws, "KEYS_DENSE_D64", 192)
    assert ws.mlx_kernel_name(ws.template(dense)).endswith("_f_64_64_f_4_192_1")
    assert ws.mlx_kernel_name(ws.template(causal)).endswith("_f_64_64_t_4_128_1")
    assert ws.exp2_poly(d128) == 0  # D = 64 only
    monkeypatch.setattr(ws, "WG3_D64", "1")
    assert ws.warpgroups(dense) == 3 and ws.warpgroups(d128) == 2
    assert ws.mlx_kernel_name(ws.template(dense)).endswith("_f_64_64_f_4_96_1_3")
    assert ws.mlx_kernel_name(ws.template(causal)).endswith("_f_64_64_t_4_64_1_3")
    assert ws.smem_bytes(64, 96, 64, rows=192) <= 227 * 1024
    monkeypatch.setitem(ws.STAGES, 64, 2)  # the variants exist at the default ring depth only
    assert ws.warpgroups(dense) == 2 and ws.exp2_poly(dense) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_FLASH_CUDA_FWD_WS")}
    for name, bad in (("MLX_FLASH_CUDA_FWD_WS_EXP2_POLY_D64", "3"), ("MLX_FLASH_CUDA_FWD_WS_WG3_D64", "yes"),
                      ("MLX_FLASH_CUDA_FWD_WS_KEYS_D64", "96"), ("MLX_FLASH_CUDA_FWD_WS_KEYS_D128", "192"),
                      ("MLX_FLASH_CUDA_FWD_WS_CHAINS_D128", "4"), ("MLX_FLASH_CUDA_FWD_WS_RESCALE", "1"),
                      ("MLX_FLASH_CUDA_FWD_WS_TURNS", "0")):
        result = subprocess.run([sys.executable, "-c", "import mlx_flash.backends.cuda_fwd_ws"], capture_output=True,
                                text=True, timeout=120, env={**env, name: bad})
        assert result.returncode != 0 and name in result.stderr and "ValueError" in result.stderr, result.stderr[-500:]


def test_ws_forward_grid(monkeypatch):
    """Persistent: at most one block per SM (each takes items one after the
    other); otherwise, or when the SM count is unknown, one block per item;
    by default persistent at D = 64 and 128 (not the wide heads)."""
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(cuda_fwd_ws, "sm_count", lambda: 132)
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", True)
    assert [cuda_fwd_ws.blocks_for(n) for n in (1, 131, 132, 133, 4096)] == [1, 131, 132, 132, 132]
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", False)
    assert cuda_fwd_ws.blocks_for(4096) == 4096
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", True)
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", None)
    assert (cuda_fwd_ws.blocks_for(4096, 64), cuda_fwd_ws.blocks_for(4096, 128)) == (132, 132)
    assert cuda_fwd_ws.blocks_for(4096, 256) == 4096
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", True)
    monkeypatch.setattr(cuda_fwd_ws, "sm_count", lambda: 0)
    assert cuda_fwd_ws.blocks_for(4096) == 4096


def test_ws_forward_head_sections(monkeypatch):
    """The work order's sections hold as many heads as keep their K and V
    within the L2 budget (GQA heads sharing a KV head count once), at least
    one and at most all; MLX_FLASH_CUDA_FWD_WS_HEAD_GROUP fixes the count (0: all heads)."""
    from mlx_flash.backends import cuda_fwd_ws

    monkeypatch.setattr(cuda_fwd_ws, "HEAD_GROUP", None)
    per_head = 2 * 4096 * 128 * 2  # K and V of one head at Nk = 4096, D = 128
    assert cuda_fwd_ws.heads_per_section(2, 16, 16, 4096, 128) == cuda_fwd_ws.L2_BUDGET // per_head
    assert cuda_fwd_ws.heads_per_section(1, 64, 16, 4096, 128) == 4 * (cuda_fwd_ws.L2_BUDGET // per_head)
    assert cuda_fwd_ws.heads_per_section(1, 16, 16, 1 << 20, 128) == 1
    assert cuda_fwd_ws.heads_per_section(4, 16, 16, 1024, 64) == 64
    monkeypatch.setattr(cuda_fwd_ws, "HEAD_GROUP", 0)
    assert cuda_fwd_ws.heads_per_section(2, 16, 16, 4096, 128) == 32
    monkeypatch.setattr(cuda_fwd_ws, "HEAD_GROUP", 5)
    assert cuda_fwd_ws.heads_per_section(2, 16, 16, 4096, 128) == 5
    assert cuda_fwd_ws.heads_per_section(1, 2, 2, 4096, 128) == 2


@needs_nvcc
def test_ws_forward_compiles_bounded_without_spills(tmp_path):
    """attention_fwd_ws as MLX wraps it (its MLX names): no spills, the launch
    bound in force (at most 168 registers at entry for 384 threads, setmaxnreg
    honoured), and, where cuobjdump exists, its wgmma left asynchronous."""
    from mlx_flash.backends import cuda_fwd_ws

    body = cuda_backend._read("attention_fwd_ws.cu")
    kernels = []
    for name, T, template in _ws_instances():
        inputs = [("q", T), ("k", T), ("v", T), ("ip", mx.int32), ("fp", mx.float32), ("tmpl", mx.uint8),
                  ("tk", mx.uint32)]
        outputs = [("out", T), ("lse", mx.float32), ("tmaps", mx.uint8)]
        assert [n for n, _ in inputs] == list(cuda_fwd_ws.INPUTS) and [n for n, _ in outputs] == list(cuda_fwd_ws.OUTPUTS)
        kernels.append(_kernel_text(name, body, inputs, outputs, template))
    log = _nvcc_compile(tmp_path, "attention_fwd_ws",
                        _prelude(cuda_backend.kernel_headers("attention_fwd_ws")) + "\n" + "\n".join(kernels),
                        flags=("-Xptxas", "-v"))
    assert "setmaxnreg" not in log, log[-3000:]
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-3000:]
    for fn, (regs, spill_st, spill_ld) in usage.items():
        assert (spill_st, spill_ld) == (0, 0), f"{fn}: spills {spill_st}/{spill_ld}"
        assert regs <= 168, f"{fn}: {regs} registers (launch bound not applied?)"
    if _cuobjdump() is not None:
        sass = _sass(tmp_path, "attention_fwd_ws")
        for fn, (hgmma, waits) in _wgmma_sync_counts(sass).items():
            assert hgmma >= 12 and waits <= 6, f"{fn}: {hgmma} wgmma, {waits} waits (serialised)"


# ---------------------------------------------------------------------------
# On a CUDA GPU.

needs_cuda = pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                                reason="no CUDA GPU visible to MLX")


def _fp8_codes(gen, shape, fmt):
    codes = gen.integers(0, 256, shape).astype(np.uint8)
    special = (codes & 0x7F) == 0x7F if fmt == "e4m3" else (codes & 0x7C) == 0x7C  # NaN (and inf for e5m2)
    codes[special] = 0x11
    return mx.array(codes)


@needs_cuda
@pytest.mark.parametrize("a_kind,b_kind", [("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "e4m3"),
                                           ("bfloat16", "e5m2"), ("e4m3", "e4m3"), ("e5m2", "e4m3"),
                                           ("e4m3", "float32")])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_kernel_matches_float64(a_kind, b_kind, transpose_b):
    from mlx_flash.backends import cuda_matmul

    gen = np.random.default_rng([7, len(a_kind), len(b_kind), transpose_b])
    M, N, K = 130, 70, 200

    def operand(kind, shape):
        if kind in ("e4m3", "e5m2"):
            x = _fp8_codes(gen, shape, kind)
            return x, kind, np.array(cuda_matmul._decode_fp8(x, kind, mx.float32, mx.cpu)).astype(np.float64)
        x = mx.array(gen.standard_normal(shape).astype(np.float32)).astype(getattr(mx, kind))
        return x, None, np.array(x.astype(mx.float32)).astype(np.float64)

    a, a_fmt, a64 = operand(a_kind, (M, K))
    b, b_fmt, b64 = operand(b_kind, (N, K) if transpose_b else (K, N))
    a_scale = gen.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    b_scale = gen.uniform(0.5, 2.0, (1, N)).astype(np.float32)
    out = cuda_matmul.matmul(a, b, a_fmt=a_fmt, b_fmt=b_fmt, a_scale=mx.array(a_scale), b_scale=mx.array(b_scale),
                             transpose_b=transpose_b, out_dtype=mx.float32)
    want = (a64 * a_scale) @ ((b64.T if transpose_b else b64) * b_scale)
    err = np.abs(np.array(out) - want).max() / np.abs(want).max()
    assert err < 5e-5, f"relative error {err:.3g}"


@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_decode_split_over_keys(dtype):
    """One query, many keys, GQA 8:1: the split-key path and its lse combine."""
    import mlx_flash
    from reference_np import attention_np

    gen = np.random.default_rng(11)
    B, Hq, Hkv, Nk, D = 2, 8, 1, 3001, 64
    mk = lambda shape: mx.array(gen.standard_normal(shape).astype(np.float32)).astype(getattr(mx, dtype))
    q, k, v = mk((B, Hq, 1, D)), mk((B, Hkv, Nk, D)), mk((B, Hkv, Nk, D))
    sinks = mx.array(gen.standard_normal(Hq).astype(np.float32))
    out, lse = mlx_flash.flash_attention(q, k, v, sinks=sinks, window=(1000, 0), return_lse=True)
    want = attention_np(q, k, v, sinks=sinks, window=(1000, 0))
    tol = 2e-5 if dtype == "float32" else 2e-2
    assert np.abs(np.array(out.astype(mx.float32)) - want["out"]).max() < tol
    assert np.abs(np.array(lse) - want["lse"]).max() < 1e-4


# ---------------------------------------------------------------------------
# Non-finite inputs on the GPU (the contract of issue 13): the cases the
# emulation runs (tests/cuda_emu/nonfinite_cases.py), here on every kernel
# the lent card selects, the Hopper ones included (D = 64, 128). Run once
# per kernel family: MLX_FLASH_CUDA_WGMMA=0 / MLX_FLASH_CUDA_WGMMA_BWD=0
# select the mma.sync forward and backward instead.

# (dtype, head dim): fp16/bf16 with D 64/128 = wgmma (or mma2) forward and
# backward; D 256 = the one-tile mma forward and the SIMT backward; float32 = SIMT.
_GPU_NONFINITE_KINDS = [(mx.float16, 64), (mx.float16, 128), (mx.bfloat16, 128), (mx.float16, 256),
                        (mx.float32, 64), (mx.float16, 512), (mx.float32, 512)]


@needs_cuda
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("kind", _GPU_NONFINITE_KINDS, ids=lambda k: f"{str(k[0]).split('.')[-1]}-D{k[1]}")
@pytest.mark.parametrize("case", nonfinite_cases.PREFILL_CASES)
def test_nonfinite_forward_backward_on_gpu(case, kind, size):
    from mlx_flash._spec import validate_attention
    from reference_np import attention_np

    dtype, D = kind
    q, k, v, do, options = nonfinite_cases.prefill_case(case, dtype, D=D, size=size)
    spec, inputs = validate_attention(q, k, v, **options)
    out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.gpu)
    dq, dk, dv = cuda_backend.attention_backward(q, k, v, out, lse, do, None, spec, inputs, mx.gpu)
    mx.eval(out, lse, dq, dk, dv)
    want = attention_np(q, k, v, dout=do, **options)
    nonfinite_cases.check_contract("out", np.array(out.astype(mx.float32)), want, dtype)
    nonfinite_cases.check_contract("lse", np.array(lse), want, mx.float32)
    for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
        nonfinite_cases.check_contract(name, np.array(got.astype(mx.float32)), want, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["decode_f16", "simt_f32"])
@pytest.mark.parametrize("case", nonfinite_cases.DECODE_CASES)
def test_nonfinite_decode_on_gpu(case, dtype):
    from mlx_flash._spec import validate_attention
    from reference_np import attention_np

    q, k, v, options = nonfinite_cases.decode_case(case, dtype)
    spec, inputs = validate_attention(q, k, v, **options)
    out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.gpu)
    want = attention_np(q, k, v, **options)
    nonfinite_cases.check_contract("out", np.array(out.astype(mx.float32)), want, dtype)
    nonfinite_cases.check_contract("lse", np.array(lse), want, mx.float32)


# ---------------------------------------------------------------------------
# Native key ranges on the GPU: the cases the emulation runs
# (tests/cuda_emu/key_range_cases.py) on every kernel the card selects, the
# Hopper ones included, at sizes where whole 128-key tiles and blocks fall
# outside the ranges: fp16/bf16 D 64/128 = wgmma forward (both schedules: the
# block-mask features take the in-step one) and backward; D 24/40 = mma2 +
# mma backward; D 256 = the one-tile mma forward + SIMT backward; float32 = SIMT.

_GPU_KEY_RANGE_KINDS = [(mx.float16, 64, 64), (mx.bfloat16, 128, 128), (mx.float16, 24, 40), (mx.float16, 256, 256),
                        (mx.float32, 64, 64)]
_GPU_KEY_RANGE_FEATURES = ["none", "causal", "window_both", "combined_causal_softcap_alibi_sinks",
                           "combined_blocks_causal_additive", "combined_everything"]


@needs_cuda
@pytest.mark.parametrize("feature", _GPU_KEY_RANGE_FEATURES)
@pytest.mark.parametrize("kind", _GPU_KEY_RANGE_KINDS, ids=lambda k: f"{str(k[0]).split('.')[-1]}-D{k[1]}-{k[2]}")
def test_key_ranges_forward_backward_on_gpu(kind, feature, cpu_default_device):
    from cuda_emu.key_range_cases import backend_runner, check_case

    dtype, D, Dv = kind
    check_case(backend_runner(mx.gpu, emulate=False), (4, 4, 2, 150, 600, D, Dv), dtype, feature, grads=True)


@needs_cuda
@pytest.mark.parametrize("feature", ["causal", "combined_causal_softcap_alibi_sinks", "combined_mask_window_sinks"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["decode_f16", "simt_f32"])
def test_key_ranges_decode_on_gpu(dtype, feature, cpu_default_device):
    """Split decode: the splits cover only each row's range."""
    from cuda_emu.key_range_cases import backend_runner, check_case

    check_case(backend_runner(mx.gpu, emulate=False), (5, 8, 2, 1, 3001, 128, 128), dtype, feature, grads=False)


@needs_cuda
@pytest.mark.parametrize("shape", [(4, 4, 2, 150, 600, 64), (4, 4, 2, 150, 600, 128), (5, 8, 2, 1, 3001, 128)],
                         ids=["wgmma_D64", "wgmma_D128", "decode"])
def test_key_ranges_poisoned_on_gpu(shape, cpu_default_device):
    from cuda_emu.key_range_cases import backend_runner, check_poisoned_case

    check_poisoned_case(backend_runner(mx.gpu, emulate=False), shape, mx.float16, grads=shape[3] > 1)


# Wide heads with every feature on the GPU (the behaviour suite's wide-head file
# covers none / causal / window): the tensor-core prefill forward and backward
# in column chunks, and MLA's decode (packed rows, V chunks, key splits).
_WIDE_GPU_SHAPES = {"prefill": (2, 2, 1, 113, 70, 576, 512), "decode": (1, 64, 1, 2, 1500, 576, 512)}


@needs_cuda
@pytest.mark.parametrize("kind", list(_WIDE_GPU_SHAPES))
@pytest.mark.parametrize("feature", list(features.FEATURES))
def test_wide_heads_features_on_gpu(feature, kind):
    import backends
    from helpers import check_close, plain_errors, randn, rng, to_np
    from reference_np import attention_np

    B, Hq, Hkv, Nq, Nk, D, Dv = _WIDE_GPU_SHAPES[kind]
    dtype = mx.bfloat16 if "combined" in feature else mx.float16
    gen = rng("cuda-wide-feature", feature, kind)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, Dv), dtype))
    dout = randn(gen, (B, Hq, Nq, Dv), dtype)
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    out, lse = backends.forward("cuda", q, k, v, **options)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = plain_errors(q, k, v, dout, options, dtype)
    check_close("out", to_np(out), want, dtype, plain)
    check_close("lse", to_np(lse), want, mx.float32)
    if kind == "prefill":
        grads = backends.gradients("cuda", q, k, v, dout, **options)
        for name in ("q", "k", "v"):
            check_close("d" + name, to_np(grads[name]), want, dtype, plain)


# ---------------------------------------------------------------------------
# The warp-specialised Hopper forward (attention_fwd_ws) on the GPU: the calls
# it serves reach it (counted), and its out and lse match float64 at odd
# sizes, Nq != Nk, GQA, causal and windows; both of its schedules.

# The last two: more work items (row blocks x heads) than an H100/H200 has SMs,
# so persistent blocks take several items each (128-row and 192-row blocks).
_WS_GPU_SHAPES = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 8, 1, 64, 1),
                  (1, 1, 1, 300, 4103), (2, 8, 2, 1100, 300), (2, 8, 2, 1700, 300)]


def _on_hopper():
    return hasattr(mx, "cuda") and mx.cuda.is_available() and cuda_backend._is_hopper()


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90) visible to MLX")
@pytest.mark.parametrize("grid", ["persistent", "one_block_per_item"])
@pytest.mark.parametrize("feature", ["none", "causal", "window_both"])
@pytest.mark.parametrize("kind", [(mx.float16, 128), (mx.bfloat16, 128), (mx.float16, 64), (mx.bfloat16, 64)],
                         ids=lambda k: f"{str(k[0]).split('.')[-1]}-D{k[1]}")
def test_ws_forward_on_gpu(kind, feature, grid, monkeypatch):
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from mlx_flash.backends import cuda_fwd_ws
    from reference_np import attention_np

    dtype, D = kind
    monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", grid == "persistent")
    # The persistent grid walks the work order in sections of 3 heads (the
    # last one shorter where the heads do not divide); the other, L2-sized ones.
    monkeypatch.setattr(cuda_fwd_ws, "HEAD_GROUP", 3 if grid == "persistent" else None)
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)  # whatever MLX_FLASH_CUDA_FWD_WS says
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", False)  # bf16 and D = 64 too
    calls = []
    forward = cuda_fwd_ws.forward
    monkeypatch.setattr(cuda_fwd_ws, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    for shape in _WS_GPU_SHAPES:
        B, Hq, Hkv, Nq, Nk = shape
        gen = rng("ws-gpu", str(dtype), D, feature, shape)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        before = len(calls)
        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
        mx.eval(out, lse)
        assert len(calls) == before + 1, f"{shape}: not routed to attention_fwd_ws"
        want = attention_np(q, k, v, **options)
        plain = plain_errors(q, k, v, randn(gen, out.shape, dtype), options, dtype)
        check_close("out", to_np(out), want, dtype, plain)
        check_close("lse", to_np(lse), want, dtype, plain)


# Wide heads on the warp-specialised forward: (Dqk, Dv) of cuda_fwd_ws.WIDE_PAIRS,
# fp16/bf16, one block per item (their only grid), out and lse poisoned with NaN
# first, so a row or column the kernel leaves unwritten fails. Shapes: odd sizes,
# Nq != Nk both ways, GQA, a row block past the keys, several tiles with a tail.
_WS_WIDE_SHAPES = [(1, 2, 2, 17, 17), (2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 1, 1, 300, 4103),
                   (2, 3, 1, 257, 700)]
_WS_WIDE_KINDS = [(dt, d, dv) for d, dv in ((256, 256), (192, 192), (192, 128), (96, 96))
                  for dt in (mx.float16, mx.bfloat16)]


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90) visible to MLX")
@pytest.mark.parametrize("feature", ["none", "causal", "window_both", "window_left", "window_right_only"])
@pytest.mark.parametrize("kind", _WS_WIDE_KINDS, ids=lambda k: f"{str(k[0]).split('.')[-1]}-D{k[1]}-{k[2]}")
def test_ws_wide_forward_on_gpu(kind, feature, monkeypatch):
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from mlx_flash.backends import cuda_fwd_ws
    from reference_np import attention_np

    dtype, D, Dv = kind
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "WIDE_MODE", "all")  # whatever WIDE_CHECKED holds
    monkeypatch.setattr(cuda_fwd_ws, "POISON_OUTPUTS", True)
    calls = []
    forward = cuda_fwd_ws.forward
    monkeypatch.setattr(cuda_fwd_ws, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    for shape in _WS_WIDE_SHAPES:
        B, Hq, Hkv, Nq, Nk = shape
        gen = rng("ws-wide-gpu", str(dtype), D, Dv, feature, shape)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        before = len(calls)
        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
        mx.eval(out, lse)
        assert len(calls) == before + 1, f"{shape}: not routed to attention_fwd_ws"
        want = attention_np(q, k, v, **options)
        plain = plain_errors(q, k, v, randn(gen, out.shape, dtype), options, dtype)
        check_close("out", to_np(out), want, dtype, plain)
        check_close("lse", to_np(lse), want, dtype, plain)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90) visible to MLX")
@pytest.mark.parametrize("pair", [(256, 256), (192, 192), (192, 128), (96, 96)], ids=lambda p: f"D{p[0]}-{p[1]}")
@pytest.mark.parametrize("case", nonfinite_cases.PREFILL_CASES)
def test_ws_wide_nonfinite_on_gpu(case, pair, monkeypatch):
    """The non-finite contract (issue 13) on the wide instances, forward only
    (the backward of these heads is another kernel's)."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda_fwd_ws
    from reference_np import attention_np

    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "WIDE_MODE", "all")
    D, Dv = pair
    q, k, v, do, options = nonfinite_cases.prefill_case(case, mx.float16, D=D, size="small")
    if Dv != D:
        v = v[..., :Dv]
    spec, inputs = validate_attention(q, k, v, **options)
    if not cuda_fwd_ws.serves(spec):
        pytest.skip("a case with extras: not the warp-specialised kernel's")
    out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.gpu)
    mx.eval(out, lse)
    want = attention_np(q, k, v, **options)
    nonfinite_cases.check_contract("out", np.array(out.astype(mx.float32)), want, mx.float16)
    nonfinite_cases.check_contract("lse", np.array(lse), want, mx.float32)


# The opt-in variants of the narrow warp-specialised forward (not routed by
# default): the polynomial exp2 at D = 64 (cuda_fwd_ws.EXP2_POLY) and the
# other dense key tiles (KEYS_DENSE_D64 / _D128), each against float64 with
# outputs poisoned, at the odd shapes above (GQA, Nq != Nk both ways, items
# past the SM count), dense, causal and windowed (the key tiles only change
# dense calls); and the non-finite contract on the polynomial, whose NaN and
# -inf handling is its own.
_WS_VARIANTS = {"poly1": {"poly": 1}, "poly2": {"poly": 2}, "k192": {"keys64": 192},
                "k192p1": {"keys64": 192, "poly": 1}, "k160": {"keys128": 160}, "k144": {"keys128": 144},
                "wg3": {"wg3": True}, "wg3p1": {"wg3": True, "poly": 1}, "ch2": {"chains": 2},
                # O's rescale inside the next turn (RESCALE_EARLY) on the default routes: bit-identical to them.
                "early64": {"early": True, "wg3": "auto"}, "early128": {"early": True, "d": 128},
                # Turns run on across a persistent block's items (TURNS_CONTINUOUS): bit-identical too.
                "turns64": {"turns": True, "wg3": "auto"}, "turns128": {"turns": True, "d": 128, "persistent": True},
                # D 64's default since session 12: both (session 10's round A, 1.02-1.08x on every row).
                "both64": {"turns": True, "early": True, "wg3": "auto"}}


def _set_ws_variant(monkeypatch, cuda_fwd_ws, knobs):
    monkeypatch.setattr(cuda_fwd_ws, "_ENABLED", True)
    monkeypatch.setattr(cuda_fwd_ws, "CHECKED_ONLY", False)
    monkeypatch.setitem(cuda_fwd_ws.EXP2_POLY, 64, knobs.get("poly", 0))
    monkeypatch.setattr(cuda_fwd_ws, "KEYS_DENSE_D64", knobs.get("keys64", 128))
    monkeypatch.setattr(cuda_fwd_ws, "KEYS_DENSE_D128", knobs.get("keys128", 176))
    wg3 = knobs.get("wg3")
    monkeypatch.setattr(cuda_fwd_ws, "WG3_D64", wg3 if wg3 == "auto" else "1" if wg3 else "0")
    monkeypatch.setattr(cuda_fwd_ws, "CHAINS_D128", knobs.get("chains", 1))
    monkeypatch.setattr(cuda_fwd_ws, "RESCALE_EARLY", knobs.get("early", False))
    monkeypatch.setattr(cuda_fwd_ws, "TURNS_CONTINUOUS", knobs.get("turns", False))
    if "persistent" in knobs:
        monkeypatch.setattr(cuda_fwd_ws, "PERSISTENT", knobs["persistent"])


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90) visible to MLX")
@pytest.mark.parametrize("feature", ["none", "causal", "window_both"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("variant", list(_WS_VARIANTS))
def test_ws_variant_forward_on_gpu(variant, dtype, feature, monkeypatch):
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from mlx_flash.backends import cuda_fwd_ws
    from reference_np import attention_np

    knobs = _WS_VARIANTS[variant]
    D = 128 if "keys128" in knobs or "chains" in knobs or knobs.get("d") == 128 else 64
    if feature != "none" and not {"poly", "wg3", "early", "turns"} & set(knobs):
        pytest.skip("the key tile variants change dense calls only")
    _set_ws_variant(monkeypatch, cuda_fwd_ws, knobs)
    monkeypatch.setattr(cuda_fwd_ws, "POISON_OUTPUTS", True)
    names = []
    forward = cuda_fwd_ws.forward
    monkeypatch.setattr(cuda_fwd_ws, "forward", lambda q, k, v, spec, *a, **kw: names.append(
        dict(cuda_fwd_ws.template(spec))) or forward(q, k, v, spec, *a, **kw))
    for shape in _WS_GPU_SHAPES:
        B, Hq, Hkv, Nq, Nk = shape
        gen = rng("ws-variant-gpu", variant, str(dtype), feature, shape)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        before = len(names)
        out, lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
        mx.eval(out, lse)
        assert len(names) == before + 1, f"{shape}: not routed to attention_fwd_ws"
        # The variant's own instance ran (its template values).
        got = names[-1]
        assert got.get("EXP2POLY", 0) == knobs.get("poly", 0), got
        wg3 = knobs.get("wg3")
        assert got.get("WARPGROUPS", 2) == (3 if wg3 is True or (wg3 == "auto" and feature == "none") else 2), got
        assert got.get("CHAINS", 1) == (knobs.get("chains", 1) if feature == "none" else 1), got
        assert got.get("RESCALE", 0) == (1 if knobs.get("early") else 0), got
        assert got.get("TURNS", 0) == (1 if knobs.get("turns") else 0), got
        if feature == "none" and "wg3" not in knobs:
            assert got["BN"] == knobs.get("keys64", knobs.get("keys128", 176 if D == 128 else 128)), got
        if knobs.get("early") or knobs.get("turns"):  # the same arithmetic as the default kernel: the same bits
            monkeypatch.setattr(cuda_fwd_ws, "RESCALE_EARLY", False)
            monkeypatch.setattr(cuda_fwd_ws, "TURNS_CONTINUOUS", False)
            base_out, base_lse = mlx_flash.flash_attention(q, k, v, return_lse=True, **options)
            mx.eval(base_out, base_lse)
            monkeypatch.setattr(cuda_fwd_ws, "RESCALE_EARLY", knobs.get("early", False))
            monkeypatch.setattr(cuda_fwd_ws, "TURNS_CONTINUOUS", knobs.get("turns", False))
            assert names[-1].get("RESCALE", 0) == 0 and names[-1].get("TURNS", 0) == 0
            assert np.array_equal(to_np(out), to_np(base_out), equal_nan=True), f"{shape}: out differs from the default"
            assert np.array_equal(to_np(lse), to_np(base_lse), equal_nan=True), f"{shape}: lse differs from the default"
        want = attention_np(q, k, v, **options)
        plain = plain_errors(q, k, v, randn(gen, out.shape, dtype), options, dtype)
        check_close("out", to_np(out), want, dtype, plain)
        check_close("lse", to_np(lse), want, dtype, plain)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90) visible to MLX")
@pytest.mark.parametrize("variant", ["poly1", "poly2", "wg3", "wg3p1", "early64", "early128", "turns64", "turns128",
                                     "both64"])
@pytest.mark.parametrize("case", nonfinite_cases.PREFILL_CASES)
def test_ws_variant_nonfinite_on_gpu(case, variant, monkeypatch):
    """The non-finite contract (issue 13) through the polynomial exp2 (NaN
    kept, -inf giving 0) and the early rescale, forward only."""
    from mlx_flash._spec import validate_attention
    from mlx_flash.backends import cuda_fwd_ws
    from reference_np import attention_np

    _set_ws_variant(monkeypatch, cuda_fwd_ws, _WS_VARIANTS[variant])
    D = _WS_VARIANTS[variant].get("d", 64)
    q, k, v, do, options = nonfinite_cases.prefill_case(case, mx.float16, D=D, size="large")
    spec, inputs = validate_attention(q, k, v, **options)
    if not cuda_fwd_ws.serves(spec):
        pytest.skip("a case with extras: not the warp-specialised kernel's")
    assert cuda_fwd_ws.exp2_poly(spec) == _WS_VARIANTS[variant].get("poly", 0)
    nwg = cuda_fwd_ws.warpgroups(spec)
    keys = cuda_fwd_ws.keys_per_tile(spec, nwg)
    assert cuda_fwd_ws.rescale_early(spec, nwg, keys) == ("early" in _WS_VARIANTS[variant])
    assert cuda_fwd_ws.turns_continuous(spec, nwg, keys) == ("turns" in _WS_VARIANTS[variant])
    out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.gpu)
    mx.eval(out, lse)
    want = attention_np(q, k, v, **options)
    nonfinite_cases.check_contract("out", np.array(out.astype(mx.float32)), want, mx.float16)
    nonfinite_cases.check_contract("lse", np.array(lse), want, mx.float32)


def test_hopper_backward_settings(monkeypatch):
    """MLX_FLASH_BWD_HEADS_FIRST takes -1 (by the call), 0 or 1,
    MLX_FLASH_BWD_DV_EARLY and MLX_FLASH_BWD_DQ_V4 0 or 1 (any other value is
    an error naming the variable)."""
    for name, allowed in (("MLX_FLASH_BWD_HEADS_FIRST", (-1, 0, 1)), ("MLX_FLASH_BWD_DV_EARLY", (0, 1)),
                          ("MLX_FLASH_BWD_DQ_V4", (0, 1))):
        for value in allowed:
            monkeypatch.setenv(name, str(value))
            assert cuda_backend._env_choice(name, 0, allowed) == value
        for bad in ("2", "yes", ""):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ValueError, match=f"{name}: expected one of {', '.join(map(str, allowed))}"):
                cuda_backend._env_choice(name, 0, allowed)
    # Block order: heads first under causal or a window from 4096 keys, unless the setting says otherwise.
    from mlx_flash._spec import AttentionSpec

    dense = AttentionSpec(1, 2, 2, 4096, 4096, 128, 128, mx.float16, 0.1)
    causal = AttentionSpec(1, 2, 2, 4096, 4096, 128, 128, mx.float16, 0.1, window_right=0)
    short = AttentionSpec(1, 2, 2, 1024, 1024, 64, 64, mx.float16, 0.1, window_right=0)
    for setting, want in ((-1, (False, True, False)), (0, (False, False, False)), (1, (True, True, True))):
        monkeypatch.setattr(cuda_backend, "_BWD_HEADS_FIRST", setting)
        assert tuple(map(cuda_backend._bwd_heads_first, (dense, causal, short))) == want


def test_delta_threads_per_row_match_the_kernel():
    """attention_bwd_delta's threads a row (DeltaShape::kTpr), which the launch's
    rows per block are computed from: 16-byte chunks 8 / 16 / 32 threads wide,
    32 element by element where Dv is not a multiple of 8."""
    text = cuda_backend._read("attention_bwd_delta.cuh")
    assert "kChunks > 16 ? 32 : kChunks > 8 ? 16 : 8" in text and "!kVec ? 32" in text
    want = {8: 8, 40: 8, 64: 8, 72: 16, 128: 16, 136: 32, 256: 32, 512: 32, 7: 32, 33: 32, 500: 32}
    assert {dv: cuda_backend._delta_threads_per_row(dv) for dv in want} == want


@needs_cuda
@pytest.mark.parametrize("feature", ["none", "causal", "window_both", "combined_everything", "block_sparse"])
@pytest.mark.parametrize("kind", ["float16-D128", "bfloat16-D64"])
@pytest.mark.parametrize("heads_first", [-1, 0, 1])
def test_hopper_backward_dq_routes_on_gpu(heads_first, kind, feature, monkeypatch):
    """dq, dk, dv against float64 in both block orders (MLX_FLASH_BWD_HEADS_FIRST;
    -1: by the call), GQA with Nq != Nk both ways and partial tiles."""
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from reference_np import attention_np

    monkeypatch.setattr(cuda_backend, "_BWD_HEADS_FIRST", heads_first)
    dtype, D = getattr(mx, kind.split("-")[0]), int(kind.split("D")[1])
    for B, Hq, Hkv, Nq, Nk in ((2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 2, 2, 129, 300)):
        gen = rng("hopper-bwd-dq", 0, heads_first, kind, feature, Nq)  # (0: the inputs of the atomics' cases before)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        dout = randn(gen, (B, Hq, Nq, D), dtype)
        _, grads = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)], [q, k, v], [dout])
        want = attention_np(q, k, v, dout=dout, **options)
        plain = plain_errors(q, k, v, dout, options, dtype)
        for name, g in zip(("dq", "dk", "dv"), grads):
            check_close(name, to_np(g), want, dtype, plain)


@needs_cuda
@pytest.mark.parametrize("setting", ["_BWD_DV_EARLY", "_BWD_DQ_V4"])
@pytest.mark.parametrize("feature", ["none", "causal", "window_both", "combined_everything", "block_sparse",
                                     "bool_mask", "alibi"])
@pytest.mark.parametrize("kind", ["float16-D128", "bfloat16-D64", "bfloat16-D128"])
def test_hopper_backward_dv_early_on_gpu(kind, feature, setting, monkeypatch):
    """MLX_FLASH_BWD_DV_EARLY=1 (setting _BWD_DV_EARLY) and MLX_FLASH_BWD_DQ_V4=1
    (float4 dQ atomics, _BWD_DQ_V4): dq, dk, dv against float64 (GQA, Nq != Nk
    both ways, partial tiles), and dk, dv bit for bit the default's (the same
    operations in the same order; dq's atomics land in any order)."""
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from reference_np import attention_np

    if not cuda_backend._is_hopper():
        pytest.skip("attention_bwd_wgmma is Hopper's")
    dtype, D = getattr(mx, kind.split("-")[0]), int(kind.split("D")[1])
    for B, Hq, Hkv, Nq, Nk in ((2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 2, 2, 129, 300)):
        gen = rng("hopper-bwd-dv-early", kind, feature, Nq, setting)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        dout = randn(gen, (B, Hq, Nq, D), dtype)
        grads = {}
        for early in (1, 0):
            monkeypatch.setattr(cuda_backend, setting, early)
            _, g = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)], [q, k, v], [dout])
            grads[early] = [to_np(x) for x in g]
        want = attention_np(q, k, v, dout=dout, **options)
        plain = plain_errors(q, k, v, dout, options, dtype)
        for name, g in zip(("dq", "dk", "dv"), grads[1]):
            check_close(name, g, want, dtype, plain)
        for name, a, b in zip(("dk", "dv"), grads[1][1:], grads[0][1:]):
            assert np.array_equal(a, b, equal_nan=True), (name, B, Hq, Hkv, Nq, Nk)


# Head dims past 64 on attention_bwd_mma in one chunk (its k-loops unroll by 2
# there: NVRTC spilled at D 96 fully unrolled), every feature at D 96.
_MID_GPU = [(96, f) for f in features.FEATURES] + [(d, f) for d in (80, 112) for f in ("none", "causal", "softcap")]


@needs_cuda
@pytest.mark.parametrize("D,feature", _MID_GPU, ids=lambda x: str(x))
def test_mid_head_backward_on_gpu(D, feature):
    import backends
    from helpers import check_close, plain_errors, randn, rng, to_np
    from reference_np import attention_np
    from mlx_flash._spec import validate_attention

    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 113, 70
    dtype = mx.bfloat16 if "combined" in feature else mx.float16
    gen = rng("cuda-mid-bwd", D, feature)
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    dout = randn(gen, (B, Hq, Nq, D), dtype)
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    spec, _ = validate_attention(q, k, v, **options)
    assert cuda_backend._uses_mma(spec) and not cuda_backend._uses_wgmma(spec, backward=True)
    want = attention_np(q, k, v, dout=dout, **options)
    plain = plain_errors(q, k, v, dout, options, dtype)
    grads = backends.gradients("cuda", q, k, v, dout, **options)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(grads[name]), want, dtype, plain)


# attention_bwd_wgmma at D 128 with one logit rule alone: the instances whose
# NVRTC spills session 11 mended (32-bit Q / dO offsets, K checked before the
# tile loop, the ALiBi slope read per tile, kv_row read back from shared memory).
@needs_cuda
@pytest.mark.parametrize("feature", ["bool_mask", "alibi", "additive_mask", "none"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hopper_backward_d128_rules_on_gpu(feature, dtype):
    import backends
    from helpers import check_close, plain_errors, randn, rng, to_np
    from reference_np import attention_np
    from mlx_flash._spec import validate_attention

    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 113, 300, 128
    dtype = getattr(mx, dtype)
    gen = rng("cuda-hopper-bwd-rules", feature, str(dtype))
    q, k, v = (randn(gen, (B, Hq, Nq, D), dtype), randn(gen, (B, Hkv, Nk, D), dtype),
               randn(gen, (B, Hkv, Nk, D), dtype))
    dout = randn(gen, (B, Hq, Nq, D), dtype)
    options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
    spec, _ = validate_attention(q, k, v, **options)
    if not cuda_backend._uses_wgmma(spec, backward=True):
        pytest.skip("attention_bwd_wgmma needs a Hopper GPU")
    want = attention_np(q, k, v, dout=dout, **options)
    plain = plain_errors(q, k, v, dout, options, dtype)
    grads = backends.gradients("cuda", q, k, v, dout, **options)
    for name in ("q", "k", "v"):
        check_close("d" + name, to_np(grads[name]), want, dtype, plain)


def _hopper_bwd_ws_kernels():
    """attention_bwd_ws instances the backend builds (fp16/bf16, D 64/128,
    dense and windowed), under the names whose launch bounds the header declares."""
    body = cuda_backend._read("attention_bwd_ws.cu")
    for T in (mx.float16, mx.bfloat16):
        for D in (64, 128):
            for window, dqw in ((False, False), (True, False), (False, True), (True, True)):
                bf, w, dw = ("t" if x else "f" for x in (T == mx.bfloat16, window, dqw))
                stages = cuda_backend._BWD_WS_STAGES[dqw]
                name = f"custom_kernel_mlx_flash_attention_bwd_ws_{bf}_{D}_{w}_{stages}_{w}_{dw}"
                ins = list(zip(("q", "k", "v", "ip", "fp", "dout", "lse", "delta"),
                               (T, T, T, mx.int32, mx.float32, T, mx.float32, mx.float32)))
                yield name, _kernel_text(name, body, ins, _output_dtypes(("dq_acc", "dk", "dv"), T),
                                         [("BF16", T == mx.bfloat16), ("D", D), ("WINDOW", window),
                                          ("STAGES", stages), ("HEADS_FIRST", window), ("DQW", dqw)])


@needs_nvcc
def test_hopper_backward_ws_compiles_without_spills(tmp_path):
    """The warp-specialised backward: every instance builds under its launch
    bound (384 threads: 168 registers before setmaxnreg) without spills and,
    where cuobjdump exists, keeps its wgmma asynchronous (a handful of waits)."""
    kernels = dict(_hopper_bwd_ws_kernels())
    log = _nvcc_compile(tmp_path, "hopper_bwd_ws", _prelude(cuda_backend.kernel_headers("attention_bwd_ws")) +
                        "\n" + "\n".join(kernels.values()), ("-Xptxas", "-v"))
    usage = ptxas_usage(log)
    assert len(usage) == len(kernels), log[-2000:]
    bad = [f"{name}: {regs} registers, spills {st}/{ld}" for name, (regs, st, ld) in usage.items()
           if regs > 168 or st or ld]
    assert not bad, "\n".join(bad)
    if _cuobjdump() is not None:
        sass = _sass(tmp_path, "hopper_bwd_ws")
        counts = _wgmma_sync_counts(sass)
        assert len(counts) == len(kernels), sass[:2000]
        for name, (hgmma, waits) in counts.items():
            assert hgmma >= 12 and waits <= 4, f"{name}: {hgmma} wgmma, {waits} waits (serialised)"


def test_hopper_backward_ws_setting(monkeypatch):
    """MLX_FLASH_BWD_WS takes -1, 0 or 1 (another value is an error naming it);
    with 1, the warp-specialised backward serves fp16/bf16 Dqk = Dv in {64,
    128} dense or windowed calls on Hopper, and nothing with a mask, block
    mask, softcap, ALiBi, varlen or key range; with -1, those at D 128 with at
    least 4096 keys; unset (0), nothing."""
    from mlx_flash._spec import AttentionSpec

    for value in (-1, 0, 1):
        monkeypatch.setenv("MLX_FLASH_BWD_WS", str(value))
        assert cuda_backend._env_choice("MLX_FLASH_BWD_WS", 0, (-1, 0, 1)) == value
    monkeypatch.setenv("MLX_FLASH_BWD_WS", "2")
    with pytest.raises(ValueError, match="MLX_FLASH_BWD_WS: expected one of -1, 0, 1"):
        cuda_backend._env_choice("MLX_FLASH_BWD_WS", 0, (-1, 0, 1))
    monkeypatch.setattr(cuda_backend, "_is_hopper", lambda: True)
    spec = lambda **kw: AttentionSpec(1, 4, 2, 300, 4096, kw.pop("d", 128), kw.pop("dv", 128),  # noqa: E731
                                      kw.pop("dtype", mx.float16), 0.1, **kw)
    served = [spec(), spec(window_right=0), spec(window_left=64, window_right=0), spec(d=64, dv=64),
              spec(dtype=mx.bfloat16)]
    not_served = [spec(softcap=30.0), spec(mask_kind="additive"), spec(has_block_mask=True), spec(has_alibi=True),
                  spec(d=96, dv=96), spec(dtype=mx.float32)]
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 0)
    assert not any(map(cuda_backend._bwd_ws_serves, served))
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 1)
    assert all(map(cuda_backend._bwd_ws_serves, served))
    assert not any(map(cuda_backend._bwd_ws_serves, not_served))
    # -1: D 128 from 4096 keys only.
    monkeypatch.setattr(cuda_backend, "_BWD_WS", -1)
    assert [cuda_backend._bwd_ws_serves(x) for x in served] == [True, True, True, False, True]
    short = AttentionSpec(1, 4, 2, 300, 4095, 128, 128, mx.float16, 0.1)
    assert not cuda_backend._bwd_ws_serves(short) and not any(map(cuda_backend._bwd_ws_serves, not_served))
    # Its shared memory (D 128: 3 buffers, or 2 and the dQ staging) fits the block's.
    for dqw in (False, True):
        assert cuda_backend._bwd_ws_smem(128, cuda_backend._BWD_WS_STAGES[dqw], dqw) <= cuda_backend._MAX_SMEM
    monkeypatch.setenv("MLX_FLASH_BWD_WS_DQ", "1")
    assert cuda_backend._env_choice("MLX_FLASH_BWD_WS_DQ", 0, (0, 1)) == 1


@needs_cuda
@pytest.mark.parametrize("feature", ["none", "causal", "window_both", "window_left", "sinks"])
@pytest.mark.parametrize("kind", ["float16-D128", "bfloat16-D128", "float16-D64", "bfloat16-D64"])
@pytest.mark.parametrize("dqw", [0, 1])
def test_hopper_backward_ws_on_gpu(dqw, kind, feature, monkeypatch):
    """dq, dk, dv of the warp-specialised backward (MLX_FLASH_BWD_WS=1), dQ by
    atomics and by the writer warp (MLX_FLASH_BWD_WS_DQ), against float64: GQA
    with Nq != Nk both ways, partial tiles; every call must reach the kernel."""
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from reference_np import attention_np

    if not cuda_backend._is_hopper():
        pytest.skip("the warp-specialised backward is Hopper's")
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 1)
    monkeypatch.setattr(cuda_backend, "_BWD_WS_DQ", dqw)
    launches = []
    launch = cuda_backend._backward_ws
    monkeypatch.setattr(cuda_backend, "_backward_ws", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    dtype, D = getattr(mx, kind.split("-")[0]), int(kind.split("D")[1])
    shapes = ((2, 4, 2, 113, 1023), (1, 2, 1, 1023, 113), (1, 2, 2, 129, 300))
    for B, Hq, Hkv, Nq, Nk in shapes:
        gen = rng("hopper-bwd-ws", dqw, kind, feature, Nq)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        dout = randn(gen, (B, Hq, Nq, D), dtype)
        _, grads = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)], [q, k, v], [dout])
        want = attention_np(q, k, v, dout=dout, **options)
        plain = plain_errors(q, k, v, dout, options, dtype)
        for name, g in zip(("dq", "dk", "dv"), grads):
            check_close(name, to_np(g), want, dtype, plain)
    assert len(launches) == len(shapes)


@needs_cuda
@pytest.mark.parametrize("dqw", [0, 1])
@pytest.mark.parametrize("kind", [(mx.float16, 128), (mx.bfloat16, 64)], ids=["float16-D128", "bfloat16-D64"])
@pytest.mark.parametrize("case", nonfinite_cases.PREFILL_CASES)
def test_hopper_backward_ws_nonfinite_on_gpu(case, kind, dqw, monkeypatch):
    """The non-finite contract (issue 13) on the warp-specialised backward
    (its exact tiles), both dQ routes; cases with extras it does not serve skip."""
    from mlx_flash._spec import validate_attention
    from reference_np import attention_np

    if not cuda_backend._is_hopper():
        pytest.skip("the warp-specialised backward is Hopper's")
    monkeypatch.setattr(cuda_backend, "_BWD_WS", 1)
    monkeypatch.setattr(cuda_backend, "_BWD_WS_DQ", dqw)
    dtype, D = kind
    q, k, v, do, options = nonfinite_cases.prefill_case(case, dtype, D=D, size="small")
    spec, inputs = validate_attention(q, k, v, **options)
    if not cuda_backend._bwd_ws_serves(spec):
        pytest.skip("a feature the warp-specialised backward does not serve")
    out, lse = cuda_backend.attention_forward(q, k, v, spec, inputs, mx.gpu)
    dq, dk, dv = cuda_backend.attention_backward(q, k, v, out, lse, do, None, spec, inputs, mx.gpu)
    mx.eval(dq, dk, dv)
    want = attention_np(q, k, v, dout=do, **options)
    for name, got in (("dq", dq), ("dk", dk), ("dv", dv)):
        nonfinite_cases.check_contract(name, np.array(got.astype(mx.float32)), want, dtype)


@needs_cuda
@pytest.mark.parametrize("feature", ["none", "causal", "window_both"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_hopper_backward_ws_long_keys_on_gpu(dtype, feature, monkeypatch):
    """MLX_FLASH_BWD_WS=-1 (the warp-specialised kernel at head dim 128 from
    4096 keys) with its default dQ writer, against float64: GQA, partial tiles,
    Nq != Nk (few queries keep the float64 reference quick)."""
    import mlx_flash
    from helpers import check_close, plain_errors, qkv, randn, rng, to_np
    from reference_np import attention_np

    if not cuda_backend._is_hopper():
        pytest.skip("the warp-specialised backward is Hopper's")
    monkeypatch.setattr(cuda_backend, "_BWD_WS", -1)
    monkeypatch.setattr(cuda_backend, "_BWD_WS_DQ", 1)
    launches = []
    launch = cuda_backend._backward_ws
    monkeypatch.setattr(cuda_backend, "_backward_ws", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    shapes = ((1, 4, 2, 200, 4100), (1, 2, 1, 257, 4097))
    for B, Hq, Hkv, Nq, Nk in shapes:
        gen = rng("hopper-bwd-default-long", str(dtype), feature, Nq)
        q, k, v = qkv(gen, B, Hq, Hkv, Nq, Nk, 128, dtype=dtype)
        options = features.FEATURES[feature](gen, B, Hq, Nq, Nk)
        dout = randn(gen, (B, Hq, Nq, 128), dtype)
        _, grads = mx.vjp(lambda a, b, c: [mlx_flash.flash_attention(a, b, c, **options)], [q, k, v], [dout])
        want = attention_np(q, k, v, dout=dout, **options)
        plain = plain_errors(q, k, v, dout, options, dtype)
        for name, g in zip(("dq", "dk", "dv"), grads):
            check_close(name, to_np(g), want, dtype, plain)
    assert len(launches) == len(shapes)
