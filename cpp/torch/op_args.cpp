#include "op_args.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <limits>
#include <string>

namespace qlora_torch {
namespace {

void check_nf4_blocksize(int64_t blocksize, const char* arg) {
  QLORA_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              arg, " must be a power of two in [32, 4096], got ", blocksize);
}

void check_power_of_two_blocksize(int64_t blocksize, const char* arg) {
  QLORA_CHECK(blocksize >= 1 && blocksize <= (int64_t(1) << 30) && (blocksize & (blocksize - 1)) == 0,
              arg, " must be a positive power of two, got ", blocksize);
}

void check_numel(const at::Tensor& t, int64_t expected, const char* arg, const char* why) {
  QLORA_CHECK(t.numel() == expected, arg, " must have ", expected, " elements (", why, "), got ",
              t.numel(), " (shape ", t.sizes(), ")");
}

// A code map must be sorted for the nearest-code search. A CPU map is checked here; a device map
// is not (that would cost a device-to-host copy and a sync per call): the Python wrapper checks any
// map that is not the library's own (qlora_ext/_ops.py).
void check_code_map(const at::Tensor& code, const char* arg) {
  check_dtype(code, at::kFloat, arg);
  check_numel(code, qlora::kCodeMapSize, arg, "a 256-entry code map");
  if (!code.device().is_cpu()) return;
  const at::Tensor host = code.contiguous();
  const float* c = host.data_ptr<float>();
  for (int i = 0; i + 1 < qlora::kCodeMapSize; ++i) {
    QLORA_CHECK(c[i] <= c[i + 1], arg, " must be sorted ascending (entry ", i, " = ", c[i],
                " > entry ", i + 1, " = ", c[i + 1], ")");
  }
}

}  // namespace

qlora::FloatType float_type_of(at::ScalarType dtype, const char* arg) {
  switch (dtype) {
    case at::kFloat: return qlora::FloatType::F32;
    case at::kHalf: return qlora::FloatType::F16;
    case at::kBFloat16: return qlora::FloatType::BF16;
    default:
      QLORA_CHECK(false, arg, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* arg,
                       const char* reference_arg) {
  QLORA_CHECK(t.device() == reference.device(), arg, " is on ", t.device(), " but ",
              reference_arg, " is on ", reference.device(), "; move both to one device");
}

void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* arg) {
  QLORA_CHECK(t.scalar_type() == dtype, arg, " must be ", dtype, ", got ", t.scalar_type());
}

NF4QuantizeArgs check_nf4_quantize(const at::Tensor& weight, int64_t blocksize) {
  check_nf4_blocksize(blocksize, "blocksize");
  NF4QuantizeArgs args;
  args.type = float_type_of(weight.scalar_type(), "weight");
  QLORA_CHECK(!weight.is_sparse(), "weight must be a dense tensor");
  args.weight = weight.contiguous();
  args.n = weight.numel();
  args.n_blocks = ceil_div(args.n, blocksize);
  return args;
}

qlora::NF4Scales NF4DequantizeArgs::scales() const {
  qlora::NF4Scales s;
  if (!nested) {
    s.absmax = absmax.data_ptr<float>();
    return s;
  }
  s.absmax_codes = absmax.data_ptr<uint8_t>();
  s.nested_code = nested_code.data_ptr<float>();
  s.nested_absmax = nested_absmax.data_ptr<float>();
  s.nested_offset = nested_offset.data_ptr<float>();
  return s;
}

NF4DequantizeArgs check_nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, c10::SymIntArrayRef shape,
                                       at::ScalarType dtype,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset,
                                       int64_t nested_blocksize) {
  check_nf4_blocksize(blocksize, "blocksize");
  NF4DequantizeArgs args;
  args.type = float_type_of(dtype, "dtype");
  int64_t n = 1;
  for (const auto& d : shape) {
    const int64_t size = d.expect_int();
    QLORA_CHECK(size >= 0, "shape must not have negative sizes, got ", shape);
    n *= size;
  }
  args.n = n;
  args.n_blocks = ceil_div(n, blocksize);
  check_dtype(packed, at::kByte, "packed");
  check_numel(packed, (n + 1) / 2, "packed", "two 4-bit codes per byte of the shape's elements");
  check_same_device(absmax, packed, "absmax", "packed");
  check_numel(absmax, args.n_blocks, "absmax", "one scale per block");
  args.packed = packed.contiguous();

  const int given = int(nested_absmax.has_value()) + int(nested_code.has_value()) +
                    int(nested_offset.has_value());
  QLORA_CHECK(given == 0 || given == 3,
              "nested_absmax, nested_code and nested_offset go together (double quantization); "
              "got ", given, " of the 3");
  args.nested = given == 3;
  if (!args.nested) {
    check_dtype(absmax, at::kFloat, "absmax");
    args.absmax = absmax.contiguous();
    return args;
  }
  check_power_of_two_blocksize(nested_blocksize, "nested_blocksize");
  check_dtype(absmax, at::kByte, "absmax (8-bit codes when double-quantized)");
  check_dtype(*nested_absmax, at::kFloat, "nested_absmax");
  check_dtype(*nested_code, at::kFloat, "nested_code");
  check_dtype(*nested_offset, at::kFloat, "nested_offset");
  check_same_device(*nested_absmax, packed, "nested_absmax", "packed");
  check_same_device(*nested_code, packed, "nested_code", "packed");
  check_same_device(*nested_offset, packed, "nested_offset", "packed");
  check_numel(*nested_absmax, ceil_div(args.n_blocks, nested_blocksize), "nested_absmax",
              "one scale per nested block");
  check_numel(*nested_code, qlora::kCodeMapSize, "nested_code", "a 256-entry code map");
  check_numel(*nested_offset, 1, "nested_offset", "one offset");
  args.absmax = absmax.contiguous();
  args.nested_absmax = nested_absmax->contiguous();
  args.nested_code = nested_code->contiguous();
  args.nested_offset = nested_offset->contiguous();
  return args;
}

NF4DequantizeArgs check_nf4_dequantize_into(const at::Tensor& out, const at::Tensor& packed,
                                            const at::Tensor& absmax, int64_t blocksize,
                                            const std::optional<at::Tensor>& nested_absmax,
                                            const std::optional<at::Tensor>& nested_code,
                                            const std::optional<at::Tensor>& nested_offset,
                                            int64_t nested_blocksize) {
  const bool rows = out.dim() == 2 && out.stride(1) == 1 && out.stride(0) >= out.size(1);
  QLORA_CHECK(out.is_contiguous() || rows,
              "out must be contiguous, or 2-D [N, K] with unit stride along K (rows of a wider "
              "matrix): deq(W) is written in row-major order; got shape ", out.sizes(),
              " and strides ", out.strides());
  check_same_device(out, packed, "out", "packed");
  float_type_of(out.scalar_type(), "out");
  NF4DequantizeArgs args =
      check_nf4_dequantize(packed, absmax, blocksize, out.sym_sizes(), out.scalar_type(),
                           nested_absmax, nested_code, nested_offset, nested_blocksize);
  const bool strided = !out.is_contiguous() && out.numel() > 0;
  args.row_elements = strided ? out.size(1) : std::max<int64_t>(args.n, 1);
  args.row_stride = strided ? out.stride(0) : args.row_elements;
  return args;
}

namespace {

// nf4_gemv and nf4_gemm: the same arguments, `op` taking at most `max_rows` rows of x.
NF4GemvArgs check_nf4_product(const char* op, int64_t max_rows, const char* beyond,
                              const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& absmax, int64_t blocksize,
                              c10::SymIntArrayRef weight_shape,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& nested_offset,
                              int64_t nested_blocksize) {
  NF4GemvArgs args;
  args.type = float_type_of(x.scalar_type(), "x");
  QLORA_CHECK(x.dim() >= 1, "x must have at least one dimension [..., K], got a 0-d tensor");
  QLORA_CHECK(weight_shape.size() == 2, "weight_shape must be [N, K] (2 dimensions), got ",
              weight_shape);
  args.N = weight_shape[0].expect_int();
  args.K = weight_shape[1].expect_int();
  QLORA_CHECK(x.size(-1) == args.K, "x must have K = weight_shape[1] = ", args.K,
              " elements in its last dimension, got shape ", x.sizes());
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  args.M = M;
  QLORA_CHECK(M <= max_rows, "x has M = ", M,
              " rows (the product of its leading dimensions, shape ", x.sizes(), "); ", op,
              " takes at most ", max_rows, ": use ", beyond, " for more");
  check_same_device(packed, x, "packed", "x");
  args.weight = check_nf4_dequantize(packed, absmax, blocksize, weight_shape, x.scalar_type(),
                                     nested_absmax, nested_code, nested_offset, nested_blocksize);
  if (bias.has_value()) {
    check_same_device(*bias, x, "bias", "x");
    QLORA_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    QLORA_CHECK(bias->dim() == 1 && bias->size(0) == args.N, "bias must be [N] = [", args.N,
                "], got shape ", bias->sizes());
    args.bias = bias->contiguous();
  }
  args.x = x.contiguous().view({M, args.K});
  args.out_shape = x.sizes().vec();
  args.out_shape.back() = args.N;
  return args;
}

}  // namespace

NF4GemvArgs check_nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, c10::SymIntArrayRef weight_shape,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           int64_t nested_blocksize) {
  return check_nf4_product("nf4_gemv", kNF4GemvMaxRows, "nf4_gemm", x, packed, absmax, blocksize,
                           weight_shape, bias, nested_absmax, nested_code, nested_offset,
                           nested_blocksize);
}

NF4GemvGroupedArgs check_nf4_gemv_grouped(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                          int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                          const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                          const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  const size_t count = rows.size();
  QLORA_CHECK(count >= 1, "rows must name at least one part, got an empty list");
  QLORA_CHECK(packed.size() == count, "packed must hold one tensor per part (rows has ", count,
              " entries), got ", packed.size());
  QLORA_CHECK(absmax.size() == count, "absmax must hold one tensor per part (rows has ", count,
              " entries), got ", absmax.size());
  const bool nested = nested_code.has_value();
  QLORA_CHECK(nested_absmax.size() == (nested ? count : 0) && nested_offset.size() == (nested ? count : 0),
              "nested_absmax and nested_offset must hold one tensor per part with nested_code (double "
              "quantization) and none without it; got ", nested_absmax.size(), " and ", nested_offset.size(),
              " for ", count, " parts", nested ? " with" : " without", " nested_code");
  QLORA_CHECK(x.dim() >= 1, "x must have at least one dimension [..., K], got a 0-d tensor");
  NF4GemvGroupedArgs args;
  args.type = float_type_of(x.scalar_type(), "x");
  args.K = x.size(-1);
  args.N = 0;
  for (size_t p = 0; p < count; ++p) {
    QLORA_CHECK(rows[p] >= 0, "rows must be non-negative, got rows[", p, "] = ", rows[p]);
    args.N += rows[p];
  }
  if (bias.has_value()) {
    check_same_device(*bias, x, "bias", "x");
    QLORA_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
                bias->scalar_type());
    QLORA_CHECK(bias->dim() == 1 && bias->size(0) == args.N, "bias must be [sum(rows)] = [", args.N,
                "], got shape ", bias->sizes());
    args.bias = bias->contiguous();
  }
  int64_t first_row = 0;
  for (size_t p = 0; p < count; ++p) {
    const std::vector<c10::SymInt> shape{c10::SymInt(rows[p]), c10::SymInt(args.K)};
    std::optional<at::Tensor> part_bias;
    if (args.bias.defined()) part_bias = args.bias.narrow(0, first_row, rows[p]);
    try {
      args.parts.push_back(check_nf4_gemv(x, packed[p], absmax[p], blocksize, shape, part_bias,
                                          nested ? std::optional<at::Tensor>(nested_absmax[p]) : std::nullopt,
                                          nested_code,
                                          nested ? std::optional<at::Tensor>(nested_offset[p]) : std::nullopt,
                                          nested_blocksize));
    } catch (const c10::Error& e) {
      QLORA_CHECK(false, "part ", p, " (packed[", p, "], absmax[", p, "], rows[", p, "] = ", rows[p],
                  "): ", e.msg());
    }
    first_row += rows[p];
  }
  args.M = args.parts[0].M;
  args.out_shape = x.sizes().vec();
  args.out_shape.back() = args.N;
  return args;
}

NF4GemvGroupedArgs check_nf4_gemv_swiglu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                         int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                         const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                         const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  QLORA_CHECK(rows.size() == 2, "nf4_gemv_swiglu: rows must name two parts (gate, up), got ", rows.size());
  QLORA_CHECK(rows[0] == rows[1], "nf4_gemv_swiglu: gate and up must have equal rows, got rows = [", rows[0], ", ",
              rows[1], "]");
  NF4GemvGroupedArgs args = check_nf4_gemv_grouped(x, packed, absmax, blocksize, rows, nested_absmax, nested_code,
                                                   nested_offset, bias, nested_blocksize);
  args.out_shape.back() = rows[0];
  return args;
}

NF4GemvArgs check_nf4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, c10::SymIntArrayRef weight_shape,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           int64_t nested_blocksize) {
  // Any number of rows: past the kernels' ranges the op dequantizes and multiplies (ops_cuda.cpp).
  return check_nf4_product("nf4_gemm", std::numeric_limits<int64_t>::max(),
                           "nf4_dequantize and a matrix product", x, packed, absmax, blocksize,
                           weight_shape, bias, nested_absmax, nested_code, nested_offset,
                           nested_blocksize);
}

Blockwise8Args check_blockwise8_quantize(const at::Tensor& x, const at::Tensor& code,
                                         int64_t blocksize,
                                         const std::optional<at::Tensor>& offset) {
  check_power_of_two_blocksize(blocksize, "blocksize");
  check_dtype(x, at::kFloat, "x");
  check_same_device(code, x, "code", "x");
  check_code_map(code, "code");
  Blockwise8Args args{x.contiguous(), code.contiguous(), x.numel(), ceil_div(x.numel(), blocksize),
                      std::nullopt};
  if (offset.has_value()) {
    check_dtype(*offset, at::kFloat, "offset");
    check_same_device(*offset, x, "offset", "x");
    check_numel(*offset, 1, "offset", "one value");
    args.offset = offset->contiguous();
  }
  return args;
}

Blockwise8Args check_blockwise8_dequantize(const at::Tensor& codes, const at::Tensor& absmax,
                                           const at::Tensor& code, int64_t blocksize) {
  check_power_of_two_blocksize(blocksize, "blocksize");
  check_dtype(codes, at::kByte, "codes");
  check_dtype(absmax, at::kFloat, "absmax");
  check_dtype(code, at::kFloat, "code");
  check_same_device(absmax, codes, "absmax", "codes");
  check_same_device(code, codes, "code", "codes");
  check_numel(code, qlora::kCodeMapSize, "code", "a 256-entry code map");
  const int64_t n_blocks = ceil_div(codes.numel(), blocksize);
  check_numel(absmax, n_blocks, "absmax", "one scale per block");
  Blockwise8Args args{codes.contiguous(), code.contiguous(), codes.numel(), n_blocks};
  return args;
}

namespace {

// "params[3]": the name of element i of a list argument.
std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_adamw_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                       int64_t step, double grad_scale) {
  QLORA_CHECK(std::isfinite(lr) && lr >= 0.0, "lr must be a finite number >= 0, got ", lr);
  QLORA_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  QLORA_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  QLORA_CHECK(std::isfinite(eps) && eps > 0.0, "eps must be a finite number > 0, got ", eps);
  QLORA_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "weight_decay must be a finite number >= 0, got ", weight_decay);
  QLORA_CHECK(step >= 1, "step must be >= 1 (the count of this update, bias correction), got ", step);
  QLORA_CHECK(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
}

// A tensor written in place: dense, contiguous, of `dtype`, n elements, on `device`.
void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t n, const at::Device& device,
                 const std::string& arg, const char* what) {
  QLORA_CHECK(t.layout() == at::kStrided, arg, " must be a dense tensor");
  check_dtype(t, dtype, arg.c_str());
  check_numel(t, n, arg.c_str(), what);
  QLORA_CHECK(t.device() == device, arg, " is on ", t.device(), " but its parameter is on ",
              device, "; move both to one device");
  QLORA_CHECK(t.is_contiguous(), arg, " must be contiguous (it is updated in place)");
}

// Checks param i and its grad, appends the contiguous grad; returns the param's element type.
qlora::FloatType check_param_and_grad(const at::Tensor& param, const at::Tensor& grad, size_t i,
                                      AdamWStepArgs& args) {
  const std::string p = item("params", i), g = item("grads", i);
  QLORA_CHECK(param.layout() == at::kStrided, p, " must be a dense tensor");
  const qlora::FloatType type = float_type_of(param.scalar_type(), p.c_str());
  QLORA_CHECK(param.is_contiguous(), p, " must be contiguous (it is updated in place)");
  if (!args.device) args.device = param.device();
  QLORA_CHECK(param.device() == *args.device, p, " is on ", param.device(), " but params[0] is on ",
              *args.device, "; one call updates tensors of one device");
  QLORA_CHECK(grad.layout() == at::kStrided, g, " must be a dense tensor, got layout ",
              grad.layout(), " (sparse gradients are not supported)");
  QLORA_CHECK(grad.scalar_type() == param.scalar_type(), g, " must have its parameter's dtype ",
              param.scalar_type(), ", got ", grad.scalar_type());
  check_numel(grad, param.numel(), g.c_str(), "one gradient per parameter element");
  QLORA_CHECK(grad.device() == param.device(), g, " is on ", grad.device(), " but ", p, " is on ",
              param.device());
  args.grads.push_back(grad.contiguous());
  args.types.push_back(type);
  return type;
}

void check_list_lengths(std::initializer_list<std::pair<const char*, size_t>> lists) {
  const auto& first = *lists.begin();
  for (const auto& l : lists) {
    QLORA_CHECK(l.second == first.second, l.first, " has ", l.second, " tensors but ", first.first,
                " has ", first.second, "; the lists go together element by element");
  }
}

}  // namespace

AdamWStepArgs check_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                               double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  check_list_lengths({{"params", params.size()}, {"grads", grads.size()},
                      {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()}});
  AdamWStepArgs args;
  args.hyper = qlora::make_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  for (size_t i = 0; i < params.size(); ++i) {
    check_param_and_grad(params[i], grads[i], i, args);
    const int64_t n = params[i].numel();
    check_state(exp_avgs[i], at::kFloat, n, *args.device, item("exp_avgs", i), "one per parameter element");
    check_state(exp_avg_sqs[i], at::kFloat, n, *args.device, item("exp_avg_sqs", i),
                "one per parameter element");
    qlora::AdamW32Tensor t;
    t.param = params[i].data_ptr();
    t.grad = args.grads.back().data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.n = n;
    args.tensors32.push_back(t);
  }
  return args;
}

AdamWStepArgs check_adamw_step_8bit(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avg_codes, at::TensorList exp_avg_absmax,
                                    at::TensorList exp_avg_sq_codes,
                                    at::TensorList exp_avg_sq_absmax, const at::Tensor& exp_avg_map,
                                    const at::Tensor& exp_avg_sq_map, double lr, double beta1,
                                    double beta2, double eps, double weight_decay, int64_t step,
                                    double grad_scale) {
  check_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  check_list_lengths({{"params", params.size()}, {"grads", grads.size()},
                      {"exp_avg_codes", exp_avg_codes.size()},
                      {"exp_avg_absmax", exp_avg_absmax.size()},
                      {"exp_avg_sq_codes", exp_avg_sq_codes.size()},
                      {"exp_avg_sq_absmax", exp_avg_sq_absmax.size()}});
  AdamWStepArgs args;
  args.hyper = qlora::make_adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  // Sortedness needs the values; it is checked for host maps only, since reading a device map
  // would synchronise every optimizer step (the optimizer passes qlora_ext.codebooks' maps).
  for (const auto& [map, name] : {std::pair<const at::Tensor&, const char*>{exp_avg_map, "exp_avg_map"},
                                  {exp_avg_sq_map, "exp_avg_sq_map"}}) {
    if (map.is_cpu()) {
      check_code_map(map, name);
    } else {
      check_dtype(map, at::kFloat, name);
      check_numel(map, qlora::kCodeMapSize, name, "a 256-entry code map");
    }
  }
  args.exp_avg_map = exp_avg_map.contiguous();
  args.exp_avg_sq_map = exp_avg_sq_map.contiguous();
  for (size_t i = 0; i < params.size(); ++i) {
    check_param_and_grad(params[i], grads[i], i, args);
    const int64_t n = params[i].numel();
    const int64_t n_blocks = ceil_div(n, qlora::kAdamW8BlockSize);
    const at::Device& device = *args.device;
    check_state(exp_avg_codes[i], at::kByte, n, device, item("exp_avg_codes", i),
                "one code per parameter element");
    check_state(exp_avg_absmax[i], at::kFloat, n_blocks, device, item("exp_avg_absmax", i),
                "one scale per block of 256");
    check_state(exp_avg_sq_codes[i], at::kByte, n, device, item("exp_avg_sq_codes", i),
                "one code per parameter element");
    check_state(exp_avg_sq_absmax[i], at::kFloat, n_blocks, device, item("exp_avg_sq_absmax", i),
                "one scale per block of 256");
    qlora::AdamW8Tensor t;
    t.param = params[i].data_ptr();
    t.grad = args.grads.back().data_ptr();
    t.exp_avg_codes = exp_avg_codes[i].data_ptr<uint8_t>();
    t.exp_avg_absmax = exp_avg_absmax[i].data_ptr<float>();
    t.exp_avg_sq_codes = exp_avg_sq_codes[i].data_ptr<uint8_t>();
    t.exp_avg_sq_absmax = exp_avg_sq_absmax[i].data_ptr<float>();
    t.n = n;
    args.tensors8.push_back(t);
  }
  if (args.device) {
    check_same_device(args.exp_avg_map, params[0], "exp_avg_map", "params[0]");
    check_same_device(args.exp_avg_sq_map, params[0], "exp_avg_sq_map", "params[0]");
  }
  return args;
}

}  // namespace qlora_torch
