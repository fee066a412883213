// matmul2d on Apple GPUs: out = (dequant(a) * a_scale) @ (dequant(b) * b_scale).
//
// One threadgroup of 4 SIMD-groups (128 threads) computes a BM x BN output
// tile (32 x 32 or 64 x 64, template parameters); each SIMD-group owns a
// quadrant as (BM/16) x (BN/16) simdgroup_matrix 8x8 fp32 accumulators. Per
// K step of 16 the threadgroup stages an A tile (BM x 16) and a B tile
// (16 x BN) in threadgroup memory, decoding each
// element to float on the way in: float32/float16/bfloat16 by conversion,
// fp8 (uint8 codes) by bit arithmetic that matches mlx_flash.fp8 and
// mx.from_fp8 exactly. So fp8 operands cross device memory as one byte per
// element and are never expanded beyond one tile; accumulation is fp32.
// The epilogue applies a_scale (per row or tensor) and b_scale (per column
// or tensor) and converts to the output type.
//
// Used two ways: as the `header` of mx.fast.metal_kernel (JIT; see
// mlx_flash/backends/metal_matmul.py, which writes the kernel body and
// declares the threadgroup tiles) and through matmul.metal (prebuilt
// instantiations for the metallib). Pointer types are template parameters
// because MLX passes small inputs in the constant address space.
#ifndef MLXF_METAL_MATMUL_H
#define MLXF_METAL_MATMUL_H

#include <metal_stdlib>

using namespace metal;

// Operand encodings (the A_FMT / B_FMT template values).
enum : int { MATMUL_FLOAT = 0, MATMUL_E4M3 = 1, MATMUL_E5M2 = 2 };

// K per step and threads per threadgroup (the output tile is a template
// parameter; threadgroup arrays are sized by the caller: BM*MM_BK, MM_BK*BN
// and BM*BN floats).
enum : int { MM_BK = 16, MM_THREADS = 128 };

// Loops over the accumulator arrays are fully unrolled (registers, not stack).
#define MLXF_MM_UNROLL _Pragma("clang loop unroll(full)")

// Threadgroup memory of one matmul threadgroup with a TILE x TILE output, in
// floats: the A tile (TILE x MM_BK) and the B tile (MM_BK rows of TILE + 4:
// rows padded by 16 bytes so the lanes loading a B fragment spread over the
// banks), and the output staging tile Cs (TILE x TILE) aliased over them
// (Cs is only written after the last K step's barrier).
constexpr int mm_ldb(int tile) { return tile + 4; }
constexpr int mlxf_mm_smem_floats(int tile) {
  return tile * MM_BK + MM_BK * mm_ldb(tile) > tile * tile ? tile * MM_BK + MM_BK * mm_ldb(tile) : tile * tile;
}
// Resources for the table in docs/metal.md: threadgroup bytes, and the
// FM x FN accumulators of one SIMD-group (2 floats per lane each).
constexpr int mlxf_mm_tg_bytes(int tile) { return 4 * mlxf_mm_smem_floats(tile); }
constexpr int mlxf_mm_acc_floats(int tile) { return 2 * (tile / 16) * (tile / 16); }

// Layout of the int32 `params` input.
enum : int {
  MM_P_M = 0, MM_P_N = 1, MM_P_K = 2,
  MM_P_B_BATCH_STRIDE = 3,     // elements between batch entries of b (0: shared b)
  MM_P_AS_BATCH_STRIDE = 4,    // a_scale strides (0 broadcasts)
  MM_P_AS_ROW_STRIDE = 5,
  MM_P_BS_COL_STRIDE = 6,      // b_scale stride (0 broadcasts)
  MM_P_COUNT = 8
};

// E4M3FN: bias 7, no infinities, S.1111.111 is NaN.
inline float fp8_e4m3_to_float(uint code) {
  const uint sign = (code & 0x80u) << 24, e = (code >> 3) & 0xFu, m = code & 0x7u;
  if (e == 0u) {  // subnormal: m * 2^-9
    const float v = float(m) * 0.001953125f;
    return sign != 0u ? -v : v;
  }
  if (e == 15u && m == 7u) return NAN;
  return as_type<float>(sign | ((e + 120u) << 23) | (m << 20));
}

// E5M2: bias 15, IEEE-like infinities and NaNs.
inline float fp8_e5m2_to_float(uint code) {
  const uint sign = (code & 0x80u) << 24, e = (code >> 2) & 0x1Fu, m = code & 0x3u;
  if (e == 0u) {  // subnormal: m * 2^-16
    const float v = float(m) * 1.52587890625e-05f;
    return sign != 0u ? -v : v;
  }
  if (e == 31u) return as_type<float>(sign | 0x7F800000u | (m << 21));
  return as_type<float>(sign | ((e + 112u) << 23) | (m << 21));
}

// One operand element as float: conversion for float types, decoding for
// fp8 codes (specialisations, so no float type is ever cast to an integer).
template <int FMT>
struct MatmulDecode {
  template <typename T>
  static float load(T x) { return float(x); }
};
template <>
struct MatmulDecode<MATMUL_E4M3> {
  static float load(uchar code) { return fp8_e4m3_to_float(uint(code)); }
};
template <>
struct MatmulDecode<MATMUL_E5M2> {
  static float load(uchar code) { return fp8_e5m2_to_float(uint(code)); }
};

template <int FMT, typename P>
inline float matmul_load(P p, long i) {
  return MatmulDecode<FMT>::load(p[i]);
}

// One BM x BN output tile. a: [batch, M, K] row-major; b: [K, N] or, with
// TRANSPOSE_B, [N, K] row-major, batch entries params[MM_P_B_BATCH_STRIDE]
// apart; out: [batch, M, N]. tile = threadgroup_position_in_grid
// (column tile, row tile, batch entry).
template <typename TOut, int A_FMT, int B_FMT, bool TRANSPOSE_B, int BM, int BN, typename PA, typename PB,
          typename PSA, typename PSB, typename PP, typename POut>
inline void matmul2d_tile(PA a, PB b, PSA a_scale, PSB b_scale, PP params, POut out,
                          threadgroup float* smem,
                          uint3 tile, uint simd_group, uint thread_index) {
  const int M = params[MM_P_M], N = params[MM_P_N], K = params[MM_P_K];
  const int row0 = int(tile.y) * BM, col0 = int(tile.x) * BN;
  const long batch = long(tile.z);
  const long a_base = batch * long(M) * long(K);
  const long b_base = batch * long(params[MM_P_B_BATCH_STRIDE]);
  const int tid = int(thread_index);
  // This SIMD-group's quadrant of the tile: FM x FN fragments of 8 x 8.
  constexpr int FM = BM / 16, FN = BN / 16;
  const int quad_row = (int(simd_group) / 2) * (BM / 2), quad_col = (int(simd_group) % 2) * (BN / 2);

  constexpr int LDB = mm_ldb(BN);
  threadgroup float* As = smem;
  threadgroup float* Bs = smem + BM * MM_BK;
  threadgroup float* Cs = smem;  // aliases As/Bs: written after the K loop

  simdgroup_float8x8 acc[FM][FN];
  MLXF_MM_UNROLL for (int i = 0; i < FM; ++i)
    MLXF_MM_UNROLL for (int j = 0; j < FN; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (int k0 = 0; k0 < K; k0 += MM_BK) {
    // Stage A[row0 : +BM, k0 : +BK] as float (zeros past the edges).
    for (int e = tid; e < BM * MM_BK; e += MM_THREADS) {
      const int r = e / MM_BK, c = e % MM_BK, gr = row0 + r, gk = k0 + c;
      As[e] = (gr < M && gk < K) ? matmul_load<A_FMT>(a, a_base + long(gr) * K + gk) : 0.0f;
    }
    // Stage B[k0 : +BK, col0 : +BN]; neighbouring threads read neighbouring
    // addresses in either layout.
    for (int e = tid; e < MM_BK * BN; e += MM_THREADS) {
      const int r = TRANSPOSE_B ? e % MM_BK : e / BN;  // k within the tile
      const int c = TRANSPOSE_B ? e / MM_BK : e % BN;  // n within the tile
      const int gk = k0 + r, gn = col0 + c;
      const long idx = TRANSPOSE_B ? long(gn) * K + gk : long(gk) * N + gn;
      Bs[r * LDB + c] = (gk < K && gn < N) ? matmul_load<B_FMT>(b, b_base + idx) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < MM_BK; kk += 8) {
      simdgroup_float8x8 a_frag[FM], b_frag[FN];
      MLXF_MM_UNROLL for (int i = 0; i < FM; ++i) simdgroup_load(a_frag[i], As + (quad_row + i * 8) * MM_BK + kk, MM_BK);
      MLXF_MM_UNROLL for (int j = 0; j < FN; ++j) simdgroup_load(b_frag[j], Bs + kk * LDB + quad_col + j * 8, LDB);
      MLXF_MM_UNROLL for (int i = 0; i < FM; ++i)
        MLXF_MM_UNROLL for (int j = 0; j < FN; ++j) simdgroup_multiply_accumulate(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Epilogue: accumulators -> threadgroup tile -> scaled, converted output.
  MLXF_MM_UNROLL for (int i = 0; i < FM; ++i)
    MLXF_MM_UNROLL for (int j = 0; j < FN; ++j)
      simdgroup_store(acc[i][j], Cs + (quad_row + i * 8) * BN + quad_col + j * 8, BN);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = tid; e < BM * BN; e += MM_THREADS) {
    const int r = e / BN, c = e % BN, gr = row0 + r, gn = col0 + c;
    if (gr < M && gn < N) {
      const float sa = a_scale[batch * params[MM_P_AS_BATCH_STRIDE] + long(gr) * params[MM_P_AS_ROW_STRIDE]];
      const float sb = b_scale[long(gn) * params[MM_P_BS_COL_STRIDE]];
      out[(batch * M + gr) * long(N) + gn] = TOut(Cs[e] * sa * sb);
    }
  }
}

#endif  // MLXF_METAL_MATMUL_H
