// Kernel scratch through MLX's allocator (see cpu_kernels.h).
#include <cstdint>
#include <new>

#include "cpu_kernels.h"
#include "mlx/allocator.h"

namespace mlxf {

namespace alloc = mlx::core::allocator;

void* scratch_alloc(size_t bytes, void** handle) {
  // 64 bytes extra so the pointer handed out is cache-line aligned whatever
  // alignment the allocator gives.
  alloc::Buffer buffer = alloc::allocator().malloc(bytes + 64);
  if (buffer.ptr() == nullptr) throw std::bad_alloc();
  // The Buffer is a single pointer; keep it as the handle to free.
  *handle = buffer.ptr();
  const auto raw = reinterpret_cast<uintptr_t>(buffer.raw_ptr());
  return reinterpret_cast<void*>((raw + 63) & ~uintptr_t(63));
}

void scratch_free(void* handle) { alloc::allocator().free(alloc::Buffer(handle)); }

}  // namespace mlxf
