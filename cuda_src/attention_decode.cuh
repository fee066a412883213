// Split-key decode forward for fp16/bf16 (few query rows per key/value head).
//
// Decode streams the whole K/V cache once per call, with very little math per
// byte, so the kernel is built around keeping enough loads in flight:
//
// * A block owns one key/value head and up to 16 "rows" (a row being a
//   (query position, query head of the GQA group) pair, as in the SIMT
//   kernel), so the group's heads share every K/V byte read. Those rows are
//   the 16 rows of one m16n8k16 A operand; rows past the group are zero and
//   never written. S = Q K^T and O += P V run on tensor cores (mma.cuh
//   layouts), so the per-key work is a handful of instructions.
// * The block's key range (its split, blockIdx.y of gridDim.y) is dealt out
//   to the warps in BN-key tiles, round robin. Each warp streams its own
//   tiles through a private ring of STAGES shared-memory buffers with 16-byte
//   cp.async copies, 16-bit as stored (no conversion stores): tile n + STAGES
//   - 1 is in flight while tile n is computed. Nothing but the warp itself
//   reads its ring, so the loop needs only __syncwarp, never a block barrier.
// * Each warp keeps its own online softmax (row max / sum in the log2 domain,
//   as the mma forward) and O accumulator; at the end the warps merge through
//   shared memory and the block writes either the final row (one split) or
//   its normalised partial result and lse; the last block of the row group
//   to finish (an atomic ticket) merges the splits in the same launch.
// * KR: with at most 8 rows, keys are the mma's M and rows its N (see the
//   kernel); BULK: K/V rows by bulk copies (decode_ptx.cuh).
#pragma once

#include "attention_common.cuh"
#include "decode_ptx.cuh"
#include "mma.cuh"

namespace mlx_flash {

constexpr int kDecodeRows = 16;  // rows of one block: the m16n8k16 A operand

__host__ __device__ constexpr int decode_pad16(int x) { return (x + 15) / 16 * 16; }

// Shared memory of attention_fwd_decode (bytes): Q [16][DP + 8], then per
// warp STAGES x (K [BN][DP + 8], V [BN][DVP + 8]). The +8 halves keep the
// ldmatrix rows of a phase on distinct banks. The end-of-loop merge reuses it.
__host__ __device__ constexpr int decode_fwd_smem(int d, int dv, int nw, int bn, int stages) {
  return 2 * (kDecodeRows * (decode_pad16(d) + 8) +
              nw * stages * bn * (decode_pad16(d) + 8 + decode_pad16(dv) + 8));
}
__host__ __device__ constexpr int decode_merge_smem(int dv, int nw) {
  return 4 * nw * kDecodeRows * (2 + decode_pad16(dv) + 8);
}

// One warp copies rows [0, valid_rows) of a [ROWS, DIM] global tile into a
// [ROWS][STRIDE] shared tile with cp.async, zero-filling the other rows and
// the dims DIM..pad16(DIM). DIM % 8 == 0: every copy is one 16-byte word.
// A column chunk of a wider tensor (wide heads): rows SRC_STRIDE apart, the
// first valid_cols (a multiple of 8) of the DIM columns present.
template <typename T, int ROWS, int DIM, int STRIDE, int SRC_STRIDE = DIM>
__device__ __forceinline__ void decode_load_rows(T* dst, const T* src, int valid_rows, int lane,
                                                 int valid_cols = DIM) {
  constexpr int CH = decode_pad16(DIM) / 8, TOTAL = ROWS * CH;
#pragma unroll
  for (int c0 = 0; c0 < TOTAL; c0 += 32) {
    const int c = c0 + lane, row = c / CH, col = (c % CH) * 8;
    if (TOTAL % 32 == 0 || c < TOTAL) {
      const bool ok = row < valid_rows && col < valid_cols;
      cp_async16(dst + row * STRIDE + col, ok ? src + (long)row * SRC_STRIDE + col : src, ok);
    }
  }
}

// The chunks decode_load_rows gave this lane hold a NaN or inf (checked once they landed).
template <typename T, int ROWS, int DIM, int STRIDE>
__device__ __forceinline__ bool decode_own_rows_nonfinite(const T* dst, int lane) {
  constexpr int CH = decode_pad16(DIM) / 8, TOTAL = ROWS * CH;
  bool bad = false;
#pragma unroll 1
  for (int c0 = 0; c0 < TOTAL; c0 += 32) {
    const int c = c0 + lane, row = c / CH, col = (c % CH) * 8;
    if (TOTAL % 32 == 0 || c < TOTAL) bad = bad || chunk_nonfinite<T>(dst + row * STRIDE + col);
  }
  return bad;
}

// Most key splits a split launch may have: the merge keeps each of a block's
// 16 rows' split weights in shared memory (backends/cuda.py _MAX_SPLITS).
constexpr int kDecodeMaxSplits = 128;

__host__ __device__ constexpr long decode_pad4(long x) { return (x + 3) / 4 * 4; }

// Words of a split launch's workspace `ws` (float32, zero-filled by MLX):
// one ticket counter per (row block x column chunk, batch x KV head), then
// part_lse [splits][NC][total_rows], then part_o [splits][total_rows][DV];
// each part starts on a 16-byte boundary for the merge's float4 loads.
__host__ __device__ constexpr long decode_ws_words(long groups, long splits, long nc, long total_rows, long dv) {
  return decode_pad4(groups) + decode_pad4(splits * nc * total_rows) + splits * total_rows * dv;
}

// Shared memory the merge uses: the rows' split weights and output factors.
__host__ __device__ constexpr int decode_merge_splits_smem() {
  return 4 * (kDecodeRows * kDecodeMaxSplits + kDecodeRows);
}

// Merge `splits` partial results (normalised rows part_o, their lse at
// part_lse[s * lse_stride + row]) of the block's nrows rows by their lse,
// with the sink, into out (columns dv0..dv0 + dv_valid) and lse. Run by the
// whole block after every split's partial landed. The same arithmetic and
// non-finite rules as attention_combine (attention_simt.cuh): a split whose
// lse is -inf kept no key (weight 0, its words never read); a NaN lse carries
// NaN into the row; a row no split and no sink kept gives 0 and lse -inf.
template <typename T, int DV, int DVC, int NC, int NW, class QRow, class Head>
__device__ void decode_merge_splits(const float* part_o, const float* part_lse, const float* sinks, int splits,
                                    long lse_stride, long total_rows, int nrows, QRow q_row, Head head, int dv0,
                                    int dv_valid, bool write_lse, T* out, float* lse, float* scratch) {
  constexpr int NT = 32 * NW, LANE_SPLITS = kDecodeMaxSplits / 32, C4 = DVC / 4;
  static_assert(DVC % 4 == 0, "decode merge: float4 columns");
  float* weights = scratch;                             // [16][kDecodeMaxSplits]
  float* inv = weights + kDecodeRows * kDecodeMaxSplits;  // [16]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Weights: one warp per row, lanes over splits.
  for (int row = warp; row < nrows; row += NW) {
    const long qr = q_row(row);
    float l[LANE_SPLITS];
    float m = kNegInf;
    bool nan = false;
#pragma unroll
    for (int u = 0; u < LANE_SPLITS; ++u) {
      const int s = lane + 32 * u;
      l[u] = s < splits ? __ldcg(part_lse + s * lse_stride + qr) : kNegInf;
      m = fmaxf(m, l[u]);
      nan = nan || l[u] != l[u];
    }
    m = warp_max(m);
    nan = __any_sync(0xffffffffu, nan);
    float sink = kNegInf;
    if (sinks != nullptr) {
      sink = sinks[head(row)];
      m = fmaxf(m, sink);
      nan = nan || sink != sink;
    }
    const bool dropped = m == kNegInf && !nan;  // every key of the row dropped, no sink
    const float base = m == kNegInf ? 0.f : m;
    float denom = 0.f;
#pragma unroll
    for (int u = 0; u < LANE_SPLITS; ++u) {
      const int s = lane + 32 * u;
      const float w = dropped ? 0.f : expf(l[u] - base);
      if (s < splits) weights[row * kDecodeMaxSplits + s] = w;
      denom += w;
    }
    denom = warp_sum(denom) + (sinks != nullptr && !dropped ? expf(sink - base) : 0.f);
    if (lane == 0) {
      inv[row] = dropped ? 0.f : 1.f / denom;
      if (write_lse) lse[qr] = dropped ? kNegInf : base + logf(denom);
    }
  }
  __syncthreads();
  // Columns: a thread per float4 of a row, eight splits' loads in flight.
  for (int it = threadIdx.x; it < nrows * C4; it += NT) {
    const int row = it / C4, c = (it % C4) * 4;
    if (NC > 1 && c >= dv_valid) continue;
    const long qr = q_row(row);
    const float* wr = weights + row * kDecodeMaxSplits;
    const float* src = part_o + qr * DV + dv0 + c;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s0 = 0; s0 < splits; s0 += 8) {
      float w[8];
      float4 x[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int s = s0 + u;
        w[u] = s < splits ? wr[s] : 0.f;
        x[u] = w[u] != 0.f ? __ldcg(reinterpret_cast<const float4*>(src + s * total_rows * DV))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        acc[0] += w[u] * x[u].x, acc[1] += w[u] * x[u].y;
        acc[2] += w[u] * x[u].z, acc[3] += w[u] * x[u].w;
      }
    }
    const float f = inv[row];
#pragma unroll
    for (int e = 0; e < 4; ++e) out[qr * DV + dv0 + c + e] = from_float<T>(acc[e] * f);
  }
}

template <typename T, typename MT, class F, int D, int DV, int NW, int BN, int STAGES, bool SPLIT, int DVC = DV,
          bool BULK = false, bool KR = false>
__device__ void attention_fwd_decode(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const float* sinks,
    const bool* bmask, const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    T* out, float* lse, float* ws, const int* key_start = nullptr,
    const int* key_len = nullptr, const unsigned* pool_tickets = nullptr) {
  static_assert(D % 8 == 0 && DV % 8 == 0 && DVC % 8 == 0, "decode kernel: head dims must be multiples of 8");
  static_assert(BN % 16 == 0 && STAGES >= 2, "decode kernel: BN a multiple of 16, at least 2 stages");
  static_assert(decode_merge_smem(DVC, NW) <= decode_fwd_smem(D, DVC, NW, BN, STAGES), "merge scratch");
  static_assert(!SPLIT || decode_merge_splits_smem() <= decode_fwd_smem(D, DVC, NW, BN, STAGES), "split merge scratch");
  static_assert(!BULK || (BN == 16 && DVC == DV), "bulk copies: one lane per K or V row of a 16-key tile, whole rows");
  static_assert(!KR || (BN == 16 && DVC == DV && DV <= 256 && D <= 256), "keys as rows: 16-key tiles, whole rows");
  // KR ("keys as rows"): the block's rows are at most 8, the N of the mma,
  // and a 16-key tile is its M: S^T = K Q^T and O^T += V^T P^T, P^T turned
  // from the S^T accumulator into the B operand by movmatrix. Half the mma
  // work and half the O registers of 16-row tiles whose rows are mostly
  // empty (GQA groups of 4-8 heads).
  constexpr int BM = KR ? 8 : kDecodeRows, NT = 32 * NW;
  // Wide heads (DVC < DV): a block owns DVC of the DV output columns (chunk
  // blockIdx.x % NC) and recomputes S for them, so its O accumulator fits the
  // registers; the chunk-0 block writes the lse.
  constexpr int NC = (DV + DVC - 1) / DVC;
  constexpr int DP = decode_pad16(D), DVP = decode_pad16(DVC);
  constexpr int SQ = DP + 8, SV = DVP + 8;
  constexpr int STAGE = BN * (SQ + SV);  // elements of one K + V buffer
  // Q fragments stay in registers up to head dim 128; above, the O
  // accumulator needs the registers and Q is re-read from shared memory.
  constexpr bool Q_IN_REGS = KR || DP <= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int rows = seq.nq * G;
  const int col_chunk = NC > 1 ? blockIdx.x % NC : 0, dv0 = col_chunk * DVC, dv_valid = min(DVC, DV - dv0);
  const int r0 = blockIdx.x / NC * BM;
  if (r0 >= rows) return;
  const int r_end = min(rows, r0 + BM);
  const long q_base = (long)seq.tensor_batch * Hq * NqTot + seq.q_start;
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  // Row r of the sequence is query r / G of head hk * G + r % G.
  auto q_row = [&](int r) { return q_base + (long)(hk * G + r % G) * NqTot + r / G; };
  const float scale = fp[kScale];

  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* ring = Qs + kDecodeRows * SQ + warp * STAGES * STAGE;
  // BULK: stage s of warp w completes on bars[w * STAGES + s] (tile n is the
  // (n / STAGES)-th use of its stage: parity (n / STAGES) & 1).
  __shared__ __align__(8) unsigned long long decode_bars[BULK ? NW * STAGES : 1];
  if constexpr (BULK) {
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) bulk_bar_init(&decode_bars[warp * STAGES + s], 1);
      bulk_bar_init_fence();
    }
    // Columns past the head dim (head dims not multiples of 16) are never
    // copied: zero them once, as the cp.async path's zero-fill does.
    if constexpr (DP > D || DVP > DVC) {
      for (int i = lane; i < STAGES * BN; i += 32) {
        T* row = ring + (i / BN) * STAGE + (i % BN) * SQ;
        for (int c = D; c < DP; ++c) row[c] = from_float<T>(0.f);
        row = ring + (i / BN) * STAGE + BN * SQ + (i % BN) * SV;
        for (int c = DVC; c < DVP; ++c) row[c] = from_float<T>(0.f);
      }
    }
    __syncwarp();
  }

  // The two rows of this lane's accumulator fragments: g and g + 8 (KR: its
  // columns 2t and 2t + 1). Rows past the sequence's last get i >= nq, which
  // apply_rules drops.
  const int ra = r0 + (KR ? 2 * t : g), rb = r0 + (KR ? 2 * t + 1 : g + 8);
  const LogitRules<MT> rules_a = make_rules<MT, F>(seq, b, hk * G + ra % G, ip, fp, mask, alibi, bmask,
                                                       key_start, key_len);
  const LogitRules<MT> rules_b = make_rules<MT, F>(seq, b, hk * G + rb % G, ip, fp, mask, alibi, bmask,
                                                       key_start, key_len);

  // Keys any row of the block can see (within its batch row's key range),
  // then this split's share, in whole rounds of NW tiles so the warps get
  // equal work: the splits cover only the keys that exist.
  const int i_first = r0 / G, i_last = (r_end - 1) / G;
  int lo, hi;
  rules_a.key_range(i_first, i_last, lo, hi);
  const int span = max(hi - lo, 0), splits = SPLIT ? gridDim.y : 1;
  constexpr int ROUND = NW * BN;
  const int chunk = ((span + splits - 1) / splits + ROUND - 1) / ROUND * ROUND;
  const int k_lo = lo + (SPLIT ? blockIdx.y : 0) * chunk;
  const int k_hi = min(hi, k_lo + chunk);
  const int j_first = k_lo + warp * BN;
  const int tiles = j_first < k_hi ? (k_hi - j_first + ROUND - 1) / ROUND : 0;  // this warp's

  // Q tile (all threads), then the first STAGES - 1 tiles of this warp, all in flight together.
  {
    constexpr int CH = DP / 8;
    for (int c = threadIdx.x; c < BM * CH; c += NT) {
      const int row = c / CH, col = (c % CH) * 8;
      const bool ok = r0 + row < r_end && col < D;
      cp_async16(Qs + row * SQ + col, q + (ok ? q_row(r0 + row) * D + col : 0), ok);
    }
    cp_async_commit();
  }
  auto load_tile = [&](int n) {
    const int j = j_first + n * ROUND;
    T* Ks = ring + (n % STAGES) * STAGE;
    if constexpr (BULK) {
      // Lanes 0-15: K rows, 16-31: V rows, one bulk copy each; rows past the
      // split's end (its last tile) are zeroed instead.
      void* bar = &decode_bars[warp * STAGES + n % STAGES];
      const int valid = min(k_hi - j, BN), row = lane % 16;
      if (lane == 0) bulk_bar_expect(bar, (unsigned)(valid * (D + DV) * sizeof(T)));
      T* dst = lane < 16 ? Ks + row * SQ : Ks + BN * SQ + row * SV;
      if (row < valid) {
        const T* src = lane < 16 ? k + (kv_base + j + row) * D : v + (kv_base + j + row) * DV;
        bulk_copy(dst, src, (unsigned)((lane < 16 ? D : DV) * sizeof(T)), bar);
      } else {
        for (int c = 0; c < (lane < 16 ? DP : DVP); c += 8) *reinterpret_cast<uint4*>(dst + c) = make_uint4(0, 0, 0, 0);
      }
    } else {
      decode_load_rows<T, BN, D, SQ>(Ks, k + (kv_base + j) * D, k_hi - j, lane);
      decode_load_rows<T, BN, DVC, SV, DV>(Ks + BN * SQ, v + (kv_base + j) * DV + dv0, k_hi - j, lane, dv_valid);
    }
  };
#pragma unroll
  for (int n = 0; n < STAGES - 1; ++n) {
    if (n < tiles) load_tile(n);
    if constexpr (!BULK) cp_async_commit();
  }
  if constexpr (BULK) {
    cp_async_wait<0>();  // the Q group
  } else {
    cp_async_wait<STAGES - 1>();  // the Q group (the oldest) has landed
  }
  __syncthreads();

  unsigned qf[Q_IN_REGS ? DP / 16 : 1][4];
  if constexpr (KR) {  // Q^T as B operands: rows 0-7, k-halves 0-7 and 8-15
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      unsigned r2[2];
      ldmatrix_x2(r2, Qs + (lane % 8) * SQ + kk * 16 + ((lane / 8) % 2) * 8);
      qf[kk][0] = r2[0], qf[kk][1] = r2[1];
    }
  } else if constexpr (Q_IN_REGS) {
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(qf[kk], Qs + (lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
  }

  constexpr int ON = KR ? DVP / 16 : DVP / 8;  // accumulator tiles (KR: O^T, 16 columns of V each)
  float o[ON][4];
#pragma unroll
  for (int n = 0; n < ON; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};
  const int shift = seq.nk - seq.nq;

  for (int n = 0; n < tiles; ++n) {
    if constexpr (BULK) {
      bulk_bar_wait(&decode_bars[warp * STAGES + n % STAGES], (n / STAGES) & 1);  // tile n landed
    } else {
      cp_async_wait<STAGES - 2>();  // this lane's copies of tile n are done ...
    }
    __syncwarp();  // ... and every lane's; all are past tile n - 1
    if (n + STAGES - 1 < tiles) load_tile(n + STAGES - 1);  // into tile n - 1's buffer
    if constexpr (!BULK) cp_async_commit();
    const T* Ks = ring + (n % STAGES) * STAGE;
    const T* Vs = Ks + BN * SQ;
    const int j0 = j_first + n * ROUND;

    // S = Q K^T: 16 rows x BN keys (KR: S^T, 16 keys x 8 rows).
    constexpr int SN = KR ? 1 : BN / 8;
    float s[SN][4];
#pragma unroll
    for (int nb = 0; nb < SN; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; KR && kk < DP / 16; ++kk) {
      unsigned ka[4];
      ldmatrix_x4(ka, Ks + (lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
      mma16816<T>(s[0], ka, qf[kk][0], qf[kk][1]);
    }
#pragma unroll
    for (int kk = 0; !KR && kk < DP / 16; ++kk) {
      unsigned qa[4];
      if constexpr (Q_IN_REGS) {
        qa[0] = qf[kk][0], qa[1] = qf[kk][1], qa[2] = qf[kk][2], qa[3] = qf[kk][3];
      } else {
        ldmatrix_x4(qa, Qs + (lane % 16) * SQ + kk * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        unsigned bk[4];
        ldmatrix_x4(bk, Ks + (np * 16 + (lane / 16) * 8 + lane % 8) * SQ + kk * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(s[2 * np], qa, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qa, bk[2], bk[3]);
      }
    }

    // Logit rules where this tile needs them (features, the split's end, a
    // window edge inside the tile), then the online softmax in the log2 domain.
    const bool inside_window = (rules_a.left < 0 || j0 >= i_last + shift - rules_a.left) &&
                               (rules_a.right < 0 || j0 + BN - 1 <= i_first + shift + rules_a.right);
    const bool need_rules = F::ElementRules || j0 + BN > k_hi || !inside_window;
    // Bit 4nb + c: pair (nb, c) dropped (exact_fragment_product); formed for
    // every tile, since decode has ALU time to spare: a -inf logit from an
    // infinite q or k drops its key in a tile without rules too.
    unsigned drop = 0;
#pragma unroll
    for (int nb = 0; nb < SN; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[nb][c] * scale;
        if (need_rules) {
          // Key and row of element c: (KR) keys g, g + 8 and rows ra, rb by
          // column; else keys by column and rows ra, rb by row.
          const int j = KR ? j0 + g + 8 * (c >> 1) : j0 + nb * 8 + 2 * t + (c & 1);
          const bool row_a = KR ? (c & 1) == 0 : c < 2;
          float capped = 0.f;
          x = j >= k_hi ? kNegInf
              : row_a ? apply_rules<F>(rules_a, x, ra / G, j, capped)
                      : apply_rules<F>(rules_b, x, rb / G, j, capped);
        }
        drop |= (x == kNegInf ? 1u : 0u) << (4 * nb + c);
        s[nb][c] = x * kLog2e;
      }
    }
    // A tile that drops keys and holds a NaN or inf in V: P V exactly (rare).
    const bool exact = __any_sync(0xffffffffu, drop != 0u) &&
                       __any_sync(0xffffffffu, decode_own_rows_nonfinite<T, BN, DVC, SV>(Vs, lane));
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // This lane's values of row `half`: (KR) elements half and 2 + half,
      // the row's other keys in the lanes of other g; else elements 2 half,
      // 2 half + 1 of every key block, the row's other keys in the quad.
      auto at = [&](int nb, int e) -> float& { return KR ? s[0][half + 2 * e] : s[nb][2 * half + e]; };
      float mx = kNegInf;
#pragma unroll
      for (int nb = 0; nb < SN; ++nb) mx = fmaxf(mx, fmaxf(at(nb, 0), at(nb, 1)));
      if constexpr (KR) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      } else {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      }
      const float new_max = fmaxf(row_max[half], mx);
      const float base = new_max == kNegInf ? 0.f : new_max;
      const float alpha = exp2f(row_max[half] - base);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < SN; ++nb) {
        at(nb, 0) = exp2f(at(nb, 0) - base);
        at(nb, 1) = exp2f(at(nb, 1) - base);
        sum += at(nb, 0) + at(nb, 1);
      }
      row_sum[half] = row_sum[half] * alpha + sum;  // this lane's keys; summed over the row's lanes at the end
      row_max[half] = new_max;
#pragma unroll
      for (int nd = 0; nd < ON; ++nd) {
        if constexpr (KR) {
          o[nd][half] *= alpha;
          o[nd][2 + half] *= alpha;
        } else {
          o[nd][2 * half] *= alpha;
          o[nd][2 * half + 1] *= alpha;
        }
      }
    }

    if (exact) {
      if constexpr (KR) {
        // O^T[d][row] += P^T[key][row] V[key][d] over kept pairs only: this
        // lane's rows 2t, 2t + 1 have their 16 keys in lanes 4g' + t.
#pragma unroll 1
        for (int kg = 0; kg < 8; ++kg) {
          float p[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) p[c] = __shfl_sync(0xffffffffu, s[0][c], 4 * kg + t);
          const unsigned bits = __shfl_sync(0xffffffffu, drop, 4 * kg + t);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if ((bits >> c) & 1u) continue;
            const T* vrow = Vs + (kg + 8 * (c >> 1)) * SV;
#pragma unroll
            for (int nd = 0; nd < ON; ++nd) {
              o[nd][c & 1] += p[c] * to_float(vrow[nd * 16 + g]);
              o[nd][2 + (c & 1)] += p[c] * to_float(vrow[nd * 16 + g + 8]);
            }
          }
        }
      } else {
        exact_fragment_product<BN / 8, DVP / 8>([&](int kb, int c) { return s[kb][c]; }, drop,
                                                [&](int n, int c) -> float& { return o[n][c]; },
                                                [&](int j, int d) { return to_float(Vs[j * SV + d]); });
      }
      continue;
    }
    if constexpr (KR) {
      // O^T += V^T P^T: P^T's two 8-key halves, transposed into B fragments.
      const unsigned b0 = movmatrix_trans(pack2<T>(s[0][0], s[0][1]));
      const unsigned b1 = movmatrix_trans(pack2<T>(s[0][2], s[0][3]));
#pragma unroll
      for (int nd = 0; nd < ON; ++nd) {
        unsigned va[4];
        ldmatrix_x4_trans(va, Vs + ((lane / 16) * 8 + lane % 8) * SV + nd * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(o[nd], va, b0, b1);
      }
      continue;
    }
    // O += P V, P re-used from the S accumulators as A fragments.
#pragma unroll
    for (int kk = 0; !KR && kk < BN / 16; ++kk) {
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
  cp_async_wait<0>();

  // Merge the warps: each leaves its rows' max, sum and unnormalised O in
  // shared memory (over its ring, now idle), then the block combines them.
  constexpr int OS = DVP + 8;  // row pitch of the O scratch: float2 stores of a warp hit distinct banks
  float* m_w = reinterpret_cast<float*>(smem_raw);  // [NW][16]
  float* l_w = m_w + NW * BM;                      // [NW][16]
  float* o_w = l_w + NW * BM;                      // [NW][16][OS]
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = KR ? 2 * t + half : g + 8 * half;
    float sum = row_sum[half];
    if constexpr (KR) {
      sum += __shfl_xor_sync(0xffffffffu, sum, 4);
      sum += __shfl_xor_sync(0xffffffffu, sum, 8);
      sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    } else {
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    }
    if ((KR ? g : t) == 0) {
      m_w[warp * BM + row] = row_max[half];
      l_w[warp * BM + row] = sum;
    }
#pragma unroll
    for (int nd = 0; nd < ON; ++nd) {
      if constexpr (KR) {
        o_w[(warp * BM + row) * OS + nd * 16 + g] = o[nd][half];
        o_w[(warp * BM + row) * OS + nd * 16 + g + 8] = o[nd][2 + half];
      } else {
        *reinterpret_cast<float2*>(o_w + (warp * BM + row) * OS + nd * 8 + 2 * t) =
            make_float2(o[nd][2 * half], o[nd][2 * half + 1]);
      }
    }
  }
  __syncthreads();

  const long total_rows = (long)(F::Varlen ? 1 : ip[kBatch]) * Hq * NqTot;
  const long groups = (long)gridDim.x * gridDim.z;
  float* part_lse = ws + decode_pad4(groups);
  float* part_o = part_lse + decode_pad4((long)splits * NC * total_rows);
  for (int e = threadIdx.x; e < (r_end - r0) * DVC; e += NT) {
    const int row = e / DVC, d = e % DVC;
    if (NC > 1 && d >= dv_valid) continue;
    // A warp whose row max is -inf kept nothing (sum 0) or only NaN logits
    // (sum NaN): weight 0 keeps the former out and carries the latter's NaN.
    float m = kNegInf;
#pragma unroll
    for (int w = 0; w < NW; ++w) m = fmaxf(m, m_w[w * BM + row]);
    const float base = m == kNegInf ? 0.f : m;
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float f = exp2f(m_w[w * BM + row] - base);
      sum += l_w[w * BM + row] * f;
      acc += o_w[(w * BM + row) * OS + d] * f;
    }
    const int r = r0 + row;
    const long qr = q_row(r);
    if (!SPLIT) {
      float alpha = 1.f;
      if (F::Sinks) fold_sink<true>(sinks[hk * G + r % G] * kLog2e, m, sum, alpha);
      out[qr * DV + dv0 + d] = from_float<T>(sum == 0.f ? 0.f : acc * row_out_factor(sum, alpha));
      if (d == 0 && col_chunk == 0) lse[qr] = row_lse<true>(m, sum);
    } else {
      // This split's normalised partial row and its lse (one per column chunk,
      // so a chunk's merge never waits on another chunk's blocks).
      part_o[(blockIdx.y * total_rows + qr) * DV + dv0 + d] = sum == 0.f ? 0.f : acc * row_out_factor(sum, 1.f);
      if (d == 0) part_lse[((long)blockIdx.y * NC + col_chunk) * total_rows + qr] = row_lse<true>(m, sum);
    }
  }
  if constexpr (SPLIT) {
    // The last block of this (row block, column chunk, batch x KV head) to
    // finish merges every split's partial: its ticket is the group's counter,
    // in ws (zero-filled by MLX: init_value = 0) or, given pool_tickets, in a
    // region of a zeroed pool that this call alone uses, which the last block
    // sets back to 0 for a later call (no fill of the outputs). The fence
    // orders this block's partial stores before its ticket; the reader fences
    // again and reads through L2 (__ldcg), never a stale L1 line.
    __shared__ int decode_last[1];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const long group = (long)blockIdx.z * gridDim.x + blockIdx.x;
      unsigned* ticket = pool_tickets != nullptr ? const_cast<unsigned*>(pool_tickets) + group
                                                 : reinterpret_cast<unsigned*>(ws) + group;
      const bool last = atomicAdd(ticket, 1u) == (unsigned)(splits - 1);
      if (last && pool_tickets != nullptr) *ticket = 0u;  // every other block of the group has drawn
      decode_last[0] = last;
    }
    __syncthreads();
    if (!decode_last[0]) return;
    __threadfence();
    decode_merge_splits<T, DV, DVC, NC, NW>(
        part_o, part_lse + (long)col_chunk * total_rows, F::Sinks ? sinks : nullptr, splits, NC * total_rows,
        total_rows, r_end - r0, [&](int row) { return q_row(r0 + row); },
        [&](int row) { return hk * G + (r0 + row) % G; }, dv0, dv_valid, col_chunk == 0, out, lse,
        reinterpret_cast<float*>(smem_raw));
  }
}

}  // namespace mlx_flash
