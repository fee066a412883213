"""CPU emulation of Metal compute kernels (see harness.py, docs/metal_emulation.md)."""
