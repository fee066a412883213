// matmul2d on Hopper (sm_90a), warp-specialised and persistent:
//   out = (a * a_scale) @ (b * b_scale), operands used as stored (16-bit, or
//   fp8 codes on native fp8 wgmma), fp32 accumulation in the tensor cores.
//
// A block is three warpgroups (384 threads, one block per SM) and stays
// resident over a sequence of 128 x BN output tiles (tile = blockIdx.x,
// blockIdx.x + gridDim.x, ...; grouped order as matmul_wgmma.cuh):
//   producer (warpgroup 0): gives up registers (setmaxnreg.dec 40); one
//     thread issues the TMA loads of every stage of every tile into a ring
//     of STAGES stages. Stage s is refilled once its "empty" mbarrier has
//     seen both consumer warpgroups release it, and its "full" mbarrier
//     counts the bytes that land (expect_tx).
//   consumers (warpgroups 1, 2): take the registers (setmaxnreg.inc 232);
//     consumer c owns rows 64c .. 64c + 63 of the tile (m64nBN wgmma from
//     shared memory, BN / 2 fp32 accumulators per thread), waits on the
//     stage's full barrier, issues its wgmma, and releases the previous
//     stage once wgmma_wait<1> says its reads are done. The epilogue
//     (scales, rounding, stores from registers) overlaps the producer's
//     loads of the next tile.
// No block-wide barrier after the set-up: the stage ring is the only
// synchronisation. Stage and phase counters run on across tiles.
// Native fp8 (NATIVE, k32): PROMOTE > 0 restarts the tensor-core sums every
// PROMOTE stages and adds them to fp32 registers (matmul_wgmma.cuh explains
// why); BN 128 or 192 leaves room for both register sets. ACC2 (BN 128):
// two tensor-core accumulator sets alternate between promotion intervals, so
// a consumer adds one while the tensor cores fill the other. PROMOTE < 0
// (BN 128 or 192): promotion every -PROMOTE k32 instructions (1 or 2), each
// interval committed and waited for before its sums are added (the other
// consumer warpgroup keeps the tensor cores busy meanwhile): the tensor
// cores' truncating fp8 sums then span 32 or 64 products instead of 256.
// RAW > 0 (16-bit a, fp8 b as [N][K] codes: FP8Linear's prefill): b is
// decoded inside the kernel instead of by a pass before it. The producer
// thread loads b's fp8 tile by TMA (no swizzle, 64-byte rows) into a ring of
// RAW slots of its own; the producer warpgroup's three other warps decode it
// exactly (fp8_decode.cuh) into the stage's b tile, in the 16-bit layout a
// TMA load with the 128-byte swizzle would have left, fence the writes for
// the tensor cores (async proxy) and arrive on the stage's full barrier
// (which waits for them and for a's bytes). No fp16 copy of the weight is
// ever made in global memory. The consumers are unchanged.
// SK (native fp8, from session 29): a stream-K schedule (stream_k.cuh) may
// cut tiles' k-steps between blocks: ip[kWsSkTiles] stream-K tiles, partial
// sums through `part`, tickets from the caller's zeroed region. With SK off
// the loops and tests are the kernel's before it. SK takes BN 128 or 192 and
// promotion every stage (PROMOTE 1, the default), every instruction or none,
// so a cut changes no interval; the runs' fp32 sums are added.
// The kernel needs 384 threads of at most 168 registers at launch (for the
// setmaxnreg trade): matmul_wgmma_ws.cu's launch bounds say so. (Clusters of
// two blocks sharing b by TMA multicast were tried in sessions 5-7 and never
// won on the card; removed in session 11, docs/matmul.md.)
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "matmul_wgmma.cuh"
#include "mbarrier.cuh"
#include "mma.cuh"
#include "stream_k.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_gemm.cuh"

namespace mlx_flash {

// wgmma operand kind of an operand used as stored: its fp8 format, else
// WgKind's half / bfloat16 code (never instantiated for uint8_t codes).
template <typename T, int FMT>
struct WsKind { static constexpr int value = FMT; };
template <typename T>
struct WsKind<T, 0> { static constexpr int value = WgKind<T, 0>::value; };

// TA where the condition holds, else TB (no <type_traits> under NVRTC).
template <bool C, typename TA, typename TB>
struct WsPick { using type = TA; };
template <typename TA, typename TB>
struct WsPick<false, TA, TB> { using type = TB; };

// Dynamic shared memory (bytes): the stage ring, RAW slots of fp8 b codes
// (BN rows of 64 bytes) and 1 KiB for alignment.
__host__ __device__ constexpr int matmul_ws_smem(int bn, int stages, int raw = 0) {
  return stages * (kWgBM + bn) * 128 + raw * bn * 64 + 1024;
}

// RAW: the producer warpgroup's warps 1-3 decode b's fp8 codes.
constexpr int kWsDecoders = 96;

// ip[kWsSkTiles] (SK): the stream-K tiles (0: every tile whole).
constexpr int kWsSkTiles = kWgBScaleCols + 1;

template <typename TA, typename TB, typename TO, int FA, int FB, bool TRANS_B, bool AS, bool BS, int BN, int STAGES,
          int PROMOTE, bool NATIVE, bool ACC2, int RAW = 0, bool SK = false>
__device__ void matmul_wgmma_ws(const TA* a, const TB* b, const float* a_scale, const float* b_scale, const int* ip,
                                const uint8_t* tmpl, TO* out, uint8_t* tmaps, const unsigned* tickets = nullptr,
                                float* part = nullptr) {
  static_assert(RAW >= 0 && RAW <= 4, "0 to 4 slots of fp8 b codes");
  static_assert(RAW > 0 ? (!NATIVE && FA == 0 && FB != 0 && TRANS_B && sizeof(TA) == 2)
                        : (NATIVE == (FA != 0) && NATIVE == (FB != 0)),
                "operands used as stored: 16-bit, or both fp8 (native); or (RAW) a 16-bit a and [N][K] fp8 b codes "
                "decoded in the kernel");
  static_assert(!NATIVE || TRANS_B, "fp8 wgmma reads b K-major only ([N][K])");
  static_assert(BN == 128 || BN == 192 || BN == 256, "tile width 128, 192 or 256");
  static_assert(TRANS_B || BN % 64 == 0, "an MN-major b tile is whole 64-column boxes");
  static_assert(NATIVE || PROMOTE == 0, "promotion is for the native fp8 accumulation only");
  static_assert(PROMOTE == 0 || BN <= 192, "promoted sums and accumulators must fit 232 registers");
  static_assert(PROMOTE >= 0 || ((PROMOTE == -1 || PROMOTE == -2) && BN <= 192 && !ACC2),
                "promotion every 1 or 2 instructions, one accumulator set");
  static_assert(STAGES >= 2, "a ring");
  // (Promotion every 2 or 4 stages with a run's first stage starting an
  // interval made ptxas serialise the wgmma: "kt == k0" in the test; BN 256's
  // 128 accumulators beside the ending of a cut tile spilled.)
  static_assert(!SK || (NATIVE && !ACC2 && RAW == 0 && PROMOTE <= 1 && BN <= 192),
                "stream-K: the native kernel on tiles of 128 or 192 columns with one accumulator set, promotion "
                "every stage, instruction or none");
  static_assert(!ACC2 || (PROMOTE > 0 && BN == 128), "two accumulator sets and the sums fit 232 registers at BN 128");
  constexpr int A_BYTES = kWgBM * 128, B_BYTES = BN * 128, STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int KSTEP = NATIVE ? 128 : 64;  // K values per stage
  constexpr int KINST = NATIVE ? 32 : 16;   // K values per wgmma
  constexpr int KA = WsKind<TA, FA>::value;
  // RAW: b reaches the tensor cores decoded to a's 16-bit type.
  constexpr int KB = WsKind<typename WsPick<(RAW > 0), TA, TB>::type, RAW ? 0 : FB>::value;
  constexpr int RAW_BYTES = BN * 64;  // one slot: BN rows of 64 fp8 codes (a stage's K)
  constexpr int B_MN = TRANS_B ? 0 : 1;
  // A stage is released by one arrival per consumer warpgroup (its first
  // thread, after wgmma_wait: a warpgroup's wgmma group completes as a whole),
  // not by all 256 threads (256 arrivals on one barrier per stage).
  constexpr int CONSUMERS = 2;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* ring = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  __shared__ __align__(128) unsigned char tm_stage[256];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  __shared__ __align__(8) unsigned long long raw_full[RAW ? RAW : 1], raw_empty[RAW ? RAW : 1];
  unsigned char* raw_ring = ring + STAGES * STAGE_BYTES;  // RAW slots after the stages (1024-byte multiples)

  const int M = ip[kWgM], N = ip[kWgN], K = ip[kWgK];
  const int z = blockIdx.z;
  const TA* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[kWgBBatched] ? (long)z * K * N : 0);
  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32;
  // Work units: 128 x BN output tiles; block b takes units b, b + gridDim.x, ...
  const int units_m = (M + kWgBM - 1) / kWgBM, tiles_n = (N + BN - 1) / BN, units = units_m * tiles_n;
  const int ktiles = (K + KSTEP - 1) / KSTEP;
  // SK: the tiles' and k-steps' order over the blocks (stream_k.cuh); the
  // loops below run tile blockIdx.x, + gridDim.x, ... whole without it.
  const StreamKSchedule sched = {units, ktiles, SK ? ip[kWsSkTiles] : 0, (int)gridDim.x};
  // Grouped order: kWgGroupM tile rows sweep the columns together.
  auto tile_origin = [&](int unit, int& m0, int& n0) {
    const int group = unit / (kWgGroupM * tiles_n), first_m = group * kWgGroupM;
    const int group_rows = min(units_m - first_m, kWgGroupM), in_group = unit % (kWgGroupM * tiles_n);
    m0 = (first_m + in_group % group_rows) * kWgBM;
    n0 = (in_group / group_rows) * BN;
  };

  unsigned char* tm_ws = tmaps + ((long)blockIdx.z * gridDim.x + blockIdx.x) * 256;
  if (tid < 32) {
    const void* const addrs[2] = {ag, bg};
    tma_publish<2>(tm_stage, tmpl, tm_ws, addrs, lane);
  }
  if (tid == 32) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      // RAW: the full barrier also waits for the decoding warps' arrivals.
      mbar_init(&full_bar[s], RAW ? 1 + kWsDecoders / 32 : 1);
      mbar_init(&empty_bar[s], CONSUMERS);
    }
#pragma unroll
    for (int q = 0; q < (RAW ? RAW : 0); ++q) {
      mbar_init(&raw_full[q], 1);
      mbar_init(&raw_empty[q], kWsDecoders / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // Producer.
    setmaxnreg_dec<40>();
    if constexpr (RAW > 0) {
      if (tid >= 32) {
        // Decoders: the same sequence of stages as the producer thread.
        const int dt = tid - 32;
        int dit = 0;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
          for (int kt = 0; kt < ktiles; ++kt, ++dit) {
            const int s = dit % STAGES, q = dit % RAW;
            // Slot q's codes for this stage landed. The producer issued them
            // after stage s's release, so its b tile is free to write.
            mbar_wait(&raw_full[q], (dit / RAW) & 1);
            const unsigned char* src = raw_ring + q * RAW_BYTES;
            unsigned char* dst = ring + s * STAGE_BYTES + A_BYTES;
            // 16 codes a thread and step: row r = u / 4, codes 16 (u % 4) ..;
            // they become 16-byte chunks 2 (u % 4) and 2 (u % 4) + 1 of the
            // 128-byte row r, at chunk ^ (r % 8) (the 128-byte swizzle).
            for (int u = dt; u < BN * 4; u += kWsDecoders) {
              const int r = u >> 2, c = (u & 3) * 2;
              const uint4 codes = *reinterpret_cast<const uint4*>(src + u * 16);
              uint4 vals[2];
              decode16<TA, FB>(codes, vals);
              *reinterpret_cast<uint4*>(dst + r * 128 + ((c ^ (r & 7)) << 4)) = vals[0];
              *reinterpret_cast<uint4*>(dst + r * 128 + (((c + 1) ^ (r & 7)) << 4)) = vals[1];
            }
            // The tensor cores read shared memory through the async proxy:
            // the writes are fenced for it before the stage is declared full.
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncwarp();
            if (lane == 0) {
              mbar_arrive(&raw_empty[q]);
              mbar_arrive(&full_bar[s]);
            }
          }
        }
        return;
      }
    }
    if (tid != 0) return;
    tma_acquire(tm_ws);
    tma_acquire(tm_ws + 128);
    int it = 0;  // stages issued by this block, over all its tiles
    for (int cursor = sched.begin(blockIdx.x), unit = SK ? 0 : (int)blockIdx.x, k0 = 0, k1 = ktiles;
         SK ? sched.next(blockIdx.x, cursor, unit, k0, k1) : unit < units; unit += SK ? 0 : (int)gridDim.x) {
      int m0, n0;
      tile_origin(unit, m0, n0);
      for (int kt = k0; kt < k1; ++kt, ++it) {
        const int s = it % STAGES;
        // Round r = it / STAGES of stage s needs round r - 1's release.
        if (it >= STAGES) mbar_wait(&empty_bar[s], ((it / STAGES) + 1) & 1);
        unsigned char* st = ring + s * STAGE_BYTES;
        void* bar = &full_bar[s];
        mbar_expect_tx(bar, RAW ? A_BYTES : STAGE_BYTES);
        tma_load_2d(st, tm_ws, kt * KSTEP, m0, bar);
        if constexpr (RAW > 0) {
          // b's codes into raw slot q, once the decoders have emptied it.
          const int q = it % RAW;
          if (it >= RAW) mbar_wait(&raw_empty[q], ((it / RAW) + 1) & 1);
          mbar_expect_tx(&raw_full[q], RAW_BYTES);
          tma_load_2d(raw_ring + q * RAW_BYTES, tm_ws + 128, kt * KSTEP, n0, &raw_full[q]);
        } else if constexpr (TRANS_B) {
          tma_load_2d(st + A_BYTES, tm_ws + 128, kt * KSTEP, n0, bar);
        } else {
#pragma unroll
          for (int j = 0; j < BN / 64; ++j)
            tma_load_2d(st + A_BYTES + j * 64 * 128, tm_ws + 128, n0 + 64 * j, kt * KSTEP, bar);
        }
      }
    }
    return;
  }

  // Consumers.
  setmaxnreg_inc<232>();
  const int c = wg - 1, warp = (tid % 128) / 32, g = lane / 4, t = lane % 4;
  const bool releaser = tid % 128 == 0;  // one arrival per consumer warpgroup
  constexpr int R = BN / 2;
  TO* og = out + (long)z * M * N;
  const float* as_row = AS ? a_scale + (ip[kWgAScaleBatched] ? (long)z * (ip[kWgAScaleRows] ? M : 1) : 0) : nullptr;
  // Releases a stage: one arrival per consumer warpgroup.
  auto release = [&](int stage) {
    if (releaser) mbar_arrive(&empty_bar[stage]);
  };
  int it = 0;
  __shared__ int sk_verdict[1];  // SK: this block finishes a cut tile
  // Without SK, tile blockIdx.x, + gridDim.x, ..., each whole: the loop and
  // constants of the kernel before SK (the schedule's loop, even folded to
  // the same tiles, made ptxas serialise the wgmma of PROMOTE 2 and 4).
  for (int cursor = sched.begin(blockIdx.x), unit = SK ? 0 : (int)blockIdx.x, kn0 = 0, kn1 = 0;
       SK ? sched.next(blockIdx.x, cursor, unit, kn0, kn1) : unit < units; unit += SK ? 0 : (int)gridDim.x) {
    // This piece's k-tiles [k0, k1).
    const int k0 = SK ? kn0 : 0, k1 = SK ? kn1 : ktiles;
    int m0, n0;
    tile_origin(unit, m0, n0);
    float d[R];                  // wgmma accumulators
    float d2[ACC2 ? R : 1];      // ACC2: the second set (odd promotion intervals)
    float acc[PROMOTE ? R : 1];  // promoted sums (NATIVE with PROMOTE)
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = 0.f;
    if (PROMOTE) {
#pragma unroll
      for (int i = 0; i < (PROMOTE ? R : 1); ++i) acc[i] = 0.f;
    }
    for (int kt = k0; kt < k1; ++kt, ++it) {
      const int s = it % STAGES;
      mbar_wait(&full_bar[s], (it / STAGES) & 1);
      const unsigned char* at = ring + s * STAGE_BYTES;
      const unsigned a_addr = smem_addr(at) + c * 64 * 128, b_addr = smem_addr(at + A_BYTES);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KSTEP / KINST; ++kk) {
        const unsigned long long da = wgmma_desc(a_addr + kk * 32, 16, 1024);
        const unsigned long long db =
            B_MN ? wgmma_desc(b_addr + kk * 16 * 128, 64 * 128, 1024) : wgmma_desc(b_addr + kk * 32, 16, 1024);
        if constexpr (PROMOTE < 0) {
          // Interval of -PROMOTE instructions: a fresh tensor-core sum,
          // committed, waited for and added to the fp32 sums before the next
          // (two alternating sets would let ptxas serialise every wgmma:
          // C7514, reads of accumulators inside the pipeline).
          constexpr int PI = PROMOTE < 0 ? -PROMOTE : 1;
          WgmmaSS<KA, KB, BN>::template run<B_MN>(d, da, db, kk % PI == 0 ? 0 : 1);
          if (kk % PI == PI - 1) {
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin(d);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] += d[i];
            wgmma_fence();  // the next interval's wgmma overwrite d
          }
          continue;
        }
        // (SK runs PROMOTE 0 or 1 only: each stage, or a run's first, starts fresh sums.)
        const bool first = PROMOTE ? (kt % PROMOTE == 0 && kk == 0) : (kt == k0 && kk == 0);
        if constexpr (ACC2) {
          if ((kt / PROMOTE) & 1)
            WgmmaSS<KA, KB, BN>::template run<B_MN>(d2, da, db, first ? 0 : 1);
          else
            WgmmaSS<KA, KB, BN>::template run<B_MN>(d, da, db, first ? 0 : 1);
        } else {
          WgmmaSS<KA, KB, BN>::template run<B_MN>(d, da, db, first ? 0 : 1);
        }
      }
      if constexpr (PROMOTE < 0) {
        // Every interval was committed, waited for and added above.
      } else if constexpr (ACC2) {
        wgmma_commit();
        // Promotion intervals alternate between d and d2: once the first
        // stage of an interval is issued, wgmma_wait<1> says the previous
        // interval (the other set) is complete; it is added while the tensor
        // cores work on, instead of waiting for them to drain (wgmma_wait<0>).
        wgmma_wait<1>();
        if (kt > 0 && kt % PROMOTE == 0) {
          if ((kt / PROMOTE) & 1) {
            wgmma_pin(d);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] += d[i];
          } else {
            wgmma_pin(d2);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] += d2[i];
          }
        }
      } else if (PROMOTE > 0 && (kt % (PROMOTE > 0 ? PROMOTE : 1) == (PROMOTE > 0 ? PROMOTE : 1) - 1 ||
                                 kt == k1 - 1)) {
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_pin(d);
#pragma unroll
        for (int i = 0; i < (PROMOTE ? R : 1); ++i) acc[i] += d[i];
      } else {
        wgmma_commit();
        wgmma_wait<1>();
      }
      // The previous stage's wgmma has finished reading it: release it.
      if (kt > k0) release((it - 1) % STAGES);
    }
    wgmma_wait<0>();
    wgmma_pin(d);
    if constexpr (ACC2) {  // the last interval's set
      wgmma_pin(d2);
      if (ktiles > 0) {
        if (((ktiles - 1) / PROMOTE) & 1) {
#pragma unroll
          for (int i = 0; i < R; ++i) acc[i] += d2[i];
        } else {
#pragma unroll
          for (int i = 0; i < R; ++i) acc[i] += d[i];
        }
      }
    }
    if (k1 > k0) release((it - 1) % STAGES);
    if constexpr (SK) {
      // A cut tile: finished by the last of its blocks to arrive (stream_k.cuh).
      if (k1 - k0 < ktiles) {
        bool finishes;
        if constexpr (PROMOTE != 0) {
          finishes = stream_k_finish<128>(acc, part, tickets, sched, unit, sk_verdict);
        } else {
          finishes = stream_k_finish<128>(d, part, tickets, sched, unit, sk_verdict);
        }
        if (!finishes) continue;
      }
    }

    // Epilogue: d[4j + e] is row 16 warp + g + 8 (e / 2), column 8j + 2t + (e % 2).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + c * 64 + warp * 16 + g + 8 * half;
      if (row >= M) continue;
      const float sa = AS ? as_row[ip[kWgAScaleRows] ? row : 0] : 1.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = n0 + 8 * j + 2 * t;
        if (col >= N) continue;  // N is even: a pair is wholly in or out
        float v0 = PROMOTE ? acc[(4 * j + 2 * half) % (PROMOTE ? R : 1)] : d[4 * j + 2 * half];
        float v1 = PROMOTE ? acc[(4 * j + 2 * half + 1) % (PROMOTE ? R : 1)] : d[4 * j + 2 * half + 1];
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
}

}  // namespace mlx_flash

// mx.fast.cuda_kernel writes the kernel's declaration itself (after this
// header), with no way to pass launch bounds; this kernel needs them (384
// threads, so ptxas keeps the launch count at 168 registers and the
// setmaxnreg trade is legal). Every __global__ after this point, i.e. the
// one kernel of this translation unit, gets them.
#ifdef __CUDA_ARCH__
#undef __global__
#define __global__ __location__(global) __launch_bounds__(384, 1)
#endif
