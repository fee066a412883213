// Replaces MLX's bf16_math.h for the emulation: the original defines the
// metal:: math and SIMD-group functions for bfloat through Apple's compiler
// intrinsics (__metal_fabs, __metal_simd_sum, ...); the emulated
// <metal_stdlib> already has bfloat overloads of all of them.
#pragma once
#include <metal_stdlib>
