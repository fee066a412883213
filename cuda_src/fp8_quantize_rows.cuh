// Rows of x quantized to fp8 codes, one scale a row (FP8Linear's quantized
// activations): for row r, with amax the largest finite |x| of the row,
//   scale[r] = amax / max_finite and codes[r][k] = cvt(x[r][k] * (max_finite / amax))
// (below amax 2^-64, x and amax first times 2^64, the scale times 2^-64),
// cvt the hardware's round-to-nearest-even, saturating conversion
// (cvt.rn.satfinite.e4m3x2.f32 / e5m2x2: finite values beyond the format's
// range become its largest, NaN its NaN). A row whose finite values are all
// zero gets scale 1 and factor 1; a row holding an inf gets scale +inf and
// factor 0 (its finite values encode as zeros, its infs as NaN), so its
// products come out non-finite instead of saturated. mlx_flash.nn's
// _quantize_activations computes the same on MLX ops (fp8.encode is that
// conversion wherever its input is finite).
// One block a row, two passes over the row (the second from L1/L2), 16 bytes
// of x a load where K allows. Session 25 on an H100 at 2048 x 4096 fp16: the
// first form (one value a load, an IEEE division and the bit-by-bit encode of
// fp8.encode per value) took 27 us; 16-byte loads 24 us; this form's one
// multiply and half a conversion instruction a value is what is left.
// Template: T (x's type), VEC (values a load: 16 bytes' worth, or 1), FMT (1 e4m3, 2 e5m2).
#pragma once

#include <cuda_fp8.h>

#include "attention_common.cuh"

namespace mlx_flash {

constexpr int QR_THREADS = 256;

template <typename T, int VEC>
__device__ __forceinline__ void qr_load(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "16 bytes a load");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(t[j]);
  }
}

template <typename T, int VEC, int FMT>
__device__ void fp8_quantize_rows(const T* x, const int* ip, uint8_t* codes, float* scale) {
  constexpr __nv_fp8_interpretation_t KIND = FMT == 1 ? __NV_E4M3 : __NV_E5M2;
  const int K = ip[0];
  constexpr float max_finite = FMT == 1 ? 448.0f : 57344.0f;  // the format's largest finite value
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const T* xr = x + static_cast<int64_t>(row) * K;
  const int chunks = K / VEC;
  float amax = 0.0f;
  int inf_seen = 0;
  for (int c = tid; c < chunks; c += QR_THREADS) {
    float v[VEC];
    qr_load<T, VEC>(xr + c * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const unsigned bits = __float_as_uint(v[j]) & 0x7fffffffu;
      if (bits < 0x7f800000u) amax = fmaxf(amax, __uint_as_float(bits));  // finite values only
      inf_seen |= bits == 0x7f800000u;
    }
  }
  inf_seen = __syncthreads_or(inf_seen);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  __shared__ float warp_max[QR_THREADS / 32];
  if (tid % 32 == 0) warp_max[tid / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < QR_THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const bool some = amax > 0.0f;
  // Rows whose amax is below 2^-64 (float32 inputs only) are first multiplied
  // by 2^64 (exact), so max_finite / amax cannot overflow to inf (an inf factor
  // would make the row's zeros NaN); the scale takes the 2^-64 back.
  const bool tiny = amax < __uint_as_float(0x1f800000u);
  const float pre = tiny ? __uint_as_float(0x5f800000u) : 1.0f;
  const float a2 = amax * pre;
  const float s = inf_seen ? __uint_as_float(0x7f800000u)
                           : (some ? __fdiv_rn(a2, max_finite) * (tiny ? __uint_as_float(0x1f800000u) : 1.0f) : 1.0f);
  const float f = inf_seen ? 0.0f : (some ? __fdiv_rn(max_finite, a2) : 1.0f);
  if (tid == 0) scale[row] = s;
  uint8_t* cr = codes + static_cast<int64_t>(row) * K;
  for (int c = tid; c < chunks; c += QR_THREADS) {
    float v[VEC];
    qr_load<T, VEC>(xr + c * VEC, v);
    if constexpr (VEC == 1) {
      cr[c] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v[0] * pre * f, __NV_SATFINITE, KIND));
    } else {
#pragma unroll
      for (int w = 0; w < VEC / 4; ++w) {
        const float f0 = v[4 * w] * pre * f, f1 = v[4 * w + 1] * pre * f;
        const float f2 = v[4 * w + 2] * pre * f, f3 = v[4 * w + 3] * pre * f;
        const unsigned lo = __nv_cvt_float2_to_fp8x2(make_float2(f0, f1), __NV_SATFINITE, KIND);
        const unsigned hi = __nv_cvt_float2_to_fp8x2(make_float2(f2, f3), __NV_SATFINITE, KIND);
        reinterpret_cast<unsigned*>(cr + c * VEC)[w] = (lo & 0xffffu) | (hi << 16);
      }
    }
  }
}

}  // namespace mlx_flash
