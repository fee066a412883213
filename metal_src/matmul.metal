// Prebuilt matmul2d kernels for the metallib (macOS builds; see CMakeLists.txt).
// The JIT path (mx.fast.metal_kernel, mlx_flash/backends/metal_matmul.py)
// compiles the same matmul.h for any combination; these are the common ones,
// named mlxf_matmul2d_<a>_<b>_<out>[_t]_<tile> (_t: b given as [N, K]; tile:
// 32 or 64 outputs square per threadgroup).
#include "mlx/backend/metal/kernels/utils.h"

#include "matmul.h"

#define MLXF_MATMUL_KERNEL(NAME, TA, TB, TOUT, A_FMT, B_FMT, TRANSPOSE_B, TILE)                   \
  [[kernel]] void NAME(const device TA* a [[buffer(0)]], const device TB* b [[buffer(1)]],          \
                       const device float* a_scale [[buffer(2)]],                                     \
                       const device float* b_scale [[buffer(3)]],                                     \
                       const device int* params [[buffer(4)]], device TOUT* out [[buffer(5)]],        \
                       uint3 tile [[threadgroup_position_in_grid]],                                   \
                       uint simd_group [[simdgroup_index_in_threadgroup]],                            \
                       uint thread_index [[thread_index_in_threadgroup]]) {                           \
    threadgroup float smem[mlxf_mm_smem_floats(TILE)];                                                \
    matmul2d_tile<TOUT, A_FMT, B_FMT, TRANSPOSE_B, TILE, TILE>(a, b, a_scale, b_scale, params, out,   \
                                                               smem, tile, simd_group, thread_index); \
  }

#define MLXF_MATMUL_BOTH_LAYOUTS(A, B, OUT, TA, TB, TOUT, A_FMT, B_FMT)                                 \
  MLXF_MATMUL_KERNEL(mlxf_matmul2d_##A##_##B##_##OUT##_32, TA, TB, TOUT, A_FMT, B_FMT, false, 32)       \
  MLXF_MATMUL_KERNEL(mlxf_matmul2d_##A##_##B##_##OUT##_t_32, TA, TB, TOUT, A_FMT, B_FMT, true, 32)      \
  MLXF_MATMUL_KERNEL(mlxf_matmul2d_##A##_##B##_##OUT##_64, TA, TB, TOUT, A_FMT, B_FMT, false, 64)       \
  MLXF_MATMUL_KERNEL(mlxf_matmul2d_##A##_##B##_##OUT##_t_64, TA, TB, TOUT, A_FMT, B_FMT, true, 64)

// Float x float.
MLXF_MATMUL_BOTH_LAYOUTS(f32, f32, f32, float, float, float, MATMUL_FLOAT, MATMUL_FLOAT)
MLXF_MATMUL_BOTH_LAYOUTS(f16, f16, f16, half, half, half, MATMUL_FLOAT, MATMUL_FLOAT)
MLXF_MATMUL_BOTH_LAYOUTS(bf16, bf16, bf16, bfloat16_t, bfloat16_t, bfloat16_t, MATMUL_FLOAT, MATMUL_FLOAT)
// Activations x fp8 weights (the LLM case).
MLXF_MATMUL_BOTH_LAYOUTS(f16, e4m3, f16, half, uchar, half, MATMUL_FLOAT, MATMUL_E4M3)
MLXF_MATMUL_BOTH_LAYOUTS(bf16, e4m3, bf16, bfloat16_t, uchar, bfloat16_t, MATMUL_FLOAT, MATMUL_E4M3)
MLXF_MATMUL_BOTH_LAYOUTS(f16, e5m2, f16, half, uchar, half, MATMUL_FLOAT, MATMUL_E5M2)
MLXF_MATMUL_BOTH_LAYOUTS(bf16, e5m2, bf16, bfloat16_t, uchar, bfloat16_t, MATMUL_FLOAT, MATMUL_E5M2)
MLXF_MATMUL_BOTH_LAYOUTS(f32, e4m3, f32, float, uchar, float, MATMUL_FLOAT, MATMUL_E4M3)
// fp8 x fp8.
MLXF_MATMUL_BOTH_LAYOUTS(e4m3, e4m3, f32, uchar, uchar, float, MATMUL_E4M3, MATMUL_E4M3)
MLXF_MATMUL_BOTH_LAYOUTS(e4m3, e4m3, bf16, uchar, uchar, bfloat16_t, MATMUL_E4M3, MATMUL_E4M3)
