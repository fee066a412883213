// Scalar (SIMT) attention kernels in float32 arithmetic: the exact path for
// float32 inputs, the decode path (few query rows, keys split across
// blocks), and the backward for every dtype.
//
// Work layout: a block owns one key/value head and W "rows", a row being a
// (query position, query head of the group) pair, so GQA heads share every
// K/V tile the block loads into shared memory. One warp per row; lane j owns
// key j of a 32-key tile for the logits and output dims lane + 32u for the
// accumulation.
#pragma once

#include "attention_common.cuh"

namespace mlx_flash {

constexpr int kSimtTile = 32;

// Shared memory the SIMT forward needs (bytes); the wrapper sizes the launch with it.
__host__ __device__ constexpr int simt_fwd_smem(int d, int dv, int warps) {
  return 4 * (kSimtTile * (d + 1) + kSimtTile * dv + warps * d);
}

// Dot product of two float rows in shared memory. For float32 inputs the sum
// runs in double: with large logits (|s| ~ 1e3) a float32 running sum loses
// more than the plain materialised product does, and fp64 FMAs are cheap on
// the data-centre GPUs. 16-bit inputs carry far less precision; float suffices.
template <typename T>
__device__ __forceinline__ float dot_exact(const float* a, const float* b, int n) {
  if constexpr (sizeof(T) == 4) {
    double acc = 0.0;
#pragma unroll 4
    for (int d = 0; d < n; ++d) acc = fma((double)a[d], (double)b[d], acc);
    return (float)acc;
  } else {
    float acc = 0.f;
#pragma unroll 8
    for (int d = 0; d < n; ++d) acc += a[d] * b[d];
    return acc;
  }
}

// Rows [0, valid_rows) of a 32-row [*, DIM] global tile into float shared
// memory [32][PITCH] (zeros past valid_rows). All loads of a batch (up to
// 16 words a thread, so wide heads do not spill) are issued before its first
// store, in 16-byte words where the rows allow it: decode streams K/V once,
// so load latency, not arithmetic, sets its speed.
template <typename T, int DIM, int PITCH, int NT>
__device__ __forceinline__ void load_rows_f32(float* dst, const T* src, int valid_rows) {
  constexpr int VW = 16 / sizeof(T);
  if constexpr (DIM % VW == 0) {
    constexpr int CH = DIM / VW, TOTAL = kSimtTile * CH, ITER = (TOTAL + NT - 1) / NT;
    constexpr int BATCH = ITER < 16 ? ITER : 16;
#pragma unroll 1
    for (int it0 = 0; it0 < ITER; it0 += BATCH) {
      uint4 regs[BATCH];
#pragma unroll
      for (int it = 0; it < BATCH; ++it) {
        const int c = threadIdx.x + (it0 + it) * NT, row = c / CH;
        regs[it] = (c < TOTAL && row < valid_rows)
                       ? *reinterpret_cast<const uint4*>(src + (long)row * DIM + (c % CH) * VW)
                       : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int it = 0; it < BATCH; ++it) {
        const int c = threadIdx.x + (it0 + it) * NT, row = c / CH;
        if (c < TOTAL) {
          const T* e = reinterpret_cast<const T*>(&regs[it]);
#pragma unroll
          for (int u = 0; u < VW; ++u) dst[row * PITCH + (c % CH) * VW + u] = to_float(e[u]);
        }
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kSimtTile * DIM; idx += NT) {
      const int row = idx / DIM, d = idx % DIM;
      dst[row * PITCH + d] = row < valid_rows ? to_float(src[(long)row * DIM + d]) : 0.f;
    }
  }
}

template <typename T, typename MT, class F, int D, int DV, int W, int SPLITS>
__device__ void attention_fwd_simt(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const float* sinks,
    const bool* bmask, const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    T* out, float* lse, float* part_o, float* part_lse, const int* key_start = nullptr,
    const int* key_len = nullptr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* ks = reinterpret_cast<float*>(smem_raw);  // [32][D + 1] (padded: lane j reads row j)
  float* vs = ks + kSimtTile * (D + 1);             // [32][DV]
  float* qs = vs + kSimtTile * DV;                  // [W][D]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int rows = seq.nq * G;
  const int r0 = blockIdx.x * W;
  if (r0 >= rows) return;
  const int r = r0 + warp;
  const bool row_ok = r < rows;
  const int i = row_ok ? r / G : 0;
  const int h = hk * G + (row_ok ? r % G : 0);
  const LogitRules<MT> rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
  const long q_row = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start + i;
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];

  for (int d = lane; d < D; d += 32) qs[warp * D + d] = row_ok ? to_float(q[q_row * D + d]) : 0.f;

  // Keys any row of this block can see (within the key range), then this split's share of them.
  int lo, hi;
  rules.key_range(r0 / G, min(rows - 1, r0 + W - 1) / G, lo, hi);
  const int span = max(hi - lo, 0);
  const int chunk = ((span + SPLITS - 1) / SPLITS + kSimtTile - 1) / kSimtTile * kSimtTile;
  const int k_lo = lo + blockIdx.y * chunk;
  const int k_hi = min(hi, k_lo + chunk);

  constexpr int NU = (DV + 31) / 32;
  float acc[NU];
#pragma unroll
  for (int u = 0; u < NU; ++u) acc[u] = 0.f;
  float row_max = kNegInf, row_sum = 0.f;

  for (int j0 = k_lo; j0 < k_hi; j0 += kSimtTile) {
    __syncthreads();
    load_rows_f32<T, D, D + 1, W * 32>(ks, k + (kv_base + j0) * D, k_hi - j0);
    load_rows_f32<T, DV, DV, W * 32>(vs, v + (kv_base + j0) * DV, k_hi - j0);
    __syncthreads();
    const int j = j0 + lane;
    float s = dot_exact<T>(qs + warp * D, ks + lane * (D + 1), D);
    float capped = 0.f;
    s = (row_ok && j < k_hi) ? apply_rules<F>(rules, s * scale, i, j, capped) : kNegInf;
    // The max ignores NaN logits; they reach the sum through p (NaN) instead.
    const float new_max = fmaxf(row_max, warp_max(s));
    const float base = new_max == kNegInf ? 0.f : new_max;
    const float p = expf(s - base), alpha = expf(row_max - base);
    row_sum = row_sum * alpha + warp_sum(p);
    row_max = new_max;
#pragma unroll
    for (int u = 0; u < NU; ++u) acc[u] *= alpha;
    // Dropped keys (-inf logit) are skipped, not multiplied by p = 0: their v may hold NaN.
    const unsigned kept = __ballot_sync(0xffffffffu, s != kNegInf);
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      if (!((kept >> jj) & 1u)) continue;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int d = lane + 32 * u;
        if (d < DV) acc[u] += pj * vs[jj * DV + d];
      }
    }
  }
  if (!row_ok) return;

  if (SPLITS == 1) {
    if (F::Sinks) {
      float alpha;
      fold_sink<false>(sinks[h], row_max, row_sum, alpha);
#pragma unroll
      for (int u = 0; u < NU; ++u) acc[u] *= alpha;
    }
    const float inv = row_out_factor(row_sum, 1.f);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int d = lane + 32 * u;
      if (d < DV) out[q_row * DV + d] = from_float<T>(row_sum == 0.f ? 0.f : acc[u] * inv);
    }
    if (lane == 0) lse[q_row] = row_lse<false>(row_max, row_sum);
  } else {
    // Partial result of this split, normalised, with its own lse; combined later.
    const long total_rows = (long)(F::Varlen ? 1 : ip[kBatch]) * Hq * NqTot;
    const long prow = blockIdx.y * total_rows + q_row;
    const float inv = row_out_factor(row_sum, 1.f);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int d = lane + 32 * u;
      if (d < DV) part_o[prow * DV + d] = row_sum == 0.f ? 0.f : acc[u] * inv;
    }
    if (lane == 0) part_lse[prow] = row_lse<false>(row_max, row_sum);
  }
}

// Most key splits attention_combine merges.
constexpr int kMaxSplits = 128;

// Merge the `splits` partial results of each row (part_o [splits][rows][DV],
// normalised, and their part_lse [splits][rows]) by their lse, with the sink.
// One block of 128 threads per row. Every warp first derives all the split
// weights itself (lanes over splits, two warp reductions), so no barrier is
// needed before the accumulation; then the threads are laid out as GROUPS
// groups of C columns (float4 words of the row where DV allows), each group
// summing every GROUPS-th split with eight independent loads in flight per
// thread, and the groups are added in shared memory.
template <typename T, int DV, bool Sinks, bool Varlen>
__device__ void attention_combine(
    const float* part_o, const float* part_lse, const float* sinks, const int* ip, const int* ns,
    T* out, float* lse) {
  constexpr int NT = 128, LANE_SPLITS = kMaxSplits / 32;
  constexpr int VW = DV % 4 == 0 ? 4 : 1;  // floats per column
  constexpr int C = DV / VW;               // columns of a row
  constexpr int GROUPS = C >= NT ? 1 : NT / C;
  __shared__ float weights[NT / 32][kMaxSplits];
  __shared__ __align__(16) float partial[GROUPS > 1 ? GROUPS * C * VW : 1];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Hq = ip[kHeadsQ], NqTot = ip[kSeqQ];
  const long total_rows = (long)(Varlen ? 1 : ip[kBatch]) * Hq * NqTot;
  const long row = blockIdx.x;
  const int splits = ns[0];

  // A split's lse is -inf when it kept no key (its weight is 0 and its words
  // are never read) and NaN when its row is NaN: the max ignores NaN, the
  // weights (NaN) carry it into the sum and the output.
  float l[LANE_SPLITS];
  float m = kNegInf;
  bool nan = false;
#pragma unroll
  for (int u = 0; u < LANE_SPLITS; ++u) {
    const int s = lane + 32 * u;
    l[u] = s < splits ? part_lse[s * total_rows + row] : kNegInf;
    m = fmaxf(m, l[u]);
    nan = nan || l[u] != l[u];
  }
  m = warp_max(m);
  nan = __any_sync(0xffffffffu, nan);
  float sink = kNegInf;
  if (Sinks) {
    sink = sinks[(row / NqTot) % Hq];
    m = fmaxf(m, sink);
    nan = nan || sink != sink;
  }
  if (m == kNegInf && !nan) {  // every key of the row dropped, no sink
    for (int d = threadIdx.x; d < DV; d += NT) out[row * DV + d] = from_float<T>(0.f);
    if (threadIdx.x == 0) lse[row] = kNegInf;
    return;
  }
  const float base = m == kNegInf ? 0.f : m;
  float denom = 0.f;
#pragma unroll
  for (int u = 0; u < LANE_SPLITS; ++u) {
    const float w = expf(l[u] - base);
    if (lane + 32 * u < splits) weights[warp][lane + 32 * u] = w;
    denom += w;
  }
  denom = warp_sum(denom) + (Sinks ? expf(sink - base) : 0.f);
  const float inv = 1.f / denom;
  if (threadIdx.x == 0) lse[row] = base + logf(denom);
  __syncwarp();

  const int grp = GROUPS > 1 ? threadIdx.x / C : 0;
  for (int col = GROUPS > 1 ? threadIdx.x % C : threadIdx.x; col < C && grp < GROUPS; col += NT) {
    float acc[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) acc[e] = 0.f;
    for (int s0 = grp; s0 < splits; s0 += 8 * GROUPS) {
      float w[8], x[8][VW];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int s = s0 + u * GROUPS;
        w[u] = s < splits ? weights[warp][s] : 0.f;
        const float* src = part_o + (s * total_rows + row) * DV + col * VW;
        if (w[u] != 0.f) {  // an empty split (lse -inf) is skipped, its words never read
          if constexpr (VW == 4) {
            const float4 x4 = *reinterpret_cast<const float4*>(src);
            x[u][0] = x4.x, x[u][1] = x4.y, x[u][2] = x4.z, x[u][3] = x4.w;
          } else {
            x[u][0] = *src;
          }
        } else {
#pragma unroll
          for (int e = 0; e < VW; ++e) x[u][e] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int e = 0; e < VW; ++e) acc[e] += w[u] * x[u][e];
    }
    if (GROUPS > 1) {
#pragma unroll
      for (int e = 0; e < VW; ++e) partial[(grp * C + col) * VW + e] = acc[e];
    } else {
#pragma unroll
      for (int e = 0; e < VW; ++e) out[row * DV + col * VW + e] = from_float<T>(acc[e] * inv);
    }
  }
  if (GROUPS > 1) {
    __syncthreads();
    for (int d = threadIdx.x; d < DV; d += NT) {
      float o = 0.f;
#pragma unroll
      for (int gi = 0; gi < GROUPS; ++gi) o += partial[gi * C * VW + d];
      out[row * DV + d] = from_float<T>(o * inv);
    }
  }
}

// NCH: column chunks of dK/dQ and dV (wide heads; see attention_bwd_simt).
__host__ __device__ constexpr int simt_bwd_chunk(int d, int nch) { return (d + nch - 1) / nch; }
__host__ __device__ constexpr int simt_bwd_smem(int d, int dv, int warps, int nch = 1) {
  return 4 * (warps * kSimtTile * ((d + 1) + (dv + 1) + (simt_bwd_chunk(d, nch) + 1) + (simt_bwd_chunk(dv, nch) + 1)) +
              d + 2 * dv + warps * kSimtTile);
}

// FlashAttention-2 backward, scalar: a block owns W*32 keys of one key/value
// head, each warp 32 of them (lane j = key j) with dK, dV accumulated in shared
// memory; it walks every query row (of every head of the GQA group) that can
// see its keys. dQ is summed across blocks with float atomics into dq_acc.
// delta = rowsum(dO * O) - dlse is computed here with the same summation
// order as dP = dO . V, so a row with a single visible key gets dS = 0
// exactly (its true value). Wide heads (NCH > 1 chunks, blockIdx.y the
// chunk): each block still forms every logit and dP from full K and V rows,
// but accumulates only DC of the D columns of dK and dQ and DVC of the DV
// columns of dV, so a warp's shared memory fits the block.
template <typename T, typename MT, class F, int D, int DV, int W, bool HasDlse, int NCH = 1>
__device__ void attention_bwd_simt(
    const T* q, const T* k, const T* v, const MT* mask, const float* alibi, const bool* bmask,
    const int* cu_q, const int* cu_k, const int* ip, const float* fp,
    const T* dout, const float* lse, const T* o, const float* dlse,
    float* dq_acc, T* dk, T* dv, const int* key_start = nullptr, const int* key_len = nullptr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int DC = simt_bwd_chunk(D, NCH), DVC = simt_bwd_chunk(DV, NCH);
  constexpr int WARP_FLOATS = kSimtTile * ((D + 1) + (DV + 1) + (DC + 1) + (DVC + 1));
  const int dk0 = NCH > 1 ? blockIdx.y * DC : 0, dv0 = NCH > 1 ? blockIdx.y * DVC : 0;
  const int dk_n = min(DC, D - dk0), dv_n = min(DVC, DV - dv0);  // this chunk's columns
  float* ks = reinterpret_cast<float*>(smem_raw) + warp * WARP_FLOATS;
  float* vs = ks + kSimtTile * (D + 1);
  float* dks = vs + kSimtTile * (DV + 1);  // [32][DC + 1]: dK columns dk0..
  float* dvs = dks + kSimtTile * (DC + 1);  // [32][DVC + 1]: dV columns dv0..
  float* qrow = reinterpret_cast<float*>(smem_raw) + W * WARP_FLOATS;
  float* dorow = qrow + D;
  float* orow = dorow + DV;
  float* dsw = orow + DV;  // [W][32]

  const int Hq = ip[kHeadsQ], Hkv = ip[kHeadsKv], G = Hq / Hkv;
  const int NqTot = ip[kSeqQ], NkTot = ip[kSeqK];
  const int b = blockIdx.z / Hkv, hk = blockIdx.z % Hkv;
  const Sequence seq = sequence_of<F::Varlen>(b, ip, cu_q, cu_k);
  const int block_j0 = blockIdx.x * W * kSimtTile;
  if (block_j0 >= seq.nk) return;
  LogitRules<MT> rules = make_rules<MT, F>(seq, b, hk * G, ip, fp, mask, alibi, bmask, key_start, key_len);
  int i_lo, i_hi;
  rules.query_range(block_j0, min(seq.nk, block_j0 + W * kSimtTile) - 1, i_lo, i_hi);
  // No query sees these keys (all outside the key range, or the window's):
  // dK = dV = 0, as the outputs start.
  if (i_lo >= i_hi) return;
  const int j = block_j0 + warp * kSimtTile + lane;
  const bool key_ok = j >= rules.key_lo && j < rules.key_hi;  // zeros loaded, nothing written otherwise
  const long kv_base = (long)(seq.tensor_batch * Hkv + hk) * NkTot + seq.k_start;
  const float scale = fp[kScale];
  const float softcap = fp[kSoftcap];

  for (int d = 0; d < D; ++d) ks[lane * (D + 1) + d] = key_ok ? to_float(k[(kv_base + j) * D + d]) : 0.f;
  for (int d = 0; d < DV; ++d) vs[lane * (DV + 1) + d] = key_ok ? to_float(v[(kv_base + j) * DV + d]) : 0.f;
  for (int d = 0; d < DC; ++d) dks[lane * (DC + 1) + d] = 0.f;
  for (int d = 0; d < DVC; ++d) dvs[lane * (DVC + 1) + d] = 0.f;

  for (int i = i_lo; i < i_hi; ++i) {
    for (int hg = 0; hg < G; ++hg) {
      const int h = hk * G + hg;
      rules = make_rules<MT, F>(seq, b, h, ip, fp, mask, alibi, bmask, key_start, key_len);
      const long q_row = (long)(seq.tensor_batch * Hq + h) * NqTot + seq.q_start + i;
      __syncthreads();
      for (int d = threadIdx.x; d < D; d += W * 32) qrow[d] = to_float(q[q_row * D + d]);
      for (int d = threadIdx.x; d < DV; d += W * 32) {
        dorow[d] = to_float(dout[q_row * DV + d]);
        orow[d] = to_float(o[q_row * DV + d]);
      }
      __syncthreads();
      const float row_lse = lse[q_row];
      float row_delta = dot_exact<T>(dorow, orow, DV);
      if (HasDlse) row_delta -= dlse[q_row];
      const float s = dot_exact<T>(qrow, ks + lane * (D + 1), D);
      float capped = 0.f;
      const float logit = key_ok ? apply_rules<F>(rules, s * scale, i, j, capped) : kNegInf;
      // Dropped pairs (-inf logit) add nothing: skipped, never multiplied by 0
      // (q, k, v, dO may hold NaN). A NaN row lse makes every kept p NaN.
      const bool kept = logit != kNegInf;
      const unsigned kept_keys = __ballot_sync(0xffffffffu, kept);
      if (kept_keys == 0u) continue;
      const float p = kept ? expf(logit - row_lse) : 0.f;
      const float dp = dot_exact<T>(dorow, vs + lane * (DV + 1), DV);
      float ds = p * (dp - row_delta);
      if (F::Softcap) {
        const float t = capped / softcap;
        ds *= 1.f - t * t;
      }
      if (kept) {
        for (int d = 0; d < dv_n; ++d) dvs[lane * (DVC + 1) + d] += p * dorow[dv0 + d];
        for (int d = 0; d < dk_n; ++d) dks[lane * (DC + 1) + d] += ds * qrow[dk0 + d];
      }
      dsw[warp * kSimtTile + lane] = ds;
      __syncwarp();
      for (int d = dk0 + lane; d < dk0 + dk_n; d += 32) {
        float acc = 0.f;
        for (int jj = 0; jj < kSimtTile; ++jj)
          if ((kept_keys >> jj) & 1u) acc += dsw[warp * kSimtTile + jj] * ks[jj * (D + 1) + d];
        atomicAdd(dq_acc + q_row * D + d, acc * scale);
      }
      __syncwarp();
    }
  }
  if (!key_ok) return;
  for (int d = 0; d < dk_n; ++d) dk[(kv_base + j) * D + dk0 + d] = from_float<T>(dks[lane * (DC + 1) + d] * scale);
  for (int d = 0; d < dv_n; ++d) dv[(kv_base + j) * DV + dv0 + d] = from_float<T>(dvs[lane * (DVC + 1) + d]);
}

}  // namespace mlx_flash
