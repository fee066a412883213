// matmul2d for few rows (decode: M <= 16) with b an [N][K] weight (an
// nn.Linear weight, transpose_b), fp8 codes or 16-bit: bound by reading b
// once, so b streams through registers at full width and never touches
// shared memory.
//
// The product is computed transposed, out^T = b a^T, on m16n8k16 mma.sync:
// the weight is the A operand (16 rows of b per warp tile) and a the B
// operand (8 of its rows per n8 tile, MT tiles). Both operands are private
// to the kernel, so the k order inside a chunk is ours to choose: lane (g, t)
// holds a run of P consecutive k (its "piece": 32 bytes of the weight row,
// i.e. P = 32 fp8 codes or 16 16-bit values) of its rows, and in k-step s its
// fragment slots {2t, 2t+1, 2t+8, 2t+9} stand for piece values 4s + {0..3}
// on both operands alike. A lane's share of a chunk (4P wide) is then two
// 16-byte loads per weight row and 2P/16 per row of a: no shuffles, no
// shared staging, whole 128-byte lines of each weight row per warp load.
//
// A block of 8 warps owns 16 rows of b (16 output columns); its warps take
// interleaved chunks and their partial sums meet in shared memory. The
// wrapper pads K to a multiple of 16 (a lane's piece is wholly inside or
// outside when P = 16; for P = 32 the two halves are checked apart); rows of
// b beyond N and of a beyond M read zeros.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "mma.cuh"

namespace mlx_flash {

constexpr int kGvWarps = 8, kGvRows = 16, kGvUnroll = 4;

// 16-byte words of a row from element `off`, zeros where !ok. The loads are
// unconditional (from the row's start where !ok) so they can all be in flight
// before the first use.
template <int WORDS, typename T>
__device__ __forceinline__ void gemv_load(uint4 (&v)[WORDS], const T* row, long off, const bool (&ok)[WORDS]) {
#pragma unroll
  for (int i = 0; i < WORDS; ++i) {
    v[i] = __ldg(reinterpret_cast<const uint4*>(row + (ok[i] ? off : 0)) + (ok[i] ? i : 0));
    if (!ok[i]) v[i] = make_uint4(0, 0, 0, 0);
  }
}

// a: [batch, M, K] (C); b: [batch or 1, N, K]; out [batch, M, N].
template <typename C, typename TB, typename TO, int FB, bool AS, bool BS, int MT>
__device__ void matmul_gemv(const C* a, const TB* b, const float* a_scale, const float* b_scale, const int* ip,
                            TO* out) {
  constexpr int P = 32 / sizeof(TB);      // k values per lane per chunk (a 32-byte piece of a weight row)
  constexpr int CHUNK = 4 * P;            // k values per chunk
  constexpr int XW = P * 2 / 16;          // 16-byte words of a's piece
  const int M = ip[0], N = ip[1], K = ip[2];
  const int z = blockIdx.z, n0 = blockIdx.x * kGvRows;
  const C* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[3] ? (long)z * N * K : 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // This lane's two rows of b and MT rows of a (clamped in range; zeroed by the ok flags).
  const bool b_ok0 = n0 + g < N, b_ok1 = n0 + g + 8 < N;
  const TB* brow0 = bg + (long)min(n0 + g, N - 1) * K;
  const TB* brow1 = bg + (long)min(n0 + g + 8, N - 1) * K;
  const C* arow[MT];
  bool a_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    a_ok[mt] = 8 * mt + g < M;
    arow[mt] = ag + (long)min(8 * mt + g, M - 1) * K;
  }

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

  const int chunks = (K + CHUNK - 1) / CHUNK;
  for (int c0 = warp; c0 < chunks; c0 += kGvWarps * kGvUnroll) {
    // All loads of kGvUnroll chunks first (bytes in flight), then the math.
    uint4 w0[kGvUnroll][2], w1[kGvUnroll][2], x[kGvUnroll][MT][XW];
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u) {
      const int k = (c0 + u * kGvWarps) * CHUNK + P * t;
      const bool in = c0 + u * kGvWarps < chunks;
      // Words of the weight piece: 16 values each (fp8) or 8 (16-bit); K is a multiple of 16.
      bool wok[2], xok[XW];
#pragma unroll
      for (int i = 0; i < 2; ++i) wok[i] = in && k + i * (16 / sizeof(TB)) < K;
#pragma unroll
      for (int i = 0; i < XW; ++i) xok[i] = in && k + i * 8 < K;
      bool ok0[2] = {wok[0] && b_ok0, wok[1] && b_ok0}, ok1[2] = {wok[0] && b_ok1, wok[1] && b_ok1};
      gemv_load<2>(w0[u], brow0, k, ok0);
      gemv_load<2>(w1[u], brow1, k, ok1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        bool ok[XW];
#pragma unroll
        for (int i = 0; i < XW; ++i) ok[i] = xok[i] && a_ok[mt];
        gemv_load<XW>(x[u][mt], arow[mt], k, ok);
      }
    }
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u) {
      // The piece as registers of two C values: P / 2 per weight row, P / 2 per row of a.
      unsigned wa[P / 2], wb[P / 2];
      if constexpr (FB != 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          decode16<C, FB>(w0[u][i], reinterpret_cast<uint4(&)[2]>(wa[8 * i]));
          decode16<C, FB>(w1[u][i], reinterpret_cast<uint4(&)[2]>(wb[8 * i]));
        }
      } else {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          *reinterpret_cast<uint4*>(&wa[4 * i]) = w0[u][i];
          *reinterpret_cast<uint4*>(&wb[4 * i]) = w1[u][i];
        }
      }
      const unsigned* xr[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xr[mt] = reinterpret_cast<const unsigned*>(x[u][mt]);
#pragma unroll
      for (int s = 0; s < P / 4; ++s) {
        const unsigned af[4] = {wa[2 * s], wb[2 * s], wa[2 * s + 1], wb[2 * s + 1]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma16816<C>(acc[mt], af, xr[mt][2 * s], xr[mt][2 * s + 1]);
      }
    }
  }

  // Partial sums of the 8 warps meet in shared memory; warp 0 finishes.
  __shared__ float part[kGvWarps][MT * 4][32];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[warp][mt * 4 + e][lane] = acc[mt][e];
  __syncthreads();
  if (warp != 0) return;
  TO* og = out + (long)z * M * N;
  const float* as_rows = AS ? a_scale + (ip[4] ? (long)z * (ip[5] ? M : 1) : 0) : nullptr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kGvWarps; ++w) v += part[w][mt * 4 + e][lane];
      // C fragment: row (of b) g + 8 (e / 2), column (row of a) 2t + (e % 2).
      const int n = n0 + g + 8 * (e / 2), m = 8 * mt + 2 * t + (e % 2);
      if (n >= N || m >= M) continue;
      if (AS) v *= as_rows[ip[5] ? m : 0];
      if (BS) v *= b_scale[ip[6] ? n : 0];
      og[(long)m * N + n] = from_float<TO>(v);
    }
}

}  // namespace mlx_flash
