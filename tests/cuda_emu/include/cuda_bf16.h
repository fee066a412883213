// CUDA emulation (tests/cuda_emu): the parts of <cuda_bf16.h> the kernels use.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t bits = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    h.x = uint16_t((bits >> 16) | 0x40u);
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);
    h.x = uint16_t(bits >> 16);
  }
  return h;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
