// MLX primitives for the fused attention forward and backward.
//
// One class per direction, each with eval_cpu (the C++ kernels of
// attention_cpu_kernel.cpp) and eval_gpu (the Metal kernels of metal_src/,
// prebuilt into a metallib on macOS). Differentiation is defined in Python
// (mlx_flash/attention.py) so that every backend shares one vjp; the forward
// primitive's own vjp builds the backward primitive for C++ callers.
#pragma once

#include <optional>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlxf {

namespace mx = mlx::core;

// Static parameters of a call (everything but the arrays).
struct AttentionParams {
  int batch = 0;  // sequences for varlen, else q.shape(0)
  float scale = 1.f;
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  int block_q = 64, block_k = 64;
  // Which optional inputs follow (q, k, v) in the input list, in this order.
  bool has_mask = false, has_alibi = false, has_sinks = false;
  bool has_block_mask = false, varlen = false, has_key_range = false;

  bool operator==(const AttentionParams& o) const;
};

// Optional arrays, in input-list order after q, k, v.
struct AttentionExtras {
  std::optional<mx::array> mask, alibi, sinks, block_mask, cu_seqlens_q, cu_seqlens_k;
  std::optional<mx::array> key_start, key_len;  // int32 [B], both or neither
};

class AttentionForward : public mx::Primitive {
 public:
  AttentionForward(mx::Stream s, AttentionParams p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashAttentionForward"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  const AttentionParams& params() const { return p_; }

 private:
  AttentionParams p_;
};

// own_output: out and lse are this call's own result over exactly its keys
// (false where they are global over more keys, as in ring attention's
// blocks); only then may the CPU kernel take delta from P and dP.
class AttentionBackward : public mx::Primitive {
 public:
  AttentionBackward(mx::Stream s, AttentionParams p, bool has_dlse, bool own_output)
      : mx::Primitive(s), p_(p), has_dlse_(has_dlse), own_output_(own_output) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashAttentionBackward"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  AttentionParams p_;
  bool has_dlse_, own_output_;
};

// The ops: build the primitives' graphs. Arguments are assumed validated by
// mlx_flash._spec (the Python layer); only layout is fixed up here.
std::vector<mx::array> attention_forward(const mx::array& q, const mx::array& k, const mx::array& v,
                                         const AttentionExtras& extras, AttentionParams p,
                                         mx::StreamOrDevice s = {});

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                          const mx::array& out, const mx::array& lse,
                                          const mx::array& dout, const std::optional<mx::array>& dlse,
                                          const AttentionExtras& extras, AttentionParams p,
                                          mx::StreamOrDevice s = {}, bool own_output = true);

}  // namespace mlxf
