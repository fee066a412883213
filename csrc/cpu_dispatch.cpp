// Picks the CPU kernel variant for this processor once, at first use.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "attention_quant.h"
#include "cpu_kernels.h"

namespace mlxf {
namespace {

enum class Isa { generic, avx2, avx512 };  // ordered: each runs where the next does

// MLX_FLASH_CPU_ISA=generic|avx2|avx512 caps the variant (the tests run each
// this way); unset or empty: no cap. A misspelt value is an error rather than
// a silent run of some other variant.
Isa requested_cap() {
  const char* cap = std::getenv("MLX_FLASH_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return Isa::avx512;
  if (std::strcmp(cap, "generic") == 0) return Isa::generic;
  if (std::strcmp(cap, "avx2") == 0) return Isa::avx2;
  if (std::strcmp(cap, "avx512") == 0) return Isa::avx512;
  throw std::invalid_argument(std::string("MLX_FLASH_CPU_ISA: expected one of generic, avx2, avx512 "
                                          "(or unset for the best this CPU supports), got '") + cap + "'");
}

Isa detect() {
  const Isa cap = requested_cap();
#if defined(MLXF_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const Isa best = avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::generic;
  return std::min(best, cap);
#else
  (void)cap;  // only the generic variant is built here
  return Isa::generic;
#endif
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

}  // namespace

#if !defined(MLXF_HAVE_AVX2)
// Non-x86 builds compile only the generic variant; give the other names a body.
namespace avx2 {
void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) { generic::attention_forward(a, o); }
void attention_backward(const AttentionArgs& a, const BackwardArgs& g) { generic::attention_backward(a, g); }
void matmul2d(const MatmulArgs& a) { generic::matmul2d(a); }
void quant_attention_forward(const QuantAttentionArgs& a, const ForwardOutputs& o) { generic::quant_attention_forward(a, o); }
void quant_attention_backward(const QuantAttentionArgs& a, const QuantBackwardArgs& g) { generic::quant_attention_backward(a, g); }
}  // namespace avx2
namespace avx512 {
void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) { generic::attention_forward(a, o); }
void attention_backward(const AttentionArgs& a, const BackwardArgs& g) { generic::attention_backward(a, g); }
void quant_attention_forward(const QuantAttentionArgs& a, const ForwardOutputs& o) { generic::quant_attention_forward(a, o); }
void quant_attention_backward(const QuantAttentionArgs& a, const QuantBackwardArgs& g) { generic::quant_attention_backward(a, g); }
}  // namespace avx512
#endif

// matmul2d has no AVX-512 variant of its own: its avx2 kernel serves.
namespace avx512 {
void matmul2d(const MatmulArgs& a) { avx2::matmul2d(a); }
}  // namespace avx512

void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) {
  switch (isa()) {
    case Isa::avx512: return avx512::attention_forward(a, o);
    case Isa::avx2: return avx2::attention_forward(a, o);
    default: return generic::attention_forward(a, o);
  }
}
void attention_backward(const AttentionArgs& a, const BackwardArgs& g) {
  switch (isa()) {
    case Isa::avx512: return avx512::attention_backward(a, g);
    case Isa::avx2: return avx2::attention_backward(a, g);
    default: return generic::attention_backward(a, g);
  }
}
void quant_attention_forward(const QuantAttentionArgs& a, const ForwardOutputs& o) {
  switch (isa()) {
    case Isa::avx512: return avx512::quant_attention_forward(a, o);
    case Isa::avx2: return avx2::quant_attention_forward(a, o);
    default: return generic::quant_attention_forward(a, o);
  }
}
void quant_attention_backward(const QuantAttentionArgs& a, const QuantBackwardArgs& g) {
  switch (isa()) {
    case Isa::avx512: return avx512::quant_attention_backward(a, g);
    case Isa::avx2: return avx2::quant_attention_backward(a, g);
    default: return generic::quant_attention_backward(a, g);
  }
}
void matmul2d(const MatmulArgs& a) { isa() == Isa::generic ? generic::matmul2d(a) : avx2::matmul2d(a); }
const char* cpu_kernel_isa() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace mlxf
