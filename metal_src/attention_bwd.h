// FlashAttention-2 backward for Apple GPUs. Needs attention_common.h first.
//
// Three kernels, no N x N array and no atomics (Apple GPUs have no native
// fp32 atomics, so each gradient element has exactly one writer):
//   attention_bwd_delta: delta_i = dO_i . O_i - dlse_i (on fragments, like dP)
//   attention_bwd_dkdv:  one threadgroup per (key block, batch * kv head);
//                        loops over the query heads of its group (GQA) and
//                        the query blocks, recomputing P^T = exp(S^T - lse):
//                        dV += P^T dO, dS^T = P^T * (dP^T - delta), dK += dS^T Q
//   attention_bwd_dq:    one threadgroup per (query block, batch * head);
//                        loops over key tiles: dQ += dS K
// The logit rules (softcap chain rule included) are the forward's.
#ifndef MLXF_ATTENTION_BWD_H
#define MLXF_ATTENTION_BWD_H

namespace mlxf {

// Eight rows per simdgroup, as the diagonal of the 8x8 fragment dO O^T: the
// same multiplies, in the same order, that give dP = dO V^T in the other two
// kernels, so dP - delta is exactly 0 where it should be (e.g. a single key,
// where O = V) instead of rounding noise that dQ and dK would amplify.
template <typename T, int DV, int NSG>
inline void attention_bwd_delta(
    int feat, bool has_dlse, const device T* out, const device T* dout, const device float* dlse,
    const device int* iparams, const device float* fparams, device float* delta,
    uint3 tg_pos, uint sg, uint lane) {
  constexpr int VF = pad8(DV) / 8;
  const Params p = read_params(iparams, fparams);
  const long rows = long((feat & FEAT_VARLEN) ? 1 : p.batch) * p.heads_q * p.seqlen_q;
  const long r0 = (long(tg_pos.x) * NSG + sg) * 8;
  if (r0 >= rows) {
    return;  // no barriers below: a simdgroup may leave on its own
  }
  const FragCoord fc = frag_coord(ushort(lane));
  const int valid = (rows - r0 < 8) ? int(rows - r0) : 8;
  float2 acc = float2(0.0f);
  for (int d = 0; d < VF; ++d) {
    mma(acc, frag_load(dout + r0 * DV + d * 8, DV, 1, valid, DV - d * 8, fc),
        frag_load(out + r0 * DV + d * 8, 1, DV, DV - d * 8, valid, fc));
  }
  const long r = r0 + fc.row;
  if (r < rows && (fc.col == fc.row || fc.col + 1 == fc.row)) {
    const float dot = (fc.col == fc.row) ? acc.x : acc.y;
    delta[r] = dot - (has_dlse ? dlse[r] : 0.0f);
  }
}

// dK/dV register plan: dK and dV are produced in NB column blocks (blocking
// along D, as metal-flash-attention does for large heads), each block a
// pass over the query tiles that recomputes P^T and dS^T; NB is the smallest
// of 1, 2, 4, 8 that keeps the per-thread fragment arrays (dK and dV blocks,
// P^T and softcap' tiles) within 80 floats (4 passes at Dqk 576 / Dv 512).
constexpr int dkdv_regs(int dqk, int dv, int bqb, int nb) {
  return 2 * ((pad8(dqk) / 8 + nb - 1) / nb + (pad8(dv) / 8 + nb - 1) / nb + 2 * (bqb / 8));
}
constexpr int dkdv_d_blocks(int dqk, int dv, int bqb) {
  return dkdv_regs(dqk, dv, bqb, 1) <= 80   ? 1
         : dkdv_regs(dqk, dv, bqb, 2) <= 80 ? 2
         : dkdv_regs(dqk, dv, bqb, 4) <= 80 ? 4
                                            : 8;
}

// Fragment registers per thread (floats) of the backward kernels: every
// per-thread fragment array the kernels declare (two floats per fragment).
// docs/metal.md's resource table is generated from these.
template <int DQK, int DV, int BQB>
struct DkdvRegs {
  static constexpr int QF = pad8(DQK) / 8;
  static constexpr int VF = pad8(DV) / 8;
  static constexpr int CF = BQB / 8;
  static constexpr int NB = dkdv_d_blocks(DQK, DV, BQB);
  static constexpr int QB = (QF + NB - 1) / NB;  // dK fragments per block
  static constexpr int VB = (VF + NB - 1) / NB;  // dV fragments per block
  static constexpr int floats = 2 * (QB + VB + 2 * CF);  // dkf, dvf, pt, cap
};
template <int DQK, int DV, int BK>
struct DqRegs {
  static constexpr int QF = pad8(DQK) / 8;
  static constexpr int VF = pad8(DV) / 8;
  static constexpr int KF = BK / 8;
  static constexpr int NQB = d_blocks(DQK);        // threadgroups along Dqk
  static constexpr int QBF = d_block_cols(DQK) / 8;  // dQ fragments per thread
  static constexpr int floats = 2 * (QBF + 2 * KF);  // dqf, sp, dp
};

// Threadgroup memory of attention_bwd_dkdv (T elements; plus 2 * BQB floats
// of lse/delta and NSG flags): the Q tile of BQB queries, their dO tile
// where it fits next to it (else, fp32 past about Dqk + Dv = 1000, dO
// fragments come from device memory), and the K and V rows of the
// threadgroup's 8 * NSG keys when they fit too (else K and V fragments are
// read from device memory).
constexpr bool dkdv_do_in_tg(int dqk, int dv, int nsg, int bqb, int size) {
  return bqb * (tile_ld(dqk, size) + tile_ld(dv, size)) * size + 8 * bqb + 4 * nsg <= TG_LIMIT;
}
constexpr bool dkdv_kv_in_tg(int dqk, int dv, int nsg, int bqb, int size) {
  return (8 * nsg + bqb) * (tile_ld(dqk, size) + tile_ld(dv, size)) * size + 8 * bqb + 4 * nsg <= TG_LIMIT;
}
constexpr int dkdv_tile_elems(int dqk, int dv, int nsg, int bqb, int size) {
  return (dkdv_kv_in_tg(dqk, dv, nsg, bqb, size) ? 8 * nsg * (tile_ld(dqk, size) + tile_ld(dv, size)) : 0) +
         bqb * (tile_ld(dqk, size) + (dkdv_do_in_tg(dqk, dv, nsg, bqb, size) ? tile_ld(dv, size) : 0));
}

template <typename T, int DQK, int DV, int NSG, int BQB, typename MT>
inline void attention_bwd_dkdv(
    int feat,
    const device T* q, const device T* k, const device T* v, const device T* dout,
    const device float* lse, const device float* delta,
    const device MT* mask, const device float* alibi, const device bool* block_mask,
    const device int* cu_q, const device int* cu_k, const device int* key_start, const device int* key_len,
    const device int* iparams, const device float* fparams,
    device T* dk, device T* dv,
    threadgroup T* smem, threadgroup float* row_stats, threadgroup int* flags,
    uint3 tg_pos, uint sg, uint lane) {
  using R = DkdvRegs<DQK, DV, BQB>;
  constexpr int QF = R::QF;
  constexpr int VF = R::VF;
  constexpr int CF = R::CF;
  constexpr int NB = R::NB;
  constexpr int QB = R::QB;
  constexpr int VB = R::VB;
  constexpr int BKB = 8 * NSG;
  constexpr int SIZE = int(sizeof(T));
  constexpr bool KV_TG = dkdv_kv_in_tg(DQK, DV, NSG, BQB, SIZE);
  constexpr bool DO_TG = dkdv_do_in_tg(DQK, DV, NSG, BQB, SIZE);
  constexpr int LDQ = tile_ld(DQK, SIZE);
  constexpr int LDO = tile_ld(DV, SIZE);
  threadgroup T* q_tile = smem;
  threadgroup T* do_tile = smem + BQB * LDQ;
  threadgroup T* k_tile = do_tile + (DO_TG ? BQB * LDO : 0);
  threadgroup T* v_tile = k_tile + BKB * LDQ;
  threadgroup float* row_lse = row_stats;
  threadgroup float* row_delta = row_stats + BQB;

  const Params p = read_params(iparams, fparams);
  const int b = int(tg_pos.y) / p.heads_kv;
  const int hk = int(tg_pos.y) % p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const SeqView s = with_key_range(seq_view(b, feat, p, cu_q, cu_k), feat, b, key_start, key_len);
  const int k0 = int(tg_pos.x) * BKB;
  if (k0 >= s.k_len) {
    return;
  }
  // Keys outside the valid range get dK = dV = 0 without a tile being loaded.
  const bool any_key = k0 + BKB > s.key_lo && k0 < s.key_hi;
  const FragCoord fc = frag_coord(ushort(lane));
  const uint tid = sg * 32 + lane;
  const int sg_k0 = k0 + int(sg) * 8;
  const int key = sg_k0 + fc.row;  // this lane's key row

  const long k_at = row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, sg_k0, 1);
  const long k_at0 = row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, k0, 1);
  if (KV_TG && any_key) {
    stage_rows<T, DQK, LDQ>(k_tile, BKB, k + k_at0 * DQK, s.k_len - k0, tid, NSG * 32);
    stage_rows<T, DV, LDO>(v_tile, BKB, v + k_at0 * DV, s.k_len - k0, tid, NSG * 32);
  }
  const threadgroup T* k_sg = k_tile + int(sg) * 8 * LDQ;
  const threadgroup T* v_sg = v_tile + int(sg) * 8 * LDO;

  for (int z = 0; z < NB; ++z) {
    // This pass's columns: dK fragments z*QB .., dV fragments z*VB ..
    float2 dkf[QB], dvf[VB];
    MLXF_UNROLL for (int kk = 0; kk < QB; ++kk) {
      dkf[kk] = float2(0.0f);
    }
    MLXF_UNROLL for (int d = 0; d < VB; ++d) {
      dvf[d] = float2(0.0f);
    }
    for (int g = 0; g < group; ++g) {
      const int h = hk * group + g;
      const Logits<MT> lg = make_logits(feat, p, s, b, h, alibi, mask, block_mask);
      const long q_at = row_offset(s, p.heads_q, h, s.q_rows, s.q_start, 0, 1);
      for (int q0 = 0; q0 < s.q_len; q0 += BQB) {
        if (!lg.tile_live(q0, q0 + BQB, k0, k0 + BKB)) {
          continue;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const int q_valid = s.q_len - q0;
        const device T* do_rows = dout + (q_at + q0) * DV;  // (device memory, when !DO_TG)
        const bool q_fin = stage_rows<T, DQK, LDQ, true>(q_tile, BQB, q + (q_at + q0) * DQK, q_valid, tid, NSG * 32);
        const bool do_fin = DO_TG ? stage_rows<T, DV, LDO, true>(do_tile, BQB, do_rows, q_valid, tid, NSG * 32)
                                  : rows_finite(do_rows, DV, min(BQB, q_valid), DV, tid, NSG * 32);
        for (int e = int(tid); e < BQB; e += NSG * 32) {
          const bool valid = q0 + e < s.q_len;
          row_lse[e] = valid ? lse[q_at + q0 + e] : -INFINITY;
          row_delta[e] = valid ? delta[q_at + q0 + e] : 0.0f;
        }
        // (barrier inside) Q or dO holds a NaN/inf: dropped pairs go the exact way.
        const bool exact = any_nonfinite<NSG>(q_fin && do_fin, flags, sg, lane);

        // P^T (keys x queries), recomputed from the saved lse; dropped pairs
        // (bit 2c+e of `dropped`) are 0 by a select, never by a multiply.
        float2 pt[CF], cap[CF];
        uint dropped = 0;
        MLXF_UNROLL for (int c = 0; c < CF; ++c) {
          pt[c] = float2(0.0f);
          MLXF_UNROLL for (int kk = 0; kk < QF; ++kk) {
            const float2 ka = KV_TG ? frag_load(k_sg + kk * 8, LDQ, 1, 8, 8, fc)
                                    : frag_load(k + k_at * DQK + kk * 8, DQK, 1, s.k_len - sg_k0, DQK - kk * 8, fc);
            mma(pt[c], ka, frag_load(q_tile + c * 8 * LDQ + kk * 8, 1, LDQ, 8, 8, fc));
          }
          MLXF_UNROLL for (int e = 0; e < 2; ++e) {
            const int col = c * 8 + fc.col + e;
            float dcap;
            const float x = lg.apply(pt[c][e], q0 + col, key, dcap);
            const float row_l = row_lse[col];
            const bool drop = x == -INFINITY || row_l == -INFINITY;
            dropped |= drop ? (1u << (2 * c + e)) : 0u;
            pt[c][e] = drop ? 0.0f : exp(x - row_l);
            cap[c][e] = dcap;
          }
        }
        // dV (this pass's columns) += P^T dO
        MLXF_UNROLL for (int c = 0; c < CF; ++c) {
          const float2 drop = float2(float((dropped >> (2 * c)) & 1u), float((dropped >> (2 * c + 1)) & 1u));
          if (exact && DO_TG) {
            mma_exact<VB>(dvf, pt[c], drop, do_tile + c * 8 * LDO + z * VB * 8, LDO, fc, VF - z * VB);
          } else if (exact) {
            mma_exact<VB>(dvf, pt[c], drop, do_rows + c * 8 * DV + z * VB * 8, DV, fc, VF - z * VB, DV - z * VB * 8);
          } else {
            MLXF_UNROLL for (int d = 0; d < VB; ++d) {
              const int col = (z * VB + d) * 8;
              if (col < DV) {
                mma(dvf[d], pt[c], DO_TG ? frag_load(do_tile + c * 8 * LDO + col, LDO, 1, 8, 8, fc)
                                         : frag_load(do_rows + c * 8 * DV + col, DV, 1, q_valid - c * 8, DV - col, fc));
              }
            }
          }
        }
        // dS^T = P^T * (V dO^T - delta) * softcap', then dK (this pass's columns) += dS^T Q
        MLXF_UNROLL for (int c = 0; c < CF; ++c) {
          const float2 drop = float2(float((dropped >> (2 * c)) & 1u), float((dropped >> (2 * c + 1)) & 1u));
          float2 ds = float2(0.0f);
          MLXF_UNROLL for (int d = 0; d < VF; ++d) {
            const float2 va = KV_TG ? frag_load(v_sg + d * 8, LDO, 1, 8, 8, fc)
                                    : frag_load(v + k_at * DV + d * 8, DV, 1, s.k_len - sg_k0, DV - d * 8, fc);
            mma(ds, va, DO_TG ? frag_load(do_tile + c * 8 * LDO + d * 8, 1, LDO, 8, 8, fc)
                              : frag_load(do_rows + c * 8 * DV + d * 8, 1, DV, DV - d * 8, q_valid - c * 8, fc));
          }
          MLXF_UNROLL for (int e = 0; e < 2; ++e) {
            ds[e] = drop[e] != 0.0f ? 0.0f : pt[c][e] * (ds[e] - row_delta[c * 8 + fc.col + e]) * cap[c][e];
          }
          if (exact) {
            mma_exact<QB>(dkf, ds, drop, q_tile + c * 8 * LDQ + z * QB * 8, LDQ, fc, QF - z * QB);
          } else {
            MLXF_UNROLL for (int kk = 0; kk < QB; ++kk) {
              if (z * QB + kk < QF) {
                mma(dkf[kk], ds, frag_load(q_tile + c * 8 * LDQ + (z * QB + kk) * 8, LDQ, 1, 8, 8, fc));
              }
            }
          }
        }
      }
    }

    MLXF_UNROLL for (int kk = 0; kk < QB; ++kk) {
      const int col = (z * QB + kk) * 8;
      if (col < DQK) {
        frag_store<T>(dk + k_at * DQK + col, DQK, s.k_len - sg_k0, DQK - col, fc, dkf[kk] * p.scale);
      }
    }
    MLXF_UNROLL for (int d = 0; d < VB; ++d) {
      const int col = (z * VB + d) * 8;
      if (col < DV) {
        frag_store<T>(dv + k_at * DV + col, DV, s.k_len - sg_k0, DV - col, fc, dvf[d]);
      }
    }
  }
}

// Threadgroup memory of attention_bwd_dq (T elements): the Q and dO tiles of
// the threadgroup's 8 * NSG rows when they fit next to the K and V tiles
// (dq_qdo_in_tg; else their fragments are read from device memory), a K
// tile of BK keys and their V tile where it fits next to it (dq_v_in_tg;
// else, fp32 past about Dqk + Dv = 1000, V fragments come from device memory).
constexpr bool dq_v_in_tg(int dqk, int dv, int nsg, int bk, int size) {
  return bk * (tile_ld(dqk, size) + tile_ld(dv, size)) * size + 4 * nsg <= TG_LIMIT;
}
constexpr bool dq_qdo_in_tg(int dqk, int dv, int nsg, int bk, int size) {
  return (8 * nsg + bk) * (tile_ld(dqk, size) + tile_ld(dv, size)) * size + 4 * nsg <= TG_LIMIT;
}
constexpr int dq_tile_elems(int dqk, int dv, int nsg, int bk, int size) {
  return (dq_qdo_in_tg(dqk, dv, nsg, bk, size) ? 8 * nsg * (tile_ld(dqk, size) + tile_ld(dv, size)) : 0) +
         bk * (tile_ld(dqk, size) + (dq_v_in_tg(dqk, dv, nsg, bk, size) ? tile_ld(dv, size) : 0));
}

// dQ as its own pass (FlashAttention-2's second loop): one threadgroup per
// (query block, batch * head), NSG simdgroups of 8 rows, a loop over key
// tiles. Only dQ (Dqk/8 fragments; past Dqk = 256 one block of its
// columns per threadgroup, grid z, each recomputing S and dP) and the S, dP
// tiles of one key tile stay in registers; Q and dO are read a fragment at a
// time.
template <typename T, int DQK, int DV, int NSG, int BK, typename MT>
inline void attention_bwd_dq(
    int feat,
    const device T* q, const device T* k, const device T* v, const device T* dout,
    const device float* lse, const device float* delta,
    const device MT* mask, const device float* alibi, const device bool* block_mask,
    const device int* cu_q, const device int* cu_k, const device int* key_start, const device int* key_len,
    const device int* iparams, const device float* fparams,
    device T* dq,
    threadgroup T* smem, threadgroup int* flags,
    uint3 tg_pos, uint sg, uint lane) {
  using R = DqRegs<DQK, DV, BK>;
  constexpr int QF = R::QF;
  constexpr int VF = R::VF;
  constexpr int KF = R::KF;
  constexpr int QBF = R::QBF;
  constexpr int BQ = 8 * NSG;
  constexpr int SIZE = int(sizeof(T));
  constexpr bool QDO_TG = dq_qdo_in_tg(DQK, DV, NSG, BK, SIZE);
  constexpr bool V_TG = dq_v_in_tg(DQK, DV, NSG, BK, SIZE);
  constexpr int LDK = tile_ld(DQK, SIZE);
  constexpr int LDV = tile_ld(DV, SIZE);
  threadgroup T* q_tile = smem;
  threadgroup T* do_tile = smem + BQ * LDK;
  threadgroup T* k_tile = smem + (QDO_TG ? BQ * (LDK + LDV) : 0);
  threadgroup T* v_tile = k_tile + BK * LDK;

  const Params p = read_params(iparams, fparams);
  const int b = int(tg_pos.y) / p.heads_q;
  const int h = int(tg_pos.y) % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);
  const SeqView s = with_key_range(seq_view(b, feat, p, cu_q, cu_k), feat, b, key_start, key_len);
  const int q0 = int(tg_pos.x) * BQ;
  if (q0 >= s.q_len) {
    return;
  }
  const int c0 = int(tg_pos.z) * QBF * 8;  // this threadgroup's first dQ column
  const Logits<MT> lg = make_logits(feat, p, s, b, h, alibi, mask, block_mask);
  const FragCoord fc = frag_coord(ushort(lane));
  const uint tid = sg * 32 + lane;
  const int sg_q0 = q0 + int(sg) * 8;
  const int row = sg_q0 + fc.row;

  const long q_at = row_offset(s, p.heads_q, h, s.q_rows, s.q_start, sg_q0, 1);
  const long q_at0 = row_offset(s, p.heads_q, h, s.q_rows, s.q_start, q0, 1);
  if (QDO_TG) {
    stage_rows<T, DQK, LDK>(q_tile, BQ, q + q_at0 * DQK, s.q_len - q0, tid, NSG * 32);
    stage_rows<T, DV, LDV>(do_tile, BQ, dout + q_at0 * DV, s.q_len - q0, tid, NSG * 32);
  }
  const threadgroup T* q_sg = q_tile + int(sg) * 8 * LDK;
  const threadgroup T* do_sg = do_tile + int(sg) * 8 * LDV;
  float2 dqf[QBF];
  MLXF_UNROLL for (int kk = 0; kk < QBF; ++kk) {
    dqf[kk] = float2(0.0f);
  }
  const bool valid = row < s.q_len;
  const float row_l = valid ? lse[q_at + fc.row] : -INFINITY;
  const float row_delta = valid ? delta[q_at + fc.row] : 0.0f;

  const device T* k_seq = k + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DQK);
  const device T* v_seq = v + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DV);
  // Only the tiles that hold valid keys (all of them without a key range).
  for (int k0 = s.key_lo / BK * BK; k0 < s.key_hi; k0 += BK) {
    if (!lg.tile_live(q0, q0 + BQ, k0, k0 + BK)) {
      continue;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const bool k_fin = stage_rows<T, DQK, LDK, true>(k_tile, BK, k_seq + long(k0) * DQK, s.k_len - k0, tid, NSG * 32);
    if (V_TG) {
      stage_rows<T, DV, LDV>(v_tile, BK, v_seq + long(k0) * DV, s.k_len - k0, tid, NSG * 32);
    }
    // (barrier inside) K holds a NaN/inf: dropped pairs go the exact way.
    const bool exact = any_nonfinite<NSG>(k_fin, flags, sg, lane);

    // S = Q K^T and dP = dO V^T for the whole tile, one Q / dO fragment at a time.
    float2 sp[KF], dp[KF];
    MLXF_UNROLL for (int c = 0; c < KF; ++c) {
      sp[c] = float2(0.0f);
      dp[c] = float2(0.0f);
    }
    MLXF_UNROLL for (int kk = 0; kk < QF; ++kk) {
      const float2 qa = QDO_TG ? frag_load(q_sg + kk * 8, LDK, 1, 8, 8, fc)
                               : frag_load(q + q_at * DQK + kk * 8, DQK, 1, s.q_len - sg_q0, DQK - kk * 8, fc);
      MLXF_UNROLL for (int c = 0; c < KF; ++c) {
        mma(sp[c], qa, frag_load(k_tile + c * 8 * LDK + kk * 8, 1, LDK, 8, 8, fc));
      }
    }
    MLXF_UNROLL for (int d = 0; d < VF; ++d) {
      const float2 da = QDO_TG ? frag_load(do_sg + d * 8, LDV, 1, 8, 8, fc)
                               : frag_load(dout + q_at * DV + d * 8, DV, 1, s.q_len - sg_q0, DV - d * 8, fc);
      MLXF_UNROLL for (int c = 0; c < KF; ++c) {
        mma(dp[c], da, V_TG ? frag_load(v_tile + c * 8 * LDV + d * 8, 1, LDV, 8, 8, fc)
                            : frag_load(v_seq + long(k0 + c * 8) * DV + d * 8, 1, DV, DV - d * 8,
                                        s.k_len - k0 - c * 8, fc));
      }
    }
    // dS = P * (dP - delta) * softcap', 0 by a select where dropped; dQ += dS K.
    MLXF_UNROLL for (int c = 0; c < KF; ++c) {
      float2 drop;
      MLXF_UNROLL for (int e = 0; e < 2; ++e) {
        float dcap;
        const float x = lg.apply(sp[c][e], row, k0 + c * 8 + fc.col + e, dcap);
        drop[e] = (x == -INFINITY || row_l == -INFINITY) ? 1.0f : 0.0f;
        dp[c][e] = drop[e] != 0.0f ? 0.0f : exp(x - row_l) * (dp[c][e] - row_delta) * dcap;
      }
      if (exact) {
        mma_exact<QBF>(dqf, dp[c], drop, k_tile + c * 8 * LDK + c0, LDK, fc, QF - c0 / 8);
      } else {
        MLXF_UNROLL for (int kk = 0; kk < QBF; ++kk) {
          if (c0 + kk * 8 < DQK) {
            mma(dqf[kk], dp[c], frag_load(k_tile + c * 8 * LDK + c0 + kk * 8, LDK, 1, 8, 8, fc));
          }
        }
      }
    }
  }

  MLXF_UNROLL for (int kk = 0; kk < QBF; ++kk) {
    frag_store<T>(dq + q_at * DQK + c0 + kk * 8, DQK, s.q_len - sg_q0, DQK - c0 - kk * 8, fc, dqf[kk] * p.scale);
  }
}

}  // namespace mlxf

#endif  // MLXF_ATTENTION_BWD_H
