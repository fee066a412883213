// Stream-K form of matmul_wgmma_wa.cuh's weight-as-A kernel (FP8Linear's
// prefill product on Hopper): the same roles, ring, decode, products and
// epilogue (read that header first), over a schedule that may cut a tile's
// k-steps between blocks. The route takes it where stream-K tiles are (since
// session 24, below half a wave) or a plan forces a count; with 0 stream-K
// tiles its schedule is that kernel's (every tile whole: tile g, g + grid,
// ...) and so are its bits. Only this form has tiles of 192 tokens (BT 192,
// m64n192 products; session 26): where 256-token tiles leave a partial wave
// (a 3B Llama's 2048 x 3072 x 3072: 192 tiles of 256 on 132 SMs, two waves,
// the second under half full), 192-token tiles fill two waves (264 tiles),
// each ~0.8 of the time (H100, part s26b: 70 us against 86).
// (Session 26 also tried decode loads of the two 32-bit words a lane uses
// instead of its row's whole 16-byte chunk, half the shared-memory
// wavefronts: the same time at BT 128, 192 and 256 on an H100, so shared
// memory does not set the pace; not kept.)
//
// Stream-K (ip[kWaSkTiles] = s > 0 stream-K tiles): stream_k.cuh's schedule
// and its ending of a cut tile, shared with the native fp8 kernel's form.
#pragma once

#include "matmul_wgmma_wa.cuh"
#include "stream_k.cuh"

namespace mlx_flash {

// ip[kWaSkTiles]: the stream-K tiles (0: every tile data-parallel).
constexpr int kWaSkTiles = kWgBScaleCols + 1;

template <typename TA, typename TO, int FB, bool AS, bool BS, int BT, int STAGES>
__device__ void matmul_wgmma_wa_sk(const TA* a, const uint8_t* b, const float* a_scale, const float* b_scale,
                                   const int* ip, const uint8_t* tmpl, const unsigned* tickets, TO* out,
                                   uint8_t* tmaps, float* part) {
  static_assert(sizeof(TA) == 2 && (FB == 1 || FB == 2), "a 16-bit x and fp8 (e4m3 / e5m2) weight codes");
  // (BT a multiple of 32: a fixup adds a slot's BT / 8 float4s four at a time.)
  static_assert(BT == 128 || BT == 192 || BT == 256, "tiles of 128, 192 or 256 tokens");
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
  int M, N, K, tiles_m;
  StreamKSchedule sched;
  auto sizes = [&] {
    M = ip[kWgM], N = ip[kWgN], K = ip[kWgK];
    tiles_m = (M + BT - 1) / BT;
    sched = {tiles_m * ((N + 127) / 128), (K + 63) / 64, ip[kWaSkTiles], (int)gridDim.x};
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
    for (int cursor = sched.begin(blockIdx.x), unit, k0, k1; sched.next(blockIdx.x, cursor, unit, k0, k1);) {
      const int n0 = (unit / tiles_m) * 128, m0 = (unit % tiles_m) * BT;
      for (int kt = k0; kt < k1; ++kt, ++it) {
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
  __shared__ int finishes[1];  // the ticket's verdict: this block finishes a cut tile
  // The sizes are read again after each piece of work (sizes()): values kept
  // in registers through the products and the epilogue were spilled (BT 256).
  for (int cursor = sched.begin(sk_block_index()), unit, k0, k1;
       sched.next(sk_block_index(), cursor, unit, k0, k1); sizes()) {
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
    auto issue = [&](int step, int half, const unsigned char* st, unsigned (&fr)[2][4]) {
      decode(st + X_BYTES, half, fr);
      const unsigned x_addr = smem_addr(st);
      wgmma_pin(fr);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int kk = 2 * half + j;
        WgmmaRS<KT, BT>::run(d, fr[j], wgmma_desc(x_addr + kk * 32, 16, 1024), (step == 0 && kk == 0) ? 0 : 1);
      }
      wgmma_commit();
      wgmma_wait<1>();
    };
    // (The k-steps counted from the piece's first: fewer values held through the loop than k0 and k1.)
    const int steps = k1 - k0;
    for (int step = 0; step < steps; ++step, ++it) {
      const int s = it % STAGES;
      mbar_wait(&full_bar[s], (it / STAGES) & 1);
      const unsigned char* st = ring + s * STAGE_BYTES;
      issue(step, 0, st, f0);
      wgmma_pin(f1);  // the previous stage's second half is done: its stage and f1 are free
      if (step > 0) release((it - 1) % STAGES);
      issue(step, 1, st, f1);
      wgmma_pin(f0);  // this stage's first half is done: f0 is free
    }
    wgmma_wait<0>();
    wgmma_pin(d);
    wgmma_pin(f0);
    wgmma_pin(f1);
    release((it - 1) % STAGES);  // a piece of work has one k-step or more

    // A cut tile: finished by the last of its blocks to arrive (stream_k.cuh).
    if (steps < sched.ktiles && !stream_k_finish<0>(d, part, tickets, sched, unit, finishes)) continue;

    const int n0 = (unit / tiles_m) * 128, m0 = (unit % tiles_m) * BT;
    // (This batch's output and a-scale rows, found here: held through the tile they were spilled.)
    TO* og = out + (long)z * M * N;
    const float* as_row = AS ? a_scale + (ip[kWgAScaleBatched] ? (long)z * (ip[kWgAScaleRows] ? M : 1) : 0) : nullptr;
    // Epilogue: d[4j + 2h + e] is weight row wrow0 + 8h, token 8j + 2t + e.
    // Rows g and g ^ 1 (lanes l and l ^ 4) swap one value: an even row's lane
    // stores token 8j + 2t at rows (g, g + 1), an odd row's lane token
    // 8j + 2t + 1 at rows (g - 1, g).
    // (g & 1 from the thread index again: held through the tile it was spilled, bf16 at BT 256.)
    const bool even = (sk_thread_index() & 4) == 0;
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

// (The launch bounds of this translation unit's one kernel: the __global__
// redefinition at the end of matmul_wgmma_wa.cuh, included above.)
