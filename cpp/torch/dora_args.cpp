#include "dora_args.h"

#include "op_args.h"

namespace qlora_torch {
namespace {

// Adapter tensors may be fp32 (the usual case: no copy is made), fp16 or bf16 (read as fp32).
at::Tensor as_float32(const at::Tensor& t, const char* arg) {
  float_type_of(t.scalar_type(), arg);
  return t.to(at::kFloat).contiguous();
}

void check_vector(const at::Tensor& t, int64_t n, const char* arg) {
  QLORA_CHECK(t.dim() == 1 && t.size(0) == n, arg, " must be [N] = [", n, "], got ", t.sizes());
}

void check_device(const at::Tensor& t, const at::Tensor& reference, const char* arg,
                  const char* reference_arg) {
  QLORA_CHECK(t.device() == reference.device(), arg, " is on ", t.device(), " but ",
              reference_arg, " is on ", reference.device(), "; move both to one device");
}

}  // namespace

DoRAScaleArgs check_dora_scale(const at::Tensor& wa, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const at::Tensor& weight_sq,
                               const at::Tensor& magnitude, double scale, bool stacked,
                               at::IntArrayRef rows, at::ArrayRef<double> scales) {
  DoRAScaleArgs a;
  const int64_t layers = stacked ? int64_t(rows.size()) : 1;
  QLORA_CHECK(layers >= 1 && layers <= qlora::kMaxDoRAStack, "rows must list 1 to ",
              qlora::kMaxDoRAStack, " layers' output rows, got ", rows.size());
  QLORA_CHECK(int64_t(scales.size()) == (stacked ? layers : 0), "scales must have one entry per ",
              "layer of rows (", layers, "), got ", scales.size());
  QLORA_CHECK(wa.dim() == 2, "wa must be [N, ", stacked ? "S·r" : "r", "] (deq(W)·Aᵀ), got ",
              wa.sizes());
  a.type = float_type_of(wa.scalar_type(), "wa");
  a.N = wa.size(0);
  QLORA_CHECK(wa.size(1) % layers == 0, "wa must be [N, S·r] for the S = ", layers,
              " layers of rows, got ", wa.sizes());
  a.r = wa.size(1) / layers;
  QLORA_CHECK(lora_A.dim() == 2 && lora_A.size(0) == wa.size(1), "lora_A must be [",
              stacked ? "S·r" : "r", ", K] with ", stacked ? "S·r" : "r", " = ", wa.size(1),
              ", got ", lora_A.sizes());
  QLORA_CHECK(lora_B.dim() == 2 && lora_B.size(0) == a.N && lora_B.size(1) == a.r,
              "lora_B must be [N, r] = [", a.N, ", ", a.r, "], got ", lora_B.sizes());
  a.stack.count = int(layers);
  int64_t end = 0;
  for (int64_t j = 0; j < layers; ++j) {
    const int64_t n = stacked ? rows[j] : a.N;
    QLORA_CHECK(n >= 0, "rows must be >= 0, got ", rows);
    end += n;
    a.stack.row_end[j] = end;
    a.stack.scale[j] = float(stacked ? scales[j] : scale);
  }
  QLORA_CHECK(end == a.N, "rows must sum to wa's N = ", a.N, ", got ", rows);
  check_vector(weight_sq, a.N, "weight_sq");
  QLORA_CHECK(weight_sq.scalar_type() == at::kFloat, "weight_sq must be float32, got ",
              weight_sq.scalar_type());
  check_vector(magnitude, a.N, "magnitude");
  check_device(lora_A, wa, "lora_A", "wa");
  check_device(lora_B, wa, "lora_B", "wa");
  check_device(weight_sq, wa, "weight_sq", "wa");
  check_device(magnitude, wa, "magnitude", "wa");
  a.wa = wa.contiguous();
  a.lora_a = as_float32(lora_A, "lora_A");
  a.lora_b = as_float32(lora_B, "lora_B");
  a.weight_sq = weight_sq.contiguous();
  a.magnitude = as_float32(magnitude, "magnitude");
  return a;
}

DoRAScaleBackwardArgs check_dora_scale_backward(const at::Tensor& dy, const at::Tensor& z,
                                                const at::Tensor& col_scale,
                                                const at::Tensor& inv_norm) {
  DoRAScaleBackwardArgs a;
  QLORA_CHECK(dy.dim() >= 1, "dy must be [..., N], got a 0-d tensor");
  a.type = float_type_of(dy.scalar_type(), "dy");
  QLORA_CHECK(z.sizes() == dy.sizes(), "z must have dy's shape ", dy.sizes(), ", got ", z.sizes());
  QLORA_CHECK(z.scalar_type() == dy.scalar_type() && col_scale.scalar_type() == dy.scalar_type(),
              "z and col_scale must have dy's dtype ", dy.scalar_type(), ", got ", z.scalar_type(),
              " and ", col_scale.scalar_type());
  a.N = dy.size(-1);
  a.M = 1;
  for (int64_t d = 0; d + 1 < dy.dim(); ++d) a.M *= dy.size(d);
  check_vector(col_scale, a.N, "col_scale");
  check_vector(inv_norm, a.N, "inv_norm");
  QLORA_CHECK(inv_norm.scalar_type() == at::kFloat, "inv_norm must be float32, got ",
              inv_norm.scalar_type());
  check_device(z, dy, "z", "dy");
  check_device(col_scale, dy, "col_scale", "dy");
  check_device(inv_norm, dy, "inv_norm", "dy");
  a.dy = dy.contiguous();
  a.z = z.contiguous();
  a.col_scale = col_scale.contiguous();
  a.inv_norm = inv_norm.contiguous();
  return a;
}

SwiGLUDoRABackwardArgs check_swiglu_scaled_dora_backward(
    const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& gate_scale, const at::Tensor& up_scale, const at::Tensor& gate_inv_norm,
    const at::Tensor& up_inv_norm) {
  SwiGLUDoRABackwardArgs a;
  a.swiglu = check_swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale);
  a.N = gate.size(-1);
  a.M = gate.numel() / a.N;  // N >= 1: checked with the scales
  for (const auto& [t, arg] : {std::pair{&gate_inv_norm, "gate_inv_norm"}, {&up_inv_norm, "up_inv_norm"}}) {
    check_vector(*t, a.N, arg);
    QLORA_CHECK(t->scalar_type() == at::kFloat, arg, " must be float32, got ", t->scalar_type());
    check_device(*t, gate, arg, "gate");
  }
  a.gate_inv_norm = gate_inv_norm.contiguous();
  a.up_inv_norm = up_inv_norm.contiguous();
  return a;
}

DoRAColumnScaleArgs check_dora_column_scale(const at::Tensor& z, const at::Tensor& col_scale,
                                            const std::optional<at::Tensor>& bias) {
  DoRAColumnScaleArgs a;
  QLORA_CHECK(z.dim() >= 1, "z must be [..., N], got a 0-d tensor");
  a.type = float_type_of(z.scalar_type(), "z");
  a.N = z.size(-1);
  a.M = 1;
  for (int64_t d = 0; d + 1 < z.dim(); ++d) a.M *= z.size(d);
  check_vector(col_scale, a.N, "col_scale");
  QLORA_CHECK(col_scale.scalar_type() == z.scalar_type(), "col_scale must have z's dtype ",
              z.scalar_type(), ", got ", col_scale.scalar_type());
  check_device(col_scale, z, "col_scale", "z");
  a.z = z.contiguous();
  a.col_scale = col_scale.contiguous();
  if (bias.has_value() && bias->defined()) {
    check_vector(*bias, a.N, "bias");
    QLORA_CHECK(bias->scalar_type() == z.scalar_type(), "bias must have z's dtype ",
                z.scalar_type(), ", got ", bias->scalar_type());
    check_device(*bias, z, "bias", "z");
    a.bias = bias->contiguous();
  }
  return a;
}

}  // namespace qlora_torch
