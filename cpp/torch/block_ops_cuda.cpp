// CUDA registrations of the transformer-block operators: validate (block_op_args.h), guard the
// device, launch on the current stream, and turn a launch failure into an error naming the op.
#include <atomic>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "block_op_args.h"
#include "qlora/kernels_cuda.h"

namespace qlora_torch {
namespace {

void check_launch(cudaError_t status, const char* op) {
  QLORA_CHECK(status == cudaSuccess, "qlora_ext::", op, ": CUDA launch failed: ",
              cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 double eps, bool cast_before_weight) {
  RMSNormChecked c = check_rms_norm(x, weight, eps, cast_before_weight);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(c.y_dtype));
  at::Tensor inv_rms = at::empty({c.kernel.rows}, x.options().dtype(at::kFloat));
  c.kernel.y = y.data_ptr();
  c.kernel.inv_rms = inv_rms.data_ptr<float>();
  check_launch(qlora::rms_norm_forward_cuda(c.kernel, at::cuda::getCurrentCUDAStream()), "rms_norm");
  return {y, inv_rms};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& inv_rms,
                                                          bool cast_before_weight,
                                                          bool compute_dweight) {
  RMSNormBackwardChecked c = check_rms_norm_backward(dy, x, weight, inv_rms, cast_before_weight);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  c.kernel.dx = dx.data_ptr();
  const int64_t D = c.kernel.D;
  at::Tensor dweight, workspace;
  if (!compute_dweight) {
    dweight = at::empty({0}, weight.options());
  } else if (c.kernel.rows == 0) {
    dweight = at::zeros({D}, weight.options());  // an empty sum
  } else {
    dweight = at::empty({D}, weight.options());
    workspace = at::empty({qlora::rms_norm_backward_cuda_workspace(c.kernel.rows, D)},
                          x.options().dtype(at::kFloat));
  }
  const bool kernel_dweight = compute_dweight && c.kernel.rows > 0;
  check_launch(qlora::rms_norm_backward_cuda(c.kernel, kernel_dweight ? dweight.data_ptr() : nullptr,
                                             kernel_dweight ? workspace.data_ptr<float>() : nullptr,
                                             at::cuda::getCurrentCUDAStream()),
               "rms_norm_backward");
  return {dx, dweight};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             bool transpose) {
  RopeChecked c = check_rope(q, k, cos, sin, transpose);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty_like(c.q);
  at::Tensor k_out = at::empty_like(c.k);
  set_rope_outputs(c, q_out, k_out);
  check_launch(qlora::rope_cuda(c.kernel, at::cuda::getCurrentCUDAStream()), "rope");
  return {q_out, k_out};
}

void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin, bool transpose) {
  const RopeChecked c = check_rope_inplace(q, k, cos, sin, transpose);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(qlora::rope_cuda(c.kernel, at::cuda::getCurrentCUDAStream()), "rope_");
}

void rope_append_kv_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& length) {
  const RopeAppendChecked c = check_rope_append_kv(q, k, v, cos, sin, key_cache, value_cache, length);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(qlora::rope_append_kv_cuda(c.kernel, at::cuda::getCurrentCUDAStream()), "rope_append_kv_");
}

// Off by default: the kernels pass their CUDA tests and sanitizers (H200) but decode slower
// than cuDNN's SDPA (README, decode_8b_glu_h200.json); the tests switch it on.
std::atomic<bool> g_decode_attention_kernel{false};

// The kernels (switched on, fp16/bf16, D in {64, 128, 256}, up to 16 query heads a K/V head); the
// ATen composite otherwise.
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& length, const std::optional<at::Tensor>& mask, double scale) {
  DecodeAttentionChecked c = check_decode_attention(q, key_cache, value_cache, length, mask, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const qlora::DecodeAttentionArgs& a = c.kernel;
  const bool kernel = decode_attention_kernel() && a.type != qlora::FloatType::F32 &&
                      (a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256) && a.q_heads / a.kv_heads <= 16 &&
                      a.batch <= 65535 && a.kv_heads <= 65535;
  if (!kernel || a.batch == 0 || a.q_heads == 0 || a.capacity == 0) return decode_attention_aten(c);
  at::Tensor out = at::empty({a.batch, 1, a.q_heads, a.head_dim}, q.options());
  at::Tensor workspace = at::empty({qlora::decode_attention_cuda_workspace(a)}, q.options().dtype(at::kFloat));
  c.kernel.out = out.data_ptr();
  check_launch(qlora::decode_attention_cuda(c.kernel, workspace.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "decode_attention");
  return out;
}

at::Tensor launch_swiglu(const SwiGLUChecked& c, const char* op) {
  const c10::cuda::CUDAGuard guard(c.gate.device());
  at::Tensor h = at::empty(c.gate.sizes(), c.gate.options());
  check_launch(qlora::swiglu_forward_cuda(c.gate.data_ptr(), c.up.data_ptr(), h.data_ptr(), c.n,
                                          c.type, at::cuda::getCurrentCUDAStream(), c.scales()),
               op);
  return h;
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up, bool backward_inplace) {
  return launch_swiglu(check_swiglu(gate, up), "swiglu");
}

at::Tensor swiglu_scaled_cuda(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& gate_scale,
                              const at::Tensor& up_scale) {
  return launch_swiglu(check_swiglu_scaled(gate, up, gate_scale, up_scale), "swiglu_scaled");
}

std::tuple<at::Tensor, at::Tensor> launch_swiglu_backward(const SwiGLUChecked& c, const char* op) {
  const c10::cuda::CUDAGuard guard(c.gate.device());
  at::Tensor dgate = at::empty(c.gate.sizes(), c.gate.options());
  at::Tensor dup = at::empty(c.up.sizes(), c.up.options());
  check_launch(qlora::swiglu_backward_cuda(c.dh.data_ptr(), c.gate.data_ptr(), c.up.data_ptr(),
                                           dgate.data_ptr(), dup.data_ptr(), c.n, c.type,
                                           at::cuda::getCurrentCUDAStream(), c.scales()),
               op);
  return {dgate, dup};
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& dh, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  return launch_swiglu_backward(check_swiglu_backward(dh, gate, up), "swiglu_backward");
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward_cuda(const at::Tensor& dh, const at::Tensor& gate,
                                                               const at::Tensor& up, const at::Tensor& gate_scale,
                                                               const at::Tensor& up_scale) {
  return launch_swiglu_backward(check_swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale),
                                "swiglu_scaled_backward");
}

void swiglu_backward_inplace_cuda(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up) {
  const SwiGLUChecked c = check_swiglu_backward_inplace(dh, gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  check_launch(qlora::swiglu_backward_cuda(c.dh.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                           gate.data_ptr(), up.data_ptr(), c.n, c.type,
                                           at::cuda::getCurrentCUDAStream()),
               "swiglu_backward_");
}

}  // namespace

void set_decode_attention_kernel(bool enabled) { g_decode_attention_kernel.store(enabled, std::memory_order_relaxed); }
bool decode_attention_kernel() { return g_decode_attention_kernel.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("rope_append_kv_", &rope_append_kv_inplace_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("swiglu_backward_", &swiglu_backward_inplace_cuda);
  m.impl("swiglu_scaled", &swiglu_scaled_cuda);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_cuda);
}

}  // namespace qlora_torch
