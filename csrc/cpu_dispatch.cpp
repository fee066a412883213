// Picks the CPU kernel variant for this processor once, at first use.
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace mlxf {
namespace {

bool has_avx2() {
#if defined(MLXF_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  static const bool ok = [] {
    // MLX_FLASH_CPU_ISA=generic forces the portable variant (tests run it this way).
    const char* forced = std::getenv("MLX_FLASH_CPU_ISA");
    if (forced && std::strcmp(forced, "generic") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

#if !defined(MLXF_HAVE_AVX2)
// Non-x86 builds compile only the generic variant; give the avx2 names a body.
namespace avx2 {
void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) { generic::attention_forward(a, o); }
void attention_backward(const AttentionArgs& a, const BackwardArgs& g) { generic::attention_backward(a, g); }
void matmul2d(const MatmulArgs& a) { generic::matmul2d(a); }
}  // namespace avx2
#endif

void attention_forward(const AttentionArgs& a, const ForwardOutputs& o) {
  has_avx2() ? avx2::attention_forward(a, o) : generic::attention_forward(a, o);
}
void attention_backward(const AttentionArgs& a, const BackwardArgs& g) {
  has_avx2() ? avx2::attention_backward(a, g) : generic::attention_backward(a, g);
}
void matmul2d(const MatmulArgs& a) { has_avx2() ? avx2::matmul2d(a) : generic::matmul2d(a); }
const char* cpu_kernel_isa() { return has_avx2() ? "avx2" : "generic"; }

}  // namespace mlxf
