// Shared pieces of the Metal FlashAttention kernels: fragments, call
// parameters, sequence geometry and the logit rules of the op contract.
//
// One source serves two paths: mlx_flash/backends/metal.py passes these
// headers as `header=` to mx.fast.metal_kernel (the kernel body is a short
// call into the templates), and attention.metal instantiates [[kernel]]
// entry points of the same templates for the prebuilt metallib.
//
// Fragments. Every matrix product runs on simdgroup_matrix<float, 8, 8>.
// A fragment is kept in registers as the two elements one SIMD lane owns
// (a float2), in Apple's layout: lane l holds row fm and columns fn, fn + 1
// (see frag_coord). Loads, masks and exp work on those registers directly;
// only the multiply goes through simdgroup_matrix. Inputs of any dtype are
// widened to float when loaded, so products and softmax accumulate in fp32.
#ifndef MLXF_ATTENTION_COMMON_H
#define MLXF_ATTENTION_COMMON_H

#include <metal_stdlib>

using namespace metal;

namespace mlxf {

// Every loop that indexes a fragment array is fully unrolled, so the arrays
// stay in registers (a dynamic index would move them to stack memory).
#define MLXF_UNROLL _Pragma("clang loop unroll(full)")

// log2(e) and ln(2): the kernels run the softmax in the exp2 domain.
#define MLXF_LOG2E 1.4426950408889634f
#define MLXF_LN2 0.6931471805599453f

// ---- feature bits (one int template argument / function constant) ----
enum Feature : int {
  FEAT_MASK_BOOL = 1,     // bool mask, True = keep
  FEAT_MASK_ADD = 2,      // additive float mask
  FEAT_WINDOW = 4,        // causal and/or window bounds
  FEAT_SOFTCAP = 8,       // s = c * tanh(s / c)
  FEAT_ALIBI = 16,        // s -= slope * |p_i - j|
  FEAT_SINKS = 32,        // per-head logit in the denominator
  FEAT_BLOCK_MASK = 64,   // block-sparse: skip dropped tiles
  FEAT_VARLEN = 128,      // packed sequences, cu_seqlens
  FEAT_SPLIT = 256,       // decode: partial results per key split
  FEAT_PACK_GQA = 512,    // decode: one threadgroup per kv head, rows = (head, query)
  FEAT_KEY_RANGE = 1024,  // per-batch valid keys key_start[b] <= j < key_start[b] + key_len[b]
};

// ---- call parameters, laid out by metal.py (_int_params / _float_params) ----
enum IntParam {
  P_BATCH = 0,  // batch, or number of packed sequences
  P_HEADS_Q,
  P_HEADS_KV,
  P_SEQLEN_Q,   // per-batch length, or packed total (varlen)
  P_SEQLEN_K,
  P_WINDOW_LEFT,   // -1: unbounded
  P_WINDOW_RIGHT,  // -1: unbounded (causal sets 0)
  P_BLOCK_Q,       // block_mask block sizes
  P_BLOCK_K,
  P_MASK_STRIDE,        // 4 strides (b, h, i, j), 0 on broadcast dims
  P_BMASK_STRIDE = P_MASK_STRIDE + 4,  // 4 strides (b, h, qblock, kblock)
  P_TILES_PER_SPLIT = P_BMASK_STRIDE + 4,  // decode: key tiles per split
  P_NUM_SPLITS,
  P_COUNT
};
enum FloatParam { F_SCALE = 0, F_SOFTCAP, F_COUNT };

struct Params {
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k;
  int window_left, window_right, block_q, block_k;
  int mask_stride[4];
  int bmask_stride[4];
  int tiles_per_split, num_splits;
  float scale, softcap;
};

inline Params read_params(const device int* ip, const device float* fp) {
  Params p;
  p.batch = ip[P_BATCH];
  p.heads_q = ip[P_HEADS_Q];
  p.heads_kv = ip[P_HEADS_KV];
  p.seqlen_q = ip[P_SEQLEN_Q];
  p.seqlen_k = ip[P_SEQLEN_K];
  p.window_left = ip[P_WINDOW_LEFT];
  p.window_right = ip[P_WINDOW_RIGHT];
  p.block_q = ip[P_BLOCK_Q];
  p.block_k = ip[P_BLOCK_K];
  for (int a = 0; a < 4; ++a) {
    p.mask_stride[a] = ip[P_MASK_STRIDE + a];
    p.bmask_stride[a] = ip[P_BMASK_STRIDE + a];
  }
  p.tiles_per_split = ip[P_TILES_PER_SPLIT];
  p.num_splits = ip[P_NUM_SPLITS];
  p.scale = fp[F_SCALE];
  p.softcap = fp[F_SOFTCAP];
  return p;
}

// ---- where one (sequence, head) lives in the [B, H, N, D] buffers ----
// Dense calls: sequence b is batch row b. Varlen calls: one batch row holds
// all sequences back to back; sequence b is rows cu[b]..cu[b+1].
struct SeqView {
  int batch_row;       // index into the B axis of the buffers
  int q_start, q_len;  // rows of this sequence within the N axis
  int k_start, k_len;
  int q_rows, k_rows;  // N extent of the buffers
  int offset;          // k_len - q_len: bottom-right alignment, p_i = i + offset
  int key_lo, key_hi;  // valid keys [key_lo, key_hi) within [0, k_len) (key ranges; else all)
};

inline SeqView seq_view(int b, int feat, Params p, const device int* cu_q, const device int* cu_k) {
  SeqView s;
  if (feat & FEAT_VARLEN) {
    s.batch_row = 0;
    s.q_start = cu_q[b];
    s.q_len = cu_q[b + 1] - s.q_start;
    s.k_start = cu_k[b];
    s.k_len = cu_k[b + 1] - s.k_start;
  } else {
    s.batch_row = b;
    s.q_start = 0;
    s.q_len = p.seqlen_q;
    s.k_start = 0;
    s.k_len = p.seqlen_k;
  }
  s.q_rows = p.seqlen_q;
  s.k_rows = p.seqlen_k;
  s.offset = s.k_len - s.q_len;
  s.key_lo = 0;
  s.key_hi = s.k_len;
  return s;
}

// Narrows s to batch b's valid key range (FEAT_KEY_RANGE): keys outside
// [key_start[b], key_start[b] + key_len[b]) are dropped like keys past the
// end, so every tile outside it is skipped before it is loaded. Any values
// are allowed (negative starts, ranges past k_len, empty ranges); the sum is
// taken in 64-bit so that it cannot overflow. The alignment p_i = i + offset
// does not move: a range drops keys, it does not shorten the sequence.
inline SeqView with_key_range(SeqView s, int feat, int b, const device int* key_start, const device int* key_len) {
  if (feat & FEAT_KEY_RANGE) {
    const long lo = long(key_start[b]);
    const long hi = lo + long(key_len[b]);
    s.key_lo = lo < 0 ? 0 : (lo > long(s.k_len) ? s.k_len : int(lo));
    s.key_hi = hi < long(s.key_lo) ? s.key_lo : (hi > long(s.k_len) ? s.k_len : int(hi));
  }
  return s;
}

// Element offset of row `i` (sequence coordinates) of head `h` in a
// [B, H, N, D] buffer with N = rows.
inline long row_offset(SeqView s, int heads, int h, int rows, int start, int i, int dim) {
  return ((long(s.batch_row) * heads + h) * rows + start + i) * long(dim);
}

// ---- the logit rules (ARCHITECTURE.md, "Exact semantics"), in order ----
// Given raw = q_i . k_j, returns the final logit, or -inf for a dropped key.
// `dcap` receives d(final)/d(scaled raw) for the backward (softcap's chain rule).
template <typename MT>
struct Logits {
  int feat;
  Params p;
  SeqView s;
  int b, h;
  float slope;
  const device MT* mask;
  const device bool* block_mask;

  inline float apply(float raw, int i, int j, thread float& dcap) const {
    dcap = 1.0f;
    if (i >= s.q_len || j < s.key_lo || j >= s.key_hi) {
      return -INFINITY;
    }
    float x = p.scale * raw;
    if (feat & FEAT_SOFTCAP) {
      float t = tanh(x / p.softcap);
      x = p.softcap * t;
      dcap = 1.0f - t * t;
    }
    int pos = i + s.offset;
    if (feat & FEAT_ALIBI) {
      x -= slope * float(abs(pos - j));
    }
    if (feat & (FEAT_MASK_BOOL | FEAT_MASK_ADD)) {
      // 32-bit: every offset lies inside the mask, which the wrapper keeps
      // below 2^31 elements (metal_buffers.broadcast_strides).
      const int at = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
      // Only float conversions: MT is bool, float, half or bfloat.
      if (feat & FEAT_MASK_ADD) {
        x += float(mask[at]);
      } else if (float(mask[at]) == 0.0f) {
        return -INFINITY;
      }
    }
    if (feat & FEAT_WINDOW) {
      if (p.window_right >= 0 && j > pos + p.window_right) return -INFINITY;
      if (p.window_left >= 0 && j < pos - p.window_left) return -INFINITY;
    }
    if (feat & FEAT_BLOCK_MASK) {
      const int at = b * p.bmask_stride[0] + h * p.bmask_stride[1] + (i / p.block_q) * p.bmask_stride[2] +
                     (j / p.block_k) * p.bmask_stride[3];  // 32-bit: inside the block mask
      if (!block_mask[at]) return -INFINITY;
    }
    return x;
  }

  // Whether every pair of the tile [k0, k1) x queries [q0, q1) (rows past
  // the sequence end aside) is kept structurally: no mask, no block mask, the
  // tile inside the keys and inside the window band of every row.
  inline bool tile_full(int q0, int q1, int k0, int k1) const {
    if (feat & (FEAT_MASK_BOOL | FEAT_MASK_ADD | FEAT_BLOCK_MASK)) return false;
    q1 = min(q1, s.q_len);
    if (k0 < s.key_lo || k1 > s.key_hi || q0 >= q1) return false;
    if (feat & FEAT_WINDOW) {
      int lo = k0 - (q1 - 1 + s.offset);
      int hi = (k1 - 1) - (q0 + s.offset);
      if (p.window_right >= 0 && hi > p.window_right) return false;
      if (p.window_left >= 0 && lo < -p.window_left) return false;
    }
    return true;
  }

  // Whether any key of the tile [k0, k1) x queries [q0, q1) can be kept.
  // Decided from the window band and the block mask alone, so every thread
  // of a threadgroup gets the same answer: skipped tiles are never loaded.
  inline bool tile_live(int q0, int q1, int k0, int k1) const {
    q1 = min(q1, s.q_len);
    k0 = max(k0, s.key_lo);  // only the valid keys of the tile count
    k1 = min(k1, s.key_hi);
    if (q0 >= q1 || k0 >= k1) return false;
    if (feat & FEAT_WINDOW) {
      // j - p_i over the tile spans [lo, hi].
      int lo = k0 - (q1 - 1 + s.offset);
      int hi = (k1 - 1) - (q0 + s.offset);
      if (p.window_right >= 0 && lo > p.window_right) return false;
      if (p.window_left >= 0 && hi < -p.window_left) return false;
    }
    if (feat & FEAT_BLOCK_MASK) {
      for (int qb = q0 / p.block_q; qb <= (q1 - 1) / p.block_q; ++qb) {
        for (int kb = k0 / p.block_k; kb <= (k1 - 1) / p.block_k; ++kb) {
          const int at = b * p.bmask_stride[0] + h * p.bmask_stride[1] + qb * p.bmask_stride[2] +
                         kb * p.bmask_stride[3];
          if (block_mask[at]) return true;
        }
      }
      return false;
    }
    return true;
  }
};

template <typename MT>
inline Logits<MT> make_logits(int feat, Params p, SeqView s, int b, int h,
                              const device float* alibi, const device MT* mask,
                              const device bool* block_mask) {
  Logits<MT> lg;
  lg.feat = feat;
  lg.p = p;
  lg.s = s;
  lg.b = b;
  lg.h = h;
  lg.slope = (feat & FEAT_ALIBI) ? alibi[b * p.heads_q + h] : 0.0f;
  lg.mask = mask;
  lg.block_mask = block_mask;
  return lg;
}

// ---- the forward's per-row drop rules, precomputed once per kernel ----
// The forward classifies each key tile once per threadgroup (every thread
// gets the same answer): skipped (nothing can be kept), full (every pair of
// the tile is kept structurally: no per-logit checks) or partial. Only
// partial tiles test keys one by one, with 32-bit compares against the row's
// precomputed key range and one 32-bit multiply per mask lookup.
template <typename MT>
struct RowRules {
  int feat;
  float scale, softcap, slope;
  int pos;         // aligned position p_i = i + k_len - q_len
  int j_lo, j_hi;  // keys outside [j_lo, j_hi] are dropped (window, causal, key range, sequence end)
  const device MT* mask_row;  // this row of the mask (broadcast strides)
  int mask_sj;
  const device bool* bmask_row;  // this row's query block of the block mask
  int bmask_sj, block_k;

  // The logit of raw = q_i . k_j in natural units (rules 2 and 3 of the
  // non-finite contract: IEEE arithmetic on kept keys), -inf when dropped.
  // STRUCT: whether the tile is partial (check the drop rules).
  // Whether key j is kept structurally (window, causal, sequence end, bool
  // mask, block mask).
  inline bool kept(int j) const {
    bool keep = j >= j_lo && j <= j_hi;
    if (feat & FEAT_MASK_BOOL) {
      keep = keep && float(mask_row[j * mask_sj]) != 0.0f;
    }
    if (feat & FEAT_BLOCK_MASK) {
      keep = keep && bmask_row[(j / block_k) * bmask_sj];
    }
    return keep;
  }

  template <bool STRUCT>
  inline float logit(float raw, int j) const {
    if (STRUCT && !kept(j)) {
      return -INFINITY;
    }
    float x = scale * raw;
    if (feat & FEAT_SOFTCAP) {
      x = softcap * tanh(x / softcap);
    }
    if (feat & FEAT_ALIBI) {
      x -= slope * float(abs(pos - j));
    }
    if (STRUCT && (feat & FEAT_MASK_ADD)) {
      x += float(mask_row[j * mask_sj]);
    }
    return x;
  }
};

// i: the row in its sequence (q_len or more: a row past the end, all dropped).
template <typename MT>
inline RowRules<MT> row_rules(int feat, Params p, SeqView s, int b, int h, int i,
                              const device float* alibi, const device MT* mask,
                              const device bool* block_mask) {
  RowRules<MT> r;
  r.feat = feat;
  r.scale = p.scale;
  r.softcap = p.softcap;
  r.slope = (feat & FEAT_ALIBI) ? alibi[b * p.heads_q + h] : 0.0f;
  r.pos = i + s.offset;
  r.j_lo = s.key_lo;
  r.j_hi = i < s.q_len ? s.key_hi - 1 : -1;
  if (feat & FEAT_WINDOW) {
    if (p.window_left >= 0) r.j_lo = max(r.j_lo, r.pos - p.window_left);
    if (p.window_right >= 0) r.j_hi = min(r.j_hi, r.pos + p.window_right);
  }
  // Rows past the end drop every key (j_hi = -1) and never read the masks;
  // their pointers still point at a valid row.
  const int i_in = min(i, s.q_len - 1);
  r.mask_row = mask;
  r.mask_sj = p.mask_stride[3];
  if (feat & (FEAT_MASK_BOOL | FEAT_MASK_ADD)) {
    r.mask_row = mask + (long(b) * p.mask_stride[0] + long(h) * p.mask_stride[1] +
                         long(max(i_in, 0)) * p.mask_stride[2]);
  }
  r.bmask_row = block_mask;
  r.bmask_sj = p.bmask_stride[3];
  r.block_k = max(p.block_k, 1);
  if (feat & FEAT_BLOCK_MASK) {
    r.bmask_row = block_mask + (long(b) * p.bmask_stride[0] + long(h) * p.bmask_stride[1] +
                                long(max(i_in, 0) / p.block_q) * p.bmask_stride[2]);
  }
  return r;
}

// ---- 8x8 fragments (Apple's simdgroup_matrix layout) ----
// Lane l owns row fm and columns fn, fn + 1 of every 8x8 fragment. Lanes
// that share a row differ in bits 0 and 3 of the lane id (see row_max).
struct FragCoord {
  short row, col;
};

inline FragCoord frag_coord(ushort lane) {
  short qid = short(lane >> 2);
  FragCoord c;
  c.row = short((qid & 4) + ((lane >> 1) & 3));
  c.col = short(((qid & 2) << 1) + ((lane & 1) << 1));
  return c;
}

// d += a * b on 8x8 fragments.
inline void mma(thread float2& d, float2 a, float2 b) {
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

// Fragment element (r, c) = src[r * ld_row + c * ld_col], zero outside
// rows x cols (ragged edges and padding never read memory).
template <typename P>
inline float2 frag_load(P src, int ld_row, int ld_col, int rows, int cols, FragCoord fc) {
  float2 v = float2(0.0f);
  if (fc.row < rows) {
    if (fc.col < cols) v.x = float(src[fc.row * ld_row + fc.col * ld_col]);
    if (fc.col + 1 < cols) v.y = float(src[fc.row * ld_row + (fc.col + 1) * ld_col]);
  }
  return v;
}

template <typename T, typename P>
inline void frag_store(P dst, int ld_row, int rows, int cols, FragCoord fc, float2 v) {
  if (fc.row < rows) {
    if (fc.col < cols) dst[fc.row * ld_row + fc.col] = static_cast<T>(v.x);
    if (fc.col + 1 < cols) dst[fc.row * ld_row + fc.col + 1] = static_cast<T>(v.y);
  }
}

// Reductions over one fragment row (the 4 lanes that share it).
inline float row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  x = max(x, simd_shuffle_xor(x, ushort(8)));
  return x;
}

inline float row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  x += simd_shuffle_xor(x, ushort(8));
  return x;
}

// ---- threadgroup tiles ----
constexpr int pad8(int d) { return (d + 7) / 8 * 8; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

// Leading dimension of a threadgroup tile holding rows of head dim d with
// `size`-byte elements: padded to whole fragments, plus 16 bytes. The 16
// bytes keep every row 16-byte aligned (vector stores) and shift consecutive
// rows by four 4-byte banks, so lanes reading one column of 8 rows (a K^T
// fragment) do not all hit the same bank.
constexpr int tile_ld(int d, int size) { return pad8(d) + 16 / size; }

// Cooperative copy of a block of `rows` rows x COLS columns into a
// threadgroup tile with leading dimension LD: source rows are `src_ld`
// elements apart, only the first `valid_rows` rows and `valid_cols` columns
// exist (the rest, and the columns COLS..pad8(COLS), are written as zero, so
// padding adds nothing to the products). Offsets are 32-bit: a tile holds at
// most 64 rows of at most 584 elements, and `src` already points at the
// block's first element. When whole rows of 16-byte vectors are copied, each
// thread moves 16 bytes at a time (the buffers are 16-byte aligned: MLX
// allocates them so, every row starts a multiple of src_ld elements in and
// column blocks start at multiples of 8 elements).
// With CHECK, returns whether every valid element this thread copied is
// finite (it re-reads only what it wrote itself: no barrier needed).
template <typename T, int COLS, int LD, bool CHECK = false>
inline bool stage_block(threadgroup T* tile, int rows, const device T* src, int src_ld, int valid_rows,
                        int valid_cols, uint tid, uint nthreads) {
  constexpr int VW = 16 / int(sizeof(T));
  constexpr int PAD = pad8(COLS);
  bool finite = true;
  if (COLS % VW == 0 && valid_cols == COLS && src_ld % VW == 0) {
    constexpr int VPR = COLS / VW;  // vectors per row
    for (int e = int(tid); e < rows * VPR; e += int(nthreads)) {
      const int r = e / VPR;
      const int c = (e - r * VPR) * VW;
      uint4 bits = uint4(0);
      if (r < valid_rows) {
        bits = *reinterpret_cast<const device uint4*>(src + r * src_ld + c);
      }
      *reinterpret_cast<threadgroup uint4*>(tile + r * LD + c) = bits;
      if (CHECK) {
        MLXF_UNROLL for (int i = 0; i < VW; ++i) {
          finite = finite && isfinite(float(tile[r * LD + c + i]));
        }
      }
    }
    if (PAD != COLS) {
      for (int e = int(tid); e < rows * (PAD - COLS); e += int(nthreads)) {
        const int r = e / (PAD - COLS);
        tile[r * LD + COLS + (e - r * (PAD - COLS))] = static_cast<T>(0.0f);
      }
    }
  } else {
    for (int e = int(tid); e < rows * PAD; e += int(nthreads)) {
      const int r = e / PAD;
      const int c = e - r * PAD;
      const T x = (r < valid_rows && c < valid_cols) ? src[r * src_ld + c] : static_cast<T>(0.0f);
      tile[r * LD + c] = x;
      if (CHECK) {
        finite = finite && isfinite(float(x));
      }
    }
  }
  return finite;
}

// Whole rows: DIM valid columns, source rows DIM elements apart.
template <typename T, int DIM, int LD, bool CHECK = false>
inline bool stage_rows(threadgroup T* tile, int rows, const device T* src, int valid_rows, uint tid,
                       uint nthreads) {
  return stage_block<T, DIM, LD, CHECK>(tile, rows, src, DIM, valid_rows, DIM, tid, nthreads);
}

// Whether every element of `rows` rows of `cols` elements (`ld` apart) in
// device memory is finite, over this thread's share (the check that staging
// does on the way, for operands read from device memory instead).
template <typename T>
inline bool rows_finite(const device T* src, int ld, int rows, int cols, uint tid, uint nthreads) {
  bool finite = true;
  for (int e = int(tid); e < rows * cols; e += int(nthreads)) {
    const int r = e / cols;
    finite = finite && isfinite(float(src[r * ld + (e - r * cols)]));
  }
  return finite;
}

// ---- tile sizes (docs/metal.md; mirrored by metal.py's tile_sizes) ----
// Apple GPUs give a threadgroup 32 KiB of threadgroup memory. Tiles aim at
// TG_BUDGET so that two threadgroups can share a core and hide each other's
// loads; the largest candidate that fits is taken, else the largest that
// fits TG_LIMIT.
constexpr int TG_BUDGET = 16 * 1024;
constexpr int TG_LIMIT = 32 * 1024;

// Wide heads: a thread keeps at most 32 fragments (256 columns) of an output
// row block in registers. The forward splits O's Dv columns, the dQ kernel
// dQ's Dqk columns, into this many equal blocks (of fragments), one
// threadgroup each (launch grid z); every block recomputes the logits.
constexpr int d_blocks(int d) { return (pad8(d) / 8 + 31) / 32; }
constexpr int d_block_cols(int d) { return (pad8(d) / 8 + d_blocks(d) - 1) / d_blocks(d) * 8; }

// Forward threadgroup memory: the Q tile of 8 * NSG rows (when it fits),
// one K/V tile of BK keys (K, then this threadgroup's block of V columns, in
// the same buffer) and one flag per simdgroup. fwd_q_in_tg: whether the Q
// tile fits next to the K/V tile (else Q fragments come from device memory).
constexpr int fwd_q_elems(int dqk, int nsg, int size) { return 8 * nsg * tile_ld(dqk, size); }
constexpr int fwd_kv_elems(int dqk, int dv, int bk, int size) {
  return bk * max_int(tile_ld(dqk, size), tile_ld(d_block_cols(dv), size));
}
constexpr bool fwd_q_in_tg(int dqk, int dv, int nsg, int bk, int size) {
  return (fwd_q_elems(dqk, nsg, size) + fwd_kv_elems(dqk, dv, bk, size)) * size + 4 * nsg <= TG_LIMIT;
}
// (One simdgroup stages nothing: see attention_forward.)
constexpr int fwd_tg_elems(int dqk, int dv, int nsg, int bk, int size) {
  return (fwd_q_in_tg(dqk, dv, nsg, bk, size) ? fwd_q_elems(dqk, nsg, size) : 0) + fwd_kv_elems(dqk, dv, bk, size);
}
constexpr int fwd_tg_bytes(int dqk, int dv, int nsg, int bk, int size) {
  return nsg == 1 ? size + 4 : fwd_tg_elems(dqk, dv, nsg, bk, size) * size + 4 * nsg;
}

// Keys per forward K/V tile, planned for 4 simdgroups (decode launches with
// fewer use the same BK; their smaller Q tile is staged where it fits): with
// the Q tile where it fits next to an 8-key tile, the largest of 64, 32, 16
// within TG_BUDGET, else 16 within TG_LIMIT, else 8.
constexpr int fwd_plan_bytes(int dqk, int dv, int bk, int size) {
  return ((fwd_q_in_tg(dqk, dv, 4, 8, size) ? fwd_q_elems(dqk, 4, size) : 0) + fwd_kv_elems(dqk, dv, bk, size)) * size +
         16;
}
constexpr int fwd_block_k(int dqk, int dv, int size) {
  return fwd_plan_bytes(dqk, dv, 64, size) <= TG_BUDGET   ? 64
         : fwd_plan_bytes(dqk, dv, 32, size) <= TG_BUDGET ? 32
         : fwd_plan_bytes(dqk, dv, 16, size) <= TG_LIMIT  ? 16
                                                          : 8;
}

// Keys per dQ tile (K and V tiles side by side): 64, 32, 16 or 8.
constexpr int dq_block_k(int dqk, int dv, int size) {
  return 64 * (tile_ld(dqk, size) + tile_ld(dv, size)) * size <= TG_BUDGET   ? 64
         : 32 * (tile_ld(dqk, size) + tile_ld(dv, size)) * size <= TG_BUDGET ? 32
         : 16 * (tile_ld(dqk, size) + tile_ld(dv, size)) * size <= TG_BUDGET ? 16
                                                                             : 8;
}

// Queries per dK/dV tile (Q and dO tiles, plus lse and delta): 64, 32, 16 or 8.
constexpr int dkdv_block_q(int dqk, int dv, int size) {
  return 64 * ((tile_ld(dqk, size) + tile_ld(dv, size)) * size + 8) <= TG_BUDGET   ? 64
         : 32 * ((tile_ld(dqk, size) + tile_ld(dv, size)) * size + 8) <= TG_BUDGET ? 32
         : 16 * ((tile_ld(dqk, size) + tile_ld(dv, size)) * size + 8) <= TG_BUDGET ? 16
                                                                                   : 8;
}

// Cooperative copy of a rows x cols block of a [*, dim] device buffer into a
// threadgroup tile with leading dimension ld (scalar; the backward's loader).
// Returns whether every element this thread copied is finite.
template <typename T>
inline bool stage_tile(threadgroup T* tile, int ld, int tile_rows, int tile_cols,
                       const device T* src, int dim, int valid_rows, uint tid, uint nthreads) {
  bool finite = true;
  for (int e = int(tid); e < tile_rows * tile_cols; e += int(nthreads)) {
    int r = e / tile_cols;
    int c = e % tile_cols;
    const T x = (r < valid_rows && c < dim) ? src[r * dim + c] : static_cast<T>(0.0f);
    tile[r * ld + c] = x;
    finite = finite && isfinite(float(x));
  }
  return finite;
}

// Whether any thread of the threadgroup saw a non-finite element: each
// simdgroup's lane 0 writes its flag, a barrier, then everyone reads all.
// Callers put it where a barrier is due anyway (right after staging).
template <int NSG>
inline bool any_nonfinite(bool finite, threadgroup int* flags, uint sg, uint lane) {
  const bool sg_bad = simd_any(!finite);
  if (lane == 0) {
    flags[sg] = sg_bad ? 1 : 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool bad = false;
  MLXF_UNROLL for (int g = 0; g < NSG; ++g) {
    bad = bad || flags[g] != 0;
  }
  return bad;
}

// acc[f] += A B over one 8-key step, element by element, leaving out the
// pairs marked dropped (drop = 1): the B operand holds a non-finite value, so
// a dropped pair's operand must not be multiplied in (0 x NaN). `a` is this
// lane's fragment of A (rows: this lane's row), b points at B's first row
// (ldb apart; threadgroup or device memory), NF fragments of 8 columns. Only
// the first nf_valid fragments and `cols` columns of B exist (the last D
// block may be short; a device operand has no zero padding). Dropped rows of
// B are never read. Rare; all lanes take it.
template <int NF, typename P>
inline void mma_exact(thread float2* acc, float2 a, float2 drop, P b, int ldb, FragCoord fc,
                      int nf_valid = NF, int cols = 1 << 30) {
  MLXF_UNROLL for (int e2 = 0; e2 < 8; ++e2) {
    const ushort src = ushort(((e2 >> 1) & 1) | ((fc.row & 3) << 1) | (((e2 >> 2) & 1) << 3) | (((fc.row >> 2) & 1) << 4));
    const float aj = simd_shuffle(a[e2 & 1], src);
    const float dj = simd_shuffle(drop[e2 & 1], src);
    if (dj != 0.0f) {
      continue;
    }
    MLXF_UNROLL for (int f = 0; f < NF; ++f) {
      if (f >= nf_valid) {
        break;
      }
      const int c = f * 8 + fc.col;
      if (c < cols) acc[f].x += aj * float(b[e2 * ldb + c]);
      if (c + 1 < cols) acc[f].y += aj * float(b[e2 * ldb + c + 1]);
    }
  }
}

}  // namespace mlxf

#endif  // MLXF_ATTENTION_COMMON_H
