// The host side of the prebuilt Metal attention kernels: what
// csrc/attention_metal.cpp must agree on with metal_src/attention.metal and
// attention_common.h (kernel names, buffer indices, the function constant,
// feature bits, parameter layout).
//
// Plain C++ with no MLX or Metal includes, so that a Linux test
// (tests/test_metal_host_abi.py) compiles it, prints every table and checks
// it against what the Metal sources say; the C++ looks indices up here by
// the Metal parameter's name, at compile time, so a typo does not compile.
#pragma once

#include <span>
#include <string>
#include <string_view>

namespace mlxf::metal_abi {

struct Named {
  std::string_view name;
  int value;
};

// Function constant index of the feature bits (`mlxf_features`).
inline constexpr int kFeaturesConstant = 0;

// Simdgroups per threadgroup the prebuilt kernels are instantiated with.
inline constexpr int kSimdgroups = 4;

// Head dims prebuilt into the metallib (Dqk == Dv); other pairs go through
// the Python op's JIT path.
inline constexpr int kHeadDims[] = {32, 64, 80, 96, 128, 256};
// Dtype names as they appear in kernel names, for q/k/v and for the mask.
inline constexpr std::string_view kDtypes[] = {"float32", "float16", "bfloat16"};
inline constexpr std::string_view kMaskDtypes[] = {"bool", "float32", "float16", "bfloat16"};

// mlxf::Feature bits the primitive uses (the decode-only bits are JIT-only).
inline constexpr Named kFeatures[] = {
    {"FEAT_MASK_BOOL", 1}, {"FEAT_MASK_ADD", 2}, {"FEAT_WINDOW", 4},      {"FEAT_SOFTCAP", 8},
    {"FEAT_ALIBI", 16},    {"FEAT_SINKS", 32},   {"FEAT_BLOCK_MASK", 64}, {"FEAT_VARLEN", 128},
};

// mlxf::IntParam / mlxf::FloatParam: indices into the iparams / fparams buffers.
inline constexpr Named kIntParams[] = {
    {"P_BATCH", 0},         {"P_HEADS_Q", 1},       {"P_HEADS_KV", 2},   {"P_SEQLEN_Q", 3},
    {"P_SEQLEN_K", 4},      {"P_WINDOW_LEFT", 5},   {"P_WINDOW_RIGHT", 6}, {"P_BLOCK_Q", 7},
    {"P_BLOCK_K", 8},       {"P_MASK_STRIDE", 9},   {"P_BMASK_STRIDE", 13}, {"P_TILES_PER_SPLIT", 17},
    {"P_NUM_SPLITS", 18},   {"P_COUNT", 19},
};
inline constexpr Named kFloatParams[] = {{"F_SCALE", 0}, {"F_SOFTCAP", 1}, {"F_COUNT", 2}};

// Buffers of each kernel, in [[buffer(i)]] order, named as the kernel's parameters.
inline constexpr std::string_view kForwardBuffers[] = {
    "q",    "k",         "v",       "mask",    "alibi",   "sinks", "block_mask", "cu_q",
    "cu_k", "key_start", "key_len", "iparams", "fparams", "out",   "lse"};
inline constexpr std::string_view kDeltaBuffers[] = {"out", "dout", "dlse", "iparams", "fparams", "delta"};
inline constexpr std::string_view kDkdvBuffers[] = {
    "q",    "k",         "v",       "dout",    "lse",     "delta", "mask", "alibi", "block_mask",
    "cu_q", "cu_k",      "key_start", "key_len", "iparams", "fparams", "dk", "dv"};
inline constexpr std::string_view kDqBuffers[] = {
    "q",    "k",         "v",       "dout",    "lse",     "delta", "mask", "alibi", "block_mask",
    "cu_q", "cu_k",      "key_start", "key_len", "iparams", "fparams", "dq"};

// A kernel the primitive calls: its name stem, whether its name ends in the
// mask dtype, and its buffer table.
struct Kernel {
  std::string_view stem;
  bool has_mask_dtype;
  std::span<const std::string_view> buffers;
};
inline constexpr Kernel kForward{"fwd", true, kForwardBuffers};
inline constexpr Kernel kDelta{"bwd_delta", false, kDeltaBuffers};
inline constexpr Kernel kDkdv{"bwd_dkdv", true, kDkdvBuffers};
inline constexpr Kernel kDq{"bwd_dq", true, kDqBuffers};
inline constexpr const Kernel* kKernels[] = {&kForward, &kDelta, &kDkdv, &kDq};

// [[buffer]] index of `kernel`'s parameter `name`; consteval, so an unknown
// name fails to compile.
consteval int buffer(const Kernel& kernel, std::string_view name) {
  for (size_t i = 0; i < kernel.buffers.size(); ++i) {
    if (kernel.buffers[i] == name) return static_cast<int>(i);
  }
  throw "metal_abi::buffer: the kernel has no parameter of that name";
}

consteval int value_of(std::span<const Named> table, std::string_view name) {
  for (const auto& n : table) {
    if (n.name == name) return n.value;
  }
  throw "metal_abi::value_of: no entry of that name";
}

// Kernel names, mlxf_attention_<stem>_<dtype>_<D>[_<mask dtype>], as
// attention.metal's [[host_name]]s spell them.
inline std::string kernel_name(const Kernel& kernel, std::string_view dtype, int head_dim,
                               std::string_view mask_dtype = {}) {
  std::string name = "mlxf_attention_";
  name.append(kernel.stem).append("_").append(dtype).append("_").append(std::to_string(head_dim));
  if (kernel.has_mask_dtype) name.append("_").append(mask_dtype);
  return name;
}

}  // namespace mlxf::metal_abi
