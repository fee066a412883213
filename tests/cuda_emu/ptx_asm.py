"""Inline PTX of the Hopper attention kernels, rewritten as calls into the
emulation (hopper_emu.cuh).

The warp-specialised kernels (cuda_src/attention_fwd_ws.cuh, attention_bwd_*.cuh)
carry their PTX inline, in the headers they share (wgmma.cuh, wgmma_wide.cuh,
tma.cuh, mbarrier.cuh) and in their own bodies (named barriers, setmaxnreg,
the m64n176 wrappers). `translate(text)` finds every `asm(...)` statement of
the text, reads its template and operands as the compiler would, and writes
the C++ statement that does the same on the CPU: the kernel text the wrapper
hands MLX stays what runs, only its PTX is swapped. An instruction this table
does not know fails loudly (AssertionError naming it), never silently.
"""

from __future__ import annotations

import re

_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")
# wgmma operand kinds as hopper_emu.cuh numbers them (wgmma_gemm.cuh's numbering).
_KINDS = {"e4m3": 1, "e5m2": 2, "f16": 16, "bf16": 17}
_FP8_KINDS = ("e4m3", "e5m2")
_STRING = re.compile(r'"((?:\\.|[^"\\])*)"')


def _matching_paren(text: str, start: int) -> int:
    """Index of the ')' closing the '(' at text[start], skipping string literals."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == '"':
            i = _STRING.match(text, i).end()
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise AssertionError("cuda_emu: unbalanced asm statement")


def _split_top(text: str, sep: str) -> list:
    """text cut at `sep` outside parentheses, brackets and string literals."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            m = _STRING.match(text, i)
            cur.append(m.group(0))
            i = m.end()
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _operands(section: str) -> list:
    """[(constraint, expression)] of one operand section."""
    out = []
    for item in _split_top(section, ","):
        item = item.strip()
        if not item:
            continue
        m = re.match(r'"([^"]*)"\s*\((.*)\)\s*$', item, re.S)
        if not m:
            raise AssertionError(f"cuda_emu: asm operand not understood: {item!r}")
        out.append((m.group(1), m.group(2).strip()))
    return out


def _statement(template: str, outs: list, ins: list) -> str:
    """The C++ statement standing for one asm statement."""
    ops = [e for _, e in outs] + [e for _, e in ins]
    t = " ".join(template.replace("\\n", " ").replace("\\t", " ").split())

    def op(ref: str) -> str:  # "%3" -> operand 3's expression; a literal stays
        ref = ref.strip()
        return f"({ops[int(ref[1:])]})" if ref.startswith("%") and ref[1:].isdigit() else ref

    def args(pattern: str):
        m = re.search(pattern, t)
        if not m:
            raise AssertionError(f"cuda_emu: PTX not understood: {t!r}")
        return [op(g) for g in m.groups()]

    E = "::emu_hopper::"
    if t == "":  # wgmma_pin: a compiler barrier only
        return ";"
    for noop in ("wgmma.fence.sync.aligned", "fence.proxy.async.shared::cta", "fence.mbarrier_init",
                 "setmaxnreg.", "fence.proxy.tensormap::generic.acquire"):
        if t.startswith(noop):
            return ";"
    if "wgmma.mma_async" in t:
        m = re.search(r"m64n(\d+)k(16|32)\.f32\.(bf16|f16|e4m3|e5m2)\.(bf16|f16|e4m3|e5m2) \{[^}]*\}, "
                      r"(\{[^}]*\}|%\d+), (%\d+), p, 1, 1(.*);", t)
        pred = re.search(r"setp\.ne\.b32 p, (%\d+), 0", t)
        if not m or not pred or (m[2] == "32") != (m[3] in _FP8_KINDS) or (m[3] in _FP8_KINDS) != (m[4] in _FP8_KINDS):
            raise AssertionError(f"cuda_emu: wgmma not understood: {t!r}")
        n, ka, kb, a, b, rest = int(m[1]), _KINDS[m[3]], _KINDS[m[4]], m[5], m[6], m[7]
        kind = f"{ka}, {kb}"
        # 16-bit kinds: transpose immediates for A and B follow the scales; fp8 has none (K-major only).
        trans = [op(x) for x in re.findall(r"%\d+|\b\d+\b", rest)] or ["0", "0"]
        d = re.match(r"(.*)\[0\]$", outs[0][1])
        if not d or len(outs) != n // 2:
            raise AssertionError(f"cuda_emu: wgmma accumulator operands not understood: {outs[0]!r}")
        if a.startswith("{"):  # A from registers: four operands a[0..3]
            regs = [op(x) for x in a[1:-1].split(",")]
            arr = re.match(r"\((.*)\[0\]\)$", regs[0])
            if not arr:
                raise AssertionError(f"cuda_emu: wgmma RS A operand not understood: {regs!r}")
            return (f"{E}wgmma<{kind}, {n}>({d[1]}, {arr[1]}, 0ull, {op(b)}, {op(pred[1])}, 0, {trans[0]});")
        return f"{E}wgmma<{kind}, {n}>({d[1]}, nullptr, {op(a)}, {op(b)}, {op(pred[1])}, {trans[0]}, {trans[1]});"
    if t.startswith("wgmma.commit_group"):
        return f"{E}wgmma_commit();"
    if t.startswith("wgmma.wait_group"):
        (n,) = args(r"wgmma\.wait_group\.sync\.aligned (\S+);")
        return f"{E}wgmma_wait({n});"
    if t.startswith("ex2.approx.ftz.f32"):
        y, x = args(r"ex2\.approx\.ftz\.f32 (%\d+), (%\d+);")
        return f"{y} = {E}ex2_ftz({x});"
    if t.startswith("max.NaN.f32"):
        y, x = args(r"max\.NaN\.f32 (%\d+), (%\d+), 0fC2FE0000;")
        return f"{y} = {E}max_nan({x}, -127.f);"
    if re.fullmatch(r"mov\.u32 %\d+, %%(tid|ctaid)\.x;", t):  # a special register read again
        y, reg = args(r"mov\.u32 (%\d+), %%(tid|ctaid)\.x;")
        return f"{y} = {'threadIdx' if reg == 'tid' else 'blockIdx'}.x;"
    if "%%globaltimer" in t or "%%smid" in t:
        (y,) = args(r"mov\.u\d+ (%\d+), %%")
        return f"{y} = 0;"
    if t.startswith("bar.sync") or t.startswith("bar.arrive"):
        kind, bar, count = args(r"bar\.(sync|arrive) (\S+), (\S+);")
        return f"{E}named_barrier({bar}, {count}, {'true' if kind == 'sync' else 'false'});"
    if "bar.red.or.pred" in t:
        r = op(re.search(r"selp\.u32 (%\d+)", t)[1])
        p = op(re.search(r"setp\.ne\.u32 p, (%\d+), 0", t)[1])
        bar, count = args(r"bar\.red\.or\.pred q, (\S+), (\S+), p;")
        return f"{r} = {E}named_barrier_or({bar}, {count}, {p});"
    if t.startswith("mbarrier.init"):
        bar, count = args(r"mbarrier\.init\.shared::cta\.b64 \[(%\d+)\], (%\d+);")
        return f"{E}mbar_init({bar}, {count});"
    if t.startswith("mbarrier.arrive.expect_tx"):
        bar, tx = args(r"mbarrier\.arrive\.expect_tx\.shared::cta\.b64 _, \[(%\d+)\], (%\d+);")
        return f"{E}mbar_arrive({bar}, {tx});"
    if t.startswith("mbarrier.arrive.shared"):
        (bar,) = args(r"mbarrier\.arrive\.shared::cta\.b64 _, \[(%\d+)\];")
        return f"{E}mbar_arrive({bar}, 0u);"
    if "mbarrier.try_wait.parity" in t:
        bar, parity = args(r"mbarrier\.try_wait\.parity\.shared::cta\.b64 p, \[(%\d+)\], (%\d+);")
        done = op(re.search(r"selp\.u32 (%\d+)", t)[1])
        return f"{done} = {E}mbar_try_wait({bar}, {parity});"
    if t.startswith("cp.async.mbarrier.arrive.noinc"):
        (bar,) = args(r"cp\.async\.mbarrier\.arrive\.noinc\.shared::cta\.b64 \[(%\d+)\];")
        return f"{E}cp_async_mbar_arrive_noinc({bar});"
    if t.startswith("cp.async.bulk.tensor."):
        m = re.search(r"cp\.async\.bulk\.tensor\.(\d)d\.shared::cluster\.global\.tile\.mbarrier::complete_tx::bytes "
                      r"\[(%\d+)\], \[(%\d+), \{([^}]*)\}\], \[(%\d+)\];", t)
        if not m:
            raise AssertionError(f"cuda_emu: TMA load not understood: {t!r}")
        coords = [op(c) for c in m[4].split(",")] + ["0"] * (3 - int(m[1]))
        return f"{E}tma_load({op(m[2])}, (const void*){op(m[3])}, {', '.join(coords)}, {op(m[5])});"
    if t.startswith("tensormap.replace.tile.global_address"):
        addr, value = args(r"tensormap\.replace\.tile\.global_address\.shared::cta\.b1024\.b64 \[(%\d+)\], (%\d+);")
        return f"{E}tmap_replace_address({addr}, {value});"
    if t.startswith("tensormap.cp_fenceproxy"):
        dst, src = args(r"tensormap\.cp_fenceproxy\.\S+ \[(%\d+)\], \[(%\d+)\], 128;")
        return f"{E}tmap_copy((void*){dst}, {src});"
    if t.startswith("cp.async.bulk.commit_group"):
        return f"{E}bulk_commit();"
    if t.startswith("cp.async.bulk.wait_group"):
        (n,) = args(r"cp\.async\.bulk\.wait_group(?:\.read)? (\S+);")
        return f"{E}bulk_wait({n});"
    if t.startswith("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32"):
        dst, src, nbytes = args(r"add\.f32 \[(%\d+)\], \[(%\d+)\], (%\d+);")
        return f"{E}bulk_reduce_add_f32((float*){dst}, {src}, {nbytes});"
    if t.startswith("cp.async.ca.shared.global"):
        dst, src = args(r"cp\.async\.ca\.shared\.global \[(%\d+)\], \[(%\d+)\], 4;")
        return f"{E}cp_async4({dst}, (const void*){src});"
    raise AssertionError(f"cuda_emu: no emulation for the PTX {t!r}")


def translate(text: str) -> str:
    """text with every asm statement replaced by its emulation (see the top)."""
    pieces, pos = [], 0
    while True:
        m = _ASM.search(text, pos)
        if not m:
            pieces.append(text[pos:])
            return "".join(pieces)
        close = _matching_paren(text, m.end() - 1)
        inner = text[m.end():close]
        strings = _STRING.match(inner.lstrip())
        if not strings:
            raise AssertionError(f"cuda_emu: asm without a template: {inner[:80]!r}")
        sections = _split_top(inner, ":")
        template = "".join(_STRING.findall(sections[0]))
        outs = _operands(sections[1]) if len(sections) > 1 else []
        ins = _operands(sections[2]) if len(sections) > 2 else []
        pieces.append(text[pos:m.start()])
        # One statement, as the asm was (`if (c) asm(...); else ...` stays valid); its ';' follows.
        pieces.append("do { " + _statement(template, outs, ins) + " } while (0)")
        pos = close + 1
