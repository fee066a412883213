// CUDA emulation (tests/cuda_emu): the Hopper (sm_90a) machinery of the
// warp-specialised attention kernels, in C++. The harness rewrites every
// inline-PTX statement of their headers and bodies into calls of
// emu_hopper:: (ptx_asm.py); the kernel text itself is unchanged.
//
// Shared-memory addresses are those of the shared window (cuda_emu.h): byte
// offsets of dynamic shared memory, static shared arrays above 0x40000.
//
// * mbarrier: its 8 bytes hold the emulated state (arrival count, pending
//   arrivals, phase, transaction bytes, a tag: one used before init fails).
//   A phase completes when its arrivals and its bytes are all in.
//   try_wait.parity(P) is true once the phase of parity P completed.
// * TMA: tensor maps are the emulation's own 128-byte encoding (the harness
//   swaps it in for cuTensorMapEncodeTiled: see harness.tensor_map_3d).
//   tensormap.replace writes the address field, cp_fenceproxy copies the map.
//   A tile load (2-D / 3-D box, 128-byte swizzle, out-of-bounds elements zero,
//   the whole box's bytes counted) lands late: when a thread first polls its
//   mbarrier, so a reader that skips the wait reads poison, not the tile
//   (EMU_TMA_EARLY: its bytes are written at issue, counted at the poll).
// * Spin-waits (mbarrier polls, bar.sync, a wgmma wait for the rest of its
//   warpgroup) yield their fiber; the lanes of a warp leave a wait together;
//   a wait that no thread of the block can end any more (every thread waits,
//   nothing moved for 16 rounds) fails the launch with a message instead of hanging.
// * Named barriers: bar.sync / bar.arrive / bar.red.or with an id and a
//   thread count, counted per thread (every lane of a warp takes part).
// * wgmma (SS and RS, any m64nNk16 for 16-bit inputs): executed late, for the
//   whole warpgroup, when one of its threads waits for the group (after all
//   128 committed it: the hardware starts it once all four warps issued it).
//   Until then the shared-memory bytes it reads and its A registers (RS)
//   must stay as they were at issue, else the
//   launch fails (the kernel overwrote an operand in flight); its accumulator
//   reads as NaN while in flight (a kernel that reads it early sees NaN).
//   16-bit (k16) and fp8 (k32, the GEMM's mixed e4m3 / e5m2 pairs) kinds.
//   Products are summed in fp32 in k order: no model of the tensor cores'
//   own rounding, unless EMU_FP8_ACCUM_BITS asks for one of fp8 sums (below).
// * setmaxnreg, fences: no-ops. %globaltimer and %smid read 0. __trap fails
//   the launch.
// * Bulk copies (bwd): cp.reduce.async.bulk add.f32 runs at its bulk wait.
#pragma once

#include <cmath>
#include <cstring>
#include <cuda_fp8.h>  // fp8 wgmma operands (the GEMM)

inline void __trap() { __emu_fail("__trap"); }

namespace mlx_flash {
inline void emu_cp_async_land_all();  // mma_emu.cuh
inline unsigned smem_addr(const void* p) { return __emu_smem_window(p); }
inline void emu_hopper_thread_start();
}  // namespace mlx_flash

namespace emu_hopper {

constexpr int kMaxThreads = 1024;

// ---------------------------------------------------------------------------
// Spin-waits.

struct Spin {
  unsigned long long seen = ~0ull;
  int stale = 0;
};
inline Spin& spin_state() {
  static thread_local Spin spins[kMaxThreads];
  return spins[__emu_attrs()->thread_index_in_threadgroup];
}
inline void spin_done() { spin_state() = Spin{}; }
// Waits until done() holds, yielding the fiber between polls. The lanes of a
// warp that wait together (the same `key`: barrier and phase) poll once per
// round, the first lane back deciding for all, so they leave the wait
// together as a converged warp does (later warp-wide steps, wgmma's A
// fragments, need every lane there). `what` is the message of a wait that
// nothing can end any more: every thread waits and no progress was counted
// for 16 rounds.
template <class F>
inline void warp_wait(unsigned long long key, F&& done, const char* what) {
  for (;;) {
    EmuExchange e = (__emu_simd_exchange)(&key, sizeof(key), __LINE__);  // uncounted: a spin is no progress
    for (unsigned l = 0; l < 32; ++l)
      if ((e.active_mask >> l & 1u) && __emu_lane_value<unsigned long long>(e, l) != key)
        __emu_fail("cuda_emu: lanes of one warp wait on different barriers or phases at once");
    if (*e.scratch_ready == 0) {
      e.scratch[0] = done() ? 1 : 0;
      *e.scratch_ready = 1;
    }
    if (e.scratch[0]) {
      spin_done();
      return;
    }
    Spin& s = spin_state();
    if (__emu_progress() == s.seen) {
      if (++s.stale > 16) __emu_fail(what);
    } else {
      s.seen = __emu_progress();
      s.stale = 0;
    }
  }
}

// ---------------------------------------------------------------------------
// Block state: named barriers, in the runtime's per-block memory (zeroed
// when each block starts, before any of its threads runs).

struct BlockState {
  unsigned count[16], gen[16];
  int red[16], red_result[16];
  int started;  // set by the block's first user (tma_queue: drop what a failed block left)
};
inline BlockState& block() {
  static char key;
  return *static_cast<BlockState*>(__emu_threadgroup_alloc(&key, sizeof(BlockState), 0));
}

inline void named_barrier(unsigned id, unsigned count, bool wait) {
  if (id >= 16) __emu_fail("bar.sync / bar.arrive: barrier id past 15");
  BlockState& s = block();
  ++__emu_progress();
  const unsigned gen = s.gen[id];
  if (++s.count[id] == count) {
    s.count[id] = 0;
    ++s.gen[id];
    s.red_result[id] = s.red[id];
    s.red[id] = 0;
  }
  if (!wait) return;
  warp_wait((unsigned long long)(id + 1) << 32 | gen, [&] { return s.gen[id] != gen; },
            "deadlock: a named barrier (bar.sync) that no thread can complete any more");
}
inline unsigned named_barrier_or(unsigned id, unsigned count, unsigned p) {
  block().red[id] |= p != 0;
  named_barrier(id, count, true);
  return block().red_result[id] != 0;
}

// ---------------------------------------------------------------------------
// mbarrier: bits 0-11 arrival count, 12-23 pending arrivals, 24 phase,
// 25-31 the tag 0x35, 32-63 transaction bytes outstanding (signed).

struct Mbar {
  unsigned count, pending, phase;
  int tx;
};
inline unsigned long long* mbar_word(unsigned addr) {
  if (addr % 8) __emu_fail("mbarrier: address not 8-byte aligned");
  return reinterpret_cast<unsigned long long*>(__emu_smem_pointer(addr, 8));
}
inline Mbar mbar_load(unsigned addr) {
  const unsigned long long v = *mbar_word(addr);
  if (((v >> 25) & 0x7F) != 0x35) __emu_fail("mbarrier used before mbarrier.init");
  return Mbar{unsigned(v & 0xFFF), unsigned((v >> 12) & 0xFFF), unsigned((v >> 24) & 1), int(unsigned(v >> 32))};
}
inline void mbar_store(unsigned addr, Mbar m) {
  if (m.pending == 0 && m.tx == 0) {  // the phase completes
    m.phase ^= 1;
    m.pending = m.count;
  }
  *mbar_word(addr) = (unsigned long long)m.count | ((unsigned long long)m.pending << 12) |
                     ((unsigned long long)m.phase << 24) | (0x35ull << 25) |
                     ((unsigned long long)unsigned(m.tx) << 32);
}
inline void mbar_init(unsigned addr, unsigned count) {
  if (count == 0 || count > 0xFFF) __emu_fail("mbarrier.init: count outside [1, 4095]");
  ++__emu_progress();
  *mbar_word(addr) = (unsigned long long)count | ((unsigned long long)count << 12) | (0x35ull << 25);
}
inline void mbar_arrive(unsigned addr, unsigned expect_tx) {
  ++__emu_progress();
  Mbar m = mbar_load(addr);
  m.tx += int(expect_tx);
  if (m.pending == 0) __emu_fail("mbarrier: an arrive on a phase whose arrivals are all in");
  --m.pending;
  mbar_store(addr, m);
}
inline void mbar_complete_tx(unsigned addr, unsigned bytes) {
  ++__emu_progress();
  Mbar m = mbar_load(addr);
  m.tx -= int(bytes);
  mbar_store(addr, m);
}

// ---------------------------------------------------------------------------
// TMA. The emulation's tensor map (the harness encodes it: harness.py
// _TENSOR_MAP): tag, rank, element bytes, swizzle bytes, global address,
// dims[3], byte strides of dims 1 and 2, box[3].

struct TensorMap {
  unsigned tag, rank, elem_bytes, swizzle;
  unsigned long long address, dims[3], strides[2];
  unsigned box[3], pad;
};
static_assert(sizeof(TensorMap) <= 128, "tensor map");
constexpr unsigned kTensorMapTag = 0x4d54554du;  // "MUTM"

inline void tmap_replace_address(unsigned smem, unsigned long long address) {
  TensorMap* m = reinterpret_cast<TensorMap*>(__emu_smem_pointer(smem, 128));
  if (m->tag != kTensorMapTag) __emu_fail("tensormap.replace on bytes that are not a tensor map");
  m->address = address;
}
inline void tmap_copy(void* global, unsigned smem) { std::memcpy(global, __emu_smem_pointer(smem, 128), 128); }

struct TmaLoad {
  TensorMap map;
  unsigned dst, bar;
  int c[3];
};
struct TmaQueue {
  TmaLoad loads[256];
  int count;
};
inline TmaQueue& tma_queue() {
  static thread_local TmaQueue q;
  BlockState& b = block();
  if (!b.started) {
    b.started = 1;
    q.count = 0;
  }
  return q;
}
inline unsigned swizzle128(unsigned addr) { return addr ^ (((addr >> 7) & 7u) << 4); }
// The 64-byte swizzle: 16-byte chunk bits 4-5 XOR address bits 7-8.
inline unsigned swizzle64(unsigned addr) { return addr ^ (((addr >> 7) & 3u) << 4); }

#ifndef EMU_TMA_EARLY
#define EMU_TMA_EARLY 0
#endif
// Where a load's bytes are written: at issue (EMU_TMA_EARLY: harness.TMA_EARLY,
// to catch a producer overwriting a buffer that an in-flight wgmma still
// reads), or when its barrier is first polled (the default: a consumer that
// reads before its wait reads poison). Its bytes count at the poll either way.
inline void tma_write(const TmaLoad& l);
inline void tma_land(const TmaLoad& l) {
  if (!EMU_TMA_EARLY) tma_write(l);
  mbar_complete_tx(l.bar, l.map.box[0] * l.map.elem_bytes * l.map.box[1] * l.map.box[2]);
}
inline void tma_write(const TmaLoad& l) {
  const TensorMap& m = l.map;
  const unsigned eb = m.elem_bytes, row_bytes = m.box[0] * eb;
  if (m.swizzle == 128 && row_bytes != 128) __emu_fail("TMA: a 128-byte swizzle with a box row that is not 128 bytes");
  if (m.swizzle == 64 && row_bytes != 64) __emu_fail("TMA: a 64-byte swizzle with a box row that is not 64 bytes");
  if (m.swizzle != 0 && m.swizzle != 64 && m.swizzle != 128) __emu_fail("TMA: swizzle 0, 64 or 128 bytes only");
  const unsigned bytes = row_bytes * m.box[1] * m.box[2];
  unsigned char* dst = __emu_smem_pointer(l.dst, bytes);
  const unsigned char* src = reinterpret_cast<const unsigned char*>(m.address);
  for (unsigned z = 0; z < m.box[2]; ++z)
    for (unsigned y = 0; y < m.box[1]; ++y)
      for (unsigned x = 0; x < m.box[0]; ++x) {
        const long long g0 = (long long)l.c[0] + x, g1 = (long long)l.c[1] + y, g2 = (long long)l.c[2] + z;
        const unsigned linear = ((z * m.box[1] + y) * m.box[0] + x) * eb;
        const unsigned at = m.swizzle == 128 ? swizzle128(l.dst + linear) - l.dst
                            : m.swizzle == 64 ? swizzle64(l.dst + linear) - l.dst : linear;
        const bool in = g0 >= 0 && g1 >= 0 && g2 >= 0 && (unsigned long long)g0 < m.dims[0] &&
                        (unsigned long long)g1 < m.dims[1] && (unsigned long long)g2 < m.dims[2];
        if (in)
          std::memcpy(dst + at, src + g2 * m.strides[1] + g1 * m.strides[0] + g0 * eb, eb);
        else
          std::memset(dst + at, 0, eb);  // out of bounds: zero fill, as the tensor map asks
      }
}

inline void tma_load(unsigned dst, const void* tmap, int c0, int c1, int c2, unsigned bar) {
  ++__emu_progress();
  TmaLoad l;
  std::memcpy(&l.map, tmap, sizeof(TensorMap));
  if (l.map.tag != kTensorMapTag) __emu_fail("TMA load through bytes that are not an emulated tensor map");
  if (l.map.swizzle == 128 && dst % 1024) __emu_fail("TMA: a 128-byte swizzled box not 1024-byte aligned in shared memory");
  if (l.map.swizzle == 64 && dst % 512) __emu_fail("TMA: a 64-byte swizzled box not 512-byte aligned in shared memory");
  l.dst = dst;
  l.bar = bar;
  l.c[0] = c0;
  l.c[1] = c1;
  l.c[2] = c2;
  mbar_load(bar);  // initialised
  TmaQueue& q = tma_queue();
  if (q.count == 256) __emu_fail("more than 256 TMA loads in flight");
  if (EMU_TMA_EARLY) tma_write(l);
  q.loads[q.count++] = l;
}

// The kernel's poll loop (mbar_wait) around it: returns once the phase of
// parity `parity` completed; the loads the barrier counts land at the first poll.
inline unsigned mbar_try_wait(unsigned addr, unsigned parity) {
  mbar_load(addr);  // initialised
  auto done = [&] {
    TmaQueue& q = tma_queue();
    int kept = 0;
    for (int i = 0; i < q.count; ++i) {
      if (q.loads[i].bar == addr) tma_land(q.loads[i]);
      else q.loads[kept++] = q.loads[i];
    }
    q.count = kept;
    return mbar_load(addr).phase != (parity & 1);
  };
  warp_wait((unsigned long long)addr << 1 | (parity & 1), done,
            "deadlock: an mbarrier wait (try_wait.parity) that no thread can complete any more");
  return 1;
}

// cp.async.mbarrier.arrive.noinc: an arrive once the thread's cp.async copies landed.
inline void cp_async_mbar_arrive_noinc(unsigned bar) {
  mlx_flash::emu_cp_async_land_all();
  mbar_arrive(bar, 0);
}
// cp.async.ca of 4 bytes: lands at once (only the bwd's small rows use it).
inline void cp_async4(unsigned dst, const void* src) { std::memcpy(__emu_smem_pointer(dst, 4), src, 4); }

// ---------------------------------------------------------------------------
// Bulk groups (cp.reduce.async.bulk): run at the thread's bulk wait.

struct BulkOp {
  float* dst;
  unsigned src, bytes;
  int group;
};
struct BulkQueue {
  BulkOp ops[64];
  int count = 0, committed = 0;
};
inline BulkQueue& bulk_queue() {
  static thread_local BulkQueue queues[kMaxThreads];
  return queues[__emu_attrs()->thread_index_in_threadgroup];
}
inline void bulk_reduce_add_f32(float* dst, unsigned src, unsigned bytes) {
  ++__emu_progress();
  BulkQueue& q = bulk_queue();
  if (q.count == 64) __emu_fail("more than 64 bulk copies in flight in one thread");
  if (bytes % 16) __emu_fail("cp.reduce.async.bulk: size not a multiple of 16");
  q.ops[q.count++] = BulkOp{dst, src, bytes, q.committed};
}
inline void bulk_commit() { ++bulk_queue().committed; }
inline void bulk_wait(int n) {
  BulkQueue& q = bulk_queue();
  int kept = 0;
  for (int i = 0; i < q.count; ++i) {
    const BulkOp& op = q.ops[i];
    if (op.group >= q.committed - n) {
      q.ops[kept++] = op;
      continue;
    }
    const float* s = reinterpret_cast<const float*>(__emu_smem_pointer(op.src, op.bytes));
    for (unsigned e = 0; e < op.bytes / 4; ++e) op.dst[e] += s[e];
  }
  q.count = kept;
}

// ---------------------------------------------------------------------------
// wgmma.

struct Desc {
  unsigned start, lbo, sbo;
};
inline Desc desc(unsigned long long d) {
  if ((d >> 62) != 1) __emu_fail("wgmma descriptor: only the 128-byte swizzle is emulated");
  if (d & 0xC000ull) __emu_fail("wgmma descriptor: start address past 256 KiB (the field overflowed)");
  return Desc{unsigned(d & 0x3FFF) << 4, unsigned((d >> 16) & 0x3FFF) << 4, unsigned((d >> 32) & 0x3FFF) << 4};
}
// Byte address of element (row = M or N index, k) of a K-major operand, or
// (k, mn) of an MN-major one (atoms of 128 bytes along MN); BYTES per element.
template <int BYTES = 2>
inline unsigned k_major(const Desc& D, int row, int k) {
  return swizzle128(D.start + unsigned(row / 8) * D.sbo + unsigned(row % 8) * 128 + unsigned(k * BYTES));
}
template <int BYTES = 2>
inline unsigned mn_major(const Desc& D, int k, int mn) {
  constexpr int PER = 128 / BYTES;
  return swizzle128(D.start + unsigned(mn / PER) * D.lbo + unsigned(k / 8) * D.sbo + unsigned(k % 8) * 128 +
                    unsigned((mn % PER) * BYTES));
}
// Operand kinds (the GEMM's wgmma_gemm.cuh numbering): 1 e4m3, 2 e5m2 (one
// byte, k32), 16 half, 17 bfloat16 (two bytes, k16).
template <int KIND>
constexpr int kind_bytes() { return KIND == 1 || KIND == 2 ? 1 : 2; }
template <int KIND>
inline float value(unsigned short bits) {
  if constexpr (KIND == 1 || KIND == 2) {
    __half h;
    h.x = __emu_fp8_to_half_bits((unsigned char)bits, KIND == 1 ? __NV_E4M3 : __NV_E5M2);
    return __half2float(h);
  } else if constexpr (KIND == 16) {
    __half h;
    h.x = bits;
    return __half2float(h);
  } else {
    return __uint_as_float(unsigned(bits) << 16);
  }
}
template <int BYTES = 2>
inline unsigned short smem_element(unsigned addr) {
  unsigned short v = 0;
  if (addr + BYTES > __emu_dynamic_smem_bytes) __emu_fail("wgmma operand outside dynamic shared memory");
  std::memcpy(&v, __emu_dynamic_smem() + addr, BYTES);
  return v;
}
inline unsigned short smem16(unsigned addr) { return smem_element<2>(addr); }

// Hopper's fp8 accumulation, modelled on request (harness.FP8_ACCUM_BITS > 0;
// 0, the default, sums in fp32 like the 16-bit kinds): per output, the k32
// instruction's products (exact) and the running accumulator are aligned to
// the largest exponent among them, each cut toward zero to
// EMU_FP8_ACCUM_BITS fraction bits below it (the accumulator too unless
// EMU_FP8_ACCUM_CUT_ACC is 0), and summed exactly. tools/fp8_accum_model.py
// is the same model in numpy, fitted to the card's results; a term that is
// not finite leaves the plain fp32 sum.
#ifndef EMU_FP8_ACCUM_BITS
#define EMU_FP8_ACCUM_BITS 0
#endif
#ifndef EMU_FP8_ACCUM_CUT_ACC
#define EMU_FP8_ACCUM_CUT_ACC 1
#endif
inline float fp8_truncating_sum(float acc, const float* a, const float* b, int count) {
  double top = std::fabs(double(acc)), prods[32];
  bool finite = std::isfinite(acc);
  for (int k = 0; k < count; ++k) {
    prods[k] = double(a[k]) * double(b[k]);
    finite = finite && std::isfinite(prods[k]);
    top = std::fmax(top, std::fabs(prods[k]));
  }
  if (!finite) {
    for (int k = 0; k < count; ++k) acc += a[k] * b[k];
    return acc;
  }
  if (top == 0.0) return 0.f;
  int e2;
  std::frexp(top, &e2);  // top = f 2^e2, f in [0.5, 1): its exponent is e2 - 1
  const double ulp = std::ldexp(1.0, e2 - 1 - EMU_FP8_ACCUM_BITS);
  double sum = EMU_FP8_ACCUM_CUT_ACC ? std::trunc(double(acc) / ulp) * ulp : double(acc);
  for (int k = 0; k < count; ++k) sum += std::trunc(prods[k] / ulp) * ulp;
  return float(sum);
}

constexpr int kMaxOps = 48, kMaxN = 256;
struct Op {
  void (*exec)(Op&, bool check);
  float* d;
  const unsigned* a;       // RS: the thread's A registers (must not change in flight)
  unsigned a_own[4];       // ... as they were at issue
  unsigned quad[4][4];     // RS: A registers of the thread's quad (its rows' k values)
  unsigned long long da, db, hash;
  int acc, ta, tb, group;
  unsigned tid;            // the issuing thread (index in the block)
  bool saved;              // the first in-flight op on d: d's values kept in `keep`
  float keep[kMaxN / 2];
};
struct OpQueue {
  Op ops[kMaxOps];
  int count = 0, committed = 0;
};
inline OpQueue& op_queue(unsigned tid) {
  static thread_local OpQueue queues[kMaxThreads];
  return queues[tid];
}
inline OpQueue& op_queue() { return op_queue(__emu_attrs()->thread_index_in_threadgroup); }

// Reads (check: hashes) this thread's operands; computes d unless check.
// KA, KB: the operands' kinds (equal but for the GEMM's mixed fp8 pairs).
template <int KA, int KB, int N>
inline void wgmma_exec(Op& op, bool check) {
  static_assert(kind_bytes<KA>() == kind_bytes<KB>(), "wgmma: both operands are 8-bit or both 16-bit");
  constexpr int BYTES = kind_bytes<KA>(), K = 32 / BYTES;
  const int tid = int(op.tid) % 128;
  const int warp = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  unsigned long long h = 1469598103934665603ull;
  auto mix = [&](unsigned short v) { h = (h ^ v) * 1099511628211ull; };
  float A[2][K], B[N / 4][K];
  if (!op.a) {
    const Desc D = desc(op.da);
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < K; ++k) {
        const int row = 16 * warp + g + 8 * r;
        const unsigned short v = smem_element<BYTES>(op.ta ? mn_major<BYTES>(D, k, row) : k_major<BYTES>(D, row, k));
        mix(v);
        A[r][k] = value<KA>(v);
      }
  } else {  // the m16n8k16 A layout per warp: (row, k) in lane 4 (row % 8) + (k % 8) / 2
    if constexpr (BYTES == 2) {
      for (int r = 0; r < 2; ++r)
        for (int k = 0; k < K; ++k) {
          const unsigned reg = op.quad[(k % 8) / 2][r + (k >= 8 ? 2 : 0)];
          A[r][k] = value<KA>((unsigned short)(k % 2 ? reg >> 16 : reg & 0xFFFFu));
        }
    } else {
      __emu_fail("wgmma RS: only 16-bit A registers are emulated");
    }
  }
  const Desc D = desc(op.db);
  for (int c = 0; c < N / 4; ++c)
    for (int k = 0; k < K; ++k) {
      const int col = 8 * (c / 2) + 2 * t + (c % 2);
      const unsigned short v = smem_element<BYTES>(op.tb ? mn_major<BYTES>(D, k, col) : k_major<BYTES>(D, col, k));
      mix(v);
      B[c][k] = value<KB>(v);
    }
  if (check) {
    op.hash = h;
    return;
  }
  if (h != op.hash) __emu_fail("shared memory under a wgmma changed before its wgmma_wait");
  if (op.a && std::memcmp(op.a, op.a_own, sizeof(op.a_own)) != 0)
    __emu_fail("the A registers of a wgmma (RS) changed before its wgmma_wait");
  if (op.saved) std::memcpy(op.d, op.keep, sizeof(float) * (N / 2));
  for (int j = 0; j < N / 8; ++j)
    for (int c = 0; c < 4; ++c) {
      float sum = op.acc ? op.d[4 * j + c] : 0.f;
      const float* a = A[c / 2];
      const float* b = B[2 * j + (c % 2)];
      if constexpr (BYTES == 1 && EMU_FP8_ACCUM_BITS > 0) {
        sum = fp8_truncating_sum(sum, a, b, K);
      } else {
        for (int k = 0; k < K; ++k) sum += a[k] * b[k];
      }
      op.d[4 * j + c] = sum;
    }
}

template <int KA, int KB, int N>
inline void wgmma(float* d, const unsigned* a, unsigned long long da, unsigned long long db, int acc, int ta, int tb) {
  static_assert(N % 8 == 0 && N <= kMaxN, "wgmma: N");
  ++__emu_progress();
  // RS: the warp's A fragments, as the instruction reads them at issue. The
  // exchange yields to the other fibers, whose wgmma_wait may run and drop
  // this thread's earlier ops (compacting its queue): so it comes first,
  // before this op takes its slot in the queue.
  unsigned quad[4][4] = {};
  if (a) {
    struct Regs {
      unsigned r[4];
    } mine;
    std::memcpy(mine.r, a, sizeof(mine.r));
    EmuExchange e = __emu_simd_exchange(&mine, sizeof(mine), __LINE__);
    if (e.active_mask != 0xffffffffu) __emu_fail("wgmma with an incomplete warp");
    const unsigned g = e.lane / 4;
    for (unsigned l = 0; l < 4; ++l) {
      const Regs r = __emu_lane_value<Regs>(e, 4 * g + l);
      std::memcpy(quad[l], r.r, sizeof(r.r));
    }
  }
  OpQueue& q = op_queue();
  if (q.count == kMaxOps) __emu_fail("more than 48 wgmma in flight in one thread");
  Op& op = q.ops[q.count];
  op.exec = &wgmma_exec<KA, KB, N>;
  op.d = d;
  op.a = a;
  op.da = da;
  op.db = db;
  op.acc = acc;
  op.ta = ta;
  op.tb = tb;
  op.group = q.committed;
  op.tid = __emu_attrs()->thread_index_in_threadgroup;
  if (a) {
    std::memcpy(op.a_own, a, sizeof(op.a_own));
    std::memcpy(op.quad, quad, sizeof(quad));
  }
  op.saved = true;
  for (int i = 0; i < q.count; ++i)
    if (q.ops[i].d == d) op.saved = false;  // an earlier op in flight holds d's values
  if (op.saved) {
    std::memcpy(op.keep, d, sizeof(float) * (N / 2));
    for (int i = 0; i < N / 2; ++i) d[i] = std::nanf("");  // in flight: reading it is a race
  }
  wgmma_exec<KA, KB, N>(op, true);
  ++q.count;
}
inline void wgmma_commit() {
  ++__emu_progress();
  ++op_queue().committed;
}
// wgmma.wait_group n: the thread's groups but the last n complete. A group is
// the warpgroup's: its products run once all four warps issued and committed
// it, and are done for all 128 threads when any of them returns from a wait
// on it (one thread may then release the operands' buffers for everyone). So
// the wait holds until the whole warpgroup committed the group, then runs
// every thread's part of it, each reading its operands now.
inline void wgmma_wait(int n) {
  const unsigned me = __emu_attrs()->thread_index_in_threadgroup, first = me / 128 * 128;
  const int target = op_queue(me).committed - n;
  // Every lane goes through the wait, even one whose part another warp's wait
  // already ran: wgmma.wait_group is .sync.aligned, so a warp's lanes leave it
  // together. (A lane that returned at once here while its warp-mates, polled
  // before the group ran, still waited, went on alone to the next wait: the
  // in-kernel fp8 decode's timing met it.)
  warp_wait((0x5767ull << 40) | unsigned(target), [&] {
    for (unsigned t = first; t < first + 128; ++t)
      if (op_queue(t).committed < target) return false;
    return true;
  }, "deadlock: a wgmma_wait on a group that the rest of its warpgroup never commits");
  for (unsigned t = first; t < first + 128; ++t) {
    OpQueue& q = op_queue(t);
    int kept = 0;
    for (int i = 0; i < q.count; ++i) {
      if (q.ops[i].group >= target) {
        if (kept != i) q.ops[kept] = q.ops[i];
        ++kept;
        continue;
      }
      q.ops[i].exec(q.ops[i], false);
    }
    q.count = kept;
  }
}

inline float ex2_ftz(float x) {
  const float y = std::exp2(x);
  return y < 1.17549435e-38f ? 0.f : y;  // results below 2^-126 flushed (NaN stays NaN)
}
inline float max_nan(float x, float lo) { return std::isnan(x) ? x : std::max(x, lo); }

}  // namespace emu_hopper

namespace mlx_flash {
inline void emu_hopper_thread_start() {
  emu_hopper::spin_done();
  emu_hopper::OpQueue& q = emu_hopper::op_queue();
  q.count = q.committed = 0;
  emu_hopper::BulkQueue& b = emu_hopper::bulk_queue();
  b.count = b.committed = 0;
}
}  // namespace mlx_flash
