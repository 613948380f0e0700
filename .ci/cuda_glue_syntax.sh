#!/usr/bin/env bash
# Syntax check of the CUDA side of the torch glue (cpp/torch/*_cuda.cpp and bindings.cpp with
# QLORA_WITH_CUDA) on a machine without a GPU or a CUDA torch: g++ -fsyntax-only against the CPU
# torch's headers (which include ATen/cuda and c10/cuda) and nvcc's CUDA runtime headers. The CPU
# torch lacks cuda_cmake_macros.h and the CUDA toolkit here lacks the math libraries' headers
# (cuBLAS, cuSPARSE, cuSOLVER), which ATen/cuda only names: minimal stand-ins are generated for
# those. This catches C++ errors in the glue before a GPU machine builds it; it checks no kernel
# (the nvcc step of .ci/run compiles those).
#
#   bash .ci/cuda_glue_syntax.sh PYTHON    (a python whose torch and pybind11 to compile against)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
nvcc_bin=$(command -v nvcc || true)
[ -n "$nvcc_bin" ] || { echo "nvcc not found: CUDA glue syntax check SKIPPED"; exit 0; }
# (nvcc may be a wrapper script: ask it where its headers are)
probe=$(mktemp --suffix=.cu)
cuda_include=$(nvcc --dryrun -c "$probe" -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1 | tr -d ' ')
rm -f "$probe"
[ -n "$cuda_include" ] && [ -f "$cuda_include/cuda_runtime.h" ] || { echo "nvcc's include directory not found"; exit 1; }
torch_include=$("$py" -c "import torch.utils.cpp_extension as e; print(' '.join(e.include_paths()))")
pybind_include=$("$py" -c "import pybind11; print(pybind11.get_include())")
python_include=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
mkdir -p "$stubs/c10/cuda/impl"
echo '#pragma once' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"
cat > "$stubs/cusparse.h" <<'H'
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
inline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }
H
cat > "$stubs/cublas_v2.h" <<'H'
#pragma once
#include <cuda_runtime.h>
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
inline const char* cublasGetStatusString(cublasStatus_t) { return ""; }
H
echo 'typedef struct cublasLtContext* cublasLtHandle_t;' > "$stubs/cublasLt.h"
echo 'typedef struct cusolverDnContext* cusolverDnHandle_t;' > "$stubs/cusolverDn.h"
echo 'typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;' > "$stubs/cusolver_common.h"
flags=(-std=c++17 -fsyntax-only -w -DQLORA_WITH_CUDA '-DQLORA_CUDA_ARCH_LIST="syntax-check"' -I "$stubs" -I cpp/include -I cpp/torch
       -I "$cuda_include" -I "$pybind_include" -I "$python_include")
for dir in $torch_include; do flags+=(-I "$dir"); done
status=0
for file in cpp/torch/*_cuda.cpp cpp/torch/bindings.cpp; do
  if g++ "${flags[@]}" "$file"; then echo "ok   $file"; else echo "FAIL $file"; status=1; fi
done
exit $status
