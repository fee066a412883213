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
// Stream-K (ip[kWaSkTiles] = s > 0): the first s tiles' k-steps (s x ktiles
// of them) are cut into equal runs, one a block, before the data-parallel
// tiles s + g, s + g + grid, ... of block g. Where the tile count is not a
// multiple of the SMs (64 tiles at 512 x 4096 x 4096 on 132 SMs, 224 at
// 512 x 4096 x 14336) a block then waits no longer than any other. A tile
// cut between blocks is finished by the last of them to arrive (a ticket of
// the caller's zeroed ticket region, set back to 0 by that block): each writes
// its fp32 partial sums to its slot of `part`; the last adds the other's to
// its own where two blocks share the tile (the caller's plans: a + b is the
// same whichever arrives last), or sums every slot in the blocks' order
// where more do (forced plans), and stores.
#pragma once

#include "matmul_wgmma_wa.cuh"

namespace mlx_flash {

// The two consumer warpgroups' barrier (named barrier 1; the producer warp
// group has left by then).
__device__ __forceinline__ void wa_consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// threadIdx.x and blockIdx.x read again where used (volatile: not one value
// held in a register through the consumers' tiles; ptxas spilled them at
// BT 256 rather than read the special register twice).
__device__ __forceinline__ int wa_thread_index() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}
__device__ __forceinline__ int wa_block_index() {
  int b;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(b));
  return b;
}

// ip[kWaSkTiles]: the stream-K tiles (0: every tile data-parallel).
constexpr int kWaSkTiles = kWgBScaleCols + 1;

// Which block runs which k-steps: block g's stream-K run is k-steps
// [begin(g), begin(g + 1)) of the first sk_tiles tiles (k-step i is tile
// i / ktiles, k-tile i % ktiles); then tiles sk_tiles + g, + grid, ...
struct WaSchedule {
  int units, ktiles, sk_tiles, grid;
  // (k-step counts fit an int: the caller keeps sk_tiles x ktiles below 2^31 / grid.)
  __device__ int sk_steps() const { return sk_tiles * ktiles; }
  __device__ int begin(int g) const { return g * sk_steps() / grid; }
  // The block whose run holds k-step i (< sk_steps()): the largest g with
  // begin(g) <= i, i.e. g * steps / grid < i + 1.
  __device__ int owner(int i) const { return ((i + 1) * grid - 1) / sk_steps(); }
  // Block g's fp32 partial-sum slot for stream-K tile t: 0 for the tile its
  // run starts in, 1 for the one it ends in (a run's middle tiles are whole).
  __device__ int slot(int g, int t) const { return 2 * g + (t == begin(g) / ktiles ? 0 : 1); }
  // Block g's next piece of work: tile `unit`, k-tiles [k0, k1). One cursor
  // (the only value a block keeps between pieces): the k-step in its
  // stream-K run, then, past the run's end, the count of data-parallel tiles
  // it has taken. False when none is left.
  __device__ bool next(int g, int& cursor, int& unit, int& k0, int& k1) const {
    const int end = begin(g + 1);
    if (cursor < end) {
      unit = cursor / ktiles, k0 = cursor % ktiles, k1 = min(ktiles, k0 + end - cursor);
      cursor += k1 - k0;
      return true;
    }
    unit = sk_tiles + g + (cursor - end) * grid, k0 = 0, k1 = ktiles;
    ++cursor;
    return unit < units;
  }
};

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
  WaSchedule sched;
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
  for (int cursor = sched.begin(wa_block_index()), unit, k0, k1;
       sched.next(wa_block_index(), cursor, unit, k0, k1); sizes()) {
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

    if (steps < sched.ktiles) {
      // A cut tile: this block's partial sums to its slot ([j][thread] float4s,
      // coalesced), then the ticket. Stores are fenced before it, the reads of
      // the last block after it, and go through L2 (no stale L1 line).
      float4* slots = reinterpret_cast<float4*>(part);
      constexpr long SLOT = 128 * BT / 4;
      const int me = wa_thread_index();
      float4* mine = slots + sched.slot(wa_block_index(), unit) * SLOT + me;
#pragma unroll
      for (int j = 0; j < R / 4; ++j) __stcg(mine + 256 * j, make_float4(d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]));
      __threadfence();
      wa_consumers_sync();
      // The blocks whose runs share this tile.
      auto c0 = [&] { return sched.owner(unit * sched.ktiles); };
      auto c1 = [&] { return sched.owner(unit * sched.ktiles + sched.ktiles - 1); };
      if (me == 0) {
        unsigned* ticket = const_cast<unsigned*>(tickets) + unit;
        const bool last = atomicAdd(ticket, 1u) == (unsigned)(c1() - c0());
        if (last) *ticket = 0u;  // every other block of the tile has drawn: ready for a later call
        finishes[0] = last;
      }
      wa_consumers_sync();
      if (!finishes[0]) continue;
      __threadfence();
      // Adds a slot's partial sums to d. Four loads in flight at a time: all
      // of a slot's 32 (BT 256) beside the 128 sums would not fit the
      // registers (eight spilled a value).
      auto add_slot = [&](int cb) {
        const float4* src = slots + sched.slot(cb, unit) * SLOT + wa_thread_index();
#pragma unroll
        for (int j0 = 0; j0 < R / 4; j0 += 4) {
          float4 v[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) v[j] = __ldcg(src + 256 * (j0 + j));
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float* dj = d + 4 * (j0 + j);
            dj[0] += v[j].x, dj[1] += v[j].y, dj[2] += v[j].z, dj[3] += v[j].w;
          }
          asm volatile("" ::: "memory");  // (keeps the next four loads behind these sums)
        }
      };
      if (c1() - c0() == 1) {
        // Two blocks (wa_stream_k_tiles' plans): this block's sums plus the
        // other's, the same whichever arrives last (a + b = b + a).
        add_slot(c0() + c1() - wa_block_index());
      } else {
        // More (a forced plan): every slot in the blocks' order, this block's
        // own read back too, so the sums do not depend on who arrives last.
#pragma unroll
        for (int i = 0; i < R; ++i) d[i] = 0.f;
        for (int cb = c0(); cb <= c1(); ++cb) add_slot(cb);
      }
    }

    const int n0 = (unit / tiles_m) * 128, m0 = (unit % tiles_m) * BT;
    // (This batch's output and a-scale rows, found here: held through the tile they were spilled.)
    TO* og = out + (long)z * M * N;
    const float* as_row = AS ? a_scale + (ip[kWgAScaleBatched] ? (long)z * (ip[kWgAScaleRows] ? M : 1) : 0) : nullptr;
    // Epilogue: d[4j + 2h + e] is weight row wrow0 + 8h, token 8j + 2t + e.
    // Rows g and g ^ 1 (lanes l and l ^ 4) swap one value: an even row's lane
    // stores token 8j + 2t at rows (g, g + 1), an odd row's lane token
    // 8j + 2t + 1 at rows (g - 1, g).
    // (g & 1 from the thread index again: held through the tile it was spilled, bf16 at BT 256.)
    const bool even = (wa_thread_index() & 4) == 0;
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
