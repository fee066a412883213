// Launch bounds for the warp-specialised matmul kernels (matmul_wgmma_ws.cuh,
// matmul_wgmma_wa.cuh): 384 threads, one block an SM, so ptxas keeps the
// launch count at 168 registers and the setmaxnreg trade is legal.
// mx.fast.cuda_kernel writes the kernel's declaration itself (after the
// headers), with no way to pass launch bounds: every __global__ after this
// point, i.e. the one kernel of the translation unit, gets them. (The headers
// before it declare device functions only.)
#pragma once
#ifdef __CUDA_ARCH__
#undef __global__
#define __global__ __location__(global) __launch_bounds__(384, 1)
#endif
