// CUDA registrations: validate (op_args.h), guard the device, launch on the current stream, and
// turn a launch failure into an error naming the operator.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "op_args.h"
#include "qlora/kernels_cuda.h"

namespace qlora_torch {
namespace {

void check_launch(cudaError_t status, const char* op) {
  QLORA_CHECK(status == cudaSuccess, "qlora_ext::", op, ": CUDA launch failed: ",
              cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, int64_t blocksize) {
  const NF4QuantizeArgs a = check_nf4_quantize(weight, blocksize);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor packed = at::empty({(a.n + 1) / 2, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({a.n_blocks}, weight.options().dtype(at::kFloat));
  check_launch(qlora::nf4_quantize_cuda(a.weight.data_ptr(), a.type, a.n, blocksize,
                                        packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                        at::cuda::getCurrentCUDAStream()),
               "nf4_quantize");
  return {packed, absmax};
}

// One launch writing deq(W) into `out` (a.n elements of a.type, contiguous or in rows a.row_stride
// apart) on the current stream.
void dequantize_into_cuda(const NF4DequantizeArgs& a, int64_t blocksize, int64_t nested_blocksize,
                          at::Tensor& out, const char* op) {
  qlora::NF4Scales scales = a.scales();
  scales.nested_blocksize = nested_blocksize;
  const int64_t row_elements = a.row_elements > 0 ? a.row_elements : std::max<int64_t>(a.n, 1);
  const int64_t row_stride = a.row_stride > 0 ? a.row_stride : row_elements;
  check_launch(qlora::nf4_dequantize_rows_cuda(a.packed.data_ptr<uint8_t>(), scales, a.n, blocksize,
                                               row_elements, row_stride, out.data_ptr(), a.type,
                                               at::cuda::getCurrentCUDAStream()),
               op);
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset,
                               int64_t nested_blocksize) {
  const NF4DequantizeArgs a = check_nf4_dequantize(packed, absmax, blocksize, shape, dtype,
                                                   nested_absmax, nested_code, nested_offset,
                                                   nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  dequantize_into_cuda(a, blocksize, nested_blocksize, out, "nf4_dequantize");
  return out;
}

void nf4_dequantize_into_cuda(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& nested_offset,
                              int64_t nested_blocksize) {
  const NF4DequantizeArgs a = check_nf4_dequantize_into(out, packed, absmax, blocksize,
                                                        nested_absmax, nested_code, nested_offset,
                                                        nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  dequantize_into_cuda(a, blocksize, nested_blocksize, out, "nf4_dequantize_into");
}

// The product when there is nothing to multiply (K = 0, or an empty output): y is the bias
// broadcast over the rows, or zeros; always a new tensor, never a view of bias (for M = 1 the
// expanded bias is already contiguous, and an operator's output must not alias an input).
at::Tensor bias_or_zeros(const NF4GemvArgs& a, const at::Tensor& x) {
  at::Tensor y = a.bias.defined() ? a.bias.expand({a.M, a.N}).clone(at::MemoryFormat::Contiguous)
                                  : at::zeros({a.M, a.N}, x.options());
  return y.view(a.out_shape);
}

at::Tensor nf4_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, c10::SymIntArrayRef weight_shape,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset,
                         int64_t nested_blocksize) {
  const NF4GemvArgs a = check_nf4_gemv(x, packed, absmax, blocksize, weight_shape, bias,
                                       nested_absmax, nested_code, nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  if (a.K == 0) return bias_or_zeros(a, x);
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  qlora::NF4Scales scales = a.weight.scales();
  scales.nested_blocksize = nested_blocksize;
  check_launch(qlora::nf4_gemv_cuda(a.x.data_ptr(), a.type, a.M, a.K,
                                    a.weight.packed.data_ptr<uint8_t>(), scales, blocksize, a.N,
                                    a.bias.defined() ? a.bias.data_ptr() : nullptr, y.data_ptr(),
                                    at::cuda::getCurrentCUDAStream()),
               "nf4_gemv");
  return y.view(a.out_shape);
}

// One launch for all parts where the kernel takes them (nf4_gemv_grouped_cuda_supported), else
// nf4_gemv part by part and a concatenation.
at::Tensor nf4_gemv_grouped_cuda(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                 int64_t blocksize, at::IntArrayRef rows, at::TensorList nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                 const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  const NF4GemvGroupedArgs a = check_nf4_gemv_grouped(x, packed, absmax, blocksize, rows, nested_absmax,
                                                      nested_code, nested_offset, bias, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<qlora::NF4GemvPart> parts;
  for (const NF4GemvArgs& part : a.parts) {
    qlora::NF4Scales scales = part.weight.scales();
    scales.nested_blocksize = nested_blocksize;
    parts.push_back({part.weight.packed.data_ptr<uint8_t>(), scales, part.N});
  }
  const at::Tensor& xc = a.parts[0].x;
  if (a.M > 0 && a.K > 0 &&
      qlora::nf4_gemv_grouped_cuda_supported(a.type, a.M, a.K, xc.data_ptr(), parts.data(), int(parts.size()),
                                             blocksize)) {
    at::Tensor y = at::empty({a.M, a.N}, x.options());
    check_launch(qlora::nf4_gemv_grouped_cuda(xc.data_ptr(), a.type, a.M, a.K, parts.data(), int(parts.size()),
                                              blocksize, a.bias.defined() ? a.bias.data_ptr() : nullptr,
                                              y.data_ptr(), at::cuda::getCurrentCUDAStream()),
                 "nf4_gemv_grouped");
    return y.view(a.out_shape);
  }
  std::vector<at::Tensor> outputs;
  for (size_t p = 0; p < a.parts.size(); ++p) {
    const NF4GemvArgs& part = a.parts[p];
    const bool nested = nested_code.has_value();
    outputs.push_back(nf4_gemv_cuda(x, packed[p], absmax[p], blocksize, {c10::SymInt(part.N), c10::SymInt(a.K)},
                                    part.bias.defined() ? std::optional<at::Tensor>(part.bias) : std::nullopt,
                                    nested ? std::optional<at::Tensor>(nested_absmax[p]) : std::nullopt, nested_code,
                                    nested ? std::optional<at::Tensor>(nested_offset[p]) : std::nullopt,
                                    nested_blocksize));
  }
  return at::cat(outputs, -1);
}

// One launch (SwiGLU in the GEMV epilogue) where nf4_gemv_swiglu_cuda_supported holds, else
// nf4_gemv_grouped then swiglu.
at::Tensor nf4_gemv_swiglu_cuda(const at::Tensor& x, at::TensorList packed, at::TensorList absmax, int64_t blocksize,
                                at::IntArrayRef rows, at::TensorList nested_absmax,
                                const std::optional<at::Tensor>& nested_code, at::TensorList nested_offset,
                                const std::optional<at::Tensor>& bias, int64_t nested_blocksize) {
  const NF4GemvGroupedArgs a = check_nf4_gemv_swiglu(x, packed, absmax, blocksize, rows, nested_absmax, nested_code,
                                                     nested_offset, bias, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  qlora::NF4GemvPart parts[2];
  for (int p = 0; p < 2; ++p) {
    qlora::NF4Scales scales = a.parts[p].weight.scales();
    scales.nested_blocksize = nested_blocksize;
    parts[p] = {a.parts[p].weight.packed.data_ptr<uint8_t>(), scales, a.parts[p].N};
  }
  const at::Tensor& xc = a.parts[0].x;
  if (a.M > 0 && a.K > 0 &&
      qlora::nf4_gemv_swiglu_cuda_supported(a.type, a.M, a.K, xc.data_ptr(), parts[0], parts[1], blocksize)) {
    at::Tensor y = at::empty({a.M, rows[0]}, x.options());
    check_launch(qlora::nf4_gemv_swiglu_cuda(xc.data_ptr(), a.type, a.M, a.K, parts[0], parts[1], blocksize,
                                             a.bias.defined() ? a.bias.data_ptr() : nullptr, y.data_ptr(),
                                             at::cuda::getCurrentCUDAStream()),
                 "nf4_gemv_swiglu");
    return y.view(a.out_shape);
  }
  return nf4_gemv_swiglu_composite(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset,
                                   bias, nested_blocksize);
}

at::Tensor nf4_gemm_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, c10::SymIntArrayRef weight_shape,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset,
                         int64_t nested_blocksize) {
  const NF4GemvArgs a = check_nf4_gemm(x, packed, absmax, blocksize, weight_shape, bias,
                                       nested_absmax, nested_code, nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  if (a.M == 0 || a.N == 0 || a.K == 0) return bias_or_zeros(a, x);
  qlora::NF4Scales scales = a.weight.scales();
  scales.nested_blocksize = nested_blocksize;
  const uint8_t* codes = a.weight.packed.data_ptr<uint8_t>();
  if (a.M >= qlora::nf4_gemm_sm90_min_rows() &&
      qlora::nf4_gemm_sm90_cuda_supported(a.type, a.M, a.N, a.K, blocksize, scales, a.x.data_ptr(), codes)) {
    at::Tensor y = at::empty({a.M, a.N}, x.options());
    check_launch(qlora::nf4_gemm_sm90_cuda(a.x.data_ptr(), a.type, a.M, a.K, codes, scales, blocksize, a.N,
                                           a.bias.defined() ? a.bias.data_ptr() : nullptr, y.data_ptr(),
                                           at::cuda::getCurrentCUDAStream()),
                 "nf4_gemm (Hopper)");
    return y.view(a.out_shape);
  }
  if (!qlora::nf4_gemm_cuda_supported(a.type, a.M, a.N, a.K, a.x.data_ptr(), codes)) {
    // fp32, K % 64 != 0, misaligned data, a pre-Ampere GPU, or more than kNF4GemmMaxRows rows where the
    // Hopper kernel does not apply: dequantize to x's dtype and let cuBLAS multiply (the tensor-core kernels
    // have no path for these; cuBLAS is not available to the torch-free kernels).
    at::Tensor w = at::empty({a.N, a.K}, x.options());
    check_launch(qlora::nf4_dequantize_cuda(codes, scales, a.N * a.K, blocksize, w.data_ptr(),
                                            a.type, at::cuda::getCurrentCUDAStream()),
                 "nf4_gemm");
    at::Tensor y = a.bias.defined() ? at::addmm(a.bias, a.x, w.t()) : at::mm(a.x, w.t());
    return y.view(a.out_shape);
  }
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  const int64_t workspace_elements = qlora::nf4_gemm_cuda_workspace(a.M, a.N, a.K);
  at::Tensor workspace;
  if (workspace_elements > 0) workspace = at::empty({workspace_elements}, x.options().dtype(at::kFloat));
  check_launch(qlora::nf4_gemm_cuda(a.x.data_ptr(), a.type, a.M, a.K, codes, scales, blocksize, a.N,
                                    a.bias.defined() ? a.bias.data_ptr() : nullptr, y.data_ptr(),
                                    workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                    at::cuda::getCurrentCUDAStream()),
               "nf4_gemm");
  return y.view(a.out_shape);
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(
    const at::Tensor& x, const at::Tensor& code, int64_t blocksize,
    const std::optional<at::Tensor>& offset) {
  const Blockwise8Args a = check_blockwise8_quantize(x, code, blocksize, offset);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({a.n_blocks}, x.options().dtype(at::kFloat));
  check_launch(qlora::blockwise8_quantize_cuda(a.data.data_ptr<float>(), a.n,
                                               a.code.data_ptr<float>(), blocksize,
                                               codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                               at::cuda::getCurrentCUDAStream(),
                                               a.offset ? a.offset->data_ptr<float>() : nullptr),
               "blockwise8_quantize");
  return {codes, absmax};
}

at::Tensor blockwise8_dequantize_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize) {
  const Blockwise8Args a = check_blockwise8_dequantize(codes, absmax, code, blocksize);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const at::Tensor scales = absmax.contiguous();
  check_launch(qlora::blockwise8_dequantize_cuda(a.data.data_ptr<uint8_t>(),
                                                 scales.data_ptr<float>(),
                                                 a.code.data_ptr<float>(), a.n, blocksize,
                                                 out.data_ptr<float>(),
                                                 at::cuda::getCurrentCUDAStream()),
               "blockwise8_dequantize");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_dequantize_into", &nf4_dequantize_into_cuda);
  m.impl("nf4_gemv", &nf4_gemv_cuda);
  m.impl("nf4_gemv_grouped", &nf4_gemv_grouped_cuda);
  m.impl("nf4_gemv_swiglu", &nf4_gemv_swiglu_cuda);
  m.impl("nf4_gemm", &nf4_gemm_cuda);
  m.impl("blockwise8_quantize", &blockwise8_quantize_cuda);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cuda);
}

}  // namespace qlora_torch
