// Rows of x quantized to fp8 codes, one scale a row: for row r,
// scale[r] = amax / max_finite (amax over the row's finite |x|; 1 where no
// finite value is nonzero; +inf where the row holds an inf, so the row's
// products come out non-finite instead of saturated) and codes[r][k] =
// encode(x[r][k] / scale[r]). The same arithmetic as mlx_flash.nn's
// _quantize_activations on MLX ops (fp8.quantize's, plus the inf rule),
// step for step (round to nearest even on the float32 bit pattern, subnormals
// by adding 2^23, saturating finite values; NaN to the format's NaN, inf to
// e5m2's inf or e4m3's largest finite value), so the codes and scales are
// those bits exactly. FP8Linear's activations (activations="e4m3") go through
// this before the native fp8 product: one block a row, two passes over the
// row (the second from L1/L2), where fp8.quantize is ~20 MLX kernels.
// Template: T (x's type), EB/MB/BIAS/MAXCODE/HASINF the format (fp8._format).
#pragma once

#include "attention_common.cuh"

namespace mlx_flash {

template <int MB, int BIAS, int MAXCODE, bool HASINF>
__device__ __forceinline__ uint8_t fp8_encode_scaled(float v) {
  const unsigned bits = __float_as_uint(v);
  const unsigned sign = (bits >> 24) & 0x80u;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const bool inf = (bits & 0x7fffffffu) == 0x7f800000u;
  float mag = __uint_as_float(bits & 0x7fffffffu);
  mag = nan ? 0.0f : (mag < 1e30f ? mag : 1e30f);
  constexpr int SHIFT = 23 - MB;
  const unsigned u = __float_as_uint(mag);
  const unsigned rounded = (u + ((1u << (SHIFT - 1)) - 1u) + ((u >> SHIFT) & 1u)) >> SHIFT;
  const int normal_code = static_cast<int>(rounded) - ((127 - BIAS) << MB);
  // 2^(1 - BIAS - MB): the smallest subnormal; mag / quantum is exact.
  const float inv_quantum = __uint_as_float(static_cast<unsigned>(127 - (1 - BIAS - MB)) << 23);
  const float sub = (mag * inv_quantum + 8388608.0f) - 8388608.0f;
  const float min_normal = __uint_as_float(static_cast<unsigned>(127 + 1 - BIAS) << 23);
  int code = mag < min_normal ? static_cast<int>(sub) : normal_code;
  code = code < 0 ? 0 : (code > MAXCODE ? MAXCODE : code);
  if (HASINF) {
    code = inf ? MAXCODE + 1 : code;
    code = nan ? MAXCODE + 3 : code;
  } else {
    code = nan ? 0x7F : code;
  }
  return static_cast<uint8_t>(code | sign);
}

// One block (QR_THREADS threads) a row of x [rows][K]: codes [rows][K], scale [rows].
// VEC values a load: 16 bytes of x (8 halves, 4 floats) and VEC codes a
// store where K is a multiple of VEC (the wrapper's choice; rows then start
// 16-byte aligned), else 1. In session 25's first form (one value a load) the
// kernel took 27 us at 2048 x 4096 fp16 on an H100, ~1 TB/s.
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

template <typename T, int VEC, int MB, int BIAS, int MAXCODE, bool HASINF>
__device__ void fp8_quantize_rows(const T* x, const int* ip, uint8_t* codes, float* scale) {
  const int K = ip[0];
  const float max_finite = __int_as_float(ip[1]);
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
  const float s = inf_seen ? __uint_as_float(0x7f800000u) : (amax > 0.0f ? __fdiv_rn(amax, max_finite) : 1.0f);
  if (tid == 0) scale[row] = s;
  uint8_t* cr = codes + static_cast<int64_t>(row) * K;
  for (int c = tid; c < chunks; c += QR_THREADS) {
    float v[VEC];
    qr_load<T, VEC>(xr + c * VEC, v);
    if constexpr (VEC == 1) {
      cr[c] = fp8_encode_scaled<MB, BIAS, MAXCODE, HASINF>(__fdiv_rn(v[0], s));
    } else {
      unsigned words[VEC / 4];
#pragma unroll
      for (int w = 0; w < VEC / 4; ++w) {
        unsigned word = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          word |= static_cast<unsigned>(fp8_encode_scaled<MB, BIAS, MAXCODE, HASINF>(__fdiv_rn(v[4 * w + j], s)))
                  << (8 * j);
        }
        words[w] = word;
      }
#pragma unroll
      for (int w = 0; w < VEC / 4; ++w) reinterpret_cast<unsigned*>(cr + c * VEC)[w] = words[w];
    }
  }
}

}  // namespace mlx_flash
