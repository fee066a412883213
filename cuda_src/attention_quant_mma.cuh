// Tensor-core forward of flash_attention_quantized for 16-bit q (a prefill
// chunk: many query rows per head). Each block owns 16 * NW consecutive query
// rows of one head; per tile of BN keys the threads dequantize K and V into
// shared memory as q's dtype (fp32 arithmetic, one rounding, as
// mx.dequantize with 16-bit scales rounds), then every warp runs S = Q K^T
// and O += P V on mma.sync (m16n8k16, fp32 accumulation) with the online
// softmax between, as attention_fwd_mma.cuh does for float caches.
//
// Staging (the kernel would otherwise wait on one dependent load after
// another): each thread owns whole 32-value chunks of a tile (BITS words,
// 16-byte loads when the view allows, plus the chunk's one scale and bias).
// The next tile's raw chunks are loaded into registers before the current
// tile's S / softmax / P V and only dequantized (16-byte shared stores) after
// it, so the loads are in flight while the tensor cores work.
//
// Non-finite contract: the logit rules turn every dropped (row, key) pair's
// logit into -inf (whatever K holds); a kept NaN/+inf logit marks its row
// NaN. P V on tensor cores would multiply a dropped key's v by P = 0, so a
// tile whose dequantized V may hold a non-finite value (rare: a NaN or huge
// scale) takes an exact element path that selects instead.
#pragma once

#include "attention_quant.cuh"
#include "mma.cuh"

namespace mlx_flash {

// One thread's raw share of a K or V tile: CH chunks of 32 values (chunk e =
// threadIdx.x + u * NT is row e / (D / 32), values 32 * (e % (D / 32)) on).
// A chunk's scale and bias as staged: 16-bit ones packed in one register
// (the staged tiles are what keep 8-bit tiles of 8 warps from spilling).
template <typename ST>
struct StagedScaleBias {
  ST s, b;
  __device__ __forceinline__ void set(ST s_, ST b_) { s = s_; b = b_; }
  __device__ __forceinline__ float scale() const { return to_float(s); }
  __device__ __forceinline__ float bias() const { return to_float(b); }
};
template <typename H>
struct StagedScaleBias16 {
  unsigned sb;
  __device__ __forceinline__ static unsigned bits(H x) { return *reinterpret_cast<const unsigned short*>(&x); }
  __device__ __forceinline__ static H value(unsigned u) {
    const unsigned short x = static_cast<unsigned short>(u);
    return *reinterpret_cast<const H*>(&x);
  }
  __device__ __forceinline__ void set(H s_, H b_) { sb = bits(s_) | bits(b_) << 16; }
  __device__ __forceinline__ float scale() const { return to_float(value(sb & 0xffffu)); }
  __device__ __forceinline__ float bias() const { return to_float(value(sb >> 16)); }
};
template <>
struct StagedScaleBias<__half> : StagedScaleBias16<__half> {};
template <>
struct StagedScaleBias<__nv_bfloat16> : StagedScaleBias16<__nv_bfloat16> {};

template <typename ST, int BITS, int CH>
struct QuantTileRegs {
  unsigned w[CH][BITS];
  StagedScaleBias<ST> sb[CH];
};

// Loads (no use yet: independent, in flight until dequant_tile) the chunks of
// keys j0.. of one head; keys at or past `hi` and chunks past the tile read
// as zero codes with a zero scale and bias (value 0).
template <int D, int BITS, int GS, int BN, int NT, int CH, typename ST, class SA>
__device__ __forceinline__ void load_tile(const QuantHead<ST, SA>& m, int j0, int hi,
                                          QuantTileRegs<ST, BITS, CH>& t) {
  constexpr int CPR = D / 32;
  const long wd = m.ws[3];
#pragma unroll
  for (int u = 0; u < CH; ++u) {
    const int e = threadIdx.x + u * NT, r = e / CPR, cb = e % CPR;
    const long j = j0 + r;
    if ((CH * NT == BN * CPR || e < BN * CPR) && j < hi) {
      load_words32<BITS>(m.words(j) + cb * BITS * wd, wd, m.dense, t.w[u]);
      t.sb[u].set(m.s[j * m.ss[2] + (cb * 32 / GS) * m.ss[3]], m.b[j * m.bs[2] + (cb * 32 / GS) * m.bs[3]]);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) t.w[u][i] = 0u;
      t.sb[u].set(from_float<ST>(0.f), from_float<ST>(0.f));
    }
  }
}

// Code e of 32 values as an exact float: the 23-bit mantissa trick (2^23 + code
// minus 2^23) in place of an int-to-float conversion (a quarter-rate unit).
template <int BITS>
__device__ __forceinline__ float code_float(const unsigned (&w)[BITS], int e) {
  return __uint_as_float(0x4b000000u | code_of<BITS>(w, e)) - 8388608.f;
}

// Both 16-bit values of a pack2 register finite.
template <typename T>
__device__ __forceinline__ bool pair_finite(unsigned x) {
  constexpr unsigned e = MmaType<T>::is_bf16 ? 0x7f80u : 0x7c00u;
  return (x & e) != e && ((x >> 16) & e) != e;
}

// Dequantizes the staged chunks into dst ([BN][DP] of T): fp32 fma, one
// rounding, 16-byte shared stores. Returns (when CHECK) whether any chunk may
// hold a non-finite value: the values of a chunk are monotone in the code, so
// its rounded extremes (codes 0 and 2^BITS - 1) bound them all (a chunk that
// only could overflow also takes the exact path: slower, still exact).
template <typename T, bool CHECK, int D, int DP, int BITS, int BN, int NT, int CH, typename ST>
__device__ __forceinline__ bool dequant_tile(const QuantTileRegs<ST, BITS, CH>& t, T* dst) {
  constexpr int CPR = D / 32;
  bool nonfinite = false;
#pragma unroll
  for (int u = 0; u < CH; ++u) {
    const int e = threadIdx.x + u * NT;
    if (CH * NT == BN * CPR || e < BN * CPR) {
      const float s = t.sb[u].scale(), b = t.sb[u].bias();
      uint4* d = reinterpret_cast<uint4*>(dst + (e / CPR) * DP + 32 * (e % CPR));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        unsigned p[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const int c = 8 * i + 2 * h;
          p[h] = pack2<T>(fmaf(s, code_float<BITS>(t.w[u], c), b), fmaf(s, code_float<BITS>(t.w[u], c + 1), b));
        }
        d[i] = make_uint4(p[0], p[1], p[2], p[3]);
      }
      if (CHECK) nonfinite = nonfinite || !pair_finite<T>(pack2<T>(b, fmaf(s, float((1u << BITS) - 1u), b)));
    }
  }
  return nonfinite;
}

template <typename T, typename KST, typename VST, typename MT, class F, int D, int DV, int BITS, int GS, int NW,
          int BN, class SA>
__device__ void attention_quant_fwd_mma(
    const T* q, const QuantCache<KST, SA>& kc, const QuantCache<VST, SA>& vc, const MT* mask,
    const float* alibi, const float* sinks, const int* ip, const float* fp, T* out, float* lse) {
  constexpr int NT = 32 * NW, BM = 16 * NW;
  constexpr int DP = D + 8, DVP = DV + 8;  // padded rows: ldmatrix without bank conflicts
  constexpr int SN = BN / 8, ON = DV / 8, KD = D / 16;
  extern __shared__ __align__(16) unsigned char quant_smem[];
  T* q_s = reinterpret_cast<T*>(quant_smem);
  T* k_s = q_s + BM * DP;      // [2][BN][DP]: two stages
  T* v_s = k_s + 2 * BN * DP;  // [2][BN][DVP]
  float* p_s = reinterpret_cast<float*>(v_s + 2 * BN * DVP);  // [NW][16][BN], the exact P.V path only

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], Nq = ip[kSeqQ], Nk = ip[kSeqK];
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / (Hq / Hkv);
  const int i0 = blockIdx.x * BM;
  Sequence seq;
  seq.tensor_batch = b;
  seq.q_start = seq.k_start = 0;
  seq.nq = Nq;
  seq.nk = Nk;
  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, nullptr);
  const float scale = fp[kScale], scale_log2 = scale * kLog2e;

  // Q tile (rows past the end zero; the first tile's barrier publishes it).
  const T* q_bh = q + ((long)b * Hq + h) * Nq * D;
  for (int e = threadIdx.x; e < BM * D; e += NT) {
    const int r = e / D, c = e % D;
    q_s[r * DP + c] = i0 + r < Nq ? q_bh[(long)(i0 + r) * D + c] : from_float<T>(0.f);
  }
  // The warp's A fragments are re-read from q_s every tile (8 ldmatrix a
  // tile for D = 128), not held: the registers go to the staged next tile.
  const T* qa_s = q_s + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * DP + (lane >> 4) * 8;

  int lo, hi;
  rules.key_range(i0, min(i0 + BM, Nq) - 1, lo, hi);
  const QuantHead<KST, SA> kh = quant_head<BITS>(kc, b, kvh);
  const QuantHead<VST, SA> vh = quant_head<BITS>(vc, b, kvh);
  // Rows g and g + 8 of this warp's 16.
  const int row_a = i0 + warp * 16 + g, row_b = row_a + 8;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};  // m in log2 units
  float acc[ON][4];
#pragma unroll
  for (int n = 0; n < ON; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

  constexpr int CHK = (BN * (D / 32) + NT - 1) / NT, CHV = (BN * (DV / 32) + NT - 1) / NT;
  QuantTileRegs<KST, BITS, CHK> kt;
  QuantTileRegs<VST, BITS, CHV> vt;
  // Two shared stages: tile t is computed from stage t % 2 while the warps
  // that finish it dequantize tile t + 1 into the other (one barrier a tile).
  bool next_nonfinite = false;
  if (lo < hi) {
    load_tile<D, BITS, GS, BN, NT>(kh, lo, hi, kt);
    load_tile<DV, BITS, GS, BN, NT>(vh, lo, hi, vt);
    dequant_tile<T, false, D, DP, BITS, BN, NT>(kt, k_s);
    next_nonfinite = dequant_tile<T, true, DV, DVP, BITS, BN, NT>(vt, v_s);
    if (lo + BN < hi) {
      load_tile<D, BITS, GS, BN, NT>(kh, lo + BN, hi, kt);
      load_tile<DV, BITS, GS, BN, NT>(vh, lo + BN, hi, vt);
    }
  }
  int stage = 0;
  for (int j0 = lo; j0 < hi; j0 += BN, stage ^= 1) {
    // This tile's stage is written (and Q, before the first); the other
    // stage's previous tile is consumed.
    const bool v_nonfinite = __syncthreads_or(next_nonfinite);
    const T* k_t = k_s + stage * BN * DP;
    const T* v_t = v_s + stage * BN * DVP;

    // S = Q K^T for this warp's 16 rows.
    float s[SN][4];
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk += 2) {
      unsigned qa[2][4];
      ldmatrix_x4(qa[0], qa_s + kk * 16);
      ldmatrix_x4(qa[1], qa_s + (kk + 1) * 16);
#pragma unroll
      for (int n = 0; n < SN; ++n) {
        unsigned bf[4];
        ldmatrix_x4(bf, k_t + (n * 8 + (lane & 7)) * DP + kk * 16 + (lane >> 3) * 8);
        mma16816<T>(s[n], qa[0], bf[0], bf[1]);
        mma16816<T>(s[n], qa[1], bf[2], bf[3]);
      }
    }
    // Logit rules only where the tile needs them (per-element rules, or a
    // pair of this warp's rows that may be dropped: the tile crosses the
    // window/causal edge or the key range's end), then the online softmax in
    // the log2 domain. A kept NaN / +inf logit needs no flag: its P
    // (exp2(NaN), exp2(inf - inf)) and so its row's l become NaN, checked at
    // the end.
    const int wi0 = i0 + warp * 16, wi1 = min(wi0 + 15, Nq - 1);
    const bool inside = (rules.left < 0 || j0 >= wi1 + (Nk - Nq) - rules.left) &&
                        (rules.right < 0 || j0 + BN - 1 <= wi0 + (Nk - Nq) + rules.right);
    const bool need_rules = F::ElementRules || j0 + BN > hi || !inside;
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * scale_log2;
        if (need_rules) {
          const int i = e < 2 ? row_a : row_b, j = j0 + n * 8 + 2 * t4 + (e & 1);
          float capped;
          x = j < hi ? apply_rules<F, MT>(rules, scale * s[n][e], i, j, capped) * kLog2e : kNegInf;
        }
        s[n][e] = x;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
      }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tm = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
      const float m_new = fmaxf(m[r], tm);
      base[r] = m_new == kNegInf ? 0.f : m_new;  // exp2(-inf - base) = 0: no select per element
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[n][e] - base[e >> 1]);
        // The exact path needs to know the dropped pairs: P = -1 marks them.
        if (v_nonfinite) p_s[(warp * 16 + g + (e >> 1) * 8) * BN + n * 8 + 2 * t4 + (e & 1)] =
            s[n][e] == kNegInf ? -1.f : p;
        s[n][e] = p;
        rs[e >> 1] += p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
      rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
      l[r] = l[r] * alpha[r] + rs[r];
    }
#pragma unroll
    for (int n = 0; n < ON; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] *= alpha[e >> 1];

    if (!v_nonfinite) {
      // O += P V: P's C fragments become A fragments (16 keys per k-step).
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned pa[4];
        pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int n = 0; n < ON; n += 2) {
          unsigned bf[4];
          ldmatrix_x4_trans(bf, v_t + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * DVP + n * 8 +
                                    (lane >> 4) * 8);
          mma16816<T>(acc[n], pa, bf[0], bf[1]);
          mma16816<T>(acc[n + 1], pa, bf[2], bf[3]);
        }
      }
    } else {
      // Exact path: each accumulator element sums the kept keys only.
      __syncwarp();
      const float* pw = p_s + warp * 16 * BN;
#pragma unroll
      for (int n = 0; n < ON; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = g + (e >> 1) * 8, c = n * 8 + 2 * t4 + (e & 1);
          float o = acc[n][e];
          for (int jj = 0; jj < BN; ++jj) {
            const float p = pw[r * BN + jj];
            if (p >= 0.f) o = fmaf(p, to_float(v_t[jj * DVP + c]), o);
          }
          acc[n][e] = o;
        }
      __syncwarp();
    }
    // The next tile (loaded during this one) into the other stage; the one
    // after it starts loading.
    if (j0 + BN < hi) {
      dequant_tile<T, false, D, DP, BITS, BN, NT>(kt, k_s + (stage ^ 1) * BN * DP);
      next_nonfinite = dequant_tile<T, true, DV, DVP, BITS, BN, NT>(vt, v_s + (stage ^ 1) * BN * DVP);
      if (j0 + 2 * BN < hi) {
        load_tile<D, BITS, GS, BN, NT>(kh, j0 + 2 * BN, hi, kt);
        load_tile<DV, BITS, GS, BN, NT>(vh, j0 + 2 * BN, hi, vt);
      }
    }
  }

  // Sink, normalisation, output (rows past the end are not written). A NaN l
  // is a kept NaN / +inf logit (a NaN row), as is a NaN / +inf sink.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r == 0 ? row_a : row_b;
    bool bad = l[r] != l[r];
    float mr = m[r], lr = l[r], factor = 1.f;
    if (F::Sinks) {
      const float sink = sinks[h];
      bad = bad || sink != sink || sink == MLXF_QUANT_POS_INF;
      if (!bad && sink != kNegInf) {
        const float sink2 = sink * kLog2e, m_new = fmaxf(mr, sink2);
        factor = mr == kNegInf ? 0.f : exp2f(mr - m_new);
        lr = lr * factor + exp2f(sink2 - m_new);
        mr = m_new;
      }
    }
    const float inv = lr > 0.f ? factor / lr : 0.f;
    if (i < Nq) {
      T* o = out + (((long)b * Hq + h) * Nq + i) * DV;
#pragma unroll
      for (int n = 0; n < ON; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          o[n * 8 + 2 * t4 + e] = from_float<T>(bad ? MLXF_QUANT_NAN : acc[n][2 * r + e] * inv);
      if (t4 == 0)
        lse[((long)b * Hq + h) * Nq + i] = bad ? MLXF_QUANT_NAN : (lr > 0.f ? (mr + log2f(lr)) * kLn2 : kNegInf);
    }
  }
}

}  // namespace mlx_flash
