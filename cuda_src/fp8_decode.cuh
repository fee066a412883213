// fp8 codes (E4M3FN = 1, E5M2 = 2) decoded exactly to half or bfloat16 (every
// fp8 value is both), through the hardware's paired fp8 -> half conversion.
#pragma once

#include <cuda_fp8.h>

#include "mma.cuh"

namespace mlx_flash {

template <int FMT>
__device__ __forceinline__ __half2 fp8x2_to_half2(unsigned short two) {
  __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(two, FMT == 1 ? __NV_E4M3 : __NV_E5M2);
  return __half2(raw);
}

// 16 fp8 codes -> 16 values of C, as two 16-byte words.
template <typename C, int FMT>
__device__ __forceinline__ void decode16(const uint4& raw, uint4 (&outw)[2]) {
  const unsigned short* pairs = reinterpret_cast<const unsigned short*>(&raw);
  unsigned* dst = reinterpret_cast<unsigned*>(outw);
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    __half2 h = fp8x2_to_half2<FMT>(pairs[p]);
    if (MmaType<C>::is_bf16) {
      float2 f = __half22float2(h);
      __nv_bfloat162 bb = __float22bfloat162_rn(f);
      dst[p] = *reinterpret_cast<unsigned*>(&bb);
    } else {
      dst[p] = *reinterpret_cast<unsigned*>(&h);
    }
  }
}

}  // namespace mlx_flash
