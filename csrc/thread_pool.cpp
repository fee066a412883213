// Persistent worker threads for the CPU kernels (see thread_pool.h).
#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mlxf {
namespace {

int configured_threads() {
  const char* env = std::getenv("MLX_FLASH_NUM_THREADS");
  if (env != nullptr && *env != '\0') {
    // A value that is not a positive integer is an error, not a silent default.
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (*end != '\0' || n <= 0 || n > 4096) {
      throw std::invalid_argument(std::string("MLX_FLASH_NUM_THREADS: expected a positive integer "
                                              "(or unset for one thread per core), got '") + env + "'");
    }
    return static_cast<int>(n);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

class Pool {
 public:
  explicit Pool(int n) : n_workers_(n) {
    for (int w = 1; w < n; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return n_workers_; }

  void run(int64_t n_tasks, TaskFn fn, void* ctx) {
    // One job at a time; a job submitted while another runs (another MLX
    // stream, or a kernel calling back in) runs on the caller alone.
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock() || n_workers_ == 1 || n_tasks <= 1) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_tasks_ = n_tasks;
      next_.store(0);
      active_ = n_workers_ - 1;
      ++generation_;
    }
    cv_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return active_ == 0; });
  }

 private:
  void drain(int worker) {
    for (int64_t t; (t = next_.fetch_add(1)) < n_tasks_;) fn_(ctx_, t, worker);
  }
  void worker_loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain(worker);
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  int n_workers_;
  std::vector<std::thread> threads_;
  std::mutex mu_, job_mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int active_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
};

Pool& pool() {
  static Pool* p = new Pool(configured_threads());  // never destroyed: workers may outlive static teardown
  return *p;
}

}  // namespace

void parallel_for(int64_t n_tasks, TaskFn fn, void* ctx) { pool().run(n_tasks, fn, ctx); }
int num_workers() { return pool().size(); }

}  // namespace mlxf
