// [[kernel]] entry points of the attention templates, prebuilt into
// mlx_flash.metallib for the C++ primitive's eval_gpu (csrc/attention_metal.cpp).
// The mx.fast.metal_kernel path (mlx_flash/backends/metal.py) calls the same
// templates from generated kernels, so both paths run one source.
//
// Differences from the JIT path, kept small on purpose:
// * the feature bits are a function constant (index 0) rather than a
//   template argument, so one pipeline per feature set is specialised at
//   pipeline creation instead of instantiating every combination here;
// * head dims are instantiated for Dqk == Dv in {32, 64, 80, 96, 128, 256}
//   (other pairs go through the JIT path);
// * the primitive runs the plain forward only (no split-key decode).
// Buffer indices follow the input order of metal.py's kernel bodies.

#include "mlx/backend/metal/kernels/utils.h"

#include "attention_common.h"
#include "attention_fwd.h"
#include "attention_bwd.h"

using namespace metal;

constant int mlxf_features [[function_constant(0)]];

template <typename T, int D, int NSG, typename MT, typename OT>
[[kernel]] void mlxf_attention_fwd(
    const device T* q [[buffer(0)]], const device T* k [[buffer(1)]], const device T* v [[buffer(2)]],
    const device MT* mask [[buffer(3)]], const device float* alibi [[buffer(4)]],
    const device float* sinks [[buffer(5)]], const device bool* block_mask [[buffer(6)]],
    const device int* cu_q [[buffer(7)]], const device int* cu_k [[buffer(8)]],
    const device int* key_start [[buffer(9)]], const device int* key_len [[buffer(10)]],
    const device int* iparams [[buffer(11)]], const device float* fparams [[buffer(12)]],
    device OT* out [[buffer(13)]], device float* lse [[buffer(14)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int BK = mlxf::fwd_block_k(D, D, sizeof(T));
  threadgroup T smem[mlxf::fwd_tile_elems(D, D, NSG, BK, sizeof(T))];
  threadgroup int flags[NSG];
  mlxf::attention_forward<T, D, D, NSG, BK>(
      mlxf_features, q, k, v, mask, alibi, sinks, block_mask, cu_q, cu_k, key_start, key_len, iparams, fparams,
      out, lse, smem, flags, tg_pos, sg, lane);
}

// Function constant bit 0: a dlse cotangent is given; the feature bits sit above it.
template <typename T, int D>
[[kernel]] void mlxf_attention_bwd_delta(
    const device T* out [[buffer(0)]], const device T* dout [[buffer(1)]],
    const device float* dlse [[buffer(2)]], const device int* iparams [[buffer(3)]],
    const device float* fparams [[buffer(4)]], device float* delta [[buffer(5)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  mlxf::attention_bwd_delta<T, D, 4>(mlxf_features >> 1, (mlxf_features & 1) != 0, out, dout, dlse, iparams,
                                     fparams, delta, tg_pos, sg, lane);
}

#define MLXF_GRAD_ARGS                                                                              \
  const device T* q [[buffer(0)]], const device T* k [[buffer(1)]], const device T* v [[buffer(2)]], \
      const device T* dout [[buffer(3)]], const device float* lse [[buffer(4)]],                     \
      const device float* delta [[buffer(5)]], const device MT* mask [[buffer(6)]],                  \
      const device float* alibi [[buffer(7)]], const device bool* block_mask [[buffer(8)]],          \
      const device int* cu_q [[buffer(9)]], const device int* cu_k [[buffer(10)]],                   \
      const device int* key_start [[buffer(11)]], const device int* key_len [[buffer(12)]],          \
      const device int* iparams [[buffer(13)]], const device float* fparams [[buffer(14)]]

template <typename T, int D, typename MT>
[[kernel]] void mlxf_attention_bwd_dkdv(
    MLXF_GRAD_ARGS, device T* dk [[buffer(15)]], device T* dv [[buffer(16)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int BQB = mlxf::dkdv_block_q(D, D, sizeof(T));
  threadgroup T smem[mlxf::dkdv_tile_elems(D, D, 4, BQB, sizeof(T))];
  threadgroup float row_stats[2 * BQB];
  threadgroup int flags[4];
  mlxf::attention_bwd_dkdv<T, D, D, 4, BQB>(
      mlxf_features, q, k, v, dout, lse, delta, mask, alibi, block_mask, cu_q, cu_k, key_start, key_len,
      iparams, fparams, dk, dv, smem, row_stats, flags, tg_pos, sg, lane);
}

template <typename T, int D, typename MT>
[[kernel]] void mlxf_attention_bwd_dq(
    MLXF_GRAD_ARGS, device T* dq [[buffer(15)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int BK = mlxf::dq_block_k(D, D, sizeof(T));
  threadgroup T smem[mlxf::dq_tile_elems(D, D, 4, BK, sizeof(T))];
  threadgroup int flags[4];
  mlxf::attention_bwd_dq<T, D, D, 4, BK>(
      mlxf_features, q, k, v, dout, lse, delta, mask, alibi, block_mask, cu_q, cu_k, key_start, key_len,
      iparams, fparams, dq, smem, flags, tg_pos, sg, lane);
}

// Names: mlxf_<kernel>_<type>_<D>[_<mask type>], e.g.
// mlxf_attention_fwd_float16_128_bool (csrc/attention_metal.cpp builds them).
// The primitive runs the plain forward (4 simdgroups); the split-key decode
// variant is used by the JIT path only.
#define MLXF_INSTANTIATE(name, ...) \
  template [[host_name(name)]] [[kernel]] decltype(__VA_ARGS__) __VA_ARGS__;

#define MLXF_INSTANTIATE_MASK(tname, T, D, mname, MT)                                                   \
  MLXF_INSTANTIATE("mlxf_attention_fwd_" #tname "_" #D "_" #mname, mlxf_attention_fwd<T, D, 4, MT, T>)   \
  MLXF_INSTANTIATE("mlxf_attention_bwd_dkdv_" #tname "_" #D "_" #mname, mlxf_attention_bwd_dkdv<T, D, MT>) \
  MLXF_INSTANTIATE("mlxf_attention_bwd_dq_" #tname "_" #D "_" #mname, mlxf_attention_bwd_dq<T, D, MT>)

#define MLXF_INSTANTIATE_DIM(tname, T, D)                   \
  MLXF_INSTANTIATE_MASK(tname, T, D, bool, bool)            \
  MLXF_INSTANTIATE_MASK(tname, T, D, float32, float)        \
  MLXF_INSTANTIATE_MASK(tname, T, D, float16, half)         \
  MLXF_INSTANTIATE_MASK(tname, T, D, bfloat16, bfloat16_t)  \
  MLXF_INSTANTIATE("mlxf_attention_bwd_delta_" #tname "_" #D, mlxf_attention_bwd_delta<T, D>)

#define MLXF_INSTANTIATE_TYPE(tname, T) \
  MLXF_INSTANTIATE_DIM(tname, T, 32)    \
  MLXF_INSTANTIATE_DIM(tname, T, 64)    \
  MLXF_INSTANTIATE_DIM(tname, T, 80)    \
  MLXF_INSTANTIATE_DIM(tname, T, 96)    \
  MLXF_INSTANTIATE_DIM(tname, T, 128)   \
  MLXF_INSTANTIATE_DIM(tname, T, 256)

MLXF_INSTANTIATE_TYPE(float32, float)
MLXF_INSTANTIATE_TYPE(float16, half)
MLXF_INSTANTIATE_TYPE(bfloat16, bfloat16_t)
