// diffusekit: float32 matrix products on oneDNN (built at run time with cpu_attention.cpp into one library, see
// diffusekit/cpu_attention.py and diffusekit/cpu_matmul.py).
//
//   linear(x [M, K], w [N, K], bias [N]?) -> x w^T + bias           [M, N]
//   linear(x [B, M, K], w [B, N, K], None) -> x[b] w[b]^T, each b    [B, M, N]
//
// Why: torch's float32 mm / addmm / bmm on the CPU run on MKL, which on this project's AMD EPYC machines reached
// 47-70 GMAC/s on the SD UNet's products with its weights out of cache, where oneDNN's matmul (the one behind
// torch.ops.mkldnn._linear_pointwise) reached 81-100 GMAC/s on the same calls (the FMA peak is 117). inductor lowers
// that op only for frozen (constant) weights; the exact path's graphs take the live weights as inputs, so its
// products call it through this op, which inductor and AOTInductor packages run as an extern kernel.
// Rounding: float32 products and sums in oneDNN's order (against float64, 6e-7-1.4e-6 of the output's largest
// value on the UNet's shapes, where MKL gives 3e-7-5e-7).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace {

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, bias, std::string("none"), c10::List<std::optional<c10::Scalar>>(),
                          std::optional<std::string>(std::string(""))};
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "diffusekit::linear: float32 tensors expected, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == w.dim() && (x.dim() == 2 || x.dim() == 3) && x.size(-1) == w.size(-1),
              "diffusekit::linear: x [M, K] with w [N, K], or x [B, M, K] with w [B, N, K] expected, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.dim() == 2 || (!bias.has_value() && x.size(0) == w.size(0)),
              "diffusekit::linear: a batched product takes one w per x and no bias, got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(!bias.has_value() ||
                  (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == w.size(0)),
              "diffusekit::linear: the bias must be float32 [N] with N = ", w.size(0), ", got ", bias->sizes());
  if (x.numel() == 0 || w.numel() == 0) {  // oneDNN takes no empty matrix: an empty result, or K = 0 (zeros)
    std::vector<int64_t> size{x.sizes().begin(), x.sizes().end() - 1};  // x's [B,] M, then N
    size.push_back(w.size(-2));
    at::Tensor zeros = at::zeros(size, x.options());
    return bias.has_value() ? zeros.add_(*bias) : zeros;
  }
  if (x.dim() == 2) return onednn_linear(x, w, bias.has_value() ? std::optional(bias->contiguous()) : bias);
  at::Tensor out = at::empty({x.size(0), x.size(1), w.size(1)}, x.options());  // [B, M, N]
  for (int64_t b = 0; b < x.size(0); ++b) out.select(0, b).copy_(onednn_linear(x.select(0, b), w.select(0, b), {}));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffusekit, m) { m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(diffusekit, CPU, m) { m.impl("linear", &linear); }
