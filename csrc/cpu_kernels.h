// Interface between the MLX primitives and the CPU kernels.
//
// The kernels see plain structs of pointers and strides, no MLX types: each
// kernel source is compiled once per instruction set (generic, avx2) into its
// own namespace, and cpu_dispatch.cpp picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlxf {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

// A strided [B, H, N, D] view (any strides: transposed inputs need no copy,
// since the kernels convert rows into their own fp32 tiles anyway).
struct View4 {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t sb = 0, sh = 0, sn = 0, sd = 1;  // element strides of batch, head, token, dim
};

// A strided rank-4 view with broadcasting: stride 0 where the dim is 1.
struct Broadcast4 {
  const void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

struct AttentionArgs {
  // Shapes. For varlen calls B is the number of sequences, Nq/Nk the packed
  // totals, and cu_q/cu_k give each sequence's rows.
  int B = 0, Hq = 0, Hkv = 0, Nq = 0, Nk = 0, Dqk = 0, Dv = 0;
  float scale = 1.f;
  int window_left = -1, window_right = -1;  // -1: unbounded
  float softcap = 0.f;                      // 0: none
  View4 q, k, v;
  const float* alibi = nullptr;  // [B, Hq] contiguous
  const float* sinks = nullptr;  // [Hq]
  int mask_kind = 0;             // 0 none, 1 bool, 2 additive
  DType mask_dtype = DType::f32;
  Broadcast4 mask;               // [B, Hq, Nq, Nk]
  const bool* block_mask = nullptr;
  Broadcast4 block_mask_view;    // [B, Hq, ceil(Nq/bq), ceil(Nk/bk)]
  int block_q = 64, block_k = 64;
  const int32_t* cu_q = nullptr;  // varlen offsets [B + 1]
  const int32_t* cu_k = nullptr;
  // Per-batch valid keys [B] (optional, never with varlen): batch b keeps
  // keys key_start[b] <= j < key_start[b] + key_len[b]; the kernels visit
  // only the key tiles of that range.
  const int32_t* key_start = nullptr;
  const int32_t* key_len = nullptr;
};

struct ForwardOutputs {
  void* out = nullptr;  // [B?, Hq, Nq, Dv] contiguous (varlen: [1, Hq, total, Dv])
  float* lse = nullptr; // [B?, Hq, Nq] contiguous
};

struct BackwardArgs {
  View4 out, dout;         // like q
  const float* lse = nullptr;   // contiguous like ForwardOutputs::lse
  const float* dlse = nullptr;  // optional, same layout
  void* dq = nullptr;      // [B?, Hq, Nq, Dqk] contiguous, q's dtype
  void* dk = nullptr;      // [B?, Hkv, Nk, Dqk]
  void* dv = nullptr;      // [B?, Hkv, Nk, Dv]
  // out and lse are the call's own over exactly its keys (not ring
  // attention's global ones): delta may then come from P and dP.
  bool own_output = true;
};

// ---- matmul2d ----------------------------------------------------------------

// Element type of a matmul operand: a float dtype, or fp8 codes (uint8).
enum class MatType : int32_t { f32 = 0, f16 = 1, bf16 = 2, e4m3 = 3, e5m2 = 4 };

// A strided [batch, rows, cols] operand; batch stride 0 broadcasts.
struct MatView {
  const void* data = nullptr;
  MatType type = MatType::f32;
  int64_t sb = 0, sr = 0, sc = 1;  // element strides of batch, row, column
};

// out[g, i, j] = a_scale[g, i] * b_scale[j] * sum_k a[g, i, k] * b[g, k, j].
// `b` is described as its logical [K, N] view (transpose_b only changes its
// strides). Scales are float32 with element strides (0 broadcasts); null
// means 1. out is a contiguous [batch, M, N] array of out_dtype.
struct MatmulArgs {
  int batch = 0, M = 0, N = 0, K = 0;
  bool b_batched = false;
  MatView a, b;
  const float* a_scale = nullptr;
  int64_t a_scale_sb = 0, a_scale_sr = 0;
  const float* b_scale = nullptr;
  int64_t b_scale_sc = 0;
  void* out = nullptr;
  DType out_dtype = DType::f32;
};

#define MLXF_DECLARE_KERNELS(ISA)                                                       \
  namespace ISA {                                                                       \
  void attention_forward(const AttentionArgs& a, const ForwardOutputs& o);              \
  void attention_backward(const AttentionArgs& a, const BackwardArgs& g);               \
  void matmul2d(const MatmulArgs& a);                                                   \
  }

MLXF_DECLARE_KERNELS(generic)
MLXF_DECLARE_KERNELS(avx2)
MLXF_DECLARE_KERNELS(avx512)

// Kernel scratch comes from MLX's allocator, so mx.get_peak_memory() counts
// it like any array. Returns a 64-byte aligned data pointer; *handle is what
// to free.
void* scratch_alloc(size_t bytes, void** handle);
void scratch_free(void* handle);

// Run-time choice of the fastest variant this CPU supports.
void attention_forward(const AttentionArgs& a, const ForwardOutputs& o);
void attention_backward(const AttentionArgs& a, const BackwardArgs& g);
void matmul2d(const MatmulArgs& a);
const char* cpu_kernel_isa();

}  // namespace mlxf
