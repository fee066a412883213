// FlashAttention forward and fused backward on the CPU.
//
// Compiled once per instruction set (MLXF_ISA = generic | avx2, see
// CMakeLists.txt). Per (batch, key/value head) the keys and values are packed
// once into fp32 panels; then worker threads take query tiles (forward) or
// key tiles (backward). Every product is the one micro-GEMM of cpu_simd.h,
// so the loops below read like Algorithms 1 and 2 of FlashAttention-2:
//
//   forward, per query tile:  S = Q K^T; mask; online softmax; O += P V
//   backward, per key tile:   S = Q K^T; P = exp(S - lse); dV += P^T dO;
//                             dP = dO V^T; dS = P (dP - delta);
//                             dK += dS^T Q; dQ += dS K
//
// Memory beyond the inputs and outputs is O(N * D) per (batch, kv head):
// never an N x N array.
//
// Per-batch key ranges (key_start/key_len, e.g. left padding) bound every key
// loop: only the key tiles that hold part of batch b's range are packed and
// visited (forward, decode and backward alike); inside a partly covered tile
// the range is one more logit rule, like causal/window bounds.
//
// Non-finite inputs follow the contract (ARCHITECTURE.md, issue 13) at no
// cost to clean tiles. Fully kept tiles are plain GEMMs, whose IEEE
// arithmetic is the materialised softmax's already. What needs care:
//  - A row whose kept logits (or sink) hold a NaN or +inf is NaN. Its running
//    max becomes NaN ("poisoned"), its P rows stay zero from then on, and the
//    final write gives NaN out and lse (a max alone would ignore the NaN).
//  - A dropped key (or -inf logit) must not reach a row through 0 * NaN.
//    Logits of dropped pairs are overwritten, never multiplied, and the
//    operands that products sum over (V in the forward; dO, Q, K in the
//    backward) are packed with their non-finite rows zeroed; those rows'
//    products are then added pair by pair where the pair is kept. Rows are
//    checked once at packing, so tiles without such rows run unchanged.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "thread_pool.h"

#ifndef MLXF_ISA
#error "MLXF_ISA must name the instruction-set namespace (generic or avx2)"
#endif

namespace mlxf {
namespace MLXF_ISA {

#include "cpu_simd.h"

namespace {

// Tile sizes, measured on the 2-core AVX-512 machine (single-thread CPU time):
// query tiles of 64 rows for head dims up to ~80 and 32 above keep the Q tile
// and O accumulator small (D=128 forward +15% with 32 rows, D=64 +10% with 64);
// 256-key tiles halve the online-softmax rescales of 128 (+3% D=64, +7% D=128).
constexpr int BQ_MAX = 64;
inline int query_tile_rows(const AttentionArgs& a) { return a.Dqk + a.Dv > 160 ? 32 : BQ_MAX; }
constexpr int BK = 256;  // keys per tile (a multiple of NR)
// Widest head dim a row buffer holds (Dqk up to 576 and Dv up to 512: MLA).
constexpr int MAX_ROW = 576;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float NOT_A_NUMBER = std::numeric_limits<float>::quiet_NaN();

// One sequence of a (possibly packed) batch.
struct Sequence {
  int64_t q_row0 = 0, k_row0 = 0;  // first token row in the arrays
  int nq = 0, nk = 0;
  int64_t q_batch = 0;             // batch index into the arrays (0 for varlen)
  // Valid keys [key_begin, key_end) within [0, nk): the batch's key range
  // (everything without one); key_end <= key_begin when it is empty.
  int key_begin = 0, key_end = 0;

  bool no_keys() const { return key_end <= key_begin; }
  // First key of the key tiles the range touches (tiles are BK-aligned).
  int first_tile_key(int tile) const { return key_begin / tile * tile; }
};

Sequence sequence(const AttentionArgs& a, int b) {
  Sequence s;
  if (a.cu_q) {
    s.q_row0 = a.cu_q[b];
    s.k_row0 = a.cu_k[b];
    s.nq = a.cu_q[b + 1] - a.cu_q[b];
    s.nk = a.cu_k[b + 1] - a.cu_k[b];
  } else {
    s.nq = a.Nq;
    s.nk = a.Nk;
    s.q_batch = b;
  }
  s.key_end = s.nk;
  if (a.key_start) {  // any int32 values: 64-bit sums, clamped to the keys that exist
    const int64_t start = a.key_start[b], end = start + (int64_t)a.key_len[b];
    s.key_begin = (int)std::min<int64_t>(std::max<int64_t>(start, 0), s.nk);
    s.key_end = (int)std::max<int64_t>(std::min<int64_t>(end, s.nk), s.key_begin);
  }
  return s;
}

// Element offset of token row `row` of head h in a view.
inline int64_t row_offset(const View4& v, const Sequence& s, int h, int64_t row) {
  return s.q_batch * v.sb + h * v.sh + row * v.sn;
}

// Element offset in the contiguous outputs [B?, H, Nq, D] / [B?, H, Nq].
inline int64_t out_row(const Sequence& s, int heads, int h, int64_t row, int64_t rows) {
  return (s.q_batch * heads + h) * rows + row;
}

// ---- packing ----------------------------------------------------------------

// True if the n floats hold no NaN or inf (0 * x is NaN exactly for those).
inline bool all_finite(const float* x, int n) {
  vf acc = vf{};
  int i = 0;
  for (; i + VL <= n; i += VL) acc += loadu(x + i) * splat(0.f);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += x[i] * 0.f;
  return sum == 0.f;
}

inline bool any_nan(const float* x, int n) {
  for (int i = 0; i < n; ++i)
    if (std::isnan(x[i])) return true;
  return false;
}

// dst[c] += coef * src[c] for c < n: one kept pair's product, added exactly.
inline void add_scaled_row(float* dst, float coef, const float* src, int n) {
  for (int c = 0; c < n; ++c) dst[c] += coef * src[c];
}

// Rows [n x d] of head h into row-major fp32 (leading dim ld), times mul.
void pack_rows(const View4& v, const Sequence& s, int h, int64_t row0, int n, int d, float mul, float* dst, int ld) {
  for (int r = 0; r < n; ++r) load_row(v.data, row_offset(v, s, h, row0 + r), v.sd, v.dtype, d, mul, dst + (int64_t)r * ld);
}

// Rows [n x d] into panels over d: element (r, c) at
// dst[(c / NR) * (n_pad * NR) + r * NR + c % NR]. Padding stays zero.
// With `bad`, a row holding a NaN or inf is packed as zeros and flagged
// bad[r] = 1: the caller adds its products exactly, only for kept pairs.
void pack_row_panels(const View4& v, const Sequence& s, int h, int64_t row0, int n, int n_pad, int d, float mul,
                     float* dst, uint8_t* bad = nullptr) {
  float row[MAX_ROW];
  for (int r = 0; r < n; ++r) {
    load_row(v.data, row_offset(v, s, h, row0 + r), v.sd, v.dtype, d, mul, row);
    if (bad && (bad[r] = !all_finite(row, d))) std::memset(row, 0, sizeof(float) * d);
    for (int c0 = 0; c0 < d; c0 += NR)
      std::memcpy(dst + (int64_t)(c0 / NR) * n_pad * NR + (int64_t)r * NR, row + c0, sizeof(float) * std::min(NR, d - c0));
  }
}

// fn(r0, r1) over [0, n) in chunks of `chunk` rows (a multiple of NR, so
// panel offsets stay aligned), spread over the worker threads.
template <class F>
void parallel_rows(int n, int chunk, F&& fn) {
  auto task = [&](int64_t t, int) {
    const int r0 = (int)t * chunk;
    fn(r0, std::min(n, r0 + chunk));
  };
  parallel_tasks((n + chunk - 1) / chunk, task);
}
constexpr int PACK_ROWS = 256;

// Rows [n x d] transposed into panels over rows: element (c, r) of the
// transpose at dst[(r / NR) * (d * NR) + c * NR + r % NR]. Values are kept
// as they are (these panels only feed per-pair dot products); with `bad`,
// rows holding a NaN or inf are flagged bad[r] = 1.
void pack_transposed_panels(const View4& v, const Sequence& s, int h, int64_t row0, int n, int d, float* dst,
                            uint8_t* bad = nullptr) {
  float row[MAX_ROW];
  for (int r = 0; r < n; ++r) {
    load_row(v.data, row_offset(v, s, h, row0 + r), v.sd, v.dtype, d, 1.f, row);
    if (bad) bad[r] = !all_finite(row, d);
    float* panel = dst + (int64_t)(r / NR) * d * NR + r % NR;
    for (int c = 0; c < d; ++c) panel[c * NR] = row[c];
  }
}

// ---- the logit rules (softcap, ALiBi, additive mask, dropped keys) -----------

// Which keys a tile may see and how to transform its logits.
struct LogitRules {
  const AttentionArgs* a;
  const Sequence* s;
  int b, h;

  // Aligned position of query i: p_i = i + Nk - Nq (bottom-right).
  int position(int i) const { return i + s->nk - s->nq; }
  // Inclusive key range [lo, hi] allowed by the batch's key range and
  // causal/window for query i (hi < lo: none).
  int key_lo(int i) const {
    return a->window_left >= 0 ? std::max(s->key_begin, position(i) - a->window_left) : s->key_begin;
  }
  int key_hi(int i) const {
    return a->window_right >= 0 ? std::min(s->key_end - 1, position(i) + a->window_right) : s->key_end - 1;
  }
  bool block_kept(int i, int j) const {
    const auto& v = a->block_mask_view;
    return a->block_mask[b * v.s[0] + h * v.s[1] + (i / a->block_q) * v.s[2] + (j / a->block_k) * v.s[3]];
  }
  // True if any key of tile [j0, j1) may be seen by some query of [i0, i1).
  bool tile_live(int i0, int i1, int j0, int j1) const {
    if (key_lo(i0) > j1 - 1 || key_hi(i1 - 1) < j0) return false;
    if (!a->block_mask) return true;
    for (int bi = i0 / a->block_q; bi <= (i1 - 1) / a->block_q; ++bi)
      for (int bj = j0 / a->block_k; bj <= (j1 - 1) / a->block_k; ++bj)
        if (block_kept(bi * a->block_q, bj * a->block_k)) return true;
    return false;
  }
  // True if the tile needs no per-element work beyond the (pre-applied) scale.
  bool tile_plain(int i0, int i1, int j0, int j1) const {
    if (a->softcap > 0 || a->alibi || a->mask_kind || a->block_mask) return false;
    return key_lo(i1 - 1) <= j0 && key_hi(i0) >= j1 - 1;
  }

  // Transform raw logits S[r][c] (already scaled) of queries i0.. and keys
  // j0.. in place; dropped or padded keys become -inf. With softcap, the
  // tanh values go to T (for the backward's chain rule) when T is given.
  void apply(float* S, int ld, int i0, int mq, int j0, int nk_tile, int n_cols, float* T) const {
    if (!(a->softcap > 0 || a->alibi || a->mask_kind || a->block_mask)) {
      // Only causal/window bounds and padding: drop the keys outside [lo, hi] of each row.
      for (int r = 0; r < mq; ++r) {
        float* row = S + (int64_t)r * ld;
        const int lo = key_lo(i0 + r) - j0, hi = std::min(key_hi(i0 + r) - j0, nk_tile - 1);
        for (int c = 0; c < std::min(lo, n_cols); ++c) row[c] = NEG_INF;
        for (int c = std::max(hi + 1, 0); c < n_cols; ++c) row[c] = NEG_INF;
      }
      return;
    }
    const float cap = a->softcap;
    const float slope = a->alibi ? a->alibi[b * a->Hq + h] : 0.f;
    for (int r = 0; r < mq; ++r) {
      const int i = i0 + r, p = position(i), lo = key_lo(i), hi = key_hi(i);
      float* row = S + (int64_t)r * ld;
      float* trow = T ? T + (int64_t)r * ld : nullptr;
      for (int c = 0; c < n_cols; ++c) {
        const int j = j0 + c;
        if (c >= nk_tile || j < lo || j > hi || (a->block_mask && !block_kept(i, j))) {
          row[c] = NEG_INF;
          continue;
        }
        float x = row[c];
        if (cap > 0) {
          const float t = std::tanh(x / cap);
          if (trow) trow[c] = t;
          x = cap * t;
        }
        if (a->alibi) x -= slope * (float)std::abs(p - j);
        if (a->mask_kind) {
          const auto& m = a->mask;
          const int64_t off = b * m.s[0] + h * m.s[1] + (int64_t)i * m.s[2] + (int64_t)j * m.s[3];
          if (a->mask_kind == 1) {
            if (!static_cast<const bool*>(m.data)[off]) x = NEG_INF;
          } else {
            x += load_scalar(m.data, off, a->mask_dtype);
          }
        }
        row[c] = x;
      }
    }
  }

  // Same, for a tile known to be plain: only padded keys are dropped.
  void apply_plain(float* S, int ld, int mq, int nk_tile, int n_cols) const {
    for (int r = 0; r < mq; ++r)
      for (int c = nk_tile; c < n_cols; ++c) S[(int64_t)r * ld + c] = NEG_INF;
  }
};

// Inclusive range of key tiles that queries [i0, i1) may see.
inline void key_tile_range(const LogitRules& rules, int i0, int i1, int& t0, int& t1) {
  const int lo = rules.key_lo(i0), hi = rules.key_hi(i1 - 1);
  t0 = lo / BK;
  t1 = hi < lo ? t0 - 1 : hi / BK;
}

// Which keys of a sequence get packed into panels: the key tiles its key
// range touches. Panel row 0 is key k0 (the first such tile's first key);
// keys p0.. (p0 NR-aligned, at most NR - 1 before the range) are packed,
// n_packed of them; rows before p0 stay zero and are dropped by the rules.
struct KeyPanels {
  int k0 = 0, p0 = 0, n_packed = 0, nk_pad = BK;
};

KeyPanels key_panels(const Sequence& s) {
  KeyPanels kp;
  if (s.no_keys()) return kp;
  kp.k0 = s.first_tile_key(BK);
  kp.p0 = s.key_begin / NR * NR;
  kp.n_packed = s.key_end - kp.p0;
  kp.nk_pad = round_up(s.key_end - kp.k0, BK);
  return kp;
}

// ---- forward ----------------------------------------------------------------

struct ForwardHead {
  const AttentionArgs* a;
  const ForwardOutputs* o;
  Sequence s;
  int b, hkv;
  int k0;  // first key of the panels (the range's first tile)
  int nk_pad, dv_pad;
  const float* kt;  // K^T panels of keys k0..
  const float* vp;  // V row panels of keys k0.. (non-finite rows zeroed)
  const int* v_bad;  // sorted keys whose V row holds a NaN or inf
  int n_v_bad;
};

// One row of the online softmax over a tile of logits: turns `row` into
// P = exp(S - m_new) (0 for dropped keys), updates the running max m and sum
// l and rescales the output row. A NaN or +inf kept logit poisons the row:
// m = NaN, and its P stays zero from then on.
inline void online_softmax_row(float* row, int n_cols, float& m, float& l, float* orow, int dv_pad) {
  const float m_tile = row_max_of(row, n_cols);  // may miss a NaN: the sum below catches it
  if (std::isnan(m) || std::isnan(m_tile) || m_tile == POS_INF) {
    m = NOT_A_NUMBER;
    std::memset(row, 0, n_cols * sizeof(float));
    return;
  }
  const float m_new = std::max(m, m_tile);
  if (m_new == NEG_INF) {  // nothing kept in this row yet (unless a NaN hid from the max)
    if (any_nan(row, n_cols)) m = NOT_A_NUMBER;
    std::memset(row, 0, n_cols * sizeof(float));
    return;
  }
  vf sum = vf{};
  const vf mv = splat(m_new);
  for (int c = 0; c < n_cols; c += VL) {
    vf p = vexp(loadu(row + c) - mv);
    storeu(row + c, p);
    sum += p;
  }
  const float tile_sum = hsum(sum);
  if (std::isnan(tile_sum)) {
    m = NOT_A_NUMBER;
    std::memset(row, 0, n_cols * sizeof(float));
    return;
  }
  const float alpha = std::exp(m - m_new);  // exp(-inf) = 0 on the first hit
  l = l * alpha + tile_sum;
  m = m_new;
  if (alpha != 1.f) {
    const vf av = splat(alpha);
    for (int c = 0; c < dv_pad; c += VL) storeu(orow + c, loadu(orow + c) * av);
  }
}

// One query tile of one query head: Algorithm 1 with an online softmax.
void forward_tile(const ForwardHead& fh, int h, int i0) {
  const AttentionArgs& a = *fh.a;
  const Sequence& s = fh.s;
  const int mq = std::min(query_tile_rows(a), s.nq - i0), Dqk = a.Dqk, Dv = a.Dv, dv_pad = fh.dv_pad;
  Scratch qtile(BQ_MAX * Dqk, false), S(BQ_MAX * BK, false), O(BQ_MAX * dv_pad), row_max(BQ_MAX, false),
      row_sum(BQ_MAX, false);
  // Scaling Q once here saves a multiply per logit.
  pack_rows(a.q, s, h, s.q_row0 + i0, mq, Dqk, a.scale, qtile.p, Dqk);
  const float sink = a.sinks ? a.sinks[h] : NEG_INF;
  for (int r = 0; r < mq; ++r) {
    // A sink is one more logit with a zero value vector (NaN or +inf: a poisoned row).
    row_max.p[r] = (std::isnan(sink) || sink == POS_INF) ? NOT_A_NUMBER : sink;
    row_sum.p[r] = a.sinks ? 1.f : 0.f;
  }
  std::vector<uint8_t> kept;  // only for tiles with non-finite V rows
  LogitRules rules{&a, &s, fh.b, h};
  int t0, t1;
  key_tile_range(rules, i0, i0 + mq, t0, t1);
  for (int t = t0; t <= t1; ++t) {
    const int j0 = t * BK, nk_tile = std::min(BK, s.nk - j0), n_cols = round_up(nk_tile, NR);
    if (!rules.tile_live(i0, i0 + mq, j0, j0 + nk_tile)) continue;
    gemm(mq, n_cols, Dqk, qtile.p, Dqk, 1, fh.kt + (int64_t)((j0 - fh.k0) / NR) * Dqk * NR, Dqk * NR, S.p, BK,
         false);
    if (rules.tile_plain(i0, i0 + mq, j0, j0 + nk_tile))
      rules.apply_plain(S.p, BK, mq, nk_tile, n_cols);
    else
      rules.apply(S.p, BK, i0, mq, j0, nk_tile, n_cols, nullptr);
    // Keys of this tile whose V row is non-finite (zeros in the panels): note
    // which rows keep them before the logits turn into probabilities.
    const int* bad0 = std::lower_bound(fh.v_bad, fh.v_bad + fh.n_v_bad, j0);
    const int n_bad = (int)(std::lower_bound(bad0, fh.v_bad + fh.n_v_bad, j0 + nk_tile) - bad0);
    if (n_bad) {
      kept.resize((size_t)mq * n_bad);
      for (int r = 0; r < mq; ++r)
        for (int x = 0; x < n_bad; ++x) kept[r * n_bad + x] = S.p[r * BK + bad0[x] - j0] != NEG_INF;
    }
    for (int r = 0; r < mq; ++r)
      online_softmax_row(S.p + r * BK, n_cols, row_max.p[r], row_sum.p[r], O.p + r * dv_pad, dv_pad);
    gemm(mq, dv_pad, n_cols, S.p, BK, 1, fh.vp + (int64_t)(j0 - fh.k0) * NR, (int64_t)fh.nk_pad * NR, O.p, dv_pad,
         true);
    // O += P V for those keys, pair by pair where kept (IEEE: a kept p = 0 times NaN is NaN).
    for (int x = 0; x < n_bad; ++x) {
      float vrow[MAX_ROW];
      load_row(a.v.data, row_offset(a.v, s, fh.hkv, s.k_row0 + bad0[x]), a.v.sd, a.v.dtype, Dv, 1.f, vrow);
      for (int r = 0; r < mq; ++r)
        if (kept[r * n_bad + x]) add_scaled_row(O.p + r * dv_pad, S.p[r * BK + bad0[x] - j0], vrow, Dv);
    }
  }
  // Normalise and write out / lse. Fully masked rows: out 0, lse -inf;
  // poisoned rows: NaN.
  const ForwardOutputs& o = *fh.o;
  for (int r = 0; r < mq; ++r) {
    const int64_t orow = out_row(s, a.Hq, h, s.q_row0 + i0 + r, a.Nq);
    if (std::isnan(row_max.p[r])) {
      for (int c = 0; c < Dv; ++c) store_scalar(o.out, orow * Dv + c, a.q.dtype, NOT_A_NUMBER);
      o.lse[orow] = NOT_A_NUMBER;
      continue;
    }
    const float l = row_sum.p[r];
    const float inv = l > 0 ? 1.f / l : 0.f;
    for (int c = 0; c < Dv; ++c) store_scalar(o.out, orow * Dv + c, a.q.dtype, O.p[r * dv_pad + c] * inv);
    o.lse[orow] = l > 0 ? row_max.p[r] + std::log(l) : NEG_INF;
  }
}

// ---- decode: few query rows, many keys ---------------------------------------
//
// Generation asks for 1..few queries against a long cache. Query tiles would
// leave all but one thread idle and the K^T packing would cost as much as the
// math, so instead the keys are split into chunks, every (batch, kv head,
// chunk) is one task computing a partial softmax over its keys for all query
// rows of the group, and the partials are combined by their log-sum-exp.

constexpr int DECODE_CHUNK = 256;
constexpr int DECODE_MAX_ROWS = 16;  // query rows per kv head (G * Nq)

bool use_decode_path(const AttentionArgs& a) {
  return !a.cu_q && (int64_t)a.Nq * (a.Hq / a.Hkv) <= DECODE_MAX_ROWS && a.Nk >= 2 * DECODE_CHUNK;
}

inline float dot(const float* x, const float* y, int n_pad) {
  vf acc = vf{};
  for (int c = 0; c < n_pad; c += VL) acc += loadu(x + c) * loadu(y + c);
  return hsum(acc);
}

struct DecodeCall {
  const AttentionArgs* a;
  int G, rows, chunks, dqk_pad, dv_pad;
  // Partials per task and row: max, sum, unnormalised output.
  float *part_max, *part_sum, *part_out;
};

void decode_chunk(const DecodeCall& d, int64_t task) {
  const AttentionArgs& a = *d.a;
  const int chunk = (int)(task % d.chunks), hkv = (int)(task / d.chunks % a.Hkv), b = (int)(task / d.chunks / a.Hkv);
  const Sequence s = sequence(a, b);
  const int j0 = chunk * DECODE_CHUNK, n = std::min(DECODE_CHUNK, s.nk - j0);
  // Keys of this chunk that any row may see (key range, causal/window): a
  // chunk without one is skipped, unread; the others read only those keys.
  const LogitRules bounds{&a, &s, b, hkv * d.G};
  const int live0 = std::max(j0, bounds.key_lo(0)), live1 = std::min(j0 + n, bounds.key_hi(s.nq - 1) + 1);
  if (live1 <= live0) {
    for (int r = 0; r < d.rows; ++r) {
      d.part_max[task * d.rows + r] = NEG_INF;  // the combine skips such partials
      d.part_sum[task * d.rows + r] = 0.f;
    }
    return;
  }
  Scratch qbuf(d.rows * d.dqk_pad), S(d.rows * DECODE_CHUNK, false), kv(std::max(d.dqk_pad, d.dv_pad));
  for (int r = 0; r < d.rows; ++r)
    load_row(a.q.data, row_offset(a.q, s, hkv * d.G + r / s.nq, s.q_row0 + r % s.nq), a.q.sd, a.q.dtype, a.Dqk,
             a.scale, qbuf.p + r * d.dqk_pad);
  // S = Q K^T for the live keys, one key row at a time (each row read once);
  // the others are dropped keys.
  for (int r = 0; r < d.rows; ++r) {
    std::fill(S.p + r * DECODE_CHUNK, S.p + r * DECODE_CHUNK + (live0 - j0), NEG_INF);
    std::fill(S.p + r * DECODE_CHUNK + (live1 - j0), S.p + r * DECODE_CHUNK + n, NEG_INF);
  }
  for (int j = live0 - j0; j < live1 - j0; ++j) {
    load_row(a.k.data, row_offset(a.k, s, hkv, s.k_row0 + j0 + j), a.k.sd, a.k.dtype, a.Dqk, 1.f, kv.p);
    for (int r = 0; r < d.rows; ++r) S.p[r * DECODE_CHUNK + j] = dot(qbuf.p + r * d.dqk_pad, kv.p, d.dqk_pad);
  }
  float* out = d.part_out + task * d.rows * d.dv_pad;
  std::memset(out, 0, sizeof(float) * d.rows * d.dv_pad);
  for (int r = 0; r < d.rows; ++r) {
    const int h = hkv * d.G + r / s.nq, i = r % s.nq;
    LogitRules rules{&a, &s, b, h};
    float* row = S.p + r * DECODE_CHUNK;
    if (!rules.tile_plain(i, i + 1, j0, j0 + n)) rules.apply(row, DECODE_CHUNK, i, 1, j0, n, n, nullptr);
    float m = NEG_INF, l = 0.f;
    bool nan = false;
    for (int j = 0; j < n; ++j) {
      m = std::max(m, row[j]);
      nan |= std::isnan(row[j]);
    }
    if (nan || m == POS_INF) m = NOT_A_NUMBER;  // a NaN or +inf kept logit: the row is NaN
    // P, with dropped keys as -0 so that the P V loop can tell them from an
    // underflowed kept key (which still turns a NaN value into NaN).
    if (m != NEG_INF && !std::isnan(m))
      for (int j = 0; j < n; ++j) l += (row[j] = row[j] == NEG_INF ? -0.f : std::exp(row[j] - m));
    else
      std::fill(row, row + n, -0.f);
    d.part_max[task * d.rows + r] = m;
    d.part_sum[task * d.rows + r] = l;
  }
  // O_part = P V, one value row at a time. A non-finite value row reaches
  // only the rows that kept its key (no 0 * NaN from a dropped one); keys
  // outside [live0, live1) are dropped for every row.
  for (int j = live0 - j0; j < live1 - j0; ++j) {
    load_row(a.v.data, row_offset(a.v, s, hkv, s.k_row0 + j0 + j), a.v.sd, a.v.dtype, a.Dv, 1.f, kv.p);
    const bool finite = all_finite(kv.p, a.Dv);
    for (int r = 0; r < d.rows; ++r) {
      const float pj = S.p[r * DECODE_CHUNK + j];
      if (!finite && pj == 0.f && std::signbit(pj)) continue;
      const vf p = splat(pj);
      float* o = out + r * d.dv_pad;
      for (int c = 0; c < d.dv_pad; c += VL) storeu(o + c, loadu(o + c) + p * loadu(kv.p + c));
    }
  }
}

void decode_forward(const AttentionArgs& a, const ForwardOutputs& o) {
  DecodeCall d;
  d.a = &a;
  d.G = a.Hq / a.Hkv;
  d.rows = d.G * a.Nq;
  d.chunks = (a.Nk + DECODE_CHUNK - 1) / DECODE_CHUNK;
  d.dqk_pad = round_up(a.Dqk, VL);
  d.dv_pad = round_up(a.Dv, VL);
  const int64_t tasks = (int64_t)a.B * a.Hkv * d.chunks;
  Scratch part_max(tasks * d.rows, false), part_sum(tasks * d.rows, false), part_out(tasks * d.rows * d.dv_pad, false);
  d.part_max = part_max.p;
  d.part_sum = part_sum.p;
  d.part_out = part_out.p;
  auto task = [&](int64_t t, int) { decode_chunk(d, t); };
  parallel_tasks(tasks, task);
  // Combine the chunks of each row by their log-sum-exp (a sink is one more partial).
  for (int b = 0; b < a.B; ++b)
    for (int hkv = 0; hkv < a.Hkv; ++hkv)
      for (int r = 0; r < d.rows; ++r) {
        const int h = hkv * d.G + r / a.Nq, i = r % a.Nq;
        const int64_t first = ((int64_t)b * a.Hkv + hkv) * d.chunks;
        float m = a.sinks ? a.sinks[h] : NEG_INF;
        bool poisoned = std::isnan(m) || m == POS_INF;  // a NaN or +inf sink
        for (int c = 0; c < d.chunks; ++c) {
          const float pm = d.part_max[(first + c) * d.rows + r];
          poisoned |= std::isnan(pm);
          m = std::max(m, pm);
        }
        const Sequence s = sequence(a, b);
        const int64_t orow = out_row(s, a.Hq, h, i, a.Nq);
        if (poisoned) {
          for (int k = 0; k < a.Dv; ++k) store_scalar(o.out, orow * a.Dv + k, a.q.dtype, NOT_A_NUMBER);
          o.lse[orow] = NOT_A_NUMBER;
          continue;
        }
        float l = (a.sinks && m != NEG_INF) ? std::exp(a.sinks[h] - m) : 0.f;
        float acc[MAX_ROW] = {0.f};
        for (int c = 0; c < d.chunks; ++c) {
          const int64_t p = (first + c) * d.rows + r;
          if (d.part_max[p] == NEG_INF) continue;
          const float w = std::exp(d.part_max[p] - m);
          l += w * d.part_sum[p];
          for (int k = 0; k < a.Dv; ++k) acc[k] += w * d.part_out[p * d.dv_pad + k];
        }
        const float inv = l > 0 ? 1.f / l : 0.f;
        for (int k = 0; k < a.Dv; ++k) store_scalar(o.out, orow * a.Dv + k, a.q.dtype, acc[k] * inv);
        o.lse[orow] = l > 0 ? m + std::log(l) : NEG_INF;
      }
}

}  // namespace

void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) {
  if (use_decode_path(a)) return decode_forward(a, o);
  const int G = a.Hq / a.Hkv;
  for (int b = 0; b < a.B; ++b) {
    const Sequence s = sequence(a, b);
    if (s.nq == 0) continue;
    for (int hkv = 0; hkv < a.Hkv; ++hkv) {
      // Panels hold the key tiles of the batch's key range only, from k0;
      // packing starts at the NR-aligned key p0 at or before its first key.
      const KeyPanels kp = key_panels(s);
      const int nk_pad = kp.nk_pad, dv_pad = round_up(a.Dv, NR);
      Scratch kt((int64_t)nk_pad * a.Dqk), vp((int64_t)nk_pad * dv_pad);
      std::vector<uint8_t> v_bad(kp.n_packed);
      parallel_rows(kp.n_packed, PACK_ROWS, [&](int r0, int r1) {
        const int j = kp.p0 + r0, at = j - kp.k0;  // key, and its row in the panels
        pack_transposed_panels(a.k, s, hkv, s.k_row0 + j, r1 - r0, a.Dqk, kt.p + (int64_t)(at / NR) * a.Dqk * NR);
        pack_row_panels(a.v, s, hkv, s.k_row0 + j, r1 - r0, nk_pad, a.Dv, 1.f, vp.p + (int64_t)at * NR,
                        v_bad.data() + r0);
      });
      std::vector<int> v_bad_keys;
      for (int r = 0; r < kp.n_packed; ++r)
        if (v_bad[r]) v_bad_keys.push_back(kp.p0 + r);
      ForwardHead fh{&a, &o, s, b, hkv, kp.k0, nk_pad, dv_pad, kt.p, vp.p, v_bad_keys.data(),
                     (int)v_bad_keys.size()};
      const int bq = query_tile_rows(a), q_tiles = (s.nq + bq - 1) / bq;
      // Last query tiles first: under causal masks they see the most keys,
      // and handing out the heaviest work first balances the threads.
      auto task = [&](int64_t t, int) {
        forward_tile(fh, hkv * G + (int)(t / q_tiles), (q_tiles - 1 - (int)(t % q_tiles)) * bq);
      };
      parallel_tasks((int64_t)G * q_tiles, task);
    }
  }
}

// ---- backward ---------------------------------------------------------------

namespace {

struct BackwardHead {
  const AttentionArgs* a;
  const BackwardArgs* g;
  Sequence s;
  int b, hkv, G;
  int k0;  // first key of the panels (the key range's first tile)
  int nq_pad, nk_pad, dqk_pad, dv_pad;
  // Per kv head, keys k0..: K^T panels (for S), V^T panels (for dP), K row panels (for dQ).
  const float *kt, *vt, *kp;
  // Per query head of the group (index g): scaled Q rows and panels, dO rows
  // and panels, lse, delta (= dO . O - dlse, from the stored output) and dlse.
  const float *qs, *qp, *dos, *dop, *lse, *delta, *dlse;
  // Every key of the range lies in one key tile: the tile then sees whole
  // rows and takes delta as sum_j P_j dP_j - dlse in float32 instead of
  // dO . O. The stored O is rounded to the input dtype, and where a row's
  // mass sits on one key (a key and a sink, say) dS = P (dP - delta) cancels
  // to P (1 - P) dP and magnifies that rounding; the tile's own sum has no
  // such error. Longer rows would need a second pass over the keys. Only
  // where out and lse are this call's own (BackwardArgs::own_output): ring
  // attention's blocks pass global ones, whose delta spans other keys too.
  bool whole_rows;
  // Per worker: dQ accumulators [G, nq, dqk_pad].
  float* dq_acc;
  // Non-finite rows (their panels qp, dop, kp hold zeros there): q_bad, do_bad
  // per [G, nq]; k_bad per key. Prefix counts [G, nq + 1] of rows needing the
  // exact tile path (non-finite q, dO, delta, or NaN lse) and [nk + 1] of
  // keys with a non-finite k or v.
  const uint8_t *q_bad, *do_bad, *k_bad;
  const int *bad_rows, *bad_keys;

  bool tile_dirty(int g, int i0, int i1, int j0, int j1) const {
    const int* rows = bad_rows + (int64_t)g * (s.nq + 1);
    return rows[i1] != rows[i0] || bad_keys[j1] != bad_keys[j0];
  }
};

// One key tile: accumulate its dK, dV over every query that sees it.
void backward_tile(const BackwardHead& bh, int j0, int worker) {
  const AttentionArgs& a = *bh.a;
  const Sequence& s = bh.s;
  const int nk_tile = std::min(BK, s.nk - j0), n_cols = round_up(nk_tile, NR);
  const int Dqk = a.Dqk, Dv = a.Dv, dqk_pad = bh.dqk_pad, dv_pad = bh.dv_pad, nq_pad = bh.nq_pad;
  const int bq = query_tile_rows(a);
  Scratch S(BQ_MAX * BK, false), T(BQ_MAX * BK, false), dP(BQ_MAX * BK, false), dK(BK * dqk_pad), dV(BK * dv_pad);
  float* dq_acc = bh.dq_acc + (int64_t)worker * bh.G * s.nq * dqk_pad;
  std::vector<uint8_t> kept;  // only for tiles with non-finite rows or keys
  for (int g = 0; g < bh.G; ++g) {
    const int h = bh.hkv * bh.G + g;
    LogitRules rules{&a, &s, bh.b, h};
    const float* qs = bh.qs + (int64_t)g * s.nq * Dqk;
    const float* qp = bh.qp + (int64_t)g * nq_pad * dqk_pad;
    const float* dos = bh.dos + (int64_t)g * s.nq * Dv;
    const float* dop = bh.dop + (int64_t)g * nq_pad * dv_pad;
    const float* lse = bh.lse + (int64_t)g * s.nq;
    const float* delta = bh.delta + (int64_t)g * s.nq;
    const float* dlse = bh.dlse + (int64_t)g * s.nq;
    float* dq = dq_acc + (int64_t)g * s.nq * dqk_pad;
    for (int i0 = 0; i0 < s.nq; i0 += bq) {
      const int mq = std::min(bq, s.nq - i0);
      if (!rules.tile_live(i0, i0 + mq, j0, j0 + nk_tile)) continue;
      const bool dirty = bh.tile_dirty(g, i0, i0 + mq, j0, j0 + nk_tile);
      // S = Qs K^T, transformed exactly as in the forward.
      gemm(mq, n_cols, Dqk, qs + (int64_t)i0 * Dqk, Dqk, 1, bh.kt + (int64_t)((j0 - bh.k0) / NR) * Dqk * NR,
           Dqk * NR, S.p, BK, false);
      if (rules.tile_plain(i0, i0 + mq, j0, j0 + nk_tile))
        rules.apply_plain(S.p, BK, mq, nk_tile, n_cols);
      else
        rules.apply(S.p, BK, i0, mq, j0, nk_tile, n_cols, T.p);
      if (dirty) {  // which pairs are kept, before S turns into P
        kept.resize((size_t)mq * BK);
        for (int r = 0; r < mq; ++r)
          for (int c = 0; c < n_cols; ++c)
            kept[r * BK + c] = S.p[r * BK + c] != NEG_INF && lse[i0 + r] != NEG_INF;
      }
      // P = exp(S - lse); rows with lse = -inf saw no key and get P = 0; rows
      // with lse = NaN (poisoned) get NaN on their kept pairs only.
      for (int r = 0; r < mq; ++r) {
        float* row = S.p + r * BK;
        const float l = lse[i0 + r];
        if (l == NEG_INF) {
          std::memset(row, 0, n_cols * sizeof(float));
          continue;
        }
        if (std::isnan(l)) {
          for (int c = 0; c < n_cols; ++c) row[c] = row[c] == NEG_INF ? 0.f : NOT_A_NUMBER;
          continue;
        }
        const vf lv = splat(l);
        for (int c = 0; c < n_cols; c += VL) storeu(row + c, vexp(loadu(row + c) - lv));
      }
      // dV += P^T dO   (P read column-major as P^T)
      gemm(nk_tile, dv_pad, mq, S.p, 1, BK, dop + (int64_t)i0 * NR, (int64_t)nq_pad * NR, dV.p, dv_pad, true);
      if (dirty)  // ... and the non-finite dO rows (zeros in dop), pair by pair where kept
        for (int r = 0; r < mq; ++r)
          if (bh.do_bad[(int64_t)g * s.nq + i0 + r])
            for (int c = 0; c < nk_tile; ++c)
              if (kept[r * BK + c]) add_scaled_row(dV.p + c * dv_pad, S.p[r * BK + c], dos + (int64_t)(i0 + r) * Dv, Dv);
      // dP = dO V^T
      gemm(mq, n_cols, Dv, dos + (int64_t)i0 * Dv, Dv, 1, bh.vt + (int64_t)((j0 - bh.k0) / NR) * Dv * NR, Dv * NR,
           dP.p, BK, false);
      // dS = P (dP - delta), through softcap's derivative 1 - tanh^2 when set.
      for (int r = 0; r < mq; ++r) {
        float* p = S.p + r * BK;
        const float* dp = dP.p + r * BK;
        float d = delta[i0 + r];
        if (bh.whole_rows && !dirty) {  // clean tile: delta from this tile's P and dP
          float acc = 0.f;
          for (int c = 0; c < nk_tile; ++c) acc += p[c] * dp[c];
          d = acc - dlse[i0 + r];
        }
        if (dirty) {  // a dropped pair's dP or delta may be NaN: select, never 0 * NaN
          const uint8_t* kr = kept.data() + r * BK;
          for (int c = 0; c < n_cols; ++c) p[c] = kr[c] ? p[c] * (dp[c] - d) : 0.f;
        } else {
          for (int c = 0; c < n_cols; ++c) p[c] = p[c] * (dp[c] - d);
        }
        if (a.softcap > 0) {
          const float* t = T.p + r * BK;
          for (int c = 0; c < nk_tile; ++c)
            if (p[c] != 0.f) p[c] *= 1.f - t[c] * t[c];
        }
      }
      // dK += dS^T Qs (the scale rides in Qs); dQ += dS K (scaled at the end).
      gemm(nk_tile, dqk_pad, mq, S.p, 1, BK, qp + (int64_t)i0 * NR, (int64_t)nq_pad * NR, dK.p, dqk_pad, true);
      gemm(mq, dqk_pad, n_cols, S.p, BK, 1, bh.kp + (int64_t)(j0 - bh.k0) * NR, (int64_t)bh.nk_pad * NR,
           dq + (int64_t)i0 * dqk_pad, dqk_pad, true);
      if (dirty) {  // the non-finite q rows (zeros in qp) and k rows (zeros in kp), where kept
        for (int r = 0; r < mq; ++r)
          if (bh.q_bad[(int64_t)g * s.nq + i0 + r])
            for (int c = 0; c < nk_tile; ++c)
              if (kept[r * BK + c]) add_scaled_row(dK.p + c * dqk_pad, S.p[r * BK + c], qs + (int64_t)(i0 + r) * Dqk, Dqk);
        for (int c = 0; c < nk_tile; ++c) {
          if (!bh.k_bad[j0 + c]) continue;
          float krow[MAX_ROW];
          load_row(a.k.data, row_offset(a.k, s, bh.hkv, s.k_row0 + j0 + c), a.k.sd, a.k.dtype, Dqk, 1.f, krow);
          for (int r = 0; r < mq; ++r)
            if (kept[r * BK + c]) add_scaled_row(dq + (int64_t)(i0 + r) * dqk_pad, S.p[r * BK + c], krow, Dqk);
        }
      }
    }
  }
  // Write this tile's dK, dV (already summed over the query heads of the group).
  const BackwardArgs& gr = *bh.g;
  for (int r = 0; r < nk_tile; ++r) {
    const int64_t row = out_row(s, a.Hkv, bh.hkv, s.k_row0 + j0 + r, a.Nk);
    for (int c = 0; c < Dqk; ++c) store_scalar(gr.dk, row * Dqk + c, a.q.dtype, dK.p[r * dqk_pad + c]);
    for (int c = 0; c < Dv; ++c) store_scalar(gr.dv, row * Dv + c, a.q.dtype, dV.p[r * dv_pad + c]);
  }
}

// dK = dV = 0 for keys [j_begin, j_end) of kv head hkv (keys no query sees).
void zero_key_grads(const AttentionArgs& a, const BackwardArgs& gr, const Sequence& s, int hkv, int j_begin,
                    int j_end) {
  for (int j = j_begin; j < j_end; ++j) {
    const int64_t row = out_row(s, a.Hkv, hkv, s.k_row0 + j, a.Nk);
    for (int c = 0; c < a.Dqk; ++c) store_scalar(gr.dk, row * a.Dqk + c, a.q.dtype, 0.f);
    for (int c = 0; c < a.Dv; ++c) store_scalar(gr.dv, row * a.Dv + c, a.q.dtype, 0.f);
  }
}

}  // namespace

void attention_backward(const AttentionArgs& a, const BackwardArgs& gr) {
  const int G = a.Hq / a.Hkv, workers = num_workers();
  const int dqk_pad = round_up(a.Dqk, NR), dv_pad = round_up(a.Dv, NR);
  for (int b = 0; b < a.B; ++b) {
    const Sequence s = sequence(a, b);
    for (int hkv = 0; hkv < a.Hkv; ++hkv) {
      if (s.no_keys() || s.nq == 0) {
        // No key in range (or no query): the gradients of this head are zero.
        for (int g = 0; g < G && s.nq > 0; ++g)
          for (int i = 0; i < s.nq; ++i) {
            const int64_t row = out_row(s, a.Hq, hkv * G + g, s.q_row0 + i, a.Nq);
            for (int c = 0; c < a.Dqk; ++c) store_scalar(gr.dq, row * a.Dqk + c, a.q.dtype, 0.f);
          }
        zero_key_grads(a, gr, s, hkv, 0, s.nk);
        continue;
      }
      // Only the key tiles of the batch's key range are packed and visited;
      // the keys of the other tiles get zero gradients.
      const KeyPanels panels = key_panels(s);
      const int first_tile = panels.k0 / BK, k_tiles = (s.key_end - 1) / BK - first_tile + 1;
      zero_key_grads(a, gr, s, hkv, 0, panels.k0);
      zero_key_grads(a, gr, s, hkv, std::min(s.nk, (first_tile + k_tiles) * BK), s.nk);
      const int nk_pad = panels.nk_pad, nq_pad = round_up(s.nq, NR);
      Scratch kt((int64_t)nk_pad * a.Dqk), vt((int64_t)nk_pad * a.Dv), kp((int64_t)nk_pad * dqk_pad);
      // Flags per key (indexed by key; zero outside the packed keys).
      std::vector<uint8_t> k_bad(s.nk), v_bad(s.nk), q_bad((size_t)G * s.nq), do_bad((size_t)G * s.nq);
      parallel_rows(panels.n_packed, PACK_ROWS, [&](int r0, int r1) {
        const int j = panels.p0 + r0, at = j - panels.k0;  // key, and its row in the panels
        const int64_t row0 = s.k_row0 + j;
        pack_transposed_panels(a.k, s, hkv, row0, r1 - r0, a.Dqk, kt.p + (int64_t)(at / NR) * a.Dqk * NR);
        pack_transposed_panels(a.v, s, hkv, row0, r1 - r0, a.Dv, vt.p + (int64_t)(at / NR) * a.Dv * NR,
                               v_bad.data() + j);
        pack_row_panels(a.k, s, hkv, row0, r1 - r0, nk_pad, a.Dqk, 1.f, kp.p + (int64_t)at * NR, k_bad.data() + j);
      });
      Scratch qs((int64_t)G * s.nq * a.Dqk, false), qp((int64_t)G * nq_pad * dqk_pad),
          dos((int64_t)G * s.nq * a.Dv, false), dop((int64_t)G * nq_pad * dv_pad), lse((int64_t)G * s.nq, false),
          delta((int64_t)G * s.nq, false), dlse((int64_t)G * s.nq, false);
      for (int g = 0; g < G; ++g) parallel_rows(s.nq, PACK_ROWS, [&](int r0, int r1) {
        const int h = hkv * G + g, n = r1 - r0;
        const int64_t q0 = s.q_row0 + r0;
        pack_rows(a.q, s, h, q0, n, a.Dqk, a.scale, qs.p + ((int64_t)g * s.nq + r0) * a.Dqk, a.Dqk);
        pack_row_panels(a.q, s, h, q0, n, nq_pad, a.Dqk, a.scale, qp.p + (int64_t)g * nq_pad * dqk_pad + (int64_t)r0 * NR,
                        q_bad.data() + (int64_t)g * s.nq + r0);
        pack_rows(gr.dout, s, h, q0, n, a.Dv, 1.f, dos.p + ((int64_t)g * s.nq + r0) * a.Dv, a.Dv);
        pack_row_panels(gr.dout, s, h, q0, n, nq_pad, a.Dv, 1.f, dop.p + (int64_t)g * nq_pad * dv_pad + (int64_t)r0 * NR,
                        do_bad.data() + (int64_t)g * s.nq + r0);
        float orow[MAX_ROW];
        for (int i = r0; i < r1; ++i) {
          // delta_i = dO_i . O_i - dlse_i
          const int64_t row = out_row(s, a.Hq, h, s.q_row0 + i, a.Nq);
          load_row(gr.out.data, row_offset(gr.out, s, h, s.q_row0 + i), gr.out.sd, gr.out.dtype, a.Dv, 1.f, orow);
          const float* d = dos.p + ((int64_t)g * s.nq + i) * a.Dv;
          float acc = 0.f;
          for (int c = 0; c < a.Dv; ++c) acc += d[c] * orow[c];
          dlse.p[g * s.nq + i] = gr.dlse ? gr.dlse[row] : 0.f;
          delta.p[g * s.nq + i] = acc - dlse.p[g * s.nq + i];
          lse.p[g * s.nq + i] = gr.lse[row];
        }
      });
      // Prefix counts of the rows and keys that send a tile down the exact path.
      std::vector<int> bad_rows((size_t)G * (s.nq + 1)), bad_keys(s.nk + 1);
      for (int g = 0; g < G; ++g) {
        int* rows = bad_rows.data() + (int64_t)g * (s.nq + 1);
        for (int i = 0; i < s.nq; ++i) {
          const int64_t x = (int64_t)g * s.nq + i;
          const bool bad = q_bad[x] || do_bad[x] || !std::isfinite(delta.p[x]) || std::isnan(lse.p[x]);
          rows[i + 1] = rows[i] + bad;
        }
      }
      for (int j = 0; j < s.nk; ++j) bad_keys[j + 1] = bad_keys[j] + (k_bad[j] || v_bad[j]);
      Scratch dq_acc((int64_t)workers * G * s.nq * dqk_pad);
      BackwardHead bh{&a, &gr, s, b, hkv, G, panels.k0, nq_pad, nk_pad, dqk_pad, dv_pad, kt.p, vt.p, kp.p,
                      qs.p, qp.p, dos.p, dop.p, lse.p, delta.p, dlse.p, gr.own_output && k_tiles == 1, dq_acc.p,
                      q_bad.data(), do_bad.data(), k_bad.data(), bad_rows.data(), bad_keys.data()};
      auto task = [&](int64_t t, int worker) { backward_tile(bh, (first_tile + (int)t) * BK, worker); };
      parallel_tasks(k_tiles, task);
      // dQ = scale * sum over workers of dS K.
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < s.nq; ++i) {
          const int64_t row = out_row(s, a.Hq, hkv * G + g, s.q_row0 + i, a.Nq);
          for (int c = 0; c < a.Dqk; ++c) {
            float acc = 0.f;
            for (int w = 0; w < workers; ++w) acc += dq_acc.p[(((int64_t)w * G + g) * s.nq + i) * dqk_pad + c];
            store_scalar(gr.dq, row * a.Dqk + c, a.q.dtype, acc * a.scale);
          }
        }
    }
  }
}

}  // namespace MLXF_ISA
}  // namespace mlxf
