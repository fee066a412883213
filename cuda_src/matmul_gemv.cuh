// matmul2d for few rows (decode: M <= 16) with b an [N][K] weight (an
// nn.Linear weight, transpose_b), fp8 codes or 16-bit: bound by reading b
// once, so b streams through registers at full width and never touches
// shared memory.
//
// The product is computed transposed, out^T = b a^T, on m16n8k16 mma.sync:
// the weight is the A operand (16 rows of b per warp tile) and a the B
// operand (8 of its rows per n8 tile, MT tiles). Both operands are private
// to the kernel, so the k order inside a 64-wide chunk is ours to choose:
// lane (g, t) holds k = 16t .. 16t+15 of the chunk for its rows, and in
// k-step s its fragment slots {2t, 2t+1, 2t+8, 2t+9} stand for k = 16t + 4s
// + {0, 1, 2, 3} on both operands alike. Each lane's share of a chunk is then
// one 16-byte load per row of fp8 codes (two of 16-bit values) and two
// 16-byte loads per row of a: no shuffles, no shared staging.
//
// A block of 8 warps owns 16 rows of b (16 output columns); its warps take
// interleaved 64-wide K chunks and their partial sums meet in shared memory.
// The wrapper pads K to a multiple of 16 (a chunk's 16-value pieces are
// wholly inside or outside); rows of b beyond N and of a beyond M read zeros.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "mma.cuh"

namespace mlx_flash {

constexpr int kGvWarps = 8, kGvRows = 16, kGvUnroll = 4;

// 16 values of b starting at element `off` of a row, as 8 registers of two C values.
template <typename C, typename TB, int FB>
__device__ __forceinline__ void gemv_load_b(const TB* row, long off, bool ok, unsigned (&w)[8]) {
  if constexpr (FB != 0) {
    const uint4 raw = ok ? __ldg(reinterpret_cast<const uint4*>(row + off)) : make_uint4(0, 0, 0, 0);
    decode16<C, FB>(raw, reinterpret_cast<uint4(&)[2]>(w));
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(row + off);
    const uint4 lo = ok ? __ldg(p) : make_uint4(0, 0, 0, 0), hi = ok ? __ldg(p + 1) : make_uint4(0, 0, 0, 0);
    w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
    w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
  }
}

// a: [batch, M, K] (C); b: [batch or 1, N, K]; out [batch, M, N].
template <typename C, typename TB, typename TO, int FB, bool AS, bool BS, int MT>
__device__ void matmul_gemv(const C* a, const TB* b, const float* a_scale, const float* b_scale, const int* ip,
                            TO* out) {
  const int M = ip[0], N = ip[1], K = ip[2];
  const int z = blockIdx.z, n0 = blockIdx.x * kGvRows;
  const C* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[3] ? (long)z * N * K : 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // This lane's two rows of b and MT rows of a (clamped in range; zeroed by `ok` flags).
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

  const int chunks = (K + 63) / 64;
  for (int c0 = warp; c0 < chunks; c0 += kGvWarps * kGvUnroll) {
    // All loads of kGvUnroll chunks first (bytes in flight), then the math.
    unsigned w0[kGvUnroll][8], w1[kGvUnroll][8], x[kGvUnroll][MT][8];
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u) {
      const int k = (c0 + u * kGvWarps) * 64 + 16 * t;
      const bool in = c0 + u * kGvWarps < chunks && k < K;
      gemv_load_b<C, TB, FB>(brow0, k, in && b_ok0, w0[u]);
      gemv_load_b<C, TB, FB>(brow1, k, in && b_ok1, w1[u]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) gemv_load_b<C, C, 0>(arow[mt], k, in && a_ok[mt], x[u][mt]);
    }
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u)
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const unsigned af[4] = {w0[u][2 * s], w1[u][2 * s], w0[u][2 * s + 1], w1[u][2 * s + 1]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma16816<C>(acc[mt], af, x[u][mt][2 * s], x[u][mt][2 * s + 1]);
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
