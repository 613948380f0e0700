// SwiGLU, the gated activation of Llama's MLP, forward and backward, elementwise.
//
//   s = sigmoid(g) = 1 / (1 + exp(-g)),   h = silu(g) * u = g * s * u
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s
//
// Math in fp32, each output rounded to the element type once (PyTorch's `F.silu(g) * u` in a
// 16-bit type rounds twice, after the silu and after the product).
//
// The backward may write dg over g and du over u (dgate == gate, dup == up): each element is read
// before it is written, by the same iteration. That saves two [tokens, intermediate] buffers when
// the caller knows gate and up are dead after the backward.
//
// Scaled operands (DoRA's gate and up projections, whose outputs are c ⊙ z): with SwiGLUScales,
// g = T(gate[i] * gate_scale[i % columns]) and u = T(up[i] * up_scale[i % columns]), each product
// in fp32 rounded to the element type T first, exactly as qlora_ext::dora_column_scale stores
// c ⊙ z, so the results equal the unscaled kernel's on dora_column_scale's outputs bit for bit,
// without those two [tokens, intermediate] tensors being written and read. The backward then
// gives the gradients for g and u (the scaled operands: what dora_scale_backward takes as dy),
// and must not write over gate and up (they are z, still needed).
//
// Torch-free: plain pointers and sizes over contiguous arrays of n elements; CPU functions take
// an element range so that the caller can split the work over threads; CUDA entry points are in
// kernels_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {

// Per-column scales of gate and up (both of the element type, `columns` long: the last dimension
// of the row-major operands), or none (nullptr: the plain SwiGLU).
struct SwiGLUScales {
  const void* gate = nullptr;
  const void* up = nullptr;
  int64_t columns = 0;
};

// h[i] = silu(gate[i]) * up[i] for i in [begin, end).
void swiglu_forward_cpu(const void* gate, const void* up, void* h, FloatType type, int64_t begin,
                        int64_t end, SwiGLUScales scales = {});

// dgate[i], dup[i] for i in [begin, end); dgate may be gate and dup may be up (unscaled only).
void swiglu_backward_cpu(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                         FloatType type, int64_t begin, int64_t end, SwiGLUScales scales = {});

}  // namespace qlora
