"""Benchmarks of mlx_flash against its anchors (on the CPU: torch SDPA, mx.fast SDPA
and the machine's fp32 GEMM rate, with the performance targets of docs/performance_cpu.md).

`python -m mlx_flash.bench` runs the CPU attention sweep
(`cpu_attention.py`); `common.py` holds the timing, memory, machine,
GEMM-ceiling, progress and JSON helpers that every benchmark module shares,
and `plots.py` the matplotlib figures (optional `plots` extra).
"""
