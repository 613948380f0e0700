// The process-wide switch of programmatic dependent launch (dependent_launch.cuh).
#include <atomic>

#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {
std::atomic<bool> g_programmatic_launch{false};
}  // namespace

bool programmatic_launch_enabled() { return g_programmatic_launch.load(std::memory_order_relaxed); }

void set_programmatic_launch(bool enabled) { g_programmatic_launch.store(enabled, std::memory_order_relaxed); }

}  // namespace qlora
