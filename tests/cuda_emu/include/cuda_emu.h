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
#include <cstdio>
#include <cstring>

#include "emu_abi.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

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
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }  // an L2 write: one memory here
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
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, as the device's

// Progress of the block: every synchronisation point a thread reaches counts
// one, so that an emulated spin-wait (hopper_emu.cuh: mbarriers, named
// barriers) can tell a wait that others will end from one that nothing can.
inline unsigned long long& __emu_progress() {
  static thread_local unsigned long long count;
  return count;
}
inline EmuExchange __emu_counted_exchange(const void* payload, unsigned nbytes, unsigned site) {
  ++__emu_progress();
  return __emu_simd_exchange(payload, nbytes, site);
}
// (A spin-wait calls the runtime's own, uncounted: `(__emu_simd_exchange)(...)`.)
#define __emu_simd_exchange(payload, nbytes, site) __emu_counted_exchange(payload, nbytes, site)
inline void __emu_counted_barrier(unsigned site) {
  ++__emu_progress();
  __emu_threadgroup_barrier(site);
}
#define __syncthreads() __emu_counted_barrier(__LINE__)
inline long long clock64() { return (long long)__emu_progress(); }

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
inline int __all_sync(unsigned, int p) {
  EmuExchange e = __emu_simd_exchange(&p, sizeof(int), __LINE__);
  int all = 1;
  for (unsigned l = 0; l < 32; ++l)
    if (e.active_mask >> l & 1u) all &= __emu_lane_value<int>(e, l) != 0;
  return all;
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

// sm_90's vector atomics (float2 / float4 adds, each element on its own).
inline float2 atomicAdd(float2* p, float2 x) {
  const float2 old = *p;
  p->x += x.x;
  p->y += x.y;
  return old;
}
inline float4 atomicAdd(float4* p, float4 x) {
  const float4 old = *p;
  p->x += x.x;
  p->y += x.y;
  p->z += x.z;
  p->w += x.w;
  return old;
}

// Dynamic shared memory of the launch (the harness defines __emu_dynamic_smem_bytes).
extern const unsigned long __emu_dynamic_smem_bytes;
inline unsigned char* __emu_dynamic_smem() {
  static char key;
  return static_cast<unsigned char*>(__emu_threadgroup_alloc(&key, __emu_dynamic_smem_bytes, 0xFF));
}
// The shared window (addresses as smem_addr / cvta.to.shared give them):
// dynamic shared memory at [0, its size), each static __shared__ array in a
// 64 KiB slot from 0x40000 on. The Hopper emulation (hopper_emu.cuh) maps
// the 32-bit addresses that mbarriers, TMA and wgmma descriptors carry back
// to memory through it.
struct __EmuSharedRegion {
  const unsigned char* p;
  unsigned long bytes;
};
constexpr unsigned __kEmuStaticBase = 0x40000u, __kEmuSlotBytes = 0x10000u, __kEmuSlots = 64;
inline __EmuSharedRegion* __emu_shared_regions() {
  static thread_local __EmuSharedRegion regions[__kEmuSlots];
  return regions;
}
inline void __emu_register_shared(const void* p, unsigned long bytes) {
  static thread_local unsigned next;
  __EmuSharedRegion* r = __emu_shared_regions();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  bool known = false;
  for (unsigned i = 0; i < __kEmuSlots; ++i) {
    if (r[i].p == c) {
      r[i].bytes = bytes;
      known = true;
    } else if (r[i].p && r[i].p < c + bytes && c < r[i].p + r[i].bytes) {
      r[i].p = nullptr;  // an earlier launch's array where this one lives now
    }
  }
  if (known) return;
  if (bytes > __kEmuSlotBytes) __emu_fail("cuda_emu: a static __shared__ array over 64 KiB");
  r[next % __kEmuSlots] = __EmuSharedRegion{static_cast<const unsigned char*>(p), bytes};  // oldest out
  ++next;
}
// Static __shared__ arrays (the harness rewrites their declarations to this).
template <typename A, int KEY>
inline A* __emu_shared_array() {
  static char key;
  A* a = static_cast<A*>(__emu_threadgroup_alloc(&key, sizeof(A), 0xFF));
  __emu_register_shared(a, sizeof(A));
  return a;
}
inline unsigned __emu_smem_window(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* dyn = __emu_dynamic_smem();
  if (c >= dyn && c < dyn + __emu_dynamic_smem_bytes) return unsigned(c - dyn);
  const __EmuSharedRegion* r = __emu_shared_regions();
  for (unsigned i = 0; i < __kEmuSlots; ++i)
    if (r[i].p && c >= r[i].p && c < r[i].p + r[i].bytes) return __kEmuStaticBase + i * __kEmuSlotBytes + unsigned(c - r[i].p);
  __emu_fail("cuda_emu: a shared-memory address of memory that is not shared");
  return 0;
}
inline unsigned char* __emu_smem_pointer(unsigned addr, unsigned bytes) {
  if (addr < __kEmuStaticBase) {
    if (addr + (unsigned long)bytes > __emu_dynamic_smem_bytes) __emu_fail("cuda_emu: access past the end of dynamic shared memory");
    return __emu_dynamic_smem() + addr;
  }
  const unsigned slot = (addr - __kEmuStaticBase) / __kEmuSlotBytes, off = (addr - __kEmuStaticBase) % __kEmuSlotBytes;
  const __EmuSharedRegion* r = __emu_shared_regions();
  if (slot >= __kEmuSlots || !r[slot].p || off + (unsigned long)bytes > r[slot].bytes) {
    static thread_local char message[160];
    std::snprintf(message, sizeof(message),
                  "cuda_emu: shared-memory address 0x%x (%u bytes) outside every shared array (slot %u: %lu bytes)",
                  addr, bytes, slot, slot < __kEmuSlots ? r[slot].bytes : 0ul);
    __emu_fail(message);
  }
  return const_cast<unsigned char*>(r[slot].p) + off;
}
