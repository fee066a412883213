// Prints csrc/metal_abi.h as JSON for tests/test_metal_host_abi.py: every
// kernel name the C++ primitive can build and every table it binds by.
#include <cstdio>
#include <string>
#include <string_view>

#include "metal_abi.h"

namespace abi = mlxf::metal_abi;

static void named(const char* key, std::span<const abi::Named> table, bool last = false) {
  std::printf("\"%s\": {", key);
  for (size_t i = 0; i < table.size(); ++i) {
    std::printf("%s\"%.*s\": %d", i ? ", " : "", int(table[i].name.size()), table[i].name.data(), table[i].value);
  }
  std::printf("}%s\n", last ? "" : ",");
}

int main() {
  std::printf("{\"features_constant\": %d, \"simdgroups\": %d,\n", abi::kFeaturesConstant, abi::kSimdgroups);
  named("features", abi::kFeatures);
  named("int_params", abi::kIntParams);
  named("float_params", abi::kFloatParams);
  std::printf("\"kernels\": [\n");
  bool first_kernel = true;
  for (const abi::Kernel* k : abi::kKernels) {
    std::printf("%s{\"stem\": \"%.*s\", \"buffers\": [", first_kernel ? "" : ",\n", int(k->stem.size()), k->stem.data());
    first_kernel = false;
    for (size_t i = 0; i < k->buffers.size(); ++i) {
      std::printf("%s\"%.*s\"", i ? ", " : "", int(k->buffers[i].size()), k->buffers[i].data());
    }
    std::printf("], \"names\": [");
    bool first = true;
    for (std::string_view dtype : abi::kDtypes) {
      for (int d : abi::kHeadDims) {
        for (std::string_view mask : abi::kMaskDtypes) {
          const std::string name = abi::kernel_name(*k, dtype, d, mask);
          std::printf("%s\"%s\"", first ? "" : ", ", name.c_str());
          first = false;
          if (!k->has_mask_dtype) break;  // the mask dtype is not part of this name
        }
      }
    }
    std::printf("]}");
  }
  std::printf("\n]}\n");
  return 0;
}
