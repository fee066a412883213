// MLX kernel header: the emulation folds what custom kernels need into mlx_preamble.h.
#pragma once
#include "mlx_preamble.h"
