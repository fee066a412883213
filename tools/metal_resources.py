"""Resource table of the Metal kernels, generated from the code.

For every shipped configuration (dtype x head dims x the tile sizes that
mlx_flash/backends/metal.py and metal_matmul.py choose) this evaluates the
kernels' own constexpr expressions from metal_src/ (compiled once through
the MSL emulation harness, tests/metal_emu): threadgroup bytes (the arrays
the kernel bodies declare) and fp32 fragment registers per thread (the
elements of every per-thread fragment array, FwdRegs / DqRegs / DkdvRegs /
matmul's accumulators). Simdgroups come from the launch constants.

    python tools/metal_resources.py            # Markdown table to stdout
    python tools/metal_resources.py --check    # exit 1 if a limit is exceeded

Limits (docs/metal.md): 32 KiB threadgroup memory per threadgroup (Apple
GPUs) and 96 fragment floats per thread (Apple GPU threads have at most 128
fp32 registers and run at full occupancy up to about 104; the rest is left
for indices, softmax state and the operands of one multiply).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

TG_LIMIT = 32 * 1024
REG_LIMIT = 96

DTYPES = (("float32", 4), ("float16", 2), ("bfloat16", 2))
# Head-dim pairs: the metallib's instantiations (Dqk = Dv in 32..256) plus
# the JIT path's extremes (registers and tiles grow with the head dims up to
# 256, so 256 bounds every D <= 256; past it the column blocks and device
# operands keep them level, 576 / 512 bounds the rest) and mixed pairs.
HEAD_DIMS = ((32, 32), (64, 64), (80, 80), (96, 96), (128, 128), (192, 192), (256, 256),
             (192, 128), (256, 40), (40, 256),
             # wide heads (forward O and dQ in column blocks past 256): MLA and the largest others
             (320, 256), (512, 512), (576, 512), (576, 64), (64, 512))


@dataclass
class Row:
    kernel: str
    dtype: str
    dqk: int
    dv: int
    simdgroups: int
    tile: str
    tg_expr: str    # C++ expression of the threadgroup bytes
    reg_expr: str   # C++ expression of the fragment floats per thread
    tg_bytes: int = 0
    regs: int = 0


def configurations():
    """Every kernel configuration the wrappers launch, with the C++
    expressions (over metal_src's constexprs) of its resources."""
    from mlx_flash.backends import metal, metal_matmul

    rows = []
    for dtype, size in DTYPES:
        for dqk, dv in HEAD_DIMS:
            t = metal.tile_sizes(dqk, dv, size)
            # decode: 1 simdgroup, or 2-3 for packed GQA rows (same BK, Q staged where it fits)
            for kind, nsg in (("forward", t.fwd_nsg), ("decode", 1), ("decode", 2), ("decode", 3)):
                rows.append(Row(kind, dtype, dqk, dv, nsg, f"BQ={8 * nsg} BK={t.fwd_bk}",
                                f"mlxf::fwd_tile_elems({dqk}, {dv}, {nsg}, {t.fwd_bk}, {size}) * {size} + 4 * {nsg}",
                                f"mlxf::FwdRegs<{dqk}, {dv}, {t.fwd_bk}>::floats"))
            rows.append(Row("bwd_delta", dtype, dqk, dv, metal._DELTA_NSG, "8 rows/simdgroup", "0", "2"))
            rows.append(Row("bwd_dq", dtype, dqk, dv, t.fwd_nsg, f"BQ={8 * t.fwd_nsg} BK={t.dq_bk}",
                            f"mlxf::dq_tile_elems({dqk}, {dv}, {t.fwd_nsg}, {t.dq_bk}, {size}) * {size} + 4 * {t.fwd_nsg}",
                            f"mlxf::DqRegs<{dqk}, {dv}, {t.dq_bk}>::floats"))
            rows.append(Row("bwd_dkdv", dtype, dqk, dv, t.dkdv_nsg, f"BK={8 * t.dkdv_nsg} BQ={t.dkdv_bq}",
                            f"mlxf::dkdv_tile_elems({dqk}, {dv}, {t.dkdv_nsg}, {t.dkdv_bq}, {size}) * {size} + 8 * {t.dkdv_bq} + 4 * {t.dkdv_nsg}",
                            f"mlxf::DkdvRegs<{dqk}, {dv}, {t.dkdv_bq}>::floats"))
    for tile in (metal_matmul.SMALL_TILE, metal_matmul.LARGE_TILE):
        rows.append(Row("matmul2d", "any", 0, 0, metal_matmul.THREADS // 32, f"{tile}x{tile}",
                        f"mlxf_mm_tg_bytes({tile})", f"mlxf_mm_acc_floats({tile})"))
    return rows


def evaluate(rows):
    """Fill in tg_bytes and regs by compiling the expressions against the
    kernel headers (one translation unit through the emulation harness)."""
    import mlx.core as mx
    from metal_emu import harness

    from mlx_flash import _sources
    from mlx_flash.backends import metal

    header = metal.header_text() + "\n" + _sources.metal_source("matmul.h")
    lines = []
    for i, r in enumerate(rows):
        lines.append(f"res[{2 * i}] = int({r.tg_expr});")
        lines.append(f"res[{2 * i + 1}] = int({r.reg_expr});")
    kernel = harness.metal_kernel(name="mlxf_resource_probe", input_names=["unused"], output_names=["res"],
                                  header=header, source="(void)unused;\n" + "\n".join(lines) + "\n")
    (res,) = kernel(inputs=[mx.zeros((8,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                    output_shapes=[(2 * len(rows),)], output_dtypes=[mx.int32])
    values = res.tolist()
    for i, r in enumerate(rows):
        r.tg_bytes, r.regs = values[2 * i], values[2 * i + 1]
    return rows


def violations(rows):
    return [r for r in rows if r.tg_bytes > TG_LIMIT or r.regs > REG_LIMIT]


def markdown(rows) -> str:
    out = ["| kernel | dtype | Dqk | Dv | simdgroups | tiles | threadgroup bytes | fragment floats/thread |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dims = ("-", "-") if r.kernel == "matmul2d" else (r.dqk, r.dv)
        flag = lambda over: " **over**" if over else ""
        out.append(f"| {r.kernel} | {r.dtype} | {dims[0]} | {dims[1]} | {r.simdgroups} | {r.tile} | "
                   f"{r.tg_bytes}{flag(r.tg_bytes > TG_LIMIT)} | {r.regs}{flag(r.regs > REG_LIMIT)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = evaluate(configurations())
    print(markdown(rows))
    bad = violations(rows)
    if bad:
        print(f"\n{len(bad)} configurations exceed {TG_LIMIT} threadgroup bytes or {REG_LIMIT} fragment floats",
              file=sys.stderr)
    return 1 if (bad and "--check" in argv) else 0


if __name__ == "__main__":
    raise SystemExit(main())
