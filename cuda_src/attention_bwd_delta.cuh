// delta_i = dO_i . O_i (- dlse_i): the row reduction every tensor-core
// backward reads (FlashAttention-2's D_i), in one pass over dO and O.
//
// Formed by MLX ops before, it cost a float32 copy of dO and of O, their
// product and a reduction: four launches and ~6x the bytes of dO + O. Here
// TPR threads share a row (8 for Dv <= 64, 16 up to 128, else 32), each
// reading 16-byte chunks of dO and O, so a warp covers 2-4 rows of the
// common head dims with every lane loading; head dims that are not multiples
// of 8 read element by element (whole warp per row).
#pragma once

#include "attention_common.cuh"

namespace mlx_flash {

template <int DV>
struct DeltaShape {
  static constexpr bool kVec = DV % 8 == 0;         // 16-byte chunks of 8 elements
  static constexpr int kChunks = kVec ? DV / 8 : DV;
  static constexpr int kTpr = !kVec ? 32 : kChunks > 16 ? 32 : kChunks > 8 ? 16 : 8;
};

// rows: the rows of dO / O ([rows][DV], contiguous); dlse: null or [rows].
template <typename T, int DV, bool HAS_DLSE>
__device__ void attention_bwd_delta(const T* dout, const T* out, const float* dlse, int rows, float* delta) {
  using S = DeltaShape<DV>;
  constexpr int TPR = S::kTpr;
  const long row = (long)blockIdx.x * (blockDim.x / TPR) + threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  float s = 0.f;
  if (row < rows) {
    const T* a = dout + row * DV;
    const T* b = out + row * DV;
    if constexpr (S::kVec) {
      for (int c = lane; c < S::kChunks; c += TPR) {
        const uint4 x = *reinterpret_cast<const uint4*>(a + 8 * c);
        const uint4 y = *reinterpret_cast<const uint4*>(b + 8 * c);
        const T* xe = reinterpret_cast<const T*>(&x);
        const T* ye = reinterpret_cast<const T*>(&y);
#pragma unroll
        for (int e = 0; e < 8; ++e) s = fmaf(to_float(xe[e]), to_float(ye[e]), s);
      }
    } else {
      for (int c = lane; c < DV; c += TPR) s = fmaf(to_float(a[c]), to_float(b[c]), s);
    }
  }
  // Every lane takes part (rows past the end add zeros): the groups of TPR
  // lanes are aligned within the warp, so xor offsets below TPR stay inside one.
#pragma unroll
  for (int off = TPR / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (row < rows && lane == 0) delta[row] = HAS_DLSE ? s - dlse[row] : s;
}

}  // namespace mlx_flash
