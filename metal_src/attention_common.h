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
    if (i >= s.q_len || j >= s.k_len) {
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
      long at = long(b) * p.mask_stride[0] + long(h) * p.mask_stride[1] +
                long(i) * p.mask_stride[2] + long(j) * p.mask_stride[3];
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
      long at = long(b) * p.bmask_stride[0] + long(h) * p.bmask_stride[1] +
                long(i / p.block_q) * p.bmask_stride[2] + long(j / p.block_k) * p.bmask_stride[3];
      if (!block_mask[at]) return -INFINITY;
    }
    return x;
  }

  // Whether any key of the tile [k0, k1) x queries [q0, q1) can be kept.
  // Decided from the window band and the block mask alone, so every thread
  // of a threadgroup gets the same answer: skipped tiles are never loaded.
  inline bool tile_live(int q0, int q1, int k0, int k1) const {
    q1 = min(q1, s.q_len);
    k1 = min(k1, s.k_len);
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
          long at = long(b) * p.bmask_stride[0] + long(h) * p.bmask_stride[1] +
                    long(qb) * p.bmask_stride[2] + long(kb) * p.bmask_stride[3];
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

// Cooperative copy of a rows x cols block of a [*, dim] device buffer into a
// threadgroup tile with leading dimension ld; zero beyond the valid rows and
// beyond dim, so padded columns add nothing to the products.
template <typename T>
inline void stage_tile(threadgroup T* tile, int ld, int tile_rows, int tile_cols,
                       const device T* src, int dim, int valid_rows, uint tid, uint nthreads) {
  for (int e = int(tid); e < tile_rows * tile_cols; e += int(nthreads)) {
    int r = e / tile_cols;
    int c = e % tile_cols;
    tile[r * ld + c] = (r < valid_rows && c < dim) ? src[long(r) * dim + c] : static_cast<T>(0.0f);
  }
}

constexpr int pad8(int d) { return (d + 7) / 8 * 8; }

// Leading dimension of a threadgroup tile holding rows of head dim d: padded
// to whole fragments, plus 4 elements so that lanes reading one column of
// consecutive rows hit different banks.
constexpr int tile_ld(int d) { return pad8(d) + 4; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

// ---- tile sizes (docs/metal.md; mirrored by metal.py's tile_sizes) ----
// Apple GPUs give a threadgroup 32 KiB of threadgroup memory. Tiles aim at
// 16 KiB so that two threadgroups can share a core and hide each other's
// loads; the largest candidate that fits is taken, else the smallest one.
constexpr int TG_BUDGET = 16 * 1024;

// Keys per forward K/V tile (one buffer, K then V): 64, 32 or 16.
constexpr int fwd_block_k(int dqk, int dv, int size) {
  return 64 * max_int(tile_ld(dqk), tile_ld(dv)) * size <= TG_BUDGET   ? 64
         : 32 * max_int(tile_ld(dqk), tile_ld(dv)) * size <= TG_BUDGET ? 32
                                                                       : 16;
}

// Keys per dQ tile (K and V tiles side by side): 64, 32, 16 or 8.
constexpr int dq_block_k(int dqk, int dv, int size) {
  return 64 * (tile_ld(dqk) + tile_ld(dv)) * size <= TG_BUDGET   ? 64
         : 32 * (tile_ld(dqk) + tile_ld(dv)) * size <= TG_BUDGET ? 32
         : 16 * (tile_ld(dqk) + tile_ld(dv)) * size <= TG_BUDGET ? 16
                                                                 : 8;
}

// Queries per dK/dV tile (Q and dO tiles, plus lse and delta): 64, 32, 16 or 8.
constexpr int dkdv_block_q(int dqk, int dv, int size) {
  return 64 * ((tile_ld(dqk) + tile_ld(dv)) * size + 8) <= TG_BUDGET   ? 64
         : 32 * ((tile_ld(dqk) + tile_ld(dv)) * size + 8) <= TG_BUDGET ? 32
         : 16 * ((tile_ld(dqk) + tile_ld(dv)) * size + 8) <= TG_BUDGET ? 16
                                                                       : 8;
}

}  // namespace mlxf

#endif  // MLXF_ATTENTION_COMMON_H
