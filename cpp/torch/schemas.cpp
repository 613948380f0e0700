// Every operator of the qlora_ext namespace, one line each on what it computes and its shapes.
// Implementations: ops_cpu.cpp, ops_cuda.cpp; fake kernels and autograd: python/qlora_ext/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(qlora_ext, m) {
  // weight [any shape, n elements] fp32/fp16/bf16 -> (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)])
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor packed, Tensor absmax)");
  // nf4_quantize, then the absmax centred on its mean (offset, fp32 0-d) and 8-bit quantized with
  // nested_code (fp32 [256], sorted) in blocks of nested_blocksize:
  // -> (packed, absmax codes uint8 [n_blocks], nested_absmax fp32 [ceil(n_blocks/nested_blocksize)], offset)
  m.def(
      "nf4_double_quantize(Tensor weight, int blocksize, Tensor nested_code, int nested_blocksize=256) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)");
  // packed uint8 [(n+1)//2 elements] + scales -> dtype tensor of `shape` (n = prod(shape)).
  // Plain: absmax fp32 [n_blocks]. Double-quantized: absmax uint8 codes [n_blocks], nested_absmax
  // fp32 [ceil(n_blocks/nested_blocksize)], nested_code fp32 [256], nested_offset fp32 [1].
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // y [..., N] = x [..., K] · deq(W [N, K])ᵀ (+ bias [N]) in x's dtype (fp32/fp16/bf16), fp32 sums;
  // prod(x.shape[:-1]) <= 16 (decode); W as for nf4_dequantize, dequantized to x's dtype.
  m.def(
      "nf4_gemv(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, "
      "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // x fp32 [any shape, n] + sorted code map fp32 [256] -> (codes uint8 [x.shape], absmax fp32 [ceil(n/blocksize)])
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor codes, Tensor absmax)");
  // codes uint8 [any shape, n] + absmax fp32 [ceil(n/blocksize)] + code fp32 [256] -> fp32 [codes.shape]
  m.def("blockwise8_dequantize(Tensor codes, Tensor absmax, Tensor code, int blocksize) -> Tensor");
}
