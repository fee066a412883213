// CUDA emulation (tests/cuda_emu): the parts of <cuda_fp16.h> the kernels use.
// __half holds the IEEE binary16 bits; arithmetic goes through float, as the
// kernels never compute in half.
#pragma once
#include <cstring>

struct __half {
  unsigned short x;
};
struct __half2_raw {
  unsigned short x, y;
};
struct __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
  explicit __half2(__half2_raw r) : x{r.x}, y{r.y} {}
};

inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  _Float16 f = _Float16(x);  // round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
