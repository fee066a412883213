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
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

// float -> fp8 with saturation to the largest finite value (the device's
// cvt.rn.satfinite): round to nearest even on the float32 bit pattern,
// subnormals by adding 2^23 (mlx_flash.fp8.encode's steps); inf saturates;
// NaN gives 0x7F (E4M3FN's NaN; an E5M2 NaN). Only __NV_SATFINITE is emulated.
inline unsigned char __nv_cvt_float_to_fp8(float v, __nv_saturation_t, __nv_fp8_interpretation_t fmt) {
  const int mb = fmt == __NV_E4M3 ? 3 : 2, bias = fmt == __NV_E4M3 ? 7 : 15;
  const int max_code = fmt == __NV_E4M3 ? 0x7E : 0x7B;
  unsigned bits;
  std::memcpy(&bits, &v, 4);
  const unsigned sign = (bits >> 24) & 0x80u;
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7F;
  unsigned u = bits & 0x7fffffffu;
  if (u > 0x7149F2CAu) u = 0x7149F2CAu;  // 1e30: inf and huge values saturate below
  float mag;
  std::memcpy(&mag, &u, 4);
  const int shift = 23 - mb;
  const unsigned rounded = (u + ((1u << (shift - 1)) - 1u) + ((u >> shift) & 1u)) >> shift;
  const int normal_code = static_cast<int>(rounded) - ((127 - bias) << mb);
  const float quantum = std::ldexp(1.0f, 1 - bias - mb), min_normal = std::ldexp(1.0f, 1 - bias);
  int code = mag < min_normal ? static_cast<int>((mag / quantum + 8388608.0f) - 8388608.0f) : normal_code;
  code = code < 0 ? 0 : (code > max_code ? max_code : code);
  return static_cast<unsigned char>(code | sign);
}
inline unsigned short __nv_cvt_float2_to_fp8x2(float2 x, __nv_saturation_t sat, __nv_fp8_interpretation_t fmt) {
  return static_cast<unsigned short>(__nv_cvt_float_to_fp8(x.x, sat, fmt) |
                                     (__nv_cvt_float_to_fp8(x.y, sat, fmt) << 8));
}

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
