// matmul2d on Hopper (sm_90a) warpgroup tensor cores:
//   out = (dequant(a) * a_scale) @ (dequant(b) * b_scale), fp32 accumulation.
//
// One block of two warpgroups computes a 128 x BN output tile (BN 128 or 256);
// warpgroup w owns rows 64w..64w+63 and issues m64nBN wgmma on operands in
// shared memory (128-byte swizzled atoms, wgmma.cuh). Every thread both loads
// (cp.async, zero-filled outside the operands, so edge tiles are exact) and
// computes; a stage holds 128 bytes of K per row (64 16-bit values or 128 fp8
// codes) and STAGES stages form a ring. The wgmma of stage kt runs while the
// copies of stages kt+1 .. kt+STAGES-2 are in flight: at most two stages are
// read by tensor cores at once (wgmma_wait<1>), so the ring keeps two stages
// more than it prefetches.
//
// 16-bit wgmma (k16, type C; NATIVE false): a 16-bit operand lands by cp.async
//   straight into its swizzled tile (b [N][K] K-major, or [K][N] read MN-major
//   by wgmma itself, no transpose copy); an fp8 operand lands as raw codes and
//   is decoded exactly to C into one of two swizzled buffers (A_CVT / B_CVT),
//   so fp32 accumulation stays exact for every operand combination.
// Native fp8 wgmma (k32, NATIVE: a and b fp8, any e4m3/e5m2 pair): both
//   K-major (the wrapper transposes a [K][N] b once). Hopper's fp8 wgmma adds
//   with a 13-bit mantissa (truncating), so this mode is approximate: with
//   PROMOTE > 0 the tensor-core sums restart every PROMOTE stages (128 K
//   each) and are added to fp32 registers (two-level accumulation).
// TMA (16-bit and native fp8 only): stage tiles arrive by the tensor memory
// accelerator (tma.cuh) instead of per-thread cp.async, issued by one thread
// and awaited on one mbarrier per stage; the ring and its reuse rule stay.
// The wrapper pads K to a multiple of 16 and N to a multiple of 16 (every
// 16-byte chunk wholly inside or outside an operand); M is free.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_gemm.cuh"

namespace mlx_flash {

// Slots of the int32 parameter array (same as matmul.cuh's first seven).
enum MatmulWgParam { kWgM = 0, kWgN, kWgK, kWgBBatched, kWgAScaleBatched, kWgAScaleRows, kWgBScaleCols };

constexpr int kWgBM = 128, kWgGroupM = 8;

// Shared memory (bytes) of one block: the stage ring (A + B; raw codes of a
// decoded operand take half a 16-bit tile), two decoded tiles per decoded
// operand, 1 KiB for alignment.
__host__ __device__ constexpr int matmul_wgmma_smem(int bn, int stages, bool convert_a, bool convert_b) {
  return stages * (kWgBM * (convert_a ? 64 : 128) + bn * (convert_b ? 64 : 128)) + (convert_a ? 2 * kWgBM * 128 : 0) +
         (convert_b ? 2 * bn * 128 : 0) + 1024;
}

// wgmma operand kind code of wgmma_gemm.cuh: fp8 format, else half / bfloat16.
template <typename T, int FMT>
struct WgKind { static constexpr int value = FMT; };
template <typename T>
struct WgKind<T, 0> { static constexpr int value = MmaType<T>::is_bf16 ? 17 : 16; };

template <typename TA, typename TB, typename C, typename TO, int FA, int FB, bool TRANS_B, bool AS, bool BS, int BN,
          int STAGES, int PROMOTE, bool NATIVE, bool TMA>
__device__ void matmul_wgmma(const TA* a, const TB* b, const float* a_scale, const float* b_scale, const int* ip,
                             const uint8_t* tmpl, TO* out, uint8_t* tmaps) {
  static_assert(!NATIVE || (FA != 0 && FB != 0), "native fp8 wgmma: both operands fp8");
  static_assert(!NATIVE || TRANS_B, "fp8 wgmma reads b K-major only ([N][K])");
  static_assert(BN == 128 || BN == 256, "tile width 128 or 256");
  static_assert(STAGES >= 3, "the ring needs two stages beyond the prefetch");
  static_assert(NATIVE || PROMOTE == 0, "promotion is for the native fp8 accumulation only");
  constexpr bool A_CVT = FA != 0 && !NATIVE, B_CVT = FB != 0 && !NATIVE;
  static_assert(!TMA || !(A_CVT || B_CVT), "TMA loads: operands used as stored");
  constexpr int NT = 256, PREFETCH = STAGES - 2;
  constexpr int A_BYTES = kWgBM * (A_CVT ? 64 : 128), B_BYTES = BN * (B_CVT ? 64 : 128);
  constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int KSTEP = NATIVE ? 128 : 64;    // K values per stage
  constexpr int KINST = NATIVE ? 32 : 16;     // K values per wgmma
  constexpr int KA = NATIVE ? FA : WgKind<C, 0>::value, KB = NATIVE ? FB : KA;
  constexpr int B_MN = TRANS_B ? 0 : 1;       // wgmma reads B MN-major ([K][N])

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* ring = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* aconv = ring + STAGES * STAGE_BYTES;            // A_CVT: two decoded [128][64] A tiles
  unsigned char* bconv = aconv + (A_CVT ? 2 * kWgBM * 128 : 0);  // B_CVT: two decoded B tiles

  const int M = ip[kWgM], N = ip[kWgN], K = ip[kWgK];
  const int z = blockIdx.z;
  // Grouped tile order: kWgGroupM row tiles sweep the columns together, so
  // the blocks resident at once share their A and B tiles in L2.
  const int tiles_m = (M + kWgBM - 1) / kWgBM, tiles_n = (N + BN - 1) / BN;
  const int group = blockIdx.x / (kWgGroupM * tiles_n), first_m = group * kWgGroupM;
  const int group_rows = min(tiles_m - first_m, kWgGroupM), in_group = blockIdx.x % (kWgGroupM * tiles_n);
  const int m0 = (first_m + in_group % group_rows) * kWgBM, n0 = (in_group / group_rows) * BN;
  const TA* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[kWgBBatched] ? (long)z * K * N : 0);
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;

  // Stage loads. A: [128][128 bytes] K-major, one swizzle atom; raw codes
  // (A_CVT): [128][64] row-major.
  auto load_a = [&](unsigned char* dst, int k0) {
    constexpr int PER = sizeof(TA) == 1 ? 16 : 8;  // values per 16-byte chunk
    if constexpr (A_CVT) {
#pragma unroll
      for (int it = 0; it < kWgBM * 4 / NT; ++it) {
        const int c = tid + it * NT, row = c / 4, kv = k0 + (c % 4) * 16;
        const bool ok = m0 + row < M && kv < K;
        cp_async16(dst + c * 16, ok ? (const void*)(ag + (long)(m0 + row) * K + kv) : ag, ok);
      }
      return;
    }
#pragma unroll
    for (int it = 0; it < kWgBM * 8 / NT; ++it) {
      const int c = tid + it * NT, row = c / 8, chunk = c % 8, kv = k0 + chunk * PER;
      const bool ok = m0 + row < M && kv < K;
      cp_async16(dst + swizzled_offset<kWgBM>(row, chunk), ok ? (const void*)(ag + (long)(m0 + row) * K + kv) : ag,
                 ok);
    }
  };
  auto load_b = [&](unsigned char* dst, int k0) {
    constexpr int PER = sizeof(TB) == 1 ? 16 : 8;
    if constexpr (B_CVT) {  // raw codes, row-major as stored: [BN][64] (TRANS_B) or [64][BN]
      constexpr int ROW_CHUNKS = TRANS_B ? 4 : BN / 16;
#pragma unroll
      for (int it = 0; it < BN * 4 / NT; ++it) {
        const int c = tid + it * NT, row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS;
        const long src = TRANS_B ? (long)(n0 + row) * K + k0 + chunk * 16 : (long)(k0 + row) * N + n0 + chunk * 16;
        const bool ok = TRANS_B ? (n0 + row < N && k0 + chunk * 16 < K) : (k0 + row < K && n0 + chunk * 16 < N);
        cp_async16(dst + c * 16, ok ? (const void*)(bg + src) : bg, ok);
      }
    } else if constexpr (TRANS_B) {  // [BN][128 bytes] K-major
#pragma unroll
      for (int it = 0; it < BN * 8 / NT; ++it) {
        const int c = tid + it * NT, row = c / 8, chunk = c % 8, kv = k0 + chunk * PER;
        const bool ok = n0 + row < N && kv < K;
        cp_async16(dst + swizzled_offset<BN>(row, chunk), ok ? (const void*)(bg + (long)(n0 + row) * K + kv) : bg,
                   ok);
      }
    } else {  // 16-bit [64 k][BN n] MN-major: BN / 64 atoms of [64][64]
#pragma unroll
      for (int it = 0; it < 64 * (BN / 8) / NT; ++it) {
        const int c = tid + it * NT, krow = c / (BN / 8), chunk = c % (BN / 8), nv = n0 + chunk * 8;
        const bool ok = k0 + krow < K && nv < N;
        cp_async16(dst + swizzled_offset<64>(krow, chunk), ok ? (const void*)(bg + (long)(k0 + krow) * N + nv) : bg,
                   ok);
      }
    }
  };
  // Raw codes of one stage -> decoded tiles in the wgmma layouts.
  auto convert_a = [&](const unsigned char* raw, unsigned char* dst) {
#pragma unroll
    for (int it = 0; it < kWgBM * 4 / NT; ++it) {
      const int c = tid + it * NT, row = c / 4, chunk = c % 4;
      uint4 w[2];
      decode16<C, FA>(*reinterpret_cast<const uint4*>(raw + c * 16), w);
      *reinterpret_cast<uint4*>(dst + swizzled_offset<kWgBM>(row, 2 * chunk)) = w[0];
      *reinterpret_cast<uint4*>(dst + swizzled_offset<kWgBM>(row, 2 * chunk + 1)) = w[1];
    }
  };
  auto convert_b = [&](const unsigned char* raw, unsigned char* dst) {
    constexpr int ROW_CHUNKS = TRANS_B ? 4 : BN / 16;
#pragma unroll
    for (int it = 0; it < BN * 4 / NT; ++it) {
      const int c = tid + it * NT, row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS;
      uint4 w[2];
      decode16<C, FB>(*reinterpret_cast<const uint4*>(raw + c * 16), w);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int off = TRANS_B ? swizzled_offset<BN>(row, 2 * chunk + h) : swizzled_offset<64>(row, 2 * chunk + h);
        *reinterpret_cast<uint4*>(dst + off) = w[h];
      }
    }
  };
  // TMA: templates published per block (tma.cuh), one mbarrier per stage.
  __shared__ __align__(128) unsigned char tm_stage[TMA ? 256 : 16];
  __shared__ __align__(8) unsigned long long full_bar[STAGES];
  unsigned char* tm_ws = TMA ? tmaps + ((long)blockIdx.z * gridDim.x + blockIdx.x) * 256 : nullptr;
  if constexpr (TMA) {
    if (tid < 32) {
      const void* const addrs[2] = {ag, bg};
      tma_publish<2>(tm_stage, tmpl, tm_ws, addrs, lane);
    }
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) mbar_init(&full_bar[s], 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
      tma_acquire(tm_ws);
      tma_acquire(tm_ws + 128);
    }
  }
  auto issue_tma = [&](int kt) {  // one thread
    unsigned char* st = ring + (kt % STAGES) * STAGE_BYTES;
    void* bar = &full_bar[kt % STAGES];
    mbar_expect_tx(bar, STAGE_BYTES);
    tma_load_2d(st, tm_ws, kt * KSTEP, m0, bar);
    if (TRANS_B) {
      tma_load_2d(st + A_BYTES, tm_ws + 128, kt * KSTEP, n0, bar);
    } else {
#pragma unroll
      for (int j = 0; j < BN / 64; ++j) tma_load_2d(st + A_BYTES + j * 64 * 128, tm_ws + 128, n0 + 64 * j, kt * KSTEP, bar);
    }
  };
  auto issue_loads = [&](int kt) {
    unsigned char* st = ring + (kt % STAGES) * STAGE_BYTES;
    load_a(st, kt * KSTEP);
    load_b(st + A_BYTES, kt * KSTEP);
  };

  constexpr int R = BN / 2;
  float d[R];        // wgmma accumulators
  float acc[PROMOTE ? R : 1];  // promoted sums (NATIVE with PROMOTE)
  if (PROMOTE) {
#pragma unroll
    for (int i = 0; i < (PROMOTE ? R : 1); ++i) acc[i] = 0.f;
  }
  const int ktiles = (K + KSTEP - 1) / KSTEP;
  if (ktiles == 0) {
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < PREFETCH; ++s) {
    if (TMA) {
      if (tid == 0 && s < ktiles) issue_tma(s);
    } else {
      if (s < ktiles) issue_loads(s);
      cp_async_commit();
    }
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    if constexpr (TMA) {
      mbar_wait(&full_bar[kt % STAGES], (kt / STAGES) & 1);
    } else {
      cp_async_wait<PREFETCH - 1>();
      fence_proxy_async();
    }
    // Stage kt landed for every thread; every warpgroup finished the wgmma of
    // stage kt-2, whose buffer the next copies reuse.
    __syncthreads();
    if constexpr (TMA) {
      if (tid == 0 && kt + PREFETCH < ktiles) issue_tma(kt + PREFETCH);
    } else {
      if (kt + PREFETCH < ktiles) issue_loads(kt + PREFETCH);
      cp_async_commit();
    }
    const unsigned char* at = ring + (kt % STAGES) * STAGE_BYTES;
    const unsigned char* bt = at + A_BYTES;
    if constexpr (A_CVT || B_CVT) {
      // Decoded tiles alternate between two buffers: the one written here was
      // last read by the wgmma of stage kt-2, finished before the barrier above.
      if constexpr (A_CVT) {
        unsigned char* dst = aconv + (kt % 2) * (kWgBM * 128);
        convert_a(at, dst);
        at = dst;
      }
      if constexpr (B_CVT) {
        unsigned char* dst = bconv + (kt % 2) * (BN * 128);
        convert_b(bt, dst);
        bt = dst;
      }
      fence_proxy_async();
      __syncthreads();
    }
    const unsigned a_addr = smem_addr(at) + wg * 64 * 128, b_addr = smem_addr(bt);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KSTEP / KINST; ++kk) {
      const unsigned long long da = wgmma_desc(a_addr + kk * 32, 16, 1024);
      const unsigned long long db =
          B_MN ? wgmma_desc(b_addr + kk * 16 * 128, 64 * 128, 1024) : wgmma_desc(b_addr + kk * 32, 16, 1024);
      const bool first = PROMOTE ? (kt % PROMOTE == 0 && kk == 0) : (kt == 0 && kk == 0);
      WgmmaSS<KA, KB, BN>::template run<B_MN>(d, da, db, first ? 0 : 1);
    }
    wgmma_commit();
    if constexpr (PROMOTE > 0) {
      if (kt % PROMOTE == PROMOTE - 1 || kt == ktiles - 1) {
        wgmma_wait<0>();
        wgmma_pin(d);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[i] += d[i];
      } else {
        wgmma_wait<1>();
      }
    } else {
      wgmma_wait<1>();
    }
  }
  wgmma_wait<0>();
  wgmma_pin(d);
  cp_async_wait<0>();

  // Epilogue: d[4j + c] is row 16 warp + g + 8 (c / 2), column 8j + 2t + (c % 2).
  TO* og = out + (long)z * M * N;
  const float* as_row = AS ? a_scale + (ip[kWgAScaleBatched] ? (long)z * (ip[kWgAScaleRows] ? M : 1) : 0) : nullptr;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = m0 + wg * 64 + warp * 16 + g + 8 * half;
    if (row >= M) continue;
    const float sa = AS ? as_row[ip[kWgAScaleRows] ? row : 0] : 1.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * t;
      if (col >= N) continue;  // N is even: a pair is wholly in or out
      float v0 = PROMOTE ? acc[4 * j + 2 * half] : d[4 * j + 2 * half];
      float v1 = PROMOTE ? acc[4 * j + 2 * half + 1] : d[4 * j + 2 * half + 1];
      const float sb0 = BS ? b_scale[ip[kWgBScaleCols] ? col : 0] : 1.f;
      const float sb1 = BS ? b_scale[ip[kWgBScaleCols] ? col + 1 : 0] : 1.f;
      v0 = v0 * sa * sb0;
      v1 = v1 * sa * sb1;
      TO* dst = og + (long)row * N + col;
      if constexpr (sizeof(TO) == 4) {
        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
      } else {
        *reinterpret_cast<unsigned*>(dst) = pack2<TO>(v0, v1);
      }
    }
  }
}

}  // namespace mlx_flash
