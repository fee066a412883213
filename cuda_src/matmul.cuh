// matmul2d on tensor cores: out = (dequant(a) * a_scale) @ (dequant(b) * b_scale).
//
// One block computes a 128 x 128 tile of one batch entry with 8 warps
// (2 along M x 4 along N, 64 x 32 each). K advances 128 bytes per stage, i.e.
// 64 values of a 16-bit operand or 128 fp8 codes, through a ring of three
// shared-memory stages: operands already in the mma's type arrive by
// cp.async two stages ahead; fp8 operands that must be widened (or
// transposed) are loaded into registers before the current stage's math and
// written to their stage after it.
//
// MODE 0: mma m16n8k16 in C (half or bf16); an fp8 operand is decoded to C
//         exactly (every E4M3/E5M2 value is a half and a bfloat16 value).
// MODE 1: both operands fp8 and NATIVE_FP8: native m16n8k32 e4m3/e5m2 mma
//         (sm_89+; slower than MODE 0 on Hopper, where fp8 wants wgmma).
// The wrapper pads K to a multiple of 16 and N to a multiple of 16, so every
// 16-byte chunk is wholly inside or outside the operand.
#pragma once

#include "attention_common.cuh"
#include "fp8_decode.cuh"
#include "mma.cuh"

namespace mlx_flash {

// Slots of the matmul int32 parameter array.
enum MatmulParam { kMmM = 0, kMmN, kMmK, kMmBBatched, kMmAScaleBatched, kMmAScaleRows, kMmBScaleCols, kMmNumParams };

constexpr int kMmBM = 128, kMmBN = 128, kMmKBytes = 128, kMmPitch = kMmKBytes + 16, kMmStages = 3;
// k-major B tile (16-bit, B stored [K][N]): 64 k rows of 128 values.
constexpr int kMmPitchKN = 2 * kMmBN + 16;

__host__ __device__ constexpr int matmul_smem() {
  // kMmStages x (A [128][144 bytes] + B, the larger of [128][144] and [64][272]).
  return kMmStages * (kMmBM * kMmPitch + (kMmBN * kMmPitch > 64 * kMmPitchKN ? kMmBN * kMmPitch : 64 * kMmPitchKN));
}

template <int FA, int FB>
__device__ __forceinline__ void mma_fp8(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#define MLX_FLASH_MMA_FP8(TA, TB)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32." TA "." TB                                       \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if (FA == 1 && FB == 1) MLX_FLASH_MMA_FP8("e4m3", "e4m3");
  else if (FA == 1 && FB == 2) MLX_FLASH_MMA_FP8("e4m3", "e5m2");
  else if (FA == 2 && FB == 1) MLX_FLASH_MMA_FP8("e5m2", "e4m3");
  else MLX_FLASH_MMA_FP8("e5m2", "e5m2");
#undef MLX_FLASH_MMA_FP8
}

// TA/TB: storage types (C, or uint8_t with FA/FB = 1 e4m3, 2 e5m2; 0 = not fp8).
// AS / BS: a_scale / b_scale present.
template <typename TA, typename TB, typename C, typename TO, int FA, int FB, bool TRANS_B, bool AS, bool BS,
          bool NATIVE_FP8>
__device__ void matmul_mma(const TA* a, const TB* b, const float* a_scale, const float* b_scale,
                           const int* ip, TO* out) {
  constexpr int MODE = (FA != 0 && FB != 0 && NATIVE_FP8) ? 1 : 0;
  // How each operand reaches shared memory: cp.async, or registers (decode / transpose).
  constexpr bool A_ASYNC = FA == 0 || MODE == 1;
  constexpr bool B_ASYNC = FB == 0 || (MODE == 1 && TRANS_B);
  // B in shared memory is n-major ([n][k bytes]) unless a 16-bit k-major copy suffices.
  constexpr bool B_NMAJOR = TRANS_B || MODE == 1;
  constexpr int KSTEP = kMmKBytes / (MODE == 1 ? 1 : 2);  // k values per stage
  constexpr int NT = 256;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int A_BYTES = kMmBM * kMmPitch;
  constexpr int B_BYTES = B_NMAJOR ? kMmBN * kMmPitch : KSTEP * kMmPitchKN;
  auto As = [&](int stage) { return smem_raw + stage * (A_BYTES + B_BYTES); };
  auto Bs = [&](int stage) { return smem_raw + stage * (A_BYTES + B_BYTES) + A_BYTES; };

  const int M = ip[kMmM], N = ip[kMmN], K = ip[kMmK];
  const int z = blockIdx.z;
  const int m0 = blockIdx.y * kMmBM, n0 = blockIdx.x * kMmBN;
  const TA* ag = a + (long)z * M * K;
  const TB* bg = b + (ip[kMmBBatched] ? (long)z * K * N : 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int tid = threadIdx.x;

  // Row-major [rows][K] operand tile (A, or B given as [N][K]) by cp.async:
  // rows x kMmKBytes bytes in 16-byte chunks.
  auto async_rows = [&](unsigned char* dst, const void* src_base, int elem, int r0, int rows_total, int k0) {
    constexpr int PER_ROW = kMmKBytes / 16;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(src_base);
#pragma unroll
    for (int it = 0; it < 128 * PER_ROW / NT; ++it) {
      const int c = tid + it * NT, row = c / PER_ROW, kv = k0 + (c % PER_ROW) * (16 / elem);
      const bool ok = r0 + row < rows_total && kv < K;
      cp_async16(dst + row * kMmPitch + (c % PER_ROW) * 16,
                 ok ? (const void*)(src + ((long)(r0 + row) * K + kv) * elem) : (const void*)src, ok);
    }
  };
  // 16-bit B given as [K][N], k-major tile by cp.async: KSTEP rows x 256 bytes.
  auto async_b_kmajor = [&](unsigned char* dst, int k0) {
#pragma unroll
    for (int it = 0; it < KSTEP * 16 / NT; ++it) {
      const int c = tid + it * NT, krow = c / 16, nv = n0 + (c % 16) * 8;
      const bool ok = k0 + krow < K && nv < N;
      cp_async16(dst + krow * kMmPitchKN + (c % 16) * 16,
                 ok ? (const void*)(bg + (long)(k0 + krow) * N + nv) : (const void*)bg, ok);
    }
  };

  // Register-staged operands: an fp8 operand decoded to C (MODE 0), or fp8 B
  // given as [K][N] transposed into the n-major tile (MODE 1).
  // A decode: 128 rows x KSTEP codes = 128 x 4 chunks of 16 -> 2 per thread.
  constexpr int A_REGS = A_ASYNC ? 1 : 128 * (KSTEP / 16) / NT;
  uint4 a_regs[A_REGS];
  auto load_a_regs = [&](int k0) {
#pragma unroll
    for (int it = 0; it < A_REGS; ++it) {
      const int c = tid + it * NT, row = c / (KSTEP / 16), kv = k0 + (c % (KSTEP / 16)) * 16;
      const bool ok = m0 + row < M && kv < K;
      a_regs[it] = ok ? *reinterpret_cast<const uint4*>(ag + (long)(m0 + row) * K + kv) : make_uint4(0, 0, 0, 0);
    }
  };
  auto store_a_regs = [&](unsigned char* dst) {
#pragma unroll
    for (int it = 0; it < A_REGS; ++it) {
      const int c = tid + it * NT, row = c / (KSTEP / 16), part = c % (KSTEP / 16);
      uint4 w[2];
      decode16<C, FA>(a_regs[it], w);
      uint4* d = reinterpret_cast<uint4*>(dst + row * kMmPitch + part * 32);
      d[0] = w[0];
      d[1] = w[1];
    }
  };
  // B: n-major decode (TRANS_B, MODE 0): 128 rows x 4 chunks; k-major decode
  // (MODE 0): KSTEP rows x 8 chunks; fp8 transpose (MODE 1): KSTEP rows x 8 chunks.
  constexpr int B_REGS = B_ASYNC ? 1 : (TRANS_B ? 128 * (KSTEP / 16) : KSTEP * 8) / NT;
  uint4 b_regs[B_REGS];
  auto load_b_regs = [&](int k0) {
#pragma unroll
    for (int it = 0; it < B_REGS; ++it) {
      const int c = tid + it * NT;
      if (TRANS_B) {
        const int row = c / (KSTEP / 16), kv = k0 + (c % (KSTEP / 16)) * 16;
        const bool ok = n0 + row < N && kv < K;
        b_regs[it] = ok ? *reinterpret_cast<const uint4*>(bg + (long)(n0 + row) * K + kv) : make_uint4(0, 0, 0, 0);
      } else {
        const int krow = c / 8, nv = n0 + (c % 8) * 16;
        const bool ok = k0 + krow < K && nv < N;
        b_regs[it] = ok ? *reinterpret_cast<const uint4*>(bg + (long)(k0 + krow) * N + nv) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto store_b_regs = [&](unsigned char* dst) {
#pragma unroll
    for (int it = 0; it < B_REGS; ++it) {
      const int c = tid + it * NT;
      if (MODE == 1) {  // transpose fp8 codes: row k of 16 n values -> column k of 16 n rows
        const int krow = c / 8, n = (c % 8) * 16;
        const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&b_regs[it]);
#pragma unroll
        for (int e = 0; e < 16; ++e) dst[(n + e) * kMmPitch + krow] = bytes[e];
      } else {
        uint4 w[2];
        decode16<C, FB>(b_regs[it], w);
        uint4* d = TRANS_B ? reinterpret_cast<uint4*>(dst + (c / (KSTEP / 16)) * kMmPitch + (c % (KSTEP / 16)) * 32)
                           : reinterpret_cast<uint4*>(dst + (c / 8) * kMmPitchKN + (c % 8) * 32);
        d[0] = w[0];
        d[1] = w[1];
      }
    }
  };
  auto issue_async = [&](int stage, int k0) {
    if (A_ASYNC) async_rows(As(stage), ag, FA ? 1 : 2, m0, M, k0);
    if (B_ASYNC) {
      if (TRANS_B) async_rows(Bs(stage), bg, FB ? 1 : 2, n0, N, k0);
      else async_b_kmajor(Bs(stage), k0);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  const int ktiles = (K + KSTEP - 1) / KSTEP;
  // Prologue: stages 0 .. kMmStages-2.
#pragma unroll
  for (int st = 0; st < kMmStages - 1; ++st) {
    if (st < ktiles) {
      issue_async(st, st * KSTEP);
      if (!A_ASYNC) { load_a_regs(st * KSTEP); store_a_regs(As(st)); }
      if (!B_ASYNC) { load_b_regs(st * KSTEP); store_b_regs(Bs(st)); }
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kMmStages - 2>();
    __syncthreads();  // stage kt landed; stage kt-1 is free for tile kt+kMmStages-1
    const int fill = kt + kMmStages - 1;
    const int fill_stage = fill % kMmStages;
    if (fill < ktiles) {
      issue_async(fill_stage, fill * KSTEP);
      if (!A_ASYNC) load_a_regs(fill * KSTEP);
      if (!B_ASYNC) load_b_regs(fill * KSTEP);
    }
    cp_async_commit();

    const unsigned char* at = As(kt % kMmStages);
    const unsigned char* bt = Bs(kt % kMmStages);
#pragma unroll
    for (int ks = 0; ks < kMmKBytes / 32; ++ks) {  // mma k-steps of 32 bytes
      unsigned af[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4(af[mt], at + (wm * 64 + mt * 16 + lane % 16) * kMmPitch + ks * 32 + (lane / 16) * 16);
      unsigned bf[4][2];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        unsigned r[4];
        if (B_NMAJOR) {
          ldmatrix_x4(r, bt + (wn * 32 + np * 16 + (lane / 16) * 8 + lane % 8) * kMmPitch + ks * 32 + ((lane / 8) % 2) * 16);
        } else {
          ldmatrix_x4_trans(r, bt + (ks * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kMmPitchKN +
                                   (wn * 32 + np * 16 + (lane / 16) * 8) * 2);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          if (MODE == 1) mma_fp8<FA, FB>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
          else mma16816<C>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
        }
    }

    if (fill < ktiles) {
      if (!A_ASYNC) store_a_regs(As(fill_stage));
      if (!B_ASYNC) store_b_regs(Bs(fill_stage));
    }
  }
  cp_async_wait<0>();

  // Epilogue: scales, conversion, store.
  TO* og = out + (long)z * M * N;
  const float* as_row = AS ? a_scale + (ip[kMmAScaleBatched] ? (long)z * (ip[kMmAScaleRows] ? M : 1) : 0) : nullptr;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + wm * 64 + mt * 16 + lane / 4 + 8 * half;
      if (row >= M) continue;
      const float sa = AS ? as_row[ip[kMmAScaleRows] ? row : 0] : 1.f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = n0 + wn * 32 + nt * 8 + 2 * (lane % 4);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (col + e >= N) continue;
          const float sb = BS ? b_scale[ip[kMmBScaleCols] ? col + e : 0] : 1.f;
          og[(long)row * N + col + e] = from_float<TO>(acc[mt][nt][2 * half + e] * sa * sb);
        }
      }
    }
  }
}

}  // namespace mlx_flash
