// matmul2d for few rows (decode: M <= 16) with b an [N][K] weight (an
// nn.Linear weight, transpose_b), fp8 codes or 16-bit: bound by reading b
// once, so b streams through registers at full width and never touches
// shared memory.
//
// The product is computed transposed, out^T = b a^T, on m16n8k16 mma.sync:
// the weight is the A operand (16 rows of b per row tile) and a the B operand
// (8 of its rows per n8 tile, MT tiles). Both operands are private to the
// kernel, so the k order inside a chunk is ours to choose: lane (g, t) holds
// a run of P consecutive k (its "piece": 32 bytes of the weight row, i.e.
// P = 32 fp8 codes or 16 16-bit values) of its rows, and in k-step s its
// fragment slots {2t, 2t+1, 2t+8, 2t+9} stand for piece values 4s + {0..3}
// on both operands alike. A lane's share of a chunk (4P wide) is then two
// 16-byte loads per weight row and 2P/16 per row of a: no shuffles, no
// shared staging, whole 128-byte lines of each weight row per warp load.
// (SECTOR = 1 places the piece's two words 64 bytes apart instead, so that
// each load instruction reads whole 32-byte sectors: gemv_wk below.)
//
// Tuning (template arguments, measured on the H200 by bench.cuda_matmul):
//   W   warps per block; they take interleaved chunks of K and their partial
//       sums meet in shared memory at the end;
//   RT  row tiles of 16 weight rows per warp: the fragments of a (loaded
//       once per chunk) serve RT tiles, so fewer load instructions per weight
//       byte, and 16 RT output columns per block;
//   STAGES  > 0: each warp streams its chunks through a ring of STAGES
//       chunks in shared memory by cp.async (STAGES - 1 in flight while one
//       is computed: the bytes in flight are fixed, not left to the
//       compiler's schedule, which sinks plain loads next to their use);
//   U   (STAGES = 0) chunks whose loads are issued before any math, as
//       registers (the compiler interleaves them with the math regardless).
// A block may own several groups of 16 RT rows (the grid is capped by the
// wrapper; then the blocks stay resident and sweep the rows, no tail wave).
// Loads of a beyond its M rows are skipped (predicated), not issued. The
// wrapper pads K to a multiple of 16 (a lane's piece is wholly inside or
// outside when P = 16; for P = 32 the two halves are checked apart); rows of
// b beyond N and of a beyond M read zeros.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "mma.cuh"

namespace mlx_flash {

// One 16-byte word, zero where !ok, as one predicated load inside one asm
// statement: no branch for the compiler to sink the load into, so every load
// of a chunk batch is issued before the first mma (asm volatile keeps their
// order). STREAM (the weight): not kept in L1 (the rows of a are, every row
// tile reads them), with a 256-byte L2 prefetch.
template <bool STREAM>
__device__ __forceinline__ uint4 gemv_load_word(const void* p, bool ok) {
#ifdef __CUDA_ARCH__
  uint4 v;
  if constexpr (STREAM) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\nmov.b32 %0, 0;\nmov.b32 %1, 0;\nmov.b32 %2, 0;\nmov.b32 %3, 0;\n"
        "@p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"((int)ok));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\nmov.b32 %0, 0;\nmov.b32 %1, 0;\nmov.b32 %2, 0;\nmov.b32 %3, 0;\n"
        "@p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"((int)ok));
  }
  return v;
#else
  return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
#endif
}

// Where lane t's words lie in a chunk (element offsets from the chunk's
// start; E values per 16-byte word of the weight). SECTOR = 0: the lane's
// piece is one run of 32 bytes, word i at 2Et + Ei, so one load instruction
// (word i of all lanes) reads half of every 32-byte sector of the rows and the
// second instruction the other half: two L2 requests per sector (the first
// cannot leave the sector in L1: the weight streams with L1::no_allocate).
// SECTOR = 1: word i at Et + 4Ei, so the four lanes of a row read 64
// contiguous bytes per instruction, two whole sectors, each requested once.
// The piece's k order is ours (both operands are the kernel's own
// registers): a's words follow the weight's, word j under weight word
// j / (E / 8), so gemv_chunk_math is the same for both layouts.
template <int E, bool SECTOR>
__device__ __forceinline__ int gemv_wk(int t, int i) {
  return SECTOR ? E * t + 4 * E * i : 2 * E * t + E * i;
}
template <int E, bool SECTOR>
__device__ __forceinline__ int gemv_xk(int t, int j) {
  return gemv_wk<E, SECTOR>(t, j / (E / 8)) + 8 * (j % (E / 8));
}

// a: [batch, M, K] (C); b: [batch or 1, N, K]; out [batch, M, N].
// Dynamic shared memory of the cp.async path (STAGES > 0): per warp, STAGES
// chunks of RT row tiles (4 words per lane each) and MT tiles of a (XW words).
__host__ __device__ constexpr int matmul_gemv_smem(int warps, int stages, int row_tiles, int a_tiles, int b_bytes) {
  return warps * stages * (row_tiles * 4 + a_tiles * (b_bytes == 1 ? 4 : 2)) * 32 * 16;
}

// The math of one chunk: decode the weight words (fp8) and run the RT x MT
// tiles' k-steps on them.
template <typename C, int FB, int P, int MT, int RT, int XW>
__device__ __forceinline__ void gemv_chunk_math(float (&acc)[RT][MT][4], const uint4 (&w)[RT][2][2],
                                                const uint4 (&x)[MT][XW]) {
  const unsigned* xr[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xr[mt] = reinterpret_cast<const unsigned*>(x[mt]);
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    // The piece as registers of two C values: P / 2 per weight row.
    unsigned wa[P / 2], wb[P / 2];
    if constexpr (FB != 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        decode16<C, FB>(w[rt][0][i], reinterpret_cast<uint4(&)[2]>(wa[8 * i]));
        decode16<C, FB>(w[rt][1][i], reinterpret_cast<uint4(&)[2]>(wb[8 * i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        *reinterpret_cast<uint4*>(&wa[4 * i]) = w[rt][0][i];
        *reinterpret_cast<uint4*>(&wb[4 * i]) = w[rt][1][i];
      }
    }
#pragma unroll
    for (int s = 0; s < P / 4; ++s) {
      const unsigned af[4] = {wa[2 * s], wb[2 * s], wa[2 * s + 1], wb[2 * s + 1]};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma16816<C>(acc[rt][mt], af, xr[mt][2 * s], xr[mt][2 * s + 1]);
    }
  }
}

template <typename C, typename TB, typename TO, int FB, bool AS, bool BS, int MT, int W, int RT, int U, int STAGES,
          bool SECTOR = false>
__device__ void matmul_gemv(const C* a, const TB* b, const float* a_scale, const float* b_scale, const int* ip,
                            TO* out) {
  constexpr int P = 32 / sizeof(TB);      // k values per lane per chunk (a 32-byte piece of a weight row)
  constexpr int CHUNK = 4 * P;            // k values per chunk
  constexpr int XW = P * 2 / 16;          // 16-byte words of a's piece
  constexpr int E = 16 / sizeof(TB);      // weight values per 16-byte word
  constexpr int ROWS = 16 * RT;           // weight rows (output columns) per row group
  constexpr int SLOTS = RT * MT * 4;      // accumulator slots per lane
  const int M = ip[0], N = ip[1], K = ip[2];
  const int z = blockIdx.z;
  const C* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[3] ? (long)z * N * K : 0);
  TO* og = out + (long)z * M * N;
  const float* as_rows = AS ? a_scale + (ip[4] ? (long)z * (ip[5] ? M : 1) : 0) : nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // This lane's MT rows of a (clamped in range; never loaded where !a_ok).
  const C* arow[MT];
  bool a_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    a_ok[mt] = 8 * mt + g < M;
    arow[mt] = ag + (long)min(8 * mt + g, M - 1) * K;
  }
  const int chunks = (K + CHUNK - 1) / CHUNK;
  __shared__ float part[W][SLOTS][32];

  for (int n0 = blockIdx.x * ROWS; n0 < N; n0 += gridDim.x * ROWS) {
    // This lane's rows of b: g and g + 8 of each row tile.
    const TB* brow[RT][2];
    bool b_ok[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + 16 * rt + g + 8 * h;
        b_ok[rt][h] = n < N;
        brow[rt][h] = bg + (long)min(n, N - 1) * K;
      }
    float acc[RT][MT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc[rt][mt][0] = acc[rt][mt][1] = acc[rt][mt][2] = acc[rt][mt][3] = 0.f;

    if constexpr (STAGES > 0) {
      // Each warp streams its chunks (warp, warp + W, ...) through its own
      // ring of STAGES stages by cp.async: STAGES - 1 chunks stay in flight
      // while one is computed, whatever the compiler schedules. A lane reads
      // back only the words it copied itself (no barrier).
      extern __shared__ __align__(16) unsigned char gemv_ring[];
      constexpr int STAGE_WORDS = RT * 4 + MT * XW;
      uint4* ring = reinterpret_cast<uint4*>(gemv_ring) + warp * STAGES * STAGE_WORDS * 32 + lane;
      const int mine = warp < chunks ? (chunks - warp + W - 1) / W : 0;
      auto issue = [&](int j) {
        uint4* st = ring + (j % STAGES) * STAGE_WORDS * 32;
        const int kc = (warp + j * W) * CHUNK;
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int kw = kc + gemv_wk<E, SECTOR>(t, i);
              const bool ok = b_ok[rt][h] && kw < K;
              cp_async16(st + ((rt * 2 + h) * 2 + i) * 32, ok ? (const void*)(brow[rt][h] + kw) : bg, ok);
            }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < XW; ++i) {
            const int kx = kc + gemv_xk<E, SECTOR>(t, i);
            const bool ok = a_ok[mt] && kx < K;
            cp_async16(st + (RT * 4 + mt * XW + i) * 32, ok ? (const void*)(arow[mt] + kx) : ag, ok);
          }
      };
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) {
        if (s < mine) issue(s);
        cp_async_commit();
      }
      for (int j = 0; j < mine; ++j) {
        // Refill the stage computed in step j - 1 (its words are in registers, used).
        if (j + STAGES - 1 < mine) issue(j + STAGES - 1);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        const uint4* st = ring + (j % STAGES) * STAGE_WORDS * 32;
        uint4 w[RT][2][2], x[MT][XW];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < 2; ++i) w[rt][h][i] = st[((rt * 2 + h) * 2 + i) * 32];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < XW; ++i) x[mt][i] = st[(RT * 4 + mt * XW + i) * 32];
        gemv_chunk_math<C, FB, P, MT, RT, XW>(acc, w, x);
      }
      cp_async_wait<0>();
    } else {
      for (int c0 = warp; c0 < chunks; c0 += W * U) {
        // All loads of U chunks first (bytes in flight, as far as the
        // compiler keeps them so), then the math.
        uint4 w[U][RT][2][2], x[U][MT][XW];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int kc = (c0 + u * W) * CHUNK;
          const bool in = c0 + u * W < chunks;
          // Words of the weight piece: E values each; K is a multiple of 16, so a word is wholly in or out.
          int kw[2], kx[XW];
          bool wok[2], xok[XW];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            kw[i] = kc + gemv_wk<E, SECTOR>(t, i);
            wok[i] = in && kw[i] < K;
          }
#pragma unroll
          for (int i = 0; i < XW; ++i) {
            kx[i] = kc + gemv_xk<E, SECTOR>(t, i);
            xok[i] = in && kx[i] < K;
          }
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int i = 0; i < 2; ++i)
                w[u][rt][h][i] = gemv_load_word<true>(brow[rt][h] + kw[i], wok[i] && b_ok[rt][h]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < XW; ++i) x[u][mt][i] = gemv_load_word<false>(arow[mt] + kx[i], xok[i] && a_ok[mt]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) gemv_chunk_math<C, FB, P, MT, RT, XW>(acc, w[u], x[u]);
      }
    }

    // Partial sums of the W warps meet in shared memory; each warp finishes
    // every W-th slot.
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][(rt * MT + mt) * 4 + e][lane] = acc[rt][mt][e];
    __syncthreads();
    for (int slot = warp; slot < SLOTS; slot += W) {
      float v = 0.f;
#pragma unroll
      for (int w2 = 0; w2 < W; ++w2) v += part[w2][slot][lane];
      const int rt = slot / (MT * 4), mt = (slot / 4) % MT, e = slot % 4;
      // C fragment: row (of b) g + 8 (e / 2), column (row of a) 2t + (e % 2).
      const int n = n0 + 16 * rt + g + 8 * (e / 2), m = 8 * mt + 2 * t + (e % 2);
      if (n >= N || m >= M) continue;
      if (AS) v *= as_rows[ip[5] ? m : 0];
      if (BS) v *= b_scale[ip[6] ? n : 0];
      og[(long)m * N + n] = from_float<TO>(v);
    }
    __syncthreads();  // part is reused by the next row group
  }
}

}  // namespace mlx_flash
