// What MLX puts in front of every mx.fast.metal_kernel source
// (mlx/backend/metal/kernels/utils.h via metal::utils()): <metal_stdlib>,
// `using namespace metal;`, the type names its generated signatures use
// (float16_t, bfloat16_t, ...), and the indexing helpers kernels commonly
// call (elem_to_loc). Our own, smaller version of it.
#pragma once

#include <metal_stdlib>

using namespace metal;

typedef half float16_t;
typedef bfloat bfloat16_t;

#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::lowest();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::lowest();
};
#define EMU_FLOAT_LIMITS(T)                                              \
  template <>                                                            \
  struct Limits<T> {                                                     \
    static constexpr T max = metal::numeric_limits<T>::infinity();       \
    static constexpr T min = -metal::numeric_limits<T>::infinity();      \
    static constexpr T finite_max = metal::numeric_limits<T>::max();     \
    static constexpr T finite_min = -metal::numeric_limits<T>::max();    \
  };
EMU_FLOAT_LIMITS(half)
EMU_FLOAT_LIMITS(float)
EMU_FLOAT_LIMITS(bfloat)
#undef EMU_FLOAT_LIMITS

// Location of element `elem` (row-major index) of an array with `shape` and
// `strides` (in elements).
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(uint3 elem, constant const int* shape, constant const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

template <typename T>
inline T ceildiv(T n, T d) { return (n + d - 1) / d; }
