// CUDA emulation (tests/cuda_emu): the parts of <cuda_fp8.h> the kernels use:
// paired fp8 -> half decoding (E4M3FN: bias 7, NaN 0x7F/0xFF; E5M2: the top
// byte of a half).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Conversions the fp8 decoders use (here: float2 is defined by cuda_emu.h, included first).
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

inline unsigned short __emu_fp8_to_half_bits(unsigned char c, __nv_fp8_interpretation_t fmt) {
  if (fmt == __NV_E5M2) return (unsigned short)(c << 8);
  const unsigned short sign = (unsigned short)((c & 0x80u) << 8);
  const unsigned e = (c >> 3) & 0xFu, m = c & 7u;
  if (e == 15 && m == 7) return (unsigned short)(sign | 0x7E00u);
  if (e == 0) return (unsigned short)(sign | __float2half_rn(float(m) / 512.0f).x);
  return (unsigned short)(sign | ((e + 8) << 10) | (m << 7));
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(unsigned short two, __nv_fp8_interpretation_t fmt) {
  return __half2_raw{__emu_fp8_to_half_bits((unsigned char)(two & 0xFF), fmt),
                     __emu_fp8_to_half_bits((unsigned char)(two >> 8), fmt)};
}
