// Attention over an affine-quantized K/V cache (mx.quantize's format): the
// kernel interface, shared by the primitive (attention_quant_primitive.cpp)
// and the per-ISA CPU kernels (attention_quant_cpu_kernel.cpp).
//
// Format (checked against mx.dequantize for every bits x group_size): each
// token row of D values is a little-endian bit stream of D * bits bits held
// in D * bits / 32 uint32 words (value c at bit c * bits, so 3-, 5- and
// 6-bit values straddle word boundaries), and value c dequantizes to
// scales[c / group_size] * code + biases[c / group_size].
#pragma once

#include <cstdint>

#include "cpu_kernels.h"

namespace mlxf {

// A strided rank-4 array (element strides of every dim).
struct Strided4 {
  const void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  int64_t offset(int64_t b, int64_t h, int64_t n) const { return b * s[0] + h * s[1] + n * s[2]; }
};

// One quantized operand: words [B, H, N, D*bits/32] (uint32), scales and
// biases [B, H, N, D/group_size] in `scale_dtype`.
struct QuantView {
  Strided4 words, scales, biases;
  DType scale_dtype = DType::f32;
  int dim = 0;  // D, the dequantized head dim
};

struct QuantAttentionArgs {
  // Shapes, rules and q as for the float kernels; its k and v views are unused.
  AttentionArgs base;
  int bits = 4, group_size = 64;
  QuantView k, v;
};

// The backward gives dq only (k and v are constants). delta_i = dO_i . O_i -
// dlse_i is computed by the caller, float32 [B, Hq, Nq] like lse.
struct QuantBackwardArgs {
  View4 dout;
  const float* lse = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;  // [B, Hq, Nq, Dqk] contiguous, q's dtype
};

#define MLXF_DECLARE_QUANT_KERNELS(ISA)                                                  \
  namespace ISA {                                                                        \
  void quant_attention_forward(const QuantAttentionArgs& a, const ForwardOutputs& o);   \
  void quant_attention_backward(const QuantAttentionArgs& a, const QuantBackwardArgs& g); \
  }

MLXF_DECLARE_QUANT_KERNELS(generic)
MLXF_DECLARE_QUANT_KERNELS(avx2)
MLXF_DECLARE_QUANT_KERNELS(avx512)

// Run-time choice of the variant (cpu_dispatch.cpp).
void quant_attention_forward(const QuantAttentionArgs& a, const ForwardOutputs& o);
void quant_attention_backward(const QuantAttentionArgs& a, const QuantBackwardArgs& g);

}  // namespace mlxf
