"""`python -m mlx_flash.bench`: the CPU attention benchmark (see cpu_attention.py)."""

import sys

from .cpu_attention import main

sys.exit(main())
