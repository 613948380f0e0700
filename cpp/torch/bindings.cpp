// The Python module qlora_ext._C. Importing it registers every operator (schemas.cpp and the
// TORCH_LIBRARY_IMPL blocks); the module itself reports how it was built, and holds the switches
// between CUDA kernel variants (nf4_gemv's; dora_scale's A·Aᵀ), for measuring them against each
// other in one process, and the switch of programmatic dependent launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#if defined(QLORA_WITH_CUDA)
#include "block_op_args.h"
#include "dora_args.h"
#include "qlora/kernels_cuda.h"
#endif

#ifndef QLORA_VERSION
#define QLORA_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora_ext native operators (registered under torch.ops.qlora_ext)";
  m.attr("__version__") = QLORA_VERSION;
#if defined(QLORA_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_architectures") = QLORA_CUDA_ARCH_LIST;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_architectures") = "";
#endif
  // Names of nf4_gemv's CUDA fast-path variants, index = variant number (empty without CUDA).
  m.def("_nf4_gemv_variants", []() {
    std::vector<std::string> names;
#if defined(QLORA_WITH_CUDA)
    for (int i = 0; i < qlora::nf4_gemv_cuda_variant_count(); ++i) names.emplace_back(qlora::nf4_gemv_cuda_variant_name(i));
#endif
    return names;
  });
  m.def("_nf4_gemv_variant", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora::nf4_gemv_cuda_variant();
#else
    return 0;
#endif
  });
  // dora_scale's A·Aᵀ on CUDA: qlora's kernel (true) or at::mm (false); see dora_ops_cuda.cpp.
  m.def("_dora_gram_kernel", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora_torch::dora_gram_kernel();
#else
    return false;
#endif
  });
  m.def("_set_dora_gram_kernel", [](bool enabled) {
#if defined(QLORA_WITH_CUDA)
    qlora_torch::set_dora_gram_kernel(enabled);
#else
    if (enabled) throw std::invalid_argument("enabled: this qlora_ext build has no CUDA kernels");
#endif
  });
  // decode_attention on CUDA: its kernels (true) or ATen ops (false, the default until they are
  // tested on a GPU); see block_ops_cuda.cpp.
  m.def("_decode_attention_kernel", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora_torch::decode_attention_kernel();
#else
    return false;
#endif
  });
  m.def("_set_decode_attention_kernel", [](bool enabled) {
#if defined(QLORA_WITH_CUDA)
    qlora_torch::set_decode_attention_kernel(enabled);
#else
    if (enabled) throw std::invalid_argument("enabled: this qlora_ext build has no CUDA kernels");
#endif
  });
  // Programmatic dependent launch of the kernels that support it (dependent_launch.cuh): off by
  // default; qlora_ext.generate turns it on around its decode steps. A build without CUDA keeps it
  // off (there is nothing to launch).
  m.def("_programmatic_launch", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora::programmatic_launch_enabled();
#else
    return false;
#endif
  });
  m.def("_set_programmatic_launch", [](bool enabled) {
#if defined(QLORA_WITH_CUDA)
    qlora::set_programmatic_launch(enabled);
#else
    (void)enabled;
#endif
  });
  // The Hopper NF4 GEMM (kernels_cuda.h): whether the current device runs it (compute capability 9.0 and this
  // build's sm_90a code), and the fewest rows for which nf4_gemm takes it (benchmarks and tests move it).
  m.def("_nf4_gemm_sm90_ready", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora::nf4_gemm_sm90_cuda_device_ready();
#else
    return false;
#endif
  });
  m.def("_nf4_gemm_sm90_min_rows", []() {
#if defined(QLORA_WITH_CUDA)
    return qlora::nf4_gemm_sm90_min_rows();
#else
    return int64_t(0);
#endif
  });
  m.def("_set_nf4_gemm_sm90_min_rows", [](int64_t rows) {
#if defined(QLORA_WITH_CUDA)
    if (qlora::nf4_gemm_set_sm90_min_rows(rows)) return;
    throw std::invalid_argument("rows must be >= 1, got " + std::to_string(rows));
#else
    throw std::invalid_argument("rows: this qlora_ext build has no CUDA kernels (got " + std::to_string(rows) + ")");
#endif
  });
  m.def("_set_nf4_gemv_variant", [](int variant) {
#if defined(QLORA_WITH_CUDA)
    if (qlora::nf4_gemv_cuda_set_variant(variant)) return;
    throw std::invalid_argument("variant must be in [0, " + std::to_string(qlora::nf4_gemv_cuda_variant_count()) +
                                "), got " + std::to_string(variant));
#else
    throw std::invalid_argument("variant: this qlora_ext build has no CUDA kernels (got " + std::to_string(variant) + ")");
#endif
  });
}
