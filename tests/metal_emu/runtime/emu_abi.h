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
