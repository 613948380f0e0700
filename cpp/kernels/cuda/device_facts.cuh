// Per-device facts the launchers of the tensor-core kernels need, read once per device and cached.
// Torch-free.
//
// mma_built: whether the code this translation unit carries for the current device was compiled
// for sm_80 or later. A tensor-core kernel's body is compiled out for older targets (mma.m16n8k16
// with bf16 needs sm_80), and a build for "75" alone still *runs* on an sm_86 GPU: the driver JITs
// the compute_75 PTX, whose body is empty, and the kernel writes nothing (garbage output, no
// error). The check asks the runtime which PTX version it picked for a probe kernel of this same
// translation unit: every kernel of a .cu file comes from one fat binary built with one
// architecture list, so the probe's answer is the answer for the file's tensor-core kernels.
//
// Include this header from a .cu file (each includer gets its own probe and cache: the anonymous
// namespace is deliberate).
#pragma once

#include <cuda_runtime.h>

namespace qlora {
namespace cuda_detail {
namespace {

__global__ void arch_probe_kernel() {}

struct DeviceFacts {
  int major = 0;
  int sm_count = 0;
  bool mma_built = false;  // see the header comment
};

inline cudaError_t device_facts(DeviceFacts& facts) {
  constexpr int kMaxDevices = 64;
  static DeviceFacts cache[kMaxDevices];
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device < kMaxDevices && cache[device].sm_count > 0) {
    facts = cache[device];
    return cudaSuccess;
  }
  status = cudaDeviceGetAttribute(&facts.major, cudaDevAttrComputeCapabilityMajor, device);
  if (status == cudaSuccess)
    status = cudaDeviceGetAttribute(&facts.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) {
    cudaFuncAttributes attributes{};
    // No code for this device at all is an answer (no), not an error: clear it, so that a later
    // launch check does not pick it up.
    const bool found = cudaFuncGetAttributes(&attributes, arch_probe_kernel) == cudaSuccess;
    if (!found) (void)cudaGetLastError();
    facts.mma_built = found && attributes.ptxVersion >= 80;
  }
  if (status == cudaSuccess && device < kMaxDevices) cache[device] = facts;
  return status;
}

}  // namespace
}  // namespace cuda_detail
}  // namespace qlora
