// Hopper (sm_90a) tensor-memory-accelerator loads for kernels launched by
// mx.fast.cuda_kernel, which cannot take a CUtensorMap kernel parameter and
// whose inputs' addresses are unknown when the host encodes one.
//
// The host encodes a template per operand (cuTensorMapEncodeTiled through
// ctypes: the operand's true dims and strides, box, swizzle; a placeholder
// address) and passes it as a 128-byte input. Each block copies its templates
// into shared memory, writes the operand's real address into them
// (tensormap.replace), publishes them to its own slot of a global workspace
// (tensormap.cp_fenceproxy) and acquires them for the TMA unit. Loads then
// complete on an mbarrier that counts the bytes.
#pragma once

namespace mlx_flash {

// Copies `count` templates of 128 bytes (global) into the block's workspace
// slot with their global address fields set to addrs[i]; run by one whole warp.
template <int COUNT>
__device__ __forceinline__ void tma_publish(unsigned char* smem_stage, const unsigned char* templates,
                                            unsigned char* workspace, const void* const (&addrs)[COUNT], int lane) {
#pragma unroll
  for (int i = 0; i < COUNT * 128 / 8; i += 32)
    if (i + lane < COUNT * 128 / 8)
      reinterpret_cast<unsigned long long*>(smem_stage)[i + lane] =
          reinterpret_cast<const unsigned long long*>(templates)[i + lane];
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < COUNT; ++i)
      asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;\n" ::"r"(
                       smem_addr(smem_stage + 128 * i)),
                   "l"(reinterpret_cast<unsigned long long>(addrs[i]))
                   : "memory");
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < COUNT; ++i)
    asm volatile(
        "tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;\n" ::"l"(
            reinterpret_cast<unsigned long long>(workspace + 128 * i)),
        "r"(smem_addr(smem_stage + 128 * i))
        : "memory");
}

__device__ __forceinline__ void tma_acquire(const void* tmap) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(reinterpret_cast<unsigned long long>(tmap))
               : "memory");
}

__device__ __forceinline__ void mbar_init(void* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(void* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(void* bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Box at (inner, outer) of a 2-D tensor map into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tmap, int inner, int outer, void* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(inner), "r"(outer), "r"(smem_addr(bar))
      : "memory");
}

}  // namespace mlx_flash
