// Argument validation of the DoRA operators (dora_scale, dora_scale_backward, dora_column_scale,
// swiglu_scaled_dora_backward), shared by the CPU and CUDA registrations (dora_ops_cpu.cpp,
// dora_ops_cuda.cpp); math and shapes: qlora/dora.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "block_op_args.h"
#include "qlora/dora.h"
#include "qlora/float_types.h"

namespace qlora_torch {

struct DoRAScaleArgs {
  at::Tensor wa;         // [N, S·r] of `type`, contiguous
  at::Tensor lora_a;     // fp32 [S·r, K] (for G = A·Aᵀ)
  at::Tensor lora_b;     // fp32 [N, r], contiguous
  at::Tensor weight_sq;  // fp32 [N], contiguous
  at::Tensor magnitude;  // fp32 [N], contiguous
  int64_t N, r;
  qlora::DoRAStack stack;  // S layers' rows and scales (S = 1: all N rows, `scale`)
  qlora::FloatType type;
};
// dora_scale (stacked false: one layer, `scale` its scale, `rows` and `scales` unused) and
// dora_scale_stacked (stacked true: S = rows.size() layers, `scale` unused): shapes as in
// qlora/dora.h's DoRAStack.
DoRAScaleArgs check_dora_scale(const at::Tensor& wa, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& weight_sq,
                               const at::Tensor& magnitude, double scale, bool stacked = false,
                               at::IntArrayRef rows = {}, at::ArrayRef<double> scales = {});

// The two schemas' entry points over one device's implementation `Impl` (validated arguments ->
// (col_scale, inv_norm)), for the CPU and CUDA registrations.
using DoRAScaleImpl = std::tuple<at::Tensor, at::Tensor> (*)(const DoRAScaleArgs&);

template <DoRAScaleImpl Impl>
std::tuple<at::Tensor, at::Tensor> dora_scale_op(const at::Tensor& wa, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B,
                                                 const at::Tensor& weight_sq,
                                                 const at::Tensor& magnitude, double scale) {
  return Impl(check_dora_scale(wa, lora_A, lora_B, weight_sq, magnitude, scale));
}

template <DoRAScaleImpl Impl>
std::tuple<at::Tensor, at::Tensor> dora_scale_stacked_op(
    const at::Tensor& wa, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& weight_sq, const at::Tensor& magnitude, at::IntArrayRef rows,
    at::ArrayRef<double> scales) {
  return Impl(check_dora_scale(wa, lora_A, lora_B, weight_sq, magnitude, 0.0, true, rows, scales));
}

struct DoRAScaleBackwardArgs {
  at::Tensor dy, z, col_scale;  // [M, N], [M, N], [N] of `type`, contiguous
  at::Tensor inv_norm;          // fp32 [N], contiguous
  int64_t M, N;
  qlora::FloatType type;
};
DoRAScaleBackwardArgs check_dora_scale_backward(const at::Tensor& dy, const at::Tensor& z,
                                                const at::Tensor& col_scale,
                                                const at::Tensor& inv_norm);

struct DoRAColumnScaleArgs {
  at::Tensor z, col_scale, bias;  // [M, N], [N], [N] or undefined, of `type`, contiguous
  int64_t M, N;
  qlora::FloatType type;
};
DoRAColumnScaleArgs check_dora_column_scale(const at::Tensor& z, const at::Tensor& col_scale,
                                            const std::optional<at::Tensor>& bias);

struct SwiGLUDoRABackwardArgs {
  SwiGLUChecked swiglu;                   // dh, gate (z_g), up (z_u) [M, N], their scales [N]
  at::Tensor gate_inv_norm, up_inv_norm;  // fp32 [N], contiguous
  int64_t M, N;
};
// swiglu_scaled_dora_backward: swiglu_scaled_backward's checks, then gate_inv_norm and up_inv_norm
// fp32 [N] (N = gate's last dimension) on gate's device.
SwiGLUDoRABackwardArgs check_swiglu_scaled_dora_backward(
    const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& gate_scale, const at::Tensor& up_scale, const at::Tensor& gate_inv_norm,
    const at::Tensor& up_inv_norm);

// dora_ops_cuda.cpp (CUDA builds): whether dora_scale takes G = A·Aᵀ from qlora's kernel (true,
// the default) or at::mm (false); process-wide (bindings.cpp: _C._set_dora_gram_kernel).
void set_dora_gram_kernel(bool enabled);
bool dora_gram_kernel();

}  // namespace qlora_torch
