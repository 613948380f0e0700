// CPU registrations of the transformer-block operators: validate (block_op_args.h), then split
// rows (RMSNorm, RoPE) or elements (SwiGLU) over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "block_op_args.h"

namespace qlora_torch {
namespace {

constexpr int64_t kGrainElements = 16384;
// The RMSNorm backward's dweight is summed over at most this many fixed row chunks (one fp32
// partial row each), so the result does not depend on the number of threads.
constexpr int64_t kMaxDweightChunks = 64;

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, bool cast_before_weight) {
  RMSNormChecked c = check_rms_norm(x, weight, eps, cast_before_weight);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(c.y_dtype));
  at::Tensor inv_rms = at::empty({c.kernel.rows}, x.options().dtype(at::kFloat));
  c.kernel.y = y.data_ptr();
  c.kernel.inv_rms = inv_rms.data_ptr<float>();
  const qlora::RMSNormForwardArgs& a = c.kernel;
  at::parallel_for(0, a.rows, grain_rows(a.D), [&](int64_t begin, int64_t end) {
    qlora::rms_norm_forward_cpu(a, begin, end);
  });
  return {y, inv_rms};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& inv_rms,
                                                         bool cast_before_weight,
                                                         bool compute_dweight) {
  RMSNormBackwardChecked c = check_rms_norm_backward(dy, x, weight, inv_rms, cast_before_weight);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  c.kernel.dx = dx.data_ptr();
  const qlora::RMSNormBackwardArgs& a = c.kernel;
  if (!compute_dweight) {
    at::parallel_for(0, a.rows, grain_rows(a.D), [&](int64_t begin, int64_t end) {
      qlora::rms_norm_backward_cpu(a, begin, end, nullptr);
    });
    return {dx, at::empty({0}, weight.options())};
  }
  const int64_t chunk_rows =
      std::max(ceil_div(a.rows, kMaxDweightChunks), grain_rows(a.D));
  const int64_t chunks = ceil_div(a.rows, chunk_rows);
  at::Tensor partial = at::empty({chunks, a.D}, x.options().dtype(at::kFloat));
  float* p = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t row_begin = chunk * chunk_rows;
      qlora::rms_norm_backward_cpu(a, row_begin, std::min(a.rows, row_begin + chunk_rows),
                                   p + chunk * a.D);
    }
  });
  at::Tensor dweight = at::empty({a.D}, weight.options());
  qlora::rms_norm_sum_partials_cpu(p, chunks, a.D, dweight.data_ptr(), a.weight_type);
  return {dx, dweight};
}

void launch_rope(const RopeChecked& c) {
  const qlora::RopeArgs& a = c.kernel;
  at::parallel_for(0, a.rows(), grain_rows(a.head_dim), [&](int64_t begin, int64_t end) {
    qlora::rope_cpu(a, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            bool transpose) {
  RopeChecked c = check_rope(q, k, cos, sin, transpose);
  at::Tensor q_out = at::empty_like(c.q);
  at::Tensor k_out = at::empty_like(c.k);
  set_rope_outputs(c, q_out, k_out);
  launch_rope(c);
  return {q_out, k_out};
}

void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin, bool transpose) {
  launch_rope(check_rope_inplace(q, k, cos, sin, transpose));
}

// The CPU reads the filled slots P on the host, so the step is rope_ with k's output pointed at
// slot P, a copy of v, and P + T written back.
void rope_append_kv_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& length) {
  RopeAppendChecked c = check_rope_append_kv(q, k, v, cos, sin, key_cache, value_cache, length);
  qlora::RopeAppendArgs& a = c.kernel;
  const int64_t filled = *a.length, T = a.rope.seq, L = a.capacity;
  QLORA_CHECK(filled >= 0 && filled + T <= L, "rope_append_kv_: the cache is full: length ", filled, " + ", T,
              " new tokens > ", L, " slots (key_cache's third dimension)");
  RopeChecked rope;
  rope.kernel = a.rope;
  rope.kernel.k.out = static_cast<char*>(rope.kernel.k.out) + filled * a.rope.k.out_stride_t * key_cache.element_size();
  launch_rope(rope);
  value_cache.narrow(2, filled, T).copy_(c.v);
  *a.length = filled + T;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& length, const std::optional<at::Tensor>& mask, double scale) {
  return decode_attention_aten(check_decode_attention(q, key_cache, value_cache, length, mask, scale));
}

at::Tensor launch_swiglu(const SwiGLUChecked& c) {
  at::Tensor h = at::empty(c.gate.sizes(), c.gate.options());
  const void* g = c.gate.data_ptr();
  const void* u = c.up.data_ptr();
  void* out = h.data_ptr();
  const qlora::SwiGLUScales scales = c.scales();
  at::parallel_for(0, c.n, kGrainElements, [&](int64_t begin, int64_t end) {
    qlora::swiglu_forward_cpu(g, u, out, c.type, begin, end, scales);
  });
  return h;
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up, bool backward_inplace) {
  return launch_swiglu(check_swiglu(gate, up));
}

at::Tensor swiglu_scaled_cpu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& gate_scale,
                             const at::Tensor& up_scale) {
  return launch_swiglu(check_swiglu_scaled(gate, up, gate_scale, up_scale));
}

void launch_swiglu_backward(const SwiGLUChecked& c, void* dgate, void* dup) {
  const void* d = c.dh.data_ptr();
  const void* g = c.gate.data_ptr();
  const void* u = c.up.data_ptr();
  const qlora::SwiGLUScales scales = c.scales();
  at::parallel_for(0, c.n, kGrainElements, [&](int64_t begin, int64_t end) {
    qlora::swiglu_backward_cpu(d, g, u, dgate, dup, c.type, begin, end, scales);
  });
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& dh, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  const SwiGLUChecked c = check_swiglu_backward(dh, gate, up);
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(up.sizes(), up.options());
  launch_swiglu_backward(c, dgate.data_ptr(), dup.data_ptr());
  return {dgate, dup};
}

void swiglu_backward_inplace_cpu(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up) {
  const SwiGLUChecked c = check_swiglu_backward_inplace(dh, gate, up);
  launch_swiglu_backward(c, gate.data_ptr(), up.data_ptr());
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward_cpu(const at::Tensor& dh, const at::Tensor& gate,
                                                              const at::Tensor& up, const at::Tensor& gate_scale,
                                                              const at::Tensor& up_scale) {
  const SwiGLUChecked c = check_swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale);
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(up.sizes(), up.options());
  launch_swiglu_backward(c, dgate.data_ptr(), dup.data_ptr());
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("rope_append_kv_", &rope_append_kv_inplace_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("swiglu_backward_", &swiglu_backward_inplace_cpu);
  m.impl("swiglu_scaled", &swiglu_scaled_cpu);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_cpu);
}

}  // namespace qlora_torch
