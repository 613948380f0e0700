// CPU registrations: validate (op_args.h), then split whole quantization blocks over threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_args.h"
#include "qlora/blockwise8.h"
#include "qlora/nf4.h"

namespace qlora_torch {
namespace {

// Blocks per parallel task: enough work (>= 16K elements) to amortise scheduling.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize) {
  const NF4QuantizeArgs a = check_nf4_quantize(weight, blocksize);
  at::Tensor packed = at::empty({(a.n + 1) / 2, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({a.n_blocks}, weight.options().dtype(at::kFloat));
  const void* x = a.weight.data_ptr();
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* m = absmax.data_ptr<float>();
  at::parallel_for(0, a.n_blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    qlora::nf4_quantize_cpu(x, a.type, a.n, blocksize, begin, end, p, m);
  });
  return {packed, absmax};
}

// Writes deq(W) into `out` (contiguous, a.n elements of a.type), split over threads by blocks.
void dequantize_into_cpu(const NF4DequantizeArgs& a, int64_t blocksize, int64_t nested_blocksize,
                         at::Tensor& out) {
  qlora::NF4Scales scales = a.scales();
  scales.nested_blocksize = nested_blocksize;
  const uint8_t* p = a.packed.data_ptr<uint8_t>();
  void* o = out.data_ptr();
  at::parallel_for(0, a.n_blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    qlora::nf4_dequantize_cpu(p, scales, a.n, blocksize, begin, end, o, a.type);
  });
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              c10::SymIntArrayRef shape, at::ScalarType dtype,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& nested_offset,
                              int64_t nested_blocksize) {
  const NF4DequantizeArgs a = check_nf4_dequantize(packed, absmax, blocksize, shape, dtype,
                                                   nested_absmax, nested_code, nested_offset,
                                                   nested_blocksize);
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  dequantize_into_cpu(a, blocksize, nested_blocksize, out);
  return out;
}

void nf4_dequantize_into_cpu(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                             int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& nested_offset,
                             int64_t nested_blocksize) {
  const NF4DequantizeArgs a = check_nf4_dequantize_into(out, packed, absmax, blocksize,
                                                        nested_absmax, nested_code, nested_offset,
                                                        nested_blocksize);
  if (out.is_contiguous()) {
    dequantize_into_cpu(a, blocksize, nested_blocksize, out);
    return;
  }
  // Rows of a wider matrix: through a contiguous W (the CPU path is not where this pays).
  at::Tensor dense = at::empty(out.sizes(), out.options());
  dequantize_into_cpu(a, blocksize, nested_blocksize, dense);
  out.copy_(dense);
}

// nf4_gemv and nf4_gemm on the CPU: one kernel for any M (each weight row is dequantized once and
// dotted with every row of x), after the op's own checks.
at::Tensor nf4_product_cpu(const NF4GemvArgs& a, const at::Tensor& x, int64_t blocksize,
                           int64_t nested_blocksize) {
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  if (a.M > 0 && a.N > 0) {
    // The kernel reads x as fp32 (exact for every input dtype), converted once here.
    const at::Tensor x32 = a.x.to(at::kFloat).contiguous();
    qlora::NF4Scales scales = a.weight.scales();
    scales.nested_blocksize = nested_blocksize;
    const float* xp = x32.data_ptr<float>();
    const uint8_t* p = a.weight.packed.data_ptr<uint8_t>();
    const void* b = a.bias.defined() ? a.bias.data_ptr() : nullptr;
    void* yp = y.data_ptr();
    // Rows per task: >= 32K weights each, to amortise scheduling.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.K, 1));
    at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
      qlora::nf4_gemv_cpu(xp, a.M, a.K, p, scales, blocksize, a.N, begin, end, b, yp, a.type);
    });
  }
  return y.view(a.out_shape);
}

at::Tensor nf4_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t blocksize, c10::SymIntArrayRef weight_shape,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const NF4GemvArgs a = check_nf4_gemv(x, packed, absmax, blocksize, weight_shape, bias,
                                       nested_absmax, nested_code, nested_offset, nested_blocksize);
  return nf4_product_cpu(a, x, blocksize, nested_blocksize);
}

// Part by part: the CPU kernel has no launch cost to save.
at::Tensor nf4_gemv_grouped_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  const NF4GemvGroupedArgs a = check_nf4_gemv_grouped(x, packed, absmax, blocksize, rows, nested_absmax,
                                                      nested_code, nested_offset, bias, nested_blocksize);
  std::vector<at::Tensor> outputs;
  for (const NF4GemvArgs& part : a.parts) outputs.push_back(nf4_product_cpu(part, x, blocksize, nested_blocksize));
  return at::cat(outputs, -1);
}

// The CPU has no launch to save: nf4_gemv_grouped then swiglu.
at::Tensor nf4_gemv_swiglu_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax, int64_t blocksize,
                               at::IntArrayRef rows, at::TensorList nested_absmax,
                               const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                               const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  check_nf4_gemv_swiglu(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias,
                        nested_blocksize);
  return nf4_gemv_swiglu_composite(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset,
                                   bias, nested_blocksize);
}

at::Tensor nf4_gemm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t blocksize, c10::SymIntArrayRef weight_shape,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const NF4GemvArgs a = check_nf4_gemm(x, packed, absmax, blocksize, weight_shape, bias,
                                       nested_absmax, nested_code, nested_offset, nested_blocksize);
  return nf4_product_cpu(a, x, blocksize, nested_blocksize);
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cpu(
    const at::Tensor& x, const at::Tensor& code, int64_t blocksize,
    const std::optional<at::Tensor>& offset) {
  const Blockwise8Args a = check_blockwise8_quantize(x, code, blocksize, offset);
  const float* shift = a.offset ? a.offset->data_ptr<float>() : nullptr;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({a.n_blocks}, x.options().dtype(at::kFloat));
  const float* src = a.data.data_ptr<float>();
  const float* map = a.code.data_ptr<float>();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* m = absmax.data_ptr<float>();
  at::parallel_for(0, a.n_blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    qlora::blockwise8_quantize_cpu(src, a.n, map, blocksize, begin, end, q, m, shift);
  });
  return {codes, absmax};
}

at::Tensor blockwise8_dequantize_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize) {
  const Blockwise8Args a = check_blockwise8_dequantize(codes, absmax, code, blocksize);
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const at::Tensor scales = absmax.contiguous();
  const uint8_t* q = a.data.data_ptr<uint8_t>();
  const float* m = scales.data_ptr<float>();
  const float* map = a.code.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, a.n_blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    qlora::blockwise8_dequantize_cpu(q, m, map, a.n, blocksize, begin, end, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_dequantize_into", &nf4_dequantize_into_cpu);
  m.impl("nf4_gemv", &nf4_gemv_cpu);
  m.impl("nf4_gemv_grouped", &nf4_gemv_grouped_cpu);
  m.impl("nf4_gemv_swiglu", &nf4_gemv_swiglu_cpu);
  m.impl("nf4_gemm", &nf4_gemm_cpu);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cpu);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cpu);
}

}  // namespace qlora_torch
