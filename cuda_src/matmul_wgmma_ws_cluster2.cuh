// Launch bounds and cluster shape of the warp-specialised matmul with
// CLUSTER = 2 (matmul_wgmma_ws.cuh): mx.fast.cuda_kernel launches with no
// cluster attribute, so the cluster must be the kernel's compile-time
// __cluster_dims__; like the launch bounds it goes on the one __global__
// MLX writes after the headers (this header comes last, cuda_matmul._wgmma_ws).
#pragma once
#ifdef __CUDA_ARCH__
#undef __global__
#define __global__ __location__(global) __launch_bounds__(384, 1) __cluster_dims__(2, 1, 1)
#endif
