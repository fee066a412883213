// Attention straight from an affine-quantized K/V cache on the CPU.
//
// Compiled once per instruction set like attention_cpu_kernel.cpp. One task
// owns a block of query rows (every query head of one kv head times a few
// queries, so one dequantized key tile serves up to ROWS_TARGET rows) and
// walks its key tiles:
//
//   forward:  K^T, V tiles <- dequantize(256 keys); S = Q K^T; rules;
//             online softmax; O += P V
//   backward: S = Q K^T; P = exp(S - lse); dP = dO V^T;
//             dS = P (dP - delta); dQ += dS K        (k, v are constants)
//
// Nothing but one tile of K and V is ever held in fp32: the extra memory is
// O(tile) per worker (plus, for decode split over keys, one partial output
// row per task). With few row blocks (decode: B * Hkv blocks of G rows) the
// keys are split into chunks so that every worker has tasks, and the chunks'
// partial softmaxes are combined by their log-sum-exp.
//
// Non-finite values follow docs' contract (issue 13): dropped keys are
// removed by selects, never by multiplying with 0, including when a tile's
// dequantized K or V holds a NaN or inf (then the tile takes an exact
// element-wise path for the products that would mix dropped keys in).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_quant.h"
#include "thread_pool.h"

#ifndef MLXF_ISA
#error "MLXF_ISA must name the instruction-set namespace"
#endif

namespace mlxf {
namespace MLXF_ISA {

#include "cpu_simd.h"

namespace {

constexpr int BK = 256;          // keys per tile (a multiple of NR)
constexpr int ROWS_TARGET = 64;  // query rows (heads x queries) per task
constexpr int MAX_ROW_WORDS = 576 * 8 / 32;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// max that keeps a NaN from either side (std::max and fmax drop it).
inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// ---- dequantization -----------------------------------------------------------

// Codes of one row, 32 values at a time (= BITS whole words): value e of a
// block sits at bit e * BITS of the block's little-endian bit stream, so 3-,
// 5- and 6-bit values may straddle two words.
template <int BITS>
inline void unpack_codes(const uint32_t* w, int d, float* codes) {
  constexpr uint32_t MASK = (1u << BITS) - 1;
  for (int c0 = 0; c0 < d; c0 += 32, w += BITS) {
#pragma GCC unroll 32
    for (int e = 0; e < 32; ++e) {
      const int bit = e * BITS, word = bit / 32, shift = bit % 32;
      uint32_t x = w[word] >> shift;
      if (shift + BITS > 32) x |= w[word + 1] << (32 - shift);
      codes[c0 + e] = (float)(x & MASK);
    }
  }
}

// The same for widths that divide 8 (2, 4, 8 bits): a byte holds 8 / BITS
// whole values, lowest first, so the loop runs over bytes, which the
// compiler vectorises.
template <int BITS>
inline void unpack_byte_codes(const uint32_t* w, int d, float* codes) {
  constexpr int PER = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w);
  for (int i = 0; i < d / PER; ++i) {
    const uint32_t x = bytes[i];
#pragma GCC unroll 4
    for (int e = 0; e < PER; ++e) codes[i * PER + e] = (float)((x >> (e * BITS)) & MASK);
  }
}

// Token row n of head h of batch b, dequantized to fp32 (d = q.dim values).
// Returns false if any value is NaN or inf (only possible from non-finite
// scales or biases).
bool dequant_row(const QuantView& q, int bits, int group_size, int64_t b, int64_t h, int64_t n, float* dst) {
  const uint32_t* w = static_cast<const uint32_t*>(q.words.data) + q.words.offset(b, h, n);
  uint32_t local[MAX_ROW_WORDS];
  if (q.words.s[3] != 1) {  // a strided view: gather the row's words first
    for (int i = 0; i < q.dim * bits / 32; ++i) local[i] = w[i * q.words.s[3]];
    w = local;
  }
  switch (bits) {
    case 2: unpack_byte_codes<2>(w, q.dim, dst); break;
    case 3: unpack_codes<3>(w, q.dim, dst); break;
    case 4: unpack_byte_codes<4>(w, q.dim, dst); break;
    case 5: unpack_codes<5>(w, q.dim, dst); break;
    case 6: unpack_codes<6>(w, q.dim, dst); break;
    default: unpack_byte_codes<8>(w, q.dim, dst); break;
  }
  const int64_t so = q.scales.offset(b, h, n), bo = q.biases.offset(b, h, n);
  bool finite = true;
  for (int g = 0; g < q.dim / group_size; ++g) {
    const float s = load_scalar(q.scales.data, so + g * q.scales.s[3], q.scale_dtype);
    const float z = load_scalar(q.biases.data, bo + g * q.biases.s[3], q.scale_dtype);
    finite &= std::isfinite(s) && std::isfinite(z);
    float* x = dst + g * group_size;
    for (int c = 0; c < group_size; ++c) x[c] = s * x[c] + z;
  }
  return finite;
}

// The tile's rows [j0, j0 + n) of one head, dequantized and laid out as the
// micro-GEMM's B operand. Padding rows/columns up to n_cols (and d_pad) are 0.
struct TileSource {
  const QuantAttentionArgs* qa;
  const QuantView* q;
  int64_t b, h;
};

// Transposed panels (element (c, j) at dst[(j / NR) * (d * NR) + c * NR + j % NR]),
// the B of S = Q K^T or dP = dO V^T. row_panels, when given, also receives the
// rows as panels over c (element (j, c) at [(c / NR) * (BK * NR) + j * NR + c % NR]),
// the B of dQ = dS K. Returns false if a value is not finite.
bool dequant_tile(const TileSource& src, int j0, int n, int n_cols, float* transposed, float* row_panels, int d_pad) {
  const int d = src.q->dim;
  float row[576];
  bool finite = true;
  for (int j = 0; j < n_cols; ++j) {
    if (j < n)
      finite &= dequant_row(*src.q, src.qa->bits, src.qa->group_size, src.b, src.h, j0 + j, row);
    else
      std::memset(row, 0, sizeof(float) * d);
    if (transposed) {
      float* panel = transposed + (int64_t)(j / NR) * d * NR + j % NR;
      for (int c = 0; c < d; ++c) panel[c * NR] = row[c];
    }
    if (row_panels) {
      std::memset(row + d, 0, sizeof(float) * (d_pad - d));
      for (int c0 = 0; c0 < d_pad; c0 += NR)
        std::memcpy(row_panels + (int64_t)(c0 / NR) * BK * NR + (int64_t)j * NR, row + c0, sizeof(float) * NR);
    }
  }
  return finite;
}

// ---- the logit rules (softcap, ALiBi, additive mask, dropped keys) -------------

struct Rules {
  const AttentionArgs* a;
  int b;

  int position(int i) const { return i + a->Nk - a->Nq; }  // bottom-right alignment
  int key_lo(int i) const { return a->window_left >= 0 ? std::max(0, position(i) - a->window_left) : 0; }
  int key_hi(int i) const {
    return a->window_right >= 0 ? std::min(a->Nk - 1, position(i) + a->window_right) : a->Nk - 1;
  }
  bool tile_live(int i0, int i1, int j0, int j1) const { return key_lo(i0) <= j1 - 1 && key_hi(i1 - 1) >= j0; }
  // No per-element work: every (query, key) pair of the tile is kept.
  bool tile_plain(int i0, int i1, int j0, int j1) const {
    if (a->softcap > 0 || a->alibi || a->mask_kind) return false;
    return key_lo(i1 - 1) <= j0 && key_hi(i0) >= j1 - 1;
  }

  // Logits (already scaled) of query i, head h, keys j0..: softcap, ALiBi,
  // mask; dropped and padded keys become -inf (a select). tanh values go to
  // trow when given (the backward's chain rule).
  void apply(float* row, int h, int i, int j0, int nk_tile, int n_cols, float* trow) const {
    const int p = position(i), lo = key_lo(i), hi = key_hi(i);
    const float cap = a->softcap, slope = a->alibi ? a->alibi[b * a->Hq + h] : 0.f;
    const auto& m = a->mask;
    const int64_t mrow = b * m.s[0] + h * m.s[1] + (int64_t)i * m.s[2];
    for (int c = 0; c < n_cols; ++c) {
      const int j = j0 + c;
      if (c >= nk_tile || j < lo || j > hi) {
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
      if (a->mask_kind == 1) {
        if (!static_cast<const bool*>(m.data)[mrow + (int64_t)j * m.s[3]]) x = NEG_INF;
      } else if (a->mask_kind == 2) {
        x += load_scalar(m.data, mrow + (int64_t)j * m.s[3], a->mask_dtype);
      }
      row[c] = x;
    }
  }
};

// ---- the task grid ----------------------------------------------------------------

// Tasks: (batch, kv head, query tile, key chunk). A query tile holds bq
// queries of each of the G query heads of its kv head: row r is query
// i0 + r % mq of head hkv * G + r / mq.
struct Grid {
  int G, bq, q_tiles, k_chunks, chunk_keys;
  int max_rows() const { return G * bq; }
  int64_t tasks(const AttentionArgs& a) const { return (int64_t)a.B * a.Hkv * q_tiles * k_chunks; }
};

Grid make_grid(const AttentionArgs& a, bool split_keys) {
  Grid g;
  g.G = a.Hq / a.Hkv;
  g.bq = std::max(1, std::min(a.Nq, ROWS_TARGET / g.G));
  g.q_tiles = (a.Nq + g.bq - 1) / g.bq;
  const int64_t blocks = (int64_t)a.B * a.Hkv * g.q_tiles, want = 4 * (int64_t)num_workers();
  g.k_chunks = 1;
  if (split_keys && blocks > 0 && blocks < want) g.k_chunks = (int)std::min<int64_t>((want + blocks - 1) / blocks, (a.Nk + 1023) / 1024);
  g.k_chunks = std::max(1, g.k_chunks);
  g.chunk_keys = round_up((a.Nk + g.k_chunks - 1) / g.k_chunks, BK);
  if (g.chunk_keys == 0) g.chunk_keys = BK;
  g.k_chunks = std::max(1, (a.Nk + g.chunk_keys - 1) / g.chunk_keys);
  return g;
}

struct TaskRows {
  int b, hkv, i0, mq, rows, chunk;
};

// Heaviest query tiles (last, under causal masks) first, for balance.
TaskRows task_rows(const AttentionArgs& a, const Grid& g, int64_t t) {
  TaskRows r;
  r.chunk = (int)(t % g.k_chunks);
  t /= g.k_chunks;
  const int qt = g.q_tiles - 1 - (int)(t % g.q_tiles);
  t /= g.q_tiles;
  r.hkv = (int)(t % a.Hkv);
  r.b = (int)(t / a.Hkv);
  r.i0 = qt * g.bq;
  r.mq = std::min(g.bq, a.Nq - r.i0);
  r.rows = g.G * r.mq;
  return r;
}

inline int64_t q_offset(const View4& v, int b, int h, int i) { return b * v.sb + h * v.sh + (int64_t)i * v.sn; }
inline int64_t out_index(const AttentionArgs& a, int b, int h, int i) { return ((int64_t)b * a.Hq + h) * a.Nq + i; }

// Scaled q rows (or dO rows with mul 1) of a task, row-major [rows x d].
void load_rows(const View4& v, const AttentionArgs& a, const TaskRows& tr, int G, int d, float mul, float* dst) {
  for (int r = 0; r < tr.rows; ++r)
    load_row(v.data, q_offset(v, tr.b, tr.hkv * G + r / tr.mq, tr.i0 + r % tr.mq), v.sd, v.dtype, d, mul,
             dst + (int64_t)r * d);
}

// Transforms the logits of a tile (rows x n_cols at S, leading dim BK) and
// marks dropped pairs. Returns true if the tile had no dropped (kept) key.
bool tile_logits(const Rules& rules, const TaskRows& tr, int G, int j0, int nk_tile, int n_cols, float* S,
                 float* T, uint8_t* dropped) {
  const bool plain = rules.tile_plain(tr.i0, tr.i0 + tr.mq, j0, j0 + nk_tile);
  for (int r = 0; r < tr.rows; ++r) {
    float* row = S + (int64_t)r * BK;
    uint8_t* drow = dropped + (int64_t)r * BK;
    if (plain) {
      for (int c = nk_tile; c < n_cols; ++c) row[c] = NEG_INF;
    } else {
      rules.apply(row, tr.hkv * G + r / tr.mq, tr.i0 + r % tr.mq, j0, nk_tile, n_cols, T ? T + (int64_t)r * BK : nullptr);
    }
    for (int c = 0; c < n_cols; ++c) drow[c] = row[c] == NEG_INF;
  }
  return plain;
}

// ---- forward --------------------------------------------------------------------

struct ForwardCall {
  const QuantAttentionArgs* qa;
  const ForwardOutputs* o;
  Grid g;
  int dv_pad;
  float *part_max, *part_sum, *part_out;  // [tasks, max_rows(, dv_pad)] when k_chunks > 1
};

void forward_task(const ForwardCall& fc, int64_t t) {
  const QuantAttentionArgs& qa = *fc.qa;
  const AttentionArgs& a = qa.base;
  const Grid& g = fc.g;
  const TaskRows tr = task_rows(a, g, t);
  const int rows = tr.rows, Dqk = a.Dqk, dv_pad = fc.dv_pad;
  Scratch qs((int64_t)rows * Dqk, false), S((int64_t)rows * BK, false), O((int64_t)rows * dv_pad),
      row_max(rows, false), row_sum(rows, false), kt((int64_t)Dqk * BK, false), vp((int64_t)BK * dv_pad, false),
      dropped_buf(rows * BK / 4 + 1, false);
  uint8_t* dropped = reinterpret_cast<uint8_t*>(dropped_buf.p);
  load_rows(a.q, a, tr, g.G, Dqk, a.scale, qs.p);
  const bool sink_here = a.sinks && g.k_chunks == 1;  // else added when chunks combine
  for (int r = 0; r < rows; ++r) {
    // A sink is one more logit with a zero value vector: exp(s - s) is 1,
    // or NaN for a NaN or +inf sink (as the materialised softmax gives).
    const float sink = sink_here ? a.sinks[tr.hkv * g.G + r / tr.mq] : NEG_INF;
    row_max.p[r] = sink;
    row_sum.p[r] = sink == NEG_INF ? 0.f : std::exp(sink - sink);
  }
  const Rules rules{&a, tr.b};
  const int lo = std::max(rules.key_lo(tr.i0), tr.chunk * g.chunk_keys);
  const int hi = std::min(rules.key_hi(tr.i0 + tr.mq - 1), (tr.chunk + 1) * g.chunk_keys - 1);
  const TileSource ksrc{&qa, &qa.k, tr.b, tr.hkv}, vsrc{&qa, &qa.v, tr.b, tr.hkv};
  for (int j0 = lo / BK * BK; j0 <= hi; j0 += BK) {
    const int nk_tile = std::min(BK, a.Nk - j0), n_cols = round_up(nk_tile, NR);
    if (!rules.tile_live(tr.i0, tr.i0 + tr.mq, j0, j0 + nk_tile)) continue;
    dequant_tile(ksrc, j0, nk_tile, n_cols, kt.p, nullptr, 0);
    const bool v_finite = dequant_tile(vsrc, j0, nk_tile, n_cols, nullptr, vp.p, dv_pad);
    gemm(rows, n_cols, Dqk, qs.p, Dqk, 1, kt.p, (int64_t)Dqk * NR, S.p, BK, false);
    tile_logits(rules, tr, g.G, j0, nk_tile, n_cols, S.p, nullptr, dropped);
    for (int r = 0; r < rows; ++r) {
      float* row = S.p + (int64_t)r * BK;
      vf mv = splat(NEG_INF);
      vi nan = vi{};
      for (int c = 0; c < n_cols; c += VL) {
        const vf x = loadu(row + c);
        mv = vmax(mv, x);
        nan |= x != x;
      }
      float m_tile = NEG_INF;
      for (int l = 0; l < VL; ++l) m_tile = nan[l] ? std::numeric_limits<float>::quiet_NaN() : nan_max(m_tile, mv[l]);
      const float m_old = row_max.p[r], m_new = nan_max(m_old, m_tile);
      if (m_new == NEG_INF) {  // nothing kept in this row yet
        std::memset(row, 0, n_cols * sizeof(float));
        continue;
      }
      const float alpha = std::exp(m_old - m_new);  // exp(-inf) = 0 on the first hit
      vf sum = vf{};
      const vf mvec = splat(m_new);
      for (int c = 0; c < n_cols; c += VL) {
        const vf p = vexp(loadu(row + c) - mvec);
        storeu(row + c, p);
        sum += p;
      }
      row_sum.p[r] = row_sum.p[r] * alpha + hsum(sum);
      row_max.p[r] = m_new;
      if (alpha != 1.f) {
        float* orow = O.p + (int64_t)r * dv_pad;
        const vf av = splat(alpha);
        for (int c = 0; c < dv_pad; c += VL) storeu(orow + c, loadu(orow + c) * av);
      }
    }
    if (v_finite) {
      // Dropped keys have p = 0 and a finite v: the plain product is exact.
      gemm(rows, dv_pad, n_cols, S.p, BK, 1, vp.p, (int64_t)BK * NR, O.p, dv_pad, true);
    } else {
      // A NaN/inf value row: only kept keys may touch the output.
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < nk_tile; ++c) {
          if (dropped[r * BK + c]) continue;
          const float p = S.p[(int64_t)r * BK + c];
          float* orow = O.p + (int64_t)r * dv_pad;
          for (int d = 0; d < a.Dv; ++d) orow[d] += p * vp.p[(int64_t)(d / NR) * BK * NR + c * NR + d % NR];
        }
    }
  }
  if (g.k_chunks > 1) {
    const int64_t base = t * g.max_rows();
    for (int r = 0; r < rows; ++r) {
      fc.part_max[base + r] = row_max.p[r];
      fc.part_sum[base + r] = row_sum.p[r];
      std::memcpy(fc.part_out + (base + r) * dv_pad, O.p + (int64_t)r * dv_pad, sizeof(float) * dv_pad);
    }
    return;
  }
  // Normalise; a row with no kept key (sum exactly 0) gives out 0, lse -inf.
  for (int r = 0; r < rows; ++r) {
    const int64_t orow = out_index(a, tr.b, tr.hkv * g.G + r / tr.mq, tr.i0 + r % tr.mq);
    const float l = row_sum.p[r], inv = l == 0.f ? 0.f : 1.f / l;
    for (int c = 0; c < a.Dv; ++c) store_scalar(fc.o->out, orow * a.Dv + c, a.q.dtype, O.p[(int64_t)r * dv_pad + c] * inv);
    fc.o->lse[orow] = l == 0.f ? NEG_INF : row_max.p[r] + std::log(l);
  }
}

// Combines the key chunks of every row by their log-sum-exp (decode split).
void combine_chunks(const ForwardCall& fc) {
  const AttentionArgs& a = fc.qa->base;
  const Grid& g = fc.g;
  float acc[512];
  for (int64_t block = 0; block < g.tasks(a) / g.k_chunks; ++block) {
    const TaskRows tr = task_rows(a, g, block * g.k_chunks);
    for (int r = 0; r < tr.rows; ++r) {
      const int h = tr.hkv * g.G + r / tr.mq;
      const float sink = a.sinks ? a.sinks[h] : NEG_INF;
      float m = sink;
      for (int c = 0; c < g.k_chunks; ++c) m = nan_max(m, fc.part_max[(block * g.k_chunks + c) * g.max_rows() + r]);
      float l = sink == NEG_INF ? 0.f : std::exp(sink - m);
      std::fill(acc, acc + a.Dv, 0.f);
      for (int c = 0; c < g.k_chunks; ++c) {
        const int64_t p = (block * g.k_chunks + c) * g.max_rows() + r;
        if (fc.part_max[p] == NEG_INF) continue;  // no kept key in this chunk
        const float w = std::exp(fc.part_max[p] - m);
        l += w * fc.part_sum[p];
        for (int d = 0; d < a.Dv; ++d) acc[d] += w * fc.part_out[p * fc.dv_pad + d];
      }
      const int64_t orow = out_index(a, tr.b, h, tr.i0 + r % tr.mq);
      const float inv = l == 0.f ? 0.f : 1.f / l;
      for (int d = 0; d < a.Dv; ++d) store_scalar(fc.o->out, orow * a.Dv + d, a.q.dtype, acc[d] * inv);
      fc.o->lse[orow] = l == 0.f ? NEG_INF : m + std::log(l);
    }
  }
}

// ---- backward (dq) -------------------------------------------------------------

struct BackwardCall {
  const QuantAttentionArgs* qa;
  const QuantBackwardArgs* g;
  Grid grid;
  int dqk_pad;
};

void backward_task(const BackwardCall& bc, int64_t t) {
  const QuantAttentionArgs& qa = *bc.qa;
  const AttentionArgs& a = qa.base;
  const QuantBackwardArgs& gr = *bc.g;
  const Grid& g = bc.grid;
  const TaskRows tr = task_rows(a, g, t);
  const int rows = tr.rows, Dqk = a.Dqk, Dv = a.Dv, dqk_pad = bc.dqk_pad;
  Scratch qs((int64_t)rows * Dqk, false), dos((int64_t)rows * Dv, false), dq((int64_t)rows * dqk_pad),
      S((int64_t)rows * BK, false), T(a.softcap > 0 ? (int64_t)rows * BK : 1, false), dP((int64_t)rows * BK, false),
      kt((int64_t)Dqk * BK, false), kp((int64_t)BK * dqk_pad, false), vt((int64_t)Dv * BK, false),
      lse(rows, false), delta(rows, false), dropped_buf(rows * BK / 4 + 1, false);
  uint8_t* dropped = reinterpret_cast<uint8_t*>(dropped_buf.p);
  load_rows(a.q, a, tr, g.G, Dqk, a.scale, qs.p);
  load_rows(gr.dout, a, tr, g.G, Dv, 1.f, dos.p);
  for (int r = 0; r < rows; ++r) {
    const int64_t row = out_index(a, tr.b, tr.hkv * g.G + r / tr.mq, tr.i0 + r % tr.mq);
    lse.p[r] = gr.lse[row];
    delta.p[r] = gr.delta[row];
  }
  const Rules rules{&a, tr.b};
  const int lo = rules.key_lo(tr.i0), hi = rules.key_hi(tr.i0 + tr.mq - 1);
  const TileSource ksrc{&qa, &qa.k, tr.b, tr.hkv}, vsrc{&qa, &qa.v, tr.b, tr.hkv};
  for (int j0 = lo / BK * BK; j0 <= hi; j0 += BK) {
    const int nk_tile = std::min(BK, a.Nk - j0), n_cols = round_up(nk_tile, NR);
    if (!rules.tile_live(tr.i0, tr.i0 + tr.mq, j0, j0 + nk_tile)) continue;
    const bool k_finite = dequant_tile(ksrc, j0, nk_tile, n_cols, kt.p, kp.p, dqk_pad);
    dequant_tile(vsrc, j0, nk_tile, n_cols, vt.p, nullptr, 0);
    // S = Qs K^T, transformed exactly as in the forward; P = exp(S - lse).
    gemm(rows, n_cols, Dqk, qs.p, Dqk, 1, kt.p, (int64_t)Dqk * NR, S.p, BK, false);
    tile_logits(rules, tr, g.G, j0, nk_tile, n_cols, S.p, a.softcap > 0 ? T.p : nullptr, dropped);
    // dP = dO V^T
    gemm(rows, n_cols, Dv, dos.p, Dv, 1, vt.p, (int64_t)Dv * NR, dP.p, BK, false);
    // dS = P (dP - delta) on kept pairs, 0 (a select) on dropped ones; a row
    // that kept no key at all (lse = -inf) has P = 0 everywhere.
    for (int r = 0; r < rows; ++r) {
      float* s = S.p + (int64_t)r * BK;
      const float* dp = dP.p + (int64_t)r * BK;
      const uint8_t* drow = dropped + (int64_t)r * BK;
      const float l = lse.p[r], d = delta.p[r];
      for (int c = 0; c < n_cols; ++c) {
        const float p = std::exp(s[c] - l);
        s[c] = (drow[c] || l == NEG_INF) ? 0.f : p * (dp[c] - d);
      }
      if (a.softcap > 0) {
        const float* tt = T.p + (int64_t)r * BK;
        for (int c = 0; c < nk_tile; ++c)
          if (!drow[c]) s[c] *= 1.f - tt[c] * tt[c];
      }
    }
    if (k_finite) {
      // dQ += dS K (scaled at the end).
      gemm(rows, dqk_pad, n_cols, S.p, BK, 1, kp.p, (int64_t)BK * NR, dq.p, dqk_pad, true);
    } else {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < nk_tile; ++c) {
          if (dropped[r * BK + c] || lse.p[r] == NEG_INF) continue;
          const float ds = S.p[(int64_t)r * BK + c];
          float* dqr = dq.p + (int64_t)r * dqk_pad;
          for (int d = 0; d < Dqk; ++d) dqr[d] += ds * kp.p[(int64_t)(d / NR) * BK * NR + c * NR + d % NR];
        }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t row = out_index(a, tr.b, tr.hkv * g.G + r / tr.mq, tr.i0 + r % tr.mq);
    for (int c = 0; c < Dqk; ++c) store_scalar(gr.dq, row * Dqk + c, a.q.dtype, dq.p[(int64_t)r * dqk_pad + c] * a.scale);
  }
}

}  // namespace

void quant_attention_forward(const QuantAttentionArgs& qa, const ForwardOutputs& o) {
  const AttentionArgs& a = qa.base;
  ForwardCall fc{&qa, &o, make_grid(a, true), round_up(a.Dv, NR), nullptr, nullptr, nullptr};
  const int64_t tasks = fc.g.tasks(a);
  const bool split = fc.g.k_chunks > 1;
  Scratch part_max(split ? tasks * fc.g.max_rows() : 1, false), part_sum(split ? tasks * fc.g.max_rows() : 1, false),
      part_out(split ? tasks * fc.g.max_rows() * fc.dv_pad : 1, false);
  fc.part_max = part_max.p;
  fc.part_sum = part_sum.p;
  fc.part_out = part_out.p;
  auto task = [&](int64_t t, int) { forward_task(fc, t); };
  parallel_tasks(tasks, task);
  if (split) combine_chunks(fc);
}

void quant_attention_backward(const QuantAttentionArgs& qa, const QuantBackwardArgs& g) {
  const AttentionArgs& a = qa.base;
  BackwardCall bc{&qa, &g, make_grid(a, false), round_up(a.Dqk, NR)};
  auto task = [&](int64_t t, int) { backward_task(bc, t); };
  parallel_tasks(bc.grid.tasks(a), task);
}

}  // namespace MLXF_ISA
}  // namespace mlxf
