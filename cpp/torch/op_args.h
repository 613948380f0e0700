// Argument validation shared by the CPU and CUDA registrations: each check names the argument
// and what was expected, so a bad call fails with a clear message instead of a crash or garbage.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/adamw.h"
#include "qlora/blockwise8.h"
#include "qlora/float_types.h"
#include "qlora/nf4.h"

namespace qlora_torch {

// Error messages are assembled without streaming numbers through std::ostream. On the H100
// machine's toolchain (g++ 13.3, torch 2.11 CUDA wheels) this module carried its own instances of
// libstdc++'s numeric stream insertion, and inserting an integer into c10::str crashed in num_put
// (strings were fine). QLORA_CHECK formats each argument itself and hands TORCH_CHECK one string.
namespace msg {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, double(v)); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::Layout v) { s += v == c10::kStrided ? "Strided" : (v == c10::kSparse ? "Sparse" : "non-strided"); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
inline void append(std::string& s, c10::SymIntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    const auto value = v[i].maybe_as_int();
    s += (i ? ", " : "") + (value ? std::to_string(*value) : std::string("?"));
  }
  s += "]";
}
template <typename... Args>
std::string make(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
}  // namespace msg

#define QLORA_CHECK(cond, ...) TORCH_CHECK(cond, ::qlora_torch::msg::make(__VA_ARGS__))


// The kernel layer's element type for a float tensor; rejects every other dtype.
qlora::FloatType float_type_of(at::ScalarType dtype, const char* arg);

int64_t ceil_div(int64_t a, int64_t b);

// "<arg> is on <device> but <reference_arg> is on <device>" unless both are on one device.
void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* arg,
                       const char* reference_arg);
// "<arg> must be <dtype>, got <dtype>".
void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* arg);

// Checks shared by both devices; they return what the kernels need.
struct NF4QuantizeArgs {
  at::Tensor weight;  // contiguous
  int64_t n;
  int64_t n_blocks;
  qlora::FloatType type;
};
NF4QuantizeArgs check_nf4_quantize(const at::Tensor& weight, int64_t blocksize);

struct NF4DequantizeArgs {
  at::Tensor packed, absmax, nested_absmax, nested_code, nested_offset;  // contiguous
  int64_t n;
  int64_t n_blocks;
  qlora::FloatType type;
  bool nested;
  // nf4_dequantize_into's out: W's rows (row_elements each) at row_stride elements apart; equal
  // where out is contiguous (and for nf4_dequantize, whose out is: n, n).
  int64_t row_elements = 0, row_stride = 0;
  // Kernel view of the scales; pointers into the tensors above.
  qlora::NF4Scales scales() const;
};
NF4DequantizeArgs check_nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, c10::SymIntArrayRef shape,
                                       at::ScalarType dtype,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset,
                                       int64_t nested_blocksize);
// The same for nf4_dequantize_into: shape and dtype are out's; out must be contiguous, or 2-D
// with unit column stride (rows of a wider matrix), on packed's device.
NF4DequantizeArgs check_nf4_dequantize_into(const at::Tensor& out, const at::Tensor& packed,
                                            const at::Tensor& absmax, int64_t blocksize,
                                            const std::optional<at::Tensor>& nested_absmax,
                                            const std::optional<at::Tensor>& nested_code,
                                            const std::optional<at::Tensor>& nested_offset,
                                            int64_t nested_blocksize);

struct NF4GemvArgs {
  at::Tensor x;     // contiguous, viewed as [M, K]
  at::Tensor bias;  // contiguous [N], or undefined
  NF4DequantizeArgs weight;
  int64_t M, N, K;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [N]
  qlora::FloatType type;
};
NF4GemvArgs check_nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, c10::SymIntArrayRef weight_shape,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           int64_t nested_blocksize);
// The same checks for nf4_gemm, which takes any number of rows.
NF4GemvArgs check_nf4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, c10::SymIntArrayRef weight_shape,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           int64_t nested_blocksize);

// nf4_gemv_grouped: x and the parts' weights [rows[p], K] (K = x's last dimension), each part
// checked as nf4_gemv checks its arguments (its bias: bias's slice of its rows); errors name the
// part. The lists hold one tensor per part (the nested ones: none, without double quantization).
struct NF4GemvGroupedArgs {
  std::vector<NF4GemvArgs> parts;
  at::Tensor bias;  // contiguous [N], or undefined
  int64_t M, N, K;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [N], N = sum(rows)
  qlora::FloatType type;
};
NF4GemvGroupedArgs check_nf4_gemv_grouped(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                          int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                          const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                          const std::optional<at::Tensor>& bias, int64_t nested_blocksize);

// nf4_gemv_grouped's checks plus nf4_gemv_swiglu's: two parts (gate, up) of equal rows. out_shape
// is then [..., rows[0]].
NF4GemvGroupedArgs check_nf4_gemv_swiglu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                         int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                         const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                         const std::optional<at::Tensor>& bias, int64_t nested_blocksize);

// nf4_gemv_swiglu as nf4_gemv_grouped then swiglu, through the dispatcher (composite_ops.cpp): the
// CPU kernel, and the CUDA one where the fused launch does not apply. Arguments already checked.
at::Tensor nf4_gemv_swiglu_composite(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                     int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                     const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                     const std::optional<at::Tensor>& bias, int64_t nested_blocksize);

// Largest M (product of x's leading dimensions) that nf4_gemv accepts.
constexpr int64_t kNF4GemvMaxRows = 16;

struct Blockwise8Args {
  at::Tensor data, code;  // contiguous
  int64_t n;
  int64_t n_blocks;
  std::optional<at::Tensor> offset;  // quantize: fp32 [1] subtracted from x first
};
Blockwise8Args check_blockwise8_quantize(const at::Tensor& x, const at::Tensor& code,
                                         int64_t blocksize,
                                         const std::optional<at::Tensor>& offset);
Blockwise8Args check_blockwise8_dequantize(const at::Tensor& codes, const at::Tensor& absmax,
                                           const at::Tensor& code, int64_t blocksize);

// AdamW steps (adamw_ops_cpu.cpp, adamw_ops_cuda.cpp). Tensors i of each list belong together;
// params and state are updated in place, so they must be contiguous; grads are made contiguous.
struct AdamWStepArgs {
  std::vector<qlora::AdamW32Tensor> tensors32;  // adamw_step
  std::vector<qlora::AdamW8Tensor> tensors8;    // adamw_step_8bit
  std::vector<qlora::FloatType> types;          // per tensor
  std::vector<at::Tensor> grads;                // contiguous, kept alive for the kernels
  at::Tensor exp_avg_map, exp_avg_sq_map;       // 8-bit only, contiguous
  qlora::AdamWHyper hyper;
  std::optional<at::Device> device;             // of every tensor; empty for empty lists
};
AdamWStepArgs check_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                               double eps, double weight_decay, int64_t step, double grad_scale);
AdamWStepArgs check_adamw_step_8bit(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avg_codes, at::TensorList exp_avg_absmax,
                                    at::TensorList exp_avg_sq_codes,
                                    at::TensorList exp_avg_sq_absmax, const at::Tensor& exp_avg_map,
                                    const at::Tensor& exp_avg_sq_map, double lr, double beta1,
                                    double beta2, double eps, double weight_decay, int64_t step,
                                    double grad_scale);

}  // namespace qlora_torch
