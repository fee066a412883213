// The attention primitives: inputs -> kernel argument structs -> kernels.
#include "attention_primitive.h"

#include <stdexcept>

#include "cpu_kernels.h"
#include "cpu_encode.h"

namespace mlxf {

bool AttentionParams::operator==(const AttentionParams& o) const {
  return batch == o.batch && scale == o.scale && window_left == o.window_left &&
         window_right == o.window_right && softcap == o.softcap && block_q == o.block_q &&
         block_k == o.block_k && has_mask == o.has_mask && has_alibi == o.has_alibi &&
         has_sinks == o.has_sinks && has_block_mask == o.has_block_mask && varlen == o.varlen &&
         has_key_range == o.has_key_range;
}

namespace {

DType kernel_dtype(mx::Dtype t) {
  if (t == mx::float32) return DType::f32;
  if (t == mx::float16) return DType::f16;
  if (t == mx::bfloat16) return DType::bf16;
  throw std::invalid_argument("mlx_flash: unsupported dtype; expected float32, float16 or bfloat16");
}

View4 view4(const mx::array& a) {
  View4 v;
  v.data = a.data<void>();
  v.dtype = kernel_dtype(a.dtype());
  v.sb = a.strides()[0];
  v.sh = a.strides()[1];
  v.sn = a.strides()[2];
  v.sd = a.strides()[3];
  return v;
}

Broadcast4 broadcast4(const mx::array& a) {
  Broadcast4 b;
  b.data = a.data<void>();
  for (int d = 0; d < 4; ++d) b.s[d] = a.shape(d) == 1 ? 0 : a.strides()[d];
  return b;
}

// The Metal kernels (attention_metal.cpp) index q/k/v/out/dout as dense
// row-major arrays; the CPU kernels read any strides. The copies are made in
// the graph with the public mx::contiguous (a no-op on dense inputs), since
// eval_gpu may only call what libmlx exports. Builds without the Metal
// primitive leave the graph as it was.
mx::array dense_for_gpu(const mx::array& x, const mx::Stream& s) {
#ifdef MLXF_METAL
  if (s.device == mx::Device::gpu) return mx::contiguous(x, false, s);
#endif
  return x;
}

std::vector<mx::array> with_extras(std::vector<mx::array> inputs, const AttentionExtras& e,
                                   const mx::Stream& s) {
  auto add = [&](const std::optional<mx::array>& x, bool contiguous) {
    if (x) inputs.push_back(contiguous ? mx::contiguous(*x, false, s) : *x);
  };
  add(e.mask, false);  // read through its (broadcast) strides
  add(e.alibi, true);
  add(e.sinks, true);
  add(e.block_mask, false);
  add(e.cu_seqlens_q, true);
  add(e.cu_seqlens_k, true);
  if (e.key_start.has_value() != e.key_len.has_value())
    throw std::invalid_argument("mlx_flash: key_start and key_len: give both (int32 [B]) or neither");
  if (e.key_start) {
    inputs.push_back(mx::contiguous(mx::astype(*e.key_start, mx::int32, s), false, s));
    inputs.push_back(mx::contiguous(mx::astype(*e.key_len, mx::int32, s), false, s));
  }
  return inputs;
}

// Fills the shape, parameters and optional inputs of the kernel arguments.
// `first_extra` is the input index where the optional arrays begin.
AttentionArgs make_args(const AttentionParams& p, const std::vector<mx::array>& in, size_t first_extra) {
  const auto &q = in[0], &k = in[1], &v = in[2];
  AttentionArgs a;
  a.B = p.batch;
  a.Hq = q.shape(1);
  a.Hkv = k.shape(1);
  a.Nq = q.shape(2);
  a.Nk = k.shape(2);
  a.Dqk = q.shape(3);
  a.Dv = v.shape(3);
  a.scale = p.scale;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.softcap = p.softcap;
  a.block_q = p.block_q;
  a.block_k = p.block_k;
  a.q = view4(q);
  a.k = view4(k);
  a.v = view4(v);
  size_t i = first_extra;
  if (p.has_mask) {
    const auto& m = in[i++];
    a.mask_kind = m.dtype() == mx::bool_ ? 1 : 2;
    if (a.mask_kind == 2) a.mask_dtype = kernel_dtype(m.dtype());
    a.mask = broadcast4(m);
  }
  if (p.has_alibi) a.alibi = in[i++].data<float>();
  if (p.has_sinks) a.sinks = in[i++].data<float>();
  if (p.has_block_mask) {
    const auto& bm = in[i++];
    a.block_mask = bm.data<bool>();
    a.block_mask_view = broadcast4(bm);
  }
  if (p.varlen) {
    a.cu_q = in[i++].data<int32_t>();
    a.cu_k = in[i++].data<int32_t>();
    // Packed rows share one "batch" row of the arrays.
    a.q.sb = a.k.sb = a.v.sb = 0;
  }
  if (p.has_key_range) {
    a.key_start = in[i++].data<int32_t>();
    a.key_len = in[i++].data<int32_t>();
  }
  return a;
}

// Key ranges are a per-batch notion (varlen sequences have their own bounds),
// and the primitive's Metal path (macOS builds) does not read them.
void check_key_range(const AttentionParams& p, const mx::Stream& s) {
  if (!p.has_key_range) return;
  if (p.varlen)
    throw std::invalid_argument(
        "mlx_flash: key_start/key_len with cu_seqlens: varlen sequences bound their keys with cu_seqlens_k");
#ifdef MLXF_METAL
  if (s.device == mx::Device::gpu)
    throw std::invalid_argument(
        "mlx_flash: key_start/key_len are not read by the C++ primitive's Metal path; "
        "mlx_flash.flash_attention takes them on the GPU (its Metal backend folds them into the mask)");
#else
  (void)s;
#endif
}

void allocate(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
}

[[noreturn]] void no_gpu_primitive() {
  throw std::runtime_error(
      "mlx_flash: the C++ attention primitive runs on the CPU here; GPU calls go through the "
      "mx.fast.metal_kernel / mx.fast.cuda_kernel wrappers (mlx_flash.backends), and the "
      "primitive's own Metal path exists only in macOS builds");
}

}  // namespace

void AttentionForward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  allocate(outputs);
  AttentionArgs a = make_args(p_, inputs, 3);
  ForwardOutputs o{outputs[0].data<void>(), outputs[1].data<float>()};
  mlxf::dispatch_cpu(stream(), inputs, outputs, [a, o] { mlxf::attention_forward(a, o); });
}

void AttentionBackward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  allocate(outputs);
  // Inputs: q, k, v, out, lse, dout, [dlse], extras...
  const size_t first_extra = has_dlse_ ? 7 : 6;
  AttentionArgs a = make_args(p_, inputs, first_extra);
  BackwardArgs g;
  g.out = view4(inputs[3]);
  g.lse = inputs[4].data<float>();
  g.dout = view4(inputs[5]);
  if (has_dlse_) g.dlse = inputs[6].data<float>();
  g.own_output = own_output_;
  if (p_.varlen) g.out.sb = g.dout.sb = 0;
  g.dq = outputs[0].data<void>();
  g.dk = outputs[1].data<void>();
  g.dv = outputs[2].data<void>();
  mlxf::dispatch_cpu(stream(), inputs, outputs, [a, g] { mlxf::attention_backward(a, g); });
}

#ifndef MLXF_METAL
void AttentionForward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu_primitive(); }
void AttentionBackward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu_primitive(); }
#endif

bool AttentionForward::is_equivalent(const mx::Primitive& other) const {
  return p_ == static_cast<const AttentionForward&>(other).p_;
}

bool AttentionBackward::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AttentionBackward&>(other);
  return p_ == o.p_ && has_dlse_ == o.has_dlse_ && own_output_ == o.own_output_;
}

std::vector<mx::array> AttentionForward::vjp(const std::vector<mx::array>& primals,
                                             const std::vector<mx::array>& cotangents,
                                             const std::vector<int>& argnums,
                                             const std::vector<mx::array>& outputs) {
  AttentionExtras e;
  size_t i = 3;
  if (p_.has_mask) e.mask = primals[i++];
  if (p_.has_alibi) e.alibi = primals[i++];
  if (p_.has_sinks) e.sinks = primals[i++];
  if (p_.has_block_mask) e.block_mask = primals[i++];
  if (p_.varlen) {
    e.cu_seqlens_q = primals[i++];
    e.cu_seqlens_k = primals[i++];
  }
  if (p_.has_key_range) {
    e.key_start = primals[i++];
    e.key_len = primals[i++];
  }
  auto grads = attention_backward(primals[0], primals[1], primals[2], outputs[0], outputs[1],
                                  cotangents[0], cotangents[1], e, p_, stream());
  std::vector<mx::array> result;
  for (int a : argnums) {
    if (a < 3) {
      result.push_back(grads[a]);
    } else {
      // Gradients of sinks and additive masks are defined in the Python layer.
      result.push_back(mx::zeros_like(primals[a], stream()));
    }
  }
  return result;
}

std::vector<mx::array> attention_forward(const mx::array& q, const mx::array& k, const mx::array& v,
                                         const AttentionExtras& extras, AttentionParams p,
                                         mx::StreamOrDevice sd) {
  auto s = mx::to_stream(sd);
  p.has_mask = extras.mask.has_value();
  p.has_alibi = extras.alibi.has_value();
  p.has_sinks = extras.sinks.has_value();
  p.has_block_mask = extras.block_mask.has_value();
  p.varlen = extras.cu_seqlens_q.has_value();
  p.has_key_range = extras.key_start.has_value();
  check_key_range(p, s);
  auto inputs = with_extras({dense_for_gpu(q, s), dense_for_gpu(k, s), dense_for_gpu(v, s)}, extras, s);
  mx::Shape out_shape = {q.shape(0), q.shape(1), q.shape(2), v.shape(3)};
  mx::Shape lse_shape = {q.shape(0), q.shape(1), q.shape(2)};
  return mx::array::make_arrays({out_shape, lse_shape}, {q.dtype(), mx::float32},
                                std::make_shared<AttentionForward>(s, p), inputs);
}

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k, const mx::array& v,
                                          const mx::array& out, const mx::array& lse,
                                          const mx::array& dout, const std::optional<mx::array>& dlse,
                                          const AttentionExtras& extras, AttentionParams p,
                                          mx::StreamOrDevice sd, bool own_output) {
  auto s = mx::to_stream(sd);
  p.has_mask = extras.mask.has_value();
  p.has_alibi = extras.alibi.has_value();
  p.has_sinks = extras.sinks.has_value();
  p.has_block_mask = extras.block_mask.has_value();
  p.varlen = extras.cu_seqlens_q.has_value();
  p.has_key_range = extras.key_start.has_value();
  check_key_range(p, s);
  std::vector<mx::array> inputs = {
      dense_for_gpu(q, s), dense_for_gpu(k, s), dense_for_gpu(v, s), dense_for_gpu(out, s),
      mx::contiguous(mx::astype(lse, mx::float32, s), false, s), dense_for_gpu(mx::astype(dout, q.dtype(), s), s)};
  if (dlse) inputs.push_back(mx::contiguous(mx::astype(*dlse, mx::float32, s), false, s));
  inputs = with_extras(std::move(inputs), extras, s);
  return mx::array::make_arrays({q.shape(), k.shape(), v.shape()}, {q.dtype(), q.dtype(), q.dtype()},
                                std::make_shared<AttentionBackward>(s, p, dlse.has_value(), own_output), inputs);
}

}  // namespace mlxf
