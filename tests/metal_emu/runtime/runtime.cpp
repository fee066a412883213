// Runs a Metal compute grid on the CPU.
//
// Threadgroups run one after another. Inside a threadgroup every thread is a
// fiber (a hand-written stack switch on x86-64, ucontext elsewhere) and the threads are cooperatively scheduled: a fiber runs
// until it reaches a synchronisation point (threadgroup_barrier, or any
// SIMD-group operation), then the next ready fiber runs. The order in which
// ready fibers run is shuffled with a seeded generator, so a kernel that
// forgets a barrier reads stale or poisoned threadgroup memory and gives a
// wrong or seed-dependent result instead of passing by luck.
//
// Semantics of the synchronisation points:
// - A SIMD-group operation completes when every lane of the SIMD-group that
//   has not returned is blocked; the lanes blocked at SIMD-group operations
//   form the active set (as the hardware's active mask would). Lanes blocked
//   at different SIMD-group operations (different source lines: divergent
//   branches) are served one operation at a time.
// - threadgroup_barrier completes when every thread of the threadgroup is
//   blocked at it. A barrier that some threads never reach (they returned,
//   or wait at another barrier) is undefined behaviour in Metal, so an error.
#include "emu_abi.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <thread>
#include <random>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// Fiber contexts. On x86-64 a switch saves the callee-saved registers on the
// old stack and swaps stack pointers (tens of nanoseconds); ucontext's
// swapcontext also saves the signal mask with a system call (about 1 us),
// which dominates the emulation of SIMD-group-heavy kernels.
// -DEMU_USE_UCONTEXT forces the portable path (to test it on x86-64).

#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch_stack(void** save_sp, void* new_sp);
extern "C" void emu_fiber_start();
asm(R"(
  .text
  .globl emu_switch_stack
  .type emu_switch_stack,@function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};
void context_init(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 16);
  sp[0] = reinterpret_cast<void*>(entry);  // where the first switch "returns" to
  sp[1] = nullptr;                          // entry's own (never used) return address
  sp -= 6;                                  // r15 r14 r13 r12 rbx rbp
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c.sp = sp;
}
inline void context_switch(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void context_init(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr int kSimdWidth = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kPayloadBytes = 256;

enum class State { Ready, AtBarrier, AtSimd, Done };

struct Fiber {
  Context context;
  char* stack = nullptr;
  State state = State::Ready;
  unsigned site = 0;
  EmuThreadAttrs attrs;
  unsigned payload_bytes = 0;
  alignas(16) unsigned char payload[kPayloadBytes];
  EmuExchange result;
};

struct SimdGroup {
  alignas(16) unsigned char slots[kSimdWidth][kPayloadBytes];
  alignas(16) unsigned char scratch[kSimdWidth * kPayloadBytes];
  unsigned scratch_ready;
};

// Memory laid out so that running off either end faults: the data ends
// where an inaccessible page begins (up to 15 bytes of padding keep 16-byte
// alignment), and an inaccessible page precedes the data's first page.
struct Guarded {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
};

Guarded guarded_alloc(size_t bytes) {
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  size_t padded = (std::max<size_t>(bytes, 1) + 15) & ~size_t(15);
  size_t data_pages = (padded + page - 1) / page * page;
  Guarded g;
  g.map_bytes = page + data_pages + page;
  void* p = mmap(nullptr, g.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return Guarded{};
  g.map = static_cast<char*>(p);
  mprotect(g.map, page, PROT_NONE);
  mprotect(g.map + page + data_pages, page, PROT_NONE);
  g.data = g.map + page + data_pages - padded;
  g.bytes = bytes;
  return g;
}

void guarded_free(Guarded& g) {
  if (g.map) munmap(g.map, g.map_bytes);
  g = Guarded{};
}

// Where `address` falls relative to `g`: "" if nowhere near it.
std::string describe_offset(const Guarded& g, const char* address) {
  if (!g.map || address < g.map || address >= g.map + g.map_bytes) return "";
  long offset = long(address - g.data);
  return "byte offset " + std::to_string(offset) + " of " + std::to_string(g.bytes) + " bytes" +
         (offset < 0 ? " (before the start)" : " (past the end)");
}

struct ThreadgroupVariable {
  const void* key;
  Guarded memory;
  bool live;  // allocated (and poisoned) in the current threadgroup
};

struct Launch {
  EmuThreadFn fn = nullptr;
  void** buffers = nullptr;
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simdgroups;
  int thread_count = 0;
  Fiber* current = nullptr;
  std::string error;
  std::vector<ThreadgroupVariable> threadgroup_variables;
  size_t threadgroup_used = 0;
  long threadgroup_limit = 32768;
  const std::vector<Guarded>* buffers_memory = nullptr;  // shared by all workers
  const char* const* buffer_names = nullptr;
  sigjmp_buf abort_jump;  // where a fault in kernel code lands
  const char* fault_address = nullptr;
  int fault_signal = 0;
  long group[3] = {0, 0, 0};  // the threadgroup being run
  // Interleave mode and counting (see EmuLaunchOptions).
  bool interleave = false;
  bool counting = false;
  std::vector<unsigned long long> counts;
  std::mt19937_64* rng = nullptr;  // the worker's generator (interleave decisions)
};

thread_local Launch* g_launch = nullptr;

void fiber_main() {
  Launch* launch = g_launch;
  Fiber* self = launch->current;
  launch->fn(launch->buffers);
  self->state = State::Done;
  context_switch(self->context, launch->scheduler);
  __builtin_trap();  // a finished fiber is never resumed
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler() {
  Launch* launch = g_launch;
  context_switch(launch->current->context, launch->scheduler);
}

std::string site_text(unsigned site) { return "line " + std::to_string(site); }

// Completes pending SIMD-group operations; false if none could complete.
// Lanes blocked at different SIMD-group operations (divergent branches) are
// served one operation at a time, each with its lanes as the active set, as
// the hardware runs the branches one after the other.
bool complete_simd_operation(Launch& launch, size_t g);

bool complete_simd_operations(Launch& launch) {
  bool progressed = false;
  for (size_t g = 0; g < launch.simdgroups.size(); ++g) progressed |= complete_simd_operation(launch, g);
  return progressed;
}

// Completes the pending SIMD-group operation of SIMD-group g, if it has one
// and none of its lanes is still running (Ready).
bool complete_simd_operation(Launch& launch, size_t g) {
  {
    int first = int(g) * kSimdWidth;
    int last = std::min(first + kSimdWidth, launch.thread_count);
    unsigned mask = 0;
    unsigned site = 0;
    for (int t = first; t < last; ++t) {
      Fiber& f = launch.fibers[t];
      if (f.state == State::Ready) return false;
      if (f.state != State::AtSimd) continue;
      if (mask == 0) site = f.site;
      if (f.site == site) mask |= 1u << (t - first);
    }
    if (mask == 0) return false;
    SimdGroup& group = launch.simdgroups[g];
    group.scratch_ready = 0;
    for (int t = first; t < last; ++t) {
      if (!(mask >> (t - first) & 1u)) continue;
      Fiber& f = launch.fibers[t];
      memcpy(group.slots[t - first], f.payload, f.payload_bytes);
    }
    for (int t = first; t < last; ++t) {
      if (!(mask >> (t - first) & 1u)) continue;
      Fiber& f = launch.fibers[t];
      f.result.slots = &group.slots[0][0];
      f.result.stride = kPayloadBytes;
      f.result.active_mask = mask;
      f.result.lane = unsigned(t - first);
      f.result.width = unsigned(last - first);
      f.result.scratch = group.scratch;
      f.result.scratch_ready = &group.scratch_ready;
      f.state = State::Ready;
    }
  }
  return true;
}

// Releases a barrier that every thread reached; false (with an error) if not.
bool complete_barrier(Launch& launch) {
  int waiting = 0, done = 0;
  unsigned site = 0;
  for (int t = 0; t < launch.thread_count; ++t) {
    Fiber& f = launch.fibers[t];
    if (f.state == State::Done) {
      ++done;
    } else if (f.state == State::AtBarrier) {
      if (waiting > 0 && f.site != site) {
        launch.error = "threads of one threadgroup wait at different threadgroup_barrier calls (" +
                       site_text(site) + " and " + site_text(f.site) + ")";
        return false;
      }
      site = f.site;
      ++waiting;
    }
  }
  if (waiting == 0) return false;
  if (done > 0) {
    launch.error = "threadgroup_barrier at " + site_text(site) + " reached by " + std::to_string(waiting) +
                   " of " + std::to_string(launch.thread_count) +
                   " threads of the threadgroup (the others returned): undefined behaviour in Metal";
    return false;
  }
  for (int t = 0; t < launch.thread_count; ++t) launch.fibers[t].state = State::Ready;
  if (launch.counting) ++launch.counts[EMU_COUNT_BARRIERS];
  return true;
}

void set_attrs(EmuThreadAttrs& a, const long* grid, const long* dispatch_tg, const long* tg_count,
               const long* group, const long* actual, long local_x, long local_y, long local_z) {
  const long local[3] = {local_x, local_y, local_z};
  for (int d = 0; d < 3; ++d) {
    a.thread_position_in_threadgroup[d] = unsigned(local[d]);
    a.threadgroup_position_in_grid[d] = unsigned(group[d]);
    a.thread_position_in_grid[d] = unsigned(group[d] * dispatch_tg[d] + local[d]);
    a.threads_per_threadgroup[d] = unsigned(actual[d]);
    a.dispatch_threads_per_threadgroup[d] = unsigned(dispatch_tg[d]);
    a.threadgroups_per_grid[d] = unsigned(tg_count[d]);
    a.threads_per_grid[d] = unsigned(grid[d]);
  }
  unsigned linear = unsigned((local_z * actual[1] + local_y) * actual[0] + local_x);
  unsigned count = unsigned(actual[0] * actual[1] * actual[2]);
  unsigned dispatch_count = unsigned(dispatch_tg[0] * dispatch_tg[1] * dispatch_tg[2]);
  a.thread_index_in_threadgroup = linear;
  a.thread_index_in_simdgroup = linear % kSimdWidth;
  a.simdgroup_index_in_threadgroup = linear / kSimdWidth;
  a.simdgroups_per_threadgroup = (count + kSimdWidth - 1) / kSimdWidth;
  a.dispatch_simdgroups_per_threadgroup = (dispatch_count + kSimdWidth - 1) / kSimdWidth;
  a.thread_index_in_quadgroup = linear % 4;
  a.quadgroup_index_in_threadgroup = linear / 4;
  a.quadgroups_per_threadgroup = (count + 3) / 4;
  a.dispatch_quadgroups_per_threadgroup = (dispatch_count + 3) / 4;
}

char* allocate_stack() {
  long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  return static_cast<char*>(p) + page;
}

// When every thread is blocked: completes SIMD-group operations, else a
// barrier; 1 if something completed, 0 if all threads are done, -1 on
// error or deadlock (launch.error set).
int complete_blocked(Launch& launch) {
  bool all_done = true;
  for (int t = 0; t < launch.thread_count; ++t)
    if (launch.fibers[t].state != State::Done) all_done = false;
  if (all_done) return 0;
  if (complete_simd_operations(launch)) return 1;
  if (!launch.error.empty()) return -1;
  if (complete_barrier(launch)) return 1;
  if (launch.error.empty()) launch.error = "deadlock: no thread can make progress";
  return -1;
}

// Interleave mode (instrumented kernels yield at every threadgroup-memory
// access): SIMD-groups run in a seeded random priority order, probabilistic
// concurrency testing style. The highest-priority SIMD-group with a running
// lane advances each of its lanes to the next yield point; a SIMD-group
// whose lanes all wait at a SIMD-group operation completes it at once, so
// one SIMD-group can run ahead of the others up to the next barrier; at
// random steps (probability chosen per threadgroup, including never) the
// running SIMD-group drops to the lowest priority. A reader that another
// SIMD-group's store should have preceded (a missing barrier after a store),
// or a store that overtakes another SIMD-group's pending reads (a missing
// barrier before it), then sees poisoned or wrong data.
bool run_threadgroup_interleaved(Launch& launch, std::mt19937_64& rng) {
  size_t groups = launch.simdgroups.size();
  std::vector<size_t> priority(groups);  // priority[0] runs first
  for (size_t g = 0; g < groups; ++g) priority[g] = g;
  std::shuffle(priority.begin(), priority.end(), rng);
  static const unsigned kChangeOneIn[4] = {0, 512, 64, 8};
  unsigned change = kChangeOneIn[rng() % 4];
  std::vector<int> lanes;
  for (;;) {
    size_t at = groups;
    for (size_t p = 0; p < groups && at == groups; ++p) {
      size_t g = priority[p];
      int first = int(g) * kSimdWidth, last = std::min(first + kSimdWidth, launch.thread_count);
      for (int t = first; t < last; ++t)
        if (launch.fibers[t].state == State::Ready) { at = p; break; }
    }
    if (at == groups) {
      int status = complete_blocked(launch);
      if (status == 0) return true;
      if (status < 0) return false;
      continue;
    }
    size_t g = priority[at];
    int first = int(g) * kSimdWidth, last = std::min(first + kSimdWidth, launch.thread_count);
    lanes.clear();
    for (int t = first; t < last; ++t)
      if (launch.fibers[t].state == State::Ready) lanes.push_back(t);
    std::shuffle(lanes.begin(), lanes.end(), rng);
    for (int t : lanes) {
      launch.current = &launch.fibers[t];
      context_switch(launch.scheduler, launch.current->context);
      if (!launch.error.empty()) return false;
    }
    complete_simd_operation(launch, g);
    if (change && rng() % change == 0) {
      priority.erase(priority.begin() + long(at));
      priority.push_back(g);
    }
  }
}

// Runs one threadgroup to completion; false on error (launch.error set).
bool run_threadgroup(Launch& launch, std::mt19937_64& rng) {
  for (auto& v : launch.threadgroup_variables) v.live = false;
  launch.threadgroup_used = 0;
  for (int t = 0; t < launch.thread_count; ++t) {
    Fiber& f = launch.fibers[t];
    f.state = State::Ready;
    context_init(f.context, f.stack, kStackBytes, fiber_main);
  }
  if (launch.counting) ++launch.counts[EMU_COUNT_THREADGROUPS];
  if (launch.interleave) return run_threadgroup_interleaved(launch, rng);
  std::vector<int> order;
  order.reserve(launch.thread_count);
  for (;;) {
    order.clear();
    for (int t = 0; t < launch.thread_count; ++t)
      if (launch.fibers[t].state == State::Ready) order.push_back(t);
    if (order.empty()) {
      bool all_done = true;
      for (int t = 0; t < launch.thread_count; ++t)
        if (launch.fibers[t].state != State::Done) all_done = false;
      if (all_done) return true;
      if (complete_simd_operations(launch)) continue;
      if (!launch.error.empty()) return false;
      if (complete_barrier(launch)) continue;
      if (launch.error.empty()) launch.error = "deadlock: no thread can make progress";
      return false;
    }
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      launch.current = &launch.fibers[t];
      context_switch(launch.scheduler, launch.current->context);
      if (!launch.error.empty()) return false;
    }
  }
}

// Signals raised by kernel code (out-of-bounds access into a guard page,
// integer division by zero) abort the launch with a description instead of
// killing the process.
void on_fault(int signal, siginfo_t* info, void*) {
  Launch* launch = g_launch;
  if (!launch) {
    ::signal(signal, SIG_DFL);
    raise(signal);
    return;
  }
  launch->fault_signal = signal;
  launch->fault_address = static_cast<const char*>(info->si_addr);
  siglongjmp(launch->abort_jump, 1);
}

std::string describe_fault(const Launch& launch) {
  if (launch.fault_signal == SIGFPE)
    return "arithmetic trap (integer division by zero?): undefined in Metal, a crash on the CPU";
  const char* address = launch.fault_address;
  for (size_t i = 0; i < launch.buffers_memory->size(); ++i) {
    std::string where = describe_offset((*launch.buffers_memory)[i], address);
    if (!where.empty())
      return "out-of-bounds access to buffer " + std::to_string(i) + " `" + launch.buffer_names[i] + "` at " + where;
  }
  for (const auto& v : launch.threadgroup_variables) {
    std::string where = describe_offset(v.memory, address);
    if (!where.empty()) return "out-of-bounds access to a threadgroup array at " + where;
  }
  for (const auto& f : launch.fibers) {
    if (f.stack && address >= f.stack - 65536 && address < f.stack)
      return "stack overflow in a kernel thread (per-thread arrays over 256 KiB?)";
  }
  char text[64];
  snprintf(text, sizeof text, "%p", static_cast<const void*>(address));
  return std::string("memory fault at address ") + text + ", outside every buffer (a wild pointer)";
}

constexpr int kSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};

// Process-wide handlers for the duration of a launch.
struct SignalHandlers {
  struct sigaction previous[3];
  SignalHandlers() {
    struct sigaction action {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &action, &previous[i]);
  }
  ~SignalHandlers() {
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &previous[i], nullptr);
  }
};

// A per-OS-thread stack for the handler: a fiber's stack may be the one
// that overflowed.
struct AlternateSignalStack {
  static constexpr size_t kBytes = 256 * 1024;
  stack_t previous;
  char* memory;
  AlternateSignalStack() : memory(static_cast<char*>(malloc(kBytes))) {
    stack_t ss{};
    ss.ss_sp = memory;
    ss.ss_size = kBytes;
    sigaltstack(&ss, &previous);
  }
  ~AlternateSignalStack() {
    sigaltstack(&previous, nullptr);
    free(memory);
  }
};

// Fiber stacks are reused across launches (mapping them is not free).
std::mutex g_stack_pool_mutex;
std::vector<std::vector<char*>> g_stack_pool;

std::vector<char*> take_stacks(long count) {
  std::vector<char*> stacks;
  {
    std::lock_guard<std::mutex> lock(g_stack_pool_mutex);
    if (!g_stack_pool.empty()) {
      stacks = std::move(g_stack_pool.back());
      g_stack_pool.pop_back();
    }
  }
  while (long(stacks.size()) < count) {
    char* s = allocate_stack();
    if (!s) break;
    stacks.push_back(s);
  }
  return stacks;
}

void give_back_stacks(std::vector<char*> stacks) {
  std::lock_guard<std::mutex> lock(g_stack_pool_mutex);
  g_stack_pool.push_back(std::move(stacks));
}

struct Dispatch {
  const long* grid;
  long dispatch_tg[3];
  long tg_count[3];
  long tg_threads;
  const std::vector<long>* order;  // threadgroups (linear ids) in the order they run
};

// Runs threadgroups order[worker], order[worker + workers], ... on this OS
// thread; false with launch.error set on the first error.
bool run_worker(Launch& launch, const Dispatch& d, int worker, int workers, unsigned long long seed) {
  AlternateSignalStack alternate_stack;
  std::vector<char*> stacks = take_stacks(d.tg_threads);
  if (long(stacks.size()) < d.tg_threads) {
    launch.error = "could not allocate fiber stacks";
    give_back_stacks(std::move(stacks));
    return false;
  }
  launch.fibers.resize(d.tg_threads);
  for (long t = 0; t < d.tg_threads; ++t) launch.fibers[t].stack = stacks[t];
  std::mt19937_64 rng(seed + 0x9e3779b97f4a7c15ull * unsigned(worker));
  launch.rng = &rng;
  g_launch = &launch;
  bool ok = true;
  long* group = launch.group;  // in memory, so still right after a siglongjmp
  if (sigsetjmp(launch.abort_jump, 1) != 0) {
    launch.error = describe_fault(launch);
    ok = false;
  } else {
    for (size_t i = size_t(worker); i < d.order->size() && ok; i += size_t(workers)) {
      long id = (*d.order)[i];
      group[0] = id % d.tg_count[0];
      group[1] = id / d.tg_count[0] % d.tg_count[1];
      group[2] = id / (d.tg_count[0] * d.tg_count[1]);
      long actual[3];
      for (int k = 0; k < 3; ++k) actual[k] = std::min(d.dispatch_tg[k], d.grid[k] - group[k] * d.dispatch_tg[k]);
      launch.thread_count = int(actual[0] * actual[1] * actual[2]);
      launch.simdgroups.resize((launch.thread_count + kSimdWidth - 1) / kSimdWidth);
      int t = 0;
      for (long z = 0; z < actual[2]; ++z)
        for (long y = 0; y < actual[1]; ++y)
          for (long x = 0; x < actual[0]; ++x)
            set_attrs(launch.fibers[t++].attrs, d.grid, d.dispatch_tg, d.tg_count, group, actual, x, y, z);
      ok = run_threadgroup(launch, rng);
    }
  }
  g_launch = nullptr;
  for (auto& v : launch.threadgroup_variables) guarded_free(v.memory);
  give_back_stacks(std::move(stacks));
  if (!ok)
    launch.error = "threadgroup (" + std::to_string(group[0]) + ", " + std::to_string(group[1]) + ", " +
                   std::to_string(group[2]) + "): " + launch.error;
  return ok;
}

}  // namespace

extern "C" {

const EmuThreadAttrs* __emu_attrs(void) { return &g_launch->current->attrs; }

void __emu_fail(const char* message) {
  Launch* launch = g_launch;
  launch->error = message;
  yield_to_scheduler();  // the scheduler never resumes a fiber after an error
}

void __emu_threadgroup_barrier(unsigned site) {
  Fiber* f = g_launch->current;
  f->state = State::AtBarrier;
  f->site = site;
  yield_to_scheduler();
}

EmuExchange __emu_simd_exchange(const void* payload, unsigned nbytes, unsigned site) {
  Fiber* f = g_launch->current;
  if (nbytes > kPayloadBytes) __emu_fail("SIMD-group operation on a value larger than 256 bytes");
  memcpy(f->payload, payload, nbytes);
  f->payload_bytes = nbytes;
  f->state = State::AtSimd;
  f->site = site;
  yield_to_scheduler();
  return f->result;
}

void* __emu_threadgroup_alloc(const void* key, unsigned long nbytes, unsigned char poison) {
  Launch& launch = *g_launch;
  ThreadgroupVariable* variable = nullptr;
  for (auto& v : launch.threadgroup_variables)
    if (v.key == key) variable = &v;
  if (variable && variable->live) return variable->memory.data;
  size_t end = launch.threadgroup_used + ((nbytes + 15) & ~size_t(15));
  if (long(end) > launch.threadgroup_limit) {
    static thread_local std::string message;
    message = "threadgroup memory exceeds the Metal limit: " + std::to_string(end) + " bytes declared, limit " +
              std::to_string(launch.threadgroup_limit) + " bytes";
    __emu_fail(message.c_str());
  }
  if (!variable) {
    launch.threadgroup_variables.push_back({key, guarded_alloc(nbytes), false});
    variable = &launch.threadgroup_variables.back();
    if (!variable->memory.map) __emu_fail("could not allocate threadgroup memory");
  }
  launch.threadgroup_used = end;
  variable->live = true;
  memset(variable->memory.data, poison, nbytes);  // fresh each threadgroup, like uninitialised memory
  return variable->memory.data;
}

// ---------------------------------------------------------------------------
// Memory access hooks. Kernels built instrumented (clang's ThreadSanitizer
// instrumentation, with these functions in place of its runtime) call them
// before every load and store: threadgroup and buffer accesses are counted,
// and in interleave mode a threadgroup access is a point where the fiber
// yields, so that another SIMD-group may run before it.

static inline void on_access(const void* p, unsigned long n, bool write) {
  Launch* launch = g_launch;
  if (!launch || !launch->counting && !launch->interleave) return;
  const char* a = static_cast<const char*>(p);
  for (const auto& v : launch->threadgroup_variables) {
    if (v.live && a >= v.memory.data && a < v.memory.data + v.memory.bytes) {
      if (launch->counting) launch->counts[write ? EMU_COUNT_TG_WRITE_BYTES : EMU_COUNT_TG_READ_BYTES] += n;
      if (launch->interleave) yield_to_scheduler();
      return;
    }
  }
  if (!launch->counting) return;
  const std::vector<Guarded>& buffers = *launch->buffers_memory;
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (a >= buffers[i].data && a < buffers[i].data + buffers[i].bytes) {
      launch->counts[EMU_COUNT_FIXED + 2 * i + (write ? 1 : 0)] += n;
      return;
    }
  }
}

#define EMU_TSAN_SIZE(N)                                                          \
  void __tsan_read##N(void* p) { on_access(p, N, false); }                        \
  void __tsan_write##N(void* p) { on_access(p, N, true); }                        \
  void __tsan_unaligned_read##N(void* p) { on_access(p, N, false); }              \
  void __tsan_unaligned_write##N(void* p) { on_access(p, N, true); }              \
  void __tsan_volatile_read##N(void* p) { on_access(p, N, false); }               \
  void __tsan_volatile_write##N(void* p) { on_access(p, N, true); }               \
  void __tsan_unaligned_volatile_read##N(void* p) { on_access(p, N, false); }     \
  void __tsan_unaligned_volatile_write##N(void* p) { on_access(p, N, true); }
EMU_TSAN_SIZE(1)
EMU_TSAN_SIZE(2)
EMU_TSAN_SIZE(4)
EMU_TSAN_SIZE(8)
EMU_TSAN_SIZE(16)
#undef EMU_TSAN_SIZE
void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}
void __tsan_vptr_update(void*, void*) {}
void __tsan_vptr_read(void*) {}
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  on_access(s, n, false);
  on_access(d, n, true);
  return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  on_access(s, n, false);
  on_access(d, n, true);
  return memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
  on_access(d, n, true);
  return memset(d, c, n);
}

int __emu_run_grid(EmuThreadFn fn, void** buffers, const unsigned long* buffer_bytes, const char* const* buffer_names,
                   int buffer_count, const long* grid, const long* threadgroup, unsigned long long seed,
                   long threadgroup_memory_limit, int os_threads, char* error, long error_len) {
  return __emu_run_grid_ex(fn, buffers, buffer_bytes, buffer_names, buffer_count, grid, threadgroup, seed,
                           threadgroup_memory_limit, os_threads, error, error_len, nullptr);
}

void __emu_count_event(int kind) {
  Launch* launch = g_launch;
  if (launch && launch->counting) ++launch->counts[size_t(kind)];
}

int __emu_run_grid_ex(EmuThreadFn fn, void** buffers, const unsigned long* buffer_bytes,
                      const char* const* buffer_names, int buffer_count, const long* grid, const long* threadgroup,
                      unsigned long long seed, long threadgroup_memory_limit, int os_threads, char* error,
                      long error_len, const EmuLaunchOptions* options) {
  auto fail = [&](const std::string& message) {
    snprintf(error, size_t(error_len), "%s", message.c_str());
    return 1;
  };
  Dispatch d;
  d.grid = grid;
  d.tg_threads = 1;
  for (int k = 0; k < 3; ++k) {
    if (grid[k] < 1 || threadgroup[k] < 1)
      return fail("grid and threadgroup sizes must be positive in every dimension");
    d.dispatch_tg[k] = std::min(threadgroup[k], grid[k]);  // as MLX clamps the threadgroup to the grid
    d.tg_count[k] = (grid[k] + d.dispatch_tg[k] - 1) / d.dispatch_tg[k];
    d.tg_threads *= d.dispatch_tg[k];
  }
  if (d.tg_threads > kMaxThreads)
    return fail("threadgroup of " + std::to_string(d.tg_threads) + " threads exceeds the Metal limit of " +
                std::to_string(kMaxThreads) + " threads per threadgroup");

  // The kernel sees guarded copies of the buffers, copied back afterwards.
  std::vector<Guarded> memory;
  std::vector<void*> kernel_buffers(buffer_count);
  for (int i = 0; i < buffer_count; ++i) {
    memory.push_back(guarded_alloc(buffer_bytes[i]));
    if (!memory.back().map) return fail("could not allocate buffer copies");
    memcpy(memory.back().data, buffers[i], buffer_bytes[i]);
    kernel_buffers[i] = memory.back().data;
  }

  // Threadgroups run in a seeded random order: a kernel must not depend on
  // the order (or concurrency) in which the GPU runs them. With several OS
  // threads, worker w runs order[w], order[w + workers], ...
  std::vector<long> order(size_t(d.tg_count[0] * d.tg_count[1] * d.tg_count[2]));
  for (size_t i = 0; i < order.size(); ++i) order[i] = long(i);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  if (options && options->only_threadgroups) {
    order.assign(options->only_threadgroups, options->only_threadgroups + options->only_count);
    for (long id : order)
      if (id < 0 || id >= d.tg_count[0] * d.tg_count[1] * d.tg_count[2])
        return fail("only_threadgroups: threadgroup " + std::to_string(id) + " is outside the grid");
  }
  d.order = &order;

  int workers = int(std::max<long>(1, std::min<long>(os_threads, long(order.size()))));
  std::vector<std::unique_ptr<Launch>> launches;
  for (int w = 0; w < workers; ++w) {
    launches.push_back(std::make_unique<Launch>());
    Launch& l = *launches.back();
    l.fn = fn;
    l.buffers = kernel_buffers.data();
    l.buffers_memory = &memory;
    l.buffer_names = buffer_names;
    l.threadgroup_limit = threadgroup_memory_limit;
    l.interleave = options && options->interleave;
    l.counting = options && options->counts;
    l.counts.assign(EMU_COUNT_FIXED + 2 * size_t(buffer_count), 0);
  }
  std::vector<char> ok(size_t(workers), 0);
  {
    SignalHandlers handlers;
    Launch* previous = g_launch;
    std::vector<std::thread> threads;
    for (int w = 1; w < workers; ++w)
      threads.emplace_back([&, w] { ok[w] = run_worker(*launches[w], d, w, workers, seed); });
    ok[0] = run_worker(*launches[0], d, 0, workers, seed);
    for (auto& t : threads) t.join();
    g_launch = previous;
  }
  int status = 0;
  for (int w = 0; w < workers && status == 0; ++w)
    if (!ok[w]) status = fail(launches[w]->error);
  if (options && options->counts)
    for (int w = 0; w < workers; ++w)
      for (size_t i = 0; i < launches[w]->counts.size(); ++i) options->counts[i] += launches[w]->counts[i];
  for (int i = 0; i < buffer_count; ++i) {
    memcpy(buffers[i], memory[i].data, buffer_bytes[i]);
    guarded_free(memory[i]);
  }
  return status;
}

}  // extern "C"

// float -> bfloat conversion, which clang lowers to a libcall that libgcc
// (Debian 12) lacks. Round to nearest even; NaN stays a (quiet) NaN.
extern "C" __bf16 __truncsfbf2(float x) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  uint16_t out;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out = uint16_t((bits >> 16) | 0x40u);
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);
    out = uint16_t(bits >> 16);
  }
  __bf16 result;
  memcpy(&result, &out, 2);
  return result;
}

extern "C" __bf16 __truncdfbf2(double x) {
  // Through float is a double rounding; exact enough for kernels that never
  // hold doubles (MSL has none), and only reached by stray double literals.
  return __truncsfbf2(float(x));
}
