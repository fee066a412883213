// Thread-block-cluster helpers (sm_90a) of the warp-specialised matmul
// (matmul_wgmma_ws.cuh with CLUSTER = 2): the two blocks of a cluster compute
// vertically adjacent output tiles that share their b tile, so each block
// loads half of b by TMA multicast into both blocks' shared memory (b crosses
// L2 once per cluster instead of once per block).
#pragma once

#include "tma.cuh"

namespace mlx_flash {

__device__ __forceinline__ unsigned cluster_ctarank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_nctarank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_id_x() {
  unsigned r;
  asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_count_x() {
  unsigned r;
  asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
  return r;
}

// Every thread of every block of the cluster (barrier initialisation made
// visible before any block signals another's barriers).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// One arrival on the mbarrier at the same shared-memory offset as `bar` in
// block `rank` of the cluster (the block itself included). Release at CTA
// scope (the default), as for a local arrival: it only has to order this
// thread's earlier wgmma reads of the stage (complete after wgmma_wait)
// before the refill. The first version released at cluster scope and ran
// 25-30 % slower than the kernel without clusters on the H200 (about 1000
// cycles more per stage); with this one the cluster kernel is as fast or a
// little faster (docs/matmul.md).
__device__ __forceinline__ void mbar_arrive_cluster(void* bar, unsigned rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(rank)
      : "memory");
}

// tma_load_2d into the same shared-memory offset of every block in `mask`,
// each block's mbarrier at `bar`'s offset counting the bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const void* tmap, int inner, int outer, void* bar,
                                                      unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(inner), "r"(outer), "r"(smem_addr(bar)), "h"(mask)
      : "memory");
}

}  // namespace mlx_flash
