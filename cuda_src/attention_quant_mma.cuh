// Tensor-core forward of flash_attention_quantized for 16-bit q (a prefill
// chunk: many query rows per head). Each block owns 16 * NW consecutive query
// rows of one head; per tile of BN keys every thread dequantizes its share of
// K and V into shared memory as q's dtype (fp32 arithmetic, one rounding, as
// mx.dequantize with 16-bit scales rounds), then every warp runs S = Q K^T
// and O += P V on mma.sync (m16n8k16, fp32 accumulation) with the online
// softmax between, as attention_fwd_mma.cuh does for float caches.
//
// Non-finite contract: the logit rules turn every dropped (row, key) pair's
// logit into -inf (whatever K holds); a kept NaN/+inf logit marks its row
// NaN. P V on tensor cores would multiply a dropped key's v by P = 0, so a
// tile whose dequantized V holds any non-finite value (rare: a NaN or
// huge scale) takes an exact element path that selects instead.
#pragma once

#include "attention_quant.cuh"
#include "mma.cuh"

namespace mlx_flash {

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
  T* k_s = q_s + BM * DP;
  T* v_s = k_s + BN * DP;
  float* p_s = reinterpret_cast<float*>(v_s + BN * DVP);  // [NW][16][BN], the exact P.V path only

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
  const float scale = fp[kScale];

  // Q tile (rows past the end zero), then each warp's A fragments for all of D.
  const T* q_bh = q + ((long)b * Hq + h) * Nq * D;
  for (int e = threadIdx.x; e < BM * D; e += NT) {
    const int r = e / D, c = e % D;
    q_s[r * DP + c] = i0 + r < Nq ? q_bh[(long)(i0 + r) * D + c] : from_float<T>(0.f);
  }
  __syncthreads();
  unsigned qa[KD][4];
  {
    const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(qa[kk], q_s + row * DP + kk * 16 + (lane >> 4) * 8);
  }

  int lo, hi;
  rules.key_range(i0, min(i0 + BM, Nq) - 1, lo, hi);
  const QuantHead<KST, SA> kh = quant_head<BITS>(kc, b, kvh);
  const QuantHead<VST, SA> vh = quant_head<BITS>(vc, b, kvh);
  // Rows g and g + 8 of this warp's 16.
  const int row_a = i0 + warp * 16 + g, row_b = row_a + 8;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  bool bad[2] = {false, false};
  float acc[ON][4];
#pragma unroll
  for (int n = 0; n < ON; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

  for (int j0 = lo; j0 < hi; j0 += BN) {
    __syncthreads();  // the previous tile's K and V are consumed
    bool v_nonfinite = false;
    for (int e = threadIdx.x; e < BN * (D / 4); e += NT) {
      const int r = e / (D / 4), c = 4 * (e % (D / 4));
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (j0 + r < hi) dequant4<BITS, GS>(kh, j0 + r, c, x);
#pragma unroll
      for (int u = 0; u < 4; ++u) k_s[r * DP + c + u] = from_float<T>(x[u]);
    }
    for (int e = threadIdx.x; e < BN * (DV / 4); e += NT) {
      const int r = e / (DV / 4), c = 4 * (e % (DV / 4));
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (j0 + r < hi) dequant4<BITS, GS>(vh, j0 + r, c, x);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const T y = from_float<T>(x[u]);
        const float z = to_float(y);
        v_nonfinite = v_nonfinite || z != z || z - z != 0.f;
        v_s[r * DVP + c + u] = y;
      }
    }
    v_nonfinite = __syncthreads_or(v_nonfinite);

    // S = Q K^T for this warp's 16 rows.
    float s[SN][4];
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < SN; ++n) {
#pragma unroll
      for (int kk = 0; kk < KD; kk += 2) {
        unsigned bf[4];
        ldmatrix_x4(bf, k_s + (n * 8 + (lane & 7)) * DP + kk * 16 + (lane >> 3) * 8);
        mma16816<T>(s[n], qa[kk], bf[0], bf[1]);
        mma16816<T>(s[n], qa[kk + 1], bf[2], bf[3]);
      }
    }
    // Logit rules; NaN/+inf kept logits mark the row; online softmax.
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e < 2 ? row_a : row_b, j = j0 + n * 8 + 2 * t4 + (e & 1);
        float capped;
        float x = j < hi ? apply_rules<F, MT>(rules, scale * s[n][e], i, j, capped) : kNegInf;
        if (x != x || x == MLXF_QUANT_POS_INF) {
          bad[e >> 1] = true;
          x = kNegInf;
        }
        s[n][e] = x;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tm = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
      const float m_new = fmaxf(m[r], tm);
      alpha[r] = m_new == kNegInf ? 1.f : expf(m[r] - m_new);
      m[r] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < SN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mr = m[e >> 1];
        const float p = s[n][e] == kNegInf ? 0.f : expf(s[n][e] - mr);
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
          ldmatrix_x4_trans(bf, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * DVP + n * 8 +
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
            if (p >= 0.f) o = fmaf(p, to_float(v_s[jj * DVP + c]), o);
          }
          acc[n][e] = o;
        }
      __syncwarp();
    }
  }

  // Sink, normalisation, output (rows past the end are not written).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r == 0 ? row_a : row_b;
    bad[r] = bad[r] || __shfl_xor_sync(0xffffffffu, bad[r], 1);
    bad[r] = bad[r] || __shfl_xor_sync(0xffffffffu, bad[r], 2);
    float mr = m[r], lr = l[r], factor = 1.f;
    if (F::Sinks) {
      const float sink = sinks[h];
      bad[r] = bad[r] || sink != sink || sink == MLXF_QUANT_POS_INF;
      if (!bad[r] && sink != kNegInf) {
        const float m_new = fmaxf(mr, sink);
        factor = mr == kNegInf ? 0.f : expf(mr - m_new);
        lr = lr * factor + expf(sink - m_new);
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
          o[n * 8 + 2 * t4 + e] = from_float<T>(bad[r] ? MLXF_QUANT_NAN : acc[n][2 * r + e] * inv);
      if (t4 == 0)
        lse[((long)b * Hq + h) * Nq + i] = bad[r] ? MLXF_QUANT_NAN : (lr > 0.f ? mr + logf(lr) : kNegInf);
    }
  }
}

}  // namespace mlx_flash
