// PTX only the decode kernel uses (emulated by tests/cuda_emu/decode_ptx_emu.cuh):
// * one-dimensional bulk copies global -> shared (Hopper's TMA engine, no
//   tensor map) completing on an mbarrier: the K/V stream's BULK option. A
//   bulk copy is one instruction per row however long the row, and the copy
//   engine, not the SM's load/store path, keeps the bytes in flight;
// * movmatrix: the transpose of an 8x8 16-bit fragment within a warp.
#pragma once

#include "mma.cuh"

namespace mlx_flash {

__device__ __forceinline__ void bulk_bar_init(void* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void bulk_bar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more bytes of copies on the barrier.
__device__ __forceinline__ void bulk_bar_expect(void* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void bulk_bar_wait(void* bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from src to dst, completing on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, void* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// The 8x8 16-bit matrix whose fragment (mma.cuh's layout: lane 4g + t holds
// row g, columns 2t and 2t + 1) is `a`, transposed: lane 4g + t gets
// M[2t][g] and M[2t + 1][g]. (sm_75+)
__device__ __forceinline__ unsigned movmatrix_trans(unsigned a) {
  unsigned d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

}  // namespace mlx_flash
