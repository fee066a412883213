// Decode over an affine-quantized K/V cache on tensor cores, one launch:
// attention_quant_decode. The common decode step (a few query rows per KV
// head: GQA heads x queries <= 8, 16-bit q, 4- or 8-bit cache, no mask or
// ALiBi) is bound by the bytes of the cache, not by arithmetic, once the
// arithmetic per byte is small; main's SIMT kernel (attention_quant.cuh) spends
// ~130 instructions per 4-bit key row per row group and is instruction-bound.
//
// Both products run on mma.sync m16n8k16 with the CODES (exact small integers
// in q's 16-bit type) as operands; scales and biases are applied in fp32
// outside the tensor cores, per quantization group:
//   q . k_j     = sum_g s_g(j) (q_g . c_g(j)) + b_g(j) sum(q_g)
//   sum_j p_j v_j[c] = sum_j (p_j s_g(j)) c_j[c] + sum_j p_j b_g(j)   (c in group g)
// so every k-step of S = Q K^T lies inside one group (its own accumulator),
// and every 16-column m-tile of O^T = V^T P^T lies inside one group (its B
// operand is P scaled by that group's scales). A code becomes a 16-bit value
// by two or three integer/16-bit ops: its bits OR the exponent of 1024 (fp16)
// or 128 (bf16), minus that constant (exact).
//
// Head dims are PERMUTED, consistently: q.k sums over d, so lane t (= lane % 4)
// of a K row owns whole words of each group (its B fragments), and Q's A
// fragments are loaded in the same order; lane g (= lane / 4) of a V row owns
// a contiguous run of GS/8 columns of each group, and the output is stored
// through the same map. Every cache word is loaded by exactly one lane.
//
// Layout (one warp, rows r < 8 = i * G + h: query i, group head h):
//   S  = Q K^T   A = Q (rows 8..15 zero), B = K^T codes: lane (g, t) holds
//                keys g and 8 + g of a 16-key tile; C: (row g, keys 2t, 2t+1,
//                8 + 2t, 9 + 2t)
//   O^T = V^T P^T  A = V^T codes: lane (g, t) holds keys 2t, 2t+1, 8 + 2t,
//                9 + 2t at its columns; B = P^T scaled, straight from S's C
//                fragment (no shuffle); C: (columns of lane g, rows 2t, 2t+1)
//
// Work split: grid (splits, 1, B * Hkv); a block's NW warps take interleaved
// 16-key tiles of the block's key range, merge in shared memory and write one
// unnormalised partial (o, m, l) per row to `scratch`; the last block of a
// (batch, KV head) to finish (an atomic counter in the zero-filled scratch)
// merges every split with the sink and writes out and lse. One launch.
//
// Non-finite contract (ARCHITECTURE.md): codes are finite, so only scales and
// biases carry NaN/inf. A dropped key contributes by select, never by
// multiplying (its P entry and bias term are 0 whatever its scales); a kept
// NaN/+inf logit makes its row NaN; NaN scales of kept V keys reach O by IEEE.
#pragma once

#include "attention_quant.cuh"

namespace mlx_flash {

// ---- bit helpers (PTX on the GPU; plain C++ in the CPU emulation) -------------
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ unsigned qd_perm(unsigned a, unsigned b, unsigned sel) { return __byte_perm(a, b, sel); }
template <bool BF16>
__device__ __forceinline__ unsigned qd_sub2(unsigned x, unsigned y) {
  unsigned r;
  if (BF16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    // sub.bf16x2 needs sm_90; x - y as fma(y, -1, x): one rounding, the same bits.
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(y), "r"(0xBF80BF80u), "r"(x));
#else
    asm("sub.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(y));
#endif
  } else {
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(y));
  }
  return r;
}
// x * y + z on fp16 pairs (exact where used: (1024 + 16 c) / 16 - 64).
__device__ __forceinline__ unsigned qd_fma2_f16(unsigned x, unsigned y, unsigned z) {
  unsigned r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(y), "r"(z));
  return r;
}
// (x & M) | C in one LOP3 (C++'s `(x & M) | C` compiles to two: SASS LOP3 takes one immediate).
template <unsigned M, unsigned C>
__device__ __forceinline__ unsigned qd_and_or(unsigned x) {
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(x), "n"(M), "n"(C));
  return r;
}
// The warp's 8x8 16-bit matrix (lane L: row L / 4, columns 2 (L % 4), +1) transposed, in registers.
__device__ __forceinline__ unsigned qd_movt(unsigned x) {
  unsigned r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}
__device__ __forceinline__ float qd_load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float4 qd_load_cg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ void qd_fence() { __threadfence(); }
// The L2 line holding p, requested (a hint: nothing waits on it). Per lane:
// the bulk form (cp.async.bulk.prefetch) takes a uniform address, which
// lanes with different segments would serialise.
__device__ __forceinline__ void qd_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
#else
inline unsigned qd_perm(unsigned a, unsigned b, unsigned sel) {
  const unsigned long long x = (unsigned long long)b << 32 | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((x >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
template <bool BF16>
inline float qd_half_bits(unsigned h) {
  if (BF16) return __uint_as_float(h << 16);
  return __half2float(__ushort_as_half((unsigned short)h));
}
template <bool BF16>
inline unsigned qd_sub2(unsigned x, unsigned y) {
  unsigned r = 0;
  for (int i = 0; i < 2; ++i) {
    const float d = qd_half_bits<BF16>((x >> (16 * i)) & 0xffffu) - qd_half_bits<BF16>((y >> (16 * i)) & 0xffffu);
    const unsigned bits = BF16 ? (__float_as_uint(d) >> 16) : (unsigned)__float2half_rn(d).x;  // exact here
    r |= bits << (16 * i);
  }
  return r;
}
inline unsigned qd_fma2_f16(unsigned x, unsigned y, unsigned z) {
  unsigned r = 0;
  for (int i = 0; i < 2; ++i) {
    const float d = qd_half_bits<false>((x >> (16 * i)) & 0xffffu) * qd_half_bits<false>((y >> (16 * i)) & 0xffffu) +
                    qd_half_bits<false>((z >> (16 * i)) & 0xffffu);
    r |= (unsigned)__float2half_rn(d).x << (16 * i);  // exact here
  }
  return r;
}
template <unsigned M, unsigned C>
inline unsigned qd_and_or(unsigned x) { return (x & M) | C; }
inline unsigned qd_movt(unsigned x) {
  EmuExchange e = __emu_simd_exchange(&x, sizeof(x), __LINE__);
  if (e.active_mask != 0xffffffffu) __emu_fail("movmatrix with an incomplete warp");
  const unsigned g = e.lane / 4, t = e.lane % 4;
  // Element (r, c) of the matrix is half c % 2 of lane 4 r + c / 2.
  auto el = [&](unsigned r, unsigned c) { return (__emu_lane_value<unsigned>(e, 4 * r + c / 2) >> (16 * (c % 2))) & 0xffffu; };
  return el(2 * t, g) | (el(2 * t + 1, g) << 16);
}
inline float qd_load_cg(const float* p) { return *p; }
inline float4 qd_load_cg4(const float* p) { return *reinterpret_cast<const float4*>(p); }
inline void qd_fence() {}
// A hint; the emulation reads the byte, so a line outside the cache would show under a sanitizer.
inline void qd_prefetch_l2(const void* p) { (void)*static_cast<const volatile unsigned char*>(p); }
struct alignas(8) uint2 {
  unsigned x, y;
};
#endif

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)

inline const void*& qd_emu_base() { static thread_local const void* b = nullptr; return b; }
inline void qd_check(const void* base, const void* p, long n, const char* what) {
  if (base == nullptr) base = qd_emu_base();
  const long off = (const char*)p - (const char*)base;
  if (off < 0 || off + n > (long)__emu_dynamic_smem_bytes) { __builtin_printf("QDCHECK %s off %ld n %ld size %ld\n", what, off, n, (long)__emu_dynamic_smem_bytes); __emu_fail(what); }
}
#define QD_CHECK(b, p, n, w) qd_check(b, p, n, w)
#else
#define QD_CHECK(b, p, n, w)
#endif
// A scale's raw bits (16-bit types zero-extended) as a float: LATE's conversion at stage time, RAW's offsets.
template <typename ST>
struct QdBits;
template <>
struct QdBits<__half> {
  __device__ __forceinline__ static float f(unsigned h) { return __half2float(__ushort_as_half((unsigned short)h)); }
};
template <>
struct QdBits<__nv_bfloat16> {
  __device__ __forceinline__ static float f(unsigned h) { return __uint_as_float(h << 16); }
};
template <>
struct QdBits<float> {
  __device__ __forceinline__ static float f(unsigned h) { return __uint_as_float(h); }
};
// Element i of a scale / bias array as its raw bits (16-bit types zero-extended), no conversion.
template <typename ST>
__device__ __forceinline__ unsigned qd_raw(const ST* p, long i) {
  if constexpr (sizeof(ST) == 2) return reinterpret_cast<const unsigned short*>(p)[i];
  else return reinterpret_cast<const unsigned*>(p)[i];
}
// Codes as 16-bit values: MAGIC | code is 1024 + code (fp16) or 128 + code
// (bf16, codes < 128); subtracting MAGIC is exact.
// LOP: the mask-and-magic of a code pair as one LOP3 (qd_and_or); the same values.
template <typename T, bool LOP = false>
struct QdCodes {
  static constexpr bool BF16 = MmaType<T>::is_bf16;
  static constexpr unsigned MAGIC = BF16 ? 0x43004300u : 0x64006400u;
  static constexpr unsigned MAGIC_BYTE = BF16 ? 0x43434343u : 0x64646464u;
  __device__ __forceinline__ static unsigned fix(unsigned x) { return qd_sub2<BF16>(x, MAGIC); }
  // Same-key pair p of a word (K): 4-bit nibbles (p, p + 4), p < 4; 8-bit bytes (p, p + 2), p < 2.
  // fp16, 4-bit: the odd nibbles of each byte stay in place, 16 c over the
  // magic's 1024, and one fma (x / 16 - 64) replaces the shift and subtract:
  // two ops a pair for p = 0, 1 and a shared shift for p = 2, 3.
  template <int BITS>
  __device__ __forceinline__ static unsigned same(unsigned w, int p) {
    if (BITS == 4 && !BF16) {
      const unsigned x = p >= 2 ? w >> 8 : w;
      if (p % 2 == 0) return fix(LOP ? qd_and_or<0x000f000fu, MAGIC>(x) : (x & 0x000f000fu) | MAGIC);
      return qd_fma2_f16(LOP ? qd_and_or<0x00f000f0u, MAGIC>(x) : (x & 0x00f000f0u) | MAGIC, 0x2c002c00u,
                         0xd400d400u);  // 1/16, -64
    }
    if (BITS == 4) return fix(LOP ? qd_and_or<0x000f000fu, MAGIC>(w >> (4 * p)) : ((w >> (4 * p)) & 0x000f000fu) | MAGIC);
    return fix(qd_perm(w, MAGIC_BYTE, p == 0 ? 0x4240u : 0x4341u));
  }
  // Cross-key pair: code n of word a (low half) and of word b (high half).
  template <int BITS>
  __device__ __forceinline__ static unsigned cross(unsigned a, unsigned b, int n) {
    if (BITS == 4) return same<4>(qd_perm(a, b, n < 4 ? 0x5410u : 0x7632u), n & 3);
    const unsigned y = qd_perm(a, b, (unsigned)(n | (n << 4) | ((4 + n) << 8) | ((4 + n) << 12)));
    return fix(LOP ? qd_and_or<0x00ff00ffu, MAGIC>(y) : (y & 0x00ff00ffu) | MAGIC);
  }
  // K's fp16 codes with the magic kept (no subtraction; the caller takes
  // the offset out in fp32): 1024 + c, and 1024 + 16 c for 4-bit odd pairs
  // (p % 2 == 1: the nibble stays in place). bf16: the exact codes. (V's
  // codes too would need P's sums a group: 18 more registers.)
  template <int BITS>
  __device__ __forceinline__ static unsigned same_raw(unsigned w, int p) {
    if (BF16) return same<BITS>(w, p);
    if (BITS == 4) {
      const unsigned x = p >= 2 ? w >> 8 : w;
      return p % 2 == 0 ? qd_and_or<0x000f000fu, MAGIC>(x) : qd_and_or<0x00f000f0u, MAGIC>(x);
    }
    return qd_perm(w, MAGIC_BYTE, p == 0 ? 0x4240u : 0x4341u);
  }
  // V's cross-key pair with the magic kept (FOLD, fp16): 1024 + c, and
  // 1024 + 16 c for 4-bit odd n (the nibble stays in place); one op fewer a
  // pair than cross. The caller adds -1024 P' by one more mma a tile and
  // divides the odd columns by 16 at the end. bf16: the exact codes.
  template <int BITS>
  __device__ __forceinline__ static unsigned cross_raw(unsigned a, unsigned b, int n) {
    if (BF16) return cross<BITS>(a, b, n);
    if (BITS == 4) return same_raw<4>(qd_perm(a, b, n < 4 ? 0x5410u : 0x7632u), n & 3);
    return qd_and_or<0x00ff00ffu, MAGIC>(qd_perm(a, b, (unsigned)(n | (n << 4) | ((4 + n) << 8) | ((4 + n) << 12))));
  }
};

// Shapes of one instance. Words per group WG; K: WK words per lane t per
// group (pairs of the lane: GS / 8 per group, two per k-step); V: WV words
// per lane g per group (GS / 8 columns, two per m-tile).
template <int D, int DV, int BITS, int GS>
struct QdShape {
  static_assert(BITS == 4 || BITS == 8, "attention_quant_decode: 4- or 8-bit caches");
  static_assert(BITS * GS >= 256, "attention_quant_decode: a group must span 8 words (4-bit: GS >= 64)");
  static_assert(D % GS == 0 && DV % GS == 0, "attention_quant_decode: head dims are whole groups");
  static constexpr int NG = D / GS, NGV = DV / GS;
  static constexpr int WG = GS * BITS / 32;
  static constexpr int WK = WG / 4, WV = WG / 8;
  static constexpr int CPW = 32 / BITS;        // codes per word
  static constexpr int KS = D / 16;            // k-steps of S
  static constexpr int KSG = GS / 16;          // k-steps (and m-tiles) per group
  static constexpr int MT = DV / 16;           // m-tiles of O^T
  static constexpr int KW = NG * WK;           // K words per lane per key
  static constexpr int VW = NGV * WV;          // V words per lane per key
  // d of lane t's pair p (0 .. GS/8 - 1) of group gi; the pair is (d, d + step).
  __host__ __device__ static constexpr int k_dim(int gi, int t, int p) {
    return (gi * WG + t * WK + p / (16 / BITS)) * CPW + (p % (16 / BITS));
  }
  static constexpr int k_step = BITS == 4 ? 4 : 2;
  // Column of lane g's value v (0 .. GS/8 - 1) of group gi.
  __host__ __device__ static constexpr int v_col(int gi, int g, int v) { return gi * GS + g * (GS / 8) + v; }
};

// Sizes of a 16-key tile's segments in a dense cache: K and V rows (words
// a row), K and V scale planes (bytes of 16 keys' [groups] rows): L2PF's line
// map and the row-contiguity checks.
template <typename KST, typename VST, int D, int DV, int BITS, int GS>
struct QdRows {
  using S = QdShape<D, DV, BITS, GS>;
  static constexpr int KWR = D * BITS / 32, VWR = DV * BITS / 32;  // words per K / V row
  static constexpr int KSB = 16 * S::NG * (int)sizeof(KST), VSB = 16 * S::NGV * (int)sizeof(VST);
};

// One 16-key tile's raw operands of a lane: K words of keys g, 8 + g; V words
// of keys 2t, 2t+1, 8+2t, 9+2t; and NG + NGV of the tile's 32 (NG + NGV)
// scales and biases, which the warp stages in shared memory as float planes
// [ks: NG][kb: NG][vs: NGV][vb: NGV] x 16 keys (`stage`): four global loads
// a lane instead of one per (key, group) it uses, and no registers held for
// them across the tile.
// LATE: the scales and biases stay raw bits (in `sc`, as float bit patterns) until stage_scales
// converts them, so that nothing uses a tile's loads where they are issued
// (the register path's next tile, loaded at the end of an iteration, is
// then first waited on by the next iteration's stage: one wait for all of
// an iteration's tiles, and with PF none before the current tile's work).
// Converted in load() (main), the first scale's conversion waits on DRAM
// right after the loads are issued.
template <int D, int DV, int BITS, int GS, bool LATE = false>
struct QdTile {
  using S = QdShape<D, DV, BITS, GS>;
  static constexpr int NSC = S::NG + S::NGV;  // staged values per lane
  static constexpr int STAGE = 32 * NSC;      // floats of a warp's stage
  unsigned kw[2][S::KW];
  unsigned vw[4][S::VW];
  float sc[NSC];

  // Keys at or past `end` load key `end - 1` instead (their logits are dropped by rule).
  template <typename KST, typename VST, class SA>
  __device__ __forceinline__ void load(const QuantHead<KST, SA>& kh, const QuantHead<VST, SA>& vh, int j0, int end,
                                       int lane) {
    const int g = lane / 4, t = lane % 4, last = end - 1;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const long j = min(j0 + 8 * n + g, last);
      const unsigned* w = kh.words(j);
      const long wd = kh.ws[3];
#pragma unroll
      for (int gi = 0; gi < S::NG; ++gi) {
        const unsigned* p = w + (gi * S::WG + t * S::WK) * wd;
        if (S::WK % 4 == 0 && kh.dense) {
#pragma unroll
          for (int u = 0; u < S::WK; u += 4) {
            const uint4 x = *reinterpret_cast<const uint4*>(p + u);
            kw[n][gi * S::WK + u] = x.x, kw[n][gi * S::WK + u + 1] = x.y;
            kw[n][gi * S::WK + u + 2] = x.z, kw[n][gi * S::WK + u + 3] = x.w;
          }
        } else if (S::WK % 2 == 0 && kh.dense) {
#pragma unroll
          for (int u = 0; u < S::WK; u += 2) {
            const uint2 x = *reinterpret_cast<const uint2*>(p + u);
            kw[n][gi * S::WK + u] = x.x, kw[n][gi * S::WK + u + 1] = x.y;
          }
        } else {
#pragma unroll
          for (int u = 0; u < S::WK; ++u) kw[n][gi * S::WK + u] = p[u * wd];
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long j = min(j0 + 2 * t + (e & 1) + 8 * (e >> 1), last);
      const unsigned* w = vh.words(j);
      const long wd = vh.ws[3];
#pragma unroll
      for (int gi = 0; gi < S::NGV; ++gi) {
        const unsigned* p = w + (gi * S::WG + g * S::WV) * wd;
        if (S::WV % 2 == 0 && vh.dense) {
#pragma unroll
          for (int u = 0; u < S::WV; u += 2) {
            const uint2 x = *reinterpret_cast<const uint2*>(p + u);
            vw[e][gi * S::WV + u] = x.x, vw[e][gi * S::WV + u + 1] = x.y;
          }
        } else {
#pragma unroll
          for (int u = 0; u < S::WV; ++u) vw[e][gi * S::WV + u] = p[u * wd];
        }
      }
    }
    // Stage entry lane + 32 i: row (lane + 32 i) / 16 of the planes, key lane % 16.
    const long j = min(j0 + lane % 16, last);
#pragma unroll
    for (int i = 0; i < NSC; ++i) {
      const int row = 2 * i + lane / 16;
      if (LATE) {
        if (row < S::NG) sc[i] = __uint_as_float(qd_raw(kh.s, j * kh.ss[2] + row * kh.ss[3]));
        else if (row < 2 * S::NG) sc[i] = __uint_as_float(qd_raw(kh.b, j * kh.bs[2] + (row - S::NG) * kh.bs[3]));
        else if (row < 2 * S::NG + S::NGV) sc[i] = __uint_as_float(qd_raw(vh.s, j * vh.ss[2] + (row - 2 * S::NG) * vh.ss[3]));
        else sc[i] = __uint_as_float(qd_raw(vh.b, j * vh.bs[2] + (row - 2 * S::NG - S::NGV) * vh.bs[3]));
      } else if (row < S::NG) sc[i] = to_float(kh.s[j * kh.ss[2] + row * kh.ss[3]]);
      else if (row < 2 * S::NG) sc[i] = to_float(kh.b[j * kh.bs[2] + (row - S::NG) * kh.bs[3]]);
      else if (row < 2 * S::NG + S::NGV) sc[i] = to_float(vh.s[j * vh.ss[2] + (row - 2 * S::NG) * vh.ss[3]]);
      else sc[i] = to_float(vh.b[j * vh.bs[2] + (row - 2 * S::NG - S::NGV) * vh.bs[3]]);
    }
  }

  // The staged scales into the warp's stage (after the previous tile's reads: __syncwarp).
  // LATE: converted here (entries i < NG are K's: rows 2i + lane / 16 < 2 NG).
  template <typename KST, typename VST>
  __device__ __forceinline__ void stage_scales(float* stage, int lane) const {
    __syncwarp();
#pragma unroll
    for (int i = 0; i < NSC; ++i) {
      QD_CHECK(nullptr, &stage[lane + 32 * i], 4, "stage");
      stage[lane + 32 * i] = !LATE ? sc[i] : i < S::NG ? QdBits<KST>::f(__float_as_uint(sc[i])) : QdBits<VST>::f(__float_as_uint(sc[i]));
    }
    __syncwarp();
  }
  // (scale or bias) of keys 2t + 8n and 2t + 8n + 1: plane row `row`.
  __device__ __forceinline__ static float2 pair(const float* stage, int row, int n, int t) {
    return *reinterpret_cast<const float2*>(stage + row * 16 + 8 * n + 2 * t);
  }
};

// Partial results of one (batch, KV head, split): 8 rows of o [8][DV], then m [8], l [8].
template <int DV>
__host__ __device__ constexpr int qd_part_floats() {
  return 8 * (DV + 2);
}

// PF: the next tile's operands load while the current one is computed
// (registers for two tiles) instead of after it.
// TILES (register path, S = Q K^T; opt-in): a warp takes TILES of its
// interleaved 16-key tiles an iteration (keys j0 + 16 NW u, u < TILES) as one
// softmax step: their loads are issued together and their S mma chains, code
// conversions and exps are independent, so the scheduler has instructions to
// issue while one tile's results are pending (one warp a scheduler leaves no
// other warp to hide a dependent chain behind); the max / sum / rescale and
// their shuffles are paid once per TILES tiles. Each tile has its own scale
// stage. TILES 1: main's loop.
// POOL: the tickets that pick each (batch, KV head)'s merging block come from
// `tk` (a zeroed region of cuda.py's ticket pool this call alone holds; the
// last block sets its ticket back to 0), so no output needs MLX's zero fill;
// otherwise they follow the partials in `scratch` (zero-filled).
template <typename T, typename KST, typename VST, class F, bool SINKS, int D, int DV, int BITS, int GS, int NW,
          bool PF, bool POOL, int KEYS_M, bool FOLD, int L2PF, int TILES, bool LATE, bool QSF, class SA>
__device__ void attention_quant_decode(const T* q, const QuantCache<KST, SA>& kc, const QuantCache<VST, SA>& vc,
                                       const float* sinks, const int* ip, const float* fp, const int* ns, T* out,
                                       float* lse, float* scratch, const unsigned* tk) {
  using S = QdShape<D, DV, BITS, GS>;
  using C = QdCodes<T>;
  static_assert(!(MmaType<T>::is_bf16 && BITS == 8), "attention_quant_decode: 8-bit codes exceed bf16's exact 128 + code");
  static_assert(F::MaskKind == 0 && !F::Alibi, "attention_quant_decode: no mask or ALiBi (routed elsewhere)");
  // Shared memory (qd_smem_bytes): flag (4 words), each warp's scale stage,
  // Q's fragments (QS), then the end-of-loop merge areas red_*.
  extern __shared__ __align__(16) unsigned char quant_smem[];
  int* flag = reinterpret_cast<int*>(quant_smem);
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
  qd_emu_base() = quant_smem;
#endif
  using Tile = QdTile<D, DV, BITS, GS, LATE>;
  // Each warp's scale stages (one a tile of an iteration), 16-byte aligned after the flag (4 words).
  float* stage = reinterpret_cast<float*>(flag + 4) + (threadIdx.x / 32) * TILES * Tile::STAGE;
  constexpr bool QS = D > 128 || QSF;  // see qsm below
  unsigned char* shared_end = reinterpret_cast<unsigned char*>(reinterpret_cast<float*>(flag + 4) + NW * TILES * Tile::STAGE) +
                              (QS ? NW * S::KS * 32 * 8 : 0);
  float* red_o = reinterpret_cast<float*>(shared_end);  // [NW][8][DV]
  float* red_m = red_o + NW * 8 * DV;                   // [NW][8]
  float* red_l = red_m + NW * 8;                        // [NW][8]
  float* red_pb = red_l + NW * 8;                       // [NW][8][NGV]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], Nq = ip[kSeqQ], Nk = ip[kSeqK];
  const int G = Hq / Hkv, nrows = G * Nq;
  const int bh = blockIdx.z, b = bh / Hkv, kvh = bh % Hkv;
  const int splits = ns[0], split = blockIdx.x;
  const float scale = fp[kScale];

  Sequence seq;
  seq.tensor_batch = b;
  seq.q_start = seq.k_start = 0;
  seq.nq = Nq;
  seq.nk = Nk;
  const LogitRules<bool> rules = make_rules<bool, F>(seq, b, kvh * G, ip, fp, nullptr, nullptr, nullptr);
  auto query_of = [&](int r) { return r / G; };
  auto q_row = [&](int r) { return ((long)b * Hq + kvh * G + r % G) * Nq + r / G; };  // row of [B, Hq, Nq]

  // Keys this block's rows can see, split into `splits` chunks of whole 16-key tiles.
  int lo, hi;
  rules.key_range(0, query_of(nrows - 1), lo, hi);
  hi = max(hi, lo);
  // Tiles start on multiples of 16 keys (L2PF's line map takes whole 16-key
  // segments of the cache, under a window too); the keys added are dropped by rule.
  if (lo < hi) lo &= ~15;
  const int chunk = ((hi - lo + splits - 1) / splits + 15) / 16 * 16;
  const int start = lo + split * chunk, end = min(hi, start + chunk);

  const QuantHead<KST, SA> kh = quant_head<BITS>(kc, b, kvh);
  const QuantHead<VST, SA> vh = quant_head<BITS>(vc, b, kvh);
  // QS: Q's fragments live in the warp's shared memory, read once a k-step
  // for both key halves: head dims over 128 (256 would spill otherwise), and
  // with QSF (opt-in) at any head dim: the 4-bit D 128 instance then takes
  // 108 registers under MLX's NVRTC instead of 137, so four 4-warp blocks
  // fit an SM instead of three (session 16, not yet timed on a card).
  static_assert(TILES >= 1 && (TILES == 1 || (KEYS_M == 0 && L2PF == 0)),
                "attention_quant_decode: TILES > 1 is for S = Q K^T (no KEYS_M or L2PF)");

  using Rows = QdRows<KST, VST, D, DV, BITS, GS>;
  // Rows of each array lie contiguously along the tokens (any token slice of a dense cache).
  const bool kw_rows = kh.ws[3] == 1 && kh.ws[2] == Rows::KWR, vw_rows = vh.ws[3] == 1 && vh.ws[2] == Rows::VWR;
  const bool ks_rows = kh.ss[3] == 1 && kh.ss[2] == S::NG, kb_rows = kh.bs[3] == 1 && kh.bs[2] == S::NG;
  const bool vs_rows = vh.ss[3] == 1 && vh.ss[2] == S::NGV, vb_rows = vh.bs[3] == 1 && vh.bs[2] == S::NGV;
  // Each array's base: with row-contiguous arrays and 16-byte aligned heads
  // (every cache mx.quantize or QuantizedKVCache makes), tile jt's segments
  // start jt * (constant row bytes) past them (L2PF's line addresses).
  const unsigned char* kw0 = reinterpret_cast<const unsigned char*>(kh.words(0));
  const unsigned char* vw0 = reinterpret_cast<const unsigned char*>(vh.words(0));
  const unsigned char* ks0 = reinterpret_cast<const unsigned char*>(kh.s);
  const unsigned char* kb0 = reinterpret_cast<const unsigned char*>(kh.b);
  const unsigned char* vs0 = reinterpret_cast<const unsigned char*>(vh.s);
  const unsigned char* vb0 = reinterpret_cast<const unsigned char*>(vh.b);
  // L2PF > 0 (the register path, a dense cache): the warp's tile L2PF
  // tiles ahead is requested into L2, a 128-byte line a lane (K rows, V
  // rows, four scale planes: contiguous segments of a dense cache; 4-bit D
  // 128: 24 lines, one warp instruction a tile); the registers' loads then
  // wait on L2, not on DRAM.
  // The register path has one tile of loads in flight a warp and one warp a
  // scheduler: too few bytes in flight to cover DRAM's latency (12 % of its
  // throughput under ncu). Only whole tiles within the split (inside the cache).
  const bool l2_fast = L2PF > 0 && kw_rows && vw_rows && ks_rows && kb_rows && vs_rows && vb_rows &&
                       ((reinterpret_cast<unsigned long long>(kw0) | reinterpret_cast<unsigned long long>(vw0) |
                         reinterpret_cast<unsigned long long>(ks0) | reinterpret_cast<unsigned long long>(kb0) |
                         reinterpret_cast<unsigned long long>(vs0) | reinterpret_cast<unsigned long long>(vb0)) & 15) == 0;
  // Line e (< PF_LINES) of the tile at key jt (a multiple of 16, jt + 16 <= end): the K rows' KL
  // lines, the V rows' VL, then PL lines of each scale plane (the last covering its end: a plane
  // may straddle a line; a line requested twice costs nothing more).
  constexpr int KL = (16 * 4 * Rows::KWR + 127) / 128, VL = (16 * 4 * Rows::VWR + 127) / 128;
  constexpr int PLK = Rows::KSB / 128 + 1, PLV = Rows::VSB / 128 + 1;
  constexpr int PF_LINES = KL + VL + 2 * PLK + 2 * PLV;
  auto prefetch_line = [&](int jt, int e) {
    const unsigned char* p;
    if (e < KL) p = kw0 + (long)jt * (4 * Rows::KWR) + min(128 * e, 16 * 4 * Rows::KWR - 1);
    else if (e < KL + VL) p = vw0 + (long)jt * (4 * Rows::VWR) + min(128 * (e - KL), 16 * 4 * Rows::VWR - 1);
    else if (e < KL + VL + 2 * PLK) {
      const int x = e - KL - VL;
      p = (x < PLK ? ks0 : kb0) + (long)jt * (Rows::KSB / 16) + min(128 * (x % PLK), Rows::KSB - 1);
    } else {
      const int x = e - KL - VL - 2 * PLK;
      p = (x < PLV ? vs0 : vb0) + (long)jt * (Rows::VSB / 16) + min(128 * (x % PLV), Rows::VSB - 1);
    }
    qd_prefetch_l2(p);
  };
  if (L2PF > 0 && l2_fast) {
    // The warp's tiles 1 .. L2PF - 1 at once (tile 0's loads are issued next).
    for (int e = lane; e < PF_LINES * (L2PF - 1); e += 32) {
      const int jt = start + 16 * (warp + NW * (1 + e / PF_LINES));
      if (jt + 16 <= end) prefetch_line(jt, e % PF_LINES);
    }
  }

  int j0 = start + 16 * warp;

  // Q as A fragments (row g; pairs 2kk and 2kk+1 of lane t), rows >= nrows zero,
  // and each group's sum of q (for the K biases), reduced over the four lanes t.
  const bool row_ok = g < nrows;
  const T* qr = q + q_row(row_ok ? g : 0) * D;
  unsigned qa[QS ? 1 : S::KS][2];
  uint2* qsm = reinterpret_cast<uint2*>(reinterpret_cast<float*>(flag + 4) + NW * TILES * Tile::STAGE) + warp * S::KS * 32;
  // RAW (KEYS_M 2, fp16): K's codes keep the magic (1024 + c; 4-bit odd
  // pairs 1024 + 16 c, their q fragments / 16, exact but for subnormals), so
  // S^T holds q.c + 1024 (sum of the fragments): `qoff`, taken out in fp32.
  // FOLD (fp16): the codes of BOTH K and V keep their magic, so a code
  // costs only its mask-and-magic LOP3 (scales and biases are already out of
  // the per-code work, above): K's as RAW; V's (RAWV) by cross_raw, whose
  // 1024 P' one more mma a m-tile takes out (A = -1024, exact products, in
  // the tile's own accumulation, so the offset never grows with the keys).
  constexpr bool RAW = (KEYS_M == 2 || FOLD) && !MmaType<T>::is_bf16;
  constexpr bool RAWV = FOLD && !MmaType<T>::is_bf16;
  constexpr unsigned NEG_MAGIC = 0xe400e400u;  // fp16 -1024 twice
  float qsum[S::NG], qoff[S::NG];
#pragma unroll
  for (int gi = 0; gi < S::NG; ++gi) {
    float acc = 0.f, off = 0.f;
#pragma unroll
    for (int p = 0; p < GS / 8; ++p) {
      const int d = S::k_dim(gi, t, p);
      const float x0 = row_ok ? to_float(qr[d]) : 0.f, x1 = row_ok ? to_float(qr[d + S::k_step]) : 0.f;
      acc += x0 + x1;
      const float f = RAW && BITS == 4 && p % 2 == 1 ? 0.0625f : 1.f;
      const unsigned x = pack2<T>(x0 * f, x1 * f);
      if (RAW) off += QdBits<T>::f(x & 0xffffu) + QdBits<T>::f(x >> 16);
      if (QS) reinterpret_cast<unsigned*>(qsm + (gi * S::KSG + p / 2) * 32 + lane)[p % 2] = x;
      else qa[QS ? 0 : gi * S::KSG + p / 2][p % 2] = x;
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    qsum[gi] = acc;
    if (RAW) {
      off += __shfl_xor_sync(0xffffffffu, off, 1);
      off += __shfl_xor_sync(0xffffffffu, off, 2);
    }
    qoff[gi] = 1024.f * off;
  }
  if (QS) __syncwarp();

  float o[S::MT][4];  // O^T: (columns of lane g, rows 2t, 2t+1)
#pragma unroll
  for (int m = 0; m < S::MT; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[m][e] = 0.f;
  float m_row = kNegInf, l_row = 0.f, pb[S::NGV];  // row g: max, lane-partial sum, bias terms
#pragma unroll
  for (int gi = 0; gi < S::NGV; ++gi) pb[gi] = 0.f;
  bool bad = false;

  // Row g's query, once (an integer division, ~20 instructions, per logit otherwise).
  const int qi = query_of(g);
  // KEYS_M: this lane's rows are 2t, 2t+1 (S^T's and O^T's columns): their
  // queries, validity, q sums (from lanes 4 (2t + r)) and softmax state; m2
  // is the same on every lane g, l2 and pb2 are partial over the lanes g.
  int qi2[2];
  bool rok[2], bad2[2] = {false, false};
  float qs2[S::NG][2], qo2[S::NG][2], m2[2] = {kNegInf, kNegInf}, l2[2] = {0.f, 0.f}, pb2[2][S::NGV];
  if (KEYS_M) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rok[r] = 2 * t + r < nrows;
      qi2[r] = query_of(2 * t + r);
#pragma unroll
      for (int gi = 0; gi < S::NG; ++gi) {
        qs2[gi][r] = __shfl_sync(0xffffffffu, qsum[gi], 4 * (2 * t + r));
        qo2[gi][r] = RAW ? __shfl_sync(0xffffffffu, qoff[gi], 4 * (2 * t + r)) : 0.f;
      }
#pragma unroll
      for (int gi = 0; gi < S::NGV; ++gi) pb2[r][gi] = 0.f;
    }
  }
  // The iteration's tiles (cur: the first; KEYS_M takes only it).
  // Tiles past `end` (the last iteration's) load key end - 1; their keys are dropped by rule.
  Tile tiles[TILES];
  Tile& cur = tiles[0];
  if (j0 < end) {
#pragma unroll
    for (int u = 0; u < TILES; ++u) tiles[u].load(kh, vh, j0 + 16 * NW * u, end, lane);
  }
  for (; j0 < end; j0 += 16 * NW * TILES) {
    const int j1 = j0 + 16 * NW * TILES;
    if (L2PF > 0 && l2_fast) {
      const int jp = j0 + 16 * NW * L2PF;
      if (jp + 16 <= end) {
#pragma unroll
        for (int e = lane; e < PF_LINES; e += 32) prefetch_line(jp, e);
      }
    }
#pragma unroll
    for (int u = 0; u < TILES; ++u) tiles[u].template stage_scales<KST, VST>(stage + u * Tile::STAGE, lane);
    Tile nxt[TILES];
    if (PF && j1 < end) {
#pragma unroll
      for (int u = 0; u < TILES; ++u) nxt[u].load(kh, vh, j1 + 16 * NW * u, end, lane);
    }

    if (KEYS_M) {
      // S^T = K Q^T: the tile's 16 keys on the mma's M (every row used; Q's
      // rows on N, 8), half the mma of S = Q K^T, whose M rows 8..15 are
      // zero; K's codes are the A fragment, made in place, and Q's pair the
      // B fragment as loaded (no register copies to build operand quads).
      // C: (key g, rows 2t, 2t+1), (key g + 8, rows 2t, 2t+1).
      using C2 = QdCodes<T, true>;
      // Every group's value of one plane ([ks: NG][kb: NG][vs: NGV][vb: NGV])
      // at the tile's key `key`, from the warp's stage (ks, kb: NG; vs, vb: NGV).
      auto kplane = [&](int which, int key, float (&out)[S::NG]) {
#pragma unroll
        for (int gi = 0; gi < S::NG; ++gi) out[gi] = stage[(which * S::NG + gi) * 16 + key];
      };
      auto vplane = [&](int which, int key, float (&out)[S::NGV]) {
#pragma unroll
        for (int gi = 0; gi < S::NGV; ++gi) out[gi] = stage[(2 * S::NG + which * S::NGV + gi) * 16 + key];
      };
      float acc[S::NG][4];
#pragma unroll
      for (int gi = 0; gi < S::NG; ++gi) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[gi][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < S::KSG; ++kk) {
          unsigned b0, b1;
          if (QS) {
            const uint2 f = qsm[(gi * S::KSG + kk) * 32 + lane];
            b0 = f.x, b1 = f.y;
          } else {
            b0 = qa[QS ? 0 : gi * S::KSG + kk][0], b1 = qa[QS ? 0 : gi * S::KSG + kk][1];
          }
          // a[n + 2h]: key g + 8n, the lane's pair 2kk + h.
          unsigned a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              const int p = 2 * kk + h;
              constexpr int PPW = 16 / BITS;
              a[n + 2 * h] = RAW ? C2::template same_raw<BITS>(cur.kw[n][gi * S::WK + p / PPW], p % PPW)
                                 : C2::template same<BITS>(cur.kw[n][gi * S::WK + p / PPW], p % PPW);
            }
          mma16816<T>(acc[gi], a, b0, b1);
        }
      }
      // Logits x[r][k] of row 2t + r, key g + 8k; the online softmax per row.
      float x2[2][2], mx[2];
      bool kp[2][2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float y0 = 0.f, y1 = 0.f, sk[S::NG], bk[S::NG];
        kplane(0, g + 8 * k, sk);
        kplane(1, g + 8 * k, bk);
#pragma unroll
        for (int gi = 0; gi < S::NG; ++gi) {
          y0 = fmaf(sk[gi], RAW ? acc[gi][2 * k] - qo2[gi][0] : acc[gi][2 * k], fmaf(bk[gi], qs2[gi][0], y0));
          y1 = fmaf(sk[gi], RAW ? acc[gi][2 * k + 1] - qo2[gi][1] : acc[gi][2 * k + 1], fmaf(bk[gi], qs2[gi][1], y1));
        }
        x2[0][k] = y0, x2[1][k] = y1;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = kNegInf;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int j = j0 + g + 8 * k;
          float capped, x = kNegInf;
          if (rok[r] && j < end) x = apply_rules<F, bool>(rules, scale * x2[r][k], qi2[r], j, capped);
          const bool nonfinite = x != x || x == MLXF_QUANT_POS_INF;
          bad2[r] = bad2[r] || nonfinite;
          if (nonfinite) x = kNegInf;
          kp[r][k] = x != kNegInf;
          x2[r][k] = x;
          mx[r] = fmaxf(mx[r], x);
        }
      }
      // The row maxima move only when some lane's logit passes them (a few
      // tiles of a row once its max has settled): then the maxima over the
      // lanes g and the rescale; otherwise no shuffle, exp or multiply.
      // O^T's rows 2t, 2t+1 are this lane's own: no shuffle for the alphas.
      if (__any_sync(0xffffffffu, mx[0] > m2[0] || mx[1] > m2[1])) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int off = 4; off < 32; off *= 2) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], off));
          const float mn = fmaxf(m2[r], mx[r]);
          const float al = mn == kNegInf ? 1.f : __expf(m2[r] - mn);
          m2[r] = mn;
          l2[r] *= al;
#pragma unroll
          for (int gi = 0; gi < S::NGV; ++gi) pb2[r][gi] *= al;
#pragma unroll
          for (int m = 0; m < S::MT; ++m) o[m][r] *= al, o[m][2 + r] *= al;
        }
      }
      float pp[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int k = 0; k < 2; ++k) pp[r][k] = kp[r][k] ? __expf(x2[r][k] - m2[r]) : 0.f;
        l2[r] += pp[r][0] + pp[r][1];
      }
      {
        float bv0[S::NGV], bv1[S::NGV];
        vplane(1, g, bv0);
        vplane(1, g + 8, bv1);
#pragma unroll
        for (int gi = 0; gi < S::NGV; ++gi) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float x = pb2[r][gi];
            if (kp[r][0]) x = fmaf(pp[r][0], bv0[gi], x);
            if (kp[r][1]) x = fmaf(pp[r][1], bv1[gi], x);
            pb2[r][gi] = x;
          }
        }
      }
      float sv0[S::NGV], sv1[S::NGV];
      vplane(0, g, sv0);
      vplane(0, g + 8, sv1);
#pragma unroll
      for (int gi = 0; gi < S::NGV; ++gi) {
        // P scaled by the group's V scales as 8x8 blocks [key g (+8)][rows
        // 2t, 2t+1], transposed in registers to P^T's B fragments [row g][keys 2t, 2t+1 (+8)].
        const unsigned b0 =
            qd_movt(pack2<T>(kp[0][0] ? pp[0][0] * sv0[gi] : 0.f, kp[1][0] ? pp[1][0] * sv0[gi] : 0.f));
        const unsigned b1 =
            qd_movt(pack2<T>(kp[0][1] ? pp[0][1] * sv1[gi] : 0.f, kp[1][1] ? pp[1][1] * sv1[gi] : 0.f));
#pragma unroll
        for (int mm = 0; mm < S::KSG; ++mm) {
          unsigned a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              const int v = 2 * mm + h, wi = gi * S::WV + v / S::CPW;
              a[h + 2 * n] = RAWV ? C2::template cross_raw<BITS>(cur.vw[2 * n][wi], cur.vw[2 * n + 1][wi], v % S::CPW)
                                  : C2::template cross<BITS>(cur.vw[2 * n][wi], cur.vw[2 * n + 1][wi], v % S::CPW);
            }
          mma16816<T>(o[gi * S::KSG + mm], a, b0, b1);
          if (RAWV) {
            unsigned neg[4] = {NEG_MAGIC, NEG_MAGIC, NEG_MAGIC, NEG_MAGIC};
            mma16816<T>(o[gi * S::KSG + mm], neg, b0, b1);
          }
        }
      }
    } else {
    // S = Q K^T per group (codes), then scales and biases in fp32. Both
    // 8-key halves n of every tile u take each Q fragment (one shared-memory
    // read with QS); the tiles' mma chains are independent.
    float s[TILES][2][2];
    {
      float acc[TILES][2][S::NG][4];
#pragma unroll
      for (int gi = 0; gi < S::NG; ++gi) {
#pragma unroll
        for (int u = 0; u < TILES; ++u)
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[u][n][gi][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < S::KSG; ++kk) {
          unsigned a[4] = {0u, 0u, 0u, 0u};
          if (QS) {
            const uint2 f = qsm[(gi * S::KSG + kk) * 32 + lane];
            a[0] = f.x, a[2] = f.y;
          } else {
            a[0] = qa[QS ? 0 : gi * S::KSG + kk][0], a[2] = qa[QS ? 0 : gi * S::KSG + kk][1];
          }
#pragma unroll
          for (int u = 0; u < TILES; ++u)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              unsigned bf[2];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int p = 2 * kk + h;  // pair of the lane within the group
                constexpr int PPW = 16 / BITS;
                bf[h] = RAW ? C::template same_raw<BITS>(tiles[u].kw[n][gi * S::WK + p / PPW], p % PPW)
                            : C::template same<BITS>(tiles[u].kw[n][gi * S::WK + p / PPW], p % PPW);
              }
              mma16816<T>(acc[u][n][gi], a, bf[0], bf[1]);
            }
        }
      }
#pragma unroll
      for (int u = 0; u < TILES; ++u)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const float* st = stage + u * Tile::STAGE;
          float x0 = 0.f, x1 = 0.f;
#pragma unroll
          for (int gi = 0; gi < S::NG; ++gi) {
            const float2 sk = Tile::pair(st, gi, n, t), bk = Tile::pair(st, S::NG + gi, n, t);
            x0 = fmaf(sk.x, RAW ? acc[u][n][gi][0] - qoff[gi] : acc[u][n][gi][0], fmaf(bk.x, qsum[gi], x0));
            x1 = fmaf(sk.y, RAW ? acc[u][n][gi][1] - qoff[gi] : acc[u][n][gi][1], fmaf(bk.y, qsum[gi], x1));
          }
          s[u][n][0] = x0;
          s[u][n][1] = x1;
        }
    }
    // Logits of row g (keys j0 + 16 NW u + 8n + 2t + e), the online softmax
    // (one step for the iteration's TILES tiles).
    float tile_max = kNegInf;
    bool kept[TILES][2][2];
#pragma unroll
    for (int u = 0; u < TILES; ++u)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + 16 * NW * u + 8 * n + 2 * t + e;
          float capped, x = kNegInf;
          if (row_ok && j < end) x = apply_rules<F, bool>(rules, scale * s[u][n][e], qi, j, capped);
          const bool nonfinite = x != x || x == MLXF_QUANT_POS_INF;
          bad = bad || nonfinite;
          if (nonfinite) x = kNegInf;
          kept[u][n][e] = x != kNegInf;
          s[u][n][e] = x;
          tile_max = fmaxf(tile_max, x);
        }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m_row, tile_max);
    const float alpha = m_new == kNegInf ? 1.f : __expf(m_row - m_new);
    float p[TILES][2][2];
#pragma unroll
    for (int u = 0; u < TILES; ++u)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) p[u][n][e] = kept[u][n][e] ? __expf(s[u][n][e] - m_new) : 0.f;
    m_row = m_new;
    l_row = l_row * alpha + (p[0][0][0] + p[0][0][1]) + (p[0][1][0] + p[0][1][1]);  // TILES 1: main's sum, bit for bit
#pragma unroll
    for (int u = 1; u < TILES; ++u) l_row += (p[u][0][0] + p[u][0][1]) + (p[u][1][0] + p[u][1][1]);
#pragma unroll
    for (int gi = 0; gi < S::NGV; ++gi) {
      float x = pb[gi] * alpha;
#pragma unroll
      for (int u = 0; u < TILES; ++u)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const float2 bv = Tile::pair(stage + u * Tile::STAGE, 2 * S::NG + S::NGV + gi, n, t);
          if (kept[u][n][0]) x = fmaf(p[u][n][0], bv.x, x);
          if (kept[u][n][1]) x = fmaf(p[u][n][1], bv.y, x);
        }
      pb[gi] = x;
    }
    // O^T holds rows 2t, 2t+1: their alphas come from lanes g = 2t, 2t+1.
    // Skipped while no row's max moves (most tiles once the max has settled).
    if (__any_sync(0xffffffffu, alpha != 1.f)) {
      const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * t), a1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
      for (int m = 0; m < S::MT; ++m) {
        o[m][0] *= a0, o[m][1] *= a1, o[m][2] *= a0, o[m][3] *= a1;
      }
    }
    // O^T += V^T (P scaled by each group's V scales)^T, tile by tile (an
    // m-tile's two mma of one iteration are S::MT mma apart).
#pragma unroll
    for (int u = 0; u < TILES; ++u)
#pragma unroll
    for (int gi = 0; gi < S::NGV; ++gi) {
      unsigned bf[2];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const float2 sv = Tile::pair(stage + u * Tile::STAGE, 2 * S::NG + gi, n, t);
        bf[n] = pack2<T>(kept[u][n][0] ? p[u][n][0] * sv.x : 0.f, kept[u][n][1] ? p[u][n][1] * sv.y : 0.f);
      }
#pragma unroll
      for (int mm = 0; mm < S::KSG; ++mm) {
        // a[0] (col v = 2mm, keys 2t, 2t+1), a[1] (v = 2mm + 1), a[2]/a[3] keys 8 + 2t, 9 + 2t.
        unsigned a[4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const int v = 2 * mm + h, wi = gi * S::WV + v / S::CPW;
            a[h + 2 * n] = RAWV ? C::template cross_raw<BITS>(tiles[u].vw[2 * n][wi], tiles[u].vw[2 * n + 1][wi], v % S::CPW)
                                : C::template cross<BITS>(tiles[u].vw[2 * n][wi], tiles[u].vw[2 * n + 1][wi], v % S::CPW);
          }
        mma16816<T>(o[gi * S::KSG + mm], a, bf[0], bf[1]);
        if (RAWV) {
          unsigned neg[4] = {NEG_MAGIC, NEG_MAGIC, NEG_MAGIC, NEG_MAGIC};
          mma16816<T>(o[gi * S::KSG + mm], neg, bf[0], bf[1]);
        }
      }
    }
    }  // KEYS_M
#pragma unroll
    for (int u = 0; u < TILES; ++u) {
      if (PF && j1 < end) tiles[u] = nxt[u];
      if (!PF && j1 < end) tiles[u].load(kh, vh, j1 + 16 * NW * u, end, lane);
    }
  }

  // Block merge: each warp's (o + bias terms, m, l) through shared memory.
  if (KEYS_M) {
    // Rows 2t, 2t+1: sums over the lanes g; bad when any lane g of the row met a non-finite logit.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int off = 4; off < 32; off *= 2) {
        l2[r] += __shfl_xor_sync(0xffffffffu, l2[r], off);
#pragma unroll
        for (int gi = 0; gi < S::NGV; ++gi) pb2[r][gi] += __shfl_xor_sync(0xffffffffu, pb2[r][gi], off);
      }
      bad2[r] = (__ballot_sync(0xffffffffu, bad2[r]) & (0x11111111u << t)) != 0;
    }
  } else {
  l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
  l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
#pragma unroll
  for (int gi = 0; gi < S::NGV; ++gi) {
    pb[gi] += __shfl_xor_sync(0xffffffffu, pb[gi], 1);
    pb[gi] += __shfl_xor_sync(0xffffffffu, pb[gi], 2);
  }
  // Row g is bad when any lane t of it met a non-finite logit.
  bad = ((__ballot_sync(0xffffffffu, bad) >> (4 * g)) & 0xfu) != 0;
  }
  float* wo = red_o + warp * 8 * DV;
  // RAWV, 4-bit: the odd columns' codes were 16 c (exact power-of-two scale).
  constexpr float ODD = RAWV && BITS == 4 ? 0.0625f : 1.f;
#pragma unroll
  for (int m = 0; m < S::MT; ++m) {
    const int gi = m / S::KSG, v = 2 * (m % S::KSG);
    const int c = S::v_col(gi, g, v);
    QD_CHECK(nullptr, &wo[(2 * t + 1) * DV + c + 1], 4, "wo");
    wo[(2 * t) * DV + c] = o[m][0];
    wo[(2 * t + 1) * DV + c] = o[m][1];
    wo[(2 * t) * DV + c + 1] = o[m][2] * ODD;
    wo[(2 * t + 1) * DV + c + 1] = o[m][3] * ODD;
  }
  if (KEYS_M) {
    if (g == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 8 + 2 * t + r;
        red_m[row] = bad2[r] ? MLXF_QUANT_NAN : m2[r];
        red_l[row] = l2[r];
#pragma unroll
        for (int gi = 0; gi < S::NGV; ++gi) red_pb[row * S::NGV + gi] = pb2[r][gi];
      }
    }
  } else if (t == 0) {
    red_m[warp * 8 + g] = bad ? MLXF_QUANT_NAN : m_row;
    red_l[warp * 8 + g] = l_row;
#pragma unroll
    for (int gi = 0; gi < S::NGV; ++gi) red_pb[(warp * 8 + g) * S::NGV + gi] = pb[gi];
  }
  __syncthreads();

  float* part = scratch + ((long)bh * splits + split) * qd_part_floats<DV>();
  unsigned* counters = POOL ? const_cast<unsigned*>(tk)
                            : reinterpret_cast<unsigned*>(scratch + (long)ip[kBatch] * Hkv * splits * qd_part_floats<DV>());
  // Only the block's nrows real rows (4 of the 8 at GQA 4:1): the others are never merged or read.
  for (int e = threadIdx.x; e < nrows * DV; e += 32 * NW) {
    const int r = e / DV, c = e % DV;
    float mm = kNegInf;
    bool nan = false;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float x = red_m[w * 8 + r];
      nan = nan || x != x;
      mm = fmaxf(mm, x);
    }
    float acc = 0.f, ll = 0.f;
    if (!nan && mm != kNegInf) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float x = red_m[w * 8 + r];
        if (x == kNegInf) continue;  // a warp that kept no key of this row holds nothing
        const float f = __expf(x - mm);
        ll = fmaf(red_l[w * 8 + r], f, ll);
        acc = fmaf(red_o[(w * 8 + r) * DV + c] + red_pb[(w * 8 + r) * S::NGV + c / GS], f, acc);
      }
    }
    part[r * DV + c] = acc;
    if (c == 0) {
      part[8 * DV + r] = nan ? MLXF_QUANT_NAN : mm;
      part[8 * DV + 8 + r] = ll;
    }
  }

  // The last block of this (batch, KV head) merges every split: every
  // thread's partial writes are fenced before the block's count goes up.
  qd_fence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned done = atomicAdd(counters + bh, 1u);
    *flag = done == (unsigned)(splits - 1);
    // Every other block of the group has drawn its ticket: the pool's region is clean for its next call.
    if (POOL && done == (unsigned)(splits - 1)) counters[bh] = 0u;
  }
  __syncthreads();
  if (!*flag) return;
  qd_fence();
  const float* parts = scratch + (long)bh * splits * qd_part_floats<DV>();
  float* wts = red_o;  // [splits][8] weights, reusing the merge area (its reads are done)
  // Per real row: max over the splits (and the sink), NaN if any split is NaN.
  for (int r = warp; r < nrows; r += NW) {
    float mm = kNegInf;
    bool nan = false;
    for (int sp = lane; sp < splits; sp += 32) {
      const float x = qd_load_cg(parts + (long)sp * qd_part_floats<DV>() + 8 * DV + r);
      nan = nan || x != x;
      mm = fmaxf(mm, x);
    }
    mm = warp_max(mm);
    nan = __any_sync(0xffffffffu, nan);
    float sink = kNegInf;
    if (SINKS) {
      sink = sinks[kvh * G + r % G];
      nan = nan || sink != sink;
      mm = fmaxf(mm, sink);
    }
    const float base = mm == kNegInf ? 0.f : mm;
    float den = 0.f;
    for (int sp = lane; sp < splits; sp += 32) {
      const float x = qd_load_cg(parts + (long)sp * qd_part_floats<DV>() + 8 * DV + r);
      const float f = x == kNegInf ? 0.f : __expf(x - base);
      wts[sp * 8 + r] = f;
      den = fmaf(qd_load_cg(parts + (long)sp * qd_part_floats<DV>() + 8 * DV + 8 + r), f, den);
    }
    den = warp_sum(den) + (SINKS ? __expf(sink - base) : 0.f);
    if (lane == 0) {
      red_m[r] = nan ? MLXF_QUANT_NAN : (den > 0.f ? 1.f / den : 0.f);  // scale of the row, NaN for a bad row
      lse[q_row(r)] = nan ? MLXF_QUANT_NAN : (den > 0.f ? base + logf(den) : kNegInf);
    }
  }
  __syncthreads();
  // Four columns a thread, every split's float4 of them summed with sixteen
  // loads in flight (an empty split holds zeros: no branch; a NaN in a split
  // whose weight underflowed still reaches the row, as IEEE would have it).
  constexpr int C4 = DV / 4;
  for (int e = threadIdx.x; e < nrows * C4; e += 32 * NW) {
    const int r = e / C4, c = 4 * (e % C4);
    const float inv = red_m[r];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (inv == inv) {
      const float* src = parts + r * DV + c;
#pragma unroll 16
      for (int sp = 0; sp < splits; ++sp) {
        const float f = wts[sp * 8 + r];
        const float4 x = qd_load_cg4(src + (long)sp * qd_part_floats<DV>());
        acc[0] = fmaf(x.x, f, acc[0]);
        acc[1] = fmaf(x.y, f, acc[1]);
        acc[2] = fmaf(x.z, f, acc[2]);
        acc[3] = fmaf(x.w, f, acc[3]);
      }
    }
    T* dst = out + q_row(r) * DV + c;
#pragma unroll
    for (int k = 0; k < 4; ++k) dst[k] = from_float<T>(inv == inv ? acc[k] * inv : MLXF_QUANT_NAN);
  }
}

}  // namespace mlx_flash
