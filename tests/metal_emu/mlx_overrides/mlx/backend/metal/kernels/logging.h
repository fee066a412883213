// Replaces MLX's logging.h for the emulation: the original's fallback
// os_log qualifies member functions by address space (`... const constant`),
// which C++ cannot express. Logging does nothing here either.
#pragma once

namespace mlx {
struct os_log {
  constexpr os_log(const constant char*, const constant char*) {}
  template <typename... Args>
  void log_debug(const constant char*, Args...) const {}
};
}  // namespace mlx
