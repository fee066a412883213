// FlashAttention forward (and its split-key decode variant) for Apple GPUs.
// Needs attention_common.h first.
//
// One threadgroup per (query block, batch * head, key split). Each of the
// NSG simdgroups owns 8 query rows: its Q fragments and O accumulator live in
// registers, while K and V tiles of BK keys are staged through one
// threadgroup buffer shared by all simdgroups. Per tile:
//   S = Q K^T (8x8 fragments) -> logit rules -> online softmax (fp32)
//   O = O * exp(m_old - m_new) + P V
// Tiles that the window/causal band or the block mask rule out are skipped
// before they are loaded.
#ifndef MLXF_ATTENTION_FWD_H
#define MLXF_ATTENTION_FWD_H

namespace mlxf {

// Elements of the K/V threadgroup tile of the forward kernel.
constexpr int fwd_tile_elems(int dqk, int dv, int bk) { return bk * max_int(tile_ld(dqk), tile_ld(dv)); }

// OT is T for the final output, float for decode partials (FEAT_SPLIT): then
// `out` is [splits, rows, DV] and `lse` [splits, rows] with rows = B*Hq*Nq,
// normalised per split, and attention_combine merges them.
template <typename T, int DQK, int DV, int NSG, int BK, typename MT, typename OT>
inline void attention_forward(
    int feat,
    const device T* q, const device T* k, const device T* v,
    const device MT* mask, const device float* alibi, const device float* sinks,
    const device bool* block_mask, const device int* cu_q, const device int* cu_k,
    const device int* iparams, const device float* fparams,
    device OT* out, device float* lse,
    threadgroup T* kv_tile,
    uint3 tg_pos, uint sg, uint lane) {
  constexpr int QF = pad8(DQK) / 8;
  constexpr int VF = pad8(DV) / 8;
  constexpr int KF = BK / 8;
  constexpr int BQ = 8 * NSG;
  constexpr int LD = max_int(tile_ld(DQK), tile_ld(DV));
  const Params p = read_params(iparams, fparams);
  // Packed GQA (decode): a threadgroup serves all query heads of one kv head,
  // rows r = g * q_len + i, so every K/V tile it loads feeds the whole group.
  const bool packed = (feat & FEAT_PACK_GQA) != 0;
  const int group = p.heads_q / p.heads_kv;
  const int heads_y = packed ? p.heads_kv : p.heads_q;
  const int b = int(tg_pos.y) / heads_y;
  const int hk = packed ? int(tg_pos.y) % heads_y : (int(tg_pos.y) % heads_y) / group;
  const int h_first = packed ? hk * group : int(tg_pos.y) % heads_y;  // head of row 0
  const SeqView s = seq_view(b, feat, p, cu_q, cu_k);
  const int n_rows = packed ? group * s.q_len : s.q_len;
  const int q0 = int(tg_pos.x) * BQ;
  if (q0 >= n_rows) {
    return;  // the whole threadgroup leaves before any barrier
  }
  const FragCoord fc = frag_coord(ushort(lane));
  const uint tid = sg * 32 + lane;
  const int sg_q0 = q0 + int(sg) * 8;
  // This lane's row: query i of head h (i = q_len marks a row past the end).
  const int r = sg_q0 + fc.row;
  const int h = (packed && r < n_rows) ? h_first + r / s.q_len : h_first;
  const int row = !packed ? r : (r < n_rows ? r % s.q_len : s.q_len);
  const Logits<MT> lg = make_logits(feat, p, s, b, h, alibi, mask, block_mask);
  // Tile skipping must agree across the threadgroup: a packed block spans all
  // queries (the block mask, which depends on the head, is never packed).
  const Logits<MT> lg_tiles = make_logits(feat, p, s, b, h_first, alibi, mask, block_mask);
  const int live_q0 = packed ? 0 : q0;
  const int live_q1 = packed ? s.q_len : q0 + BQ;

  float2 qf[QF];
  // Rows of consecutive heads are contiguous when packed (dense layout only).
  const device T* q_rows = q + row_offset(s, p.heads_q, h_first, s.q_rows, s.q_start, sg_q0, DQK);
  for (int kk = 0; kk < QF; ++kk) {
    qf[kk] = frag_load(q_rows + kk * 8, DQK, 1, n_rows - sg_q0, DQK - kk * 8, fc);
  }
  float2 of[VF];
  for (int d = 0; d < VF; ++d) {
    of[d] = float2(0.0f);
  }
  // Running max and denominator of this lane's row. A sink starts the row
  // as one extra logit; decode partials add it in the combine instead.
  float m = -INFINITY;
  float l = 0.0f;
  if ((feat & FEAT_SINKS) && !(feat & FEAT_SPLIT)) {
    m = sinks[h];
    l = 1.0f;
  }

  const device T* k_seq = k + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DQK);
  const device T* v_seq = v + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DV);
  const int n_tiles = (s.k_len + BK - 1) / BK;
  int t_begin = 0;
  int t_end = n_tiles;
  if (feat & FEAT_SPLIT) {
    t_begin = int(tg_pos.z) * p.tiles_per_split;
    t_end = min(n_tiles, t_begin + p.tiles_per_split);
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * BK;
    if (!lg_tiles.tile_live(live_q0, live_q1, k0, k0 + BK)) {
      continue;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // last tile's V reads are done
    stage_tile(kv_tile, LD, BK, pad8(DQK), k_seq + long(k0) * DQK, DQK, s.k_len - k0, tid, NSG * 32);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float2 sf[KF];
    for (int c = 0; c < KF; ++c) {
      sf[c] = float2(0.0f);
      for (int kk = 0; kk < QF; ++kk) {
        // K^T fragment: element (d, key) = tile[key][d].
        mma(sf[c], qf[kk], frag_load(kv_tile + c * 8 * LD + kk * 8, 1, LD, 8, 8, fc));
      }
    }
    float tile_max = -INFINITY;
    for (int c = 0; c < KF; ++c) {
      for (int e = 0; e < 2; ++e) {
        float dcap;
        sf[c][e] = lg.apply(sf[c][e], row, k0 + c * 8 + fc.col + e, dcap);
        tile_max = max(tile_max, sf[c][e]);
      }
    }
    const float m_new = max(m, row_max(tile_max));
    // A row with nothing kept yet has m_new = -inf: shift by 0 so exp gives 0, not NaN.
    const float shift = (m_new == -INFINITY) ? 0.0f : m_new;
    const float alpha = exp(m - shift);
    float tile_sum = 0.0f;
    for (int c = 0; c < KF; ++c) {
      sf[c] = exp(sf[c] - shift);
      tile_sum += sf[c].x + sf[c].y;
    }
    l = l * alpha + row_sum(tile_sum);
    m = m_new;
    for (int d = 0; d < VF; ++d) {
      of[d] *= alpha;
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);  // K reads are done
    stage_tile(kv_tile, LD, BK, pad8(DV), v_seq + long(k0) * DV, DV, s.k_len - k0, tid, NSG * 32);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int c = 0; c < KF; ++c) {
      for (int d = 0; d < VF; ++d) {
        mma(of[d], sf[c], frag_load(kv_tile + c * 8 * LD + d * 8, LD, 1, 8, 8, fc));
      }
    }
  }

  // Fully masked rows (l == 0) give output 0 and lse -inf.
  const float inv_l = (l > 0.0f) ? 1.0f / l : 0.0f;
  const float row_lse = (l > 0.0f) ? m + log(l) : -INFINITY;
  long out_row = row_offset(s, p.heads_q, h_first, s.q_rows, s.q_start, sg_q0, 1);
  if (feat & FEAT_SPLIT) {
    const long rows = long((feat & FEAT_VARLEN) ? 1 : p.batch) * p.heads_q * p.seqlen_q;
    out_row += long(tg_pos.z) * rows;
  }
  device OT* o_rows = out + out_row * DV;
  for (int d = 0; d < VF; ++d) {
    frag_store<OT>(o_rows + d * 8, DV, n_rows - sg_q0, DV - d * 8, fc, of[d] * inv_l);
  }
  if (fc.col == 0 && r < n_rows) {
    lse[out_row + fc.row] = row_lse;
  }
}

// Decode: merge the per-split partials of one row (one simdgroup per row).
// lse = log(sum_s exp(lse_s) [+ exp(sink)]), out = sum_s exp(lse_s - lse) out_s.
template <typename T, int DV>
inline void attention_combine(
    int feat, const device float* o_part, const device float* lse_part, const device float* sinks,
    const device int* iparams, const device float* fparams,
    device T* out, device float* lse, uint3 tg_pos, uint lane) {
  const Params p = read_params(iparams, fparams);
  const long rows = long((feat & FEAT_VARLEN) ? 1 : p.batch) * p.heads_q * p.seqlen_q;
  const long r = long(tg_pos.x);
  const int h = int((r / p.seqlen_q) % p.heads_q);
  float m = -INFINITY;
  for (int sp = 0; sp < p.num_splits; ++sp) {
    m = max(m, lse_part[sp * rows + r]);
  }
  if (feat & FEAT_SINKS) {
    m = max(m, sinks[h]);
  }
  float row_lse = -INFINITY;
  if (m != -INFINITY) {
    float total = (feat & FEAT_SINKS) ? exp(sinks[h] - m) : 0.0f;
    for (int sp = 0; sp < p.num_splits; ++sp) {
      total += exp(lse_part[sp * rows + r] - m);
    }
    row_lse = m + log(total);
  }
  for (int d = int(lane); d < DV; d += 32) {
    float acc = 0.0f;
    if (row_lse != -INFINITY) {
      for (int sp = 0; sp < p.num_splits; ++sp) {
        acc += exp(lse_part[sp * rows + r] - row_lse) * o_part[(sp * rows + r) * DV + d];
      }
    }
    out[r * DV + d] = static_cast<T>(acc);
  }
  if (lane == 0) {
    lse[r] = row_lse;
  }
}

}  // namespace mlxf

#endif  // MLXF_ATTENTION_FWD_H
