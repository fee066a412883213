// FlashAttention forward (and its split-key decode variant) for Apple GPUs.
// Needs attention_common.h first.
//
// One threadgroup per (query block, batch * head, key split). Each of the
// NSG simdgroups owns 8 query rows. As in MLX's steel attention, Q lives in
// threadgroup memory (staged once) and only the O accumulator and the S tile
// live in registers; K and V tiles of BK keys are staged through one
// threadgroup buffer with 16-byte vector loads. Per tile:
//   S = Q K^T (8x8 fragments) -> logit rules -> online softmax (fp32, exp2)
//   O = O * 2^(m_old - m_new) + P V
// Tiles are classified once per threadgroup: skipped before they are loaded
// when the window/causal band or the block mask rules out every pair, "full"
// (no per-logit checks) when every pair is kept, else partial.
//
// Non-finite contract (docs/metal.md): a dropped key's p is written as -0.0
// (a kept key's is +0 or more), and when the staged V tile holds a non-finite
// element the tile's P V runs an exact element path that skips dropped keys,
// so a NaN/inf in a dropped value never reaches the row (0 * NaN). Running
// maxima use max() (NaN-ignoring); a NaN or +inf logit still turns the row
// NaN through the sum l, and rows are dead only when l == 0 exactly.
#ifndef MLXF_ATTENTION_FWD_H
#define MLXF_ATTENTION_FWD_H

namespace mlxf {

// Threadgroup memory of the forward kernel, in T elements (plus NSG ints of
// flags). One simdgroup (decode) stages nothing: each K/V element feeds only
// its own multiplies, so fragments come straight from device memory and the
// kernel has no barrier at all (one placeholder element is declared).
constexpr int fwd_tile_elems(int dqk, int dv, int nsg, int bk, int size) {
  return nsg == 1 ? 1 : fwd_tg_elems(dqk, dv, nsg, bk, size);
}

// Registers of the forward: the accumulator O (VF fragments: this
// threadgroup's block of Dv columns, all of them up to Dv = 256) and the S/P
// tile (KF fragments), two floats per lane each. Q is read from threadgroup
// memory (or, when a 32-row Q tile does not fit next to a K tile: fp32 with
// Dqk >= 256, fp16/bf16 past about 400, from device memory) one fragment at
// a time.
template <int DQK, int DV, int BK>
struct FwdRegs {
  static constexpr int QF = pad8(DQK) / 8;
  static constexpr int NVB = d_blocks(DV);       // threadgroups along Dv
  static constexpr int VF = d_block_cols(DV) / 8;  // O fragments per thread
  static constexpr int KF = BK / 8;
  static constexpr int floats = 2 * (VF + KF);
};

// The lane of a simdgroup that holds element (row, col) of an 8x8 fragment
// (inverse of frag_coord; col even: element 0, odd: element 1).
inline ushort frag_lane(int row, int col) {
  return ushort(((col >> 1) & 1) | ((row & 3) << 1) | (((col >> 2) & 1) << 3) | (((row >> 2) & 1) << 4));
}

// O += P V for one tile, element by element, skipping dropped keys (p = -0.0):
// the tile holds a non-finite value, so a dropped key's v must not be
// multiplied in. Rare (NaN/inf in V); all lanes of the simdgroup take it.
template <typename T, int VF, int KF, int LD>
inline void pv_exact(thread float2* of, const thread float2* sf, const threadgroup T* v_tile, FragCoord fc) {
  MLXF_UNROLL for (int c = 0; c < KF; ++c) {
    MLXF_UNROLL for (int e2 = 0; e2 < 8; ++e2) {
      const int j = c * 8 + e2;
      const float pj = simd_shuffle(sf[c][e2 & 1], frag_lane(fc.row, e2));
      if (signbit(pj)) {
        continue;  // dropped: contributes nothing, whatever v holds
      }
      MLXF_UNROLL for (int d = 0; d < VF; ++d) {
        of[d].x += pj * float(v_tile[j * LD + d * 8 + fc.col]);
        of[d].y += pj * float(v_tile[j * LD + d * 8 + fc.col + 1]);
      }
    }
  }
}

// of += P V for one 8-key x 8-column fragment pair, element by element,
// skipping dropped keys (p = -0.0): the V fragment holds a NaN/inf. P and V
// elements come from the lanes that own them (all lanes shuffle).
inline void pv_exact_frag(thread float2& of, float2 p, float2 vb, FragCoord fc) {
  MLXF_UNROLL for (int e2 = 0; e2 < 8; ++e2) {
    const float pj = simd_shuffle(p[e2 & 1], frag_lane(fc.row, e2));
    const ushort v_lane = frag_lane(e2, fc.col);
    const float vx = simd_shuffle(vb.x, v_lane);
    const float vy = simd_shuffle(vb.y, v_lane);
    if (!signbit(pj)) {
      of.x += pj * vx;
      of.y += pj * vy;
    }
  }
}

// OT is T for the final output, float for decode partials (FEAT_SPLIT): then
// `out` is [splits, rows, DV] and `lse` [splits, rows] with rows = B*Hq*Nq,
// normalised per split, and attention_combine merges them.
// Grid z: split * NVB + Dv block (NVB = d_blocks(DV), 1 up to Dv = 256). Each
// Dv block runs the whole softmax and writes its columns of O; block 0 the lse.
// smem: fwd_tile_elems(...) elements; flags: NSG ints.
template <typename T, int DQK, int DV, int NSG, int BK, typename MT, typename OT>
inline void attention_forward(
    int feat,
    const device T* q, const device T* k, const device T* v,
    const device MT* mask, const device float* alibi, const device float* sinks,
    const device bool* block_mask, const device int* cu_q, const device int* cu_k,
    const device int* key_start, const device int* key_len,
    const device int* iparams, const device float* fparams,
    device OT* out, device float* lse,
    threadgroup T* smem, threadgroup int* flags,
    uint3 tg_pos, uint sg, uint lane) {
  using R = FwdRegs<DQK, DV, BK>;
  constexpr int QF = R::QF;
  constexpr int VF = R::VF;
  constexpr int KF = R::KF;
  constexpr int NVB = R::NVB;
  constexpr int DVB = VF * 8;  // Dv columns per threadgroup
  constexpr int BQ = 8 * NSG;
  constexpr int SIZE = int(sizeof(T));
  constexpr bool DIRECT = NSG == 1;  // decode: fragments straight from device memory
  constexpr bool Q_TG = !DIRECT && fwd_q_in_tg(DQK, DV, NSG, BK, SIZE);
  constexpr int LDQ = tile_ld(DQK, SIZE);
  constexpr int LD = max_int(tile_ld(DQK, SIZE), tile_ld(DVB, SIZE));
  threadgroup T* q_tile = smem;
  threadgroup T* kv_tile = smem + (Q_TG ? BQ * LDQ : 0);

  const Params p = read_params(iparams, fparams);
  // Packed GQA (decode): a threadgroup serves all query heads of one kv head,
  // rows r = g * q_len + i, so every K/V tile it loads feeds the whole group.
  const bool packed = (feat & FEAT_PACK_GQA) != 0;
  const int group = p.heads_q / p.heads_kv;
  const int heads_y = packed ? p.heads_kv : p.heads_q;
  const int b = int(tg_pos.y) / heads_y;
  const int hk = packed ? int(tg_pos.y) % heads_y : (int(tg_pos.y) % heads_y) / group;
  const int h_first = packed ? hk * group : int(tg_pos.y) % heads_y;  // head of row 0
  const SeqView s = with_key_range(seq_view(b, feat, p, cu_q, cu_k), feat, b, key_start, key_len);
  const int n_rows = packed ? group * s.q_len : s.q_len;
  const int split = int(tg_pos.z) / NVB;
  const int v0 = (int(tg_pos.z) % NVB) * DVB;  // this threadgroup's first Dv column
  const int v_cols = min(DVB, DV - v0);
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
  const RowRules<MT> rules = row_rules(feat, p, s, b, h, row, alibi, mask, block_mask);
  // Tile classes must agree across the threadgroup: a packed block spans all
  // queries (the block mask, which depends on the head, is never packed).
  const Logits<MT> lg_tiles = make_logits(feat, p, s, b, h_first, alibi, mask, block_mask);
  const int live_q0 = packed ? 0 : q0;
  const int live_q1 = packed ? s.q_len : q0 + BQ;

  // Rows of consecutive heads are contiguous when packed (dense layout only).
  const device T* q_rows = q + row_offset(s, p.heads_q, h_first, s.q_rows, s.q_start, q0, DQK);
  if (Q_TG) {
    stage_rows<T, DQK, LDQ>(q_tile, BQ, q_rows, n_rows - q0, tid, NSG * 32);
  }
  const threadgroup T* q_sg = q_tile + int(sg) * 8 * LDQ;
  const device T* q_sg_dev = q_rows + int(sg) * 8 * DQK;

  float2 of[VF];
  MLXF_UNROLL for (int d = 0; d < VF; ++d) {
    of[d] = float2(0.0f);
  }
  // Running max (log2 units) and denominator of this lane's row. A sink
  // starts the row as one extra logit; decode partials add it in the combine.
  float m = -INFINITY;
  float l = 0.0f;
  if ((feat & FEAT_SINKS) && !(feat & FEAT_SPLIT)) {
    m = sinks[h] * MLXF_LOG2E;
    l = 1.0f;
  }
  // Plain logits (no softcap, ALiBi or additive mask) go to log2 units in one multiply.
  const bool plain = !(feat & (FEAT_SOFTCAP | FEAT_ALIBI | FEAT_MASK_ADD));
  const float scale_log2 = p.scale * MLXF_LOG2E;

  const device T* k_seq = k + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DQK);
  const device T* v_seq = v + row_offset(s, p.heads_kv, hk, s.k_rows, s.k_start, 0, DV);
  // The tiles that hold valid keys (all of them without a key range); decode
  // splits share them out evenly, so a short range still uses every split.
  const int t_lo = s.key_lo / BK;
  const int t_hi = (s.key_hi + BK - 1) / BK;
  int t_begin = t_lo;
  int t_end = t_hi;
  if (feat & FEAT_SPLIT) {
    const int per_split = (t_hi - t_lo + p.num_splits - 1) / p.num_splits;
    t_begin = t_lo + split * per_split;
    t_end = min(t_hi, t_begin + per_split);
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * BK;
    if (!lg_tiles.tile_live(live_q0, live_q1, k0, k0 + BK)) {
      continue;
    }
    const bool full = lg_tiles.tile_full(live_q0, live_q1, k0, k0 + BK);
    if (!DIRECT) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // last tile's V reads are done
      stage_rows<T, DQK, LD>(kv_tile, BK, k_seq + long(k0) * DQK, s.k_len - k0, tid, NSG * 32);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // S = Q K^T: one Q fragment at a time (threadgroup memory), all key columns.
    float2 sf[KF];
    MLXF_UNROLL for (int c = 0; c < KF; ++c) {
      sf[c] = float2(0.0f);
    }
    MLXF_UNROLL for (int kk = 0; kk < QF; ++kk) {
      const float2 qa = Q_TG ? frag_load(q_sg + kk * 8, LDQ, 1, 8, 8, fc)
                             : frag_load(q_sg_dev + kk * 8, DQK, 1, n_rows - sg_q0, DQK - kk * 8, fc);
      MLXF_UNROLL for (int c = 0; c < KF; ++c) {
        // K^T fragment: element (d, key) = tile[key][d].
        mma(sf[c], qa, DIRECT ? frag_load(k_seq + long(k0 + c * 8) * DQK + kk * 8, 1, DQK, DQK - kk * 8,
                                          s.k_len - k0 - c * 8, fc)
                              : frag_load(kv_tile + c * 8 * LD + kk * 8, 1, LD, 8, 8, fc));
      }
    }
    // Logits in log2 units; dropped keys -inf. Plain logits (no softcap,
    // ALiBi or additive mask) stay raw here (sf = q . k; structurally
    // dropped ones flagged in `dropped`): their exponent below is one fma,
    // raw * scale * log2(e) - max, rounded once, so large logits lose no
    // accuracy to rounding the logit itself.
    float tile_max = -INFINITY;
    uint dropped = 0;
    MLXF_UNROLL for (int c = 0; c < KF; ++c) {
      MLXF_UNROLL for (int e = 0; e < 2; ++e) {
        const int j = k0 + c * 8 + fc.col + e;
        float x;
        if (plain) {
          const bool drop = !full && !rules.kept(j);
          dropped |= drop ? (1u << (2 * c + e)) : 0u;
          tile_max = max(tile_max, drop ? -INFINITY : sf[c][e] * scale_log2);
          continue;
        } else {
          x = full ? rules.template logit<false>(sf[c][e], j) : rules.template logit<true>(sf[c][e], j);
          const float x2 = x * MLXF_LOG2E;
          // A finite logit stays finite in log2 units (an additive mask of
          // -FLT_MAX is a finite logit, not a dropped key).
          x = (isfinite(x) && isinf(x2)) ? copysign(FLT_MAX, x2) : x2;
        }
        sf[c][e] = x;
        tile_max = max(tile_max, x);
      }
    }
    const float m_new = max(m, row_max(tile_max));
    // A row with nothing kept yet has m_new = -inf: shift by 0 so exp2 gives 0, not NaN.
    const float shift = (m_new == -INFINITY) ? 0.0f : m_new;
    const float alpha = fast::exp2(m - shift);
    float tile_sum = 0.0f;
    MLXF_UNROLL for (int c = 0; c < KF; ++c) {
      MLXF_UNROLL for (int e = 0; e < 2; ++e) {
        // Dropped keys: -0.0, which pv_exact tells from an underflowed +0.
        const bool drop = ((dropped >> (2 * c + e)) & 1u) != 0u;
        const float t = plain ? sf[c][e] * scale_log2 : sf[c][e];
        const float arg = plain ? fma(sf[c][e], scale_log2, -shift) : sf[c][e] - shift;
        sf[c][e] = (drop || t == -INFINITY) ? -0.0f : fast::exp2(arg);
      }
      tile_sum += sf[c].x + sf[c].y;
    }
    l = l * alpha + row_sum(tile_sum);
    m = m_new;
    MLXF_UNROLL for (int d = 0; d < VF; ++d) {
      of[d] *= alpha;
    }

    if (DIRECT) {
      // V fragments from device memory; a fragment holding a NaN/inf takes
      // the exact path for its 8 keys (dropped keys skipped).
      MLXF_UNROLL for (int c = 0; c < KF; ++c) {
        MLXF_UNROLL for (int d = 0; d < VF; ++d) {
          const float2 vb = frag_load(v_seq + long(k0 + c * 8) * DV + v0 + d * 8, DV, 1, s.k_len - k0 - c * 8,
                                      v_cols - d * 8, fc);
          if (simd_any(!isfinite(vb.x) || !isfinite(vb.y))) {
            pv_exact_frag(of[d], sf[c], vb, fc);
          } else {
            mma(of[d], sf[c], vb);
          }
        }
      }
      continue;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // K reads are done
    const bool v_finite =
        stage_block<T, DVB, LD, true>(kv_tile, BK, v_seq + long(k0) * DV + v0, DV, s.k_len - k0, v_cols, tid, NSG * 32);
    // (barrier inside) the V tile holds a NaN/inf: P V the exact way.
    if (any_nonfinite<NSG>(v_finite, flags, sg, lane)) {
      pv_exact<T, VF, KF, LD>(of, sf, kv_tile, fc);
    } else {
      MLXF_UNROLL for (int c = 0; c < KF; ++c) {
        MLXF_UNROLL for (int d = 0; d < VF; ++d) {
          mma(of[d], sf[c], frag_load(kv_tile + c * 8 * LD + d * 8, LD, 1, 8, 8, fc));
        }
      }
    }
  }

  // Fully masked rows (l == 0) give output 0 and lse -inf; a NaN l stays NaN.
  const bool dead = l == 0.0f;
  const float inv_l = dead ? 0.0f : 1.0f / l;
  const float row_lse = dead ? -INFINITY : (m + log2(l)) * MLXF_LN2;
  long out_row = row_offset(s, p.heads_q, h_first, s.q_rows, s.q_start, sg_q0, 1);
  if (feat & FEAT_SPLIT) {
    const long rows = long((feat & FEAT_VARLEN) ? 1 : p.batch) * p.heads_q * p.seqlen_q;
    out_row += long(split) * rows;
  }
  device OT* o_rows = out + out_row * DV + v0;
  MLXF_UNROLL for (int d = 0; d < VF; ++d) {
    frag_store<OT>(o_rows + d * 8, DV, n_rows - sg_q0, v_cols - d * 8, fc, of[d] * inv_l);
  }
  if (v0 == 0 && fc.col == 0 && r < n_rows) {
    lse[out_row + fc.row] = row_lse;
  }
}

// Decode: merge the per-split partials of one row (one simdgroup per row).
// lse = log(sum_s exp(lse_s) [+ exp(sink)]), out = sum_s exp(lse_s - lse) out_s.
// A NaN partial (or sink) makes the row NaN: max() ignores NaN, so it is
// tracked on its own.
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
  bool nan = false;
  for (int sp = 0; sp < p.num_splits; ++sp) {
    const float x = lse_part[sp * rows + r];
    m = max(m, x);
    nan = nan || isnan(x);
  }
  if (feat & FEAT_SINKS) {
    m = max(m, sinks[h]);
    nan = nan || isnan(sinks[h]);
  }
  float row_lse = -INFINITY;
  if (nan) {
    row_lse = NAN;
  } else if (m != -INFINITY) {
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
        const float x = lse_part[sp * rows + r];
        // A split that kept nothing (lse -inf) adds nothing, whatever it holds.
        if (x != -INFINITY) {
          acc += exp(x - row_lse) * o_part[(sp * rows + r) * DV + d];
        }
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
