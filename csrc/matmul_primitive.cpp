// The matmul2d primitive: inputs -> MatmulArgs -> CPU kernel (matmul_cpu_kernel.cpp).
//
// Inputs: a [batch, M, K], b [batch or 1, K, N] ([.., N, K] with
// transpose_b), then optionally a_scale [batch or 1, M or 1, 1] and b_scale
// [1, 1, N or 1] (float32). Operands are read through their strides (the
// vjp passes transposed views), so no copy is made here. Differentiation is
// defined in Python (mlx_flash/matmul.py) for every backend at once.
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "cpu_kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlxf {

namespace mx = mlx::core;

struct MatmulParams {
  MatType a_type = MatType::f32, b_type = MatType::f32;  // fp8 formats replace the dtype
  bool transpose_b = false, has_a_scale = false, has_b_scale = false;
  bool operator==(const MatmulParams& o) const {
    return a_type == o.a_type && b_type == o.b_type && transpose_b == o.transpose_b &&
           has_a_scale == o.has_a_scale && has_b_scale == o.has_b_scale;
  }
};

class Matmul2D : public mx::Primitive {
 public:
  Matmul2D(mx::Stream s, MatmulParams p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(
        "mlx_flash: the C++ matmul2d primitive runs on the CPU; GPU calls go through the "
        "mx.fast.metal_kernel / mx.fast.cuda_kernel wrappers (mlx_flash.backends)");
  }
  const char* name() const override { return "MlxFlashMatmul2D"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const Matmul2D&>(other).p_;
  }

 private:
  MatmulParams p_;
};

namespace {

MatType operand_type(const mx::array& x, const std::string& fmt, const char* name) {
  if (!fmt.empty()) {
    if (x.dtype() != mx::uint8) throw std::invalid_argument(std::string(name) + ": fp8 operand must be uint8");
    if (fmt == "e4m3") return MatType::e4m3;
    if (fmt == "e5m2") return MatType::e5m2;
    throw std::invalid_argument(std::string(name) + "_fmt: expected 'e4m3' or 'e5m2', got '" + fmt + "'");
  }
  if (x.dtype() == mx::float32) return MatType::f32;
  if (x.dtype() == mx::float16) return MatType::f16;
  if (x.dtype() == mx::bfloat16) return MatType::bf16;
  throw std::invalid_argument(std::string(name) + ": expected float32, float16, bfloat16 or fp8 codes");
}

DType out_type(mx::Dtype t) {
  if (t == mx::float32) return DType::f32;
  if (t == mx::float16) return DType::f16;
  if (t == mx::bfloat16) return DType::bf16;
  throw std::invalid_argument("out_dtype: expected float32, float16 or bfloat16");
}

MatView view(const mx::array& x, MatType t, bool transpose) {
  MatView v;
  v.data = x.data<void>();
  v.type = t;
  v.sb = x.shape(0) == 1 ? 0 : x.strides()[0];
  v.sr = transpose ? x.strides()[2] : x.strides()[1];
  v.sc = transpose ? x.strides()[1] : x.strides()[2];
  return v;
}

}  // namespace

void Matmul2D::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto &a = inputs[0], &b = inputs[1];
  MatmulArgs m;
  m.batch = a.shape(0);
  m.M = a.shape(1);
  m.K = a.shape(2);
  m.N = out.shape(2);
  m.b_batched = b.shape(0) != 1 || m.batch == 1;
  m.a = view(a, p_.a_type, false);
  m.b = view(b, p_.b_type, p_.transpose_b);
  size_t i = 2;
  if (p_.has_a_scale) {
    const auto& s = inputs[i++];
    m.a_scale = s.data<float>();
    m.a_scale_sb = s.shape(0) == 1 ? 0 : s.strides()[0];
    m.a_scale_sr = s.shape(1) == 1 ? 0 : s.strides()[1];
  }
  if (p_.has_b_scale) {
    const auto& s = inputs[i++];
    m.b_scale = s.data<float>();
    m.b_scale_sc = s.shape(2) == 1 ? 0 : s.strides()[2];
  }
  m.out = out.data<void>();
  m.out_dtype = out_type(out.dtype());
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs) enc.set_input_array(x);
  enc.set_output_array(out);
  enc.dispatch([m] { mlxf::matmul2d(m); });
}

mx::array matmul2d(const mx::array& a, const mx::array& b, std::optional<mx::array> a_scale,
                   std::optional<mx::array> b_scale, const std::string& a_fmt, const std::string& b_fmt,
                   bool transpose_b, mx::Dtype out_dtype, mx::StreamOrDevice sd) {
  auto s = mx::to_stream(sd);
  if (a.ndim() != 3 || b.ndim() != 3) throw std::invalid_argument("matmul2d: expected rank-3 a and b");
  MatmulParams p;
  p.a_type = operand_type(a, a_fmt, "a");
  p.b_type = operand_type(b, b_fmt, "b");
  p.transpose_b = transpose_b;
  p.has_a_scale = a_scale.has_value();
  p.has_b_scale = b_scale.has_value();
  const int K = a.shape(2), N = transpose_b ? b.shape(1) : b.shape(2);
  if ((transpose_b ? b.shape(2) : b.shape(1)) != K) throw std::invalid_argument("matmul2d: inner dimensions differ");
  if (b.shape(0) != 1 && b.shape(0) != a.shape(0)) throw std::invalid_argument("matmul2d: batch dims differ");
  std::vector<mx::array> inputs = {a, b};
  if (a_scale) inputs.push_back(mx::astype(*a_scale, mx::float32, s));
  if (b_scale) inputs.push_back(mx::astype(*b_scale, mx::float32, s));
  out_type(out_dtype);
  return mx::array({a.shape(0), a.shape(1), N}, out_dtype, std::make_shared<Matmul2D>(s, p), inputs);
}

void register_matmul(nb::module_& m) {
  m.def(
      "matmul2d",
      [](const mx::array& a, const mx::array& b, std::optional<mx::array> a_scale, std::optional<mx::array> b_scale,
         const std::string& a_fmt, const std::string& b_fmt, bool transpose_b, mx::Dtype out_dtype,
         mx::StreamOrDevice s) { return matmul2d(a, b, a_scale, b_scale, a_fmt, b_fmt, transpose_b, out_dtype, s); },
      "a"_a, "b"_a, "a_scale"_a.none(), "b_scale"_a.none(), nb::kw_only(), "a_fmt"_a = "", "b_fmt"_a = "",
      "transpose_b"_a = false, "out_dtype"_a, "stream"_a = nb::none(),
      "(dequant(a) * a_scale) @ (dequant(b) * b_scale) on [batch, M, K] x [batch or 1, K, N]; "
      "fp8 operands are uint8 codes with a_fmt/b_fmt 'e4m3' or 'e5m2'.");
}

}  // namespace mlxf
