// Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the
// kernel before it in the stream is still running, do the work that depends on nothing that
// kernel writes (an NF4 GEMV: its first weight loads and its lookup tables; an RMSNorm: its weight
// row), and wait for it (griddepcontrol.wait, which returns once that kernel has completed and its
// writes are visible) before it reads that kernel's outputs or writes anything. Inside a CUDA graph
// the launch gap and those prologues then hide under the previous kernel: a decode step is ~400
// kernels, most of them a few microseconds long.
//
// Contract of a kernel launched through launch_kernel:
//   - it calls dependency_wait() before its first global write and before reading anything an
//     earlier kernel of the stream may write; what it reads before the wait must be constant for
//     as long as PDL is on (weights during generation);
//   - it may call allow_dependents() early: the next PDL launch may then be scheduled (it still
//     waits, at its own dependency_wait, for this kernel to complete).
// Off by default: qlora_ext.generate switches it on for its decode steps (weights are constant
// there), set_programmatic_launch (kernels_cuda.h). Older GPUs and launches with PDL off take the
// plain <<<>>> launch, where dependency_wait() returns at once.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "device_facts.cuh"

namespace qlora {

bool programmatic_launch_enabled();  // dependent_launch.cu

namespace cuda_detail {

__device__ __forceinline__ void dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), with programmatic stream serialization
// when PDL is on and the device is sm_90+.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, Args&&... args) {
  DeviceFacts facts;
  if (!programmatic_launch_enabled() || device_facts(facts) != cudaSuccess || facts.major < 9) {
    kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace cuda_detail
}  // namespace qlora
