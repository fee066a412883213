"""The CUDA kernels as MLX's NVRTC compiles them (tools/nvrtc_regs.py: the
wrappers' own launches, MLX 0.32's source assembly and NVRTC options,
sm_90a), where libnvrtc, cuobjdump, CUDA headers and MLX's device headers
(MLX_SRC) are found; skipped otherwise (CI has no NVRTC).

nvcc's counts (tests/test_cuda_specific.py, test_cuda_quant_emu.py) are not
MLX's: the quantized decode's (since removed) bounded ring took 126-138
registers under NVRTC where nvcc gave 118-120.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import nvrtc_regs as nr  # noqa: E402

pytestmark = pytest.mark.skipif(nr.unavailable_reason() is not None,
                                reason=f"NVRTC check unavailable: {nr.unavailable_reason()}")

def _measure(cases):
    items = nr.collect(cases)
    failed = [(label, ln) for label, ln in items if isinstance(ln, Exception)]
    assert not failed, failed
    headers = nr.mlx_device_headers()
    return [(label, ln, nr.measure(ln, headers)) for label, ln in items]


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


@pytest.mark.parametrize("case", [c[0] for c in nr.tiles_cases()])
def test_decode_tiles_no_spills_under_nvrtc(case):
    """The quantized decode's opt-in TILES 2 (up to 248 registers under nvcc) compiles under NVRTC without
    spills; one block of 4 warps an SM, as the register path's plan assumes, fits at any count up to 255."""
    for label, ln, r in _measure([c for c in nr.tiles_cases() if c[0] == case]):
        assert dict(ln.template)["TILES"] == 2 or dict(ln.template)["LATE"], label
        assert (r["spill_st"], r["spill_ld"], r["local"]) == (0, 0, 0), (label, r)
