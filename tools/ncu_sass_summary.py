"""Summarise an Nsight Compute source page (no GPU needed): stall samples by
reason and by SASS opcode, and the loads with the most excess L2 sectors.

    ncu --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \\
        -k regex:KERNEL -c 1 python3 ... > page.csv
    python tools/ncu_sass_summary.py page.csv

(benchmarks/results/ncu/sass_stalls_*_s13.txt were written by it.)
"""

from __future__ import annotations

import collections
import csv
import sys


def _number(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def summary(path: str, top: int = 14) -> str:
    rows = list(csv.reader(open(path)))
    header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    kernel = next((r[1] for r in rows[:header_at] if r and r[0] == "Kernel Name"), "?")
    header = rows[header_at]
    col = {name: i for i, name in enumerate(header)}
    data = [r for r in rows[header_at + 1:] if len(r) == len(header)]
    # "(Not Issued)" columns are subsets of the plain ones: left out, so no sample counts twice.
    reasons = [k for k in header if k.startswith("stall_") and "Not Issued" not in k]
    by_reason, by_op = collections.Counter(), collections.defaultdict(collections.Counter)
    for r in data:
        words = r[col["Source"]].split()
        op = (words[1] if words and words[0].startswith("@") and len(words) > 1 else (words or [""])[0]).split(".")[0]
        for k in reasons:
            v = _number(r[col[k]])
            by_reason[k] += v
            by_op[op][k] += v
    total = sum(by_reason.values()) or 1.0
    out = [f"kernel: {kernel[:160]}", f"{len(data)} SASS instructions",
           f"stall samples (all, issued or not): {total:.0f}"]
    out += [f"  {k[6:]:22s} {v / total * 100:5.1f}%" for k, v in by_reason.most_common(10)]
    out.append("samples by opcode (top stall reasons of each):")
    ops = sorted(by_op, key=lambda o: -sum(by_op[o].values()))[:top]
    for o in ops:
        v = sum(by_op[o].values())
        reasons_of = ", ".join(f"{k[6:]} {c / v * 100:.0f}%" for k, c in by_op[o].most_common(3)) if v else ""
        out.append(f"  {o:10s} {v / total * 100:5.1f}%  ({reasons_of})")
    excess, sectors = "L2 Theoretical Sectors Global Excessive", "L2 Theoretical Sectors Global"
    if excess in col:
        out.append(f"global sectors {sum(_number(r[col[sectors]]) for r in data):.0f}, "
                   f"excessive {sum(_number(r[col[excess]]) for r in data):.0f}")
        for r in sorted(data, key=lambda r: -_number(r[col[excess]]))[:8]:
            if _number(r[col[excess]]) > 0:
                out.append(f"  {r[col['Address']]} {r[col['Source']].strip()[:70]:70s} excess "
                           f"{_number(r[col[excess]]):.0f} of {_number(r[col[sectors]]):.0f}")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summary(p))
