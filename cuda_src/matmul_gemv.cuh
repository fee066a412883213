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

constexpr int kGvWarps = 8, kGvRows = 16;

// The 16 values of a row from element `off` as stored (16 bytes of fp8 codes,
// 32 of 16-bit values); zeros where !ok.
template <typename T>
struct Piece16 { uint4 v[sizeof(T)]; };
template <typename T>
__device__ __forceinline__ Piece16<T> gemv_load(const T* row, long off, bool ok) {
  Piece16<T> p;
  const uint4* src = reinterpret_cast<const uint4*>(row + off);
#pragma unroll
  for (int i = 0; i < (int)sizeof(T); ++i) p.v[i] = ok ? __ldg(src + i) : make_uint4(0, 0, 0, 0);
  return p;
}
// ... as 8 registers of two C values (fp8 codes decoded exactly).
template <typename C, int F, typename T>
__device__ __forceinline__ void gemv_unpack(const Piece16<T>& p, unsigned (&w)[8]) {
  if constexpr (F != 0) {
    decode16<C, F>(p.v[0], reinterpret_cast<uint4(&)[2]>(w));
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      w[4 * i] = p.v[i].x; w[4 * i + 1] = p.v[i].y; w[4 * i + 2] = p.v[i].z; w[4 * i + 3] = p.v[i].w;
    }
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
  // Chunks in flight per warp: 1 KiB of fp8 weight each (2 KiB at 16 bits);
  // fp8 takes twice as many to keep as many bytes in flight.
  constexpr int kGvUnroll = (FB != 0 && MT == 1) ? 8 : 4;

  const int chunks = (K + 63) / 64;
  for (int c0 = warp; c0 < chunks; c0 += kGvWarps * kGvUnroll) {
    // All loads of kGvUnroll chunks first (bytes in flight), then the math.
    Piece16<TB> w0[kGvUnroll], w1[kGvUnroll];
    Piece16<C> x[kGvUnroll][MT];
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u) {
      const int k = (c0 + u * kGvWarps) * 64 + 16 * t;
      const bool in = c0 + u * kGvWarps < chunks && k < K;
      w0[u] = gemv_load(brow0, k, in && b_ok0);
      w1[u] = gemv_load(brow1, k, in && b_ok1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) x[u][mt] = gemv_load(arow[mt], k, in && a_ok[mt]);
    }
#pragma unroll
    for (int u = 0; u < kGvUnroll; ++u) {
      unsigned wa[8], wb[8], xb[MT][8];
      gemv_unpack<C, FB>(w0[u], wa);
      gemv_unpack<C, FB>(w1[u], wb);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) gemv_unpack<C, 0>(x[u][mt], xb[mt]);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const unsigned af[4] = {wa[2 * s], wb[2 * s], wa[2 * s + 1], wb[2 * s + 1]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma16816<C>(acc[mt], af, xb[mt][2 * s], xb[mt][2 * s + 1]);
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
