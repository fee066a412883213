// MLX primitives for attention over an affine-quantized K/V cache (CPU).
//
// Inputs: q, then k's (words, scales, biases), then v's, then the optional
// mask, alibi, sinks (AttentionParams says which). The backward gives dq
// only; its inputs insert lse, delta (= dO . O - dlse) and dout after v's
// triple. Differentiation is defined in Python
// (mlx_flash/attention_quantized.py); GPU streams are refused by the Python
// layer before a primitive is built.
#pragma once

#include "attention_primitive.h"

namespace mlxf {

struct QuantParams {
  AttentionParams attention;
  int bits = 4, group_size = 64;
  bool operator==(const QuantParams& o) const {
    return attention == o.attention && bits == o.bits && group_size == o.group_size;
  }
};

class QuantAttentionForward : public mx::Primitive {
 public:
  QuantAttentionForward(mx::Stream s, QuantParams p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashAttentionQuantizedForward"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const QuantAttentionForward&>(other).p_;
  }

 private:
  QuantParams p_;
};

class QuantAttentionBackward : public mx::Primitive {
 public:
  QuantAttentionBackward(mx::Stream s, QuantParams p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "FlashAttentionQuantizedBackward"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const QuantAttentionBackward&>(other).p_;
  }

 private:
  QuantParams p_;
};

// k and v are the (words, scales, biases) triples of mx.quantize along the
// head dim; extras.block_mask and varlen offsets must be absent.
std::vector<mx::array> quant_attention_forward(const mx::array& q, const std::vector<mx::array>& k,
                                               const std::vector<mx::array>& v, const AttentionExtras& extras,
                                               QuantParams p, mx::StreamOrDevice s = {});

// Returns [dq].
std::vector<mx::array> quant_attention_backward(const mx::array& q, const std::vector<mx::array>& k,
                                                const std::vector<mx::array>& v, const mx::array& lse,
                                                const mx::array& delta, const mx::array& dout,
                                                const AttentionExtras& extras, QuantParams p,
                                                mx::StreamOrDevice s = {});

}  // namespace mlxf
