"""One module per MLX backend, all with the same functions (see dispatch.py)."""
