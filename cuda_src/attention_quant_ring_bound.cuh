// The quantized decode's ring (attention_quant_decode with STAGES > 0) at
// most 128 registers a thread, so that two blocks of 8 warps (or four of 4,
// one of 16) fit an SM's 65536 registers: 16 warps an SM, the ring's design.
// MLX writes the kernel's signature itself (custom_kernel.cpp) right after
// the header, so the bound cannot be written on the kernel: the header ends
// by redefining __global__ for that one declaration (each mx.fast.cuda_kernel
// is a program of its own). Unbounded, MLX's NVRTC gave the ring up to 138
// registers where nvcc gives 120 (tools/nvrtc_regs.py), so two blocks never
// fit and the call ran in two waves. cuda_quant.decode_plan sizes blocks
// from this bound (_RING_MAXNREG); the compile tests check no spills under
// it, nvcc and NVRTC. Only the real compilers see it (the CPU emulation's
// __global__ stays its own).
#if defined(__CUDACC_RTC__) || defined(__NVCC__)
#undef __global__
#define __global__ __attribute__((global)) __maxnreg__(128)
#endif
// A line of code last: inline (MLX_FLASH_CUDA_INLINE_HEADERS=1) the header's
// text runs straight into MLX's next line, which must not join a directive.
static_assert(true, "the register bound above is for the kernel MLX declares next");
