// matmul2d on Hopper (sm_90a) for FP8Linear's product: a 16-bit x [M][K]
// times fp8 weight codes w [N][K] (transpose_b), out [M][N] =
// (x * a_scale) @ (decode(w) * b_scale)^T, computed as out^T = W x^T so that
// the weight is wgmma's A operand, decoded from its fp8 codes straight into
// the A registers by the warps that issue the products ("WA": weight as A).
//
// Why: decoding w into a 16-bit shared-memory tile first (matmul_wgmma_ws.cuh,
// RAW) adds 48 KB of shared-memory traffic a 128 x 256 x 64 stage and leaves
// the work to three producer warps that capped that kernel at ~470 TFLOP/s on
// the H100. Here each consumer thread reads 32 of its codes a stage (eight
// 16-byte loads, every 16-byte chunk shared by a quad of lanes), picks its
// pairs with a select and a shift each, and converts each pair with one
// instruction, while the tensor cores run the previous half stage's products. Per
// 128-row x BT-token x 64-K stage, shared memory carries BT*128 bytes of x
// (written by TMA, read by both consumer warpgroups' wgmma) and 8 KB of codes.
//
// A block is three warpgroups (384 threads, one block per SM), persistent over
// 128 (weight rows) x BT (tokens) tiles, unit u = n-tile u / tiles_m, m-tile
// u % tiles_m: blocks running together share weight tiles (read once from
// memory; x, the small operand, stays in L2).
//   producer (warpgroup 2, setmaxnreg.dec 40): one thread loads each stage by
//     TMA: x's [BT][64] tile (128-byte swizzle, the layout wgmma's B
//     descriptor reads K-major) and w's [128][64] codes (64-byte swizzle, so
//     the consumers' 16-byte loads of eight rows hit distinct banks).
//   consumers (warpgroups 0, 1, setmaxnreg.inc 232): consumer c owns weight
//     rows 64c .. 64c + 63 of the tile: per half stage (two k16 steps) it
//     decodes its A fragments (8 registers; two sets alternate between the
//     halves, so the previous half's products may still read the other),
//     issues two m64nBTk16 wgmma (A from registers, B = x from shared memory)
//     as one commit group, and releases the previous stage once
//     wgmma_wait<1> says its second half is done.
// A fragment (mma.sync m16n8k16 A layout, warp w, g = lane / 4, t = lane % 4):
// a0 = (row 16w + g, k 2t, 2t+1), a1 = row + 8, a2 = (row, k 2t+8, 2t+9),
// a3 = (row + 8, k 2t+8, 2t+9). In a row's 16 codes of a k16 step, k 2t, 2t+1
// are 16-bit word t of the chunk: 32-bit word t / 2, half t % 2; k 2t + 8 is
// 32-bit word 2 + t / 2. The accumulator d[4j + e] is weight row
// 16w + g + 8 (e / 2), token 8j + 2t + (e % 2): the epilogue pairs a lane's
// value with its neighbour row's (lane ^ 4, shuffled) to store two adjacent
// outputs of a token as one word.
// Exact: every fp8 value is a half and a bfloat16; the products accumulate in
// fp32 in the tensor cores; scales and one rounding in the epilogue.
// Stream-K over partial waves lives in matmul_wgmma_wa_sk.cuh (opt-in): a copy
// of this kernel on a schedule that may cut tiles. The code here is the text
// the card ran in s20e; it stays so until that form has run on a card.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "matmul_wgmma.cuh"
#include "mbarrier.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_gemm.cuh"

namespace mlx_flash {

// Dynamic shared memory (bytes): the stage ring ([BT][64] x, [128][64] codes
// a stage) and 1 KiB for alignment.
__host__ __device__ constexpr int matmul_wa_smem(int bt, int stages) { return stages * (bt * 128 + 128 * 64) + 1024; }

// The low 16 bits of v, two fp8 codes of format FMT, as two values of T (packed).
template <typename T, int FMT>
__device__ __forceinline__ unsigned wa_decode_pair(unsigned v) {
  const __half2 h = fp8x2_to_half2<FMT>(static_cast<unsigned short>(v & 0xffffu));
  if constexpr (MmaType<T>::is_bf16) {
    const __nv_bfloat162 bb = __float22bfloat162_rn(__half22float2(h));
    return *reinterpret_cast<const unsigned*>(&bb);
  } else {
    return *reinterpret_cast<const unsigned*>(&h);
  }
}

template <typename TA, typename TO, int FB, bool AS, bool BS, int BT, int STAGES>
__device__ void matmul_wgmma_wa(const TA* a, const uint8_t* b, const float* a_scale, const float* b_scale,
                                const int* ip, const uint8_t* tmpl, TO* out, uint8_t* tmaps) {
  static_assert(sizeof(TA) == 2 && (FB == 1 || FB == 2), "a 16-bit x and fp8 (e4m3 / e5m2) weight codes");
  static_assert(BT == 128 || BT == 256, "tiles of 128 or 256 tokens");
  static_assert(STAGES >= 2, "a ring");
  constexpr int KT = WgKind<TA, 0>::value;  // 16 half, 17 bfloat16
  constexpr int X_BYTES = BT * 128, W_BYTES = 128 * 64, STAGE_BYTES = X_BYTES + W_BYTES;
  constexpr int CONSUMERS = 2;
  constexpr int R = BT / 2;  // accumulators a thread

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* ring = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  __shared__ __align__(128) unsigned char tm_stage[256];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, z = blockIdx.z;
  // The sizes, read by each role after its setmaxnreg: values live across it
  // were spilled (ptxas keeps them in local memory over the register change).
  int M, N, K, tiles_m, units, ktiles;
  auto sizes = [&] {
    M = ip[kWgM], N = ip[kWgN], K = ip[kWgK];
    tiles_m = (M + BT - 1) / BT, units = tiles_m * ((N + 127) / 128), ktiles = (K + 63) / 64;
  };

  unsigned char* tm_ws = tmaps + ((long)blockIdx.z * gridDim.x + blockIdx.x) * 256;
  if (tid < 32) {
    sizes();
    const void* const addrs[2] = {a + (long)z * M * K, b + (ip[kWgBBatched] ? (long)z * K * N : 0)};
    tma_publish<2>(tm_stage, tmpl, tm_ws, addrs, lane);
  }
  if (tid == 256) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full_bar[s], 1);
      mbar_init(&empty_bar[s], CONSUMERS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 2) {
    // Producer: one thread.
    setmaxnreg_dec<40>();
    if (tid != 256) return;
    sizes();
    tma_acquire(tm_ws);
    tma_acquire(tm_ws + 128);
    int it = 0;  // stages issued by this block, over all its tiles
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
      const int n0 = (unit / tiles_m) * 128, m0 = (unit % tiles_m) * BT;
      for (int kt = 0; kt < ktiles; ++kt, ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) mbar_wait(&empty_bar[s], ((it / STAGES) + 1) & 1);
        unsigned char* st = ring + s * STAGE_BYTES;
        mbar_expect_tx(&full_bar[s], STAGE_BYTES);
        tma_load_2d(st, tm_ws, kt * 64, m0, &full_bar[s]);
        tma_load_2d(st + X_BYTES, tm_ws + 128, kt * 64, n0, &full_bar[s]);
      }
    }
    return;
  }

  // Consumers.
  setmaxnreg_inc<232>();
  sizes();
  const int c = wg, warp = (tid % 128) / 32, g = lane / 4, t = lane % 4;
  const bool releaser = tid % 128 == 0;
  const bool odd_word = t & 2;       // k 2t.. is in 32-bit word t / 2 of its 8 codes
  const unsigned shift = (t & 1) * 16;  // and in its high half for odd t
  // This thread's two weight rows in the tile (fragment rows g and g + 8).
  const int wrow0 = c * 64 + warp * 16 + g, wrow1 = wrow0 + 8;
  TO* og = out + (long)z * M * N;
  const float* as_row = AS ? a_scale + (ip[kWgAScaleBatched] ? (long)z * (ip[kWgAScaleRows] ? M : 1) : 0) : nullptr;

  // The A fragments of half `half` of a stage (its k16 steps 2 half and
  // 2 half + 1), decoded from the stage's codes wt.
  auto decode = [&](const unsigned char* wt, int half, unsigned (&fr)[2][4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = i ? wrow1 : wrow0;
      const unsigned char* rp = wt + row * 64;
      const int sw = (row >> 1) & 3;  // the 64-byte swizzle of this row's 16-byte chunks
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint4 q = *reinterpret_cast<const uint4*>(rp + (((2 * half + j) ^ sw) << 4));
        const unsigned lo = (odd_word ? q.y : q.x) >> shift, hi = (odd_word ? q.w : q.z) >> shift;
        fr[j][i] = wa_decode_pair<TA, FB>(lo);
        fr[j][2 + i] = wa_decode_pair<TA, FB>(hi);
      }
    }
  };
  auto release = [&](int stage) {
    if (releaser) mbar_arrive(&empty_bar[stage]);
  };

  int it = 0;
  // The unit count is read again each tile (sizes()): kept in a register
  // through the epilogue it was the one value spilled (bf16 out, BT 256).
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x, sizes()) {
    const int n0 = (unit / tiles_m) * 128, m0 = (unit % tiles_m) * BT;
    float d[R];
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = 0.f;
    // A fragments of a stage's first and second halves. A half is one commit
    // group (two k16 products): while one half's products run, the other's
    // fragments are decoded, so two sets of 8 registers suffice (a set a
    // stage, 2 x 16, spilled at BT 256 beside its 128 accumulators).
    unsigned f0[2][4], f1[2][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) f0[i / 4][i % 4] = f1[i / 4][i % 4] = 0u;
    // Half `half` of stage kt (ring stage st): decode into fr, issue its two
    // products, commit them, and wait until only they are in flight.
    auto issue = [&](int kt, int half, const unsigned char* st, unsigned (&fr)[2][4]) {
      decode(st + X_BYTES, half, fr);
      const unsigned x_addr = smem_addr(st);
      wgmma_pin(fr);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int kk = 2 * half + j;
        WgmmaRS<KT, BT>::run(d, fr[j], wgmma_desc(x_addr + kk * 32, 16, 1024), (kt == 0 && kk == 0) ? 0 : 1);
      }
      wgmma_commit();
      wgmma_wait<1>();
    };
    for (int kt = 0; kt < ktiles; ++kt, ++it) {
      const int s = it % STAGES;
      mbar_wait(&full_bar[s], (it / STAGES) & 1);
      const unsigned char* st = ring + s * STAGE_BYTES;
      issue(kt, 0, st, f0);
      wgmma_pin(f1);  // the previous stage's second half is done: its stage and f1 are free
      if (kt > 0) release((it - 1) % STAGES);
      issue(kt, 1, st, f1);
      wgmma_pin(f0);  // this stage's first half is done: f0 is free
    }
    wgmma_wait<0>();
    wgmma_pin(d);
    wgmma_pin(f0);
    wgmma_pin(f1);
    if (ktiles > 0) release((it - 1) % STAGES);

    // Epilogue: d[4j + 2h + e] is weight row wrow0 + 8h, token 8j + 2t + e.
    // Rows g and g ^ 1 (lanes l and l ^ 4) swap one value: an even row's lane
    // stores token 8j + 2t at rows (g, g + 1), an odd row's lane token
    // 8j + 2t + 1 at rows (g - 1, g).
    const bool even = (g & 1) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int wr = n0 + (h ? wrow1 : wrow0), col = even ? wr : wr - 1;
      // The pair's scales, rows col and col + 1 (clamped: a tile may reach past N).
      const float sb_lo = BS ? b_scale[ip[kWgBScaleCols] ? min(col, N - 1) : 0] : 1.f;
      const float sb_hi = BS ? b_scale[ip[kWgBScaleCols] ? min(col + 1, N - 1) : 0] : 1.f;
#pragma unroll
      for (int j = 0; j < BT / 8; ++j) {
        const float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
        const float other = __shfl_xor_sync(0xffffffffu, even ? v1 : v0, 4);
        const int tok = m0 + 8 * j + 2 * t + (even ? 0 : 1);
        if (tok >= M || col >= N) continue;  // N is a multiple of 16: a pair is wholly in or out
        const float sa = AS ? as_row[ip[kWgAScaleRows] ? tok : 0] : 1.f;
        // (col, col + 1) of token tok, scaled in matmul_wgmma_ws.cuh's order.
        const float lo = (even ? v0 : other) * sa * sb_lo, hi = (even ? other : v1) * sa * sb_hi;
        TO* dst = og + (long)tok * N + col;
        if constexpr (sizeof(TO) == 4) {
          *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
        } else {
          *reinterpret_cast<unsigned*>(dst) = pack2<TO>(lo, hi);
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
