// Python bindings of the C++ primitives (module mlx_flash._ext).
//
// NB_DOMAIN mlx (CMakeLists.txt) shares MLX's nanobind type registry, so
// mx.array and mx.Stream cross the boundary as themselves. The Python layer
// (mlx_flash/backends/cpu.py) validates arguments before calling in.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_primitive.h"
#include "cpu_kernels.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace mlxf {
void register_matmul(nb::module_& m);  // matmul_primitive.cpp
void register_quant_attention(nb::module_& m);  // attention_quant_primitive.cpp
}

namespace {

mlxf::AttentionParams params(int batch, float scale, int window_left, int window_right, float softcap,
                             int block_q, int block_k) {
  mlxf::AttentionParams p;
  p.batch = batch;
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = softcap;
  p.block_q = block_q;
  p.block_k = block_k;
  return p;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "mlx_flash C++ primitives (CPU kernels; Metal on macOS builds)";

  m.def(
      "attention_forward",
      [](const mx::array& q, const mx::array& k, const mx::array& v, std::optional<mx::array> mask,
         std::optional<mx::array> alibi, std::optional<mx::array> sinks,
         std::optional<mx::array> block_mask, std::optional<mx::array> cu_seqlens_q,
         std::optional<mx::array> cu_seqlens_k, std::optional<mx::array> key_start,
         std::optional<mx::array> key_len, int batch, float scale, int window_left,
         int window_right, float softcap, int block_q, int block_k, mx::StreamOrDevice s) {
        mlxf::AttentionExtras e{mask, alibi, sinks, block_mask, cu_seqlens_q, cu_seqlens_k, key_start, key_len};
        return mlxf::attention_forward(q, k, v, e,
                                       params(batch, scale, window_left, window_right, softcap, block_q, block_k), s);
      },
      "q"_a, "k"_a, "v"_a, "mask"_a.none() = nb::none(), "alibi"_a.none() = nb::none(), "sinks"_a.none() = nb::none(), "block_mask"_a.none() = nb::none(),
      "cu_seqlens_q"_a.none() = nb::none(), "cu_seqlens_k"_a.none() = nb::none(), "key_start"_a.none() = nb::none(),
      "key_len"_a.none() = nb::none(), nb::kw_only(), "batch"_a, "scale"_a,
      "window_left"_a, "window_right"_a, "softcap"_a, "block_q"_a, "block_k"_a, "stream"_a = nb::none(),
      "Fused attention forward: returns [out, lse]. key_start/key_len (int32 [B], both or neither): "
      "batch b keeps keys key_start[b] <= j < key_start[b] + key_len[b].");

  m.def(
      "attention_backward",
      [](const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& out,
         const mx::array& lse, const mx::array& dout, std::optional<mx::array> dlse,
         std::optional<mx::array> mask, std::optional<mx::array> alibi, std::optional<mx::array> sinks,
         std::optional<mx::array> block_mask, std::optional<mx::array> cu_seqlens_q,
         std::optional<mx::array> cu_seqlens_k, std::optional<mx::array> key_start,
         std::optional<mx::array> key_len, int batch, float scale, int window_left,
         int window_right, float softcap, int block_q, int block_k, bool own_output, mx::StreamOrDevice s) {
        mlxf::AttentionExtras e{mask, alibi, sinks, block_mask, cu_seqlens_q, cu_seqlens_k, key_start, key_len};
        return mlxf::attention_backward(q, k, v, out, lse, dout, dlse, e,
                                        params(batch, scale, window_left, window_right, softcap, block_q, block_k), s,
                                        own_output);
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a, "dlse"_a.none() = nb::none(), "mask"_a.none() = nb::none(), "alibi"_a.none() = nb::none(),
      "sinks"_a.none() = nb::none(), "block_mask"_a.none() = nb::none(), "cu_seqlens_q"_a.none() = nb::none(), "cu_seqlens_k"_a.none() = nb::none(),
      "key_start"_a.none() = nb::none(), "key_len"_a.none() = nb::none(), nb::kw_only(), "batch"_a, "scale"_a, "window_left"_a, "window_right"_a, "softcap"_a, "block_q"_a,
      "block_k"_a, "own_output"_a = true, "stream"_a = nb::none(),
      "Fused attention backward (recomputes from q, k, v, out, lse): returns [dq, dk, dv]. own_output=False "
      "where out and lse are global over more keys than k, v hold (ring attention's blocks).");

  m.def("cpu_kernel_isa", &mlxf::cpu_kernel_isa, "Instruction set of the CPU kernels in use.");
  m.def("num_threads", &mlxf::num_workers, "Worker threads of the CPU kernels.");
  // Read MLX_FLASH_CPU_ISA and MLX_FLASH_NUM_THREADS now: a bad value fails the
  // import with its message, not a kernel call inside an MLX evaluation.
  mlxf::cpu_kernel_isa();
  mlxf::num_workers();

  mlxf::register_matmul(m);
  mlxf::register_quant_attention(m);
}
