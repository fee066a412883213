// Stream-K schedules of the persistent Hopper GEMMs (matmul_wgmma_wa_sk.cuh:
// FP8Linear's weight-as-A product; matmul_wgmma_ws.cuh with SK: the native
// fp8 product): which block runs which k-steps of which output tile, and how
// the blocks that share a cut tile add their sums.
//
// ip[...] = s > 0 stream-K tiles: the first s tiles' k-steps (s x ktiles of
// them) are cut into equal runs, one a block, before the data-parallel tiles
// s + g, s + g + grid, ... of block g. Where the tile count is not a multiple
// of the SMs a block then waits no longer than any other; below half a wave
// (grid = a multiple of s) each shared tile is split into grid / s equal
// runs. With s = 0 the schedule is the plain persistent one (tile g, g + grid,
// ...). (A kernel whose plain form must stay the code it was keeps its own
// loop there: matmul_wgmma_ws.cuh, where even a compile-time 0 through this
// schedule made ptxas serialise the wgmma of some plans.)
//
// A tile cut between blocks is finished by the last of them to arrive (a
// ticket of the caller's zeroed ticket region, set back to 0 by that block):
// each writes its fp32 partial sums to its slot of `part`; the last adds the
// other's to its own where two blocks share the tile (a + b is the same
// whichever arrives last), or sums every slot in the blocks' order where more
// do, and stores.
#pragma once

namespace mlx_flash {

// The two consumer warpgroups' barrier (named barrier 1 over 256 threads; the
// producer warpgroup never takes part).
__device__ __forceinline__ void sk_consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// threadIdx.x and blockIdx.x read again where used (volatile: not one value
// held in a register through the consumers' tiles; ptxas spilled them at
// BT 256 of the weight-as-A kernel rather than read the special register twice).
__device__ __forceinline__ int sk_thread_index() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}
__device__ __forceinline__ int sk_block_index() {
  int b;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(b));
  return b;
}

// Which block runs which k-steps: block g's stream-K run is k-steps
// [begin(g), begin(g + 1)) of the first sk_tiles tiles (k-step i is tile
// i / ktiles, k-tile i % ktiles); then tiles sk_tiles + g, + grid, ...
struct StreamKSchedule {
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

// The end of a piece of work that is part of a cut tile `unit`, run by the
// 256 consumer threads (threads FIRST .. FIRST + 255; me = tid - FIRST, the
// fragment order of d, read again where used: held through the function it
// cost the weight-as-A kernel a spill at BT 256): this block's
// partial sums d go to its slot of `part` ([j][thread] float4s, coalesced),
// then the ticket. True where this block arrived last: d then holds the
// tile's whole sum (and the caller stores it); false where another block
// will. Stores are fenced before the ticket, the last block's reads after
// it, and go through L2 (no stale L1 line). `verdict` is one shared int.
template <int FIRST, int R>
__device__ __forceinline__ bool stream_k_finish(float (&d)[R], float* part, const unsigned* tickets,
                                                const StreamKSchedule& sched, int unit, int* verdict) {
  static_assert(R % 16 == 0, "a slot is added four float4s a thread at a time");
  float4* slots = reinterpret_cast<float4*>(part);
  constexpr long SLOT = 256 * R / 4;
  const int me = sk_thread_index() - FIRST;
  float4* mine = slots + sched.slot(sk_block_index(), unit) * SLOT + me;
#pragma unroll
  for (int j = 0; j < R / 4; ++j) __stcg(mine + 256 * j, make_float4(d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]));
  __threadfence();
  sk_consumers_sync();
  // The blocks whose runs share this tile.
  auto c0 = [&] { return sched.owner(unit * sched.ktiles); };
  auto c1 = [&] { return sched.owner(unit * sched.ktiles + sched.ktiles - 1); };
  if (me == 0) {
    unsigned* ticket = const_cast<unsigned*>(tickets) + unit;
    const bool last = atomicAdd(ticket, 1u) == (unsigned)(c1() - c0());
    if (last) *ticket = 0u;  // every other block of the tile has drawn: ready for a later call
    verdict[0] = last;
  }
  sk_consumers_sync();
  if (!verdict[0]) return false;
  __threadfence();
  // Adds a slot's partial sums to d. Four loads in flight at a time: all of a
  // slot's 32 (the weight-as-A kernel's BT 256) beside the 128 sums would not
  // fit the registers (eight spilled a value).
  auto add_slot = [&](int cb) {
    const float4* src = slots + sched.slot(cb, unit) * SLOT + (sk_thread_index() - FIRST);
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
    // Two blocks (the planners' splits in two): this block's sums plus the
    // other's, the same whichever arrives last (a + b = b + a).
    add_slot(c0() + c1() - sk_block_index());
  } else {
    // More: every slot in the blocks' order, this block's own read back too,
    // so the sums do not depend on who arrives last.
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = 0.f;
    for (int cb = c0(); cb <= c1(); ++cb) add_slot(cb);
  }
  return true;
}

}  // namespace mlx_flash
