// CPU registrations of the DoRA operators: validate (dora_args.h), G = A·Aᵀ by at::mm, then the
// row (forward) or column (backward) loops of qlora/dora.h split over threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "dora_args.h"
#include "qlora/dora.h"
#include "qlora/swiglu.h"

namespace qlora_torch {
namespace {

std::tuple<at::Tensor, at::Tensor> dora_scale_impl(const DoRAScaleArgs& a) {
  const at::Tensor gram = at::mm(a.lora_a, a.lora_a.t()).contiguous();  // [S·r, S·r]
  at::Tensor col_scale = at::empty({a.N}, a.wa.options());
  at::Tensor inv_norm = at::empty({a.N}, a.wa.options().dtype(at::kFloat));
  const void* w = a.wa.data_ptr();
  const float* b = a.lora_b.data_ptr<float>();
  const float* g = gram.data_ptr<float>();
  const float* sq = a.weight_sq.data_ptr<float>();
  const float* m = a.magnitude.data_ptr<float>();
  void* c = col_scale.data_ptr();
  float* inv = inv_norm.data_ptr<float>();
  // Rows per task: >= 256K multiply-adds each (r² per row): waking the thread pool costs more
  // than a smaller share of this work.
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, a.r * a.r));
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    qlora::dora_scale_cpu(w, a.type, b, g, sq, m, a.r, a.stack, begin, end, c, inv);
  });
  return {col_scale, inv_norm};
}

std::tuple<at::Tensor, at::Tensor> dora_scale_backward_cpu(const at::Tensor& dy,
                                                           const at::Tensor& z,
                                                           const at::Tensor& col_scale,
                                                           const at::Tensor& inv_norm) {
  const DoRAScaleBackwardArgs a = check_dora_scale_backward(dy, z, col_scale, inv_norm);
  at::Tensor dz = at::empty(dy.sizes(), dy.options());
  // Every column is written below; only an empty dy leaves dm as zeros (Σ over no rows).
  if (a.M == 0 || a.N == 0) return {dz, at::zeros({a.N}, dy.options().dtype(at::kFloat))};
  at::Tensor dmagnitude = at::empty({a.N}, dy.options().dtype(at::kFloat));
  const void* g = a.dy.data_ptr();
  const void* zp = a.z.data_ptr();
  const void* c = a.col_scale.data_ptr();
  const float* inv = a.inv_norm.data_ptr<float>();
  void* d = dz.data_ptr();
  float* dm = dmagnitude.data_ptr<float>();
  // Columns per task: >= 32K elements each, and >= 64 columns so that two tasks rarely write
  // the same cache line of dz.
  const int64_t grain = std::max<int64_t>(64, 32768 / a.M);
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    qlora::dora_scale_backward_cpu(g, zp, c, inv, a.type, a.M, a.N, begin, end, d, dm);
  });
  return {dz, dmagnitude};
}

// The two steps the CUDA kernel fuses, each by its CPU kernel: the gradients for g and u
// (swiglu_scaled_backward's), then dora_scale_backward of each. The CPU has no launches to save,
// and this gives its bits by construction.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> swiglu_scaled_dora_backward_cpu(
    const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& gate_scale, const at::Tensor& up_scale, const at::Tensor& gate_inv_norm,
    const at::Tensor& up_inv_norm) {
  const SwiGLUDoRABackwardArgs a = check_swiglu_scaled_dora_backward(
      dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm);
  at::Tensor dg = at::empty(gate.sizes(), gate.options());
  at::Tensor du = at::empty(up.sizes(), up.options());
  const SwiGLUChecked& c = a.swiglu;
  const qlora::SwiGLUScales scales = c.scales();
  at::parallel_for(0, c.n, 16384, [&](int64_t begin, int64_t end) {  // block_ops_cpu's SwiGLU grain
    qlora::swiglu_backward_cpu(c.dh.data_ptr(), c.gate.data_ptr(), c.up.data_ptr(), dg.data_ptr(),
                               du.data_ptr(), c.type, begin, end, scales);
  });
  auto [dz_gate, dm_gate] = dora_scale_backward_cpu(dg, c.gate, c.gate_scale, a.gate_inv_norm);
  auto [dz_up, dm_up] = dora_scale_backward_cpu(du, c.up, c.up_scale, a.up_inv_norm);
  return {dz_gate, dz_up, dm_gate, dm_up};
}

at::Tensor dora_column_scale_cpu(const at::Tensor& z, const at::Tensor& col_scale,
                                 const std::optional<at::Tensor>& bias) {
  const DoRAColumnScaleArgs a = check_dora_column_scale(z, col_scale, bias);
  at::Tensor y = at::empty(z.sizes(), z.options());
  if (a.M == 0 || a.N == 0) return y;
  const void* zp = a.z.data_ptr();
  const void* c = a.col_scale.data_ptr();
  const void* b = a.bias.defined() ? a.bias.data_ptr() : nullptr;
  void* out = y.data_ptr();
  // Rows per task: >= 32K elements each (the thread pool's wake-up outweighs less).
  const int64_t grain = std::max<int64_t>(1, 32768 / a.N);
  at::parallel_for(0, a.M, grain, [&](int64_t begin, int64_t end) {
    qlora::dora_column_scale_cpu(zp, c, b, a.type, a.N, begin, end, out);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("dora_scale", &dora_scale_op<dora_scale_impl>);
  m.impl("dora_scale_stacked", &dora_scale_stacked_op<dora_scale_impl>);
  m.impl("dora_scale_backward", &dora_scale_backward_cpu);
  m.impl("dora_column_scale", &dora_column_scale_cpu);
  m.impl("swiglu_scaled_dora_backward", &swiglu_scaled_dora_backward_cpu);
}

}  // namespace qlora_torch
