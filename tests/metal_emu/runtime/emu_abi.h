// The interface between a compiled kernel library and the emulation runtime
// (runtime.cpp). Kept C-only and free of standard library headers, because
// it is included into kernel translation units after <metal_stdlib>'s macros.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// Per-thread values the kernel signature may ask for ([[attributes]]).
typedef struct EmuThreadAttrs {
  unsigned thread_position_in_grid[3];
  unsigned thread_position_in_threadgroup[3];
  unsigned threadgroup_position_in_grid[3];
  unsigned threads_per_threadgroup[3];          // actual size (smaller at the grid edge)
  unsigned dispatch_threads_per_threadgroup[3]; // size given at dispatch
  unsigned threadgroups_per_grid[3];
  unsigned threads_per_grid[3];
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned dispatch_simdgroups_per_threadgroup;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroup_index_in_threadgroup;
  unsigned quadgroups_per_threadgroup;
  unsigned dispatch_quadgroups_per_threadgroup;
} EmuThreadAttrs;

// What a SIMD-group exchange hands back to each participating lane: every
// active lane's payload, `stride` bytes apart, indexed by lane.
typedef struct EmuExchange {
  const unsigned char* slots;
  unsigned stride;
  unsigned active_mask;  // bit i: lane i took part
  unsigned lane;
  unsigned width;        // lanes in this SIMD-group (32, fewer at a partial edge)
  // Scratch shared by the lanes of this exchange, so that one lane can
  // compute a result for all (e.g. a whole 8x8 product); *scratch_ready is
  // 0 when the exchange completes.
  unsigned char* scratch;
  unsigned* scratch_ready;
} EmuExchange;

// Calls the runtime makes into the kernel library.
typedef void (*EmuThreadFn)(void** buffers);

// Calls the kernel library makes into the runtime (see runtime.cpp).
const EmuThreadAttrs* __emu_attrs(void);
void __emu_threadgroup_barrier(unsigned site);
EmuExchange __emu_simd_exchange(const void* payload, unsigned nbytes, unsigned site);
// `key` identifies one threadgroup variable (declaration and type).
void* __emu_threadgroup_alloc(const void* key, unsigned long nbytes, unsigned char poison);
void __emu_fail(const char* message);  // does not return to the caller's thread

// What a launch counts (indices into EmuLaunchOptions.counts). Memory is
// counted only by kernels built instrumented (every load and store of the
// kernel calls the runtime); the rest by every build.
enum {
  EMU_COUNT_THREADGROUPS = 0,    // threadgroups run
  EMU_COUNT_BARRIERS,            // threadgroup_barrier completions (one per threadgroup and call)
  EMU_COUNT_SIMDGROUP_MMA,       // 8x8 simdgroup_multiply_accumulate, one per SIMD-group and call
  EMU_COUNT_TG_READ_BYTES,       // threadgroup memory loaded, bytes
  EMU_COUNT_TG_WRITE_BYTES,      // threadgroup memory stored, bytes
  EMU_COUNT_EXP,                 // per thread and element: exp, exp2, log, log2, tanh, other transcendentals
  EMU_COUNT_EXP2,
  EMU_COUNT_LOG,
  EMU_COUNT_LOG2,
  EMU_COUNT_TANH,
  EMU_COUNT_OTHER_MATH,
  EMU_COUNT_FIXED,               // then per buffer i: [FIXED + 2i] bytes read, [FIXED + 2i + 1] bytes written
};

typedef struct EmuLaunchOptions {
  int interleave;                      // switch SIMD-groups at every threadgroup-memory access (instrumented)
  const long* only_threadgroups;       // run only these (linear ids: x + X * (y + Y * z)); NULL: all
  long only_count;
  unsigned long long* counts;          // EMU_COUNT_FIXED + 2 * buffers entries, added to; NULL: none
} EmuLaunchOptions;

// Counted events the kernel library reports (EMU_COUNT_SIMDGROUP_MMA, EMU_COUNT_EXP, ...).
void __emu_count_event(int kind);

int __emu_run_grid_ex(EmuThreadFn fn, void** buffers, const unsigned long* buffer_bytes,
                      const char* const* buffer_names, int buffer_count, const long* grid,
                      const long* threadgroup, unsigned long long seed, long threadgroup_memory_limit,
                      int os_threads, char* error, long error_len, const EmuLaunchOptions* options);

// Runs the grid over copies of `buffers` (copied back at the end), its
// threadgroups spread over `os_threads` threads; 0 on success, else 1 with a
// message in `error`.
int __emu_run_grid(EmuThreadFn fn, void** buffers, const unsigned long* buffer_bytes,
                   const char* const* buffer_names, int buffer_count, const long* grid,
                   const long* threadgroup, unsigned long long seed,
                   long threadgroup_memory_limit, int os_threads, char* error, long error_len);

#ifdef __cplusplus
}
#endif
