// Launch bounds for the few-rows kernel (matmul_gemv.cuh): at most 256
// threads, 3 blocks per SM. mx.fast.cuda_kernel writes the kernel's
// declaration after its header and takes no launch bounds, so this header
// (last in the kernel's list, cuda_matmul._gemv) gives them to the one
// __global__ that follows. With them ptxas keeps a chunk batch's loads in
// flight together (12-18 16-byte loads per lane before the first mma); with
// no bounds it places each load next to its use (4 in flight), which left
// the weight stream at about 0.62 of the copy bandwidth on the H200.
#pragma once
#ifdef __CUDA_ARCH__
#undef __global__
#define __global__ __location__(global) __launch_bounds__(256, 3)
#endif
