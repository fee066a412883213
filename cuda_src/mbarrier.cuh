// Hopper (sm_90a) helpers of warp-specialised kernels, beside tma.cuh's
// mbar_init / mbar_expect_tx / mbar_wait: a plain arrive (a consumer
// releasing a stage) and the warpgroup register reallocation.
#pragma once

namespace mlx_flash {

// One arrival on a shared-memory mbarrier (no transaction bytes).
__device__ __forceinline__ void mbar_arrive(void* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// setmaxnreg: every thread of a warpgroup executes it; the kernel's register
// count at launch must be known to ptxas (__launch_bounds__), and the counts
// multiples of 8 in [24, 256].
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace mlx_flash
