// Metal kernels of flash_attention_quantized: attention straight from an
// affine-quantized K/V cache (mx.quantize's format), never a full-precision
// copy of K or V in device or threadgroup memory.
//
// Format (as csrc/attention_quant.h): a token row of D values is one
// little-endian bit stream of D * BITS bits in D * BITS / 32 uint32 words
// (value c at bit c * BITS, so 3-, 5- and 6-bit values straddle words);
// value c is scales[c / GS] * code + biases[c / GS].
//
// Work split (the sdpa_vector model): a threadgroup owns R "packed" rows of
// one kv head, row r = (query head hkv * G + r / Nq, query r % Nq), so the
// query heads of a GQA group share every dequantized key. Its NSG
// simdgroups stream the keys (simdgroup s takes keys s, s + NSG, ...); for
// one key, lane l dequantizes its EPL = D / 32 consecutive values straight
// from the packed words into registers, the R dot products are simd_sum
// reductions, and each lane accumulates its slice of the R output rows. D
// is a multiple of group_size >= 32, so every lane owns whole values.
// The simdgroups' online-softmax states are merged through threadgroup
// memory at the end. With few row blocks (decode) the keys are also split
// over the grid's z axis; each split writes a partial (max, sum, unnormalised
// output) and quant_attention_combine merges them by their log-sum-exp and
// adds the sinks.
//
// Backward (dq only; k and v are constants): the same streaming, with
// p = exp(s - lse), dp = dO . v, ds = p (dp - delta), dq += ds k.
//
// Non-finite contract (nan_contract): a dropped key (mask, window, causal,
// -inf logit) is skipped by a branch that is uniform over the simdgroup, so
// its k and v are never multiplied into a row that dropped it; the running
// max keeps NaN (nan_max) and +inf logits give NaN through exp(inf - inf).
#ifndef MLXF_ATTENTION_QUANT_H
#define MLXF_ATTENTION_QUANT_H

#include <metal_stdlib>

using namespace metal;

namespace mlxq {

// Feature bits: keep in sync with mlx_flash/backends/metal_quant.py.
enum QFeature : int {
  QF_MASK_BOOL = 1,
  QF_MASK_ADD = 2,
  QF_WINDOW = 4,
  QF_SOFTCAP = 8,
  QF_ALIBI = 16,
  QF_SINKS = 32,
  QF_SPLIT = 64,  // write per-split partials (combined by quant_attention_combine)
};

// Integer parameters (metal_quant.py's _int_params).
enum QIntParam {
  Q_BATCH = 0,
  Q_HEADS_Q,
  Q_HEADS_KV,
  Q_SEQLEN_Q,
  Q_SEQLEN_K,
  Q_WINDOW_LEFT,   // -1: unbounded
  Q_WINDOW_RIGHT,  // -1: unbounded (causal sets 0)
  Q_MASK_STRIDE,   // 4 strides (b, h, i, j), 0 on broadcast dims
  Q_KEYS_PER_SPLIT = Q_MASK_STRIDE + 4,
  Q_NUM_SPLITS,
  Q_INT_COUNT
};
enum QFloatParam { QF_SCALE = 0, QF_CAP };

struct QParams {
  int batch, heads_q, heads_kv, nq, nk, window_left, window_right;
  int mask_stride[4];
  int keys_per_split, num_splits;
  float scale, softcap;
};

inline QParams read_qparams(const device int* ip, const device float* fp) {
  QParams p;
  p.batch = ip[Q_BATCH];
  p.heads_q = ip[Q_HEADS_Q];
  p.heads_kv = ip[Q_HEADS_KV];
  p.nq = ip[Q_SEQLEN_Q];
  p.nk = ip[Q_SEQLEN_K];
  p.window_left = ip[Q_WINDOW_LEFT];
  p.window_right = ip[Q_WINDOW_RIGHT];
  for (int a = 0; a < 4; ++a) p.mask_stride[a] = ip[Q_MASK_STRIDE + a];
  p.keys_per_split = ip[Q_KEYS_PER_SPLIT];
  p.num_splits = ip[Q_NUM_SPLITS];
  p.scale = fp[QF_SCALE];
  p.softcap = fp[QF_CAP];
  return p;
}

// max that keeps a NaN from either side (metal::max may drop it).
inline float nan_max(float a, float b) { return (isnan(a) || a > b) ? a : b; }

// ---- dequantization into registers ----
// The EPL consecutive values of one row starting at value c0 (one lane's
// slice): the words holding them are loaded once (EPL * BITS / 32 words,
// one more where the slice does not start on a word boundary), likewise
// the at most two (scale, bias) pairs (EPL <= 8 <= group size), then
// codes are cut out of the registers: value c sits at bit c * BITS of the
// row's little-endian stream, straddling two words for 3, 5 and 6 bits.
// w[t] by selects over the constant indices: a register array indexed by a
// run-time value could be moved to stack memory by the compiler.
template <int NW>
inline uint32_t pick_word(const thread uint32_t* w, int t) {
  uint32_t r = w[0];
#pragma unroll
  for (int k = 1; k < NW; ++k) r = t == k ? w[k] : r;
  return r;
}

// words/scales/biases point at the row; ws, ss, zs are their last-dim strides.
template <int BITS, int GS, int EPL, typename ST>
inline void dequant_slice(const device uint32_t* words, const device ST* scales,
                          const device ST* biases, long ws, long ss, long zs, int c0, thread float* out) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int NW = (EPL * BITS + 31) / 32 + 1;  // words a slice can touch
  const int bit0 = c0 * BITS;
  const int w0 = bit0 >> 5;
  const int w_last = (bit0 + EPL * BITS - 1) >> 5;  // never past the row's end
  uint32_t w[NW];
#pragma unroll
  for (int t = 0; t < NW; ++t) w[t] = (w0 + t <= w_last) ? words[(w0 + t) * ws] : 0u;
  const int g0 = c0 / GS, g1 = (c0 + EPL - 1) / GS;
  const float s0 = float(scales[g0 * ss]), z0 = float(biases[g0 * zs]);
  const float s1 = g1 == g0 ? s0 : float(scales[g1 * ss]), z1 = g1 == g0 ? z0 : float(biases[g1 * zs]);
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int bit = (bit0 & 31) + e * BITS;  // relative to word w0
    const int t = bit >> 5, shift = bit & 31;
    uint32_t x = pick_word<NW>(w, t) >> shift;
    if (shift + BITS > 32) x |= pick_word<NW>(w, t + 1) << (32 - shift);
    const bool second = (c0 + e) / GS != g0;
    out[e] = (second ? s1 : s0) * float(x & MASK) + (second ? z1 : z0);
  }
}

// ---- the logit rules of the op contract, for one (row, key) ----
// Returns the final logit or -inf for a dropped key; dcap = d logit / d (scale * raw).
template <typename MT>
struct QRules {
  int feat;
  QParams p;
  const device MT* mask;
  const device float* alibi;

  inline int key_lo(int i) const {
    int pos = i + p.nk - p.nq;  // bottom-right alignment
    return ((feat & QF_WINDOW) && p.window_left >= 0) ? max(0, pos - p.window_left) : 0;
  }
  inline int key_hi(int i) const {
    int pos = i + p.nk - p.nq;
    return ((feat & QF_WINDOW) && p.window_right >= 0) ? min(p.nk - 1, pos + p.window_right) : p.nk - 1;
  }

  inline float apply(float raw, int b, int h, int i, int j, thread float& dcap) const {
    dcap = 1.0f;
    if (j < key_lo(i) || j > key_hi(i)) return -INFINITY;
    if (feat & QF_MASK_BOOL) {
      long at = long(b) * p.mask_stride[0] + long(h) * p.mask_stride[1] + long(i) * p.mask_stride[2] +
                long(j) * p.mask_stride[3];
      if (float(mask[at]) == 0.0f) return -INFINITY;
    }
    float x = p.scale * raw;
    if (feat & QF_SOFTCAP) {
      float t = tanh(x / p.softcap);
      x = p.softcap * t;
      dcap = 1.0f - t * t;
    }
    if (feat & QF_ALIBI) {
      int pos = i + p.nk - p.nq;
      x -= alibi[b * p.heads_q + h] * float(abs(pos - j));
    }
    if (feat & QF_MASK_ADD) {
      long at = long(b) * p.mask_stride[0] + long(h) * p.mask_stride[1] + long(i) * p.mask_stride[2] +
                long(j) * p.mask_stride[3];
      x += float(mask[at]);
    }
    return x;
  }
};

// One packed row of a threadgroup: its head, query and flat [B, Hq, Nq] index.
struct QRow {
  bool valid;
  int h, i;
  long flat;
};

inline QRow packed_row(QParams p, int b, int hkv, int r) {
  const int G = p.heads_q / p.heads_kv;
  QRow row;
  row.valid = r < G * p.nq;
  const int rr = row.valid ? r : 0;
  row.h = hkv * G + rr / p.nq;
  row.i = rr % p.nq;
  row.flat = (long(b) * p.heads_q + row.h) * p.nq + row.i;
  return row;
}

// Element strides of one quantized operand's data, scales and biases (MLX's
// `<name>_strides`: the cache is read through its view, e.g. mlx-lm's
// [..., :offset, :] slices, never copied).
struct QStrides {
  long w[4], s[4], z[4];
};

inline QStrides make_strides(const constant int64_t* w, const constant int64_t* s, const constant int64_t* z) {
  QStrides st;
  for (int a = 0; a < 4; ++a) {
    st.w[a] = long(w[a]);
    st.s[a] = long(s[a]);
    st.z[a] = long(z[a]);
  }
  return st;
}

inline long row_at(const thread long* st, int b, int h, int j) {
  return long(b) * st[0] + long(h) * st[1] + long(j) * st[2];
}

// Token row j of (b, hkv), dequantized: EPL values from value c0.
template <int BITS, int GS, int EPL, typename ST>
inline void dequant_row_slice(const device uint32_t* w, const device ST* sc, const device ST* bi, QStrides st,
                              int b, int hkv, int j, int c0, thread float* out) {
  dequant_slice<BITS, GS, EPL>(w + row_at(st.w, b, hkv, j), sc + row_at(st.s, b, hkv, j),
                               bi + row_at(st.z, b, hkv, j), st.w[3], st.s[3], st.z[3], c0, out);
}

// ---- forward ----
// tg_stats: NSG * R * 2 floats; tg_out: R * DV floats.
template <typename T, typename ST, typename MT, int DQK, int DV, int BITS, int GS, int R, int NSG>
inline void quant_attention_forward(
    int feat, const device T* q, const device uint32_t* kw, const device ST* ks, const device ST* kb,
    const device uint32_t* vw, const device ST* vs, const device ST* vb, QStrides ksd, QStrides vsd,
    const device MT* mask,
    const device float* alibi, const device float* sinks, const device int* iparams,
    const device float* fparams, device T* out, device float* lse, device float* o_part,
    device float* ml_part, threadgroup float* tg_stats, threadgroup float* tg_out, uint3 tgid,
    uint sg, uint lane) {
  constexpr int EK = DQK / 32, EV = DV / 32;
  const QParams p = read_qparams(iparams, fparams);
  const QRules<MT> rules{feat, p, mask, alibi};
  const int b = int(tgid.y) / p.heads_kv, hkv = int(tgid.y) % p.heads_kv;
  const int split = int(tgid.z);

  QRow rows[R];
  float qr[R][EK];
  float m[R], l[R], o[R][EV];
  int lo = p.nk, hi = -1;  // keys any row of this threadgroup may keep
  for (int r = 0; r < R; ++r) {
    rows[r] = packed_row(p, b, hkv, int(tgid.x) * R + r);
    const device T* qrow = q + rows[r].flat * DQK + int(lane) * EK;
    for (int e = 0; e < EK; ++e) qr[r][e] = rows[r].valid ? float(qrow[e]) : 0.0f;
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int e = 0; e < EV; ++e) o[r][e] = 0.0f;
    if (rows[r].valid) {
      lo = min(lo, rules.key_lo(rows[r].i));
      hi = max(hi, rules.key_hi(rows[r].i));
    }
  }
  if (feat & QF_SPLIT) {
    lo = max(lo, split * p.keys_per_split);
    hi = min(hi, (split + 1) * p.keys_per_split - 1);
  }

  float kx[EK], vx[EV];
  for (int j = lo + int(sg); j <= hi; j += NSG) {
    dequant_row_slice<BITS, GS, EK>(kw, ks, kb, ksd, b, hkv, j, int(lane) * EK, kx);
    float x[R];
    bool any = false;
    for (int r = 0; r < R; ++r) {
      float part = 0.0f;
      for (int e = 0; e < EK; ++e) part += qr[r][e] * kx[e];
      const float raw = simd_sum(part);
      float dcap;
      x[r] = rows[r].valid ? rules.apply(raw, b, rows[r].h, rows[r].i, j, dcap) : -INFINITY;
      any = any || x[r] != -INFINITY;
    }
    if (!any) continue;  // uniform: every lane saw the same logits
    dequant_row_slice<BITS, GS, EV>(vw, vs, vb, vsd, b, hkv, j, int(lane) * EV, vx);
    for (int r = 0; r < R; ++r) {
      if (x[r] == -INFINITY) continue;  // dropped: v never touches this row
      const float m_new = nan_max(m[r], x[r]);
      const float alpha = exp(m[r] - m_new);  // 0 on the first kept key
      const float pj = exp(x[r] - m_new);     // NaN for a NaN or +inf logit
      l[r] = l[r] * alpha + pj;
      for (int e = 0; e < EV; ++e) o[r][e] = o[r][e] * alpha + pj * vx[e];
      m[r] = m_new;
    }
  }

  // Merge the NSG simdgroups' states: max and sum through tg_stats, then
  // the rescaled outputs summed into tg_out one simdgroup at a time.
  if (lane == 0) {
    for (int r = 0; r < R; ++r) {
      tg_stats[(int(sg) * R + r) * 2] = m[r];
      tg_stats[(int(sg) * R + r) * 2 + 1] = l[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float M[R], L[R];
  const bool add_sink = (feat & QF_SINKS) && !(feat & QF_SPLIT);
  for (int r = 0; r < R; ++r) {
    const float sink = add_sink ? sinks[rows[r].h] : -INFINITY;
    M[r] = sink;
    for (int s = 0; s < NSG; ++s) M[r] = nan_max(M[r], tg_stats[(s * R + r) * 2]);
    // A sink is one more logit with a zero value vector.
    L[r] = sink == -INFINITY ? 0.0f : exp(sink - M[r]);
    for (int s = 0; s < NSG; ++s) {
      const float ms = tg_stats[(s * R + r) * 2];
      if (ms != -INFINITY) L[r] += exp(ms - M[r]) * tg_stats[(s * R + r) * 2 + 1];
    }
  }
  for (int s = 0; s < NSG; ++s) {
    if (int(sg) == s) {
      for (int r = 0; r < R; ++r) {
        const float w = m[r] == -INFINITY ? 0.0f : exp(m[r] - M[r]);
        for (int e = 0; e < EV; ++e) {
          // A state with no kept key adds nothing (its o is exactly 0).
          const float add = m[r] == -INFINITY ? 0.0f : w * o[r][e];
          const int at = r * DV + int(lane) * EV + e;
          tg_out[at] = s == 0 ? add : tg_out[at] + add;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (sg != 0) return;
  for (int r = 0; r < R; ++r) {
    if (!rows[r].valid) continue;
    if (feat & QF_SPLIT) {
      const long part = long(split) * (long(p.batch) * p.heads_q * p.nq) + rows[r].flat;
      for (int e = 0; e < EV; ++e) o_part[part * DV + int(lane) * EV + e] = tg_out[r * DV + int(lane) * EV + e];
      if (lane == 0) {
        ml_part[part * 2] = M[r];
        ml_part[part * 2 + 1] = L[r];
      }
    } else {
      // A row with no kept key (sum exactly 0) gives out 0, lse -inf.
      const float inv = L[r] == 0.0f ? 0.0f : 1.0f / L[r];
      for (int e = 0; e < EV; ++e)
        out[rows[r].flat * DV + int(lane) * EV + e] = static_cast<T>(tg_out[r * DV + int(lane) * EV + e] * inv);
      if (lane == 0) lse[rows[r].flat] = L[r] == 0.0f ? -INFINITY : M[r] + log(L[r]);
    }
  }
}

// One simdgroup per output row: merges the splits' partials by their
// log-sum-exp and adds the sink.
template <typename T, int DV>
inline void quant_attention_combine(int feat, const device float* o_part, const device float* ml_part,
                                    const device float* sinks, const device int* iparams,
                                    const device float* fparams, device T* out, device float* lse,
                                    uint3 tgid, uint lane) {
  constexpr int EV = DV / 32;
  const QParams p = read_qparams(iparams, fparams);
  const long rows = long(p.batch) * p.heads_q * p.nq;
  const long row = long(tgid.x);
  const int h = int((row / p.nq) % p.heads_q);
  const float sink = (feat & QF_SINKS) ? sinks[h] : -INFINITY;
  float M = sink;
  for (int s = 0; s < p.num_splits; ++s) M = nan_max(M, ml_part[(s * rows + row) * 2]);
  float L = sink == -INFINITY ? 0.0f : exp(sink - M);
  float acc[EV];
  for (int e = 0; e < EV; ++e) acc[e] = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) {
    const long part = s * rows + row;
    const float ms = ml_part[part * 2];
    if (ms == -INFINITY) continue;  // no kept key in this split (its o is 0)
    const float w = exp(ms - M);
    L += w * ml_part[part * 2 + 1];
    for (int e = 0; e < EV; ++e) acc[e] += w * o_part[part * DV + int(lane) * EV + e];
  }
  const float inv = L == 0.0f ? 0.0f : 1.0f / L;
  for (int e = 0; e < EV; ++e) out[row * DV + int(lane) * EV + e] = static_cast<T>(acc[e] * inv);
  if (lane == 0) lse[row] = L == 0.0f ? -INFINITY : M + log(L);
}

// ---- backward: dq (k and v are constants) ----
// tg_dq: R * DQK floats.
template <typename T, typename ST, typename MT, int DQK, int DV, int BITS, int GS, int R, int NSG>
inline void quant_attention_backward_dq(
    int feat, const device T* q, const device uint32_t* kw, const device ST* ks, const device ST* kb,
    const device uint32_t* vw, const device ST* vs, const device ST* vb, QStrides ksd, QStrides vsd,
    const device T* dout,
    const device float* lse, const device float* delta, const device MT* mask, const device float* alibi,
    const device int* iparams, const device float* fparams, device T* dq, device float* dq_part,
    threadgroup float* tg_dq, uint3 tgid, uint sg, uint lane) {
  constexpr int EK = DQK / 32, EV = DV / 32;
  const QParams p = read_qparams(iparams, fparams);
  const QRules<MT> rules{feat, p, mask, alibi};
  const int b = int(tgid.y) / p.heads_kv, hkv = int(tgid.y) % p.heads_kv;

  QRow rows[R];
  float qr[R][EK], dor[R][EV], acc[R][EK], lse_r[R], delta_r[R];
  int lo = p.nk, hi = -1;
  for (int r = 0; r < R; ++r) {
    rows[r] = packed_row(p, b, hkv, int(tgid.x) * R + r);
    const bool v = rows[r].valid;
    for (int e = 0; e < EK; ++e) {
      qr[r][e] = v ? float(q[rows[r].flat * DQK + int(lane) * EK + e]) : 0.0f;
      acc[r][e] = 0.0f;
    }
    for (int e = 0; e < EV; ++e) dor[r][e] = v ? float(dout[rows[r].flat * DV + int(lane) * EV + e]) : 0.0f;
    lse_r[r] = v ? lse[rows[r].flat] : -INFINITY;
    delta_r[r] = v ? delta[rows[r].flat] : 0.0f;
    // A row that kept no key (lse = -inf) has no gradient: skip its keys.
    if (v && lse_r[r] != -INFINITY) {
      lo = min(lo, rules.key_lo(rows[r].i));
      hi = max(hi, rules.key_hi(rows[r].i));
    }
  }
  // Decode-shaped gradients split the keys too: each split writes its
  // partial dq (fp32), summed over the splits by the caller.
  if (feat & QF_SPLIT) {
    lo = max(lo, int(tgid.z) * p.keys_per_split);
    hi = min(hi, (int(tgid.z) + 1) * p.keys_per_split - 1);
  }

  float kx[EK], vx[EV];
  for (int j = lo + int(sg); j <= hi; j += NSG) {
    dequant_row_slice<BITS, GS, EK>(kw, ks, kb, ksd, b, hkv, j, int(lane) * EK, kx);
    float x[R], dc[R];
    bool any = false;
    for (int r = 0; r < R; ++r) {
      float part = 0.0f;
      for (int e = 0; e < EK; ++e) part += qr[r][e] * kx[e];
      const float raw = simd_sum(part);
      x[r] = (rows[r].valid && lse_r[r] != -INFINITY) ? rules.apply(raw, b, rows[r].h, rows[r].i, j, dc[r])
                                                       : -INFINITY;
      any = any || x[r] != -INFINITY;
    }
    if (!any) continue;
    dequant_row_slice<BITS, GS, EV>(vw, vs, vb, vsd, b, hkv, j, int(lane) * EV, vx);
    for (int r = 0; r < R; ++r) {
      // uniform over the simdgroup (x is); simd_sum below needs every lane
      if (x[r] == -INFINITY) continue;
      float part = 0.0f;
      for (int e = 0; e < EV; ++e) part += dor[r][e] * vx[e];
      const float dp = simd_sum(part);
      const float ds = exp(x[r] - lse_r[r]) * (dp - delta_r[r]) * dc[r];
      for (int e = 0; e < EK; ++e) acc[r][e] += ds * kx[e];
    }
  }

  // Sum the simdgroups' partial dq rows, one simdgroup at a time.
  for (int s = 0; s < NSG; ++s) {
    if (int(sg) == s) {
      for (int r = 0; r < R; ++r)
        for (int e = 0; e < EK; ++e) {
          const int at = r * DQK + int(lane) * EK + e;
          tg_dq[at] = s == 0 ? acc[r][e] : tg_dq[at] + acc[r][e];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (sg != 0) return;
  const long part = long(tgid.z) * (long(p.batch) * p.heads_q * p.nq);
  for (int r = 0; r < R; ++r) {
    if (!rows[r].valid) continue;
    for (int e = 0; e < EK; ++e) {
      const float g = p.scale * tg_dq[r * DQK + int(lane) * EK + e];
      if (feat & QF_SPLIT) {
        dq_part[(part + rows[r].flat) * DQK + int(lane) * EK + e] = g;
      } else {
        dq[rows[r].flat * DQK + int(lane) * EK + e] = static_cast<T>(g);
      }
    }
  }
}

// ---- prefill: query tiles against dequantized K/V tiles ----
// A threadgroup owns 8 * NSG packed rows (8 per simdgroup) and walks key
// tiles of BK keys: all its threads dequantize the K tile into threadgroup
// memory (fp32, the only full-precision copy: O(tile)), each simdgroup
// computes its 8 x BK scores with simdgroup_matrix products from its q
// fragments (registers), applies the rules per element, runs the online
// softmax; then the V tile replaces the K tile and O += P V, again on
// simdgroup_matrix. Dropped keys are removed from S by selects; a V tile
// holding a NaN/inf value (only possible from non-finite scales/biases)
// takes an exact element path in which only kept keys touch each row.

// Lane l owns row frag_row(l) and columns frag_col(l), +1 of an 8x8 fragment
// (Apple's simdgroup_matrix layout); lanes sharing a row differ in bits 0 and 3.
inline short frag_row(ushort lane) { return short(((lane >> 2) & 4) + ((lane >> 1) & 3)); }
inline short frag_col(ushort lane) { return short((((lane >> 2) & 2) << 1) + ((lane & 1) << 1)); }

inline void frag_mma(thread float2& d, float2 a, float2 b) {
  simdgroup_matrix<float, 8, 8> A, B, D;
  A.thread_elements()[0] = a.x;
  A.thread_elements()[1] = a.y;
  B.thread_elements()[0] = b.x;
  B.thread_elements()[1] = b.y;
  D.thread_elements()[0] = d.x;
  D.thread_elements()[1] = d.y;
  simdgroup_multiply_accumulate(D, A, B, D);
  d = float2(D.thread_elements()[0], D.thread_elements()[1]);
}

inline float frag_row_max(float x) {
  x = nan_max(x, simd_shuffle_xor(x, ushort(1)));
  return nan_max(x, simd_shuffle_xor(x, ushort(8)));
}

inline float frag_row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// Rows [j0, j0 + BK) of one quantized operand, dequantized to fp32 into a
// [BK][ld] tile by all threads (zero past the last key). Returns false if
// any value this thread wrote is NaN or inf.
template <int BITS, int GS, int D, int BK, typename ST>
inline bool dequant_tile_into(threadgroup float* tile, int ld, QParams p, int b, int hkv, int j0,
                              const device uint32_t* w, const device ST* sc, const device ST* bi, QStrides st,
                              uint tid, uint nthreads) {
  constexpr int PER = 8;  // values per thread step: one scale/bias pair, a few words
  bool finite = true;
  for (int e = int(tid); e < BK * D / PER; e += int(nthreads)) {
    const int jj = e / (D / PER), c0 = (e % (D / PER)) * PER;
    const int j = j0 + jj;
    float vals[PER];
    if (j < p.nk) {
      dequant_row_slice<BITS, GS, PER>(w, sc, bi, st, b, hkv, j, c0, vals);
    } else {
      for (int t = 0; t < PER; ++t) vals[t] = 0.0f;
    }
    for (int t = 0; t < PER; ++t) {
      finite = finite && isfinite(vals[t]);
      tile[jj * ld + c0 + t] = vals[t];
    }
  }
  return finite;
}

constexpr int qtile_ld(int d) { return d + 4; }  // +4 floats: column reads of consecutive rows hit other banks

template <typename T, typename ST, typename MT, int DQK, int DV, int BITS, int GS, int BK, int NSG>
inline void quant_attention_forward_tiled(
    int feat, const device T* q, const device uint32_t* kw, const device ST* ks, const device ST* kb,
    const device uint32_t* vw, const device ST* vs, const device ST* vb, QStrides ksd, QStrides vsd,
    const device MT* mask,
    const device float* alibi, const device float* sinks, const device int* iparams,
    const device float* fparams, device T* out, device float* lse, threadgroup float* kv_tile,
    threadgroup float* logit_tile, threadgroup int* tg_flag, uint3 tgid, uint sg, uint lane) {
  constexpr int FK = DQK / 8, FV = DV / 8, FB = BK / 8;
  constexpr int LD = qtile_ld(DQK > DV ? DQK : DV);
  const QParams p = read_qparams(iparams, fparams);
  const QRules<MT> rules{feat, p, mask, alibi};
  const int b = int(tgid.y) / p.heads_kv, hkv = int(tgid.y) % p.heads_kv;
  const uint tid = sg * 32 + lane, nthreads = NSG * 32;
  const short fr = frag_row(ushort(lane)), fc = frag_col(ushort(lane));
  const QRow row = packed_row(p, b, hkv, int(tgid.x) * 8 * NSG + int(sg) * 8 + fr);

  // Keys any row of this threadgroup may keep (same answer in every thread).
  int lo = p.nk, hi = -1;
  for (int r = 0; r < 8 * NSG; ++r) {
    const QRow rr = packed_row(p, b, hkv, int(tgid.x) * 8 * NSG + r);
    if (rr.valid) {
      lo = min(lo, rules.key_lo(rr.i));
      hi = max(hi, rules.key_hi(rr.i));
    }
  }

  float2 qf[FK];  // this simdgroup's 8 q rows, as A fragments
  for (int f = 0; f < FK; ++f) {
    const device T* src = q + row.flat * DQK + f * 8 + fc;
    qf[f] = row.valid ? float2(float(src[0]), float(src[1])) : float2(0.0f);
  }
  float2 o[FV];
  for (int f = 0; f < FV; ++f) o[f] = float2(0.0f);
  float m = -INFINITY, l = 0.0f;
  threadgroup float* my_logits = logit_tile + int(sg) * 8 * BK;

  for (int j0 = (hi >= lo ? lo / BK * BK : p.nk); j0 <= hi; j0 += BK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    dequant_tile_into<BITS, GS, DQK, BK>(kv_tile, LD, p, b, hkv, j0, kw, ks, kb, ksd, tid, nthreads);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // S = Q K^T (raw dot products), then the rules per element.
    float2 x[FB];
    float tile_max = -INFINITY;
    for (int kf = 0; kf < FB; ++kf) {
      float2 acc = float2(0.0f);
      for (int f = 0; f < FK; ++f) {
        // K^T fragment: (dim r, key c) = tile[(kf * 8 + c) * LD + f * 8 + r]
        const int key = kf * 8 + fc, dim = f * 8 + fr;
        const float2 kt = float2(kv_tile[key * LD + dim], kv_tile[(key + 1) * LD + dim]);
        frag_mma(acc, qf[f], kt);
      }
      float dcap;
      const int j = j0 + kf * 8 + fc;
      x[kf].x = (row.valid && j < p.nk) ? rules.apply(acc.x, b, row.h, row.i, j, dcap) : -INFINITY;
      x[kf].y = (row.valid && j + 1 < p.nk) ? rules.apply(acc.y, b, row.h, row.i, j + 1, dcap) : -INFINITY;
      tile_max = nan_max(tile_max, nan_max(x[kf].x, x[kf].y));
    }
    const float m_new = nan_max(m, frag_row_max(tile_max));
    // Nothing kept in this row so far: p = 0 (a select), state unchanged.
    const bool live = m_new != -INFINITY;
    const float alpha = live ? exp(m - m_new) : 1.0f;
    float psum = 0.0f;
    for (int kf = 0; kf < FB; ++kf) {
      // The logits (-inf = dropped) for the exact path below.
      my_logits[fr * BK + kf * 8 + fc] = x[kf].x;
      my_logits[fr * BK + kf * 8 + fc + 1] = x[kf].y;
      x[kf].x = (live && x[kf].x != -INFINITY) ? exp(x[kf].x - m_new) : 0.0f;  // now p
      x[kf].y = (live && x[kf].y != -INFINITY) ? exp(x[kf].y - m_new) : 0.0f;
      psum += x[kf].x + x[kf].y;
    }
    l = l * alpha + frag_row_sum(psum);
    m = live ? m_new : m;
    for (int f = 0; f < FV; ++f) o[f] *= alpha;

    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) tg_flag[0] = 0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!dequant_tile_into<BITS, GS, DV, BK>(kv_tile, LD, p, b, hkv, j0, vw, vs, vb, vsd, tid, nthreads)) tg_flag[0] = 1;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tg_flag[0] == 0) {
      // Finite V: dropped keys have p = 0 exactly, so the plain product is exact.
      for (int kf = 0; kf < FB; ++kf)
        for (int f = 0; f < FV; ++f) {
          // V fragment: (key r, dim c) = tile[(kf * 8 + r) * LD + f * 8 + c]
          const int at = (kf * 8 + fr) * LD + f * 8 + fc;
          frag_mma(o[f], x[kf], float2(kv_tile[at], kv_tile[at + 1]));
        }
    } else {
      // A NaN/inf value in this tile: each output element sums its row's kept
      // keys only (a kept key's p may be 0 and still give NaN * 0 = NaN, as IEEE).
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (int f = 0; f < FV; ++f)
        for (int t = 0; t < 2; ++t) {
          float acc = t == 0 ? o[f].x : o[f].y;
          for (int c = 0; c < BK; ++c) {
            const float xc = my_logits[fr * BK + c];
            if (xc == -INFINITY) continue;  // dropped (or padding): its v is never read
            acc += exp(xc - m) * kv_tile[c * LD + f * 8 + fc + t];
          }
          if (t == 0) o[f].x = acc; else o[f].y = acc;
        }
    }
  }

  // Sinks, normalisation; a row with no kept key (sum exactly 0) gives out 0, lse -inf.
  if (!row.valid) return;
  if (feat & QF_SINKS) {
    const float sink = sinks[row.h];
    if (sink != -INFINITY) {
      const float M = nan_max(m, sink);
      const float a = m == -INFINITY ? 0.0f : exp(m - M);
      l = l * a + exp(sink - M);
      for (int f = 0; f < FV; ++f) o[f] *= a;
      m = M;
    }
  }
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;
  for (int f = 0; f < FV; ++f) {
    device T* dst = out + row.flat * DV + f * 8 + fc;
    dst[0] = static_cast<T>(o[f].x * inv);
    dst[1] = static_cast<T>(o[f].y * inv);
  }
  if ((lane & 9) == 0) lse[row.flat] = l == 0.0f ? -INFINITY : m + log(l);
}

// Prefill backward, dq only: the tiled forward's layout. Per key tile: the V
// tile gives dP = dO V^T, then the K tile (same buffer) gives S = Q K^T,
// P = exp(S - lse), dS = P (dP - delta) (x softcap's chain rule; dropped
// pairs 0 by a select) and dq += dS K, all on simdgroup_matrix. A K tile
// holding a NaN/inf value takes an exact element path for dq += dS K.
template <typename T, typename ST, typename MT, int DQK, int DV, int BITS, int GS, int BK, int NSG>
inline void quant_attention_backward_dq_tiled(
    int feat, const device T* q, const device uint32_t* kw, const device ST* ks, const device ST* kb,
    const device uint32_t* vw, const device ST* vs, const device ST* vb, QStrides ksd, QStrides vsd,
    const device T* dout,
    const device float* lse, const device float* delta, const device MT* mask, const device float* alibi,
    const device int* iparams, const device float* fparams, device T* dq, threadgroup float* kv_tile,
    threadgroup float* logit_tile, threadgroup float* ds_tile, threadgroup int* tg_flag, uint3 tgid, uint sg,
    uint lane) {
  constexpr int FK = DQK / 8, FV = DV / 8, FB = BK / 8;
  constexpr int LD = qtile_ld(DQK > DV ? DQK : DV);
  const QParams p = read_qparams(iparams, fparams);
  const QRules<MT> rules{feat, p, mask, alibi};
  const int b = int(tgid.y) / p.heads_kv, hkv = int(tgid.y) % p.heads_kv;
  const uint tid = sg * 32 + lane, nthreads = NSG * 32;
  const short fr = frag_row(ushort(lane)), fc = frag_col(ushort(lane));
  const QRow row = packed_row(p, b, hkv, int(tgid.x) * 8 * NSG + int(sg) * 8 + fr);
  const float row_lse = row.valid ? lse[row.flat] : -INFINITY;
  const float row_delta = row.valid ? delta[row.flat] : 0.0f;
  // A row that kept no key (lse = -inf) has no gradient.
  const bool row_live = row.valid && row_lse != -INFINITY;

  int lo = p.nk, hi = -1;
  for (int r = 0; r < 8 * NSG; ++r) {
    const QRow rr = packed_row(p, b, hkv, int(tgid.x) * 8 * NSG + r);
    if (rr.valid) {
      lo = min(lo, rules.key_lo(rr.i));
      hi = max(hi, rules.key_hi(rr.i));
    }
  }

  float2 qf[FK], dof[FV], acc[FK];
  for (int f = 0; f < FK; ++f) {
    const device T* src = q + row.flat * DQK + f * 8 + fc;
    qf[f] = row.valid ? float2(float(src[0]), float(src[1])) : float2(0.0f);
    acc[f] = float2(0.0f);
  }
  for (int f = 0; f < FV; ++f) {
    const device T* src = dout + row.flat * DV + f * 8 + fc;
    dof[f] = row.valid ? float2(float(src[0]), float(src[1])) : float2(0.0f);
  }
  threadgroup float* my_logits = logit_tile + int(sg) * 8 * BK;
  threadgroup float* my_ds = ds_tile + int(sg) * 8 * BK;

  for (int j0 = (hi >= lo ? lo / BK * BK : p.nk); j0 <= hi; j0 += BK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    dequant_tile_into<BITS, GS, DV, BK>(kv_tile, LD, p, b, hkv, j0, vw, vs, vb, vsd, tid, nthreads);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float2 dpv[FB];  // dP = dO V^T
    for (int kf = 0; kf < FB; ++kf) {
      dpv[kf] = float2(0.0f);
      for (int f = 0; f < FV; ++f) {
        const int key = kf * 8 + fc, dim = f * 8 + fr;
        frag_mma(dpv[kf], dof[f], float2(kv_tile[key * LD + dim], kv_tile[(key + 1) * LD + dim]));
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) tg_flag[0] = 0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (!dequant_tile_into<BITS, GS, DQK, BK>(kv_tile, LD, p, b, hkv, j0, kw, ks, kb, ksd, tid, nthreads)) tg_flag[0] = 1;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float2 dsv[FB];
    for (int kf = 0; kf < FB; ++kf) {
      float2 sacc = float2(0.0f);
      for (int f = 0; f < FK; ++f) {
        const int key = kf * 8 + fc, dim = f * 8 + fr;
        frag_mma(sacc, qf[f], float2(kv_tile[key * LD + dim], kv_tile[(key + 1) * LD + dim]));
      }
      const int j = j0 + kf * 8 + fc;
      for (int t = 0; t < 2; ++t) {
        float dcap = 1.0f;
        const float raw = t == 0 ? sacc.x : sacc.y;
        const float x = (row_live && j + t < p.nk) ? rules.apply(raw, b, row.h, row.i, j + t, dcap) : -INFINITY;
        const float dp = t == 0 ? dpv[kf].x : dpv[kf].y;
        const float ds = x == -INFINITY ? 0.0f : exp(x - row_lse) * (dp - row_delta) * dcap;
        my_logits[fr * BK + kf * 8 + fc + t] = x;
        my_ds[fr * BK + kf * 8 + fc + t] = ds;
        if (t == 0) dsv[kf].x = ds; else dsv[kf].y = ds;
      }
    }
    if (tg_flag[0] == 0) {
      // Finite K: dropped pairs have dS = 0 exactly, so the plain product is exact.
      for (int kf = 0; kf < FB; ++kf)
        for (int f = 0; f < FK; ++f) {
          const int at = (kf * 8 + fr) * LD + f * 8 + fc;
          frag_mma(acc[f], dsv[kf], float2(kv_tile[at], kv_tile[at + 1]));
        }
    } else {
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (int f = 0; f < FK; ++f)
        for (int t = 0; t < 2; ++t) {
          float a = t == 0 ? acc[f].x : acc[f].y;
          for (int c = 0; c < BK; ++c) {
            if (my_logits[fr * BK + c] == -INFINITY) continue;  // dropped: its k is never read
            a += my_ds[fr * BK + c] * kv_tile[c * LD + f * 8 + fc + t];
          }
          if (t == 0) acc[f].x = a; else acc[f].y = a;
        }
    }
  }
  if (!row.valid) return;
  for (int f = 0; f < FK; ++f) {
    device T* dst = dq + row.flat * DQK + f * 8 + fc;
    dst[0] = static_cast<T>(p.scale * acc[f].x);
    dst[1] = static_cast<T>(p.scale * acc[f].y);
  }
}

}  // namespace mlxq

#endif  // MLXF_ATTENTION_QUANT_H
