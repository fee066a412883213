// CUDA emulation (tests/cuda_emu): what the Hopper GEMM (matmul_wgmma.cuh)
// takes from wgmma.cuh, wgmma_gemm.cuh and tma.cuh, in C++ instead of PTX.
//
// Shared-memory addresses are byte offsets into the block's dynamic shared
// memory, so descriptors and the 128-byte swizzle work on them as the
// hardware does on its shared window. A wgmma reads its operands through its
// descriptors (start, LBO, SBO, 128-byte swizzle: 16-byte chunk bits 4-6 of
// an address XORed with its 128-byte row bits 7-9) and is executed late: when
// its thread waits for its commit group (wgmma_wait), as the tensor cores may
// read shared memory until then; the bytes it reads must be the same at issue
// and then (else the launch fails: the kernel overwrote an operand in flight). Products are summed in
// fp32 exactly as given by default (the emulation checks where data goes, not
// the tensor cores' rounding); harness.FP8_ACCUM_BITS switches fp8 wgmma to a
// model of Hopper's truncating accumulation (below).
// TMA is not emulated (its tensor maps come from libcuda, absent here; the
// wrapper then plans cp.async loads); calling it fails the launch.
#pragma once

namespace mlx_flash {

inline unsigned smem_addr(const void* p) {
  const unsigned char* base = __emu_dynamic_smem();
  const long off = static_cast<const unsigned char*>(p) - base;
  if (off < 0 || off >= long(__emu_dynamic_smem_bytes)) __emu_fail("smem_addr of memory outside dynamic shared memory");
  return unsigned(off);
}

template <int ROWS>
inline int swizzled_offset(int row, int chunk) {
  return (chunk / 8) * (ROWS * 128) + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
}

inline unsigned long long wgmma_desc(unsigned smem_byte_addr, unsigned lbo_bytes, unsigned sbo_bytes) {
  unsigned long long d = 0;
  d |= (unsigned long long)((smem_byte_addr & 0x3FFFF) >> 4);
  d |= (unsigned long long)((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= (unsigned long long)((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= 1ull << 62;
  return d;
}

inline void fence_proxy_async() {}
inline float exp2_ftz(float x) { return std::exp2(x); }
template <int R>
inline void wgmma_pin(float (&)[R]) {}

// One operand element through a descriptor: K-major (row = M/N index, k) or
// MN-major (k, mn), `bytes` per element.
struct EmuDesc {
  unsigned start, lbo, sbo;
  explicit EmuDesc(unsigned long long d)
      : start(unsigned(d & 0x3FFF) << 4), lbo(unsigned((d >> 16) & 0x3FFF) << 4), sbo(unsigned((d >> 32) & 0x3FFF) << 4) {
    if ((d >> 62) != 1) __emu_fail("wgmma descriptor: only the 128-byte swizzle is emulated");
  }
  static unsigned swizzle(unsigned linear) { return linear ^ (((linear >> 7) & 7u) << 4); }
  unsigned k_major(int row, int k, int bytes) const {
    return swizzle(start + unsigned(row / 8) * sbo + unsigned(row % 8) * 128 + unsigned(k * bytes));
  }
  unsigned mn_major(int k, int mn, int bytes) const {  // 64-element atoms of 128 bytes along MN
    const int per_row = 128 / bytes;
    return swizzle(start + unsigned(mn / per_row) * lbo + unsigned(k / 8) * sbo + unsigned(k % 8) * 128 +
                   unsigned((mn % per_row) * bytes));
  }
};

// Operand kinds of wgmma_gemm.cuh: 1 e4m3, 2 e5m2, 16 half, 17 bfloat16.
template <int KIND>
inline float emu_operand(unsigned addr) {
  constexpr unsigned BYTES = (KIND == 1 || KIND == 2) ? 1 : 2;
  if (addr + BYTES > __emu_dynamic_smem_bytes) __emu_fail("wgmma operand outside dynamic shared memory");
  const unsigned char* p = __emu_dynamic_smem() + addr;
  if constexpr (KIND == 1 || KIND == 2) {
    __half h;
    h.x = __emu_fp8_to_half_bits(*p, KIND == 1 ? __NV_E4M3 : __NV_E5M2);
    return __half2float(h);
  } else {
    unsigned short bits;
    std::memcpy(&bits, p, 2);
    if constexpr (KIND == 16) {
      __half h;
      h.x = bits;
      return __half2float(h);
    } else {
      return __uint_as_float(unsigned(bits) << 16);
    }
  }
}

// The operands this thread's fragment reads, visited in order: f(A element
// address, B element address) per (output, k); bytes per element.
template <int KA, int BN, int B_MN, typename F>
inline void emu_wgmma_visit(unsigned long long da, unsigned long long db, F&& f) {
  constexpr int KSTEP = (KA == 1 || KA == 2) ? 32 : 16, BYTES = KSTEP == 32 ? 1 : 2;
  const EmuDesc A(da), B(db);
  const int tid = int(__emu_attrs()->thread_index_in_threadgroup) % 128;
  const int warp = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  for (int j = 0; j < BN / 8; ++j)
    for (int c = 0; c < 4; ++c) {
      const int row = 16 * warp + g + 8 * (c / 2), col = 8 * j + 2 * t + (c % 2);
      for (int k = 0; k < KSTEP; ++k)
        f(4 * j + c, A.k_major(row, k, BYTES), B_MN ? B.mn_major(k, col, BYTES) : B.k_major(col, k, BYTES));
    }
}

// Hash of the operand bytes a wgmma reads (at issue and again when it runs).
template <int KA, int KB, int BN, int B_MN>
inline unsigned long long emu_wgmma_operand_hash(unsigned long long da, unsigned long long db) {
  constexpr unsigned BYTES = (KA == 1 || KA == 2) ? 1 : 2;  // both operands' element size
  unsigned long long h = 1469598103934665603ull;
  const unsigned char* smem = __emu_dynamic_smem();
  const unsigned limit = unsigned(__emu_dynamic_smem_bytes) - BYTES;
  emu_wgmma_visit<KA, BN, B_MN>(da, db, [&](int, unsigned a, unsigned b) {
    if (a > limit || b > limit) __emu_fail("wgmma operand outside dynamic shared memory");
    unsigned va = 0, vb = 0;
    std::memcpy(&va, smem + a, BYTES);
    std::memcpy(&vb, smem + b, BYTES);
    h = (h ^ (va | (vb << 16))) * 1099511628211ull;
  });
  return h;
}

// A model of Hopper's fp8 accumulation (harness.FP8_ACCUM_BITS > 0; 0, the
// default, sums in fp32): per output, the k32 instruction's 32 products
// (exact) and the running accumulator are aligned to the largest exponent
// among them, each cut toward zero to EMU_FP8_ACCUM_BITS fraction bits below
// it (the accumulator too unless EMU_FP8_ACCUM_CUT_ACC is 0), and summed
// exactly. tools/fp8_accum_model.py is the same model in numpy, fitted to the
// card's results; a term that is not finite leaves the plain fp32 sum.
#ifndef EMU_FP8_ACCUM_BITS
#define EMU_FP8_ACCUM_BITS 0
#endif
#ifndef EMU_FP8_ACCUM_CUT_ACC
#define EMU_FP8_ACCUM_CUT_ACC 1
#endif
inline float emu_fp8_truncating_sum(float acc, const double* prods, int count) {
  double top = std::fabs(double(acc));
  float plain = acc;
  for (int k = 0; k < count; ++k) {
    if (!std::isfinite(prods[k])) {
      for (int j = 0; j < count; ++j) plain += float(prods[j]);
      return plain;
    }
    top = std::fmax(top, std::fabs(prods[k]));
  }
  if (!std::isfinite(double(acc))) {
    for (int j = 0; j < count; ++j) plain += float(prods[j]);
    return plain;
  }
  if (top == 0.0) return 0.f;
  int e2;
  std::frexp(top, &e2);  // top = f 2^e2, f in [0.5, 1): its exponent is e2 - 1
  const double ulp = std::ldexp(1.0, e2 - 1 - EMU_FP8_ACCUM_BITS);
  double sum = EMU_FP8_ACCUM_CUT_ACC ? std::trunc(double(acc) / ulp) * ulp : double(acc);
  for (int k = 0; k < count; ++k) sum += std::trunc(prods[k] / ulp) * ulp;
  return float(sum);
}

// d (+)= A (64 x K, K-major) * B (K x BN; B_MN: MN-major, else K-major [BN][K])
// for this thread's accumulator fragment (layout of wgmma.cuh), summed in fp32
// (fp8 operands under EMU_FP8_ACCUM_BITS: the model above).
template <int KA, int KB, int BN, int B_MN>
inline void emu_wgmma_exec(float* d, unsigned long long da, unsigned long long db, int accumulate) {
  if constexpr ((KA == 1 || KA == 2) && EMU_FP8_ACCUM_BITS > 0) {
    static thread_local double prods[BN / 2][32];
    int count[BN / 2] = {};
    emu_wgmma_visit<KA, BN, B_MN>(da, db, [&](int i, unsigned a, unsigned b) {
      prods[i][count[i]++] = double(emu_operand<KA>(a)) * double(emu_operand<KB>(b));
    });
    for (int i = 0; i < BN / 2; ++i) d[i] = emu_fp8_truncating_sum(accumulate ? d[i] : 0.f, prods[i], count[i]);
    return;
  }
  float sum[BN / 2];
  for (int i = 0; i < BN / 2; ++i) sum[i] = accumulate ? d[i] : 0.f;
  emu_wgmma_visit<KA, BN, B_MN>(da, db, [&](int i, unsigned a, unsigned b) {
    sum[i] += emu_operand<KA>(a) * emu_operand<KB>(b);
  });
  for (int i = 0; i < BN / 2; ++i) d[i] = sum[i];
}

struct EmuWgmma {
  void (*exec)(float*, unsigned long long, unsigned long long, int);
  unsigned long long (*hash)(unsigned long long, unsigned long long);
  float* d;
  unsigned long long da, db, issued_hash;
  int accumulate, group;
};
// Each thread's queue of issued wgmma (emptied when the thread starts: the
// harness calls emu_wgmma_thread_start, so nothing outlives a failed launch).
struct EmuWgmmaQueue {
  int count = 0, committed = 0;
  EmuWgmma ops[32];
};
inline EmuWgmmaQueue& emu_wgmma_queue() {
  static thread_local EmuWgmmaQueue queues[1024];
  return queues[__emu_attrs()->thread_index_in_threadgroup];
}
inline void emu_wgmma_thread_start() {
  EmuWgmmaQueue& q = emu_wgmma_queue();
  q.count = q.committed = 0;
}
inline void wgmma_fence() {}
inline void wgmma_commit() { ++emu_wgmma_queue().committed; }
template <int N>
inline void wgmma_wait() {
  EmuWgmmaQueue& q = emu_wgmma_queue();
  int kept = 0;
  for (int i = 0; i < q.count; ++i) {
    const EmuWgmma w = q.ops[i];
    if (w.group >= q.committed - N) {
      q.ops[kept++] = w;
      continue;
    }
    // The tensor cores may read their operands any time until this wait.
    if (w.hash(w.da, w.db) != w.issued_hash) __emu_fail("shared memory under a wgmma changed before its wgmma_wait");
    w.exec(w.d, w.da, w.db, w.accumulate);
  }
  q.count = kept;
}

template <int KA, int KB, int BN>
struct WgmmaSS {
  template <int B_MN>
  static void run(float (&d)[BN / 2], unsigned long long da, unsigned long long db, int accumulate) {
    EmuWgmmaQueue& q = emu_wgmma_queue();
    if (q.count == 32) __emu_fail("more than 32 wgmma in flight in one thread");
    q.ops[q.count++] = EmuWgmma{&emu_wgmma_exec<KA, KB, BN, B_MN>, &emu_wgmma_operand_hash<KA, KB, BN, B_MN>, d, da,
                                db, emu_wgmma_operand_hash<KA, KB, BN, B_MN>(da, db), accumulate, q.committed};
  }
};

// TMA: not emulated.
template <int COUNT>
inline void tma_publish(unsigned char*, const unsigned char*, unsigned char*, const void* const (&)[COUNT], int) {
  __emu_fail("TMA is not emulated");
}
inline void tma_acquire(const void*) { __emu_fail("TMA is not emulated"); }
inline void mbar_init(void*, unsigned) { __emu_fail("TMA is not emulated"); }
inline void mbar_expect_tx(void*, unsigned) { __emu_fail("TMA is not emulated"); }
inline void mbar_wait(void*, unsigned) { __emu_fail("TMA is not emulated"); }
inline void tma_load_2d(void*, const void*, int, int, void*) { __emu_fail("TMA is not emulated"); }

}  // namespace mlx_flash
