"""The kernels an A100 (sm_80) or an L40 / RTX 4090 (sm_89) runs, compiled for
that architecture (no GPU: nvcc, skipped without it).

Every other compile test targets sm_90a, where MLX's NVRTC builds for an H100.
Off Hopper the backend routes (mlx_flash/backends/cuda.py _is_hopper,
cuda_matmul.route_of; cuda_quant has no architecture check): the mma and SIMT
forwards and backwards, the delta rows, the decode and its combine, the
quantized forward / backward / mma forward / decode, matmul.cu and the gemv.
Each body's instances are the existing compile cases (test_cuda_specific.py,
test_cuda_quant_emu.py) less the ones a non-Hopper card never builds
(wgmma / warp-specialised kernels, the decode's opt-in bulk (TMA) copies;
matmul's opt-in native fp8 mma, sm_89 only); one translation unit per header
set per architecture. Asserts: it compiles, and ptxas reports no spills
beyond _KNOWN_SPILLS. The two opt-ins left out do not build off their
architecture (ptxas: the decode's bulk copies need sm_90, the fp8 mma sm_89)
and the backend does not check: MLX_FLASH_CUDA_DECODE_PLAN bulk=1 and
MLX_FLASH_CUDA_NATIVE_FP8=1 are for Hopper / Ada only.
CI: about 200 s of nvcc on 2 cores (113 s wall with -n 2).
"""

from __future__ import annotations

import re
import shutil

import mlx.core as mx
import pytest
import test_cuda_quant_emu as tq
import test_cuda_specific as tcs

from mlx_flash.backends import cuda_matmul

_HOPPER_ONLY = ("attention_fwd_wgmma", "attention_bwd_wgmma")


def _attention_units(arch):
    units = {}
    for i, (body, T, MT, template, outputs) in enumerate(tcs._attention_cases()):
        if body in _HOPPER_ONLY:
            continue
        template = [("T", T)] + ([("MT", MT)] if MT is not None else []) + template
        headers = tcs.cuda_backend.kernel_headers(body)
        units.setdefault(headers, []).append(
            tcs._kernel_text(f"k{i}_{body}", tcs.cuda_backend._read(body + ".cu"), tcs._input_dtypes(body, T, MT),
                             tcs._output_dtypes(outputs, T), template))
    for headers, kernels in units.items():
        yield headers[-1].removesuffix(".cuh"), headers, kernels


def _decode_units(arch):
    body = tcs.cuda_backend._read("attention_fwd_decode.cu")
    # BULK (cp.async.bulk, sm_90) is an opt-in of MLX_FLASH_CUDA_DECODE_PLAN only.
    kernels = [tcs._kernel_text(f"decode{i}", body, tcs._input_dtypes("attention_fwd_decode", T, MT),
                                tcs._output_dtypes(("out", "lse", "ws"), T), [("T", T), ("MT", MT)] + template)
               for i, (T, MT, template) in enumerate(tcs._decode_cases()) if not dict(template)["BULK"]]
    yield "decode", tcs.cuda_backend.kernel_headers("attention_fwd_decode"), kernels
    body = tcs.cuda_backend._read("attention_combine.cu")
    kernels = [tcs._kernel_text(f"combine{i}", body, tcs._input_dtypes("attention_combine", None, None),
                                [("out", dict(t)["T"]), ("lse", mx.float32)], t)
               for i, t in enumerate(tcs._combine_cases())]
    yield "combine", tcs.cuda_backend.kernel_headers("attention_combine"), kernels


def _quant_routed(case):
    """The representative subset of the quantized compile cases (CI time: the
    full sets took 4.4 minutes an architecture on 2 cores): forward and
    backward at 4 rows a warp (RW 1 and 2 differ in loop counts only), the mma
    forward's default tile, two instances, the decode's routed plan (pool tickets, S = Q K^T,
    scales of q's type; its opt-ins KEYS_M, FOLD, L2PF, TILES 2, LATE and the
    prefetch are not routed)."""
    from mlx_flash.backends import cuda_quant as cq

    body, t = case[0], dict(case[3])
    if body in ("attention_quant_fwd", "attention_quant_bwd"):  # 4-bit with every feature: 4-bit causal's code
        return t["RW"] == 4 and not (t["BITS"] == 4 and t["SOFTCAP"] and t["DV"] == 128)
    if body == "attention_quant_fwd_mma":  # ~6 s an instance: 3-bit fp16 with every feature, 6-bit bf16 D 64 / 96
        return ((t["NW"], t["BN"]) == (cq._MMA_WARPS, cq._MMA_BN)
                and (t["BITS"], t["T"]) in ((3, mx.float16), (6, mx.bfloat16)))
    return (t["POOL"] and not t["PF"] and t["KEYS_M"] == 0 and not t["FOLD"] and not t["L2PF"] and t["TILES"] == 1
            and not t["LATE"] and t["KST"] == t["T"])


def _quant_units(arch):
    cases = [c for c in list(tq._compile_cases()) + list(tq._decode_compile_cases()) if _quant_routed(c)]
    for body in ("attention_quant_fwd", "attention_quant_bwd", "attention_quant_fwd_mma", "attention_quant_decode"):
        kernels = [tcs._kernel_text(f"{body}_{n}", tcs.cuda_backend._read(body + ".cu"), tq._dtypes(ins, template),
                                    tq._dtypes(outs, template), template)
                   for n, (_, ins, outs, template) in enumerate(c for c in cases if c[0] == body)]
        yield body, tcs.cuda_backend.kernel_headers(body), kernels


def _matmul_units(arch):
    body = tcs.cuda_backend._read("matmul.cu")
    # NATIVE_FP8 (mma.sync m16n8k32 on fp8) exists from sm_89; MLX_FLASH_CUDA_NATIVE_FP8=1 only.
    kernels = [tcs._kernel_text(f"mm{i}", body, tcs.matmul_inputs(t["TA"], t["TB"]), [("out", t["TO"])], template)
               for i, template in enumerate(tcs._matmul_cases())
               for t in [dict(template)] if arch != "80" or not t["NATIVE_FP8"]]
    yield "matmul", tcs.cuda_backend.kernel_headers("matmul"), kernels
    # The default plans only (GEMV_PLAN, GEMV_PLAN_MT2: W, RT, U, STAGES, BOUNDS); the others are the bench's or
    # MLX_FLASH_CUDA_GEMV_WIDE's. Of those, on sm_80 (nvcc 13.0) fp8 weights spill at (8, 1, 8, bounds 2) 1564 /
    # 1360 bytes, (16, 2, 1, bounds 1) 248 / 144 and (4, 2, 4, no bounds, 9-16 rows) 752 / 520.
    plans = {(p[0], p[1], p[2], p[4], p[5]) for p in (cuda_matmul.GEMV_PLAN, cuda_matmul.GEMV_PLAN_MT2)}
    for unit, _, headers, kernels in tcs.gemv_units([c for c in tcs._matmul_gemv_cases() if c[5:] in plans]):
        yield unit, headers, kernels


_GROUPS = {"attention": _attention_units, "decode": _decode_units, "quant": _quant_units, "matmul": _matmul_units}

# Spills ptxas reports off Hopper in default routes (nvcc 13.0; none of these
# spill for sm_90a), left as they are: a fix would change the route's plan or
# code without a card to time it on. Each entry: (arch, kernel name prefix,
# template values the instance has (as its text declares them), most spill
# store / load bytes allowed). More fails, as does a spill anywhere else.
_GEMV_DEFAULT = {"W": "8", "RT": "1", "U": "4", "STAGES": "0", "BOUNDS": "2"}
_KNOWN_SPILLS = [
    # gemv's default plan (8 warps, launch bounds 2: 128 registers), fp16 x e4m3 at 1-8 rows: sm_80 has no
    # fp8 convert instruction (cuda_fp8.h converts in software).
    ("80", "gemv", {**_GEMV_DEFAULT, "TA": "__half", "TB": "uint8_t", "FB": "1", "MT": "1"}, (248, 144)),
    # The same plan on sm_89: fp16 x e4m3 (1-8 rows), bf16 x e5m2 and fp16 x fp16 (9-16 rows).
    ("89", "gemv", {**_GEMV_DEFAULT, "TA": "__half", "TB": "uint8_t", "FB": "1", "MT": "1"}, (152, 136)),
    ("89", "gemv", {**_GEMV_DEFAULT, "TA": "__nv_bfloat16", "TB": "uint8_t", "FB": "2", "MT": "2"}, (480, 476)),
    ("89", "gemv", {**_GEMV_DEFAULT, "TA": "__half", "TB": "__half", "MT": "2"}, (196, 192)),
    # attention_quant_fwd, D 128, Dv 512, 8-bit codes, group 32, fp16 / fp32 q over fp16 scales (bf16's
    # instance does not spill): 255 registers on sm_80.
    ("80", "attention_quant_fwd", {"KST": "__half", "D": "128", "DV": "512", "BITS": "8", "GS": "32"}, (28, 28)),
]


def _template_of(kernel_text):
    """{name: value text} of the template constants _kernel_text declares."""
    return dict(re.findall(r"^  (?:constexpr (?:int|bool) |using )(\w+) = ([\w:]+);$", kernel_text, re.MULTILINE))


def _known_spill(arch, name, template):
    hits = [limit for a, prefix, values, limit in _KNOWN_SPILLS
            if a == arch and name.startswith(prefix) and values.items() <= template.items()]
    return hits[0] if hits else (0, 0)


def _short(mangled):
    """mlx::core::cu::<name>'s <name> from its mangled symbol."""
    m = re.match(r"_ZN3mlx4core2cu(\d+)", mangled)
    return mangled[m.end():m.end() + int(m.group(1))] if m else mangled


def _name_of(kernel_text):
    return re.search(r"__global__ void (\w+)\(", kernel_text).group(1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("group", sorted(_GROUPS))
@pytest.mark.parametrize("arch", ["80", "89"])
def test_non_hopper_routes_compile_without_spills(arch, group, tmp_path):
    for unit, headers, kernels in _GROUPS[group](arch):
        log = tcs._nvcc_compile(tmp_path, f"{unit}_sm{arch}", tcs._prelude(headers) + "\n" + "\n".join(kernels),
                                ("-Xptxas", "-v"), arch=arch)
        usage = tq._ptxas_usage_with_calls(log)
        assert len(usage) == len(kernels), f"sm_{arch} {unit}: " + log[-2000:]
        templates = {_name_of(k): _template_of(k) for k in kernels}
        for name, (regs, spill_st, spill_ld) in usage.items():
            template = templates[_short(name)]
            known_st, known_ld = _known_spill(arch, _short(name), template)
            assert spill_st <= known_st and spill_ld <= known_ld, \
                f"sm_{arch} {unit} {_short(name)}: {regs} registers, spills {spill_st}/{spill_ld} bytes " \
                f"(known: {known_st}/{known_ld}); template {template}"


def test_known_spills_name_built_kernels():
    """Every _KNOWN_SPILLS entry matches an instance these units build (an edit
    of the case lists must keep or drop the entries with it)."""
    for arch, prefix, values, _ in _KNOWN_SPILLS:
        assert any(_name_of(k).startswith(prefix) and values.items() <= _template_of(k).items()
                   for make in _GROUPS.values() for _, _, ks in make(arch) for k in ks), (arch, prefix, values)
