"""The CUDA kernels as MLX's NVRTC compiles them (tools/nvrtc_regs.py: the
wrappers' own launches, MLX 0.32's source assembly and NVRTC options,
sm_90a), where libnvrtc, cuobjdump, CUDA headers and MLX's device headers
(MLX_SRC) are found; skipped otherwise (CI has no NVRTC).

nvcc's counts (tests/test_cuda_specific.py, test_cuda_quant_emu.py) are not
MLX's: the quantized decode's ring took 126-138 registers under NVRTC where
nvcc gave 118-120, and its plan sized blocks from nvcc's count.
"""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import nvrtc_regs as nr  # noqa: E402

pytestmark = pytest.mark.skipif(nr.unavailable_reason() is not None,
                                reason=f"NVRTC check unavailable: {nr.unavailable_reason()}")

_SM_REGS = 65536


def _measure(cases):
    items = nr.collect(cases)
    failed = [(label, ln) for label, ln in items if isinstance(ln, Exception)]
    assert not failed, failed
    headers = nr.mlx_device_headers()
    return [(label, ln, nr.measure(ln, headers)) for label, ln in items]


def _alloc(regs: int) -> int:
    """Registers a thread holds on the SM: a warp's allocation comes in 256-register units."""
    return -(-regs // 8) * 8


@pytest.mark.parametrize("case", [c[0] for c in nr.ring_cases()])
def test_ring_bound_under_nvrtc(case):
    """Each ring instance within the registers its plan sizes blocks by
    (decode_ring_regs: the declared bound or the compilers' count), no
    spills; the bounded 8-warp ring fits two blocks an SM."""
    from mlx_flash.backends import cuda_quant as cq

    (label, ln, r), = _measure([c for c in nr.ring_cases() if c[0] == case])
    t = dict(ln.template)
    terms = (t["BITS"], max(t["D"], t["DV"]), t["SOFTCAP"] or t["WINDOW"] or t["SINKS"], t["KEYS_M"])
    assert t["STAGES"] > 0
    assert (r["spill_st"], r["spill_ld"], r["local"]) == (0, 0, 0), (label, r)
    planned = cq.ring_regs_bound(*terms)
    assert r["regs"] <= planned, (label, r["regs"], planned)
    threads = ln.threadgroup[0]
    # The blocks an SM the plan counts on are there under NVRTC's count.
    assert _SM_REGS // (threads * _alloc(r["regs"])) >= _SM_REGS // (threads * planned), (label, r)
    if cq.ring_bounded(*terms):
        included = re.search(r'#include "([^"]+)"', ln.header)
        text = open(included[1]).read() if included else ln.header
        assert f"__maxnreg__({cq._RING_MAXNREG})" in text, "the bounded ring's header carries its bound"
        if threads == 256:
            assert _SM_REGS // (threads * _alloc(r["regs"])) >= 2, (label, r)


# A finding of the survey (docs/cuda_decode.md): mending it changes a default route's code (needs a card).
# (D 96 spilled 8 bytes, causal 12, softcap 44, until its k-loops unrolled by 2.)
# (D 112 with softcap spilled 50/64 bytes at 255 registers until session 11, when attention_bwd_mma took
# the forward's fast tanh: 254 registers, no spills.)
_KNOWN_SPILLS: dict = {}
# (The Hopper backward at D 128 with a bool mask or ALiBi alone spilled 48 and 56/72 bytes until
# session 11: 32-bit Q / dO offsets, the K check before the loop, the head's ALiBi slope read per
# tile and kv_row read back from shared memory.)


@pytest.mark.parametrize("case", [pytest.param(c[0], marks=pytest.mark.xfail(strict=True, reason=_KNOWN_SPILLS[c[0]]))
                                  if c[0] in _KNOWN_SPILLS else c[0] for c in nr.routed_cases()])
def test_routed_no_spills_under_nvrtc(case):
    """Every default-routed instance the tool reaches compiles under NVRTC without spills."""
    for label, ln, r in _measure([c for c in nr.routed_cases() if c[0] == case]):
        assert (r["spill_st"], r["spill_ld"]) == (0, 0), (label, ln.name, r)
