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
// Torch-free: plain pointers and sizes over contiguous arrays of n elements; CPU functions take
// an element range so that the caller can split the work over threads; CUDA entry points are in
// kernels_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {

// h[i] = silu(gate[i]) * up[i] for i in [begin, end).
void swiglu_forward_cpu(const void* gate, const void* up, void* h, FloatType type, int64_t begin,
                        int64_t end);

// dgate[i], dup[i] for i in [begin, end); dgate may be gate and dup may be up.
void swiglu_backward_cpu(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                         FloatType type, int64_t begin, int64_t end);

}  // namespace qlora
