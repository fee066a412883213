"""Static SASS of the quantized decode's tile loop, per variant (no GPU; nvcc + cuobjdump).

    python tools/quant_decode_sass.py [--bits 4] [--out DIR]

Compiles attention_quant_decode's register-path instance of the benchmark
shape (fp16 q and scales, group 64, D 128, 4 warps) as the compile tests wrap
it (tests/test_cuda_specific.py's _kernel_text), for KEYS_M 0/1/2, FOLD and
L2PF and TILES (tiles a warp takes an iteration), with nvcc for sm_90a, and counts the instructions of the tile loop: the
smallest backward branch enclosing every HMMA. Prints registers, spills, the
loop's size and its instruction mix, and `model`: the cycles an iteration
takes a warp issuing in order alone on its scheduler (the register path's
case: 4 warps an SM), each instruction waiting for its operands under rough
latencies (LATENCY; a model to rank variants, not a measurement), per 16
keys. cuobjdump comes from PATH, CUDA_HOME or
the nvidia-cuda-cuobjdump wheel.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import mlx.core as mx  # noqa: E402

# (KEYS_M, FOLD, L2PF, TILES, LATE, PF)
VARIANTS = [(0, False, 0, 1, False, False), (0, True, 0, 1, False, False), (0, False, 8, 1, False, False),
            (0, True, 8, 1, False, False), (1, False, 0, 1, False, False), (1, True, 0, 1, False, False),
            (2, False, 0, 1, False, False), (0, False, 0, 2, False, False), (0, True, 0, 2, False, False),
            (0, False, 0, 1, True, False), (0, False, 0, 2, True, False), (0, False, 0, 1, False, True),
            (0, False, 0, 1, True, True), (0, False, 0, 2, False, True), (0, False, 0, 2, True, True)]
MIX = ("HMMA", "LOP3", "HADD2", "HFMA2", "PRMT", "SHF", "FFMA", "FADD", "FMUL", "LDS", "LDG", "STS", "SHFL", "MUFU",
       "CCTL")


def cuobjdump() -> str:
    cands = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    import site
    for d in site.getsitepackages():
        cands += glob.glob(os.path.join(d, "nvidia", "*", "bin", "cuobjdump"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise SystemExit("cuobjdump not found (PATH, CUDA_HOME, or pip install nvidia-cuda-cuobjdump)")


def loop_body(sass: str) -> list:
    ins = [(int(m.group(1), 16), m.group(2)) for line in sass.splitlines()
           for m in [re.match(r"\s+/\*([0-9a-f]{4,5})\*/\s+(.*)", line)] if m]
    hm = [a for a, s in ins if "HMMA" in s]
    loops = []
    for a, s in ins:
        t = re.search(r"0x([0-9a-f]+)", s.split("BRA")[-1]) if "BRA" in s else None
        if t and int(t.group(1), 16) <= min(hm) and a >= max(hm):
            loops.append((a - int(t.group(1), 16), int(t.group(1), 16), a))
    _, lo, hi = min(loops)
    return [s for a, s in ins if lo <= a <= hi]


# Rough latencies (cycles) until a result can be used, Hopper; anything unlisted 5. LDG: a DRAM round trip.
LATENCY = {"LDG": 600, "LDS": 30, "HMMA": 32, "MUFU": 20, "SHFL": 30, "VOTE": 6, "STS": 20, "F2FP": 6}


def _regs(text: str, width: int = 1) -> list:
    out = []
    for m in re.finditer(r"\b(U?R|U?P)(\d+)", text):
        n = width if m.group(1) in ("R", "UR") else 1
        out += [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(n)]
    return out


def _operands(ins: str):
    """(opcode, registers written, registers read) of a SASS instruction; vector widths from .64 / .128 and
    HMMA's fragments (an approximation for the model)."""
    ins = ins.split(";")[0]
    guard = re.match(r"@!?(U?P\w+)\s+", ins)
    reads = [guard.group(1)] if guard else []
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    parts = ins.split(None, 1)
    op = parts[0].split(".")[0]
    args = [a.strip() for a in parts[1].split(",")] if len(parts) > 1 else []
    width = 4 if ".128" in parts[0] else 2 if ".64" in parts[0] else 1
    if not args or op in ("STG", "STS", "ST", "RED", "BAR", "BRA", "EXIT", "NOP", "DEPBAR", "WARPSYNC", "BSYNC",
                          "BSSY", "CCTL"):
        return op, [], reads + [r for a in args for r in _regs(a)]
    dst, srcs = args[0], args[1:]
    if op == "HMMA":
        return op, _regs(dst, 4), reads + _regs(srcs[0], 4) + _regs(srcs[1], 2) + _regs(srcs[2], 4)
    writes = _regs(dst, width if op in ("LDG", "LDS") else 1)
    if re.match(r"U?P", dst) and srcs and re.match(r"U?P\w", srcs[0]) and op in ("ISETP", "FSETP", "PLOP3", "HSETP2"):
        writes += _regs(srcs[0])
        srcs = srcs[1:]
    for a in srcs:
        for m in re.finditer(r"\[(U?R\d+)(\.64)?", a):
            reads += _regs(m.group(1), 2 if m.group(2) else 1)
        if "[" not in a:
            reads += _regs(a)
    return op, [r for r in writes if r not in ("RZ", "PT", "URZ", "UPT")], reads


def model_cycles(body: list) -> int:
    """Cycles of one iteration in steady state: in-order issue (one instruction a cycle at best), each waiting
    for its operands; the difference between 4 and 3 back-to-back passes of the loop body."""
    def run(passes):
        ready, clock = {}, 0
        for _ in range(passes):
            for ins in body:
                op, writes, reads = _operands(ins)
                clock = max([clock + 1] + [ready.get(r, 0) for r in reads])
                for r in writes:
                    ready[r] = clock + LATENCY.get(op, 5)
        return clock
    return run(4) - run(3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", default=None, help="keep the sources, cubins and SASS here")
    p.add_argument("--only", default="", help="variants whose name contains this")
    args = p.parse_args(argv)
    import test_cuda_quant_emu as tq
    import test_cuda_specific as tcs
    from mlx_flash.backends import cuda_quant as cq

    tcs._CUDA_TYPES.update({mx.uint32: "uint32_t"})
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="qdec_sass_"))
    out.mkdir(parents=True, exist_ok=True)
    dump = cuobjdump()
    for keys_m, fold, l2pf, tiles, late, pf in VARIANTS:
        T = mx.float16
        template = [("T", T), ("KST", T), ("VST", T), ("SOFTCAP", False), ("WINDOW", False), ("SINKS", False),
                    ("D", 128), ("DV", 128), ("BITS", args.bits), ("GS", 64), ("NW", 4), ("PF", pf),
                    ("POOL", not pf), ("KEYS_M", keys_m), ("FOLD", fold), ("L2PF", l2pf),
                    ("TILES", tiles), ("LATE", late), ("QSF", False)]
        name = f"keys_m{keys_m}_fold{int(fold)}_l2pf{l2pf}" + (f"_tiles{tiles}" if tiles > 1 else "") + (
            "_late" if late else "") + ("_pf" if pf else "")
        if args.only not in name:
            continue
        text = tcs._kernel_text(name, tcs.cuda_backend._read("attention_quant_decode.cu"),
                                tq._dtypes(cq._DEC_INPUTS, template), tq._dtypes(("out", "lse", "scratch"), template),
                                template)
        src = out / f"{name}.cu"
        src.write_text(tcs._prelude(tcs.cuda_backend.kernel_headers("attention_quant_decode")) + "\n" + text)
        r = subprocess.run(["nvcc", "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-cubin", "-Xptxas",
                            "-v", "-o", str(out / f"{name}.cubin"), str(src)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        sass = subprocess.run([dump, "-sass", str(out / f"{name}.cubin")], capture_output=True, text=True).stdout
        (out / f"{name}.sass").write_text(sass)
        body = loop_body(sass)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0] for s in body)
        print(name, "registers", re.findall(r"Used (\d+) registers", r.stderr)[0], "spill bytes",
              sum(map(int, re.findall(r"(\d+) bytes spill stores", r.stderr))), "loop", len(body),
              "(keys an iteration:", 16 * tiles, ") model", model_cycles(body) // tiles, "cycles a 16-key tile",
              {k: ops[k] for k in MIX if ops[k]}, flush=True)


if __name__ == "__main__":
    main()
