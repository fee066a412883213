// Shared pieces of the CUDA attention kernels: the runtime parameter block,
// per-sequence bounds (dense or varlen), and the logit rules of the contract
// (softcap -> ALiBi -> additive mask -> drops), written once for every kernel.
//
// These sources are compiled by NVRTC inside mx.fast.cuda_kernel: the kernel
// body (the .cu files) is a single call into a device function template
// defined here, so the same text also compiles under nvcc in a test harness.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mlx_flash {

#define MLX_FLASH_NEG_INF (-__int_as_float(0x7f800000))
// -inf as an expression (no constexpr route to it in device code).
#define kNegInf MLX_FLASH_NEG_INF
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Slots of the int32 parameter array (the wrapper in backends/cuda.py writes them).
enum IParam {
  kBatch = 0, kHeadsQ, kHeadsKv, kSeqQ, kSeqK, kWindowLeft, kWindowRight,
  kBlockQ, kBlockK,
  kMaskB, kMaskH, kMaskQ, kMaskK,
  kBmB, kBmH, kBmQ, kBmK,
  kNumIParams
};
// Slots of the float32 parameter array.
enum FParam { kScale = 0, kSoftcap, kNumFParams };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(bool x) { return x ? 1.f : 0.f; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------
// The non-finite contract (ARCHITECTURE.md, issue 13). Kept logits follow IEEE,
// so a NaN or +inf one makes its row's running sum NaN, and the epilogues below
// turn that into a NaN row (out and lse) instead of the "empty row" result. A
// dropped key (structurally, or by a -inf logit) must add nothing, which its
// zero probability does not guarantee: 0 * NaN = NaN. Tiles with no dropped
// pair run as before; a tile that drops keys checks the operands it multiplies
// by those zeros (each thread its own cp.async chunks, ORed at the barrier the
// tile already has) and, where one holds a NaN or inf, forms that product
// exactly, skipping the dropped pairs (exact_fragment_product). That is rare;
// full tiles pay nothing.

__device__ __forceinline__ bool is_nonfinite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}
// Exponent bits of the 16-bit formats: all set = NaN or inf.
template <typename T> struct ExpBits;
template <> struct ExpBits<__half> { static constexpr unsigned mask = 0x7c00u; };
template <> struct ExpBits<__nv_bfloat16> { static constexpr unsigned mask = 0x7f80u; };
template <> struct ExpBits<float> { static constexpr unsigned mask = 0x7f800000u; };

// A 32-bit word of one float or two 16-bit values holds a NaN or inf.
template <typename T>
__device__ __forceinline__ bool word_nonfinite(unsigned w) {
  constexpr unsigned E = ExpBits<T>::mask;
  if constexpr (sizeof(T) == 4) {
    return (w & E) == E;
  } else {
    return (w & E) == E || (w & (E << 16)) == (E << 16);
  }
}
// One 16-byte chunk (a cp.async copy) holds a NaN or inf.
template <typename T>
__device__ __forceinline__ bool chunk_nonfinite(const void* p) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  return word_nonfinite<T>(w.x) | word_nonfinite<T>(w.y) | word_nonfinite<T>(w.z) | word_nonfinite<T>(w.w);
}

// The low (hi = 0) or high 16-bit value of a packed pair (mma.cuh's pack2), as float.
template <typename T> __device__ __forceinline__ float unpack_half(unsigned w, int hi);
template <> __device__ __forceinline__ float unpack_half<__half>(unsigned w, int hi) {
  return __half2float(__ushort_as_half((unsigned short)(hi ? w >> 16 : w & 0xffffu)));
}
template <> __device__ __forceinline__ float unpack_half<__nv_bfloat16>(unsigned w, int hi) {
  return __uint_as_float(hi ? w & 0xffff0000u : w << 16);
}
// Sign bits of the pair of a packed register: or-ed into a dropped pair's
// +0 it marks it -0 (exact_fragment_product's Marker mode).
__device__ __forceinline__ unsigned pair_marks(bool lo, bool hi) {
  return (lo ? 0x8000u : 0u) | (hi ? 0x80000000u : 0u);
}

// Row epilogue of the online softmax, kLog2 = true in the log2 domain (the
// tensor-core kernels) or false in the natural one (SIMT). fold_sink adds the
// sink logit to (m, sum): a -inf sink adds nothing even to an empty row, a NaN
// or +inf one makes the sum NaN. `alpha` rescales the accumulated output.
template <bool kLog2>
__device__ __forceinline__ void fold_sink(float sink, float& m, float& sum, float& alpha) {
  const float m2 = fmaxf(m, sink);
  const float base = m2 == kNegInf ? 0.f : m2;
  alpha = kLog2 ? exp2f(m - base) : expf(m - base);
  sum = sum * alpha + (kLog2 ? exp2f(sink - base) : expf(sink - base));
  m = m2;
}
// sum == 0 exactly when no key was kept (the largest kept logit adds 1): out 0,
// lse -inf. A NaN sum (a kept NaN or +inf logit) gives NaN in both.
__device__ __forceinline__ float row_out_factor(float sum, float alpha) {
  return sum == 0.f ? 0.f : alpha / sum;
}
template <bool kLog2>
__device__ __forceinline__ float row_lse(float m, float sum) {
  return sum == 0.f ? kNegInf : kLog2 ? (m + log2f(sum)) * kLn2 : m + logf(sum);
}

// acc += P B over one tile, exactly: the products of dropped pairs are skipped
// instead of multiplied by zero. Fragments in the m16n8 accumulator layout
// (mma.cuh): this thread's rows g and g + 8, accumulator columns 8n + 2t + e
// as acc(n, e) and acc(n, 2 + e); P's inner index j = 8kb + 2t' + e is held by
// lane 4g + t' as p(kb, e) (row g) and p(kb, 2 + e) (row g + 8), with bit
// 4kb + c of that lane's `drop` set when the pair is dropped. b(j, col) reads
// the other operand. KB = inner indices / 8, NB = accumulator columns / 8.
// Marker = true: no drop bits; a dropped pair's P is -0.0 exactly (kDroppedBits),
// a value a kept pair's P (>= +0 or NaN) never takes.
constexpr unsigned kDroppedBits = 0x80000000u;
template <int KB, int NB, bool Marker = false, class PAt, class AccAt, class BAt>
__device__ __forceinline__ void exact_fragment_product(PAt p_at, unsigned long long drop, AccAt acc_at, BAt b_at) {
  const int lane = threadIdx.x % 32, t = lane % 4;
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const float p0 = p_at(kb, e2), p1 = p_at(kb, 2 + e2);
      const unsigned bits = Marker ? 0u : (unsigned)(drop >> (4 * kb)) & 0xFu;
#pragma unroll 1
      for (int tt = 0; tt < 4; ++tt) {
        const int src = (lane & ~3) | tt;
        const float q0 = __shfl_sync(0xffffffffu, p0, src), q1 = __shfl_sync(0xffffffffu, p1, src);
        const unsigned bt = Marker ? 0u : __shfl_sync(0xffffffffu, bits, src);
        const bool keep0 = Marker ? __float_as_uint(q0) != kDroppedBits : !((bt >> e2) & 1u);
        const bool keep1 = Marker ? __float_as_uint(q1) != kDroppedBits : !((bt >> (2 + e2)) & 1u);
        const int j = kb * 8 + 2 * tt + e2;
#pragma unroll
        for (int n = 0; n < NB; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float bv = b_at(j, n * 8 + 2 * t + e);
            if (keep0) acc_at(n, e) += q0 * bv;
            if (keep1) acc_at(n, 2 + e) += q1 * bv;
          }
        }
      }
    }
  }
}

// A compile-time bool as a value (std::integral_constant without <type_traits>,
// which NVRTC lacks): selects an instance of a generic lambda.
template <bool B> struct BoolConst { static constexpr bool value = B; };

// Compile-time feature set of one kernel instance.
// KeyRange_: per-batch valid keys (key_start / key_len inputs); defaulted so
// kernels without ranges (the quantized ones) name seven flags.
template <bool Softcap_, bool Alibi_, int MaskKind_, bool Window_, bool BlockMask_, bool Sinks_, bool Varlen_,
          bool KeyRange_ = false>
struct Features {
  static constexpr bool Softcap = Softcap_;
  static constexpr bool Alibi = Alibi_;
  static constexpr int MaskKind = MaskKind_;  // 0 none, 1 bool, 2 additive
  static constexpr bool Window = Window_;     // causal is a window with right = 0
  static constexpr bool BlockMask = BlockMask_;
  static constexpr bool Sinks = Sinks_;
  static constexpr bool Varlen = Varlen_;
  static constexpr bool KeyRange = KeyRange_;
  // Logits need the per-element rules beyond the key bounds (the sequence's
  // end, a key range), which tiles test as a whole (tile_cuts_keys).
  static constexpr bool ElementRules = Softcap || Alibi || MaskKind != 0 || BlockMask;
};

// Bounds of one sequence of the batch. Dense calls: rows b*0.. of a [B, H, N, D]
// tensor; varlen calls: rows cu[b]..cu[b+1] of the single [1, H, total, D] tensor.
struct Sequence {
  int tensor_batch;  // index into the tensor's batch axis
  int q_start, nq;   // first row and length along the query axis
  int k_start, nk;
};

template <bool Varlen>
__device__ __forceinline__ Sequence sequence_of(int b, const int* ip, const int* cu_q, const int* cu_k) {
  Sequence s;
  if (Varlen) {
    s.tensor_batch = 0;
    s.q_start = cu_q[b];
    s.nq = cu_q[b + 1] - s.q_start;
    s.k_start = cu_k[b];
    s.nk = cu_k[b + 1] - s.k_start;
  } else {
    s.tensor_batch = b;
    s.q_start = 0;
    s.nq = ip[kSeqQ];
    s.k_start = 0;
    s.nk = ip[kSeqK];
  }
  return s;
}

// Batch b's valid keys [lo, hi): key_start[b] <= j < key_start[b] + key_len[b]
// clamped to the sequence's [0, nk). Any int32 values are allowed (the sum is
// formed in 64 bits); a range with no key gives lo = hi = 0, so every tile
// loop that starts at a tile boundary below lo still runs no tile.
__device__ __forceinline__ void batch_key_range(int b, int nk, const int* key_start, const int* key_len, int& lo,
                                                int& hi) {
  const long long start = key_start[b], end = start + (long long)key_len[b];
  lo = (int)min(max(start, 0ll), (long long)nk);
  hi = (int)min(max(end, 0ll), (long long)nk);
  if (hi <= lo) lo = hi = 0;
}

// Everything the logit rules need for one (sequence, query head).
template <typename MT>
struct LogitRules {
  int nq, nk;
  // Keys that exist for this row of the batch: [0, nk), or the part of it
  // inside key_start/key_len. Keys outside are dropped like keys past the end:
  // the tile bounds below never reach them, and apply_rules drops the ones
  // that share a tile with valid keys.
  int key_lo, key_hi;
  int left, right;        // window sides, -1 = unbounded
  float softcap;
  float inv_softcap;      // 1 / softcap: the fast path multiplies instead of dividing
  float slope;            // ALiBi slope of this (b, h)
  const MT* mask;         // additive/bool mask at (b, h), or nullptr
  long mask_row_stride;   // 0 when the mask broadcasts over queries
  int mask_col_stride;    // 0 when it broadcasts over keys
  const bool* bmask;      // block mask at (b, h)
  long bm_row_stride;
  int bm_col_stride;
  int block_q, block_k;

  // Key range [lo, hi) that rows [i0, i1] can see through window/causal and
  // the key range (empty when lo >= hi).
  __device__ __forceinline__ void key_range(int i0, int i1, int& lo, int& hi) const {
    int shift = nk - nq;
    lo = left >= 0 ? max(key_lo, i0 + shift - left) : key_lo;
    hi = right >= 0 ? min(key_hi, i1 + shift + right + 1) : key_hi;
  }
  // Query range [lo, hi) that can see keys [j0, j1] (lo == hi = 0 when none of
  // those keys exists for this row of the batch).
  __device__ __forceinline__ void query_range(int j0, int j1, int& lo, int& hi) const {
    j0 = max(j0, key_lo);
    j1 = min(j1, key_hi - 1);
    if (j0 > j1) {
      lo = hi = 0;
      return;
    }
    int shift = nk - nq;
    lo = right >= 0 ? max(0, j0 - right - shift) : 0;
    hi = left >= 0 ? min(nq, j1 + left - shift + 1) : nq;
  }
  __device__ __forceinline__ bool block_kept(int i, int j) const {
    return bmask[(long)(i / block_q) * bm_row_stride + (long)(j / block_k) * bm_col_stride];
  }
};

// key_start / key_len: the key-range inputs, read only when F::KeyRange.
template <typename MT, class F>
__device__ __forceinline__ LogitRules<MT> make_rules(
    const Sequence& seq, int b, int h, const int* ip, const float* fp,
    const MT* mask, const float* alibi, const bool* bmask,
    const int* key_start = nullptr, const int* key_len = nullptr) {
  LogitRules<MT> r;
  r.nq = seq.nq;
  r.nk = seq.nk;
  r.key_lo = 0;
  r.key_hi = seq.nk;
  if (F::KeyRange) batch_key_range(b, seq.nk, key_start, key_len, r.key_lo, r.key_hi);
  r.left = F::Window ? ip[kWindowLeft] : -1;
  r.right = F::Window ? ip[kWindowRight] : -1;
  r.softcap = fp[kSoftcap];
  r.inv_softcap = 1.f / r.softcap;
  r.slope = F::Alibi ? alibi[b * ip[kHeadsQ] + h] : 0.f;
  r.block_q = ip[kBlockQ];
  r.block_k = ip[kBlockK];
  r.mask = nullptr;
  r.bmask = nullptr;
  r.mask_row_stride = r.bm_row_stride = 0;
  r.mask_col_stride = r.bm_col_stride = 0;
  if (F::MaskKind != 0) {
    int mb = ip[kMaskB], mh = ip[kMaskH], mq = ip[kMaskQ], mk = ip[kMaskK];
    r.mask = mask + (((long)(mb > 1 ? b : 0) * mh + (mh > 1 ? h : 0)) * mq) * mk;
    r.mask_row_stride = mq > 1 ? mk : 0;
    r.mask_col_stride = mk > 1 ? 1 : 0;
  }
  if (F::BlockMask) {
    int bb = ip[kBmB], bh = ip[kBmH], bq = ip[kBmQ], bk = ip[kBmK];
    r.bmask = bmask + (((long)(bb > 1 ? b : 0) * bh + (bh > 1 ? h : 0)) * bq) * bk;
    r.bm_row_stride = bq > 1 ? bk : 0;
    r.bm_col_stride = bk > 1 ? 1 : 0;
  }
  return r;
}

// The contract's logit rules, in order: softcap, ALiBi, additive mask; then
// the drops (bool mask, window/causal, block mask, keys past the end or
// outside the key range: those first, so their k never matters).
// `s` is scale * q.k; returns the final logit or -inf for a dropped key.
// `capped` receives the logit right after softcap (the backward needs it).
// Fast == true (the 16-bit tensor-core kernels): tanh through one exp and
// one fast division, ~1e-7 absolute error (tanhf costs several times more
// and its extra accuracy is lost in fp16/bf16 P anyway). check_blocks ==
// false: the caller knows the tile lies inside one kept block-mask entry.
__device__ __forceinline__ float fast_tanh(float x) {
  return 1.f - __fdividef(2.f, __expf(2.f * x) + 1.f);
}

template <class F, typename MT, bool Fast = false>
__device__ __forceinline__ float apply_rules(const LogitRules<MT>& r, float s, int i, int j, float& capped,
                                             bool check_blocks = true) {
  capped = 0.f;
  if (j >= r.key_hi || (F::KeyRange && j < r.key_lo) || i >= r.nq) return kNegInf;
  if (F::Softcap) s = r.softcap * (Fast ? fast_tanh(s * r.inv_softcap) : tanhf(s / r.softcap));
  capped = s;
  int p = i + r.nk - r.nq;
  if (F::Alibi) s -= r.slope * fabsf((float)(p - j));
  if (F::MaskKind == 2) s += to_float(r.mask[(long)i * r.mask_row_stride + (long)j * r.mask_col_stride]);
  bool keep = true;
  if (F::MaskKind == 1) keep = keep && to_float(r.mask[(long)i * r.mask_row_stride + (long)j * r.mask_col_stride]) != 0.f;
  if (F::Window) {
    if (r.left >= 0) keep = keep && j >= p - r.left;
    if (r.right >= 0) keep = keep && j <= p + r.right;
  }
  if (F::BlockMask && check_blocks) keep = keep && r.block_kept(i, j);
  return keep ? s : kNegInf;
}

// Some key of tile [j0, j1) does not exist for this row of the batch (past
// the sequence's end, or outside its key range): the tile drops keys, so it
// needs the rules (and the non-finite checks of dropping tiles).
template <class F, typename MT>
__device__ __forceinline__ bool tile_cuts_keys(const LogitRules<MT>& r, int j0, int j1) {
  return j1 > r.key_hi || (F::KeyRange && j0 < r.key_lo);
}

// The live key tiles of one query block [i0, i_end) under a block mask, BN
// keys per tile from tile0: next(j0) is the first live tile start at or
// after j0 (hi if none). Liveness is filled 256 tiles at a time, every thread
// checking in parallel: one barrier pair per 256 tiles instead of one per
// tile. Every thread of the block calls next() together; `flags` is 256 bytes
// of shared memory. Without a block mask every tile is live and nothing syncs.
template <class F, typename MT, int BN, int NTHREADS>
struct LiveKeyTiles {
  const LogitRules<MT>& rules;
  unsigned char* flags;
  int i0, i_end, tile0, hi, nk;
  int chunk = -1;

  __device__ bool live(int j0) {
    if (!F::BlockMask) return true;
    const int tile = (j0 - tile0) / BN;
    if (tile / 256 != chunk) {
      chunk = tile / 256;
      __syncthreads();
      for (int e = threadIdx.x; e < 256; e += NTHREADS) {
        const int j = tile0 + (chunk * 256 + e) * BN;
        bool any = false;
        if (j < hi) {
          const int br0 = i0 / rules.block_q, br1 = (i_end - 1) / rules.block_q;
          const int bc0 = j / rules.block_k, bc1 = (min(j + BN, nk) - 1) / rules.block_k;
          for (int br = br0; br <= br1 && !any; ++br)
            for (int bc = bc0; bc <= bc1 && !any; ++bc)
              any = rules.bmask[(long)br * rules.bm_row_stride + (long)bc * rules.bm_col_stride];
        }
        flags[e] = any;
      }
      __syncthreads();
    }
    return flags[tile % 256] != 0;
  }
  __device__ int next(int j0) {
    while (j0 < hi && !live(j0)) j0 += BN;
    return j0;
  }
};

}  // namespace mlx_flash
