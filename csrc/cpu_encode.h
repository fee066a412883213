// Running a kernel on MLX's CPU stream: the inputs and outputs are registered
// with the stream's command encoder (so MLX keeps them alive and orders the
// work), then the kernel is queued. Shared by every CPU primitive.
#pragma once

#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxf {

template <class F>
void dispatch_cpu(mlx::core::Stream s, const std::vector<mlx::core::array>& inputs,
                  std::vector<mlx::core::array>& outputs, F&& f) {
  auto& enc = mlx::core::cpu::get_command_encoder(s);
  for (const auto& x : inputs) enc.set_input_array(x);
  for (auto& x : outputs) enc.set_output_array(x);
  enc.dispatch(std::forward<F>(f));
}

}  // namespace mlxf
