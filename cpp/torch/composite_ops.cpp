// Operators built from other qlora_ext operators and ATen ops, registered once for every device
// (CompositeImplicitAutograd): torch.compile and autograd see through them to their parts.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qlora_torch {
namespace {

using QuantizeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);
using Quantize8Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                        const std::optional<at::Tensor>&);

// NF4 with double quantization in one call (bitsandbytes' compress_statistics): the per-block
// absmax is centred on its mean and stored as 8-bit codes of the signed dynamic map, blocks of
// `nested_blocksize`. Saves the Python round trips between the four steps.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize(
    const at::Tensor& weight, int64_t blocksize, const at::Tensor& nested_code,
    int64_t nested_blocksize) {
  static const auto quantize4 = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("qlora_ext::nf4_quantize", "")
                                    .typed<QuantizeFn>();
  static const auto quantize8 = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("qlora_ext::blockwise8_quantize", "")
                                    .typed<Quantize8Fn>();
  // Symbolic-size friendly (torch.compile traces through this function).
  TORCH_SYM_CHECK(weight.sym_numel().sym_gt(0), "weight must not be empty for double quantization");
  auto [packed, absmax] = quantize4.call(weight, blocksize);
  // at::mean reduces as torch.mean does, so the offset equals bitsandbytes' on the same device.
  at::Tensor offset = absmax.mean();
  // The 8-bit kernel subtracts the offset as it reads (one fp32 rounding, as `absmax - offset`).
  auto [codes, nested_absmax] = quantize8.call(absmax, nested_code, nested_blocksize, offset.reshape({1}));
  return {packed, codes, nested_absmax, offset};
}

}  // namespace

at::Tensor nf4_gemv_swiglu_composite(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                     int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                     const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                     const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  using GroupedFn = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, int64_t, at::IntArrayRef,
                               at::TensorList, const std::optional<at::Tensor>&, at::TensorList,
                               const std::optional<at::Tensor>&, int64_t);
  using SwiGLUFn = at::Tensor(const at::Tensor&, const at::Tensor&, bool);
  static const auto grouped =
      c10::Dispatcher::singleton().findSchemaOrThrow("qlora_ext::nf4_gemv_grouped", "").typed<GroupedFn>();
  static const auto swiglu = c10::Dispatcher::singleton().findSchemaOrThrow("qlora_ext::swiglu", "").typed<SwiGLUFn>();
  const at::Tensor both =
      grouped.call(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias, nested_blocksize);
  const int64_t n = rows[0];
  return swiglu.call(both.narrow(-1, 0, n).contiguous(), both.narrow(-1, n, n).contiguous(), false);
}

TORCH_LIBRARY_IMPL(qlora_ext, CompositeImplicitAutograd, m) {
  m.impl("nf4_double_quantize", &nf4_double_quantize);
}

}  // namespace qlora_torch
