"""Static SASS of the quantized decode's tile loop, per variant (no GPU; nvcc + cuobjdump).

    python tools/quant_decode_sass.py [--bits 4] [--out DIR]

Compiles attention_quant_decode's register-path instance of the benchmark
shape (fp16 q and scales, group 64, D 128, 4 warps) as the compile tests wrap
it (tests/test_cuda_specific.py's _kernel_text), for KEYS_M 0/1/2, FOLD and
L2PF and TILES (tiles a warp takes an iteration), with nvcc for sm_90a, and counts the instructions of the tile loop: the
smallest backward branch enclosing every HMMA. Prints registers, spills, the
loop's size and its instruction mix. cuobjdump comes from PATH, CUDA_HOME or
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

# (KEYS_M, FOLD, L2PF, TILES; TILES < 0: LATE with |TILES|)
VARIANTS = [(0, False, 0, 1), (0, True, 0, 1), (0, False, 8, 1), (0, True, 8, 1), (1, False, 0, 1), (1, True, 0, 1),
            (2, False, 0, 1), (0, False, 0, 2), (0, True, 0, 2), (0, False, 0, -1), (0, False, 0, -2)]
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
    for keys_m, fold, l2pf, tiles in VARIANTS:
        late, tiles = tiles < 0, abs(tiles)  # negative: LATE (raw scales until staged)
        T = mx.float16
        template = [("T", T), ("KST", T), ("VST", T), ("SOFTCAP", False), ("WINDOW", False), ("SINKS", False),
                    ("D", 128), ("DV", 128), ("BITS", args.bits), ("GS", 64), ("NW", 4), ("PF", False),
                    ("STAGES", 0), ("POOL", True), ("KEYS_M", keys_m), ("FOLD", fold), ("L2PF", l2pf),
                    ("TILES", tiles), ("LATE", late)]
        name = f"keys_m{keys_m}_fold{int(fold)}_l2pf{l2pf}" + (f"_tiles{tiles}" if tiles > 1 else "") + (
            "_late" if late else "")
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
              "(keys an iteration:", 16 * tiles, ")",
              {k: ops[k] for k in MIX if ops[k]}, flush=True)


if __name__ == "__main__":
    main()
