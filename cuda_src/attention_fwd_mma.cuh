// Tensor-core FlashAttention-2 forward for fp16/bf16 (fp32 accumulation).
//
// A block owns BM = 16 * NW query rows of one (batch, head); warp w owns rows
// 16w..16w+15 and keeps its Q fragments, running max/sum and O accumulator in
// registers. Key/value tiles of BN rows stream through shared memory with
// cp.async: V(j) loads while S = Q K(j)^T is computed, K(j+1) while O += P V(j).
// Head dims are padded to multiples of 16 with zeros in shared memory.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"

namespace mlx_flash {

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }

// Shared memory of the mma forward (bytes): Q [BM][DP+8], K [BN][DP+8], V [BN][DVP+8].
__host__ __device__ constexpr int mma_fwd_smem(int d, int dv, int nw, int bn) {
  return 2 * (16 * nw * (round16(d) + 8) + bn * (round16(d) + 8) + bn * (round16(dv) + 8));
}

// Copy rows [0, valid_rows) of a [*, DIM] row-major global tile into a
// [ROWS][STRIDE] shared tile, zero-filling missing rows and the padded dims.
// A column chunk of a wider tensor (wide heads): rows SRC_STRIDE apart, the
// first valid_cols of the DIM columns present. VEC: valid_cols % 8 == 0.
template <typename T, int ROWS, int DIM, int STRIDE, bool VEC, int NTHREADS, int SRC_STRIDE = DIM>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int valid_rows, int valid_cols = DIM) {
  constexpr int DIMP = round16(DIM);
  if (VEC) {
    constexpr int CHUNKS = DIMP / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
      const int row = c / CHUNKS, col = (c % CHUNKS) * 8;
      const bool ok = row < valid_rows && col < valid_cols;
      cp_async16(dst + row * STRIDE + col, ok ? src + (long)row * SRC_STRIDE + col : src, ok);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * DIMP; e += NTHREADS) {
      const int row = e / DIMP, col = e % DIMP;
      dst[row * STRIDE + col] =
          (row < valid_rows && col < valid_cols) ? src[(long)row * SRC_STRIDE + col] : from_float<T>(0.f);
    }
  }
}

// The elements load_tile gave this thread (its cp.async chunks, or its plain
// stores) hold a NaN or inf; valid once its copies have landed.
template <typename T, int ROWS, int DIM, int STRIDE, bool VEC, int NTHREADS>
__device__ __forceinline__ bool own_tile_nonfinite(const T* dst) {
  constexpr int DIMP = round16(DIM);
  bool bad = false;
  // Not unrolled: this runs on few tiles, and must not hold registers the MMAs need.
  if (VEC) {
    constexpr int CHUNKS = DIMP / 8;
#pragma unroll 1
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS)
      bad = bad || chunk_nonfinite<T>(dst + (c / CHUNKS) * STRIDE + (c % CHUNKS) * 8);
  } else {
#pragma unroll 1
    for (int e = threadIdx.x; e < ROWS * DIMP; e += NTHREADS)
      bad = bad || is_nonfinite(to_float(dst[(e / DIMP) * STRIDE + e % DIMP]));
  }
  return bad;
}

// Row epilogue of the tensor-core forwards: quad-sum the row sum, fold the
// sink, write the row (0 if nothing was kept, NaN if a kept logit was NaN or
// +inf) and its lse. o(n, e) is this thread's accumulator of columns 8n + 2t + e.
// A block owning a column chunk of a wide row (DV its width) writes the first
// valid_cols of them, in pairs where PAIRED (4-byte aligned), and the lse
// only where lse_out is given.
template <typename T, class F, int DV, bool PAIRED = DV % 2 == 0, class OAt>
__device__ __forceinline__ void mma_fwd_write_row(float sum, float m, const float* sinks, int h, T* orow,
                                                  float* lse_out, int t, OAt o_at, int valid_cols = DV) {
  constexpr int DVP = round16(DV);
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  float alpha = 1.f;
  if (F::Sinks) fold_sink<true>(sinks[h] * kLog2e, m, sum, alpha);
  if (orow == nullptr) return;
  const float inv = row_out_factor(sum, alpha);
  const bool empty = sum == 0.f;
#pragma unroll
  for (int n = 0; n < DVP / 8; ++n) {
    const int col = n * 8 + 2 * t;
    const float x0 = empty ? 0.f : o_at(n, 0) * inv, x1 = empty ? 0.f : o_at(n, 1) * inv;
    if (PAIRED && col + 1 < valid_cols) {
      *reinterpret_cast<unsigned*>(orow + col) = pack2<T>(x0, x1);
    } else {
      if (col < valid_cols) orow[col] = from_float<T>(x0);
      if (col + 1 < valid_cols) orow[col + 1] = from_float<T>(x1);
    }
  }
  if (t == 0 && lse_out != nullptr) *lse_out = row_lse<true>(m, sum);
}

// True if any block-mask entry overlapping rows [i0, i1) x keys [j0, j1) keeps.
template <typename MT, int NTHREADS>
__device__ __forceinline__ bool block_tile_live(const LogitRules<MT>& r, int i0, int i1, int j0, int j1) {
  const int br0 = i0 / r.block_q, bc0 = j0 / r.block_k;
  const int nbr = (i1 - 1) / r.block_q - br0 + 1, nbc = (j1 - 1) / r.block_k - bc0 + 1;
  bool any = false;
  for (int e = threadIdx.x; e < nbr * nbc; e += NTHREADS)
    any = any || r.bmask[(long)(br0 + e / nbc) * r.bm_row_stride + (long)(bc0 + e % nbc) * r.bm_col_stride];
  return __syncthreads_or(any) != 0;
}

template <typename T, typename MT, class F, int D, int DV, int NW, int BN, int DVC = DV>
__device__ void attention_fwd_mma(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const float* sinks,
    const bool* bmask, const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    T* out, float* lse, const int* key_start = nullptr, const int* key_len = nullptr) {
  constexpr int BM = 16 * NW, NTHREADS = 32 * NW;
  // Wide heads (DVC < DV): a block owns DVC of the DV output columns (chunk
  // blockIdx.x % NC) and recomputes S for them, so its O accumulator fits the
  // registers; the chunk-0 block writes the lse.
  constexpr int NC = (DV + DVC - 1) / DVC;
  constexpr int DP = round16(D), DVP = round16(DVC);
  constexpr int SQ = DP + 8, SV = DVP + 8;  // +8 halves: conflict-free ldmatrix rows
  constexpr bool VEC = D % 8 == 0 && DV % 8 == 0 && DVC % 8 == 0;
  // Q fragments stay in registers up to head dim 256; wider Q is re-read from shared memory.
  constexpr bool Q_IN_REGS = DP <= 256;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * SQ;
  T* Vs = Ks + BN * SQ;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv];
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int col_chunk = NC > 1 ? blockIdx.x % NC : 0, dv0 = col_chunk * DVC, dv_valid = min(DVC, DV - dv0);
  // Heaviest (last, under causal) row blocks first.
  const int i0 = (gridDim.x / NC - 1 - blockIdx.x / NC) * BM;
  if (i0 >= seq.nq) return;
  const int i_end = min(seq.nq, i0 + BM);
  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
  const long q_base = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start;
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];

  int lo, hi;
  rules.key_range(i0, i_end - 1, lo, hi);
  auto live = [&](int j0) {
    return !F::BlockMask || block_tile_live<MT, NTHREADS>(rules, i0, i_end, j0, min(j0 + BN, seq.nk));
  };
  auto next_live = [&](int j0) {
    while (j0 < hi && !live(j0)) j0 += BN;
    return j0;
  };

  load_tile<T, BM, D, SQ, VEC, NTHREADS>(Qs, q + (q_base + i0) * D, i_end - i0);
  int jt = next_live(lo / BN * BN);
  if (jt < hi) load_tile<T, BN, D, SQ, VEC, NTHREADS>(Ks, k + (kv_base + jt) * D, rules.key_hi - jt);
  cp_async_commit();

  unsigned qf[Q_IN_REGS ? DP / 16 : 1][4];
  float o[DVP / 8][4];
#pragma unroll
  for (int n = 0; n < DVP / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};
  bool first = true;

  while (jt < hi) {
    load_tile<T, BN, DVC, SV, VEC, NTHREADS, DV>(Vs, v + (kv_base + jt) * DV + dv0, rules.key_hi - jt, dv_valid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (Q_IN_REGS && first) {
#pragma unroll
      for (int kk = 0; kk < (Q_IN_REGS ? DP / 16 : 0); ++kk)
        ldmatrix_x4(qf[kk], Qs + (warp * 16 + lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
      first = false;
    }

    // S = Q K^T for this warp's 16 rows x BN keys.
    float s[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      unsigned qa[4];
      if constexpr (Q_IN_REGS) {
        qa[0] = qf[kk][0], qa[1] = qf[kk][1], qa[2] = qf[kk][2], qa[3] = qf[kk][3];
      } else {
        ldmatrix_x4(qa, Qs + (warp * 16 + lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        unsigned bk[4];
        ldmatrix_x4(bk, Ks + (np * 16 + (lane / 16) * 8 + lane % 8) * SQ + kk * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(s[2 * np], qa, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qa, bk[2], bk[3]);
      }
    }

    // Logit rules where this tile needs them, then the online softmax (log2 domain).
    const int shift = seq.nk - seq.nq;
    const bool inside_window =
        (rules.left < 0 || jt >= i_end - 1 + shift - rules.left) &&
        (rules.right < 0 || jt + BN - 1 <= i0 + shift + rules.right);
    // may_drop: some pair of the tile may be dropped (not softcap / ALiBi alone).
    const bool may_drop = F::MaskKind != 0 || F::BlockMask || tile_cuts_keys<F>(rules, jt, jt + BN) || !inside_window;
    const bool need_rules = F::ElementRules || may_drop;
    unsigned drop = 0;  // bit 4n + c: pair (n, c) dropped (exact_fragment_product)
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[n][c] * scale;
        if (need_rules) {
          const int i = i0 + warp * 16 + g + (c >= 2 ? 8 : 0);
          const int j = jt + n * 8 + 2 * t + (c & 1);
          float capped = 0.f;
          x = apply_rules<F>(rules, x, i, j, capped);
          drop |= (x == kNegInf ? 1u : 0u) << (4 * n + c);
        }
        s[n][c] = x * kLog2e;
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = kNegInf;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[half], mx);
      const float base = new_max == kNegInf ? 0.f : new_max;
      const float alpha = exp2f(row_max[half] - base);
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        s[n][2 * half] = exp2f(s[n][2 * half] - base);
        s[n][2 * half + 1] = exp2f(s[n][2 * half + 1] - base);
        sum += s[n][2 * half] + s[n][2 * half + 1];
      }
      row_sum[half] = row_sum[half] * alpha + sum;
      row_max[half] = new_max;
      // A dropped pair's p (+0) becomes -0, its mark for exact_fragment_product.
      if (need_rules) {
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if ((drop >> (4 * n + 2 * half + e)) & 1u) s[n][2 * half + e] = -0.f;
      }
#pragma unroll
      for (int n = 0; n < DVP / 8; ++n) {
        o[n][2 * half] *= alpha;
        o[n][2 * half + 1] *= alpha;
      }
    }

    __syncthreads();  // every warp is done with K(jt)
    const int jn = next_live(jt + BN);
    if (jn < hi) load_tile<T, BN, D, SQ, VEC, NTHREADS>(Ks, k + (kv_base + jn) * D, rules.key_hi - jn);
    cp_async_commit();
    cp_async_wait<1>();
    // V(jt) has landed; a tile that drops keys and holds a NaN or inf in V
    // forms P V exactly (rare): a dropped key's p = 0 must not meet its v.
    const bool exact = may_drop ? __syncthreads_or(own_tile_nonfinite<T, BN, DVC, SV, VEC, NTHREADS>(Vs)) != 0
                                : (__syncthreads(), false);
    if (exact) {
      exact_fragment_product<BN / 8, DVP / 8, true>([&](int kb, int c) { return s[kb][c]; }, 0,
                                              [&](int n, int c) -> float& { return o[n][c]; },
                                              [&](int j, int d) { return to_float(Vs[j * SV + d]); });
    } else {
      // O += P V, P re-used from the S accumulators as A fragments.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned pa[4];
        pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DVP / 16; ++dp) {
          unsigned bv[4];
          ldmatrix_x4_trans(bv, Vs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * SV + dp * 16 + (lane / 16) * 8);
          mma16816<T>(o[2 * dp], pa, bv[0], bv[1]);
          mma16816<T>(o[2 * dp + 1], pa, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with V(jt)
    jt = jn;
  }
  cp_async_wait<0>();

  // Normalise, fold in the sink, write O and lse.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = i0 + warp * 16 + g + 8 * half;
    mma_fwd_write_row<T, F, DVC, DV % 2 == 0 && DVC % 2 == 0>(
        row_sum[half], row_max[half], sinks, h, i < seq.nq ? out + (q_base + i) * DV + dv0 : nullptr,
        col_chunk == 0 ? lse + q_base + i : nullptr, t, [&](int n, int e) { return o[n][2 * half + e]; }, dv_valid);
  }
}


// Variant with two 16-row m-tiles per warp (BM = 32 * NW): every K/V
// fragment read from shared memory feeds twice the mma work, halving the
// shared-memory traffic per FLOP (the limit of the one-tile kernel above).
// Q fragments are re-read from shared memory per k-step instead of being held
// in registers, which the doubled S and O accumulators need.
__host__ __device__ constexpr int mma2_fwd_smem(int d, int dv, int nw, int bn) {
  return 2 * (32 * nw * (round16(d) + 8) + bn * (round16(d) + 8) + bn * (round16(dv) + 8));
}

template <typename T, typename MT, class F, int D, int DV, int NW, int BN>
__device__ void attention_fwd_mma2(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const float* sinks,
    const bool* bmask, const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    T* out, float* lse, const int* key_start = nullptr, const int* key_len = nullptr) {
  constexpr int MI = 2, BM = 16 * MI * NW, NTHREADS = 32 * NW;
  constexpr int DP = round16(D), DVP = round16(DV);
  constexpr int SQ = DP + 8, SV = DVP + 8;
  constexpr bool VEC = D % 8 == 0 && DV % 8 == 0;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * SQ;
  T* Vs = Ks + BN * SQ;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv];
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int i0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (i0 >= seq.nq) return;
  const int i_end = min(seq.nq, i0 + BM);
  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
  const long q_base = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start;
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];
  const int row0 = warp * 16 * MI;  // first row of this warp within the block

  int lo, hi;
  rules.key_range(i0, i_end - 1, lo, hi);
  const int tile0 = lo / BN * BN;
  __shared__ unsigned char live_flags[256];
  LiveKeyTiles<F, MT, BN, NTHREADS> tiles_live{rules, live_flags, i0, i_end, tile0, hi, seq.nk};

  load_tile<T, BM, D, SQ, VEC, NTHREADS>(Qs, q + (q_base + i0) * D, i_end - i0);
  int jt = tiles_live.next(lo / BN * BN);
  if (jt < hi) load_tile<T, BN, D, SQ, VEC, NTHREADS>(Ks, k + (kv_base + jt) * D, rules.key_hi - jt);
  cp_async_commit();

  float o[MI][DVP / 8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int n = 0; n < DVP / 8; ++n) o[mi][n][0] = o[mi][n][1] = o[mi][n][2] = o[mi][n][3] = 0.f;
  float row_max[MI][2], row_sum[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) row_max[mi][0] = row_max[mi][1] = kNegInf, row_sum[mi][0] = row_sum[mi][1] = 0.f;

  while (jt < hi) {
    load_tile<T, BN, DV, SV, VEC, NTHREADS>(Vs, v + (kv_base + jt) * DV, rules.key_hi - jt);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[MI][BN / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      unsigned qa[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(qa[mi], Qs + (row0 + mi * 16 + lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        unsigned bk[4];
        ldmatrix_x4(bk, Ks + (np * 16 + (lane / 16) * 8 + lane % 8) * SQ + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma16816<T>(s[mi][2 * np], qa[mi], bk[0], bk[1]);
          mma16816<T>(s[mi][2 * np + 1], qa[mi], bk[2], bk[3]);
        }
      }
    }

    const int shift = seq.nk - seq.nq;
    const bool inside_window =
        (rules.left < 0 || jt >= i_end - 1 + shift - rules.left) &&
        (rules.right < 0 || jt + BN - 1 <= i0 + shift + rules.right);
    // A live tile inside one block-mask entry is wholly kept: no per-element block test.
    const bool check_blocks = F::BlockMask && (i0 / rules.block_q != (i_end - 1) / rules.block_q ||
                                               jt / rules.block_k != (jt + BN - 1) / rules.block_k);
    // may_drop: some pair of the tile may be dropped (not softcap / ALiBi alone).
    const bool may_drop = F::MaskKind != 0 || check_blocks || tile_cuts_keys<F>(rules, jt, jt + BN) || !inside_window;
    const bool need_rules = F::Softcap || F::Alibi || may_drop;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      unsigned drop = 0;  // bit 4n + c: pair (n, c) dropped
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float x = s[mi][n][c] * scale;
          if (need_rules) {
            const int i = i0 + row0 + mi * 16 + g + (c >= 2 ? 8 : 0);
            const int j = jt + n * 8 + 2 * t + (c & 1);
            float capped = 0.f;
            x = apply_rules<F, MT, true>(rules, x, i, j, capped, check_blocks);
            drop |= (x == kNegInf ? 1u : 0u) << (4 * n + c);
          }
          s[mi][n][c] = x * kLog2e;
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = kNegInf;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mi][n][2 * half], s[mi][n][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[mi][half], mx);
        const float base = new_max == kNegInf ? 0.f : new_max;
        const float alpha = exp2f(row_max[mi][half] - base);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          s[mi][n][2 * half] = exp2f(s[mi][n][2 * half] - base);
          s[mi][n][2 * half + 1] = exp2f(s[mi][n][2 * half + 1] - base);
          sum += s[mi][n][2 * half] + s[mi][n][2 * half + 1];
        }
        row_sum[mi][half] = row_sum[mi][half] * alpha + sum;
        row_max[mi][half] = new_max;
        // A dropped pair's p (+0) becomes -0, its mark for exact_fragment_product.
        if (need_rules) {
#pragma unroll
          for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if ((drop >> (4 * n + 2 * half + e)) & 1u) s[mi][n][2 * half + e] = -0.f;
        }
#pragma unroll
        for (int n = 0; n < DVP / 8; ++n) {
          o[mi][n][2 * half] *= alpha;
          o[mi][n][2 * half + 1] *= alpha;
        }
      }
    }

    __syncthreads();
    const int jn = tiles_live.next(jt + BN);
    if (jn < hi) load_tile<T, BN, D, SQ, VEC, NTHREADS>(Ks, k + (kv_base + jn) * D, rules.key_hi - jn);
    cp_async_commit();
    cp_async_wait<1>();
    // V(jt) has landed; exact P V where the tile drops keys and V holds a NaN or inf.
    const bool exact = may_drop ? __syncthreads_or(own_tile_nonfinite<T, BN, DV, SV, VEC, NTHREADS>(Vs)) != 0
                                : (__syncthreads(), false);
    if (exact) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        exact_fragment_product<BN / 8, DVP / 8, true>([&](int kb, int c) { return s[mi][kb][c]; }, 0,
                                                [&](int n, int c) -> float& { return o[mi][n][c]; },
                                                [&](int j, int d) { return to_float(Vs[j * SV + d]); });
    } else {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned pa[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          pa[mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pa[mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pa[mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pa[mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < DVP / 16; ++dp) {
          unsigned bv[4];
          ldmatrix_x4_trans(bv, Vs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * SV + dp * 16 + (lane / 16) * 8);
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            mma16816<T>(o[mi][2 * dp], pa[mi], bv[0], bv[1]);
            mma16816<T>(o[mi][2 * dp + 1], pa[mi], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();
    jt = jn;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = i0 + row0 + mi * 16 + g + 8 * half;
      mma_fwd_write_row<T, F, DV>(row_sum[mi][half], row_max[mi][half], sinks, h,
                                  i < seq.nq ? out + (q_base + i) * DV : nullptr, lse + q_base + i, t,
                                  [&](int n, int e) { return o[mi][n][2 * half + e]; });
    }
  }
}

}  // namespace mlx_flash
