// matmul2d on the CPU: a blocked, packed, multithreaded GEMM (Goto/BLIS
// loop order) whose packing routines decode each operand, fp8 included, into
// fp32 panels a block at a time.
//
// Compiled once per instruction set (MLXF_ISA = generic | avx2, see
// CMakeLists.txt). Products with at most FEW_ROWS output rows (decoding one
// token) stream B once per column block instead (few_rows below). Otherwise,
// for each chunk of up to ROW_CHUNK output rows and each block of NC columns,
// accumulating in an fp32 scratch block:
//
//   for pc in K step KC:                       (B block KC x NC, shared)
//     in parallel over (MC-row block, panel range):
//       pack A[ic:ic+MC, pc:pc+KC] -> fp32 panels of MR rows
//       for each B panel (NR columns of B[pc:pc+KC, jc:jc+NC]), packed to
//       fp32 by the first worker that reaches it:
//         C[MR x NR] (+)= A panel * B panel for every pair   (micro-kernel)
//       on the last pc: out = C * a_scale * b_scale, converted to out_dtype
//
// So an fp8 operand is never expanded beyond one KC x NC (B) or MC x KC (A)
// block, and every fp32 FMA runs in the register-blocked micro-kernel.
// A batched b with many batch entries runs one product per thread instead.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "thread_pool.h"

#ifndef MLXF_ISA
#error "MLXF_ISA must name the instruction-set namespace (generic or avx2)"
#endif

namespace mlxf {
namespace MLXF_ISA {

#include "cpu_simd.h"

namespace {

// Register block (MR x NR = 6 x 16: 12 accumulators of 8 floats) and cache
// blocks: an MC x KC A block stays in L2, a KC x NR B panel in L1, and the
// KC x NC B block in L2/L3.
constexpr int GEMM_MR = 6;
constexpr int GEMM_NR = 16;
constexpr int KC = 384;
constexpr int MC = 96;
constexpr int NC = 1024;
// Output rows per pass: the fp32 accumulator holds ROW_CHUNK x NC floats.
// (Accumulating there, at a padded row stride, and writing the output once
// measured faster than accumulating in a float32 output in place.)
constexpr int ROW_CHUNK = 1536;
constexpr int ACC_PAD = 16;  // keeps accumulator rows off 4 KiB-aliasing strides

// ---- fp8 decoding -------------------------------------------------------------

// float value of each fp8 code; matches mlx_flash.fp8.decode_table.
struct Fp8Table {
  float v[256];
  Fp8Table(int ebits, int mbits, int bias, bool has_inf) {
    for (int c = 0; c < 256; ++c) {
      const int e = (c >> mbits) & ((1 << ebits) - 1), m = c & ((1 << mbits) - 1);
      const float sign = (c & 0x80) ? -1.f : 1.f;
      float x = e == 0 ? std::ldexp((float)m, 1 - bias - mbits)
                       : std::ldexp((float)((1 << mbits) + m), e - bias - mbits);
      const bool top = e == (1 << ebits) - 1;
      if (has_inf && top) x = m == 0 ? INFINITY : NAN;
      if (!has_inf && top && m == (1 << mbits) - 1) x = NAN;
      v[c] = sign * x;
    }
  }
};

const float* fp8_table(MatType t) {
  static const Fp8Table e4m3(4, 3, 7, false), e5m2(5, 2, 15, true);
  return t == MatType::e4m3 ? e4m3.v : e5m2.v;
}

#if defined(__AVX2__) && defined(__F16C__)
// Contiguous fp8 codes to fp32, 8 at a time, through float16 bit patterns:
// an e5m2 code is the high byte of the float16 with the same value (inf and
// NaN included); an e4m3 code shifted into a float16's exponent/mantissa
// fields is its value times 2^-8 (normals and subnormals alike), so one
// multiply by 2^8 finishes it, and 0x7F / 0xFF are patched to NaN.
// Returns how many codes were decoded (a multiple of 8).
inline __m256 decode_fp8_8(const uint8_t* p, MatType t) {
  const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  if (t == MatType::e5m2) return _mm256_cvtph_ps(_mm_slli_epi16(c, 8));
  const __m128i magnitude = _mm_set1_epi16(0x7F);
  const __m128i mag = _mm_and_si128(c, magnitude);
  const __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(mag, 7));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
  const __m256 is_nan = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, magnitude)));
  return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), is_nan);
}

int decode_fp8_x8(const uint8_t* p, int n, MatType t, float* dst) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, decode_fp8_8(p + i, t));
  return i;
}

void decode_run(const void* base, int64_t off, int64_t stride, MatType t, int n, float* dst);

// 8 contiguous elements of a half-precision or fp8 operand as floats.
template <MatType T>
inline __m256 load8(const void* p, int64_t i) {
  if (T == MatType::f16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  if (T == MatType::bf16) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  return decode_fp8_8(static_cast<const uint8_t*>(p) + i, T);
}

// sum_k x[k] * w[k] for a contiguous run of a half-precision or fp8 operand,
// decoded straight into the FMAs (no staging): the one-token (M = 1) product
// through a weight row.
template <MatType T>
float dot_decoded(const float* x, const void* w, int64_t off, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8<T>(w, off + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8<T>(w, off + k + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8<T>(w, off + k + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8<T>(w, off + k + 24), s3);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8<T>(w, off + k), s0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  if (k < n) {
    float tail[8];
    decode_run(w, off + k, 1, T, n - k, tail);
    for (int i = 0; k + i < n; ++i) sum += x[k + i] * tail[i];
  }
  return sum;
}

using DotFn = float (*)(const float*, const void*, int64_t, int);
DotFn dot_for(MatType t) {
  switch (t) {
    case MatType::f16: return dot_decoded<MatType::f16>;
    case MatType::bf16: return dot_decoded<MatType::bf16>;
    case MatType::e4m3: return dot_decoded<MatType::e4m3>;
    case MatType::e5m2: return dot_decoded<MatType::e5m2>;
    default: return nullptr;
  }
}
#endif

// n elements p[0], p[stride], ... of type t, as fp32, into dst.
void decode_run(const void* base, int64_t off, int64_t stride, MatType t, int n, float* dst) {
  switch (t) {
    case MatType::f32: {
      const float* p = static_cast<const float*>(base) + off;
      if (stride == 1) {
        std::memcpy(dst, p, sizeof(float) * n);
      } else {
        for (int i = 0; i < n; ++i) dst[i] = p[i * stride];
      }
      return;
    }
    case MatType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      int i = 0;
#if defined(__F16C__)
      if (stride == 1)
        for (; i + 8 <= n; i += 8)
          _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
      for (; i < n; ++i) dst[i] = half_to_float(p[i * stride]);
      return;
    }
    case MatType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i * stride]);
      return;
    }
    default: {
      const uint8_t* p = static_cast<const uint8_t*>(base) + off;
      int i = 0;
#if defined(__AVX2__) && defined(__F16C__)
      if (stride == 1) i = decode_fp8_x8(p, n, t, dst);
#endif
      const float* lut = fp8_table(t);
      for (; i < n; ++i) dst[i] = lut[p[i * stride]];
      return;
    }
  }
}

// ---- packing --------------------------------------------------------------------

// Output rows are numbered over the whole call; row r of group g is
// (batch entry, row) = (g, r) when b is batched, else (r / M, r % M).
struct RowMap {
  int M;
  bool flat;  // b shared by all batch entries: rows run over batch * M
  int group;
  void locate(int64_t r, int64_t* batch, int64_t* row) const {
    if (flat) {
      *batch = r / M;
      *row = r % M;
    } else {
      *batch = group;
      *row = r;
    }
  }
};

// A rows [r0, r0 + mc) x cols [k0, k0 + kc) into panels of GEMM_MR rows:
// element (r, k) at dst[(r / MR) * kc * MR + k * MR + r % MR]; rows past mc are 0.
void pack_a(const MatView& a, const RowMap& rows, int64_t r0, int mc, int k0, int kc, float* dst, float* tmp) {
  for (int p = 0; p < mc; p += GEMM_MR) {
    float* panel = dst + (int64_t)p / GEMM_MR * kc * GEMM_MR;
    const int live = std::min(GEMM_MR, mc - p);
    for (int r = 0; r < GEMM_MR; ++r) {
      if (r >= live) {
        for (int k = 0; k < kc; ++k) panel[k * GEMM_MR + r] = 0.f;
        continue;
      }
      int64_t bi, i;
      rows.locate(r0 + p + r, &bi, &i);
      decode_run(a.data, bi * a.sb + i * a.sr + (int64_t)k0 * a.sc, a.sc, a.type, kc, tmp);
      for (int k = 0; k < kc; ++k) panel[k * GEMM_MR + r] = tmp[k];
    }
  }
}

// One panel of B: rows [k0, k0 + kc) x cols [j0, j0 + GEMM_NR) of batch entry
// g, element (k, j) at dst[k * NR + j - j0]; columns at or past N are 0.
void pack_b_panel(const MatView& b, int64_t g, int N, int k0, int kc, int j0, float* dst, float* tmp) {
  const int live = std::min(GEMM_NR, N - j0);
  const int64_t base = g * b.sb + (int64_t)k0 * b.sr + (int64_t)j0 * b.sc;
  if (b.sc == 1 && live == GEMM_NR) {  // row-major [K, N]: 16 contiguous values per k
    for (int k = 0; k < kc; ++k) decode_run(b.data, base + k * b.sr, 1, b.type, GEMM_NR, dst + k * GEMM_NR);
    return;
  }
  // Column by column (transpose_b, i.e. an [N, K] weight, reads contiguous k).
  for (int j = 0; j < GEMM_NR; ++j) {
    if (j >= live) {
      for (int k = 0; k < kc; ++k) dst[k * GEMM_NR + j] = 0.f;
      continue;
    }
    decode_run(b.data, base + j * b.sc, b.sr, b.type, kc, tmp);
    for (int k = 0; k < kc; ++k) dst[k * GEMM_NR + j] = tmp[k];
  }
}

// ---- micro-kernel ---------------------------------------------------------------

// C[MR x NR] (+)= A panel (kc x MR) * B panel (kc x NR), row stride ldc.
#if defined(__AVX2__) && defined(__FMA__)
void micro_6x16(int kc, const float* A, const float* B, float* C, int64_t ldc, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  // The C tile is touched only after the k loop: start fetching it now.
  for (int r = 0; r < GEMM_MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + GEMM_NR - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
    __m256 a = _mm256_broadcast_ss(A + 0);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(A + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(A + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    A += GEMM_MR;
    B += GEMM_NR;
  }
  const __m256 acc[GEMM_MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < GEMM_MR; ++r) {
    float* c = C + r * ldc;
    __m256 lo = acc[r][0], hi = acc[r][1];
    if (accumulate) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, lo);
    _mm256_storeu_ps(c + 8, hi);
  }
}
#else
void micro_6x16(int kc, const float* A, const float* B, float* C, int64_t ldc, bool accumulate) {
  vf c0[GEMM_MR] = {}, c1[GEMM_MR] = {};
  for (int k = 0; k < kc; ++k) {
    const vf b0 = loadu(B), b1 = loadu(B + VL);
    for (int r = 0; r < GEMM_MR; ++r) {
      const vf a = splat(A[r]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
    A += GEMM_MR;
    B += GEMM_NR;
  }
  for (int r = 0; r < GEMM_MR; ++r) {
    float* c = C + r * ldc;
    storeu(c, accumulate ? c0[r] + loadu(c) : c0[r]);
    storeu(c + VL, accumulate ? c1[r] + loadu(c + VL) : c1[r]);
  }
}
#endif

// The micro-kernel on a tile that may hang over the edge of C (rows, cols live).
void micro_edge(int kc, const float* A, const float* B, float* C, int64_t ldc, bool accumulate, int rows,
                int cols) {
  if (rows == GEMM_MR && cols == GEMM_NR) return micro_6x16(kc, A, B, C, ldc, accumulate);
  alignas(32) float tile[GEMM_MR * GEMM_NR];
  micro_6x16(kc, A, B, tile, GEMM_NR, false);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) C[r * ldc + j] = (accumulate ? C[r * ldc + j] : 0.f) + tile[r * GEMM_NR + j];
}

// n floats to out[off...] converted to `t`.
void store_run(const float* src, int n, void* out, int64_t off, DType t) {
  if (t == DType::f32) {
    std::memcpy(static_cast<float*>(out) + off, src, sizeof(float) * n);
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(out) + off;
  int j = 0;
#if defined(__F16C__)
  if (t == DType::f16)
    for (; j + 8 <= n; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), 0));
#endif
  for (; j < n; ++j) dst[j] = t == DType::f16 ? float_to_half(src[j]) : float_to_bf16(src[j]);
}

// ---- the blocked product ----------------------------------------------------------

// Scratch floats from MLX's allocator, starting on a 64-byte boundary
// (cache-line aligned panels) and not zero-filled: every use below writes
// before it reads.
struct AlignedScratch {
  void* handle = nullptr;
  float* p;
  explicit AlignedScratch(size_t n) {
    void* raw = scratch_alloc((n + 16) * sizeof(float), &handle);
    p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t(63));
  }
  ~AlignedScratch() { scratch_free(handle); }
  AlignedScratch(const AlignedScratch&) = delete;
  AlignedScratch& operator=(const AlignedScratch&) = delete;
};

// Per-thread scratch: an A block and one decoded row.
struct WorkerScratch {
  AlignedScratch a_block{(size_t)MC * KC};
  AlignedScratch row{(size_t)std::max(KC, GEMM_NR)};
};

struct Gemm {
  const MatmulArgs& args;
  RowMap rows;
  int64_t row0 = 0, n_rows = 0;  // this pass's output rows
  int jc = 0, nc = 0;            // this pass's column block
  int pc = 0, kc = 0;            // current K block
  bool last_k = false;
  float* b_block = nullptr;      // packed [panels][kc][NR]
  float* acc = nullptr;          // fp32 accumulator [n_rows x nc] of this pass
  int64_t acc_ld = 0;            // its row stride
  int ic_blocks = 0, block_rows = 0, splits = 0, panels = 0;
  WorkerScratch* scratch = nullptr;
  std::atomic<int>* panel_state = nullptr;  // per panel of the B block, see b_panel

  float* acc_at(int64_t r, int j) const { return acc + (r - row0) * acc_ld + j; }

  // Panel p of the current B block, packed by the first worker that needs
  // it (state 0: not packed, 1: being packed, 2: ready). Packing on demand
  // inside the compute phase saves a second synchronised phase per K block.
  const float* b_panel(int p, WorkerScratch& ws) {
    float* dst = b_block + (int64_t)p * kc * GEMM_NR;
    std::atomic<int>& state = panel_state[p];
    if (state.load(std::memory_order_acquire) == 2) return dst;
    int expected = 0;
    if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      pack_b_panel(args.b, args.b_batched ? rows.group : 0, args.N, pc, kc, jc + p * GEMM_NR, dst, ws.row.p);
      state.store(2, std::memory_order_release);
      return dst;
    }
    while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
    return dst;
  }

  void compute(int64_t task, int worker) {
    const int ib = (int)(task / splits), split = (int)(task % splits);
    const int64_t r0 = row0 + (int64_t)ib * block_rows;
    const int mc = (int)std::min<int64_t>(block_rows, row0 + n_rows - r0);
    const int p_begin = (int)((int64_t)panels * split / splits), p_end = (int)((int64_t)panels * (split + 1) / splits);
    if (p_begin == p_end) return;
    WorkerScratch& ws = scratch[worker];
    pack_a(args.a, rows, r0, mc, pc, kc, ws.a_block.p, ws.row.p);
    // Tasks on odd row blocks start halfway along the panels, so two workers
    // rarely wait for the same panel to be packed.
    const int range = p_end - p_begin, start = (ib % 2) * (range / 2);
    for (int step = 0; step < range; ++step) {
      const int p = p_begin + (start + step) % range;
      const float* bp = b_panel(p, ws);
      const int cols = std::min(GEMM_NR, nc - p * GEMM_NR);
      for (int i = 0; i < mc; i += GEMM_MR) {
        micro_edge(kc, ws.a_block.p + (int64_t)i * kc, bp, acc_at(r0 + i, p * GEMM_NR), acc_ld, pc > 0,
                   std::min(GEMM_MR, mc - i), cols);
      }
    }
    if (last_k) finish(r0, mc, p_begin * GEMM_NR, std::min(nc, p_end * GEMM_NR));
  }

  // Scales and dtype conversion of rows [r0, r0 + mc) x block columns [j0, j1).
  void finish(int64_t r0, int mc, int j0, int j1) {
    alignas(32) float row[NC];
    for (int64_t r = r0; r < r0 + mc; ++r) {
      int64_t bi, i;
      rows.locate(r, &bi, &i);
      const float sa = args.a_scale ? args.a_scale[bi * args.a_scale_sb + i * args.a_scale_sr] : 1.f;
      const float* c = acc_at(r, 0);
      const int64_t out_row = (rows.flat ? r : (int64_t)rows.group * args.M + r) * args.N + jc;
      if (args.b_scale) {
        for (int j = j0; j < j1; ++j) row[j - j0] = c[j] * sa * args.b_scale[(int64_t)(jc + j) * args.b_scale_sc];
      } else {
        for (int j = j0; j < j1; ++j) row[j - j0] = c[j] * sa;
      }
      store_run(row, j1 - j0, args.out, out_row + j0, args.out_dtype);
    }
  }
};

void zero_output(const MatmulArgs& args) {
  const int64_t n = (int64_t)args.batch * args.M * args.N;
  for (int64_t i = 0; i < n; ++i) store_scalar(args.out, i, args.out_dtype, 0.f);
}

// ---- few rows (decode-time GEMV) ----------------------------------------------------
//
// With a handful of output rows, packing B into panels would cost as much as
// the product. Instead each task owns a block of output columns and streams
// its part of B once, decoding a run at a time and multiplying it into all
// rows of A (decoded to fp32 once, up front).
constexpr int FEW_ROWS = 8;
constexpr int GEMV_COLS = 64;   // output columns per task
constexpr int GEMV_RUN = 512;   // K elements decoded per run (transposed B)

// sum_k x[k] * y[k], with four independent accumulators (FMA latency).
inline float dot(const float* x, const float* y, int n) {
  vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int k = 0;
  for (; k + 4 * VL <= n; k += 4 * VL) {
    s0 += loadu(x + k) * loadu(y + k);
    s1 += loadu(x + k + VL) * loadu(y + k + VL);
    s2 += loadu(x + k + 2 * VL) * loadu(y + k + 2 * VL);
    s3 += loadu(x + k + 3 * VL) * loadu(y + k + 3 * VL);
  }
  for (; k + VL <= n; k += VL) s0 += loadu(x + k) * loadu(y + k);
  float sum = hsum((s0 + s1) + (s2 + s3));
  for (; k < n; ++k) sum += x[k] * y[k];
  return sum;
}

struct FewRows {
  const MatmulArgs& args;
  RowMap rows;
  int64_t n_rows;
  const float* x;  // [n_rows, K] fp32
  float* tmp;      // per worker, GEMV_RUN floats each

  float row_scale(int64_t r) const {
    if (!args.a_scale) return 1.f;
    int64_t bi, i;
    rows.locate(r, &bi, &i);
    return args.a_scale[bi * args.a_scale_sb + i * args.a_scale_sr];
  }
  int64_t out_offset(int64_t r) const { return (rows.flat ? r : (int64_t)rows.group * args.M + r) * args.N; }

  void run(int64_t task, int worker) {
    const MatView& b = args.b;
    const int64_t g = args.b_batched ? rows.group : 0;
    const int j0 = (int)task * GEMV_COLS, nc = std::min(GEMV_COLS, args.N - j0), K = args.K;
    float acc[FEW_ROWS][GEMV_COLS];
    float* run = tmp + (int64_t)worker * GEMV_RUN;
    if (b.sr == 1) {  // [N, K] weight: each output column is a contiguous dot product
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
      if (n_rows == 1 && dot_for(b.type)) {
        const DotFn dot_row = dot_for(b.type);
        for (int j = 0; j < nc; ++j) acc[0][j] = dot_row(x, b.data, g * b.sb + (int64_t)(j0 + j) * b.sc, K);
        return store_columns(j0, nc, acc);
      }
#endif
      for (int j = 0; j < nc; ++j) {
        float sum[FEW_ROWS] = {};
        for (int k0 = 0; k0 < K; k0 += GEMV_RUN) {
          const int kc = std::min(GEMV_RUN, K - k0);
          decode_run(b.data, g * b.sb + (int64_t)(j0 + j) * b.sc + k0, 1, b.type, kc, run);
          for (int64_t r = 0; r < n_rows; ++r) sum[r] += dot(x + r * K + k0, run, kc);
        }
        for (int64_t r = 0; r < n_rows; ++r) acc[r][j] = sum[r];
      }
    } else {  // [K, N]: a run of columns per k, scaled by each row's x[k]
      for (int64_t r = 0; r < n_rows; ++r) std::fill(acc[r], acc[r] + nc, 0.f);
      for (int k = 0; k < K; ++k) {
        decode_run(b.data, g * b.sb + (int64_t)k * b.sr + (int64_t)j0 * b.sc, b.sc, b.type, nc, run);
        for (int64_t r = 0; r < n_rows; ++r) {
          const float xk = x[r * K + k];
          for (int j = 0; j < nc; ++j) acc[r][j] += xk * run[j];
        }
      }
    }
    store_columns(j0, nc, acc);
  }

  // acc[r][j] * a_scale * b_scale -> out, for output columns [j0, j0 + nc).
  void store_columns(int j0, int nc, float (*acc)[GEMV_COLS]) const {
    for (int64_t r = 0; r < n_rows; ++r) {
      const float sa = row_scale(r);
      for (int j = 0; j < nc; ++j) {
        const float sb = args.b_scale ? args.b_scale[(int64_t)(j0 + j) * args.b_scale_sc] : 1.f;
        acc[r][j] *= sa * sb;
      }
      store_run(acc[r], nc, args.out, out_offset(r) + j0, args.out_dtype);
    }
  }
};

void few_rows(const MatmulArgs& args, int group, int64_t n_rows) {
  RowMap rows{args.M, !args.b_batched, group};
  AlignedScratch x((size_t)n_rows * args.K);
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t bi, i;
    rows.locate(r, &bi, &i);
    decode_run(args.a.data, bi * args.a.sb + i * args.a.sr, args.a.sc, args.a.type, args.K, x.p + r * args.K);
  }
  static_assert(GEMV_RUN >= GEMV_COLS, "a run buffer also holds one row of a column block");
  AlignedScratch tmp((size_t)num_workers() * GEMV_RUN);
  FewRows job{args, rows, n_rows, x.p, tmp.p};
  auto task = [&](int64_t t, int worker) { job.run(t, worker); };
  parallel_tasks((args.N + GEMV_COLS - 1) / GEMV_COLS, task);
}


// The blocked product for one group (batch entry of a batched b, or all
// rows when b is shared), with `workers` threads.
void gemm_group(const MatmulArgs& args, int g, int workers) {
  const int64_t rows_per_group = args.b_batched ? args.M : (int64_t)args.batch * args.M;
  std::vector<WorkerScratch> scratch(workers);
  const int64_t chunk = std::min<int64_t>(ROW_CHUNK, rows_per_group);
  const int acc_ld = round_up(std::min(NC, args.N), GEMM_NR) + ACC_PAD;
  AlignedScratch b_block((size_t)KC * round_up(std::min(NC, args.N), GEMM_NR));
  AlignedScratch acc((size_t)chunk * acc_ld);
  std::unique_ptr<std::atomic<int>[]> panel_state(new std::atomic<int>[NC / GEMM_NR]);

  Gemm gemm{args};
  gemm.rows = RowMap{args.M, !args.b_batched, g};
  gemm.b_block = b_block.p;
  gemm.acc = acc.p;
  gemm.acc_ld = acc_ld;
  gemm.scratch = scratch.data();
  gemm.panel_state = panel_state.get();
  for (int64_t row0 = 0; row0 < rows_per_group; row0 += chunk) {
    gemm.row0 = row0;
    gemm.n_rows = std::min(chunk, rows_per_group - row0);
    // Row blocks of at most MC rows, as many as a multiple of the workers
    // so that each synchronised phase ends with every worker busy.
    const int64_t blocks = (gemm.n_rows + MC - 1) / MC;
    const int64_t even = blocks >= workers ? (blocks + workers - 1) / workers * workers : blocks;
    gemm.block_rows = (int)std::min<int64_t>(MC, round_up((int)((gemm.n_rows + even - 1) / even), GEMM_MR));
    gemm.ic_blocks = (int)((gemm.n_rows + gemm.block_rows - 1) / gemm.block_rows);
    for (int jc = 0; jc < args.N; jc += NC) {
      gemm.jc = jc;
      gemm.nc = std::min(NC, args.N - jc);
      gemm.panels = (gemm.nc + GEMM_NR - 1) / GEMM_NR;
      // Few row blocks: split the panels too, so every worker has tasks.
      const int want = workers == 1 ? 1 : 4 * workers;
      gemm.splits = gemm.ic_blocks >= want ? 1 : std::min(gemm.panels, (want + gemm.ic_blocks - 1) / gemm.ic_blocks);
      for (int pc = 0; pc < args.K; pc += KC) {
        gemm.pc = pc;
        gemm.kc = std::min(KC, args.K - pc);
        gemm.last_k = pc + KC >= args.K;
        for (int p = 0; p < gemm.panels; ++p) panel_state[p].store(0, std::memory_order_relaxed);
        auto compute = [&](int64_t task, int worker) { gemm.compute(task, worker); };
        parallel_tasks((int64_t)gemm.ic_blocks * gemm.splits, compute);
      }
    }
  }
}

}  // namespace

void matmul2d(const MatmulArgs& args) {
  if (args.batch == 0 || args.M == 0 || args.N == 0) return;
  if (args.K == 0) return zero_output(args);
  const int workers = num_workers();
  const int groups = args.b_batched ? args.batch : 1;
  const int64_t rows_per_group = args.b_batched ? args.M : (int64_t)args.batch * args.M;
  const bool few = rows_per_group <= FEW_ROWS && (args.b.sr == 1 || args.b.sc == 1);
  if (groups >= 2 * workers) {
    // Many independent products (batched b): one per task, each on one
    // thread (a pool call from inside a task runs inline on its worker).
    auto one = [&](int64_t g, int) { few ? few_rows(args, (int)g, rows_per_group) : gemm_group(args, (int)g, 1); };
    parallel_tasks(groups, one);
    return;
  }
  for (int g = 0; g < groups; ++g) few ? few_rows(args, g, rows_per_group) : gemm_group(args, g, workers);
}

}  // namespace MLXF_ISA
}  // namespace mlxf
