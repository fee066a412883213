// Small SIMD toolkit for the CPU kernels: an 8-float vector, dtype
// conversion, a vectorised exp and the one micro-GEMM every product uses.
//
// Included only by the per-ISA kernel sources, inside their namespace, so
// every function here is compiled once per instruction set and never shared.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

#if defined(__AVX512F__)
// 16 floats: one AVX-512 register.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int VL = 16;
#else
// 8 floats; GCC/Clang lower it to one AVX register, two SSE or two NEON ones.
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int VL = 8;
#endif

inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// (An initializer list, not vf{} + x: adding 0 is not a no-op for -0.0, so the
// compiler would emit an add before every broadcast.)
#if defined(__AVX512F__)
inline vf splat(float x) { return (vf)_mm512_set1_ps(x); }
#else
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
#endif

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < VL; ++l) s += v[l];
  return s;
}
// Largest of n floats, n a multiple of VL.
inline float row_max_of(const float* x, int n) {
  vf m = splat(-__builtin_inff());
  for (int c = 0; c < n; c += VL) m = vmax(m, loadu(x + c));
  float r = m[0];
  for (int l = 1; l < VL; ++l) r = r > m[l] ? r : m[l];
  return r;
}

// ---- dtype conversion -------------------------------------------------------

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | (uint32_t)(112 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, 0);  // round to nearest even
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);  // inf / nan
  if (ax >= 0x477ff000u) return sign | 0x7c00;                                    // overflow -> inf
  if (ax < 0x38800000u) {                                                         // subnormal or zero
    if (ax < 0x33000000u) return sign;
    uint32_t man = (ax & 0x7fffff) | 0x800000, shift = 126 - (ax >> 23);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return sign | half;
  }
  uint32_t half = ((ax - 0x38000000u) >> 13), rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;
  return sign | half;
#endif
}

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40;  // quiet nan
  x += 0x7fff + ((x >> 16) & 1);                                   // round to nearest even
  return x >> 16;
}

inline float load_scalar(const void* p, int64_t i, mlxf::DType t) {
  switch (t) {
    case mlxf::DType::f16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case mlxf::DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_scalar(void* p, int64_t i, mlxf::DType t, float x) {
  switch (t) {
    case mlxf::DType::f16: static_cast<uint16_t*>(p)[i] = float_to_half(x); break;
    case mlxf::DType::bf16: static_cast<uint16_t*>(p)[i] = float_to_bf16(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

// n elements of a strided row, converted to fp32 and multiplied by mul.
// Contiguous rows (the common case) take loops the compiler vectorises.
inline void load_row(const void* p, int64_t off, int64_t stride, mlxf::DType t, int n, float mul, float* dst) {
  if (stride != 1) {
    for (int i = 0; i < n; ++i) dst[i] = load_scalar(p, off + i * stride, t) * mul;
    return;
  }
  switch (t) {
    case mlxf::DType::f32: {
      const float* s = static_cast<const float*>(p) + off;
      for (int i = 0; i < n; ++i) dst[i] = s[i] * mul;
      break;
    }
    case mlxf::DType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(p) + off;
      for (int i = 0; i < n; ++i) {
        const uint32_t bits = (uint32_t)s[i] << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        dst[i] = f * mul;
      }
      break;
    }
    case mlxf::DType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(p) + off;
      int i = 0;
#if defined(__F16C__)
      const __m256 m = _mm256_set1_ps(mul);
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(m, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i)))));
#endif
      for (; i < n; ++i) dst[i] = half_to_float(s[i]) * mul;
      break;
    }
  }
}

// ---- exp ----------------------------------------------------------------------

// e^x for a vector, ~1 ulp on the range softmax uses; exp(-inf) = 0.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f), hi = splat(88.3762626647949f);
  vi underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // x = n ln2 + r, |r| <= ln2 / 2; n rounded by the 1.5 * 2^23 trick.
  const vf magic = splat(12582912.f);
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * r * r + r + splat(1.f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  vf y = p * scale;
  vi bits;
  std::memcpy(&bits, &y, sizeof(bits));
  bits &= ~underflow;
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

// ---- GEMM ---------------------------------------------------------------------
//
// C[M x N] (+)= A[M x K] * B[K x N].
// A: element (i, k) at A[i * a_rs + k * a_cs] (row- or column-major tiles).
// B: packed in panels of NR columns: element (k, j) at
//    B[(j / NR) * b_ps + k * NR + j % NR]. N must be a multiple of NR.
// C: row-major with leading dimension ldc.
// Micro-tile MR x NR = MR rows x two vectors: 6 x 16 with AVX2's 16
// registers (12 accumulators), 8 x 32 with AVX-512's 32 (16 accumulators).
constexpr int NR = 2 * VL;
#if defined(__AVX512F__)
constexpr int MR = 8;
#else
constexpr int MR = 6;
#endif

template <int R>
inline void micro_kernel(int K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, float* C,
                         int64_t ldc, bool accumulate) {
  vf c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c0[r] = accumulate ? loadu(C + r * ldc) : vf{};
    c1[r] = accumulate ? loadu(C + r * ldc + VL) : vf{};
  }
  for (int k = 0; k < K; ++k) {
    const vf b0 = loadu(B + k * NR), b1 = loadu(B + k * NR + VL);
    const float* a = A + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf av = splat(a[r * a_rs]);
      c0[r] += av * b0;
      c1[r] += av * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    storeu(C + r * ldc, c0[r]);
    storeu(C + r * ldc + VL, c1[r]);
  }
}

inline void gemm(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                 int64_t b_ps, float* C, int64_t ldc, bool accumulate) {
  for (int j = 0; j < N; j += NR) {
    const float* Bp = B + (j / NR) * b_ps;
    float* Cj = C + j;
    int i = 0;
    for (; i + MR <= M; i += MR) micro_kernel<MR>(K, A + i * a_rs, a_rs, a_cs, Bp, Cj + i * ldc, ldc, accumulate);
    const float* Ai = A + i * a_rs;
    float* Ci = Cj + i * ldc;
    switch (M - i) {
      case 7: micro_kernel<7>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 6: micro_kernel<6>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 5: micro_kernel<5>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 4: micro_kernel<4>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 3: micro_kernel<3>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 2: micro_kernel<2>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      case 1: micro_kernel<1>(K, Ai, a_rs, a_cs, Bp, Ci, ldc, accumulate); break;
      default: break;
    }
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// fp32 scratch owned by one scope, from MLX's allocator (zero-filled by default).
struct Scratch {
  float* p = nullptr;
  void* handle = nullptr;
  // zero=false for buffers every use writes before reading.
  explicit Scratch(size_t n, bool zero = true) {
    const size_t bytes = (n > 0 ? n : 1) * sizeof(float);
    p = static_cast<float*>(mlxf::scratch_alloc(bytes, &handle));
    if (zero) std::memset(p, 0, bytes);
  }
  ~Scratch() { mlxf::scratch_free(handle); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};
