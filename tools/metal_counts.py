"""Counted work of our Metal attention forward vs MLX's steel attention,
through the instrumented emulation; rewrites the table in docs/metal.md.

    python tools/metal_counts.py              # N 4096, D 64 and 128, fp16 (a few minutes on 1 core)
    python tools/metal_counts.py --no-write --n 1024

See tests/metal_emu/counts.py for what is counted and how the grid is scaled.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from metal_emu import counts  # noqa: E402

if __name__ == "__main__":
    sys.exit(counts.main())
