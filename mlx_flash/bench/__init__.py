"""Benchmarks of mlx_flash against its anchors (issue 3 for the CPU).

`python -m mlx_flash.bench` runs the CPU attention sweep
(`cpu_attention.py`); `common.py` holds the timing, memory, machine,
GEMM-ceiling, progress and JSON helpers that every benchmark module shares,
and `plots.py` the matplotlib figures (optional `plots` extra).
"""
