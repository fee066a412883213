// CPU matmul2d kernels (compiled per instruction set like attention_cpu_kernel.cpp).
