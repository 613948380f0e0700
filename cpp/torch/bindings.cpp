// The Python module qlora_ext._C. Importing it registers every operator (schemas.cpp and the
// TORCH_LIBRARY_IMPL blocks); the module itself only reports how it was built.
#include <pybind11/pybind11.h>

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
}
