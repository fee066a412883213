// Launch bounds for the few-rows kernel (matmul_gemv.cuh) with up to 16 warps
// a block: at most 512 threads, 1 block per SM, so at most 128 registers a
// thread, as with matmul_gemv_bounds2.cuh (see there why bounds matter: with
// them ptxas keeps a chunk batch's loads in flight together). For small
// weights whose row groups give fewer blocks than SMs, 16 warps a block split
// K twice as finely as 8, so each warp has half as many chunks to wait on.
#pragma once
#ifdef __CUDA_ARCH__
#undef __global__
#define __global__ __location__(global) __launch_bounds__(512, 1)
#endif
