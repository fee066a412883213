"""What metal_src/*.metal declare for the host: read from the sources themselves.

The .metal files are run through the C preprocessor (clang-19 -E: the
instantiation macros expand, comments go), with every include that is not a
metal_src/ file (<metal_stdlib>, MLX's kernel utils) replaced by an empty
file: only the text of metal_src/ matters here. From that text:

* `host_names()`: every kernel the metallib exports, by host name, with the
  function it instantiates and its template arguments;
* `kernel_buffers()`: each `[[kernel]]` function's `[[buffer(N)]]` parameters;
* `function_constants()`: `[[function_constant(N)]]` declarations, and
  `constants_used()`: which of them each kernel's body reads;
* `enum_values(name)`: the enumerators of an enum (Feature, IntParam, ...).

Nothing is hard-coded about which kernels or buffers exist, so the check in
tests/test_metal_host_abi.py follows the sources as they change.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METAL_SRC = REPO / "metal_src"

_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


def preprocess(clang: str, sources: list[Path] | None = None) -> str:
    """The preprocessed text of `sources` (default: every metal_src/*.metal), joined."""
    sources = sources or sorted(METAL_SRC.glob("*.metal"))
    with tempfile.TemporaryDirectory(prefix="metal_pp.") as tmp:
        # Empty stand-ins for every include that metal_src/ does not provide.
        for f in METAL_SRC.iterdir():
            for name in _INCLUDE.findall(f.read_text()):
                if not (METAL_SRC / name).exists():
                    stub = Path(tmp) / name
                    stub.parent.mkdir(parents=True, exist_ok=True)
                    stub.touch()
        texts = []
        for src in sources:
            proc = subprocess.run(
                [clang, "-E", "-P", "-x", "c++", "-std=c++20", "-nostdinc", f"-I{METAL_SRC}", f"-I{tmp}", str(src)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cannot preprocess {src.name}:\n{proc.stderr[-3000:]}")
            texts.append(proc.stdout)
    return "\n".join(texts)


@dataclasses.dataclass(frozen=True)
class Instance:
    host_name: str
    function: str
    template_args: tuple[str, ...]


_HOST_NAME = re.compile(
    r"\[\[\s*host_name\(\s*((?:\"[^\"]*\"\s*)+)\)\s*\]\]\s*(?:\[\[\s*kernel\s*\]\]\s*)?"
    r"decltype\(\s*(\w+)\s*<([^>]*)>\s*\)"
)
_KERNEL = re.compile(r"\[\[\s*kernel\s*\]\]\s*void\s+(\w+)\s*\(")
_TEMPLATE_HEAD = re.compile(r"template\s*<([^>]*)>\s*$")


def _split_top_level(text: str, open_: str = "(<[", close: str = ")>]") -> list[str]:
    """`text` split at the commas outside any bracket pair."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in open_:
            depth += 1
        elif c in close:
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def host_names(text: str) -> dict[str, Instance]:
    """Host name -> instance, for templated kernels (`template [[host_name(..)]] ...`)
    and for plain `[[kernel]] void name(` ones (host name = function name)."""
    found: dict[str, Instance] = {}
    for m in _HOST_NAME.finditer(text):
        name = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
        if name in found:
            raise ValueError(f"host name {name} is instantiated twice")
        found[name] = Instance(name, m.group(2), tuple(_split_top_level(m.group(3))))
    for fn, _params, template, _body in _kernel_functions(text):
        if template is None:
            found.setdefault(fn, Instance(fn, fn, ()))
    return found


def _balanced(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one opened before `start`."""
    depth, i = 1, start
    while depth:
        depth += 1 if text[i] == open_ else -1 if text[i] == close else 0
        i += 1
    return i


def _kernel_functions(text: str):
    """(name, parameter text, template parameter text or None, body) of each [[kernel]] definition."""
    for m in _KERNEL.finditer(text):
        end = _balanced(text, m.end(), "(", ")")
        brace = text.index("{", end)
        body = text[brace + 1:_balanced(text, brace + 1, "{", "}") - 1]
        head = _TEMPLATE_HEAD.search(text[max(0, m.start() - 400):m.start()])
        yield m.group(1), text[m.end():end - 1], head.group(1) if head else None, body


def kernel_buffers(text: str) -> dict[str, dict[str, int]]:
    """[[kernel]] function name -> {parameter name: buffer index}."""
    out: dict[str, dict[str, int]] = {}
    for fn, params, _template, _body in _kernel_functions(text):
        buffers = {}
        for p in _split_top_level(params):
            m = re.search(r"(\w+)\s*\[\[\s*buffer\(\s*(\d+)\s*\)\s*\]\]", p)
            if m:
                buffers[m.group(1)] = int(m.group(2))
        out[fn] = buffers
    return out


def template_parameters(text: str) -> dict[str, list[str]]:
    """Templated [[kernel]] function name -> its template parameter names, in order."""
    out = {}
    for fn, _params, template, _body in _kernel_functions(text):
        if template is not None:
            out[fn] = [p.split()[-1] for p in _split_top_level(template)]
    return out


def constants_used(text: str) -> dict[str, set[str]]:
    """[[kernel]] function name -> the function constants its body names."""
    names = function_constants(text)
    return {fn: {c for c in names if re.search(rf"\b{c}\b", body)} for fn, _p, _t, body in _kernel_functions(text)}


def function_constants(text: str) -> dict[str, int]:
    """Function-constant name -> index."""
    pat = re.compile(r"(\w+)\s*\[\[\s*function_constant\(\s*(\d+)\s*\)\s*\]\]")
    return {m.group(1): int(m.group(2)) for m in pat.finditer(text)}


def enum_values(text: str, enum: str) -> dict[str, int]:
    """Enumerators of `enum <name> [: type] { ... }`, values evaluated as C does."""
    m = re.search(rf"\benum\s+(?:class\s+)?{enum}\s*(?::\s*\w+\s*)?\{{([^}}]*)\}}", text)
    if not m:
        raise KeyError(f"no enum {enum} in the Metal sources")
    values: dict[str, int] = {}
    nxt = 0
    for item in _split_top_level(m.group(1), "(", ")"):  # "<<" is an operator here
        name, _, expr = (s.strip() for s in item.partition("="))
        if expr:
            code = re.sub(r"\b[A-Za-z_]\w*\b", lambda t: str(values[t.group(0)]), expr)
            if not re.fullmatch(r"[\d\s+\-*()<>|&]+", code):
                raise ValueError(f"cannot evaluate {enum}::{name} = {expr}")
            nxt = int(eval(code))  # digits and operators only (checked above)
        values[name] = nxt
        nxt += 1
    return values
