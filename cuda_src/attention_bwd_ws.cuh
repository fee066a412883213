// Hopper (sm_90a) FlashAttention-2 backward, warp-specialised: the algorithm
// and the consumers' tile work of attention_bwd_wgmma.cuh (read it first),
// fp16/bf16, Dqk = Dv in {64, 128}, dense batches with causal / window rules
// only (no masks, block masks, softcap, ALiBi, varlen or key ranges: those
// calls run attention_bwd_wgmma). Opt-in (MLX_FLASH_BWD_WS=1).
//
// A block of 384 threads owns BKV = 128 keys of one key/value head:
//   * warps 0-7: two consumer warpgroups (keys 64w..64w+63), exactly the
//     products of attention_bwd_wgmma; K and V load once at the start;
//   * warp 8: the producer; it streams each query tile's Q and dO (cp.async,
//     swizzled) and its lse and delta rows (4-byte cp.async) into a ring of
//     STAGES buffers, ahead of the consumers by up to STAGES - 1 tiles;
//   * warp 9, with DQW (MLX_FLASH_BWD_WS_DQ=1): the dQ writer (below);
//     the other producer warps have no work and leave.
// Each ring buffer has a "full" mbarrier (64 arrivals: the producer lanes'
// cp.async completions, counted by cp.async.mbarrier.arrive.noinc, and their
// plain arrivals after storing the rows past the end) and an "empty" one (8:
// one a consumer warp, once its reads of the buffer are done). The consumers
// convert lse (lse log2(e), +inf for -inf) before their first barrier of the
// tile, as attention_bwd_wgmma does. They never wait on a load they issued,
// and never on a block-wide barrier: their two per-tile barriers (the
// exact-tile vote, which also frees dS^T, and the one that publishes dS^T to
// dQ's product) are named barriers over the 256 consumer threads.
// setmaxnreg moves registers from the producer warpgroup (24) to the
// consumers (240): the D 128 tile work needs about as many as the 256-thread
// kernel had (255). dQ is added with the same float2 atomics, or (DQW) staged
// in shared memory by the consumers and added by warp 9 with bulk async
// reductions, as FlashAttention 3 does.
//
// Registers: the launch bound (384 threads, one block per SM) gives 168 per
// thread before setmaxnreg; a __launch_bounds__ declaration of each instance
// MLX builds sits at the end of this header (MLX writes the declaration).
#pragma once

#include "attention_bwd_wgmma.cuh"
#include "mbarrier.cuh"
#include "tma.cuh"

namespace mlx_flash {

// Row pitch of the dQ staging (DQW), in floats: D + 8, so that the rows g =
// 0..3 of a half-warp's float2 stores start 8 banks apart (D + 4 would put
// rows g and g + 1 two float2 apart: a two-way conflict).
__host__ __device__ constexpr int bwd_ws_dq_pitch(int d) { return d + 8; }

// Shared memory of the warp-specialised backward (bytes): K, V [128][D];
// STAGES buffers of Q and dO [64][D] and of lse and delta [64]; dS^T and P^T
// [128][64]; 2 STAGES + 2 mbarriers; with dqw, the dQ staging [64][pitch]
// floats; 1 KiB alignment slack.
__host__ __device__ constexpr int bwd_ws_smem(int d, int stages, bool dqw = false) {
  return 2 * (2 * 128 * d + stages * 2 * 64 * d + 2 * 128 * 64) + stages * 2 * 64 * 4 + (stages * 2 + 2) * 8 +
         (dqw ? 64 * bwd_ws_dq_pitch(d) * 4 + 16 : 0) + 1024;
}

// Stages a warp's 16 x 64 part of a query tile's dQ (times scale) in the
// [64][pitch] float tile `stage` (the fragment layout of bwd_dq_atomic_add:
// rows row, row + 8 of the tile, dims col + 8n + e).
template <int D>
__device__ __forceinline__ void bwd_ws_dq_stage(float* stage, int row, int col, const float (&acc)[32], float scale) {
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int n = 0; n < 8; ++n)
      *reinterpret_cast<float2*>(stage + (row + 8 * half) * bwd_ws_dq_pitch(D) + col + 8 * n) =
          make_float2(acc[4 * n + 2 * half] * scale, acc[4 * n + 2 * half + 1] * scale);
}

// The element type of a kernel's q pointer, and whether it is bfloat16 (the
// BF16 template value, which only tells MLX's kernel names apart, must agree).
template <class P> struct BwdWsElem;
template <class X> struct BwdWsElem<const X*> {
  using type = X;
  static constexpr bool bf16 = false;
};
template <> struct BwdWsElem<const __nv_bfloat16*> {
  using type = __nv_bfloat16;
  static constexpr bool bf16 = true;
};

// Named barrier 1 over the 256 consumer threads (the producer warp never joins).
__device__ __forceinline__ void bwd_ws_consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
// The same barrier, returning whether any consumer thread passed p true.
__device__ __forceinline__ int bwd_ws_consumers_or(bool p) {
  unsigned r;
  asm volatile(
      "{\n .reg .pred p;\n .reg .pred q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, 256, p;\n"
      " selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r) : "r"((unsigned)p) : "memory");
  return (int)r;
}
// An arrival on `bar` once this thread's earlier cp.async copies landed
// (.noinc: counted in the barrier's expected arrivals).
__device__ __forceinline__ void bwd_ws_cp_async_arrive(void* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Rows [0, valid) of a row-major [*, D] global tile into a swizzled [64][D]
// shared tile by one warp's cp.async (chunk c = lane + 32 it); rows past
// `valid` are zeros.
template <typename T, int D>
__device__ __forceinline__ void bwd_ws_load_q_tile(unsigned char* dst, const T* src, int valid, int lane) {
  constexpr int CHUNKS = D / 8;
#pragma unroll 4
  for (int it = 0; it < 64 * CHUNKS / 32; ++it) {
    const int c = lane + 32 * it, row = c / CHUNKS, chunk = c % CHUNKS;
    const bool ok = row < valid;
    cp_async16(dst + swizzled_offset<64>(row, chunk), ok ? src + row * D + chunk * 8 : src, ok);
  }
}

template <typename T, class F, int D, int STAGES, bool HEADS_FIRST, bool DQW>
__device__ void attention_bwd_ws(const T* q, const T* k, const T* v, const int* ip, const float* fp, const T* dout,
                                 const float* lse, const float* delta, float* dq_acc, T* dk, T* dv) {
  static_assert(D == 64 || D == 128, "warp-specialised backward: head dim 64 or 128");
  static_assert(!F::ElementRules && !F::Varlen && !F::KeyRange, "warp-specialised backward: causal / window only");
  static_assert(STAGES >= 2, "two ring buffers at least");
  using MT = float;  // no mask
  constexpr int BKV = 128, BQ = 64, NTHREADS = 256;  // NTHREADS: the consumers
  constexpr int KV_BYTES = BKV * D * 2, QT_BYTES = BQ * D * 2, DS_BYTES = BKV * BQ * 2;
  // setmaxnreg counts (2 x 128 x consumer + 128 x producer <= 64 Ki): the dQ
  // writer's loop spilled at 24 (8-28 bytes), so DQW gives the producer
  // warpgroup 40 and the consumers 232.
  constexpr int kProducerRegs = DQW ? 40 : 24, kConsumerRegs = DQW ? 232 : 240;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Ks = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* Vs = Ks + KV_BYTES;
  unsigned char* Qs = Vs + KV_BYTES;            // STAGES buffers
  unsigned char* dOs = Qs + STAGES * QT_BYTES;  // STAGES buffers
  unsigned char* dSs = dOs + STAGES * QT_BYTES; // dS^T [key][query], swizzled
  unsigned char* Ps = dSs + DS_BYTES;           // P^T [key][query], swizzled (exact tiles)
  float* lse_s = reinterpret_cast<float*>(Ps + DS_BYTES);  // STAGES x BQ
  float* delta_s = lse_s + STAGES * BQ;                     // STAGES x BQ
  unsigned long long* full = reinterpret_cast<unsigned long long*>(delta_s + STAGES * BQ);
  unsigned long long* empty = full + STAGES;
  // DQW: dQ staged by the consumers, added to global memory by warp 9.
  unsigned long long* dq_full = empty + STAGES;  // 8 arrivals (a consumer warp each): the tile's dQ is staged
  unsigned long long* dq_empty = dq_full + 1;    // 32: warp 9's reductions have read it
  // 16-byte aligned for the bulk copies (the offset is a multiple of 16 at
  // 2 and 3 buffers; rounded up anyway, within the smem's 16 spare bytes).
  float* dq_stage = reinterpret_cast<float*>((reinterpret_cast<unsigned long long>(dq_empty + 1) + 15) & ~15ull);

  const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  // Block order as attention_bwd_wgmma (HEADS_FIRST: key block by key block).
  int key_block = blockIdx.x, bh = blockIdx.z;
  if (HEADS_FIRST) {
    const int launch = blockIdx.z * gridDim.x + blockIdx.x;
    key_block = launch / gridDim.z;
    bh = launch % gridDim.z;
  }
  const int b = bh / Hkv, hk = bh % Hkv;
  const Sequence seq = sequence_of<false>(b, ip, nullptr, nullptr);
  const int j0 = key_block * BKV;
  if (j0 >= seq.nk) return;
  const int j_end = min(seq.nk, j0 + BKV);
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];
  const float softcap = fp[kSoftcap];
  const int key_row = wg * 64 + warp * 16 + g;  // this thread's first key within the block (other: + 8)

  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, hk * G, ip, fp, nullptr, nullptr, nullptr);
  int qlo, qhi;
  rules.query_range(j0, j_end - 1, qlo, qhi);
  // No query sees these keys: dK = dV = 0, as the outputs start (every thread leaves together).
  if (qlo >= qhi) return;
  const int shift = seq.nk - seq.nq;
  const int first_i0 = qlo / BQ * BQ;
  // Tiles in order: head of the group hg = n / per_head, rows first_i0 + BQ (n % per_head).
  const int per_head = (qhi - first_i0 + BQ - 1) / BQ, tiles = G * per_head;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 64);
      mbar_init(&empty[s], NTHREADS / 32);
    }
    mbar_init(dq_full, NTHREADS / 32);
    mbar_init(dq_empty, 32);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the only block-wide barrier: the mbarriers exist

  if (wg == 2) {
    setmaxnreg_dec<kProducerRegs>();
    if (DQW && warp == 1) {
      // dQ writer: each staged tile added to the float32 dQ by bulk async
      // reductions (the copy engine's adds in L2), a row a lane op; the
      // staging is handed back once they have read it.
#pragma unroll 1
      for (int n = 0; n < tiles; ++n) {
        mbar_wait(dq_full, n & 1);
        const int hg = n / per_head, i0 = first_i0 + (n % per_head) * BQ;
        const long q_base = (long)(seq.tensor_batch * Hq + hk * G + hg) * NqTot + seq.q_start;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane + 32 * half;
          if (i0 + r < seq.nq)
            bwd_bulk_reduce_add_f32(dq_acc + (q_base + i0 + r) * D, dq_stage + r * bwd_ws_dq_pitch(D), D * 4);
        }
        bwd_bulk_commit();
        bwd_bulk_wait_read();
        mbar_arrive(dq_empty);
      }
      bwd_bulk_wait();  // complete before the block's shared memory goes
      return;
    }
    if (warp != 0) return;
#pragma unroll 1
    for (int n = 0; n < tiles; ++n) {
      const int s = n % STAGES;
      // A fresh barrier counts its phase "before 0" (parity 1) as complete.
      mbar_wait(&empty[s], ((n / STAGES) & 1) ^ 1);
      const int hg = n / per_head, i0 = first_i0 + (n % per_head) * BQ;
      const long q_base = (long)(seq.tensor_batch * Hq + hk * G + hg) * NqTot + seq.q_start;
      const int valid = min(seq.nq, i0 + BQ) - i0;
      bwd_ws_load_q_tile<T, D>(Qs + s * QT_BYTES, q + (q_base + i0) * D, valid, lane);
      bwd_ws_load_q_tile<T, D>(dOs + s * QT_BYTES, dout + (q_base + i0) * D, valid, lane);
      // lse and delta rows by cp.async too, two a lane (plain loads held this
      // warp for their latency every tile, which, with the consumers' dQ
      // atomics in L2, cost more than a tile); the consumers convert lse
      // (stage_lse). Rows past the end: +inf lse (P = 0), delta 0.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = lane + 32 * half;
        if (r < valid) {
          bwd_cp_async4(lse_s + s * BQ + r, lse + q_base + i0 + r);
          bwd_cp_async4(delta_s + s * BQ + r, delta + q_base + i0 + r);
        } else {
          lse_s[s * BQ + r] = __int_as_float(0x7f800000);
          delta_s[s * BQ + r] = 0.f;
        }
      }
      bwd_ws_cp_async_arrive(&full[s]);
      mbar_arrive(&full[s]);  // (after the stores of the rows past the end)
    }
    cp_async_wait<0>();
    return;
  }
  setmaxnreg_inc<kConsumerRegs>();

  load_tile_swizzled<T, BKV, D, NTHREADS>(Ks, k + (kv_base + j0) * D, j_end - j0);
  load_tile_swizzled<T, BKV, D, NTHREADS>(Vs, v + (kv_base + j0) * D, j_end - j0);
  cp_async_commit();

  float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
  for (int r = 0; r < D / 2; ++r) dk_acc[r] = dv_acc[r] = 0.f;

  const unsigned k_addr = smem_addr(Ks), v_addr = smem_addr(Vs), ds_addr = smem_addr(dSs);
  bool k_bad = false;  // this thread's K chunks hold a NaN or inf (checked once they landed)
  bool k_checked = false;

#pragma unroll 1
  for (int n = 0; n < tiles; ++n) {
    const int stage = n % STAGES;
    const int hg = n / per_head, i0 = first_i0 + (n % per_head) * BQ;
    if (n == 0) cp_async_wait<0>();  // K and V (published by the first tile's vote below)
    mbar_wait(&full[stage], (n / STAGES) & 1);
    fence_proxy_async();  // the landed tiles, visible to wgmma's async proxy
    // Row threadIdx.x's lse as lse log2(e), +inf for a fully masked row's
    // -inf (P = 0); rows past the end hold +inf already. Published to the
    // other consumers by the vote barrier below, before any of them reads it.
    if (threadIdx.x < BQ && i0 + (int)threadIdx.x < seq.nq) {
      float& l = lse_s[stage * BQ + threadIdx.x];
      l = l == kNegInf ? __int_as_float(0x7f800000) : l * kLog2e;
    }
    const int i_end = min(seq.nq, i0 + BQ);
    const bool inside_window =
        (rules.left < 0 || j0 >= i_end - 1 + shift - rules.left) &&
        (rules.right < 0 || j0 + BKV - 1 <= i0 + shift + rules.right);
    // may_drop: some pair of the tile may be dropped (not softcap / ALiBi alone).
    const bool may_drop = F::MaskKind != 0 || F::BlockMask || tile_cuts_keys<F>(rules, j0, j0 + BKV) || !inside_window;
    const bool need_rules = F::ElementRules || may_drop;
    if (!k_checked) {
      k_bad = own_swizzled_nonfinite<T, BKV, D, NTHREADS>(Ks);
      k_checked = true;
    }
    // This tile visible; the previous tile's buffers and dS^T are free. A tile
    // that drops pairs and holds a NaN or inf in K, Q or dO forms dV, dK and
    // dQ exactly (rare): a dropped pair's zero p or dS must not meet those
    // values. V only enters dP, whose dropped entries are discarded by selection.
    // A tile without rules drops a pair only by a -inf logit, from an
    // infinite k (k_bad) or q; a row with an infinite q has a NaN or -inf lse,
    // so the rows' lse stand in for scanning Q there.
    // The staged lse (the producer's) is read back, not device memory: the full
    // barrier published it, and a device load here would put its latency in
    // front of every tile's barrier. Staged, a -inf
    // or +inf lse reads +inf and a NaN stays NaN.
    bool lse_bad = false;
    if (!may_drop && threadIdx.x < BQ && i0 + (int)threadIdx.x < seq.nq)
      lse_bad = !(lse_s[stage * BQ + threadIdx.x] < __int_as_float(0x7f800000));
    const bool exact = bwd_ws_consumers_or(
        k_bad || (may_drop ? own_swizzled_nonfinite<T, BQ, D, NTHREADS>(Qs + stage * QT_BYTES) ||
                                 own_swizzled_nonfinite<T, BQ, D, NTHREADS>(dOs + stage * QT_BYTES)
                           : lse_bad)) != 0;

    const int h = hk * G + hg;
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

    // P^T with the logit rules where the tile needs them, then dS^T; a
    // dropped pair gets p = dS = 0 by selection (its logit is -inf, but the
    // row's lse or dP may be NaN). Two instances: the plain one for tiles that
    // neither apply rules nor run exact (most tiles), and the marking one;
    // one loop with run-time selects costs ptxas the registers it then spills.
    auto p_ds = [&](auto marking) {
      constexpr bool kMarks = decltype(marking)::value;
      // This head's rules, formed here rather than before the S^T and dP^T
      // products: live only in this loop, not beside those accumulators.
      const LogitRules<MT> hr = make_rules<MT, F>(seq, b, h, ip, fp, nullptr, nullptr, nullptr);
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
    if (plain) p_ds(BoolConst<false>{});
    else p_ds(BoolConst<true>{});
    // A fragments of P^T and dS^T; dS^T also into shared memory ([key][query],
    // swizzled: read MN-major as the A operand of dQ = dS K).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      wgmma_a_fragment<T>(pp[kk], st, kk);  // (attention_fwd_wgmma.cuh)
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
    wgmma_pin(dv_acc);
    wgmma_pin(dk_acc);
    wgmma_pin(pp);
    wgmma_pin(pd);
    if (!exact) {  // (exact tiles: below, once no wgmma is in flight)
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk)
        Wgmma<T, D>::template rs<1>(dv_acc, pp[kk], wgmma_desc(do_addr + kk * 16 * 128, BQ * 128, 1024), 1);
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
    bwd_ws_consumers_sync();
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
      if (DQW) {
        mbar_wait(dq_empty, (n & 1) ^ 1);
        bwd_ws_dq_stage<D>(dq_stage, warp * 16 + g, wg * 64 + 2 * t, dqx, scale);
      } else {
        bwd_dq_atomic_add<D>(dq_acc + q_base * D, i0 + warp * 16 + g, seq.nq, wg * 64 + 2 * t, dqx, scale);
      }
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
        if (DQW) {
          mbar_wait(dq_empty, (n & 1) ^ 1);  // warp 9 has read the previous tile's staging
          bwd_ws_dq_stage<D>(dq_stage, warp * 16 + g, wg * 64 + 2 * t, dq, scale);
        } else {
          bwd_dq_atomic_add<D>(dq_acc + q_base * D, i0 + warp * 16 + g, seq.nq, wg * 64 + 2 * t, dq, scale);
        }
      }
    }
    if (DQW) {  // every consumer warp, staged or not (D 64: warpgroup 1 forms no dQ)
      fence_proxy_async();  // the staged rows, visible to the bulk copies' async proxy
      __syncwarp();
      if (lane == 0) mbar_arrive(dq_full);
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
    // This warp's reads of the buffer are done (its warpgroup's products
    // retired at wgmma_wait<0> above; the exact path's loads before it): one
    // arrival a warp, not 256 single-thread arrivals on one word.
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage]);
  }

  // This thread's two key rows of dK (scaled) and dV.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = j0 + key_row + 8 * half;
    if (j >= seq.nk) continue;
    T* dk_row = dk + (kv_base + j) * D + 2 * t;
    T* dv_row = dv + (kv_base + j) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<unsigned*>(dk_row + 8 * n) =
          pack2<T>(dk_acc[4 * n + 2 * half] * scale, dk_acc[4 * n + 2 * half + 1] * scale);
      *reinterpret_cast<unsigned*>(dv_row + 8 * n) = pack2<T>(dv_acc[4 * n + 2 * half], dv_acc[4 * n + 2 * half + 1]);
    }
  }
}

}  // namespace mlx_flash

// The launch bound of every instance the backend builds (see the top): MLX
// names a kernel "custom_kernel_mlx_flash_attention_bwd_ws" followed by its
// template values (BF16, D, WINDOW, STAGES, HEADS_FIRST, DQW as _t/_f and numbers)
// and declares its parameters as below (inputs q, k, v, ip, fp, dout, lse,
// delta; outputs dq_acc, dk, dv).
#define MLX_FLASH_BWD_WS_DECLARE(SUFFIX, TT)                                                                \
  __global__ void __launch_bounds__(384, 1) custom_kernel_mlx_flash_attention_bwd_ws##SUFFIX(            \
      const TT* q, const TT* k, const TT* v, const int* ip, const float* fp, const TT* dout,                 \
      const float* lse, const float* delta, float* dq_acc, TT* dk, TT* dv);
// (STAGES, DQW) pairs the backend uses: (3, f) and (2, t).
#define MLX_FLASH_BWD_WS_DECLARE_W(B, TT, D, W)                                                            \
  MLX_FLASH_BWD_WS_DECLARE(_##B##_##D##_##W##_3_f_f, TT) MLX_FLASH_BWD_WS_DECLARE(_##B##_##D##_##W##_3_t_f, TT) \
  MLX_FLASH_BWD_WS_DECLARE(_##B##_##D##_##W##_2_f_t, TT) MLX_FLASH_BWD_WS_DECLARE(_##B##_##D##_##W##_2_t_t, TT)
#define MLX_FLASH_BWD_WS_DECLARE_D(B, TT, D) MLX_FLASH_BWD_WS_DECLARE_W(B, TT, D, f) MLX_FLASH_BWD_WS_DECLARE_W(B, TT, D, t)
namespace mlx::core::cu {
MLX_FLASH_BWD_WS_DECLARE_D(f, __half, 64)
MLX_FLASH_BWD_WS_DECLARE_D(f, __half, 128)
MLX_FLASH_BWD_WS_DECLARE_D(t, __nv_bfloat16, 64)
MLX_FLASH_BWD_WS_DECLARE_D(t, __nv_bfloat16, 128)
}  // namespace mlx::core::cu
#undef MLX_FLASH_BWD_WS_DECLARE_W
#undef MLX_FLASH_BWD_WS_DECLARE_D
#undef MLX_FLASH_BWD_WS_DECLARE
