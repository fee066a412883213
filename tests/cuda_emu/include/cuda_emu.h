// CUDA emulation (tests/cuda_emu): enough of the CUDA device language to run
// the kernels of cuda_src/ on the CPU with the fiber runtime of the Metal
// emulation (tests/metal_emu/runtime): every CUDA thread is a fiber, a block
// is a threadgroup, a warp a SIMD-group of 32. __syncthreads is a threadgroup
// barrier; __syncwarp, shuffles, ldmatrix and mma.sync are SIMD-group
// exchanges (mma_emu.cuh). Shared memory comes from the runtime, poisoned
// with 0xFF bytes (NaN) at the start of every block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_abi.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct __emu_uint3 {
  unsigned x, y, z;
};
inline __emu_uint3 __emu_u3(const unsigned* v) { return __emu_uint3{v[0], v[1], v[2]}; }
#define threadIdx (__emu_u3(__emu_attrs()->thread_position_in_threadgroup))
#define blockIdx (__emu_u3(__emu_attrs()->threadgroup_position_in_grid))
#define blockDim (__emu_u3(__emu_attrs()->dispatch_threads_per_threadgroup))
#define gridDim (__emu_u3(__emu_attrs()->threadgroups_per_grid))

struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
// MLX's Strides parameter (cuda::std::array<int64_t, MAX_NDIM>), filled from
// a buffer the harness passes after the outputs.
struct Strides {
  int64_t v[10];
  const int64_t& operator[](int i) const { return v[i]; }
};
inline Strides __emu_strides(const void* p) {
  Strides s;
  std::memcpy(s.v, p, sizeof(s.v));
  return s;
}

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }  // an L2 read: one memory here
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// Threadgroups run one at a time on an OS thread (each to its end before the
// next starts), so every store is visible to the blocks that run after it.
inline void __threadfence() {}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

#define __syncthreads() __emu_threadgroup_barrier(__LINE__)

// A warp-wide exchange of one value; every lane gets every lane's value.
template <typename V>
inline V __emu_lane_value(const EmuExchange& e, unsigned lane) {
  if (!(e.active_mask >> lane & 1u)) __emu_fail("shuffle from a lane that did not take part");
  V out;
  std::memcpy(&out, e.slots + lane * e.stride, sizeof(V));
  return out;
}
inline void __syncwarp(unsigned = 0xffffffffu) { __emu_simd_exchange(nullptr, 0, __LINE__); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V x, int offset) {
  EmuExchange e = __emu_simd_exchange(&x, sizeof(V), __LINE__);
  return __emu_lane_value<V>(e, e.lane ^ unsigned(offset));
}
template <typename V>
inline V __shfl_sync(unsigned, V x, int src) {
  EmuExchange e = __emu_simd_exchange(&x, sizeof(V), __LINE__);
  return __emu_lane_value<V>(e, unsigned(src) % 32u);
}
inline int __any_sync(unsigned, int p) {
  EmuExchange e = __emu_simd_exchange(&p, sizeof(int), __LINE__);
  int any = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (e.active_mask >> l & 1u) any |= __emu_lane_value<int>(e, l) != 0;
  return any;
}
inline unsigned __ballot_sync(unsigned, int p) {
  EmuExchange e = __emu_simd_exchange(&p, sizeof(int), __LINE__);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (e.active_mask >> l & 1u) bits |= unsigned(__emu_lane_value<int>(e, l) != 0) << l;
  return bits;
}
inline int __syncthreads_or(int p) {
  static char key;
  int* flag = static_cast<int*>(__emu_threadgroup_alloc(&key, sizeof(int), 0));
  __emu_threadgroup_barrier(__LINE__);
  *flag |= p != 0;
  __emu_threadgroup_barrier(__LINE__);
  const int any = *flag;
  __emu_threadgroup_barrier(__LINE__);
  if (__emu_attrs()->thread_index_in_threadgroup == 0) *flag = 0;  // before anyone's next call
  return any;
}
template <typename V>
inline V atomicAdd(V* p, V x) {  // fibers of one OS thread never interleave inside this
  V old = *p;
  *p = old + x;
  return old;
}

// Dynamic shared memory of the launch (the harness defines __emu_dynamic_smem_bytes).
extern const unsigned long __emu_dynamic_smem_bytes;
inline unsigned char* __emu_dynamic_smem() {
  static char key;
  return static_cast<unsigned char*>(__emu_threadgroup_alloc(&key, __emu_dynamic_smem_bytes, 0xFF));
}
// Static __shared__ arrays (the harness rewrites their declarations to this).
template <typename A, int KEY>
inline A* __emu_shared_array() {
  static char key;
  return static_cast<A*>(__emu_threadgroup_alloc(&key, sizeof(A), 0xFF));
}
