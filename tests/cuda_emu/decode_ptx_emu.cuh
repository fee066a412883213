// CUDA emulation (tests/cuda_emu): cuda_src/decode_ptx.cuh in C++.
//
// A barrier is {phase, expected bytes}; bulk copies are deferred and land
// when a thread waits on their barrier's current phase, which then checks
// that the bytes expected are the bytes copied and completes the phase. A
// kernel that reads a buffer before waiting reads poison.
#pragma once

#include <vector>

namespace mlx_flash {

struct EmuBulkBar {
  unsigned phase;
  int expected;
};
struct EmuBulkCopy {
  void* dst;
  const void* src;
  unsigned bytes;
  void* bar;
};
inline std::vector<EmuBulkCopy>& emu_bulk_pending() {
  static thread_local std::vector<EmuBulkCopy> pending;  // threadgroups run one at a time per OS thread
  return pending;
}

inline void bulk_bar_init(void* bar, unsigned) { *static_cast<EmuBulkBar*>(bar) = EmuBulkBar{0u, 0}; }
inline void bulk_bar_init_fence() {}
inline void bulk_bar_expect(void* bar, unsigned bytes) { static_cast<EmuBulkBar*>(bar)->expected += int(bytes); }
inline void bulk_copy(void* dst, const void* src, unsigned bytes, void* bar) {
  if (bytes % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    __emu_fail("bulk_copy: size and addresses must be multiples of 16 bytes");
  emu_bulk_pending().push_back(EmuBulkCopy{dst, src, bytes, bar});
}
inline void bulk_bar_wait(void* bar, unsigned parity) {
  EmuBulkBar& b = *static_cast<EmuBulkBar*>(bar);
  if ((b.phase & 1u) != parity) return;  // that phase already completed
  std::vector<EmuBulkCopy>& pending = emu_bulk_pending();
  std::vector<EmuBulkCopy> still;
  for (const EmuBulkCopy& c : pending) {
    if (c.bar == bar) {
      std::memcpy(c.dst, c.src, c.bytes);
      b.expected -= int(c.bytes);
    } else {
      still.push_back(c);
    }
  }
  pending.swap(still);
  if (b.expected != 0) __emu_fail("bulk_bar_wait: the bytes copied are not the bytes expected");
  ++b.phase;
}

// movmatrix.m8n8.trans.b16: lane 4g + t gets M[2t][g], M[2t + 1][g], where
// lane 4r + c holds M[r][2c], M[r][2c + 1].
inline unsigned movmatrix_trans(unsigned a) {
  EmuExchange e = __emu_simd_exchange(&a, sizeof(a), __LINE__);
  if (e.active_mask != 0xffffffffu) __emu_fail("movmatrix with an incomplete warp");
  const unsigned g = e.lane / 4, t = e.lane % 4;
  auto elem = [&](unsigned r, unsigned c) {  // M[r][c]
    const unsigned w = __emu_lane_value<unsigned>(e, 4 * r + c / 2);
    return (c % 2) ? w >> 16 : w & 0xffffu;
  };
  return elem(2 * t, g) | (elem(2 * t + 1, g) << 16);
}

}  // namespace mlx_flash
