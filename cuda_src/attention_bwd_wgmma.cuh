// Hopper (sm_90a) FlashAttention-2 backward on warpgroup MMA, fp16/bf16 with
// fp32 accumulation, head dims 64 and 128 (Dqk = Dv).
//
// The algorithm of attention_bwd_mma.cuh (read it first) on wgmma: a block of
// two warpgroups owns BKV = 128 keys of one key/value head (warpgroup w: keys
// 64w..64w+63, its dK and dV rows in registers) and walks the query tiles of
// BQ = 64 rows, every head of the GQA group, that can see them:
//   S^T = K Q^T and dP^T = V dO^T      shared x shared, M = 64 keys, N = BQ
//   P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta)     in registers
//   dV += P^T dO, dK += dS^T Q          registers x shared (dO, Q read MN-major)
//   dQ = dS K                           shared x shared: dS^T from shared memory
//                                       read MN-major, K read MN-major; warpgroup
//                                       w forms dims 64w..64w+63 of the BQ rows
// and adds dQ to a float32 accumulator with vector atomics (a bulk-reduction
// dQ, staged per warp, lost on the H200 and was removed: docs/cuda.md). The
// next query tile's Q, dO, lse and delta
// load (cp.async) while the current one is used. delta = rowsum(dO * O) comes
// from attention_bwd_delta.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"
#include "attention_fwd_mma.cuh"
#include "attention_fwd_wgmma.cuh"

namespace mlx_flash {

// Shared memory of the wgmma backward (bytes): K, V [128][D]; Q, dO [64][D]
// twice; dS^T and P^T [128][64] (P^T written by exact tiles only); lse and
// delta [64] twice; 1 KiB alignment slack.
__host__ __device__ constexpr int wgmma_bwd_smem(int d) {
  return 2 * (2 * 128 * d + 4 * 64 * d + 2 * 128 * 64) + 4 * 4 * 64 + 1024;
}

// 4-byte cp.async (lse and delta rows; .ca: the 4-byte form has no .cg).
__device__ __forceinline__ void bwd_cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}

// (The bulk reductions below are attention_bwd_ws's dQ writer's.)
// dst[0, bytes) += src[0, bytes) (float32, in L2) by the bulk copy engine, as
// one bulk async-group operation; src 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void bwd_bulk_reduce_add_f32(float* dst, const void* src, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bwd_bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk operations have finished reading shared memory (the staging may be rewritten).
__device__ __forceinline__ void bwd_bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// ... and have completed.
__device__ __forceinline__ void bwd_bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Rows [0, valid_rows) of a query tile's Q and dO into their swizzled
// [ROWS][DIM] shared tiles with cp.async, as load_tile_swizzled does each
// (same chunks, same passes), but both at once from one 32-bit element
// offset a pass, formed from the thread index where it is used. The tile
// loop reloads Q and dO every tile; with load_tile_swizzled the compiler
// kept each pass's 64-bit global offset live across the loop, and at D 128
// with a mask or ALiBi NVRTC spilled them (48-72 bytes).
template <typename T, int ROWS, int DIM, int NTHREADS>
__device__ __forceinline__ void bwd_load_q_do(unsigned char* q_dst, unsigned char* do_dst, const T* q_src,
                                              const T* do_src, int valid_rows) {
  constexpr int CHUNKS = DIM / 8, STEP = NTHREADS / CHUNKS;
  static_assert(ROWS * CHUNKS % NTHREADS == 0 && STEP % 8 == 0, "as load_tile_swizzled");
  const int row0 = threadIdx.x / CHUNKS, chunk = threadIdx.x % CHUNKS;
  const unsigned sh = swizzled_offset<ROWS>(row0, chunk);
#pragma unroll
  for (int it = 0; it < ROWS * CHUNKS / NTHREADS; ++it) {
    const bool ok = row0 + it * STEP < valid_rows;
    const unsigned off = ok ? (unsigned)((row0 + it * STEP) * DIM + chunk * 8) : 0u;
    cp_async16(q_dst + sh + it * STEP * 128, q_src + off, ok);
    cp_async16(do_dst + sh + it * STEP * 128, do_src + off, ok);
  }
}

// Adds a warp's 16 x 64 part of a query tile's dQ (times scale) to the float32
// accumulator dq_head ([rows][D] of one head) with float2 atomics: acc holds
// the m64n64 fragment of rows `row` and row + 8 (4n + 2 half + e: dims
// col + 8n + e), as both the wgmma dQ and the exact tiles' dQ lay it out.
// Rows at or past nq (a partial last tile) are skipped.
// V4 (opt-in, MLX_FLASH_BWD_DQ_V4): float4 atomics, half as many. Lanes t and
// t ^ 1 of a quad hold columns 2t.. and 2t + 2.. of both rows; one exchange
// gives the even lane row `row`'s four columns and the odd lane row + 8's.
// (Nsight, H100, session 23: the float2 atomics fill the LSU queue, and the
// next tile's first writes to their address registers wait for them.) Each
// element still gets one add of the same value: the default's sums.
template <int D, bool V4 = false>
__device__ __forceinline__ void bwd_dq_atomic_add(float* dq_head, int row, int nq, int col, const float (&acc)[32],
                                                  float scale) {
  if constexpr (V4) {
    const bool odd = threadIdx.x & 1;  // t's parity (lane = 4g + t)
    const int i = row + (odd ? 8 : 0);
    float* dst = dq_head + (long)i * D + col - (odd ? 2 : 0);
    // Every exchange first, then the adds: each add's four values in registers
    // of their own (an add releases its source registers only once the LSU
    // takes it, so values formed one add at a time made each wait for the last).
    float w[32];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      // The partner's share: the even lane sends its row + 8 pair, the odd lane its row pair.
      const float r0 = __shfl_xor_sync(0xffffffffu, odd ? acc[4 * n] : acc[4 * n + 2], 1);
      const float r1 = __shfl_xor_sync(0xffffffffu, odd ? acc[4 * n + 1] : acc[4 * n + 3], 1);
      w[4 * n] = (odd ? r0 : acc[4 * n]) * scale;
      w[4 * n + 1] = (odd ? r1 : acc[4 * n + 1]) * scale;
      w[4 * n + 2] = (odd ? acc[4 * n + 2] : r0) * scale;
      w[4 * n + 3] = (odd ? acc[4 * n + 3] : r1) * scale;
    }
    if (i < nq) {
#pragma unroll
      for (int n = 0; n < 8; ++n)
        atomicAdd(reinterpret_cast<float4*>(dst + 8 * n),
                  make_float4(w[4 * n], w[4 * n + 1], w[4 * n + 2], w[4 * n + 3]));
    }
  } else {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = row + 8 * half;
      if (i >= nq) continue;
      float* dst = dq_head + (long)i * D + col;
#pragma unroll
      for (int n = 0; n < 8; ++n)
        atomicAdd(reinterpret_cast<float2*>(dst + 8 * n),
                  make_float2(acc[4 * n + 2 * half] * scale, acc[4 * n + 2 * half + 1] * scale));
    }
  }
}

// DV_EARLY (opt-in, MLX_FLASH_BWD_DV_EARLY): dV += P^T dO is issued as soon
// as P^T and dS^T are formed, so the tensor cores have it to work on while
// dS^T is packed and stored and the block waits at the barrier before dQ; by
// default they idle there (dV is issued after the dS^T stores). The same
// operations in the same order per accumulator: the default's bits. (Issuing
// dV earlier still, before dS^T is formed, either spilled under NVRTC at
// D 128 or, with a second issue site, made ptxas serialise every wgmma.)
template <typename T, typename MT, class F, int D, bool HEADS_FIRST, bool DV_EARLY = false, bool DQ_V4 = false>
__device__ void attention_bwd_wgmma(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const bool* bmask,
    const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    const T* dout, const float* lse, const float* delta,
    float* dq_acc, T* dk, T* dv, const int* key_start = nullptr, const int* key_len = nullptr) {
  static_assert(D == 64 || D == 128, "wgmma backward: head dim 64 or 128");
  constexpr bool kEarly = DV_EARLY;
  constexpr int BKV = 128, BQ = 64, NTHREADS = 256;
  constexpr int KV_BYTES = BKV * D * 2, QT_BYTES = BQ * D * 2, DS_BYTES = BKV * BQ * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Ks = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* Vs = Ks + KV_BYTES;
  unsigned char* Qs = Vs + KV_BYTES;        // two stages
  unsigned char* dOs = Qs + 2 * QT_BYTES;   // two stages
  unsigned char* dSs = dOs + 2 * QT_BYTES;  // dS^T [key][query], swizzled
  unsigned char* Ps = dSs + DS_BYTES;       // P^T [key][query], swizzled (exact tiles)
  float* lse_s = reinterpret_cast<float*>(Ps + DS_BYTES);  // two stages of BQ
  float* delta_s = lse_s + 2 * BQ;                          // two stages of BQ

  const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  // Blocks launch blockIdx.x fastest: by default a head's key blocks are
  // adjacent (they share the head's Q and dO in L2). HEADS_FIRST walks the
  // launch index key block by key block instead, every head's block kb
  // before any head's kb + 1: with causal (or a window) the first key blocks
  // see the most query tiles, so the longest blocks start first and the
  // short ones fill the last wave.
  int key_block = blockIdx.x, bh = blockIdx.z;
  if (HEADS_FIRST) {
    const int launch = blockIdx.z * gridDim.x + blockIdx.x;
    key_block = launch / gridDim.z;
    bh = launch % gridDim.z;
  }
  const int b = bh / Hkv, hk = bh % Hkv;
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int j0 = key_block * BKV;
  if (j0 >= seq.nk) return;
  const int j_end = min(seq.nk, j0 + BKV);
  // Row index of this head's first key (K, V, dK, dV rows of D): 32 bits, as
  // a row count of B * Hkv * Nk < 2^31 holds for any tensor a GPU can hold
  // (2^31 rows of D >= 64 halves are 256 GiB); kept 64-bit, it was one of the
  // values NVRTC spilled at D 128 beside a mask's or ALiBi's terms.
  const int kv_row = (seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  // The dK / dV writes after the tile loop read kv_row back from shared
  // memory rather than hold it in a register through the loop (D 128 with
  // ALiBi: NVRTC spilled it, the last 4 bytes); published by the barrier
  // before those writes.
  __shared__ int kv_row_s;
  if (threadIdx.x == 0) kv_row_s = kv_row;
  const float scale = fp[kScale];
  const float softcap = fp[kSoftcap];
  const int key_row = wg * 64 + warp * 16 + g;  // this thread's first key within the block (other: + 8)

  // Head-independent parts (key range, window) for the block; p_ds forms each head's own.
  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, hk * G, ip, fp, mask, alibi, bmask, key_start, key_len);
  int qlo, qhi;
  rules.query_range(j0, j_end - 1, qlo, qhi);
  // No query sees these keys (all outside the key range, or the window's):
  // dK = dV = 0, as the outputs start, and K, V are never loaded.
  if (qlo >= qhi) return;
  load_tile_swizzled<T, BKV, D, NTHREADS>(Ks, k + (long)(kv_row + j0) * D, j_end - j0);
  load_tile_swizzled<T, BKV, D, NTHREADS>(Vs, v + (long)(kv_row + j0) * D, j_end - j0);
  const int shift = seq.nk - seq.nq;
  const int first_i0 = qlo / BQ * BQ;

  // Query tiles in order (head of the group, rows); dead block-mask tiles skipped.
  // Every thread calls this together (block_tile_live synchronises).
  auto tile_live = [&](int hg, int i0) {
    if (!F::BlockMask) return true;
    const LogitRules<MT> r = make_rules<MT, F>(seq, b, hk * G + hg, ip, fp, mask, alibi, bmask, key_start, key_len);
    return block_tile_live<MT, NTHREADS>(r, i0, min(seq.nq, i0 + BQ), j0, j_end);
  };
  auto advance = [&](int& hg, int& i0) {
    do {
      i0 += BQ;
      if (i0 >= qhi) { i0 = first_i0; ++hg; }
    } while (hg < G && !tile_live(hg, i0));
  };
  auto load_tile_q = [&](int hg, int i0, int stage) {
    const long q_base = (long)(seq.tensor_batch * Hq + hk * G + hg) * NqTot + seq.q_start;
    const int valid = min(seq.nq, i0 + BQ) - i0;
    bwd_load_q_do<T, BQ, D, NTHREADS>(Qs + stage * QT_BYTES, dOs + stage * QT_BYTES, q + (q_base + i0) * D,
                                      dout + (q_base + i0) * D, valid);
    // lse and delta by cp.async too (a plain load here would hold the thread
    // until it returns, in front of the tile's work); thread r stages row r
    // and converts its lse itself once landed (stage_lse), before the barrier
    // that publishes the tile. Rows past the end: +inf lse (P = 0), delta 0.
    if (threadIdx.x < BQ) {
      const int r = threadIdx.x;
      if (r < valid) {
        bwd_cp_async4(lse_s + stage * BQ + r, lse + q_base + i0 + r);
        bwd_cp_async4(delta_s + stage * BQ + r, delta + q_base + i0 + r);
      } else {
        lse_s[stage * BQ + r] = __int_as_float(0x7f800000);
        delta_s[stage * BQ + r] = 0.f;
      }
    }
  };
  // Row threadIdx.x's staged lse, once its copy landed: lse log2(e), and +inf
  // for a fully masked row's -inf (P = 0); rows past the end hold +inf already.
  auto stage_lse = [&](int i0, int stage) {
    if (threadIdx.x < BQ && i0 + (int)threadIdx.x < seq.nq) {
      float& l = lse_s[stage * BQ + threadIdx.x];
      l = l == kNegInf ? __int_as_float(0x7f800000) : l * kLog2e;
    }
  };

  float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
  for (int r = 0; r < D / 2; ++r) dk_acc[r] = dv_acc[r] = 0.f;

  int hg = 0, i0 = first_i0;
  if (first_i0 >= qhi) hg = G;  // no query sees these keys: dK = dV = 0
  else if (!tile_live(hg, i0)) advance(hg, i0);
  if (hg < G) load_tile_q(hg, i0, 0);
  cp_async_commit();
  int stage = 0;
  const unsigned k_addr = smem_addr(Ks), v_addr = smem_addr(Vs), ds_addr = smem_addr(dSs);
  // This thread's K chunks hold a NaN or inf, checked once they landed: the
  // first tile's wait would wait for them anyway (K, V and its Q, dO are one
  // group), and checked here no "checked yet" flag is carried through the loop.
  cp_async_wait<0>();
  const bool k_bad = hg < G && own_swizzled_nonfinite<T, BKV, D, NTHREADS>(Ks);

  while (hg < G) {
    cp_async_wait<0>();
    stage_lse(i0, stage);
    fence_proxy_async();
    const int i_end = min(seq.nq, i0 + BQ);
    const bool inside_window =
        (rules.left < 0 || j0 >= i_end - 1 + shift - rules.left) &&
        (rules.right < 0 || j0 + BKV - 1 <= i0 + shift + rules.right);
    // may_drop: some pair of the tile may be dropped (not softcap / ALiBi alone).
    const bool may_drop = F::MaskKind != 0 || F::BlockMask || tile_cuts_keys<F>(rules, j0, j0 + BKV) || !inside_window;
    const bool need_rules = F::ElementRules || may_drop;
    // This tile visible; the previous tile's buffers and dS^T are free. A tile
    // that drops pairs and holds a NaN or inf in K, Q or dO forms dV, dK and
    // dQ exactly (rare): a dropped pair's zero p or dS must not meet those
    // values. V only enters dP, whose dropped entries are discarded by selection.
    // A tile without rules drops a pair only by a -inf logit, from an
    // infinite k (k_bad) or q; a row with an infinite q has a NaN or -inf lse,
    // so the rows' lse stand in for scanning Q there.
    // The staged lse (load_tile_q) is read back, not device memory: thread r
    // wrote row r's itself, so no barrier is needed, and a device load here
    // would put its latency in front of every tile's barrier. Staged, a -inf
    // or +inf lse reads +inf and a NaN stays NaN.
    bool lse_bad = false;
    if (!may_drop && threadIdx.x < BQ && i0 + (int)threadIdx.x < seq.nq)
      lse_bad = !(lse_s[stage * BQ + threadIdx.x] < __int_as_float(0x7f800000));
    const bool exact = __syncthreads_or(
        k_bad || (may_drop ? own_swizzled_nonfinite<T, BQ, D, NTHREADS>(Qs + stage * QT_BYTES) ||
                                 own_swizzled_nonfinite<T, BQ, D, NTHREADS>(dOs + stage * QT_BYTES)
                           : lse_bad)) != 0;
    int hn = hg, in = i0;
    advance(hn, in);
    if (hn < G) load_tile_q(hn, in, stage ^ 1);
    cp_async_commit();

    const int h = hk * G + hg;
    // ALiBi: this head's slope, read with the tile's other per-head values so
    // that only the float is live at the logit rule, not its index terms
    // (NVRTC spilled those at D 128).
    const float slope_h = F::Alibi ? alibi[b * Hq + h] : 0.f;
    const long q_base = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start;
    const unsigned q_addr = smem_addr(Qs + stage * QT_BYTES), do_addr = smem_addr(dOs + stage * QT_BYTES);
    const float* lse_t = lse_s + stage * BQ;
    const float* delta_t = delta_s + stage * BQ;

    // S^T = K_w Q^T and dP^T = V_w dO^T (64 keys x BQ queries each). Declared
    // per tile: the first k-step overwrites them, so nothing is carried over.
    float st[BQ / 2], dpt[BQ / 2];
    unsigned pp[BQ / 16][4], pd[BQ / 16][4];
    // Descriptors formed per k-step from 32-bit addresses (ptxas folds the
    // constant fields): 64-bit descriptors formed once and offset instead
    // kept live cost the softcap + rules instance 92/160 bytes of spills.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const unsigned a_off = (kk / 4) * (BKV * 128) + wg * 64 * 128 + (kk % 4) * 32;
      const unsigned b_off = (kk / 4) * (BQ * 128) + (kk % 4) * 32;
      Wgmma<T, BQ>::template ss<0, 0>(st, wgmma_desc(k_addr + a_off, 16, 1024), wgmma_desc(q_addr + b_off, 16, 1024),
                                      kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const unsigned a_off = (kk / 4) * (BKV * 128) + wg * 64 * 128 + (kk % 4) * 32;
      const unsigned b_off = (kk / 4) * (BQ * 128) + (kk % 4) * 32;
      Wgmma<T, BQ>::template ss<0, 0>(dpt, wgmma_desc(v_addr + a_off, 16, 1024),
                                      wgmma_desc(do_addr + b_off, 16, 1024), kk > 0);
    }
    wgmma_commit();
    // P^T with the logit rules where the tile needs them, then dS^T; a
    // dropped pair gets p = dS = 0 by selection (its logit is -inf, but the
    // row's lse or dP may be NaN). Two instances: the plain one for tiles that
    // neither apply rules nor run exact (most tiles), and the marking one;
    // one loop with run-time selects costs ptxas the registers it then spills.
    auto p_ds = [&](auto marking) {
      constexpr bool kMarks = decltype(marking)::value;
      // This head's rules, formed here rather than before the S^T and dP^T
      // products: live only in this loop, not beside those accumulators.
      LogitRules<MT> hr = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
      if (F::Alibi) hr.slope = slope_h;
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int jj = key_row + (c >= 2 ? 8 : 0);
          const int ii = n * 8 + 2 * t + (c & 1);
          if (!kMarks) {  // no rules, no marks: st holds P^T already
            dpt[4 * n + c] = st[4 * n + c] * (dpt[4 * n + c] - delta_t[ii]);
            continue;
          }
          float x = st[4 * n + c] * scale;
          float cap_grad = 1.f;
          if (need_rules) {
            float capped = 0.f;
            x = apply_rules<F>(hr, x, i0 + ii, j0 + jj, capped);
            if (F::Softcap) {
              const float u = capped / softcap;
              cap_grad = 1.f - u * u;
            }
          }
          // A dropped pair: p = dS = -0.0, the mark the exact products read back.
          const bool dropped = kMarks && x == kNegInf;
          const float p = dropped ? -0.f : exp2_ftz(x * kLog2e - lse_t[ii]);
          st[4 * n + c] = p;
          // Kept: + 0.f turns a -0.0 dS into +0.0, so the mark stays unambiguous.
          const float ds = p * (dpt[4 * n + c] - delta_t[ii]) * cap_grad;
          dpt[4 * n + c] = dropped ? -0.f : ds + 0.f;
        }
      }
    };
    const float scale_log2 = scale * kLog2e;
    // Tiles without rules or marks (most): P^T = 2^(S^T scale log2(e) - lse)
    // as soon as S^T is done, while the dP^T products still run.
    const bool plain = !(need_rules || exact);
    wgmma_wait<1>();
    wgmma_pin(st);
    if (plain) {
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          st[4 * n + c] = exp2_ftz(fmaf(st[4 * n + c], scale_log2, -lse_t[n * 8 + 2 * t + (c & 1)]));
    }
    wgmma_wait<0>();
    wgmma_pin(st);
    wgmma_pin(dpt);

    if (plain) p_ds(BoolConst<false>{});
    else p_ds(BoolConst<true>{});
    if constexpr (kEarly) {
      // P^T's A fragments, then dV (unless the tile is exact), before dS^T is
      // packed and stored and the barrier before dQ.
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) wgmma_a_fragment<T>(pp[kk], st, kk);
      wgmma_pin(dv_acc);
      wgmma_pin(pp);
      if (!exact) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk)
          Wgmma<T, D>::template rs<1>(dv_acc, pp[kk], wgmma_desc(do_addr + kk * 16 * 128, BQ * 128, 1024), 1);
        wgmma_commit();
      }
    }
    // A fragments of P^T and dS^T; dS^T also into shared memory ([key][query],
    // swizzled: read MN-major as the A operand of dQ = dS K).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      if constexpr (!kEarly) wgmma_a_fragment<T>(pp[kk], st, kk);  // (kEarly: packed above)
      wgmma_a_fragment<T>(pd[kk], dpt, kk);
      // Query columns 16kk + 2t (+1) and 16kk + 8 + 2t (+1): chunks 2kk and 2kk + 1.
      const int r0 = key_row, r1 = key_row + 8;
      *reinterpret_cast<unsigned*>(dSs + swizzled_offset<BKV>(r0, 2 * kk) + 4 * t) = pd[kk][0];
      *reinterpret_cast<unsigned*>(dSs + swizzled_offset<BKV>(r1, 2 * kk) + 4 * t) = pd[kk][1];
      *reinterpret_cast<unsigned*>(dSs + swizzled_offset<BKV>(r0, 2 * kk + 1) + 4 * t) = pd[kk][2];
      *reinterpret_cast<unsigned*>(dSs + swizzled_offset<BKV>(r1, 2 * kk + 1) + 4 * t) = pd[kk][3];
      if (exact) {  // P^T for the exact dV below (read back from shared memory, not registers)
        *reinterpret_cast<unsigned*>(Ps + swizzled_offset<BKV>(r0, 2 * kk) + 4 * t) = pp[kk][0];
        *reinterpret_cast<unsigned*>(Ps + swizzled_offset<BKV>(r1, 2 * kk) + 4 * t) = pp[kk][1];
        *reinterpret_cast<unsigned*>(Ps + swizzled_offset<BKV>(r0, 2 * kk + 1) + 4 * t) = pp[kk][2];
        *reinterpret_cast<unsigned*>(Ps + swizzled_offset<BKV>(r1, 2 * kk + 1) + 4 * t) = pp[kk][3];
      }
    }

    // dV += P^T dO and dK += dS^T Q: B operands MN-major (LBO: the next 64 dims).
    // D = 128 (kDkLast): three groups in order, dV, then (after the barrier
    // that publishes dS^T) dQ, then dK; waiting for all but the last lets
    // dQ's stores run while the dK products still do. D = 64, where only
    // warpgroup 0 forms dQ: dV and dK first, as one group; issuing dK after
    // a dQ that one warpgroup skips made ptxas serialise every wgmma of the
    // kernel (a wait after each: 24 of 24).
    constexpr bool kDkLast = D == 128;
    if constexpr (!kEarly) {  // (kEarly: dV may be in flight; a pin reads to ptxas as a write, serialising wgmma)
      wgmma_pin(dv_acc);
      wgmma_pin(pp);
    }
    wgmma_pin(dk_acc);
    wgmma_pin(pd);
    // (kEarly: dV issued already; at D 128 nothing is left for this group.)
    if (!exact && !(kEarly && kDkLast)) {  // (exact tiles: below, once no wgmma is in flight)
      wgmma_fence();
      if constexpr (!kEarly) {
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk)
          Wgmma<T, D>::template rs<1>(dv_acc, pp[kk], wgmma_desc(do_addr + kk * 16 * 128, BQ * 128, 1024), 1);
      }
      if (!kDkLast) {
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk)
          Wgmma<T, D>::template rs<1>(dk_acc, pd[kk], wgmma_desc(q_addr + kk * 16 * 128, BQ * 128, 1024), 1);
      }
      wgmma_commit();
    }

    // dQ[:, 64w..64w+63] = dS K over the block's 128 keys, once both halves of
    // dS^T are in place (D = 64: warpgroup 0 forms all 64 dims).
    fence_proxy_async();
    __syncthreads();
    if (exact && (D == 128 || wg == 0)) {
      // Exact dQ (dropped pairs, dS = -0.0, skipped) in its own registers:
      // non-wgmma writes to the wgmma accumulator below would serialise wgmma.
      float dqx[BQ / 2];
#pragma unroll
      for (int r = 0; r < BQ / 2; ++r) dqx[r] = 0.f;
#pragma unroll 1
      for (int j = 0; j < BKV; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float ds = swizzled_at<T, BKV>(dSs, j, warp * 16 + g + 8 * half);
          if (__float_as_uint(ds) == kDroppedBits) continue;
#pragma unroll
          for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              dqx[4 * n + 2 * half + e] += ds * swizzled_at<T, BKV>(Ks, j, wg * 64 + 8 * n + 2 * t + e);
        }
      }
      bwd_dq_atomic_add<D, DQ_V4>(dq_acc + q_base * D, i0 + warp * 16 + g, seq.nq, wg * 64 + 2 * t, dqx, scale);
    } else if (!exact) {
      float dq[BQ / 2];
      if (D == 128 || wg == 0) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BKV / 16; ++kk)
          Wgmma<T, 64>::template ss<1, 1>(dq, wgmma_desc(ds_addr + kk * 16 * 128, BKV * 128, 1024),
                                          wgmma_desc(k_addr + wg * (BKV * 128) + kk * 16 * 128, BKV * 128, 1024),
                                          kk > 0);
        wgmma_commit();
      }
      if (kDkLast) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk)
          Wgmma<T, D>::template rs<1>(dk_acc, pd[kk], wgmma_desc(q_addr + kk * 16 * 128, BQ * 128, 1024), 1);
        wgmma_commit();
      }
      if (D == 128 || wg == 0) {
        // D = 128: dV and dQ done, dK may still run; D = 64: all done.
        if (kDkLast) wgmma_wait<1>();
        else wgmma_wait<0>();
        wgmma_pin(dq);
        // Rows warp * 16 + g (+ 8) of this tile, dims 64w + 8n + 2t (+1).
        bwd_dq_atomic_add<D, DQ_V4>(dq_acc + q_base * D, i0 + warp * 16 + g, seq.nq, wg * 64 + 2 * t, dq, scale);
      }
    }
    wgmma_wait<0>();
    wgmma_pin(dv_acc);
    wgmma_pin(dk_acc);
    wgmma_pin(pp);
    wgmma_pin(pd);
    if (exact) {
      // dV += P^T dO and dK += dS^T Q exactly, after the pipeline drained,
      // reading P^T and dS^T (marked -0.0 where dropped) back from shared
      // memory: a product that keeps the packed fragments live, or shuffles
      // them, next to both accumulators makes ptxas serialise every wgmma of
      // the kernel (silently: no C7515), which cost the whole backward ~35%.
      const unsigned char* q_tile = Qs + stage * QT_BYTES;
      const unsigned char* do_tile = dOs + stage * QT_BYTES;
#pragma unroll 1
      for (int i = 0; i < BQ; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float p = swizzled_at<T, BKV>(Ps, key_row + 8 * half, i);
          const float ds = swizzled_at<T, BKV>(dSs, key_row + 8 * half, i);
          const bool keep_p = __float_as_uint(p) != kDroppedBits, keep_ds = __float_as_uint(ds) != kDroppedBits;
#pragma unroll
          for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int d = 8 * n + 2 * t + e;
              if (keep_p) dv_acc[4 * n + 2 * half + e] += p * swizzled_at<T, BQ>(do_tile, i, d);
              if (keep_ds) dk_acc[4 * n + 2 * half + e] += ds * swizzled_at<T, BQ>(q_tile, i, d);
            }
        }
      }
      wgmma_pin(dv_acc);
      wgmma_pin(dk_acc);
    }
    stage ^= 1;
    hg = hn;
    i0 = in;
  }
  cp_async_wait<0>();

  // This thread's two key rows of dK (scaled) and dV.
  __syncthreads();  // kv_row_s (once a block)
  const int kv_row_out = *static_cast<volatile int*>(&kv_row_s);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = j0 + key_row + 8 * half;
    if (j >= seq.nk) continue;
    T* dk_row = dk + (long)(kv_row_out + j) * D + 2 * t;
    T* dv_row = dv + (long)(kv_row_out + j) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<unsigned*>(dk_row + 8 * n) =
          pack2<T>(dk_acc[4 * n + 2 * half] * scale, dk_acc[4 * n + 2 * half + 1] * scale);
      *reinterpret_cast<unsigned*>(dv_row + 8 * n) = pack2<T>(dv_acc[4 * n + 2 * half], dv_acc[4 * n + 2 * half + 1]);
    }
  }
}

}  // namespace mlx_flash
