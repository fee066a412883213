// Kernel scratch through MLX's allocator (see cpu_kernels.h).
#include <new>

#include "cpu_kernels.h"
#include "mlx/allocator.h"

namespace mlxf {

namespace alloc = mlx::core::allocator;

void* scratch_alloc(size_t bytes, void** handle) {
  alloc::Buffer buffer = alloc::allocator().malloc(bytes);
  if (buffer.ptr() == nullptr) throw std::bad_alloc();
  // The Buffer is a single pointer; keep it as the handle to free.
  *handle = buffer.ptr();
  return buffer.raw_ptr();
}

void scratch_free(void* handle) { alloc::allocator().free(alloc::Buffer(handle)); }

}  // namespace mlxf
