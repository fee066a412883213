// CUDA emulation (tests/cuda_emu): cuda_src/mma.cuh with the same names and
// fragment layouts, in C++ instead of PTX.
//
// cp.async copies are deferred: a copy lands only when its thread waits for
// its commit group (cp_async_wait), so a kernel that reads a tile before
// waiting for it reads poison, not the data.
#pragma once

#include <vector>

namespace mlx_flash {

struct EmuCopy {
  void* dst;
  const void* src;
  bool valid;
  int group;
};
struct EmuCopyQueue {
  std::vector<EmuCopy> pending;
  int committed = 0;
};
inline EmuCopyQueue& emu_copy_queue() {
  static thread_local EmuCopyQueue queues[1024];
  return queues[__emu_attrs()->thread_index_in_threadgroup];
}
inline void emu_thread_start() {
  EmuCopyQueue& q = emu_copy_queue();
  q.pending.clear();
  q.committed = 0;
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  EmuCopyQueue& q = emu_copy_queue();
  q.pending.push_back(EmuCopy{dst, src, valid, q.committed});
}
inline void cp_async_commit() { ++emu_copy_queue().committed; }
template <int N>
inline void cp_async_wait() {
  EmuCopyQueue& q = emu_copy_queue();
  std::vector<EmuCopy> still;
  for (const EmuCopy& c : q.pending) {
    if (c.group < q.committed - N) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    } else {
      still.push_back(c);
    }
  }
  q.pending.swap(still);
}

// Every copy the thread issued, committed or not, lands now (cp.async.mbarrier.arrive:
// the arrive waits for all of the thread's earlier cp.async).
inline void emu_cp_async_land_all() {
  EmuCopyQueue& q = emu_copy_queue();
  for (const EmuCopy& c : q.pending) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
  q.pending.clear();
}

inline unsigned emu_bits16(const void* row, int col) {
  unsigned short v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
  return v;
}
inline const void* emu_row(const EmuExchange& e, unsigned lane) { return __emu_lane_value<const void*>(e, lane); }
inline void emu_full_warp(const EmuExchange& e, const char* what) {
  if (e.active_mask != 0xffffffffu) __emu_fail(what);
}

// ldmatrix: matrix m's row i (8 16-bit values) is at the address of lane 8m + i;
// lane L receives (row L/4, cols 2(L%4), 2(L%4)+1) of each matrix (transposed:
// rows 2(L%4), 2(L%4)+1 of col L/4).
template <int NMAT, bool TRANS>
inline void emu_ldmatrix(unsigned* r, const void* p) {
  EmuExchange e = __emu_simd_exchange(&p, sizeof(p), __LINE__);
  emu_full_warp(e, "ldmatrix with an incomplete warp");
  const unsigned L = e.lane;
  for (int m = 0; m < NMAT; ++m) {
    unsigned lo, hi;
    if (TRANS) {
      lo = emu_bits16(emu_row(e, 8 * m + 2 * (L % 4)), L / 4);
      hi = emu_bits16(emu_row(e, 8 * m + 2 * (L % 4) + 1), L / 4);
    } else {
      lo = emu_bits16(emu_row(e, 8 * m + L / 4), 2 * (L % 4));
      hi = emu_bits16(emu_row(e, 8 * m + L / 4), 2 * (L % 4) + 1);
    }
    r[m] = lo | (hi << 16);
  }
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix<4, false>(r, p); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix<4, true>(r, p); }
inline void ldmatrix_x2(unsigned (&r)[2], const void* p) { emu_ldmatrix<2, false>(r, p); }

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool is_bf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool is_bf16 = true; };

template <typename T>
inline float emu_elem(unsigned reg, int which) {
  const unsigned short bits = (unsigned short)(which ? reg >> 16 : reg & 0xffffu);
  T h;
  std::memcpy(&h, &bits, 2);
  if constexpr (MmaType<T>::is_bf16) return __bfloat162float(h);
  else return __half2float(h);
}

// c += a * b for one 16x8x16 tile, fragments as documented in mma.cuh.
template <typename T>
inline void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  struct Frag {
    unsigned a[4], b[2];
  } mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
  EmuExchange e = __emu_simd_exchange(&mine, sizeof(mine), __LINE__);
  emu_full_warp(e, "mma.sync with an incomplete warp");
  auto frag = [&](unsigned lane) { return __emu_lane_value<Frag>(e, lane); };
  auto A = [&](int row, int k) {
    const Frag f = frag((row % 8) * 4 + (k % 8) / 2);
    return emu_elem<T>(f.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  auto B = [&](int k, int n) {
    const Frag f = frag(n * 4 + (k % 8) / 2);
    return emu_elem<T>(f.b[k >= 8 ? 1 : 0], k % 2);
  };
  const int g = e.lane / 4, t = e.lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    c[i] = acc;
  }
}

template <typename T> inline unsigned pack2(float lo, float hi);
template <> inline unsigned pack2<__half>(float lo, float hi) {
  return unsigned(__float2half_rn(lo).x) | (unsigned(__float2half_rn(hi).x) << 16);
}
template <> inline unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  return unsigned(__float2bfloat16_rn(lo).x) | (unsigned(__float2bfloat16_rn(hi).x) << 16);
}

}  // namespace mlx_flash
