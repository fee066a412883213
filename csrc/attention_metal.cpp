// eval_gpu of the attention primitives on Apple GPUs: the kernels of
// metal_src/attention.metal, prebuilt into mlx_flash.metallib (installed next
// to the _ext module). Compiled only on macOS with the metallib (MLXF_METAL).
//
// It mirrors mlx_flash/backends/metal.py: same kernels, same parameter
// arrays (mlxf::IntParam / FloatParam in attention_common.h), same buffer
// order. Differences: the feature bits are a function constant, the
// metallib covers Dqk == Dv in {32, 64, 80, 96, 128, 256}, and there is no
// split-key decode variant.
#ifdef MLXF_METAL

#include <dlfcn.h>

#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_primitive.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

namespace mlxf {

namespace {

// Keep in sync with mlxf::Feature (metal_src/attention_common.h).
enum : int {
  FEAT_MASK_BOOL = 1, FEAT_MASK_ADD = 2, FEAT_WINDOW = 4, FEAT_SOFTCAP = 8,
  FEAT_ALIBI = 16, FEAT_SINKS = 32, FEAT_BLOCK_MASK = 64, FEAT_VARLEN = 128,
};
constexpr int kSimdgroups = 4;  // 8 rows each: 32 queries / keys per threadgroup

std::string binary_dir() {
  static std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("mlx_flash: cannot locate the _ext binary to find mlx_flash.metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

std::string type_name(mx::Dtype t) {
  if (t == mx::float32) return "float32";
  if (t == mx::float16) return "float16";
  if (t == mx::bfloat16) return "bfloat16";
  if (t == mx::bool_) return "bool";
  throw std::invalid_argument("mlx_flash: unsupported dtype for the Metal attention kernels");
}

void check_head_dims(const mx::array& q, const mx::array& v) {
  const int dqk = q.shape(3), dv = v.shape(3);
  const bool prebuilt = dqk == dv && (dqk == 32 || dqk == 64 || dqk == 80 || dqk == 96 || dqk == 128 || dqk == 256);
  if (!prebuilt) {
    std::ostringstream msg;
    msg << "mlx_flash: the prebuilt Metal attention kernels cover head dims Dqk == Dv in "
        << "{32, 64, 80, 96, 128, 256}; got Dqk=" << dqk << ", Dv=" << dv
        << " (mlx_flash.flash_attention's JIT path covers every head dim)";
    throw std::invalid_argument(msg.str());
  }
}

// Inputs of the primitive after (q, k, v[, out, lse, dout, dlse]), by name.
struct Extras {
  const mx::array *mask = nullptr, *alibi = nullptr, *sinks = nullptr, *block_mask = nullptr;
  const mx::array *cu_q = nullptr, *cu_k = nullptr;
};

Extras extras(const AttentionParams& p, const std::vector<mx::array>& in, size_t i) {
  Extras e;
  if (p.has_mask) e.mask = &in[i++];
  if (p.has_alibi) e.alibi = &in[i++];
  if (p.has_sinks) e.sinks = &in[i++];
  if (p.has_block_mask) e.block_mask = &in[i++];
  if (p.varlen) {
    e.cu_q = &in[i++];
    e.cu_k = &in[i++];
  }
  return e;
}

int features(const AttentionParams& p, const Extras& e) {
  int f = 0;
  if (e.mask) f |= e.mask->dtype() == mx::bool_ ? FEAT_MASK_BOOL : FEAT_MASK_ADD;
  if (p.window_left >= 0 || p.window_right >= 0) f |= FEAT_WINDOW;
  if (p.softcap > 0.f) f |= FEAT_SOFTCAP;
  if (e.alibi) f |= FEAT_ALIBI;
  if (e.sinks) f |= FEAT_SINKS;
  if (e.block_mask) f |= FEAT_BLOCK_MASK;
  if (p.varlen) f |= FEAT_VARLEN;
  return f;
}

// Strides of a rank-4 broadcastable array as the kernels read them (0 on size-1 dims).
void push_strides(std::vector<int>& v, const mx::array* a) {
  for (int d = 0; d < 4; ++d) {
    v.push_back(a && a->shape(d) != 1 ? static_cast<int>(a->strides()[d]) : 0);
  }
}

// mlxf::IntParam layout.
std::vector<int> int_params(const AttentionParams& p, const mx::array& q, const mx::array& k, const Extras& e) {
  std::vector<int> v = {p.batch, q.shape(1), k.shape(1), q.shape(2), k.shape(2),
                        p.window_left, p.window_right, p.block_q, p.block_k};
  push_strides(v, e.mask);
  push_strides(v, e.block_mask);
  v.push_back(0);  // tiles per split (no decode split here)
  v.push_back(1);  // splits
  return v;
}

// Kernels index q/k/v/out rows with row-major offsets; other layouts are copied.
// `copies` must not reallocate while the returned references live (reserve).
const mx::array& row_contiguous(const mx::array& x, std::vector<mx::array>& copies, const mx::Stream& s) {
  if (x.flags().row_contiguous) return x;
  copies.push_back(mx::array(x.shape(), x.dtype(), nullptr, {}));
  mx::copy_gpu(x, copies.back(), mx::CopyType::General, s);
  return copies.back();
}

// Binds the optional inputs at `idx`..idx+5; absent ones get a zero placeholder
// the kernel never reads. Masks are read through their own strides.
void bind_extras(mx::metal::CommandEncoder& enc, const Extras& e, int idx, bool with_sinks) {
  static const std::vector<int> zeros(8, 0);
  auto bind = [&](const mx::array* a, int at) {
    if (a) {
      enc.set_input_array(*a, at);
    } else {
      enc.set_vector_bytes(zeros, at);
    }
  };
  bind(e.mask, idx++);
  bind(e.alibi, idx++);
  if (with_sinks) bind(e.sinks, idx++);
  bind(e.block_mask, idx++);
  bind(e.cu_q, idx++);
  bind(e.cu_k, idx++);
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const std::string& name, int feat) {
  auto* lib = d.get_library("mlx_flash", binary_dir());
  mx::metal::MTLFCList consts = {{&feat, MTL::DataType::DataTypeInt, 0}};
  return d.get_kernel(name, lib, name + "_feat" + std::to_string(feat), consts);
}

std::string mask_name(const Extras& e) { return e.mask ? type_name(e.mask->dtype()) : "bool"; }

void allocate(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
}

int blocks(int n, int per) { return (n + per - 1) / per; }

}  // namespace

void AttentionForward::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  std::vector<mx::array> copies;
  copies.reserve(12);  // row_contiguous hands out references into it
  const auto& q = row_contiguous(inputs[0], copies, s);
  const auto& k = row_contiguous(inputs[1], copies, s);
  const auto& v = row_contiguous(inputs[2], copies, s);
  check_head_dims(q, v);
  const Extras e = extras(p_, inputs, 3);
  const int feat = features(p_, e);
  allocate(outputs);

  const std::string name = "mlxf_attention_fwd_" + type_name(q.dtype()) + "_" + std::to_string(q.shape(3)) +
                           "_" + mask_name(e);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel(d, name, feat));
  enc.set_input_array(q, 0);
  enc.set_input_array(k, 1);
  enc.set_input_array(v, 2);
  bind_extras(enc, e, 3, /*with_sinks=*/true);
  enc.set_vector_bytes(int_params(p_, q, k, e), 9);
  enc.set_vector_bytes(std::vector<float>{p_.scale, p_.softcap}, 10);
  enc.set_output_array(outputs[0], 11);
  enc.set_output_array(outputs[1], 12);
  // Varlen: the longest sequence is at most the packed length; extra
  // threadgroups of shorter sequences return at once.
  const int n_blocks = blocks(q.shape(2), 8 * kSimdgroups);
  enc.dispatch_threadgroups(MTL::Size(n_blocks, p_.batch * q.shape(1), 1), MTL::Size(32 * kSimdgroups, 1, 1));
  enc.add_temporaries(std::move(copies));
}

void AttentionBackward::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  std::vector<mx::array> copies;
  copies.reserve(12);  // row_contiguous hands out references into it
  // Inputs: q, k, v, out, lse, dout, [dlse], extras...
  const auto& q = row_contiguous(inputs[0], copies, s);
  const auto& k = row_contiguous(inputs[1], copies, s);
  const auto& v = row_contiguous(inputs[2], copies, s);
  const auto& out = row_contiguous(inputs[3], copies, s);
  const auto& lse = row_contiguous(inputs[4], copies, s);
  const auto& dout = row_contiguous(inputs[5], copies, s);
  check_head_dims(q, v);
  const Extras e = extras(p_, inputs, has_dlse_ ? 7 : 6);
  const int feat = features(p_, e) & ~FEAT_SINKS;  // the saved lse holds the sinks
  allocate(outputs);
  const std::string dims = type_name(q.dtype()) + "_" + std::to_string(q.shape(3));
  const std::vector<int> iparams = int_params(p_, q, k, e);
  const std::vector<float> fparams = {p_.scale, p_.softcap};
  auto& enc = mx::metal::get_command_encoder(s);

  // delta = rowsum(dO * O) - dlse
  mx::array delta(lse.shape(), mx::float32, nullptr, {});
  delta.set_data(mx::allocator::malloc(delta.nbytes()));
  copies.push_back(delta);
  // Function constant: bit 0 = a dlse is given, the feature bits above it.
  enc.set_compute_pipeline_state(kernel(d, "mlxf_attention_bwd_delta_" + dims, (feat << 1) | (has_dlse_ ? 1 : 0)));
  enc.set_input_array(out, 0);
  enc.set_input_array(dout, 1);
  if (has_dlse_) {
    enc.set_input_array(row_contiguous(inputs[6], copies, s), 2);
  } else {
    enc.set_vector_bytes(std::vector<float>(8, 0.f), 2);
  }
  enc.set_vector_bytes(iparams, 3);
  enc.set_vector_bytes(fparams, 4);
  enc.set_output_array(delta, 5);
  enc.dispatch_threadgroups(MTL::Size(blocks(lse.size(), 8 * kSimdgroups), 1, 1), MTL::Size(32 * kSimdgroups, 1, 1));

  auto bind_grad_inputs = [&] {
    enc.set_input_array(q, 0);
    enc.set_input_array(k, 1);
    enc.set_input_array(v, 2);
    enc.set_input_array(dout, 3);
    enc.set_input_array(lse, 4);
    enc.set_input_array(delta, 5);
    bind_extras(enc, e, 6, /*with_sinks=*/false);
    enc.set_vector_bytes(iparams, 11);
    enc.set_vector_bytes(fparams, 12);
  };
  const int rows_per_group = 8 * kSimdgroups;

  enc.set_compute_pipeline_state(kernel(d, "mlxf_attention_bwd_dkdv_" + dims + "_" + mask_name(e), feat));
  bind_grad_inputs();
  enc.set_output_array(outputs[1], 13);
  enc.set_output_array(outputs[2], 14);
  enc.dispatch_threadgroups(MTL::Size(blocks(k.shape(2), rows_per_group), p_.batch * k.shape(1), 1),
                            MTL::Size(32 * kSimdgroups, 1, 1));

  enc.set_compute_pipeline_state(kernel(d, "mlxf_attention_bwd_dq_" + dims + "_" + mask_name(e), feat));
  bind_grad_inputs();
  enc.set_output_array(outputs[0], 13);
  enc.dispatch_threadgroups(MTL::Size(blocks(q.shape(2), rows_per_group), p_.batch * q.shape(1), 1),
                            MTL::Size(32 * kSimdgroups, 1, 1));
  enc.add_temporaries(std::move(copies));
}

}  // namespace mlxf

#endif  // MLXF_METAL
