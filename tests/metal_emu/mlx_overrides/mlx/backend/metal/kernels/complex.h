// Replaces MLX's complex.h for the emulation. The original overloads every
// constructor by address space (`complex_t() threadgroup`, `... device`),
// which MSL allows and C++ does not; the attention kernels use no complex
// numbers, so this keeps only what utils.h itself needs of complex64_t.
#pragma once
#include <metal_stdlib>

template <typename T>
struct complex_t {
  using value_type = T;
  T real;
  T imag;
  constexpr complex_t(T real, T imag) : real(real), imag(imag) {}
  constexpr complex_t() : real(0), imag(0) {}
  template <typename U>
  constexpr complex_t(U x) : real(static_cast<T>(x)), imag(0) {}
};

typedef complex_t<float> complex64_t;
