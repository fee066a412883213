// The quantized-cache attention primitives: inputs -> kernel argument structs -> kernels.
#include "attention_quant_primitive.h"

#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_quant.h"
#include "cpu_encode.h"

namespace mlxf {
namespace {

DType float_dtype(mx::Dtype t, const char* what) {
  if (t == mx::float32) return DType::f32;
  if (t == mx::float16) return DType::f16;
  if (t == mx::bfloat16) return DType::bf16;
  throw std::invalid_argument(std::string("mlx_flash: ") + what + " must be float32, float16 or bfloat16");
}

Strided4 strided4(const mx::array& a) {
  Strided4 s;
  s.data = a.data<void>();
  for (int d = 0; d < 4; ++d) s.s[d] = a.shape(d) == 1 ? 0 : a.strides()[d];
  return s;
}

QuantView quant_view(const mx::array& words, const mx::array& scales, const mx::array& biases, int bits) {
  QuantView q;
  q.words = strided4(words);
  q.scales = strided4(scales);
  q.biases = strided4(biases);
  q.scale_dtype = float_dtype(scales.dtype(), "scales");
  q.dim = words.shape(3) * 32 / bits;
  return q;
}

View4 view4(const mx::array& a) {
  View4 v;
  v.data = a.data<void>();
  v.dtype = float_dtype(a.dtype(), "q");
  v.sb = a.strides()[0];
  v.sh = a.strides()[1];
  v.sn = a.strides()[2];
  v.sd = a.strides()[3];
  return v;
}

// Shapes, rules and optional inputs; `i` is the input index of the first extra.
QuantAttentionArgs make_args(const QuantParams& qp, const std::vector<mx::array>& in, size_t i) {
  const AttentionParams& p = qp.attention;
  QuantAttentionArgs qa;
  qa.bits = qp.bits;
  qa.group_size = qp.group_size;
  qa.k = quant_view(in[1], in[2], in[3], qp.bits);
  qa.v = quant_view(in[4], in[5], in[6], qp.bits);
  AttentionArgs& a = qa.base;
  const auto& q = in[0];
  a.B = q.shape(0);
  a.Hq = q.shape(1);
  a.Hkv = in[1].shape(1);
  a.Nq = q.shape(2);
  a.Nk = in[1].shape(2);
  a.Dqk = q.shape(3);
  a.Dv = qa.v.dim;
  a.scale = p.scale;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.softcap = p.softcap;
  a.q = view4(q);
  if (p.has_mask) {
    const auto& m = in[i++];
    a.mask_kind = m.dtype() == mx::bool_ ? 1 : 2;
    if (a.mask_kind == 2) a.mask_dtype = float_dtype(m.dtype(), "mask");
    a.mask.data = m.data<void>();
    for (int d = 0; d < 4; ++d) a.mask.s[d] = m.shape(d) == 1 ? 0 : m.strides()[d];
  }
  if (p.has_alibi) a.alibi = in[i++].data<float>();
  if (p.has_sinks) a.sinks = in[i++].data<float>();
  return qa;
}

std::vector<mx::array> inputs_with_extras(std::vector<mx::array> inputs, const AttentionExtras& e,
                                          QuantParams& p, const mx::Stream& s) {
  if (e.block_mask || e.cu_seqlens_q || e.cu_seqlens_k)
    throw std::invalid_argument("mlx_flash: quantized attention takes no block_mask or varlen offsets");
  p.attention.has_mask = e.mask.has_value();
  p.attention.has_alibi = e.alibi.has_value();
  p.attention.has_sinks = e.sinks.has_value();
  if (e.mask) inputs.push_back(*e.mask);  // read through its (broadcast) strides
  if (e.alibi) inputs.push_back(mx::contiguous(*e.alibi, false, s));
  if (e.sinks) inputs.push_back(mx::contiguous(*e.sinks, false, s));
  return inputs;
}

[[noreturn]] void no_gpu() {
  throw std::runtime_error(
      "mlx_flash: the quantized attention primitive runs on the CPU; GPU calls go through the "
      "mx.fast.metal_kernel / mx.fast.cuda_kernel wrappers (mlx_flash.backends.metal_quant, cuda_quant)");
}

}  // namespace

void QuantAttentionForward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  const QuantAttentionArgs qa = make_args(p_, inputs, 7);
  const ForwardOutputs o{outputs[0].data<void>(), outputs[1].data<float>()};
  mlxf::dispatch_cpu(stream(), inputs, outputs, [qa, o] { mlxf::quant_attention_forward(qa, o); });
}

void QuantAttentionBackward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // Inputs: q, k triple, v triple, lse, delta, dout, extras...
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  const QuantAttentionArgs qa = make_args(p_, inputs, 10);
  QuantBackwardArgs g;
  g.lse = inputs[7].data<float>();
  g.delta = inputs[8].data<float>();
  g.dout = view4(inputs[9]);
  g.dq = outputs[0].data<void>();
  mlxf::dispatch_cpu(stream(), inputs, outputs, [qa, g] { mlxf::quant_attention_backward(qa, g); });
}

void QuantAttentionForward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(); }
void QuantAttentionBackward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(); }

std::vector<mx::array> quant_attention_forward(const mx::array& q, const std::vector<mx::array>& k,
                                               const std::vector<mx::array>& v, const AttentionExtras& extras,
                                               QuantParams p, mx::StreamOrDevice sd) {
  auto s = mx::to_stream(sd);
  auto inputs = inputs_with_extras({q, k[0], k[1], k[2], v[0], v[1], v[2]}, extras, p, s);
  const int dv = v[0].shape(3) * 32 / p.bits;
  mx::Shape out_shape = {q.shape(0), q.shape(1), q.shape(2), dv};
  mx::Shape lse_shape = {q.shape(0), q.shape(1), q.shape(2)};
  return mx::array::make_arrays({out_shape, lse_shape}, {q.dtype(), mx::float32},
                                std::make_shared<QuantAttentionForward>(s, p), inputs);
}

std::vector<mx::array> quant_attention_backward(const mx::array& q, const std::vector<mx::array>& k,
                                                const std::vector<mx::array>& v, const mx::array& lse,
                                                const mx::array& delta, const mx::array& dout,
                                                const AttentionExtras& extras, QuantParams p,
                                                mx::StreamOrDevice sd) {
  auto s = mx::to_stream(sd);
  std::vector<mx::array> inputs = {q, k[0], k[1], k[2], v[0], v[1], v[2],
                                   mx::contiguous(mx::astype(lse, mx::float32, s), false, s),
                                   mx::contiguous(mx::astype(delta, mx::float32, s), false, s),
                                   mx::astype(dout, q.dtype(), s)};
  inputs = inputs_with_extras(std::move(inputs), extras, p, s);
  return mx::array::make_arrays({q.shape()}, {q.dtype()}, std::make_shared<QuantAttentionBackward>(s, p), inputs);
}

namespace nb = nanobind;
using namespace nb::literals;

void register_quant_attention(nb::module_& m) {
  auto params = [](int bits, int group_size, float scale, int window_left, int window_right, float softcap) {
    QuantParams p;
    p.bits = bits;
    p.group_size = group_size;
    p.attention.scale = scale;
    p.attention.window_left = window_left;
    p.attention.window_right = window_right;
    p.attention.softcap = softcap;
    return p;
  };
  m.def(
      "quant_attention_forward",
      [params](const mx::array& q, const std::vector<mx::array>& k, const std::vector<mx::array>& v,
               std::optional<mx::array> mask, std::optional<mx::array> alibi, std::optional<mx::array> sinks,
               int bits, int group_size, float scale, int window_left, int window_right, float softcap,
               mx::StreamOrDevice s) {
        AttentionExtras e{mask, alibi, sinks, {}, {}, {}};
        return quant_attention_forward(q, k, v, e, params(bits, group_size, scale, window_left, window_right, softcap), s);
      },
      "q"_a, "k"_a, "v"_a, "mask"_a.none() = nb::none(), "alibi"_a.none() = nb::none(),
      "sinks"_a.none() = nb::none(), nb::kw_only(), "bits"_a, "group_size"_a, "scale"_a, "window_left"_a,
      "window_right"_a, "softcap"_a, "stream"_a = nb::none(),
      "Attention over (words, scales, biases) triples of mx.quantize: returns [out, lse].");
  m.def(
      "quant_attention_backward",
      [params](const mx::array& q, const std::vector<mx::array>& k, const std::vector<mx::array>& v,
               const mx::array& lse, const mx::array& delta, const mx::array& dout, std::optional<mx::array> mask,
               std::optional<mx::array> alibi, std::optional<mx::array> sinks, int bits, int group_size, float scale,
               int window_left, int window_right, float softcap, mx::StreamOrDevice s) {
        AttentionExtras e{mask, alibi, sinks, {}, {}, {}};
        return quant_attention_backward(q, k, v, lse, delta, dout, e,
                                        params(bits, group_size, scale, window_left, window_right, softcap), s);
      },
      "q"_a, "k"_a, "v"_a, "lse"_a, "delta"_a, "dout"_a, "mask"_a.none() = nb::none(),
      "alibi"_a.none() = nb::none(), "sinks"_a.none() = nb::none(), nb::kw_only(), "bits"_a, "group_size"_a,
      "scale"_a, "window_left"_a, "window_right"_a, "softcap"_a, "stream"_a = nb::none(),
      "dq of quantized-cache attention (k, v constants): returns [dq].");
}

}  // namespace mlxf
