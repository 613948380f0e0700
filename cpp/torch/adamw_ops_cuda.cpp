// CUDA registrations of the AdamW steps: validate (op_args.h), guard the device, and launch the
// multi-tensor kernels on the current stream, one launch sequence per parameter dtype.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "op_args.h"
#include "qlora/kernels_cuda.h"

namespace qlora_torch {
namespace {

constexpr qlora::FloatType kFloatTypes[] = {qlora::FloatType::F32, qlora::FloatType::F16,
                                            qlora::FloatType::BF16};

void check_launch(cudaError_t status, const char* op) {
  QLORA_CHECK(status == cudaSuccess, "qlora_ext::", op, ": CUDA launch failed: ",
              cudaGetErrorString(status));
}

// The descriptors of the tensors whose parameter type is `type`.
template <typename Tensor>
std::vector<Tensor> of_type(const std::vector<Tensor>& tensors,
                            const std::vector<qlora::FloatType>& types, qlora::FloatType type) {
  std::vector<Tensor> selected;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (types[i] == type) selected.push_back(tensors[i]);
  }
  return selected;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double grad_scale) {
  const AdamWStepArgs a = check_adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2,
                                           eps, weight_decay, step, grad_scale);
  if (!a.device) return;
  const c10::cuda::CUDAGuard guard(*a.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const qlora::FloatType type : kFloatTypes) {
    const std::vector<qlora::AdamW32Tensor> tensors = of_type(a.tensors32, a.types, type);
    if (tensors.empty()) continue;
    check_launch(qlora::adamw32_step_cuda(tensors.data(), int(tensors.size()), type, a.hyper,
                                          stream),
                 "adamw_step");
  }
}

void adamw_step_8bit_cuda(at::TensorList params, at::TensorList grads,
                          at::TensorList exp_avg_codes, at::TensorList exp_avg_absmax,
                          at::TensorList exp_avg_sq_codes, at::TensorList exp_avg_sq_absmax,
                          const at::Tensor& exp_avg_map, const at::Tensor& exp_avg_sq_map,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          int64_t step, double grad_scale) {
  const AdamWStepArgs a = check_adamw_step_8bit(
      params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
      exp_avg_map, exp_avg_sq_map, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  if (!a.device) return;
  const c10::cuda::CUDAGuard guard(*a.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const qlora::FloatType type : kFloatTypes) {
    const std::vector<qlora::AdamW8Tensor> tensors = of_type(a.tensors8, a.types, type);
    if (tensors.empty()) continue;
    check_launch(qlora::adamw8_step_cuda(tensors.data(), int(tensors.size()), type,
                                         a.exp_avg_map.data_ptr<float>(),
                                         a.exp_avg_sq_map.data_ptr<float>(), a.hyper, stream),
                 "adamw_step_8bit");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw_step_8bit", &adamw_step_8bit_cuda);
}

}  // namespace qlora_torch
