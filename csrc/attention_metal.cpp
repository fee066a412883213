// eval_gpu of the attention primitives on Apple GPUs: the kernels of
// metal_src/attention.metal, prebuilt into mlx_flash.metallib (installed next
// to the _ext module). Compiled on every macOS build with MLX's Metal
// backend (MLXF_METAL); the metallib itself needs Xcode's Metal Toolchain and
// may be absent (MLXF_METALLIB=0), in which case a call says so.
//
// It mirrors mlx_flash/backends/metal.py: same kernels, same parameter
// arrays, same buffer order; metal_abi.h holds that contract and
// tests/test_metal_host_abi.py checks it against the Metal sources.
// Differences: the feature bits are a function constant, the metallib covers
// Dqk == Dv in metal_abi::kHeadDims, and there is no split-key decode variant.
//
// Only symbols libmlx exports may be used here (MLX builds it with hidden
// visibility; tests/test_macos_crosscheck.py resolves every one): layout
// copies are made when the graph is built (attention_primitive.cpp), not
// with MLX's internal copy routines.
#ifdef MLXF_METAL

#include <dlfcn.h>

#include <filesystem>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "attention_primitive.h"
#include "metal_abi.h"
#include "mlx/backend/metal/device.h"

#ifndef MLXF_METALLIB
#define MLXF_METALLIB 0
#endif

namespace mlxf {

namespace {

namespace abi = metal_abi;

consteval int feature(std::string_view name) { return abi::value_of(abi::kFeatures, name); }
constexpr int FEAT_MASK_BOOL = feature("FEAT_MASK_BOOL"), FEAT_MASK_ADD = feature("FEAT_MASK_ADD"),
              FEAT_WINDOW = feature("FEAT_WINDOW"), FEAT_SOFTCAP = feature("FEAT_SOFTCAP"),
              FEAT_ALIBI = feature("FEAT_ALIBI"), FEAT_SINKS = feature("FEAT_SINKS"),
              FEAT_BLOCK_MASK = feature("FEAT_BLOCK_MASK"), FEAT_VARLEN = feature("FEAT_VARLEN");
constexpr int kThreads = 32 * abi::kSimdgroups;
constexpr int kRowsPerGroup = 8 * abi::kSimdgroups;  // query or key rows per threadgroup

std::filesystem::path binary_dir() {
  static const std::filesystem::path dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("mlx_flash: cannot locate the _ext binary to find mlx_flash.metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path();
  }();
  return dir;
}

// The prebuilt kernels, or an error that names what is missing and how to get it.
MTL::Library* metallib(mx::metal::Device& d) {
  static const auto path = binary_dir() / "mlx_flash.metallib";
  static const bool present = MLXF_METALLIB && std::filesystem::exists(path);  // checked once
  if (!present) {
    std::ostringstream msg;
    msg << "mlx_flash: the C++ attention primitive on the GPU needs mlx_flash.metallib, ";
    if (!MLXF_METALLIB) {
      msg << "which this build did not make: it found no working Metal compiler (`xcrun -sdk macosx metal`). ";
    } else {
      msg << "which is missing from " << path.parent_path().string() << ". ";
    }
    msg << "Install Xcode's Metal Toolchain (`xcodebuild -downloadComponent MetalToolchain`) and reinstall "
        << "mlx_flash. mlx_flash.flash_attention does not need it: on the GPU it runs the same kernels "
        << "through mx.fast.metal_kernel.";
    throw std::runtime_error(msg.str());
  }
  return d.get_library("mlx_flash", path.string());
}

std::string_view type_name(mx::Dtype t) {
  if (t == mx::float32) return "float32";
  if (t == mx::float16) return "float16";
  if (t == mx::bfloat16) return "bfloat16";
  if (t == mx::bool_) return "bool";
  throw std::invalid_argument("mlx_flash: unsupported dtype for the Metal attention kernels");
}

void check_head_dims(const mx::array& q, const mx::array& v) {
  const int dqk = q.shape(3), dv = v.shape(3);
  bool prebuilt = false;
  for (int d : abi::kHeadDims) prebuilt = prebuilt || (dqk == d && dv == d);
  if (!prebuilt) {
    std::ostringstream msg;
    msg << "mlx_flash: the prebuilt Metal attention kernels cover head dims Dqk == Dv in {";
    for (size_t i = 0; i < std::size(abi::kHeadDims); ++i) msg << (i ? ", " : "") << abi::kHeadDims[i];
    msg << "}; got Dqk=" << dqk << ", Dv=" << dv
        << " (mlx_flash.flash_attention's JIT path covers every head dim)";
    throw std::invalid_argument(msg.str());
  }
}

// attention_forward / attention_backward make these dense in the graph.
void require_row_contiguous(const mx::array& a, const char* name) {
  if (!a.flags().row_contiguous) {
    throw std::logic_error(std::string("mlx_flash: internal error: ") + name +
                           " reached the Metal kernels without a row-contiguous layout");
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

consteval int iparam(std::string_view name) { return abi::value_of(abi::kIntParams, name); }
consteval int fparam(std::string_view name) { return abi::value_of(abi::kFloatParams, name); }

// Strides of a rank-4 broadcastable array as the kernels read them (0 on size-1 dims).
void set_strides(std::vector<int>& v, int at, const mx::array* a) {
  for (int d = 0; d < 4; ++d) {
    v[at + d] = a && a->shape(d) != 1 ? static_cast<int>(a->strides()[d]) : 0;
  }
}

// The iparams buffer (mlxf::IntParam in attention_common.h).
std::vector<int> int_params(const AttentionParams& p, const mx::array& q, const mx::array& k, const Extras& e) {
  std::vector<int> v(iparam("P_COUNT"), 0);
  v[iparam("P_BATCH")] = p.batch;
  v[iparam("P_HEADS_Q")] = q.shape(1);
  v[iparam("P_HEADS_KV")] = k.shape(1);
  v[iparam("P_SEQLEN_Q")] = q.shape(2);
  v[iparam("P_SEQLEN_K")] = k.shape(2);
  v[iparam("P_WINDOW_LEFT")] = p.window_left;
  v[iparam("P_WINDOW_RIGHT")] = p.window_right;
  v[iparam("P_BLOCK_Q")] = p.block_q;
  v[iparam("P_BLOCK_K")] = p.block_k;
  set_strides(v, iparam("P_MASK_STRIDE"), e.mask);
  set_strides(v, iparam("P_BMASK_STRIDE"), e.block_mask);
  v[iparam("P_TILES_PER_SPLIT")] = 0;  // no decode split here
  v[iparam("P_NUM_SPLITS")] = 1;
  return v;
}

// The fparams buffer (mlxf::FloatParam).
std::vector<float> float_params(const AttentionParams& p) {
  std::vector<float> v(fparam("F_COUNT"), 0.f);
  v[fparam("F_SCALE")] = p.scale;
  v[fparam("F_SOFTCAP")] = p.softcap;
  return v;
}

// Binds an input; absent or empty ones get a placeholder the kernel never reads
// (Metal has no zero-length buffers).
void bind_input(mx::metal::CommandEncoder& enc, const mx::array* a, int at) {
  static const std::vector<int> placeholder(8, 0);
  if (a && a->size() > 0) {
    enc.set_input_array(*a, at);
  } else {
    enc.set_vector_bytes(placeholder, at);
  }
}

// Index of an input both gradient kernels read; fails to compile if they disagree.
consteval int grad_buffer(std::string_view name) {
  const int at = abi::buffer(abi::kDkdv, name);
  if (at != abi::buffer(abi::kDq, name)) throw "the dK/dV and dQ kernels bind this input at different indices";
  return at;
}

MTL::ComputePipelineState* pipeline(mx::metal::Device& d, const std::string& name, int constant) {
  mx::metal::MTLFCList consts = {{&constant, MTL::DataType::DataTypeInt, abi::kFeaturesConstant}};
  return d.get_kernel(name, metallib(d), name + "_fc" + std::to_string(constant), consts);
}

std::string_view mask_name(const Extras& e) { return e.mask ? type_name(e.mask->dtype()) : "bool"; }

void allocate(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
}

int blocks(size_t n, int per) { return static_cast<int>((n + per - 1) / per); }

}  // namespace

void AttentionForward::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  constexpr const auto& K = abi::kForward;
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  check_head_dims(q, v);
  allocate(outputs);
  // No query rows: nothing to compute, and Metal cannot dispatch an empty grid.
  // (No keys is not empty: the kernel writes out = 0 and lse = -inf or the sink.)
  if (outputs[1].size() == 0) return;
  require_row_contiguous(q, "q");
  require_row_contiguous(k, "k");
  require_row_contiguous(v, "v");
  const Extras e = extras(p_, inputs, 3);
  const int feat = features(p_, e);
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(
      pipeline(d, abi::kernel_name(K, type_name(q.dtype()), q.shape(3), mask_name(e)), feat));
  bind_input(enc, &q, abi::buffer(K, "q"));
  bind_input(enc, &k, abi::buffer(K, "k"));
  bind_input(enc, &v, abi::buffer(K, "v"));
  bind_input(enc, e.mask, abi::buffer(K, "mask"));
  bind_input(enc, e.alibi, abi::buffer(K, "alibi"));
  bind_input(enc, e.sinks, abi::buffer(K, "sinks"));
  bind_input(enc, e.block_mask, abi::buffer(K, "block_mask"));
  bind_input(enc, e.cu_q, abi::buffer(K, "cu_q"));
  bind_input(enc, e.cu_k, abi::buffer(K, "cu_k"));
  // Per-batch key ranges are not a primitive input yet (FEAT_KEY_RANGE stays off): placeholders.
  bind_input(enc, nullptr, abi::buffer(K, "key_start"));
  bind_input(enc, nullptr, abi::buffer(K, "key_len"));
  enc.set_vector_bytes(int_params(p_, q, k, e), abi::buffer(K, "iparams"));
  enc.set_vector_bytes(float_params(p_), abi::buffer(K, "fparams"));
  enc.set_output_array(outputs[0], abi::buffer(K, "out"));
  enc.set_output_array(outputs[1], abi::buffer(K, "lse"));
  // Varlen: the longest sequence is at most the packed length; extra
  // threadgroups of shorter sequences return at once.
  enc.dispatch_threadgroups(MTL::Size(blocks(q.shape(2), kRowsPerGroup), p_.batch * q.shape(1), 1),
                            MTL::Size(kThreads, 1, 1));
}

void AttentionBackward::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // Inputs: q, k, v, out, lse, dout, [dlse], extras...
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  const auto &out = inputs[3], &lse = inputs[4], &dout = inputs[5];
  const mx::array* dlse = has_dlse_ ? &inputs[6] : nullptr;
  check_head_dims(q, v);
  allocate(outputs);
  auto &dq = outputs[0], &dk = outputs[1], &dv = outputs[2];
  // Metal cannot dispatch an empty grid: each kernel below runs only when its
  // output has elements. No query rows still needs dK = dV = 0 (the dK/dV
  // kernel writes them); no keys still needs dQ = 0.
  if (dq.size() == 0 && dk.size() == 0) return;
  const char* names[] = {"q", "k", "v", "out", "lse", "dout"};
  for (int i = 0; i < 6; ++i) require_row_contiguous(inputs[i], names[i]);
  if (dlse) require_row_contiguous(*dlse, "dlse");
  const Extras e = extras(p_, inputs, has_dlse_ ? 7 : 6);
  const int feat = features(p_, e) & ~FEAT_SINKS;  // the saved lse holds the sinks
  const std::string_view dtype = type_name(q.dtype());
  const int head_dim = q.shape(3);
  const std::vector<int> iparams = int_params(p_, q, k, e);
  const std::vector<float> fparams = float_params(p_);
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);

  // delta = rowsum(dO * O) - dlse, one float per query row.
  mx::array delta(lse.shape(), mx::float32, nullptr, {});
  delta.set_data(mx::allocator::malloc(delta.nbytes()));
  enc.add_temporary(delta);
  if (delta.size() > 0) {
    constexpr const auto& K = abi::kDelta;
    // Function constant: bit 0 = a dlse is given, the feature bits above it.
    enc.set_compute_pipeline_state(
        pipeline(d, abi::kernel_name(K, dtype, head_dim), (feat << 1) | (dlse ? 1 : 0)));
    bind_input(enc, &out, abi::buffer(K, "out"));
    bind_input(enc, &dout, abi::buffer(K, "dout"));
    bind_input(enc, dlse, abi::buffer(K, "dlse"));
    enc.set_vector_bytes(iparams, abi::buffer(K, "iparams"));
    enc.set_vector_bytes(fparams, abi::buffer(K, "fparams"));
    enc.set_output_array(delta, abi::buffer(K, "delta"));
    enc.dispatch_threadgroups(MTL::Size(blocks(delta.size(), kRowsPerGroup), 1, 1), MTL::Size(kThreads, 1, 1));
  }

  // dK/dV and dQ read the same inputs at the same indices (grad_buffer checks).
  auto bind_grad_inputs = [&] {
    bind_input(enc, &q, grad_buffer("q"));
    bind_input(enc, &k, grad_buffer("k"));
    bind_input(enc, &v, grad_buffer("v"));
    bind_input(enc, &dout, grad_buffer("dout"));
    bind_input(enc, &lse, grad_buffer("lse"));
    bind_input(enc, &delta, grad_buffer("delta"));
    bind_input(enc, e.mask, grad_buffer("mask"));
    bind_input(enc, e.alibi, grad_buffer("alibi"));
    bind_input(enc, e.block_mask, grad_buffer("block_mask"));
    bind_input(enc, e.cu_q, grad_buffer("cu_q"));
    bind_input(enc, e.cu_k, grad_buffer("cu_k"));
    bind_input(enc, nullptr, grad_buffer("key_start"));
    bind_input(enc, nullptr, grad_buffer("key_len"));
    enc.set_vector_bytes(iparams, grad_buffer("iparams"));
    enc.set_vector_bytes(fparams, grad_buffer("fparams"));
  };

  if (dk.size() > 0) {
    constexpr const auto& K = abi::kDkdv;
    enc.set_compute_pipeline_state(pipeline(d, abi::kernel_name(K, dtype, head_dim, mask_name(e)), feat));
    bind_grad_inputs();
    enc.set_output_array(dk, abi::buffer(K, "dk"));
    enc.set_output_array(dv, abi::buffer(K, "dv"));
    enc.dispatch_threadgroups(MTL::Size(blocks(k.shape(2), kRowsPerGroup), p_.batch * k.shape(1), 1),
                              MTL::Size(kThreads, 1, 1));
  }
  if (dq.size() > 0) {
    constexpr const auto& K = abi::kDq;
    enc.set_compute_pipeline_state(pipeline(d, abi::kernel_name(K, dtype, head_dim, mask_name(e)), feat));
    bind_grad_inputs();
    enc.set_output_array(dq, abi::buffer(K, "dq"));
    enc.dispatch_threadgroups(MTL::Size(blocks(q.shape(2), kRowsPerGroup), p_.batch * q.shape(1), 1),
                              MTL::Size(kThreads, 1, 1));
  }
}

}  // namespace mlxf

#endif  // MLXF_METAL
