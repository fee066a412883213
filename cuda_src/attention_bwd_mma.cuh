// Tensor-core FlashAttention-2 backward for fp16/bf16 (fp32 accumulation).
//
// A block owns BN = 16 * NW keys of one key/value head (warp w: keys
// 16w..16w+15) and walks the query tiles (BM = BN rows, every head of the GQA
// group) that can see them. Per query tile, in the transposed form that keeps
// dK and dV in registers:
//   S^T = K Q^T,  P^T = exp(S^T - lse),  dV += P^T dO,
//   dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q,
// then dS^T goes through shared memory so that each warp forms 16 rows of
// dQ = dS K and adds them to a float32 dQ accumulator with atomics.
// delta = rowsum(dO * O) - dlse comes precomputed.
//
// Wide heads (NCH > 1 chunks, blockIdx.y the chunk): a block still forms all
// of S^T and dP^T (full K, Q, V, dO rows in shared memory), but accumulates
// only DC of the D columns of dK and dQ and DVC of the DV columns of dV, so
// its accumulators fit the registers; each chunk recomputes S^T and dP^T.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"

namespace mlx_flash {

template <typename T, typename MT, class F, int D, int DV, int NW, int NCH = 1>
__device__ void attention_bwd_mma(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const bool* bmask,
    const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    const T* dout, const float* lse, const float* delta,
    float* dq_acc, T* dk, T* dv, const int* key_start = nullptr, const int* key_len = nullptr) {
  constexpr int BN = 16 * NW, BM = BN, NTHREADS = 32 * NW;
  constexpr int DP = round16(D), DVP = round16(DV);
  constexpr int SQ = DP + 8, SV = DVP + 8, SS = BM + 8;
  constexpr bool VEC = D % 8 == 0 && DV % 8 == 0;
  // Columns of this block's chunk: dK/dQ [dk0, dk0 + DC), dV [dv0, dv0 + DVC).
  // The last chunk's fragments may read past its rows' ends (other rows or
  // tiles of shared memory): those columns are past D (DV) and never written.
  constexpr int DC = round16((D + NCH - 1) / NCH), DVC = round16((DV + NCH - 1) / NCH);
  const int dk0 = NCH > 1 ? blockIdx.y * DC : 0, dv0 = NCH > 1 ? blockIdx.y * DVC : 0;
  // Unrolling of the S^T and dP^T k-loops. Fully unrolled, the compiler
  // hoists the K/V and Q/dO fragment loads of every k-step into registers the
  // accumulators need: past head dim 64 MLX's NVRTC (sm_90a) then spills at
  // 255 registers (D 96: 254 regs, 8 bytes; causal 12, softcap 44; nvcc did
  // not), so those unroll by 2 (D 96: 248 / 244 / 255, no spills;
  // tools/nvrtc_regs.py). Column chunks (wide heads) unroll by 4 for the same
  // reason beside their accumulators.
  constexpr int KU = NCH > 1 ? 4 : DP <= 64 ? 64 : 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * SQ;
  T* Qs = Vs + BN * SV;
  T* dOs = Qs + BM * SQ;
  T* dSs = dOs + BM * SV;  // dS^T [key][query]
  float* lse_s = reinterpret_cast<float*>(dSs + BN * SS);
  float* delta_s = lse_s + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int j0 = blockIdx.x * BN;
  if (j0 >= seq.nk) return;
  const int j_end = min(seq.nk, j0 + BN);
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];
  const float softcap = fp[kSoftcap];

  LogitRules<MT> rules = make_rules<MT, F>(seq, b, hk * G, ip, fp, mask, alibi, bmask, key_start, key_len);
  int qlo, qhi;
  rules.query_range(j0, j_end - 1, qlo, qhi);
  // No query sees these keys (all outside the key range, or the window's):
  // dK = dV = 0, as the outputs start, and K, V are never loaded.
  if (qlo >= qhi) return;

  load_tile<T, BN, D, SQ, VEC, NTHREADS>(Ks, k + (kv_base + j0) * D, j_end - j0);
  load_tile<T, BN, DV, SV, VEC, NTHREADS>(Vs, v + (kv_base + j0) * DV, j_end - j0);
  cp_async_commit();

  float dk_acc[DC / 8][4], dv_acc[DVC / 8][4];
#pragma unroll
  for (int n = 0; n < DC / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < DVC / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;

  const int shift = seq.nk - seq.nq;
  bool k_bad = false;  // this thread's K chunks hold a NaN or inf (checked once they landed)
  bool k_checked = false;

  for (int hg = 0; hg < G; ++hg) {
    const int h = hk * G + hg;
    rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
    const long q_base = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start;
    for (int i0 = qlo / BM * BM; i0 < qhi; i0 += BM) {
      const int i_end = min(seq.nq, i0 + BM);
      if (F::BlockMask && !block_tile_live<MT, NTHREADS>(rules, i0, i_end, j0, j_end)) continue;
      __syncthreads();  // the previous tile's Q, dO, dS are consumed
      load_tile<T, BM, D, SQ, VEC, NTHREADS>(Qs, q + (q_base + i0) * D, i_end - i0);
      load_tile<T, BM, DV, SV, VEC, NTHREADS>(dOs, dout + (q_base + i0) * DV, i_end - i0);
      cp_async_commit();
      bool lse_bad = false;  // a row's lse is NaN or -inf (see `exact` below)
      for (int r = threadIdx.x; r < BM; r += NTHREADS) {
        const float l = i0 + r < seq.nq ? lse[q_base + i0 + r] : kNegInf;
        lse_bad = lse_bad || (i0 + r < seq.nq && !(l > kNegInf && l < __int_as_float(0x7f800000)));
        // +inf makes P = 0 for rows past the end and for fully masked rows.
        lse_s[r] = l == kNegInf ? __int_as_float(0x7f800000) : l * kLog2e;
        delta_s[r] = i0 + r < seq.nq ? delta[q_base + i0 + r] : 0.f;
      }
      cp_async_wait<0>();
      const bool inside_window =
          (rules.left < 0 || j0 >= i_end - 1 + shift - rules.left) &&
          (rules.right < 0 || j0 + BN - 1 <= i0 + shift + rules.right);
      // may_drop: some pair of the tile may be dropped (not softcap / ALiBi alone).
      const bool may_drop = F::MaskKind != 0 || F::BlockMask || tile_cuts_keys<F>(rules, j0, j0 + BN) || !inside_window;
      const bool need_rules = F::ElementRules || may_drop;
      if (!k_checked) {
        k_bad = own_tile_nonfinite<T, BN, D, SQ, VEC, NTHREADS>(Ks);
        k_checked = true;
      }
      // A tile that drops pairs and holds a NaN or inf in K, Q or dO forms its
      // dV, dK and dQ products exactly (rare): a dropped pair's zero p or dS
      // must not meet those values. V only enters dP, whose dropped entries
      // are discarded by selection. A tile without rules drops a pair only by
      // a -inf logit, from an infinite k (k_bad) or q; a row with an infinite
      // q has a NaN or -inf lse, so the rows' lse stand in for scanning Q.
      const bool exact = __syncthreads_or(
          k_bad || (may_drop ? own_tile_nonfinite<T, BM, D, SQ, VEC, NTHREADS>(Qs) ||
                                   own_tile_nonfinite<T, BM, DV, SV, VEC, NTHREADS>(dOs)
                             : lse_bad)) != 0;

      // S^T = K_w Q^T: 16 keys x BM queries per warp.
      float s[BM / 8][4];
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll KU
      for (int kk = 0; kk < DP / 16; ++kk) {
        unsigned ka[4];
        ldmatrix_x4(ka, Ks + (warp * 16 + lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          unsigned qb[4];
          ldmatrix_x4(qb, Qs + (np * 16 + (lane / 16) * 8 + lane % 8) * SQ + kk * 16 + ((lane / 8) % 2) * 8);
          mma16816<T>(s[2 * np], ka, qb[0], qb[1]);
          mma16816<T>(s[2 * np + 1], ka, qb[2], qb[3]);
        }
      }

      // P^T, with the logit rules where the tile needs them. Where the tile may
      // drop pairs or goes exact, a dropped pair gets p = -0.0 by selection
      // (exp of -inf minus a NaN lse would be NaN); that sign marks it dropped
      // for dS and the exact products. (A tile without rules drops a pair only
      // by a -inf logit, from an infinite k or q, and then goes exact.)
      float cap_grad[F::Softcap ? BM / 8 : 1][4];
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int jj = warp * 16 + g + (c >= 2 ? 8 : 0);
          const int ii = n * 8 + 2 * t + (c & 1);
          float x = s[n][c] * scale;
          if (need_rules) {
            float capped = 0.f;
            // The forward's fast tanh (attention_fwd_mma / wgmma / ws), so P
            // is recomputed from the logits its lse summed. (tanhf's branches
            // and polynomial, unrolled over the tile, made NVRTC spill at D 112
            // with softcap: 50/64 bytes at 255 registers; now 254, none.)
            x = apply_rules<F, MT, true>(rules, x, i0 + ii, j0 + jj, capped);
            if (F::Softcap) {
              const float u = capped / softcap;
              cap_grad[F::Softcap ? n : 0][c] = 1.f - u * u;
            }
          }
          const float p = exp2f(x * kLog2e - lse_s[ii]);
          s[n][c] = (need_rules || exact) && x == kNegInf ? -0.f : p;
        }
      }

      // dV += P^T dO.
      if (exact)
        exact_fragment_product<BM / 8, DVC / 8, true>([&](int kb, int c) { return s[kb][c]; }, 0,
                                                [&](int n, int c) -> float& { return dv_acc[n][c]; },
                                                [&](int i, int d) { return to_float(dOs[i * SV + dv0 + d]); });
      if (!exact) {
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          unsigned pa[4];
          pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < DVC / 16; ++dp) {
            unsigned ob[4];
            ldmatrix_x4_trans(ob, dOs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * SV + dv0 + dp * 16 + (lane / 16) * 8);
            mma16816<T>(dv_acc[2 * dp], pa, ob[0], ob[1]);
            mma16816<T>(dv_acc[2 * dp + 1], pa, ob[2], ob[3]);
          }
        }
      }

      // dP^T = V_w dO^T.
      float dpt[BM / 8][4];
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll KU
      for (int kk = 0; kk < DVP / 16; ++kk) {
        unsigned va[4];
        ldmatrix_x4(va, Vs + (warp * 16 + lane % 16) * SV + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          unsigned ob[4];
          ldmatrix_x4(ob, dOs + (np * 16 + (lane / 16) * 8 + lane % 8) * SV + kk * 16 + ((lane / 8) % 2) * 8);
          mma16816<T>(dpt[2 * np], va, ob[0], ob[1]);
          mma16816<T>(dpt[2 * np + 1], va, ob[2], ob[3]);
        }
      }

      // dS^T = P^T (dP^T - delta) (times the softcap derivative), kept in s.
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int ii = n * 8 + 2 * t + (c & 1);
          float ds = s[n][c] * (dpt[n][c] - delta_s[ii]);
          if (F::Softcap && need_rules) ds *= cap_grad[F::Softcap ? n : 0][c];
          // Dropped: -0.0, the mark; kept: +0.0 for a zero dS in exact tiles,
          // so the mark stays unambiguous in the exact products.
          if (need_rules || exact) ds = __float_as_uint(s[n][c]) == kDroppedBits ? -0.f : exact && ds == 0.f ? 0.f : ds;
          s[n][c] = ds;
        }
      }

      // dK += dS^T Q; dS^T also to shared memory for dQ.
      if (exact)
        exact_fragment_product<BM / 8, DC / 8, true>([&](int kb, int c) { return s[kb][c]; }, 0,
                                               [&](int n, int c) -> float& { return dk_acc[n][c]; },
                                               [&](int i, int d) { return to_float(Qs[i * SQ + dk0 + d]); });
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        unsigned da[4];
        da[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        da[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        da[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        da[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        T* row0 = dSs + (warp * 16 + g) * SS + kk * 16 + 2 * t;
        *reinterpret_cast<unsigned*>(row0) = da[0];
        *reinterpret_cast<unsigned*>(row0 + 8 * SS) = da[1];
        *reinterpret_cast<unsigned*>(row0 + 8) = da[2];
        *reinterpret_cast<unsigned*>(row0 + 8 * SS + 8) = da[3];
        if (!exact) {
#pragma unroll
          for (int dp = 0; dp < DC / 16; ++dp) {
            unsigned qb[4];
            ldmatrix_x4_trans(qb, Qs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * SQ + dk0 + dp * 16 + (lane / 16) * 8);
            mma16816<T>(dk_acc[2 * dp], da, qb[0], qb[1]);
            mma16816<T>(dk_acc[2 * dp + 1], da, qb[2], qb[3]);
          }
        }
      }
      __syncthreads();  // dS^T complete

      // dQ rows 16w..16w+15 of this tile = dS K, 16 dims at a time, added atomically.
      const int qi0 = i0 + warp * 16 + g;
#pragma unroll 1
      for (int dp = 0; dp < DC / 16; ++dp) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        if (exact) {
          // Dropped pairs (dS = -0.0, the mark) skipped.
#pragma unroll 1
          for (int j = 0; j < BN; ++j) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const float ds = to_float(dSs[j * SS + warp * 16 + g + 8 * half]);
              if (__float_as_uint(ds) == kDroppedBits) continue;
#pragma unroll
              for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                  acc[n][2 * half + e] += ds * to_float(Ks[j * SQ + dk0 + dp * 16 + n * 8 + 2 * t + e]);
            }
          }
        }
        if (!exact) {
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned da[4], kb[4];
            ldmatrix_x4_trans(da, dSs + (kk * 16 + (lane / 16) * 8 + lane % 8) * SS + warp * 16 + ((lane / 8) % 2) * 8);
            ldmatrix_x4_trans(kb, Ks + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * SQ + dk0 + dp * 16 + (lane / 16) * 8);
            mma16816<T>(acc[0], da, kb[0], kb[1]);
            mma16816<T>(acc[1], da, kb[2], kb[3]);
          }
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // sm_90 adds float2 atomically: half the atomics (D even keeps each pair 8-byte aligned).
        if constexpr (D % 2 == 0) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int i = qi0 + 8 * half;
              const int d = dk0 + dp * 16 + n * 8 + 2 * t;
              if (i < seq.nq && d < D)
                atomicAdd(reinterpret_cast<float2*>(dq_acc + (q_base + i) * D + d),
                          make_float2(acc[n][2 * half] * scale, acc[n][2 * half + 1] * scale));
            }
          }
          continue;
        }
#endif
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = qi0 + (c >= 2 ? 8 : 0);
            const int d = dk0 + dp * 16 + n * 8 + 2 * t + (c & 1);
            if (i < seq.nq && d < D) atomicAdd(dq_acc + (q_base + i) * D + d, acc[n][c] * scale);
          }
        }
      }
    }
  }

  // Write this warp's 16 rows of dK (scaled) and dV.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = j0 + warp * 16 + g + 8 * half;
    if (j >= seq.nk) continue;
#pragma unroll
    for (int n = 0; n < DC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = dk0 + n * 8 + 2 * t + e;
        if (d < D) dk[(kv_base + j) * D + d] = from_float<T>(dk_acc[n][2 * half + e] * scale);
      }
    }
#pragma unroll
    for (int n = 0; n < DVC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = dv0 + n * 8 + 2 * t + e;
        if (d < DV) dv[(kv_base + j) * DV + d] = from_float<T>(dv_acc[n][2 * half + e]);
      }
    }
  }
}

}  // namespace mlx_flash
