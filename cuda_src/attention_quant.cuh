// Attention straight from an affine-quantized K/V cache (mx.quantize's format,
// mlx-lm's QuantizedKVCache): forward (split over keys, merged by
// attention_combine of attention_simt.cuh) and the fused dq-only backward. SIMT, fp32
// arithmetic, every q dtype; K and V are dequantized in registers as they
// stream in, never written anywhere in full precision.
//
// Format: a token row of D values is a little-endian bit stream of D * BITS
// bits in D * BITS / 32 uint32 words (value c at bit c * BITS: 3-, 5- and
// 6-bit values straddle words); value c is scales[c / GS] * code + biases[c / GS].
// D and GS are multiples of 32, so 32 consecutive values are BITS whole words.
// The six arrays are read through their own strides (QuantCache), so the
// slices mlx-lm's QuantizedKVCache hands over are never copied.
//
// Work split: the rows of one KV head are ordered r = i * G + g (query i,
// group head g), RW consecutive rows per warp (a decode step's G heads share
// one warp and so every dequantized key). Each warp owns its rows and one key
// range (a split); a block is W independent warps. Two phases per 32-key tile:
// lane = key for q.k (the lane dequantizes its key's row from whole words,
// wide loads where BITS allows), lane = 4 value columns for P.V (coalesced
// across the warp). Non-finite contract (ARCHITECTURE.md): a dropped key's v
// (dq: its k) is never multiplied (a select on a per-key bit mask of the rows
// that kept it); a kept NaN/+inf logit marks the row bad -> NaN row.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"

namespace mlx_flash {

// Own names: attention_common.cuh may grow similar macros on other branches.
#define MLXF_QUANT_POS_INF (__int_as_float(0x7f800000))
#define MLXF_QUANT_NAN (__int_as_float(0x7fc00000))

// One quantized cache (K or V) as the kernels read it: mx.quantize's data
// words, scales and biases, each a [B, Hkv, Nk, *] view with its own element
// strides. The kernels are built with ensure_row_contiguous=False and take
// MLX's `<name>_strides` parameters (SA = MLX's Strides), so a slice such as
// mlx-lm's `keys[..., :offset, :]` of a preallocated buffer is read in place:
// a decode step never copies the cache. The strides stay references to the
// __grid_constant__ parameters (constant bank operands, no registers).
template <typename ST, class SA>
struct QuantCache {
  const unsigned* w;
  const ST* s;
  const ST* b;
  const SA& ws;
  const SA& ss;
  const SA& bs;
};

template <typename ST, class SA>
__device__ __forceinline__ QuantCache<ST, SA> quant_cache(const unsigned* w, const ST* s, const ST* b,
                                                          const SA& ws, const SA& ss, const SA& bs) {
  return QuantCache<ST, SA>{w, s, b, ws, ss, bs};
}

// The rows of one (batch, KV head) of a cache; token j's words, scales and
// biases start at words(j), scales(j), biases(j), their elements ws[3],
// ss[3], bs[3] apart (1 for any slice along the tokens).
template <typename ST, class SA>
struct QuantHead {
  const unsigned* w;
  const ST* s;
  const ST* b;
  const SA& ws;
  const SA& ss;
  const SA& bs;
  bool dense;  // unit-stride words, every row 16-byte aligned: vector loads

  __device__ __forceinline__ const unsigned* words(long j) const { return w + j * ws[2]; }
  __device__ __forceinline__ float scale(long j, int g) const { return to_float(s[j * ss[2] + g * ss[3]]); }
  __device__ __forceinline__ float bias(long j, int g) const { return to_float(b[j * bs[2] + g * bs[3]]); }
};

template <int BITS, typename ST, class SA>
__device__ __forceinline__ QuantHead<ST, SA> quant_head(const QuantCache<ST, SA>& c, int b, int h) {
  const unsigned* w = c.w + b * c.ws[0] + h * c.ws[1];
  // Rows hold a multiple of 4 words when BITS is a multiple of 4; any view
  // whose token stride keeps that and whose start is aligned loads 16 bytes at a time.
  const bool dense = BITS % 4 == 0 && c.ws[3] == 1 && c.ws[2] % 4 == 0 &&
                     (reinterpret_cast<unsigned long long>(w) & 15) == 0;
  return QuantHead<ST, SA>{w, c.s + b * c.ss[0] + h * c.ss[1], c.b + b * c.bs[0] + h * c.bs[1],
                           c.ws, c.ss, c.bs, dense};
}

// The BITS words holding 32 consecutive values (word aligned, `wd` apart):
// 16-byte loads when the row is dense (BITS a multiple of 4, unit stride,
// aligned), word by word otherwise.
template <int BITS>
__device__ __forceinline__ void load_words32(const unsigned* p, long wd, bool dense, unsigned (&w)[BITS]) {
  if (BITS % 4 == 0 && dense) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 x = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = x.x;
      w[4 * i + 1] = x.y;
      w[4 * i + 2] = x.z;
      w[4 * i + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = p[i * wd];
  }
}

// Code e (0..31, a compile-time constant once unrolled) of 32 values in w.
template <int BITS>
__device__ __forceinline__ unsigned code_of(const unsigned (&w)[BITS], int e) {
  const int bit = e * BITS, i = bit >> 5, sh = bit & 31;
  unsigned x = w[i] >> sh;
  if (sh + BITS > 32) x |= w[i + 1] << (32 - sh);
  return x & ((1u << BITS) - 1u);
}

// Values c..c+3 (c a multiple of 4) of one token from its row of words w
// (elements wd apart) and the scale and bias of their group.
template <int BITS>
__device__ __forceinline__ void unpack4(const unsigned* w, long wd, int c, float s, float b, float (&out)[4]) {
  const int bit = c * BITS, i = bit >> 5, sh = bit & 31;
  unsigned long long x = w[i * wd];
  if (sh + 4 * BITS > 32) x |= (unsigned long long)w[(i + 1) * wd] << 32;
  x >>= sh;
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = fmaf(s, (float)(unsigned)((x >> (e * BITS)) & ((1u << BITS) - 1u)), b);
}

// Values c..c+3 (c a multiple of 4) of token j, straight from its words.
template <int BITS, int GS, typename ST, class SA>
__device__ __forceinline__ void dequant4(const QuantHead<ST, SA>& m, long j, int c, float (&out)[4]) {
  unpack4<BITS>(m.words(j), m.ws[3], c, m.scale(j, c / GS), m.bias(j, c / GS), out);
}

// Keys of V one warp of the forward stages in shared memory at a time: a
// 32-key tile where its raw words, scales and biases fit in 6 KiB (Dv <= 128
// at 8 bits), else 8 (at most 5 KiB a warp up to Dv 512; the scales and
// biases of a stage stay within 2 registers a lane). backends/cuda_quant.py
// (stage_keys) mirrors this.
__host__ __device__ constexpr int quant_stage_keys(int dv, int bits, int gs) {
  return (dv * bits / 8 + 8 * (dv / gs)) * 32 <= 6144 ? 32 : 8;
}

// VS keys of V (tokens j0.., those at or past `end` zero) as raw words,
// scales and biases in the warp's shared-memory stage. Dense rows (4- and
// 8-bit, unit stride, aligned) copy their words with cp.async, issued before
// the tile's K is read so that both wait for memory together and no register
// holds them; other rows load word by word after q.k. Scales and biases (2
// bytes each) go through registers. Either way a tile waits for memory once,
// not once per key.
template <int DV, int BITS, int GS, int VS>
struct VStage {
  static constexpr int WPR = DV * BITS / 32, NG = DV / GS;
  static constexpr int NS = (VS * NG + 31) / 32;
  static constexpr int FLOATS = VS * (WPR + 2 * NG);  // shared-memory words of a stage
  float s[NS], b[NS];

  // Dense rows: the words' cp.async copies (one commit group) and the scales and biases.
  template <typename ST, class SA>
  __device__ __forceinline__ void issue(const QuantHead<ST, SA>& m, long j0, long end, int lane, unsigned* stage) {
    if (BITS % 4 == 0 && m.dense) {
      constexpr int Q = BITS % 4 == 0 ? WPR / 4 : 1;  // 16-byte chunks of a row
#pragma unroll
      for (int i = 0; i < (VS * Q + 31) / 32; ++i) {
        const int idx = lane + 32 * i, kk = idx / Q;
        if (idx < VS * Q) {
          const bool in = j0 + kk < end;
          cp_async16(stage + 4 * idx, m.words(in ? j0 + kk : j0) + 4 * (idx % Q), in);
        }
      }
      cp_async_commit();
    }
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int idx = lane + 32 * i, kk = idx / NG;
      const bool in = idx < VS * NG && j0 + kk < end;
      s[i] = in ? m.scale(j0 + kk, idx % NG) : 0.f;
      b[i] = in ? m.bias(j0 + kk, idx % NG) : 0.f;
    }
  }

  // Completes the stage: waits for the copies (dense) or loads the words
  // (strided views, 3/5/6 bits), stores the scales and biases.
  template <typename ST, class SA>
  __device__ __forceinline__ void land(const QuantHead<ST, SA>& m, long j0, long end, int lane, unsigned* stage) {
    if (BITS % 4 == 0 && m.dense) {
      cp_async_wait<0>();
    } else {
      const long wd = m.ws[3];
#pragma unroll 4
      for (int idx = lane; idx < VS * WPR; idx += 32) {
        const int kk = idx / WPR;
        stage[idx] = j0 + kk < end ? m.words(j0 + kk)[(idx % WPR) * wd] : 0u;
      }
    }
    float* sf = reinterpret_cast<float*>(stage + VS * WPR);
#pragma unroll
    for (int i = 0; i < NS; ++i)
      if (lane + 32 * i < VS * NG) {
        sf[lane + 32 * i] = s[i];
        sf[VS * NG + lane + 32 * i] = b[i];
      }
  }

  // Stage layout: words [VS][WPR], then scales [VS][NG], then biases [VS][NG].
  // Values c..c+3 of staged key kk.
  __device__ __forceinline__ static void values(const unsigned* stage, int kk, int c, float (&out)[4]) {
    const float* sf = reinterpret_cast<const float*>(stage + VS * WPR);
    unpack4<BITS>(stage + kk * WPR, 1, c, sf[kk * NG + c / GS], sf[VS * NG + kk * NG + c / GS], out);
  }
};

// dot[t] += rows[t] . x over the D values of token j (lane = key): rows are
// RW float rows of shared memory (stride D).
template <int D, int BITS, int GS, int RW, typename ST, class SA>
__device__ __forceinline__ void quant_row_dots(const QuantHead<ST, SA>& m, long j, const float* rows,
                                               float (&dot)[RW]) {
  const unsigned* words = m.words(j);
  const long wd = m.ws[3];
#pragma unroll
  for (int blk = 0; blk < D / 32; ++blk) {
    unsigned w[BITS];
    load_words32<BITS>(words + blk * BITS * wd, wd, m.dense, w);
    const float s = m.scale(j, blk * 32 / GS), b = m.bias(j, blk * 32 / GS);
#pragma unroll
    for (int e = 0; e < 32; e += 4) {
      float x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) x[u] = fmaf(s, (float)code_of<BITS>(w, e + u), b);
#pragma unroll
      for (int t = 0; t < RW; ++t) {
        const float4 r = *reinterpret_cast<const float4*>(rows + t * D + blk * 32 + e);
        dot[t] = fmaf(r.x, x[0], fmaf(r.y, x[1], fmaf(r.z, x[2], fmaf(r.w, x[3], dot[t]))));
      }
    }
  }
}

// The rows and keys one warp owns, and the logit rules of each row: the
// rules of the warp's first head, with the ALiBi slope and mask rows of each
// row's own head (all that differs between heads: few registers per row).
template <typename MT, class F, int RW>
struct QuantWarp {
  int b, kvh, G, Nq, Nk, Hq, Hkv;
  int r0, nrows;  // first row (i * G + g order) and rows of the KV head
  LogitRules<MT> base;
  float slope[F::Alibi ? RW : 1];
  const MT* mask[F::MaskKind != 0 ? RW : 1];

  __device__ __forceinline__ int query(int t) const { return (r0 + t) / G; }
  __device__ __forceinline__ int head(int t) const { return kvh * G + (r0 + t) % G; }
  __device__ __forceinline__ bool valid(int t) const { return r0 + t < nrows; }
  // Row index into [B, Hq, Nq].
  __device__ __forceinline__ long out_row(int t) const { return ((long)b * Hq + head(t)) * Nq + query(t); }
  __device__ __forceinline__ float logit(int t, float s, int j, float& capped) const {
    LogitRules<MT> r = base;
    if (F::Alibi) r.slope = slope[t];
    if (F::MaskKind != 0) r.mask = mask[t];
    return apply_rules<F, MT>(r, s, query(t), j, capped);
  }
};

template <typename MT, class F, int RW>
__device__ __forceinline__ void init_warp(QuantWarp<MT, F, RW>& w, int group, const int* ip, const float* fp,
                                          const MT* mask, const float* alibi) {
  w.Hq = ip[kHeadsQ];
  w.Hkv = ip[kHeadsKv];
  w.Nq = ip[kSeqQ];
  w.Nk = ip[kSeqK];
  w.G = w.Hq / w.Hkv;
  w.b = blockIdx.z / w.Hkv;
  w.kvh = blockIdx.z % w.Hkv;
  w.r0 = group * RW;
  w.nrows = w.G * w.Nq;
  Sequence seq;
  seq.tensor_batch = w.b;
  seq.q_start = seq.k_start = 0;
  seq.nq = w.Nq;
  seq.nk = w.Nk;
  w.base = make_rules<MT, F>(seq, w.b, w.head(0), ip, fp, mask, alibi, nullptr);
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    if (F::Alibi || F::MaskKind != 0) {
      const LogitRules<MT> r = make_rules<MT, F>(seq, w.b, w.valid(t) ? w.head(t) : w.head(0), ip, fp, mask,
                                                 alibi, nullptr);
      if (F::Alibi) w.slope[F::Alibi ? t : 0] = r.slope;
      if (F::MaskKind != 0) w.mask[F::MaskKind != 0 ? t : 0] = r.mask;
    }
  }
}

// Keys [lo, hi) any valid row of the warp can see (window/causal).
template <typename MT, class F, int RW>
__device__ __forceinline__ void warp_key_range(const QuantWarp<MT, F, RW>& w, int& lo, int& hi) {
  const int last = min(w.r0 + RW, w.nrows) - 1;
  w.base.key_range(w.r0 / w.G, last / w.G, lo, hi);
}

// Copy the warp's RW rows of x ([B, Hq, Nq, DIM], rows beyond the end zero) to
// shared memory as float.
template <typename T, int DIM, typename MT, class F, int RW>
__device__ __forceinline__ void stage_rows(const QuantWarp<MT, F, RW>& w, const T* x, float* dst, int lane) {
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    const T* src = x + w.out_row(t) * DIM;
    for (int d = lane; d < DIM; d += 32) dst[t * DIM + d] = w.valid(t) ? to_float(src[d]) : 0.f;
  }
  __syncwarp();
}

// Forward: a block's W warps take the same RW rows and W consecutive key
// chunks, merge their online softmaxes in shared memory, and write one
// normalised partial output and its lse per row for the block's split
// (part_o [splits][B * Hq * Nq][DV], part_lse [splits][B * Hq * Nq], splits =
// ns[0] blocks per row group): W times fewer partials for the combine to
// read than one per warp. NaN for a row that met a NaN or +inf logit, lse
// -inf for a row with no kept key.
template <typename T, typename KST, typename VST, typename MT, class F, int D, int DV, int BITS, int GS, int W,
          int RW, class SA>
__device__ void attention_quant_fwd(
    const T* q, const QuantCache<KST, SA>& kc, const QuantCache<VST, SA>& vc, const MT* mask,
    const float* alibi, const int* ip, const float* fp, const int* ns, float* part_o, float* part_lse) {
  constexpr int NU = (DV / 4 + 31) / 32;  // value quads per lane
  extern __shared__ __align__(16) unsigned char quant_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int block_splits = ns[0], split_block = blockIdx.x % block_splits;
  const int splits = block_splits * W, split = split_block * W + warp;  // this warp's key chunk
  QuantWarp<MT, F, RW> w;
  const int Hq = ip[kHeadsQ], Nq = ip[kSeqQ];
  init_warp(w, blockIdx.x / block_splits, ip, fp, mask, alibi);
  constexpr int VS = quant_stage_keys(DV, BITS, GS);
  using Stage = VStage<DV, BITS, GS, VS>;
  float* qs = reinterpret_cast<float*>(quant_smem) + warp * RW * D;
  // After the key loop: each warp's accumulators [W][RW][DV], then m and l [W][RW];
  // then each warp's V stage (forward_plan in backends/cuda_quant.py sizes it).
  // The stages start 16-byte aligned (cp.async) when W * RW * (D + DV + 2)
  // is a multiple of 4: D and DV are multiples of 32, so W even suffices.
  static_assert(W % 2 == 0, "attention_quant_fwd: an even number of warps per block");
  float* red_acc = reinterpret_cast<float*>(quant_smem) + W * RW * D;
  float* red_m = red_acc + W * RW * DV;
  float* red_l = red_m + W * RW;
  unsigned* vstage = reinterpret_cast<unsigned*>(red_l + W * RW) + warp * Stage::FLOATS;
  stage_rows<T, D>(w, q, qs, lane);
  const float scale = fp[kScale];

  int lo, hi;
  warp_key_range(w, lo, hi);
  const int chunk = (max(hi - lo, 0) + splits - 1) / splits;
  const int chunk32 = (chunk + 31) / 32 * 32;
  const int start = lo + split * chunk32, end = min(hi, start + chunk32);

  const QuantHead<KST, SA> kh = quant_head<BITS>(kc, w.b, w.kvh);
  const QuantHead<VST, SA> vh = quant_head<BITS>(vc, w.b, w.kvh);
  float m[RW], l[RW], acc[RW][NU][4];
  bool bad[RW];
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    m[t] = kNegInf;
    l[t] = 0.f;
    bad[t] = false;
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][u][e] = 0.f;
  }

  for (int j0 = start; j0 < end; j0 += 32) {
    const int j = j0 + lane;
    // The tile's first V stage is requested before K is read (the previous
    // tile's reads of the stage ended at its last __syncwarp), so the two wait
    // for memory together; it is completed after q.k. Rows wider than 256
    // request it after q.k: their accumulators leave no register to spare.
    constexpr bool kEarlyStage = DV <= 256;
    Stage first;
    if (kEarlyStage) first.issue(vh, j0, end, lane, vstage);
    float dot[RW];
#pragma unroll
    for (int t = 0; t < RW; ++t) dot[t] = 0.f;
    if (j < end) quant_row_dots<D, BITS, GS, RW>(kh, j, qs, dot);
    if (!kEarlyStage) first.issue(vh, j0, end, lane, vstage);
    first.land(vh, j0, end, lane, vstage);
    // Logits; a bit per row that keeps this lane's key.
    float p[RW];
    unsigned kept = 0;
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      float capped, s = kNegInf;
      if (j < end && w.valid(t)) s = w.logit(t, scale * dot[t], j, capped);
      const bool nonfinite = s != s || s == MLXF_QUANT_POS_INF;
      bad[t] = bad[t] || __any_sync(0xffffffffu, nonfinite);
      if (nonfinite) s = kNegInf;  // the row is NaN anyway; keep the arithmetic finite
      if (s != kNegInf) kept |= 1u << t;
      const float m_new = fmaxf(m[t], warp_max(s));
      p[t] = 0.f;
      if (m_new != kNegInf) {  // warp-uniform
        const float alpha = expf(m[t] - m_new);
        p[t] = expf(s - m_new);
        l[t] = l[t] * alpha + warp_sum(p[t]);
#pragma unroll
        for (int u = 0; u < NU; ++u)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[t][u][e] *= alpha;
        m[t] = m_new;
      }
    }
    // P.V, lane = value columns; a key no row kept is skipped, and a row
    // that dropped a key never multiplies its v (select, not 0 * v).
    const int keys = min(32, end - j0);
    for (int sb = 0; sb < keys; sb += VS) {
      if (sb > 0) {  // wider rows: the tile's later stages (VS < 32)
        Stage next;
        next.issue(vh, j0 + sb, end, lane, vstage);
        next.land(vh, j0 + sb, end, lane, vstage);
      }
      __syncwarp();
      const int n = min(VS, keys - sb);
      for (int kk = 0; kk < n; ++kk) {
        const int jj = sb + kk;
        const unsigned kj = __shfl_sync(0xffffffffu, kept, jj);
        if (kj == 0) continue;  // warp-uniform
        float pj[RW];
#pragma unroll
        for (int t = 0; t < RW; ++t) pj[t] = __shfl_sync(0xffffffffu, p[t], jj);
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const int c = 4 * (lane + 32 * u);
          if (c < DV) {
            float x[4];
            Stage::values(vstage, kk, c, x);
#pragma unroll
            for (int t = 0; t < RW; ++t)
              if ((kj >> t) & 1u)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[t][u][e] = fmaf(pj[t], x[e], acc[t][u][e]);
          }
        }
      }
      __syncwarp();  // every lane's reads of this stage are done before the next store
    }
  }

  // Merge the block's W warps (unnormalised accumulators; m = NaN marks a bad row).
#pragma unroll
  for (int t = 0; t < RW; ++t) {
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int c = 4 * (lane + 32 * u);
      if (c < DV)
#pragma unroll
        for (int e = 0; e < 4; ++e) red_acc[(warp * RW + t) * DV + c + e] = acc[t][u][e];
    }
    if (lane == 0) {
      red_m[warp * RW + t] = bad[t] ? MLXF_QUANT_NAN : m[t];
      red_l[warp * RW + t] = l[t];
    }
  }
  __syncthreads();
  const long total_rows = (long)ip[kBatch] * Hq * Nq;
  for (int e = threadIdx.x; e < RW * DV; e += 32 * W) {
    const int t = e / DV, c = e % DV;
    if (!w.valid(t)) continue;
    float mm = kNegInf;
    bool nan = false;
    for (int v = 0; v < W; ++v) {
      const float x = red_m[v * RW + t];
      nan = nan || x != x;
      mm = fmaxf(mm, x);
    }
    float o = 0.f, ll = 0.f;
    if (!nan && mm != kNegInf) {
      for (int v = 0; v < W; ++v) {
        const float x = red_m[v * RW + t];
        if (x == kNegInf) continue;  // a warp that kept no key holds nothing
        const float f = expf(x - mm);
        ll = fmaf(red_l[v * RW + t], f, ll);
        o = fmaf(red_acc[(v * RW + t) * DV + c], f, o);
      }
    }
    const long prow = split_block * total_rows + w.out_row(t);
    part_o[prow * DV + c] = nan ? MLXF_QUANT_NAN : (ll > 0.f ? o / ll : 0.f);
    if (c == 0) part_lse[prow] = nan ? MLXF_QUANT_NAN : (ll > 0.f ? mm + logf(ll) : kNegInf);
  }
}

// Backward, dq only (k and v are a constant cache): one warp owns RW rows and
// every key they see, so dq needs no atomics. delta = dO . O - dlse (caller).
// dS_ij = P_ij (dO_i . v_j - delta_i) (times softcap's 1 - tanh^2), P_ij =
// exp(s_ij - lse_i); dq_i = scale * sum_j dS_ij k_j over the kept keys.
template <typename T, typename KST, typename VST, typename MT, class F, int D, int DV, int BITS, int GS, int W,
          int RW, class SA>
__device__ void attention_quant_bwd(
    const T* q, const QuantCache<KST, SA>& kc, const QuantCache<VST, SA>& vc, const MT* mask,
    const float* alibi, const int* ip, const float* fp, const float* lse, const float* delta, const T* dout,
    T* dq) {
  constexpr int NU = (D / 4 + 31) / 32;  // dq quads per lane
  extern __shared__ __align__(16) unsigned char quant_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  QuantWarp<MT, F, RW> w;
  const int item = blockIdx.x * W + warp;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], Nq = ip[kSeqQ];
  const int groups = ((Hq / Hkv) * Nq + RW - 1) / RW;
  if (item >= groups) return;
  init_warp(w, item, ip, fp, mask, alibi);
  float* qs = reinterpret_cast<float*>(quant_smem) + warp * RW * (D + DV);
  float* dos = qs + RW * D;
  stage_rows<T, D>(w, q, qs, lane);
  stage_rows<T, DV>(w, dout, dos, lane);
  const float scale = fp[kScale], softcap = fp[kSoftcap];
  float row_lse[RW], row_delta[RW], acc[RW][NU][4];
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    row_lse[t] = w.valid(t) ? lse[w.out_row(t)] : 0.f;
    row_delta[t] = w.valid(t) ? delta[w.out_row(t)] : 0.f;
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][u][e] = 0.f;
  }
  int lo, hi;
  warp_key_range(w, lo, hi);
  const QuantHead<KST, SA> kh = quant_head<BITS>(kc, w.b, w.kvh);
  const QuantHead<VST, SA> vh = quant_head<BITS>(vc, w.b, w.kvh);
  for (int j0 = lo; j0 < hi; j0 += 32) {
    const int j = j0 + lane;
    float dot[RW], dp[RW];
#pragma unroll
    for (int t = 0; t < RW; ++t) dot[t] = dp[t] = 0.f;
    if (j < hi) {
      quant_row_dots<D, BITS, GS, RW>(kh, j, qs, dot);
      quant_row_dots<DV, BITS, GS, RW>(vh, j, dos, dp);
    }
    float ds[RW];
    unsigned kept = 0;
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      float capped = 0.f, s = kNegInf;
      if (j < hi && w.valid(t)) s = w.logit(t, scale * dot[t], j, capped);
      ds[t] = 0.f;
      if (s != kNegInf) {  // a kept key (NaN logits included: they give NaN, as materialised)
        kept |= 1u << t;
        float g = expf(s - row_lse[t]) * (dp[t] - row_delta[t]);
        if (F::Softcap) {
          const float th = capped / softcap;
          g *= 1.f - th * th;
        }
        ds[t] = g * scale;
      }
    }
    const int keys = min(32, hi - j0);
    for (int jj = 0; jj < keys; ++jj) {
      const unsigned kj = __shfl_sync(0xffffffffu, kept, jj);
      if (kj == 0) continue;
      float g[RW];
#pragma unroll
      for (int t = 0; t < RW; ++t) g[t] = __shfl_sync(0xffffffffu, ds[t], jj);
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int c = 4 * (lane + 32 * u);
        if (c < D) {
          float x[4];
          dequant4<BITS, GS>(kh, j0 + jj, c, x);
#pragma unroll
          for (int t = 0; t < RW; ++t)
            if ((kj >> t) & 1u)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[t][u][e] = fmaf(g[t], x[e], acc[t][u][e]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    if (!w.valid(t)) continue;
    T* dst = dq + w.out_row(t) * D;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int c = 4 * (lane + 32 * u);
      if (c < D)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[c + e] = from_float<T>(acc[t][u][e]);
    }
  }
}

}  // namespace mlx_flash
