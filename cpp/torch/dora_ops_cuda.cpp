// CUDA registrations of the DoRA operators: validate (dora_args.h), guard the device, G = A·Aᵀ
// (qlora's kernel, or at::mm: set_dora_gram_kernel), then one launch (forward) or two (backward)
// on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>

#include "dora_args.h"
#include "op_args.h"
#include "qlora/dora.h"

namespace qlora_torch {
namespace {

void check_launch(cudaError_t status, const char* op) {
  QLORA_CHECK(status == cudaSuccess, "qlora_ext::", op, ": CUDA launch failed: ",
              cudaGetErrorString(status));
}

// G = A·Aᵀ by qlora's own kernel (one launch) or by at::mm (cuBLAS: an SGEMM and a split-K
// reduction on the H100): process-wide, set from Python (dora.GRAM_KERNEL_DEVICES) so that one
// process can measure both; the kernel by default (measured on the H100 2026-12-06: see
// dora.GRAM_KERNEL_DEVICES).
std::atomic<bool> gram_kernel{true};

std::tuple<at::Tensor, at::Tensor> dora_scale_impl(const DoRAScaleArgs& a) {
  const c10::cuda::CUDAGuard guard(a.wa.device());
  at::Tensor col_scale = at::empty({a.N}, a.wa.options());
  at::Tensor inv_norm = at::empty({a.N}, a.wa.options().dtype(at::kFloat));
  if (a.N == 0) return {col_scale, inv_norm};
  const int64_t width = a.stack.count * a.r;
  at::Tensor gram;  // [S·r, S·r]; the kernels read its diagonal blocks G_jj = A_j·A_jᵀ only
  if (gram_kernel.load(std::memory_order_relaxed)) {
    gram = at::empty({width, width}, a.lora_a.options());
    check_launch(qlora::dora_gram_cuda(a.lora_a.data_ptr<float>(), a.lora_a.size(1), a.r,
                                       a.stack.count, gram.data_ptr<float>(),
                                       at::cuda::getCurrentCUDAStream()),
                 "dora_scale (A·Aᵀ)");
  } else {
    gram = at::mm(a.lora_a, a.lora_a.t()).contiguous();
  }
  check_launch(qlora::dora_scale_cuda(a.wa.data_ptr(), a.type, a.lora_b.data_ptr<float>(),
                                      gram.data_ptr<float>(), a.weight_sq.data_ptr<float>(),
                                      a.magnitude.data_ptr<float>(), a.N, a.r, a.stack,
                                      col_scale.data_ptr(), inv_norm.data_ptr<float>(),
                                      at::cuda::getCurrentCUDAStream()),
               "dora_scale");
  return {col_scale, inv_norm};
}

std::tuple<at::Tensor, at::Tensor> dora_scale_backward_cuda(const at::Tensor& dy,
                                                            const at::Tensor& z,
                                                            const at::Tensor& col_scale,
                                                            const at::Tensor& inv_norm) {
  const DoRAScaleBackwardArgs a = check_dora_scale_backward(dy, z, col_scale, inv_norm);
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dz = at::empty(dy.sizes(), dy.options());
  if (a.M == 0 || a.N == 0) return {dz, at::zeros({a.N}, dy.options().dtype(at::kFloat))};
  at::Tensor dmagnitude = at::empty({a.N}, dy.options().dtype(at::kFloat));
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunks = qlora::dora_backward_chunks(a.M, a.N, num_sms);
  // Per-chunk column sums; a single chunk writes dmagnitude directly and needs none.
  at::Tensor partial = chunks > 1 ? at::empty({chunks, a.N}, dy.options().dtype(at::kFloat))
                                  : at::Tensor();
  check_launch(qlora::dora_scale_backward_cuda(
                   a.dy.data_ptr(), a.z.data_ptr(), a.col_scale.data_ptr(),
                   a.inv_norm.data_ptr<float>(), a.type, a.M, a.N, num_sms, dz.data_ptr(),
                   dmagnitude.data_ptr<float>(),
                   partial.defined() ? partial.data_ptr<float>() : nullptr,
                   at::cuda::getCurrentCUDAStream()),
               "dora_scale_backward");
  return {dz, dmagnitude};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> swiglu_scaled_dora_backward_cuda(
    const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& gate_scale, const at::Tensor& up_scale, const at::Tensor& gate_inv_norm,
    const at::Tensor& up_inv_norm) {
  const SwiGLUDoRABackwardArgs a = check_swiglu_scaled_dora_backward(
      dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm);
  const c10::cuda::CUDAGuard guard(dh.device());
  at::Tensor dz_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor dz_up = at::empty(up.sizes(), up.options());
  const auto fp32 = dh.options().dtype(at::kFloat);
  if (a.M == 0 || a.N == 0) return {dz_gate, dz_up, at::zeros({a.N}, fp32), at::zeros({a.N}, fp32)};
  at::Tensor dm_gate = at::empty({a.N}, fp32);
  at::Tensor dm_up = at::empty({a.N}, fp32);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunks = qlora::dora_backward_chunks(a.M, a.N, num_sms);
  // Per-chunk column sums of both (gate's, then up's); a single chunk writes dm directly.
  at::Tensor partial = chunks > 1 ? at::empty({2, chunks, a.N}, fp32) : at::Tensor();
  const SwiGLUChecked& c = a.swiglu;
  check_launch(qlora::swiglu_scaled_dora_backward_cuda(
                   c.dh.data_ptr(), c.gate.data_ptr(), c.up.data_ptr(), c.gate_scale.data_ptr(),
                   c.up_scale.data_ptr(), a.gate_inv_norm.data_ptr<float>(),
                   a.up_inv_norm.data_ptr<float>(), c.type, a.M, a.N, num_sms, dz_gate.data_ptr(),
                   dz_up.data_ptr(), dm_gate.data_ptr<float>(), dm_up.data_ptr<float>(),
                   partial.defined() ? partial.data_ptr<float>() : nullptr,
                   at::cuda::getCurrentCUDAStream()),
               "swiglu_scaled_dora_backward");
  return {dz_gate, dz_up, dm_gate, dm_up};
}

at::Tensor dora_column_scale_cuda(const at::Tensor& z, const at::Tensor& col_scale,
                                  const std::optional<at::Tensor>& bias) {
  const DoRAColumnScaleArgs a = check_dora_column_scale(z, col_scale, bias);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = at::empty(z.sizes(), z.options());
  if (a.M == 0 || a.N == 0) return y;
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check_launch(qlora::dora_column_scale_cuda(a.z.data_ptr(), a.col_scale.data_ptr(),
                                             a.bias.defined() ? a.bias.data_ptr() : nullptr,
                                             a.type, a.M, a.N, num_sms, y.data_ptr(),
                                             at::cuda::getCurrentCUDAStream()),
               "dora_column_scale");
  return y;
}

}  // namespace

void set_dora_gram_kernel(bool enabled) { gram_kernel.store(enabled, std::memory_order_relaxed); }
bool dora_gram_kernel() { return gram_kernel.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("dora_scale", &dora_scale_op<dora_scale_impl>);
  m.impl("dora_scale_stacked", &dora_scale_stacked_op<dora_scale_impl>);
  m.impl("dora_scale_backward", &dora_scale_backward_cuda);
  m.impl("dora_column_scale", &dora_column_scale_cuda);
  m.impl("swiglu_scaled_dora_backward", &swiglu_scaled_dora_backward_cuda);
}

}  // namespace qlora_torch
