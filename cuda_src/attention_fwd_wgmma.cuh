// Hopper (sm_90a) FlashAttention-2 forward on warpgroup MMA, fp16/bf16 with
// fp32 accumulation, head dims 64 and 128 (Dqk = Dv).
//
// A block of two warpgroups owns BM = 128 query rows of one (batch, head);
// warpgroup w owns rows 64w..64w+63 and keeps its running max/sum and O
// accumulator in registers. Q stays in shared memory and is read by wgmma
// through a descriptor; K/V tiles of BN keys stream through shared memory
// with cp.async, two or three stages (see the schedules below). S = Q K^T is a
// shared x shared wgmma; the softmax runs on S in registers, whose
// accumulator layout is also the A-fragment layout, so P feeds O += P V as a
// register x shared wgmma with V read MN-major (no transpose copy).
// The logit rules, tile skipping and the epilogue are those of the mma.sync
// forward (attention_fwd_mma.cuh); only the matrix products differ.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace mlx_flash {

// Shared memory of the wgmma forward (bytes): Q [128][D], K and V [BN][D]
// once per stage, plus 1 KiB to align the swizzled tiles to 1024 bytes.
__host__ __device__ constexpr int wgmma_fwd_smem(int d, int bn, int stages) {
  return 2 * (128 * d + 2 * stages * bn * d) + 1024;
}

// The A fragment of k-step kk (16 keys) of a register-A wgmma, packed from
// an fp32 accumulator tile in wgmma's C layout (P of the forward, P^T and
// dS^T of the backward): four pairs of 16-bit values.
template <typename T, int N>
__device__ __forceinline__ void wgmma_a_fragment(unsigned (&a)[4], const float (&acc)[N], int kk) {
  a[0] = pack2<T>(acc[8 * kk + 0], acc[8 * kk + 1]);
  a[1] = pack2<T>(acc[8 * kk + 2], acc[8 * kk + 3]);
  a[2] = pack2<T>(acc[8 * kk + 4], acc[8 * kk + 5]);
  a[3] = pack2<T>(acc[8 * kk + 6], acc[8 * kk + 7]);
}

// Rows [0, valid_rows) of a row-major [*, DIM] global tile into a swizzled
// [ROWS][DIM] shared tile (wgmma.cuh) with cp.async; missing rows are zeros.
template <typename T, int ROWS, int DIM, int NTHREADS>
__device__ __forceinline__ void load_tile_swizzled(unsigned char* dst, const T* src, int valid_rows) {
  constexpr int CHUNKS = DIM / 8;
  static_assert(ROWS * CHUNKS % NTHREADS == 0, "tile must split evenly over the threads");
  static_assert(NTHREADS % CHUNKS == 0 && NTHREADS / CHUNKS % 8 == 0, "whole 8-row swizzle groups per pass");
  // Pass `it` moves this thread STEP rows down (a multiple of 8): the same
  // chunk and the same swizzle, so one shared and one global offset serve
  // every pass (computed once, not per pass: the tile loops reload tiles).
  constexpr int STEP = NTHREADS / CHUNKS;
  const int row0 = threadIdx.x / CHUNKS, chunk = threadIdx.x % CHUNKS;
  unsigned char* d = dst + swizzled_offset<ROWS>(row0, chunk);
  const T* s = src + row0 * DIM + chunk * 8;
#pragma unroll
  for (int it = 0; it < ROWS * CHUNKS / NTHREADS; ++it) {
    const bool ok = row0 + it * STEP < valid_rows;
    cp_async16(d + it * STEP * 128, ok ? s + it * STEP * DIM : src, ok);
  }
}

// The chunks load_tile_swizzled gave this thread hold a NaN or inf; valid
// once its copies have landed.
template <typename T, int ROWS, int DIM, int NTHREADS>
__device__ __forceinline__ bool own_swizzled_nonfinite(const unsigned char* dst) {
  constexpr int CHUNKS = DIM / 8;
  bool bad = false;
#pragma unroll 1
  for (int it = 0; it < ROWS * CHUNKS / NTHREADS; ++it) {  // few tiles: no registers held
    const int c = threadIdx.x + it * NTHREADS;
    bad = bad || chunk_nonfinite<T>(dst + swizzled_offset<ROWS>(c / CHUNKS, c % CHUNKS));
  }
  return bad;
}

// Element (row, col) of a swizzled [ROWS][DIM] 16-bit tile, as float.
template <typename T, int ROWS>
__device__ __forceinline__ float swizzled_at(const unsigned char* tile, int row, int col) {
  return to_float(*reinterpret_cast<const T*>(tile + swizzled_offset<ROWS>(row, col / 8) + (col % 8) * 2));
}

// Some pair of key tile [jt, jt + BN) x rows [i0, i_end) may be dropped
// (a mask, a block mask, the sequence's end or key range, or a window edge; softcap and
// ALiBi alone drop nothing). Uniform over the block.
template <class F, int BN, typename MT>
__device__ __forceinline__ bool tile_may_drop(const LogitRules<MT>& rules, const Sequence& seq, int i0, int i_end,
                                              int jt) {
  const int shift = seq.nk - seq.nq;
  const bool inside_window =
      (rules.left < 0 || jt >= i_end - 1 + shift - rules.left) &&
      (rules.right < 0 || jt + BN - 1 <= i0 + shift + rules.right);
  const bool check_blocks = F::BlockMask && (i0 / rules.block_q != (i_end - 1) / rules.block_q ||
                                             jt / rules.block_k != (jt + BN - 1) / rules.block_k);
  return F::MaskKind != 0 || check_blocks || tile_cuts_keys<F>(rules, jt, jt + BN) || !inside_window;
}

// One warpgroup's share of a key tile: S = Q K^T issued (not waited) over
// D / 16 k-steps; K-major operands, 64 columns per swizzle atom. The first
// k-step overwrites S, so S needs no zeroing (ordinary writes to the
// accumulators would make ptxas serialise wgmma).
template <typename T, int D, int BN>
__device__ __forceinline__ void wg_issue_s(float (&s)[BN / 2], unsigned q_addr, unsigned k_addr) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const unsigned long long da = wgmma_desc(q_addr + (kk / 4) * (128 * 128) + (kk % 4) * 32, 16, 1024);
    const unsigned long long db = wgmma_desc(k_addr + (kk / 4) * (BN * 128) + (kk % 4) * 32, 16, 1024);
    Wgmma<T, BN>::template ss<0, 0>(s, da, db, kk > 0);
  }
  wgmma_commit();
}

// O += P V issued (not waited) over BN / 16 k-steps; P from registers, V MN-major
// (LBO: the next 64 value dims).
template <typename T, int D, int BN>
__device__ __forceinline__ void wg_issue_pv(float (&o)[D / 2], unsigned (&pa)[BN / 16][4], unsigned v_addr) {
  wgmma_pin(o);
  wgmma_pin(pa);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const unsigned long long db = wgmma_desc(v_addr + kk * 16 * 128, BN * 128, 1024);
    Wgmma<T, D>::template rs<1>(o, pa[kk], db, 1);
  }
  wgmma_commit();
}

// Online softmax of one S tile (rows i_row and i_row + 8 of this thread, keys
// from jt): logit rules where the tile needs them, running max/sum, O rescaled,
// P packed into A fragments. Same arithmetic as attention_fwd_mma2.
// kRules: the tile applies the logit rules (and marks dropped pairs); an
// instance of its own, so tiles without rules carry none of that code (in one
// instance ptxas merged the marking into every tile: ~130 instructions each).
template <typename T, typename MT, class F, int D, int BN, bool kRules>
__device__ __forceinline__ void wg_softmax_tile(float (&s)[BN / 2], float (&o)[D / 2], unsigned (&pa)[BN / 16][4],
                                                float (&row_max)[2], float (&row_sum)[2], const LogitRules<MT>& rules,
                                                float scale, int i0, int i_end, int i_row, int jt, int t) {
  constexpr bool need_rules = kRules;
  const bool check_blocks = F::BlockMask && (i0 / rules.block_q != (i_end - 1) / rules.block_q ||
                                             jt / rules.block_k != (jt + BN - 1) / rules.block_k);
  unsigned long long drop = 0;  // bit 4n + c: pair (n, c) dropped
  // Logits in the log2 domain: one multiply by scale * log2(e) without rules.
  const float scale_log2 = scale * kLog2e;
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (!need_rules) {
        s[4 * n + c] *= scale_log2;
        continue;
      }
      const int i = i_row + (c >= 2 ? 8 : 0);
      const int j = jt + n * 8 + 2 * t + (c & 1);
      float capped = 0.f;
      const float x = apply_rules<F, MT, true>(rules, s[4 * n + c] * scale, i, j, capped, check_blocks);
      drop |= (x == kNegInf ? 1ull : 0ull) << (4 * n + c);
      s[4 * n + c] = x * kLog2e;
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = kNegInf;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float new_max = fmaxf(row_max[half], mx);
    const float base = new_max == kNegInf ? 0.f : new_max;
    const float alpha = exp2_ftz(row_max[half] - base);
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      s[4 * n + 2 * half] = exp2_ftz(s[4 * n + 2 * half] - base);
      s[4 * n + 2 * half + 1] = exp2_ftz(s[4 * n + 2 * half + 1] - base);
      sum += s[4 * n + 2 * half] + s[4 * n + 2 * half + 1];
    }
    row_sum[half] = row_sum[half] * alpha + sum;
    row_max[half] = new_max;
    // Once the row maxima settle, alpha is exactly 1 for every row of the
    // warp: skip the multiplies (a warp vote, D / 4 multiplies saved).
    if (!__all_sync(0xffffffffu, alpha == 1.f)) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[4 * n + 2 * half] *= alpha;
        o[4 * n + 2 * half + 1] *= alpha;
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_a_fragment<T>(pa[kk], s, kk);
  // A dropped pair's p (+0) becomes -0, its mark for wg_exact_pv; the mma
  // path multiplies it the same.
  if (need_rules) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int w = 0; w < 4; ++w)
        pa[kk][w] |= pair_marks((drop >> (8 * kk + 2 * w)) & 1u, (drop >> (8 * kk + 2 * w + 1)) & 1u);
  }
}

template <typename T, typename MT, class F, int D, int BN>
__device__ __forceinline__ void wg_softmax(float (&s)[BN / 2], float (&o)[D / 2], unsigned (&pa)[BN / 16][4],
                                           float (&row_max)[2], float (&row_sum)[2], const LogitRules<MT>& rules,
                                           const Sequence& seq, float scale, int i0, int i_end, int i_row, int jt,
                                           int t) {
  if (F::Softcap || F::Alibi || tile_may_drop<F, BN>(rules, seq, i0, i_end, jt))
    wg_softmax_tile<T, MT, F, D, BN, true>(s, o, pa, row_max, row_sum, rules, scale, i0, i_end, i_row, jt, t);
  else
    wg_softmax_tile<T, MT, F, D, BN, false>(s, o, pa, row_max, row_sum, rules, scale, i0, i_end, i_row, jt, t);
}

// Barrier 1 over the block's 256 threads; unlike __syncthreads it may be
// reached from different places by the two warpgroups (the ping-pong schedule).
__device__ __forceinline__ void block_barrier() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
// The same barrier, returning whether any thread passed `p` true.
__device__ __forceinline__ bool block_barrier_or(bool p) {
  unsigned r;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, 256, p;\n selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r) : "r"((unsigned)p) : "memory");
  return r != 0;
}

// Element (kb, c) of a P tile in the accumulator layout (the float s[4kb + c])
// from its packed A fragments pa (wg_softmax's packing).
template <typename T, int KK>
__device__ __forceinline__ float packed_p(const unsigned (&pa)[KK][4], int kb, int c) {
  return unpack_half<T>(pa[kb / 2][2 * (kb % 2) + c / 2], c % 2);
}

// O += P V of one tile, exactly (dropped pairs, marked -0 in pa, skipped; a
// tile that drops keys and holds a NaN or inf in V, see attention_common.cuh).
// P is read back from its packed fragments, so nothing else stays live.
template <typename T, int D, int BN>
__device__ __forceinline__ void wg_exact_pv(float (&o)[D / 2], const unsigned (&pa)[BN / 16][4],
                                            const unsigned char* v_tile) {
  exact_fragment_product<BN / 8, D / 8, true>([&](int kb, int c) { return packed_p<T>(pa, kb, c); }, 0,
                                              [&](int n, int c) -> float& { return o[4 * n + c]; },
                                              [&](int j, int d) { return swizzled_at<T, BN>(v_tile, j, d); });
}

// STAGES = 2: both warpgroups in step, one barrier per tile, K/V tile j+1
// loading while tile j is computed; block masks skip dead tiles.
// STAGES = 3 (ping-pong, no block mask): warpgroup 1 runs half a tile behind
// warpgroup 0, so one's softmax overlaps the other's matrix products. Both
// meet once per tile at the same barrier, placed mid-tile (after the softmax)
// for warpgroup 0 and at the tile's start for warpgroup 1; before it every
// thread has its copies of tile j+1 landed, after it tile j+2 is loaded into
// the buffer of tile j-1, which both warpgroups have finished by then.
template <typename T, typename MT, class F, int D, int BN, int STAGES>
__device__ void attention_fwd_wgmma(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const float* sinks,
    const bool* bmask, const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    T* out, float* lse, const int* key_start = nullptr, const int* key_len = nullptr) {
  static_assert(D == 64 || D == 128, "wgmma forward: head dim 64 or 128");
  static_assert(BN == 64 || BN == 128, "wgmma forward: key tile 64 or 128");
  static_assert(STAGES == 2 || (STAGES == 3 && !F::BlockMask), "ping-pong schedule: no block mask");
  constexpr int BM = 128, NTHREADS = 256;
  constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* Ks = Qs + Q_BYTES;            // STAGES K tiles
  unsigned char* Vs = Ks + STAGES * KV_BYTES;  // STAGES V tiles

  const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
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
  const int i_row = i0 + wg * 64 + warp * 16 + g;  // this thread's first row (the other: + 8)

  int lo, hi;
  rules.key_range(i0, i_end - 1, lo, hi);
  const int tile0 = lo / BN * BN;
  auto load_kv = [&](int j0, int stage) {
    load_tile_swizzled<T, BN, D, NTHREADS>(Ks + stage * KV_BYTES, k + (kv_base + j0) * D, rules.key_hi - j0);
    load_tile_swizzled<T, BN, D, NTHREADS>(Vs + stage * KV_BYTES, v + (kv_base + j0) * D, rules.key_hi - j0);
  };

  float o[D / 2];
#pragma unroll
  for (int r = 0; r < D / 2; ++r) o[r] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};
  float s[BN / 2];
  unsigned pa[BN / 16][4];
  // A tile that drops keys and holds a NaN or inf in V (any thread's own chunks).
  auto v_bad = [&](int j0, int stage) {
    return j0 < hi && tile_may_drop<F, BN>(rules, seq, i0, i_end, j0) &&
           own_swizzled_nonfinite<T, BN, D, NTHREADS>(Vs + stage * KV_BYTES);
  };
  const unsigned q_addr = smem_addr(Qs) + wg * 64 * 128;
  load_tile_swizzled<T, BM, D, NTHREADS>(Qs, q + (q_base + i0) * D, i_end - i0);

  if constexpr (STAGES == 3) {
    const int tiles = hi > tile0 ? (hi - tile0 + BN - 1) / BN : 0;
    if (tiles > 0) load_kv(tile0, 0);
    cp_async_commit();
    if (tiles > 1) load_kv(tile0 + BN, 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    // Q and tile 0 visible; whether tile 0 needs the exact P V.
    bool exact = block_barrier_or(tiles > 0 && v_bad(tile0, 0)), exact_next = false;
    // Barrier of tile j: own copies of tile j+1 landed (and checked), then tile j+2 into stage (j+2) % 3.
    auto tile_barrier = [&](int j) {
      cp_async_wait<0>();
      fence_proxy_async();
      exact_next = block_barrier_or(j + 1 < tiles && v_bad(tile0 + (j + 1) * BN, (j + 1) % 3));
      if (j + 2 < tiles) load_kv(tile0 + (j + 2) * BN, (j + 2) % 3);
      cp_async_commit();
    };
    for (int j = 0; j < tiles; ++j) {
      const int jt = tile0 + j * BN, stage = j % 3;
      if (wg == 1) tile_barrier(j);
      wg_issue_s<T, D, BN>(s, q_addr, smem_addr(Ks + stage * KV_BYTES));
      wgmma_wait<0>();
      wgmma_pin(s);
      wgmma_pin(o);
      wg_softmax<T, MT, F, D, BN>(s, o, pa, row_max, row_sum, rules, seq, scale, i0, i_end, i_row, jt, t);
      if (wg == 0) tile_barrier(j);
      if (exact) {
        wg_exact_pv<T, D, BN>(o, pa, Vs + stage * KV_BYTES);
      } else {
        wg_issue_pv<T, D, BN>(o, pa, smem_addr(Vs + stage * KV_BYTES));
        wgmma_wait<0>();
      }
      wgmma_pin(o);
      wgmma_pin(pa);
      exact = exact_next;
    }
  } else {
    __shared__ unsigned char live_flags[256];
    LiveKeyTiles<F, MT, BN, NTHREADS> tiles_live{rules, live_flags, i0, i_end, tile0, hi, seq.nk};
    int jt = tiles_live.next(tile0);
    if (jt < hi) load_kv(jt, 0);
    cp_async_commit();
    int stage = 0;
    while (jt < hi) {
      cp_async_wait<0>();
      fence_proxy_async();
      // Tile jt visible to both warpgroups, which have finished tile jt - 1.
      const bool exact = __syncthreads_or(v_bad(jt, stage)) != 0;
      const int jn = tiles_live.next(jt + BN);
      if (jn < hi) load_kv(jn, stage ^ 1);
      cp_async_commit();
      wg_issue_s<T, D, BN>(s, q_addr, smem_addr(Ks + stage * KV_BYTES));
      wgmma_wait<0>();
      wgmma_pin(s);
      wg_softmax<T, MT, F, D, BN>(s, o, pa, row_max, row_sum, rules, seq, scale, i0, i_end, i_row, jt, t);
      if (exact) {
        wg_exact_pv<T, D, BN>(o, pa, Vs + stage * KV_BYTES);
      } else {
        wg_issue_pv<T, D, BN>(o, pa, smem_addr(Vs + stage * KV_BYTES));
        wgmma_wait<0>();
      }
      wgmma_pin(o);
      wgmma_pin(pa);
      stage ^= 1;
      jt = jn;
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    float m = row_max[half];
    float alpha = 1.f;
    if (F::Sinks) fold_sink<true>(sinks[h] * kLog2e, m, sum, alpha);
    // 0 if nothing was kept, NaN if a kept logit was NaN or +inf (attention_common.cuh).
    const float inv = row_out_factor(sum, alpha);
    const bool empty = sum == 0.f;
    const int i = i_row + 8 * half;
    if (i >= seq.nq) continue;
    T* orow = out + (q_base + i) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int col = n * 8 + 2 * t;
      *reinterpret_cast<unsigned*>(orow + col) = empty ? 0u : pack2<T>(o[4 * n + 2 * half] * inv,
                                                                       o[4 * n + 2 * half + 1] * inv);
    }
    if (t == 0) lse[q_base + i] = row_lse<true>(m, sum);
  }
}

}  // namespace mlx_flash
