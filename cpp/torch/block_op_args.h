// Argument validation of the transformer-block operators (rms_norm, rope, swiglu and their
// backwards), shared by the CPU and CUDA registrations (block_ops_cpu.cpp, block_ops_cuda.cpp).
// Each check names the argument and what was expected; each returns what the kernels need, with
// the tensors made contiguous where the kernels need it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "op_args.h"
#include "qlora/decode_attention.h"
#include "qlora/rms_norm.h"
#include "qlora/rope.h"
#include "qlora/swiglu.h"

namespace qlora_torch {

struct RMSNormChecked {
  at::Tensor x, weight;  // contiguous; x viewed as [rows, D]
  at::ScalarType y_dtype;
  qlora::RMSNormForwardArgs kernel;  // pointers to x and weight set; y, inv_rms left to the caller
};
RMSNormChecked check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                              bool cast_before_weight);

struct RMSNormBackwardChecked {
  at::Tensor dy, x, weight, inv_rms;  // contiguous
  qlora::RMSNormBackwardArgs kernel;  // pointers set except dx
};
RMSNormBackwardChecked check_rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& weight,
                                               const at::Tensor& inv_rms,
                                               bool cast_before_weight);

// rope: q [B, Hq, T, Dh], k [B, Hk, T, Dh] (any strides; a copy is made where Dh's stride is not
// 1), cos/sin [1 or B, T, Dh] of q's dtype or fp32 (made contiguous). The kernel arguments'
// `out` pointers are left to the caller.
struct RopeChecked {
  at::Tensor q, k, cos, sin;
  qlora::RopeArgs kernel;
};
RopeChecked check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin, bool transpose);
// Points the kernel arguments' outputs at q_out and k_out (of q's and k's shapes; for rope_, q
// and k themselves).
void set_rope_outputs(RopeChecked& c, const at::Tensor& q_out, const at::Tensor& k_out);
// rope_ (in place): as check_rope, but q and k must already have unit stride along Dh, no
// internal overlap and no memory in common; the kernel writes where it reads.
RopeChecked check_rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool transpose);

// rope_append_kv_ (qlora/rope.h): q as for rope_ (rotated in place); k [B, Hk, T, Dh] and
// v [B, Hk, T, Dv] read (copied where the last stride is not 1); key_cache [B, Hk, L, Dh] and
// value_cache [B, Hk, L, Dv] of q's dtype and device, unit stride along the last dimension,
// written in place; length: one int64 on q's device. Every tensor written is disjoint from every
// other tensor of the call. The kernel arguments point key_cache and value_cache at slot 0.
struct RopeAppendChecked {
  at::Tensor q, k, v, cos, sin;
  qlora::RopeAppendArgs kernel;
};
RopeAppendChecked check_rope_append_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& key_cache, const at::Tensor& value_cache,
                                       const at::Tensor& length);

// decode_attention (qlora/decode_attention.h): q [B, Hq, 1, D] (unit stride along D), key_cache
// and value_cache [B, Hk, L, D] of q's dtype and device (unit stride along D), Hq a multiple of
// Hk; length one int64 on q's device; mask undefined or [B or 1, 1, 1, Lm >= L], bool, q's dtype
// or fp32; scale finite. The kernel arguments are filled except `out`.
struct DecodeAttentionChecked {
  at::Tensor q, key_cache, value_cache, length, mask;
  double scale = 1.0;
  qlora::DecodeAttentionArgs kernel;
};
DecodeAttentionChecked check_decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                              const at::Tensor& value_cache, const at::Tensor& length,
                                              const std::optional<at::Tensor>& mask, double scale);
// The operator from ATen ops on any device (the CPU implementation, and the CUDA one where the
// kernels do not apply): [B, 1, Hq, D] in q's dtype, fp32 math. Reads the length on the device
// (no host sync: CUDA graphs capture it).
at::Tensor decode_attention_aten(const DecodeAttentionChecked& c);

// decode_attention's CUDA kernels (true) or the ATen composite on CUDA too (false, the default until
// the kernels' CUDA tests have passed on a GPU); process-wide (bindings.cpp:
// _C._set_decode_attention_kernel). Defined in the CUDA glue (block_ops_cuda.cpp).
void set_decode_attention_kernel(bool enabled);
bool decode_attention_kernel();

// swiglu: gate and up of one shape, dtype and device (made contiguous).
struct SwiGLUChecked {
  at::Tensor gate, up, dh;  // contiguous (dh: backward only)
  int64_t n;
  qlora::FloatType type;
  at::Tensor gate_scale, up_scale;  // swiglu_scaled: contiguous [I]; undefined otherwise
  // The kernels' view of the scales (no scales: nullptr).
  qlora::SwiGLUScales scales() const {
    if (!gate_scale.defined()) return {};
    return {gate_scale.data_ptr(), up_scale.data_ptr(), gate_scale.numel()};
  }
};
SwiGLUChecked check_swiglu(const at::Tensor& gate, const at::Tensor& up);
SwiGLUChecked check_swiglu_backward(const at::Tensor& dh, const at::Tensor& gate,
                                    const at::Tensor& up);
// swiglu_backward_ (in place over gate and up): gate and up must be contiguous and share no
// memory with each other or with dh.
SwiGLUChecked check_swiglu_backward_inplace(const at::Tensor& dh, const at::Tensor& gate,
                                            const at::Tensor& up);
// swiglu_scaled(_backward): the plain checks, then gate_scale and up_scale [I] of gate's dtype and
// device, I = gate's last dimension (at least one).
SwiGLUChecked check_swiglu_scaled(const at::Tensor& gate, const at::Tensor& up,
                                  const at::Tensor& gate_scale, const at::Tensor& up_scale);
SwiGLUChecked check_swiglu_scaled_backward(const at::Tensor& dh, const at::Tensor& gate,
                                           const at::Tensor& up, const at::Tensor& gate_scale,
                                           const at::Tensor& up_scale);

// Rows per parallel task for row-wise kernels over rows of `width` elements: >= 16K elements each.
int64_t grain_rows(int64_t width);

}  // namespace qlora_torch
