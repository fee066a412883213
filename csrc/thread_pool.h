// A small persistent thread pool for the CPU kernels.
//
// Kernels hand it a plain function pointer and a context (no std::function),
// so the per-ISA kernel objects share no template code with the rest.
#pragma once

#include <cstdint>

namespace mlxf {

// fn(ctx, task, worker) for every task in [0, n_tasks); workers pull tasks
// dynamically. Runs inline when n_tasks <= 1 or only one thread is used.
// worker is in [0, num_workers()) and indexes per-thread scratch.
using TaskFn = void (*)(void* ctx, int64_t task, int worker);
void parallel_for(int64_t n_tasks, TaskFn fn, void* ctx);
int num_workers();

// Call a lambda per task through parallel_for.
template <class F>
void parallel_tasks(int64_t n_tasks, F& f) {
  parallel_for(
      n_tasks,
      [](void* ctx, int64_t task, int worker) { (*static_cast<F*>(ctx))(task, worker); },
      &f);
}

}  // namespace mlxf
