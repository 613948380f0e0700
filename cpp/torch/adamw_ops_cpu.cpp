// CPU registrations of the AdamW steps: validate (op_args.h), then split every tensor into chunks
// (16K elements, or 64 blocks of 256 for 8-bit state) and run the chunks of all tensors over
// threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "op_args.h"
#include "qlora/adamw.h"

namespace qlora_torch {
namespace {

constexpr int64_t kChunkElements = 16384;
constexpr int64_t kChunkBlocks = kChunkElements / qlora::kAdamW8BlockSize;

// Runs f(tensor index, first unit, end unit) over every chunk of `units_per_chunk` units, where
// tensor i has units(i) units, in parallel.
template <typename Units, typename F>
void for_each_chunk(size_t count, Units units, int64_t units_per_chunk, F f) {
  std::vector<int64_t> first_chunk(count + 1, 0);
  for (size_t i = 0; i < count; ++i) {
    first_chunk[i + 1] = first_chunk[i] + ceil_div(units(i), units_per_chunk);
  }
  at::parallel_for(0, first_chunk[count], 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const size_t i = size_t(std::upper_bound(first_chunk.begin(), first_chunk.end(), c) -
                              first_chunk.begin()) - 1;
      const int64_t first = (c - first_chunk[i]) * units_per_chunk;
      f(i, first, std::min(units(i), first + units_per_chunk));
    }
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, double grad_scale) {
  const AdamWStepArgs a = check_adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2,
                                           eps, weight_decay, step, grad_scale);
  for_each_chunk(
      a.tensors32.size(), [&](size_t i) { return a.tensors32[i].n; }, kChunkElements,
      [&](size_t i, int64_t begin, int64_t end) {
        qlora::adamw32_step_cpu(a.tensors32[i], a.types[i], begin, end, a.hyper);
      });
}

void adamw_step_8bit_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_absmax, const at::Tensor& exp_avg_map,
                         const at::Tensor& exp_avg_sq_map, double lr, double beta1, double beta2,
                         double eps, double weight_decay, int64_t step, double grad_scale) {
  const AdamWStepArgs a = check_adamw_step_8bit(
      params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
      exp_avg_map, exp_avg_sq_map, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  const float* map1 = a.exp_avg_map.data_ptr<float>();
  const float* map2 = a.exp_avg_sq_map.data_ptr<float>();
  for_each_chunk(
      a.tensors8.size(),
      [&](size_t i) { return ceil_div(a.tensors8[i].n, qlora::kAdamW8BlockSize); }, kChunkBlocks,
      [&](size_t i, int64_t begin, int64_t end) {
        qlora::adamw8_step_cpu(a.tensors8[i], a.types[i], begin, end, map1, map2, a.hyper);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw_step_8bit", &adamw_step_8bit_cpu);
}

}  // namespace qlora_torch
