// Hopper (sm_90a) FlashAttention forward with warp specialisation, fp16/bf16,
// head dims 64 and 128 (Dqk = Dv) and the wide heads 96, 192, 256 and
// Dqk 192 / Dv 128 (DeepSeek-style), no mask arrays, no softcap/ALiBi/sinks,
// dense batches (no varlen, no key ranges); causal and sliding windows come
// through the logit rules. Every other call runs attention_fwd_wgmma.
//
// A block of 384 threads owns BM = 128 query rows of one (batch, head)
// (WARPGROUPS = 3, D = 64 only: 512 threads, 192 rows, three consumer
// warpgroups taking turns in a cycle, warps 12-15 the producer):
//   * warps 0-7: two consumer warpgroups, 64 rows each (S = Q K^T as a shared x
//     shared wgmma, online softmax on the fp32 accumulator, O += P V with P
//     from registers, as in attention_fwd_wgmma.cuh);
//   * warps 8-11: the producer warpgroup; one lane issues TMA loads (tma.cuh) of
//     Q once and of the K and V tiles into rings of STAGES buffers each.
// setmaxnreg moves registers from the producer (24 per thread) to the
// consumers (240), which hold S, P and O of 64 rows.
// Each buffer has a "full" mbarrier (the TMA's bytes landed) and an "empty"
// one (both consumer warpgroups finished their wgmma reading it: one arrive
// per warpgroup). No block barrier runs after the setup.
//
// Inside a consumer warpgroup the softmax of tile t overlaps the P V product of
// tile t-1: S(t) and O += P(t-1) V(t-1) are issued back to back, the wait
// for S(t) lets P V run on (wgmma.wait_group 1), the softmax computes the new
// row maxima and P(t) in place in S's registers, and only after P V finished
// is O rescaled and P(t) packed into the A fragments P V reads. (RESCALE = 1,
// the default at D = 64: O's rescale waits for the next turn, between
// S(t+1)'s issue and P V(t)'s, as FlashAttention-3 orders it.)
// Key tiles are visited from the last to the first, so under causal or
// window rules the tiles crossing the diagonal (the ones that need the rules)
// come first. Logits stay raw until the softmax: one FFMA per element forms
// scale * log2(e) * s - max (the host routes only scale > 0 here).
//
// Wide heads: every [rows][dim] tile in shared memory is ceil(dim / 64)
// swizzled 64-column blocks (the layout wgmma.cuh describes), each loaded by
// its own TMA box; at D = 96 the second block's last 32 columns are the TMA's
// zero fill and no product reads them. The O accumulator (Dv / 2 fp32 per
// thread) grows with the head, so the key tile shrinks to keep S (BN / 2) and
// P (BN / 4) beside it within the consumers' 240 registers: 80 keys at
// D = 256 (64 under causal / window rules, whose drop bits need registers
// too), 96 at D = 192, 128 at Dv 128 or 96. wgmma_wide.cuh holds the
// m64nN shapes this takes.
//
// Registers: the launch bound (384 threads, one block per SM) gives 168 per
// thread before setmaxnreg; a __launch_bounds__ declaration of each instance MLX builds
// (the kernel name is MLX's "custom_kernel_" + name + template values) sits
// at the end of this header, since the body cannot carry attributes.
#pragma once

#include "attention_fwd_wgmma.cuh"
#include "tma.cuh"
#include "wgmma_wide.cuh"

namespace mlx_flash {

// S = Q K^T over 176-key tiles (the dense D = 128 tile): m64n176k16 wrappers
// in wgmma.cuh's form (written out by a script: inline PTX names every register).
template <> struct Wgmma<__half, 176> {
  // d (+)= A(smem; TRANS_A: MN-major) * B(smem; TRANS_B: MN-major)
  template <int TRANS_A, int TRANS_B>
  static __device__ __forceinline__ void ss(float (&d)[88], unsigned long long da, unsigned long long db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, %91, %92;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));
  }
};

template <> struct Wgmma<__nv_bfloat16, 176> {
  // d (+)= A(smem; TRANS_A: MN-major) * B(smem; TRANS_B: MN-major)
  template <int TRANS_A, int TRANS_B>
  static __device__ __forceinline__ void ss(float (&d)[88], unsigned long long da, unsigned long long db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, %91, %92;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));
  }
};

// Whether a kernel's q pointer type is bfloat16 (the BF16 template value,
// which only tells MLX's kernel names apart, must agree with it).
template <class P> struct WsIsBf16 { static constexpr bool value = false; };
template <> struct WsIsBf16<const __nv_bfloat16*> { static constexpr bool value = true; };
// Q, K, V tensor maps per block; the `tmpl` input holds their three
// templates, then three int32: the work order's heads per section, the trace
// switch and the dynamic schedule's switch. A block's workspace slot: its
// maps, then its trace (ws_trace).
constexpr int kWsTmapBytes = 3 * 128;
constexpr int kWsSlotBytes = kWsTmapBytes + 128;

// Timeline of a block for profiling, where the host switched it on (tmpl's
// second int): u64 `slot` of the block's trace gets `value`. The switch is
// read from memory at each call, so no register stays live for it.
__device__ __forceinline__ void ws_trace(const unsigned char* tmpl, unsigned char* tmaps, int slot,
                                         unsigned long long value) {
  if (reinterpret_cast<const int*>(tmpl + kWsTmapBytes)[1] != 0)
    reinterpret_cast<unsigned long long*>(tmaps + (long)blockIdx.x * kWsSlotBytes + kWsTmapBytes)[slot] = value;
}
__device__ __forceinline__ unsigned long long ws_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned ws_smid() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
// Trace slots: what happened when (clock64 of the block's first consumer
// thread, globaltimer where named; the others of the first item only).
enum WsTrace {
  kTrSm, kTrEntryNs, kTrEntry, kTrSetup, kTrQ, kTrLoopEnd, kTrEpilogueEnd, kTrEpilogueEndNs, kTrExit, kTrExitNs,
  kTrItems
};

// Columns of a head dim in shared memory: whole 64-column swizzle blocks.
__host__ __device__ constexpr int ws_cols(int d) { return (d + 63) / 64 * 64; }
// Dynamic shared memory of the forward (bytes): Q [128][D], STAGES K tiles
// [BN][D] and V tiles [BN][DV] (columns rounded up to 64), plus 1 KiB to
// align the swizzled tiles to 1024 bytes.
__host__ __device__ constexpr int ws_fwd_smem(int d, int dv, int bn, int stages, int bm = 128) {
  return 2 * (bm * ws_cols(d) + stages * bn * (ws_cols(d) + ws_cols(dv))) + 1024;
}

// Box (inner, row, slab) of a 3-D tensor map into shared memory; completes on `bar`.
__device__ __forceinline__ void ws_tma_load_3d(void* dst, const void* tmap, int inner, int row, int slab, void* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(inner), "r"(row), "r"(slab), "r"(smem_addr(bar))
      : "memory");
}

// One arrive (count 1) on an mbarrier of this block.
__device__ __forceinline__ void ws_mbar_arrive(void* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// The turn barrier of consumer warpgroup w (three warpgroups: 4, 5, 7; 6 is
// warpgroup 2's ws_warpgroup_or, 2 and 3 the others').
__device__ __forceinline__ unsigned ws_turn_bar(int w) { return w < 2 ? 4 + w : 7; }

// Named barrier `id` over one warpgroup (128 threads), returning whether any
// of them passed `p` true.
__device__ __forceinline__ bool ws_warpgroup_or(int id, bool p) {
  unsigned r;
  asm volatile(
      "{\n .reg .pred p;\n .reg .pred q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, 128, p;\n"
      " selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r) : "r"((unsigned)p), "r"(id) : "memory");
  return r != 0;
}

// Some 16-byte chunk of a swizzled [ROWS][DIM] tile holds a NaN or inf; the
// 128 threads of a warpgroup (index `wt`) share the chunks.
template <typename T, int ROWS, int DIM>
__device__ __forceinline__ bool ws_chunks_nonfinite(const unsigned char* tile, int wt) {
  constexpr int CHUNKS = DIM / 8;
  bool bad = false;
#pragma unroll 1
  for (int c = wt; c < ROWS * CHUNKS; c += 128)
    bad = bad || chunk_nonfinite<T>(tile + swizzled_offset<ROWS>(c / CHUNKS, c % CHUNKS));
  return bad;
}

// A wgmma shared-memory descriptor (wgmma_desc: 128-byte swizzle, the given
// strides) of `base_addr`, `offset` bytes on: consecutive k-steps differ only
// in the low word's address field, and shared addresses stay below 256 KB, so
// each k-step adds a constant to one word formed once per tile (wgmma_desc per
// k-step cost ~7 dependent integer instructions per operand).
struct WsDesc {
  unsigned lo, hi;
  __device__ __forceinline__ WsDesc(unsigned base_addr, unsigned lbo_bytes, unsigned sbo_bytes) {
    const unsigned long long d = wgmma_desc(base_addr, lbo_bytes, sbo_bytes);
    lo = (unsigned)d;
    hi = (unsigned)(d >> 32);
  }
  __device__ __forceinline__ unsigned long long at(unsigned offset) const {
    return ((unsigned long long)hi << 32) | (lo + (offset >> 4));
  }
};

// S = Q K^T issued (not waited) over D / 16 k-steps (wg_issue_s's operands
// and order; descriptors from WsDesc).
template <typename T, int D, int BN, int BM = 128>
__device__ __forceinline__ void ws_issue_s(float (&s)[BN / 2], unsigned q_addr, unsigned k_addr) {
  const WsDesc qd(q_addr, 16, 1024), kd(k_addr, 16, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    Wgmma<T, BN>::template ss<0, 0>(s, qd.at((kk / 4) * (BM * 128) + (kk % 4) * 32),
                                    kd.at((kk / 4) * (BN * 128) + (kk % 4) * 32), kk > 0);
  wgmma_commit();
}

// O += P V issued (not waited) over BN / 16 k-steps (wg_issue_pv's, descriptors
// from WsDesc); DV: V's columns, the wgmma's N (96 reads one and a half blocks).
template <typename T, int DV, int BN>
__device__ __forceinline__ void ws_issue_pv(float (&o)[DV / 2], unsigned (&pa)[BN / 16][4], unsigned v_addr) {
  wgmma_pin(o);
  wgmma_pin(pa);
  const WsDesc vd(v_addr, BN * 128, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, DV>::template rs<1>(o, pa[kk], vd.at(kk * 16 * 128), 1);
  wgmma_commit();
}

// 2^x on the FMA pipe (FlashAttention-4's idea): at D = 64 a consumer runs
// as many exponentials (MUFU, 16 per SM per clock) as its products take
// tensor-core time, so moving part of them to the FMA pipes (128 lanes per
// clock) shortens the softmax. x = j + f with j = round(x) by the 1.5 * 2^23
// trick (t's low mantissa bits hold j), 2^f by a degree-4 fit on
// [-0.5, 0.5] (relative error 5.4e-6, float32 Horner; ex2.approx's is ~2e-7;
// both far below a 16-bit P's rounding), times 2^j built in the exponent
// field. max.NaN clamps x at -127 (-inf, and anything ex2.approx.ftz flushes,
// give 2^j's field 0: exactly 0) and keeps a NaN, which the product keeps.
// Only x <= ~0 reaches it (logits minus their row maximum).
__device__ __forceinline__ float ws_exp2_poly(float x) {
  float xc;
  asm("max.NaN.f32 %0, %1, 0fC2FE0000;\n" : "=f"(xc) : "f"(x));  // max(x, -127), NaN kept
  const float t = xc + 12582912.f;  // 1.5 * 2^23: round to nearest, j in the low bits
  const float j = t - 12582912.f;
  const float f = xc - j;
  float p = fmaf(0.00955411046743393f, f, 0.05587037652730942f);
  p = fmaf(p, f, 0.2402469664812088f);
  p = fmaf(p, f, 0.6931280493736267f);
  p = fmaf(p, f, 0.999999463558197f);
  // bits(t) = 0x4B400000 + j: (bits(t) - 0x4B400000 + 127) << 23 is 2^j (0 at j = -127).
  const float two_j = __uint_as_float((__float_as_uint(t) << 23) + ((0u - 0x4B400000u + 127u) << 23));
  return p * two_j;
}

// Whether n8 block n of a tile's S takes ws_exp2_poly instead of ex2
// (EXP2POLY of every 4 blocks; 0: none, the default instances).
template <int POLY>
__device__ __forceinline__ float ws_exp2(float x, int n) {
  if constexpr (POLY > 0) {
    if (n % 4 < POLY) return ws_exp2_poly(x);
  }
  return exp2_ftz(x);
}

// Online softmax of one S tile without touching O (its P V product of the
// previous tile may still run): logit rules where the tile needs them
// (kRules), new row maxima and sums, alpha (O's rescale factor, applied by
// the caller later) and P in place of S (fp32). `drop` gets bit 4n + c (of
// its 32-bit words) for each dropped pair (kRules), for the exact P V's marks.
template <int BN> using WsDrop = unsigned[(BN / 2 + 31) / 32];

template <typename MT, class F, int BN, bool kRules, int POLY = 0, int CH = 1>
__device__ __forceinline__ void ws_softmax(float (&s)[BN / 2], float (&row_max)[2], float (&row_sum)[2],
                                           float (&alpha)[2], WsDrop<BN>& drop, const LogitRules<MT>& rules,
                                           float scale, int i_row, int jt, int t) {
  // Without rules S stays raw: f = scale * log2(e) > 0 folds into the
  // exponent's FFMA and into the row maximum. With rules S becomes logits in
  // the log2 domain first (f = 1).
  const float f = kRules ? 1.f : scale * kLog2e;
  if (kRules) {
#pragma unroll
    for (int w = 0; w < (BN / 2 + 31) / 32; ++w) drop[w] = 0;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = i_row + (c >= 2 ? 8 : 0);
        const int j = jt + n * 8 + 2 * t + (c & 1);
        float capped = 0.f;
        const float x = apply_rules<F, MT, true>(rules, s[4 * n + c] * scale, i, j, capped, false);
        drop[(4 * n + c) / 32] |= (x == kNegInf ? 1u : 0u) << ((4 * n + c) % 32);
        s[4 * n + c] = x * kLog2e;
      }
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    // 128-key tiles (and 192, which only D = 64 takes): four running maxima,
    // a dependency chain a quarter as long (the same value: fmaxf ignores NaN
    // in any order); 176-key tiles have no registers to spare for them.
    float mx;
    if constexpr (BN <= 128 || BN == 192) {
      float m4[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        m4[2 * (n & 1)] = fmaxf(m4[2 * (n & 1)], s[4 * n + 2 * half]);
        m4[2 * (n & 1) + 1] = fmaxf(m4[2 * (n & 1) + 1], s[4 * n + 2 * half + 1]);
      }
      mx = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    } else if constexpr (BN <= 160 || CH == 2) {
      // 144 / 160-key tiles: two chains (the registers 176 keys leave none
      // for, unless CHAINS = 2 asks for them).
      float m2[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) m2[n & 1] = fmaxf(m2[n & 1], fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
      mx = fmaxf(m2[0], m2[1]);
    } else {
      mx = kNegInf;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float new_max = fmaxf(row_max[half], mx * f);
    const float base = new_max == kNegInf ? 0.f : new_max;
    alpha[half] = exp2_ftz(row_max[half] - base);
    // CH = 2: two partial sums, a dependency chain half as long.
    float sum[CH] = {};
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      s[4 * n + 2 * half] = ws_exp2<POLY>(fmaf(s[4 * n + 2 * half], f, -base), n);
      s[4 * n + 2 * half + 1] = ws_exp2<POLY>(fmaf(s[4 * n + 2 * half + 1], f, -base), n);
      sum[n % CH] += s[4 * n + 2 * half] + s[4 * n + 2 * half + 1];
    }
    row_sum[half] = row_sum[half] * alpha[half] + (CH == 2 ? sum[0] + sum[CH - 1] : sum[0]);
    row_max[half] = new_max;
  }
}

// O *= alpha (SKIP: skipped for a warp whose rows all kept their maxima).
template <int DV, bool SKIP = true>
__device__ __forceinline__ void ws_rescale(float (&o)[DV / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (!SKIP || !__all_sync(0xffffffffu, alpha[half] == 1.f)) {
#pragma unroll
      for (int n = 0; n < DV / 8; ++n) {
        o[4 * n + 2 * half] *= alpha[half];
        o[4 * n + 2 * half + 1] *= alpha[half];
      }
    }
  }
}

// P (fp32, in S's registers) packed into A fragments, dropped pairs marked -0.
template <typename T, int BN, bool kRules>
__device__ __forceinline__ void ws_pack(const float (&s)[BN / 2], unsigned (&pa)[BN / 16][4], const WsDrop<BN>& drop) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_a_fragment<T>(pa[kk], s, kk);
  if (kRules) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int w = 0; w < 4; ++w)
        pa[kk][w] |= pair_marks((drop[(8 * kk + 2 * w) / 32] >> ((8 * kk + 2 * w) % 32)) & 1u,
                                (drop[(8 * kk + 2 * w) / 32] >> ((8 * kk + 2 * w) % 32 + 1)) & 1u);
  }
}

// O *= alpha, then P packed (the default order: both after the softmax).
template <typename T, int DV, int BN, bool kRules>
__device__ __forceinline__ void ws_rescale_pack(float (&o)[DV / 2], const float (&s)[BN / 2],
                                                unsigned (&pa)[BN / 16][4], const float (&alpha)[2],
                                                const WsDrop<BN>& drop) {
  ws_rescale<DV>(o, alpha);
  ws_pack<T, BN, kRules>(s, pa, drop);
}

// q, k: [B, H(kv), N, D], v: [B, Hkv, N, DV]; tmpl: the Q, K, V tensor-map
// templates (3-D: D or DV, N, B * heads; 128-byte swizzle, boxes of 64 x 128
// (Q) or 64 x BN) and the heads per section of the work order (16 bytes);
// BN: keys per tile (128; 176 at D = 128, where S, P and O still fit 240
// registers; 80 at D = 256 and 96 at D = 192, see the top);
// tmaps: kWsSlotBytes per block, where the block publishes them (and its trace).
// tk: two zeroed uint32 tickets (the dynamic schedule's item counter and its
// count of finished blocks; the last block to finish zeroes both again).
template <class F, int D, int DV, int BN, int STAGES, int POLY, int NWG, int CH, int EARLY, int TURNS, typename T>
__device__ void attention_fwd_ws(const T* q, const T* k, const T* v, const int* ip, const float* fp,
                                 const unsigned char* tmpl, const unsigned* tk, T* out, float* lse,
                                 unsigned char* tmaps) {
  static_assert(((D == 64 || D == 96 || D == 128 || D == 192 || D == 256) && DV == D) || (D == 192 && DV == 128),
                "warp-specialised forward: head dims 64, 96, 128, 192, 256 (Dqk = Dv) or 192 / 128");
  static_assert(BN == 128 || ((BN == 144 || BN == 160 || BN == 176) && D <= 128 && DV <= 128) ||
                    (BN == 192 && D == 64 && DV == 64) || ((BN == 96 || BN == 64) && D == 64 && NWG == 3) ||
                    ((BN == 96 || BN == 112) && DV == 192) ||
                    ((BN == 80 || BN == 64) && DV == 256),
                "warp-specialised forward: 128-key tiles (144 / 160 / 176 up to D = 128, 192 at D = 64, 96 / 112 at Dv 192, 80 / 64 at Dv 256)");
  static_assert(ws_fwd_smem(D, DV, BN, STAGES, 64 * NWG) <= 227 * 1024, "warp-specialised forward: shared memory");
  static_assert(POLY >= 0 && POLY <= 4, "warp-specialised forward: EXP2POLY counts n8 blocks of every 4");
  static_assert(CH == 1 || CH == 2, "warp-specialised forward: CHAINS is 1 or 2");
  static_assert(EARLY == 0 || EARLY == 1, "warp-specialised forward: RESCALE is 0 or 1");
  static_assert(TURNS == 0 || TURNS == 1, "warp-specialised forward: TURNS is 0 or 1");
  static_assert(!F::ElementRules && !F::Sinks && !F::Varlen && !F::KeyRange,
                "warp-specialised forward: window/causal rules only");
  static_assert(NWG == 2 || (NWG == 3 && D == 64 && DV == 64),
                "warp-specialised forward: two consumer warpgroups, or three at D = 64");
  using MT = bool;
  constexpr int BM = 64 * NWG;  // query rows per block: 64 per consumer warpgroup
  constexpr int PRODUCER_WARP = 4 * NWG;
  // Whole 64-column blocks of each operand (TMA boxes of 64 columns).
  constexpr int QK_BLOCKS = ws_cols(D) / 64, V_BLOCKS = ws_cols(DV) / 64;
  constexpr int Q_BYTES = BM * ws_cols(D) * 2, KV_BYTES = BN * ws_cols(D) * 2, V_BYTES = BN * ws_cols(DV) * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* Ks = Qs + Q_BYTES;            // STAGES K tiles
  unsigned char* Vs = Ks + STAGES * KV_BYTES;  // STAGES V tiles (V_BYTES each)
  __shared__ __align__(128) unsigned char tm_stage[kWsTmapBytes];
  __shared__ __align__(8) unsigned long long q_full, q_empty, k_full[STAGES], k_empty[STAGES], v_full[STAGES],
      v_empty[STAGES];
  // The item whose Q the producer loads next (-1: none left); written before
  // q_full's arrive (release), read after its wait (acquire).
  __shared__ int next_item;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], heads = ip[kBatch] * Hq;
  const int nq = ip[kSeqQ], row_blocks = (nq + BM - 1) / BM;
  // Work items (row block, batch, head). The heads (batch-major) are cut
  // into sections of `group` heads (the host sizes them so that a section's
  // K and V stay in L2); a section's items come before the next section's,
  // and inside one the row blocks run from the last (under causal rules the
  // longest) to the first, the section's heads taking turns. group = 1: one
  // head after the other, so the blocks resident at once share its K and V.
  // A block takes item blockIdx.x first, then (persistent, when the grid is
  // smaller than the work) + gridDim.x, ..., or under the dynamic schedule
  // the next unclaimed one (an atomic ticket); its producer tells the
  // consumers each item through `next_item`. Its K/V ring and barrier phases
  // run on across its items.
  struct Item {
    int b, h, i0, i_end, tile0, tiles;
  };
  const int group = reinterpret_cast<const int*>(tmpl + kWsTmapBytes)[0];
  auto item_of = [&](int w, LogitRules<MT>& rules) {
    Item it;
    const int section = w / (group * row_blocks), first = section * group;
    const int size = min(group, heads - first), local = w - first * row_blocks;
    const int bh = first + local % size;
    it.h = bh % Hq;
    it.b = bh / Hq;
    it.i0 = (row_blocks - 1 - local / size) * BM;
    it.i_end = min(nq, it.i0 + BM);
    const Sequence seq = sequence_of<false>(it.b, ip, nullptr, nullptr);
    rules = make_rules<MT, F>(seq, it.b, it.h, ip, fp, nullptr, nullptr, nullptr);
    int lo, hi;
    rules.key_range(it.i0, it.i_end - 1, lo, hi);
    it.tile0 = lo / BN * BN;
    it.tiles = hi > it.tile0 ? (hi - it.tile0 + BN - 1) / BN : 0;
    return it;
  };
  const int items = row_blocks * heads;

  unsigned char* tm_ws = tmaps + (long)blockIdx.x * kWsSlotBytes;
  if (threadIdx.x == 0) {
    ws_trace(tmpl, tmaps, kTrEntry, clock64());
    ws_trace(tmpl, tmaps, kTrEntryNs, ws_globaltimer());
    ws_trace(tmpl, tmaps, kTrSm, ws_smid());
  }
  if (warp == PRODUCER_WARP) {
    const void* const addrs[3] = {q, k, v};
    tma_publish<3>(tm_stage, tmpl, tm_ws, addrs, lane);
    if (lane == 0) {
      mbar_init(&q_full, 1);
      mbar_init(&q_empty, NWG);
#pragma unroll
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(&k_full[s], 1);
        mbar_init(&v_full[s], 1);
        mbar_init(&k_empty[s], NWG);
        mbar_init(&v_empty[s], NWG);
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
  }
  __syncthreads();

  if (warp >= PRODUCER_WARP) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp != PRODUCER_WARP || lane != 0) return;
    const unsigned char* tm_q = tm_ws;
    const unsigned char* tm_k = tm_ws + 128;
    const unsigned char* tm_v = tm_ws + 256;
    tma_acquire(tm_q);
    tma_acquire(tm_k);
    tma_acquire(tm_v);
    int kv = 0;  // K/V tiles loaded so far (ring position)
    auto load_k = [&](int jt, int slab) {
      const int st = kv % STAGES;
      // A fresh mbarrier counts its phase "before 0" (parity 1) as complete.
      mbar_wait(&k_empty[st], ((kv / STAGES) & 1) ^ 1);
      mbar_expect_tx(&k_full[st], KV_BYTES);
#pragma unroll
      for (int a = 0; a < QK_BLOCKS; ++a)
        ws_tma_load_3d(Ks + st * KV_BYTES + a * BN * 128, tm_k, a * 64, jt, slab, &k_full[st]);
    };
    auto load_v = [&](int jt, int slab) {
      const int st = kv % STAGES;
      mbar_wait(&v_empty[st], ((kv / STAGES) & 1) ^ 1);
      mbar_expect_tx(&v_full[st], V_BYTES);
#pragma unroll
      for (int a = 0; a < V_BLOCKS; ++a)
        ws_tma_load_3d(Vs + st * V_BYTES + a * BN * 128, tm_v, a * 64, jt, slab, &v_full[st]);
      ++kv;
    };
    const bool dynamic = reinterpret_cast<const int*>(tmpl + kWsTmapBytes)[2] != 0;
    unsigned* tickets = const_cast<unsigned*>(tk);
    int n = 0;  // items taken
    for (int w = blockIdx.x; w < items; ++n) {
      LogitRules<MT> rules;
      const Item it = item_of(w, rules);
      const int slab = it.b * Hkv + it.h / (Hq / Hkv);
      auto tile_start = [&](int t) { return it.tile0 + (it.tiles - 1 - t) * BN; };  // last tile first
      // K of the item's first tile before its Q: it may land while the
      // consumers still finish the previous item, whose Q they hold.
      if (it.tiles > 0) load_k(tile_start(0), slab);
      mbar_wait(&q_empty, (n & 1) ^ 1);
      *reinterpret_cast<volatile int*>(&next_item) = w;
      mbar_expect_tx(&q_full, Q_BYTES);
#pragma unroll
      for (int a = 0; a < QK_BLOCKS; ++a) ws_tma_load_3d(Qs + a * BM * 128, tm_q, a * 64, it.i0, it.b * Hq + it.h, &q_full);
      // The next item, claimed now so that the atomic's latency hides under this one's loads.
      const int next = dynamic ? gridDim.x + atomicAdd(tickets, 1u) : w + gridDim.x;
      for (int t = 0; t < it.tiles; ++t) {
        if (t > 0) load_k(tile_start(t), slab);
        load_v(tile_start(t), slab);
      }
      w = next;
    }
    // No item left: the consumers' last q_full phase carries -1.
    mbar_wait(&q_empty, (n & 1) ^ 1);
    *reinterpret_cast<volatile int*>(&next_item) = -1;
    ws_mbar_arrive(&q_full);
    if (dynamic && atomicAdd(tickets + 1, 1u) == gridDim.x - 1) {  // every block is past its last claim
      tickets[0] = 0;
      tickets[1] = 0;
    }
    return;
  }
  // Two consumer warpgroups take 240 registers each; three (512 threads)
  // 160: 3 x 128 x 160 + 128 x 24 = 64512 of the SM's 65536.
  if constexpr (NWG == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  else asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");
  if (threadIdx.x == 0) ws_trace(tmpl, tmaps, kTrSetup, clock64());

  // A consumer warpgroup.
  const int wg = warp / 4, wt = threadIdx.x % 128, g = lane / 4, t4 = lane % 4;
  const bool signals = wt == 0;  // the thread that arrives for its warpgroup
  const float scale = fp[kScale];
  const unsigned q_addr = smem_addr(Qs) + wg * 64 * 128;  // this warpgroup's 64 rows of each Q block
  // Ping-pong: the warpgroups take turns issuing their matrix products, so
  // one's softmax runs while the other's products occupy the tensor cores. A
  // turn is one named barrier per warpgroup (4 + wg, both warpgroups counted):
  // a warpgroup syncs on its own before issuing and arrives on the other's
  // once its S landed (an arrive between the issue and the wait made ptxas
  // serialise every wgmma of the kernel). In each item warpgroup 0 goes first
  // (warpgroup 1 arrives once up front) and warpgroup 1 skips its arrive
  // after its last turn, so every sync meets exactly one arrive and none is
  // left over. Turns: S of the first tile, then S(t) with P V(t-1) for each
  // later tile, then the last P V.
  // Three warpgroups take turns in a cycle 0, 1, 2 the same way: warpgroup w
  // syncs on barrier ws_turn_bar(w) and arrives on the next one's; the last
  // one arrives up front and skips its arrive after its last turn.
  // TURNS = 1 (the default instances'): the cycle runs on across a block's items instead of
  // starting again in each: the last warpgroup arrives up front once, before
  // the first item, and after every turn, its last one included, so warpgroup
  // 0 issues the next item's first S as soon as the last warpgroup issued its
  // last P V, not after that one's epilogue too (the persistent grid's items
  // meet without the tensor cores idling through an epilogue). The one arrive
  // left over at the end is taken by warpgroup 0's sync before it exits.
  auto turn_begin = [&]() {
    if constexpr (NWG == 2) {
      if (wg == 0) asm volatile("bar.sync 4, 256;\n");
      else asm volatile("bar.sync 5, 256;\n");
    } else {
      asm volatile("bar.sync %0, 256;\n" ::"r"(ws_turn_bar(wg)));
    }
  };
  auto turn_end = [&](bool last) {
    if constexpr (NWG == 2) {
      if (TURNS || !(last && wg == 1)) {
        if (wg == 0) asm volatile("bar.arrive 5, 256;\n");
        else asm volatile("bar.arrive 4, 256;\n");
      }
    } else {
      if (TURNS || !(last && wg == NWG - 1)) asm volatile("bar.arrive %0, 256;\n" ::"r"(ws_turn_bar((wg + 1) % NWG)));
    }
  };
  // The last warpgroup's arrive up front: once a block (TURNS), or once an item.
  auto turn_prime = [&]() {
    if constexpr (NWG == 2) {
      if (wg == 1) asm volatile("bar.arrive 4, 256;\n");
    } else {
      if (wg == NWG - 1) asm volatile("bar.arrive %0, 256;\n" ::"r"(ws_turn_bar(0)));
    }
  };
  if constexpr (TURNS) turn_prime();

  float o[DV / 2];
  float row_max[2], row_sum[2], alpha[2];
  float s[BN / 2];
  unsigned pa[BN / 16][4];
  WsDrop<BN> drop = {};
  int kv = 0;  // K/V tiles consumed so far (ring position)
  for (int n = 0;; ++n) {  // n: items taken
    mbar_wait(&q_full, n & 1);
    const int w = *reinterpret_cast<volatile int*>(&next_item);
    if (w < 0) {
      if constexpr (TURNS) {
        if (wg == 0) turn_begin();  // the last warpgroup's last arrive
      }
      if (threadIdx.x == 0) {
        ws_trace(tmpl, tmaps, kTrExit, clock64());
        ws_trace(tmpl, tmaps, kTrExitNs, ws_globaltimer());
        ws_trace(tmpl, tmaps, kTrItems, n);
      }
      return;
    }
    if (threadIdx.x == 0 && n == 0) ws_trace(tmpl, tmaps, kTrQ, clock64());
    LogitRules<MT> rules;
    const Item it = item_of(w, rules);
    const Sequence seq = sequence_of<false>(it.b, ip, nullptr, nullptr);
    const int i0 = it.i0, i_end = it.i_end, tiles = it.tiles;
    auto tile_start = [&](int t) { return it.tile0 + (tiles - 1 - t) * BN; };  // last tile first
    const int i_row = i0 + wg * 64 + (warp % 4) * 16 + g;  // this thread's first row (the other: + 8)
    const long q_base = (long)(it.b * Hq + it.h) * nq;
#pragma unroll
    for (int r = 0; r < DV / 2; ++r) o[r] = 0.f;
    row_max[0] = row_max[1] = kNegInf;
    row_sum[0] = row_sum[1] = 0.f;

    // The tile needs the logit rules (and, holding a NaN or inf in V, the exact P V).
    auto needs_rules = [&](int jt) { return tile_may_drop<F, BN>(rules, seq, i0, i_end, jt); };
    // Softmax of a tile in S's registers (its S landed), O untouched.
    auto softmax = [&](int jt, bool ruled) {
      if (ruled)
        ws_softmax<MT, F, BN, true, POLY, CH>(s, row_max, row_sum, alpha, drop, rules, scale, i_row, jt, t4);
      else
        ws_softmax<MT, F, BN, false, POLY, CH>(s, row_max, row_sum, alpha, drop, rules, scale, i_row, jt, t4);
    };
    // After a softmax: O *= alpha and P packed, or (EARLY) P packed only, O's
    // rescale left to early_rescale.
    auto rescale_pack = [&](bool ruled) {
      if constexpr (EARLY) {
        if (ruled)
          ws_pack<T, BN, true>(s, pa, drop);
        else
          ws_pack<T, BN, false>(s, pa, drop);
      } else {
        if (ruled)
          ws_rescale_pack<T, DV, BN, true>(o, s, pa, alpha, drop);
        else
          ws_rescale_pack<T, DV, BN, false>(o, s, pa, alpha, drop);
      }
    };
    // EARLY (FlashAttention-3's order): O *= alpha of the last softmax inside
    // the turn, after S(t) was issued and before P V(t-1) is: the multiplies
    // run while S(t) occupies the tensor cores, off the path from one
    // softmax to the next turn. O is in no product then (P V(t-2) was waited
    // for), and the same multiplies meet the same O as in the default order,
    // so the results are bit-identical.
    auto early_rescale = [&]() {
      if constexpr (EARLY) ws_rescale<DV, false>(o, alpha);
    };
    // Whether the P V of tile t (V landed) must be exact: it drops keys and its V holds a NaN or inf.
    auto exact_pv = [&](int t, int st) {
      return needs_rules(tile_start(t)) &&
             ws_warpgroup_or(wg < 2 ? 2 + wg : 6, ws_chunks_nonfinite<T, BN, DV>(Vs + st * V_BYTES, wt));
    };

    if (tiles > 0) {
      if constexpr (!TURNS) turn_prime();
      const int st0 = kv % STAGES;
      mbar_wait(&k_full[st0], (kv / STAGES) & 1);
      turn_begin();
      ws_issue_s<T, D, BN, BM>(s, q_addr, smem_addr(Ks + st0 * KV_BYTES));
      wgmma_wait<0>();
      turn_end(false);
      wgmma_pin(s);
      if (signals) ws_mbar_arrive(&k_empty[st0]);
      bool ruled = needs_rules(tile_start(0));
      softmax(tile_start(0), ruled);
      rescale_pack(ruled);
      for (int t = 1; t < tiles; ++t) {
        const int c = kv + t;  // ring position of tile t (tile t-1: c - 1)
        const int st = c % STAGES, pst = (c - 1) % STAGES;
        mbar_wait(&v_full[pst], ((c - 1) / STAGES) & 1);
        const bool exact = exact_pv(t - 1, pst);
        mbar_wait(&k_full[st], (c / STAGES) & 1);
        turn_begin();
        ws_issue_s<T, D, BN, BM>(s, q_addr, smem_addr(Ks + st * KV_BYTES));
        early_rescale();
        if (!exact) ws_issue_pv<T, DV, BN>(o, pa, smem_addr(Vs + pst * V_BYTES));
        if (!exact) {
          wgmma_wait<1>();  // S(t) landed; P V of tile t-1 runs on under the softmax
        } else {
          wgmma_wait<0>();
        }
        turn_end(false);
        wgmma_pin(s);
        if (signals) ws_mbar_arrive(&k_empty[st]);
        ruled = needs_rules(tile_start(t));
        softmax(tile_start(t), ruled);
        wgmma_wait<0>();
        wgmma_pin(o);
        wgmma_pin(pa);
        // The exact P V of tile t-1 where its products were not issued: after
        // the wait, where O's registers are written anyway (its rescale); an
        // exact product anywhere else made ptxas serialise every wgmma.
        if (exact) wg_exact_pv<T, DV, BN>(o, pa, Vs + pst * V_BYTES);
        if (signals) ws_mbar_arrive(&v_empty[pst]);
        rescale_pack(ruled);
      }
      // Every S of the item is done: Q may be replaced by the next item's.
      if (signals) ws_mbar_arrive(&q_empty);
      const int c = kv + tiles - 1, lst = c % STAGES;
      mbar_wait(&v_full[lst], (c / STAGES) & 1);
      const bool exact = exact_pv(tiles - 1, lst);
      turn_begin();
      early_rescale();
      if (!exact) ws_issue_pv<T, DV, BN>(o, pa, smem_addr(Vs + lst * V_BYTES));
      wgmma_wait<0>();
      turn_end(true);
      wgmma_pin(o);
      wgmma_pin(pa);
      if (exact) wg_exact_pv<T, DV, BN>(o, pa, Vs + lst * V_BYTES);
      if (signals) ws_mbar_arrive(&v_empty[lst]);
      kv += tiles;
      if (threadIdx.x == 0 && n == 0) ws_trace(tmpl, tmaps, kTrLoopEnd, clock64());
    } else if (signals) {
      ws_mbar_arrive(&q_empty);
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float m = row_max[half];
      // 0 if nothing was kept, NaN if a kept logit was NaN or +inf (attention_common.cuh).
      const float inv = row_out_factor(sum, 1.f);
      const bool empty = sum == 0.f;
      const int i = i_row + 8 * half;
      if (i >= nq) continue;
      T* orow = out + (q_base + i) * DV;
#pragma unroll
      for (int n8 = 0; n8 < DV / 8; ++n8) {
        const int col = n8 * 8 + 2 * t4;
        *reinterpret_cast<unsigned*>(orow + col) =
            empty ? 0u : pack2<T>(o[4 * n8 + 2 * half] * inv, o[4 * n8 + 2 * half + 1] * inv);
      }
      if (t4 == 0) lse[q_base + i] = row_lse<true>(m, sum);
    }
    if (threadIdx.x == 0 && n == 0) {
      ws_trace(tmpl, tmaps, kTrEpilogueEnd, clock64());
      ws_trace(tmpl, tmaps, kTrEpilogueEndNs, ws_globaltimer());
    }
  }
}

}  // namespace mlx_flash

// The polynomial share of the exponentials (ws_exp2): instances built without
// an EXP2POLY template value (every default one) find this one, 0; a body's
// own constexpr EXP2POLY (the opt-in instances) hides it.
constexpr int EXP2POLY = 0;
// Consumer warpgroups: 2, unless an instance's WARPGROUPS says 3.
constexpr int WARPGROUPS = 2;
// Row max / sum chains of the 176-key softmax: 1, unless an instance's CHAINS says 2.
constexpr int CHAINS = 1;
// O's rescale after the softmax (0), unless an instance's RESCALE says 1:
// inside the next turn, under S's product (MLX_FLASH_CUDA_FWD_WS_RESCALE).
constexpr int RESCALE = 0;
// Turns started again in each item (0), unless an instance's TURNS says 1:
// one cycle across the block's items (MLX_FLASH_CUDA_FWD_WS_TURNS).
constexpr int TURNS = 0;

// The launch bound of every instance the backend builds (see the top): MLX
// names a kernel "custom_kernel_mlx_flash_attention_fwd_ws" followed by its
// template values (BF16, D, DV, WINDOW, STAGES, BN as _t/_f and numbers), and declares
// its parameters as below (inputs q, k, v, ip, fp, tmpl, tk; outputs out, lse, tmaps;
// int, unsigned char and unsigned are the int32_t, uint8_t and uint32_t MLX writes).
#define MLX_FLASH_WS_DECLARE(SUFFIX, TT)                                                                    \
  __global__ void __launch_bounds__(384, 1) custom_kernel_mlx_flash_attention_fwd_ws##SUFFIX(            \
      const TT* q, const TT* k, const TT* v, const int* ip, const float* fp, const unsigned char* tmpl,       \
      const unsigned* tk, TT* out, float* lse, unsigned char* tmaps);
namespace mlx::core::cu {
MLX_FLASH_WS_DECLARE(_f_64_64_f_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_128, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_t_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_176, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_f_3_128, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_t_3_128, __half)
MLX_FLASH_WS_DECLARE(_f_96_96_f_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_96_96_t_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_96_96_f_2_176, __half)
MLX_FLASH_WS_DECLARE(_f_192_192_f_2_96, __half)
MLX_FLASH_WS_DECLARE(_f_192_192_t_2_96, __half)
MLX_FLASH_WS_DECLARE(_f_192_192_f_2_112, __half)
MLX_FLASH_WS_DECLARE(_f_256_256_f_2_80, __half)
MLX_FLASH_WS_DECLARE(_f_256_256_t_2_64, __half)
MLX_FLASH_WS_DECLARE(_f_192_128_f_2_128, __half)
MLX_FLASH_WS_DECLARE(_f_192_128_t_2_128, __half)
MLX_FLASH_WS_DECLARE(_t_64_64_f_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_t_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_176, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_f_3_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_t_3_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_96_96_f_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_96_96_t_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_96_96_f_2_176, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_192_192_f_2_96, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_192_192_t_2_96, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_192_192_f_2_112, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_256_256_f_2_80, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_256_256_t_2_64, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_192_128_f_2_128, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_192_128_t_2_128, __nv_bfloat16)
// Opt-in: part of the exponentials on the FMA pipes (MLX_FLASH_CUDA_FWD_WS_EXP2_POLY_D64).
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_128_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_128_2, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128_2, __half)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_128_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_128_2, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128_2, __nv_bfloat16)
// Opt-in two max / sum chains at the 176-key tile (MLX_FLASH_CUDA_FWD_WS_CHAINS_D128=2).
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_176_0_2_2, __half)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_176_0_2_2, __nv_bfloat16)
// Opt-in dense key tiles at D = 64 (MLX_FLASH_CUDA_FWD_WS_KEYS_D64=192), with the polynomial exp2 too.
MLX_FLASH_WS_DECLARE(_f_64_64_f_2_192, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_192, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_192_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_f_4_192_2, __half)
MLX_FLASH_WS_DECLARE(_t_64_64_f_2_192, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_192, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_192_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_f_4_192_2, __nv_bfloat16)
// Opt-in dense key tiles at D = 128 (MLX_FLASH_CUDA_FWD_WS_KEYS_D128=144 or 160).
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_144, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_160, __half)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_144, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_160, __nv_bfloat16)
// O rescale inside the turn (MLX_FLASH_CUDA_FWD_WS_RESCALE) on the default
// two-warpgroup routes: D 128 dense / ruled, D 64 ruled.
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_176_0_2_1_1, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_t_2_128_0_2_1_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128_0_2_1_1, __half)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_176_0_2_1_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_t_2_128_0_2_1_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128_0_2_1_1, __nv_bfloat16)
// Turns across items (MLX_FLASH_CUDA_FWD_WS_TURNS; the default routes), with either rescale order.
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_176_0_2_1_0_1, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_f_2_176_0_2_1_1_1, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_t_2_128_0_2_1_0_1, __half)
MLX_FLASH_WS_DECLARE(_f_128_128_t_2_128_0_2_1_1_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128_0_2_1_0_1, __half)
MLX_FLASH_WS_DECLARE(_f_64_64_t_4_128_0_2_1_1_1, __half)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_176_0_2_1_0_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_f_2_176_0_2_1_1_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_t_2_128_0_2_1_0_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_128_128_t_2_128_0_2_1_1_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128_0_2_1_0_1, __nv_bfloat16)
MLX_FLASH_WS_DECLARE(_t_64_64_t_4_128_0_2_1_1_1, __nv_bfloat16)
}  // namespace mlx::core::cu
#undef MLX_FLASH_WS_DECLARE

// Three consumer warpgroups (opt-in at D = 64, MLX_FLASH_CUDA_FWD_WS_WG3_D64):
// 512 threads; their names carry EXP2POLY and WARPGROUPS after the tile.
#define MLX_FLASH_WS3_DECLARE(SUFFIX, TT)                                                                   \
  __global__ void __launch_bounds__(512, 1) custom_kernel_mlx_flash_attention_fwd_ws##SUFFIX(            \
      const TT* q, const TT* k, const TT* v, const int* ip, const float* fp, const unsigned char* tmpl,       \
      const unsigned* tk, TT* out, float* lse, unsigned char* tmaps);
namespace mlx::core::cu {
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_0_3, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_1_3, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_2_3, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_t_4_64_0_3, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_t_4_64_1_3, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_t_4_64_2_3, __half)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_0_3, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_1_3, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_2_3, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_t_4_64_0_3, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_t_4_64_1_3, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_t_4_64_2_3, __nv_bfloat16)
// O rescale inside the turn on the default dense D 64 route.
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_0_3_1_1, __half)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_0_3_1_1, __nv_bfloat16)
// Turns across items (the default routes), with either rescale order.
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_0_3_1_0_1, __half)
MLX_FLASH_WS3_DECLARE(_f_64_64_f_4_96_0_3_1_1_1, __half)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_0_3_1_0_1, __nv_bfloat16)
MLX_FLASH_WS3_DECLARE(_t_64_64_f_4_96_0_3_1_1_1, __nv_bfloat16)
}  // namespace mlx::core::cu
#undef MLX_FLASH_WS3_DECLARE
