// DoRA's per-column scale (forward) and its backward on CUDA (math: qlora/dora.h).
//
// Both exist to replace chains of small ATen kernels: the DoRA forward and backward of a layer
// run for each of ~150 adapted linears per step, where every extra launch and every extra pass
// over an [M, N] activation shows in the step time.
//
// dora_scale: one thread per row i of W (N rows; of S stacked layers' rows for
//   dora_scale_stacked, each row reading its layer's column block of wa and diagonal block of G): n_i² = weight_sq_i + Σ_j B_ij·(2s·wa_ij +
//   s²·(G·B_iᵀ)_j), O(r²) fp32 FMAs reading B's row (r floats, then L1 hits) and G = A·Aᵀ (the
//   same r² floats for every thread: L1 broadcasts). Bytes ~ N·(4r + 2r + 12) — a few µs, launch
//   bound; it replaces the six launches of the same math in ATen. Launch: 256 threads, N/256 CTAs.
//
// dora_scale_backward: dz = dy ⊙ c (c = col_scale) and dm = inv_norm ⊙ Σ_rows dy ⊙ z in one pass:
//   reads dy and z, writes dz (3·M·N·sizeof(T) bytes; 3 FLOPs per element, memory bound), plus
//   fp32 partial column sums, chunks·N·4 bytes written and read once (5-8% more at M = 2048, bf16).
//   Launch: a thread owns 8 consecutive columns (16-byte vector loads and stores when N % 8 == 0
//   and the pointers are aligned; scalar otherwise), up to 256 threads per CTA along N, grid.y =
//   row chunks sized to give ~2 CTAs per SM; each thread sums its 8 columns over its chunk's rows
//   in fp32 and writes one partial per column. A second launch adds the chunks' partials in a
//   fixed order and multiplies by inv_norm: deterministic, no atomics. With a single chunk the
//   first launch writes dm itself.
//
// swiglu_scaled_dora_backward: the MLP's gate and up backward, where DoRA's g = c_g ⊙ z_g and u =
//   c_u ⊙ z_u feed the SwiGLU: swiglu_scaled_backward's gradients for g and u go straight into
//   dora_backward_kernel's arithmetic for both, never stored. Reads dh, z_g, z_u; writes dz_g,
//   dz_u (5·M·N·sizeof(T) bytes, against 11 for the three-op path: the gradients for g and u
//   written and read back, z_g and z_u read twice); one finishing launch for both column sums.
//
// dora_column_scale: y = z ⊙ c (+ bias), the forward's last step. PyTorch's broadcasting multiply
//   takes its generic strided kernel here (one offset computation per element, no vector loads):
//   on the H100 at 8B shapes it moved ~1.5 TB/s, 19.7 ms of a 272 ms QDoRA step
//   (benchmarks/results/lora_family_dora_profile_8b_h100.txt). This one reads z and writes y with
//   16-byte accesses, c and bias held in registers; the same split as the backward (a thread owns
//   8 columns of a chunk of rows). Memory bound: 2·M·N·sizeof(T) bytes.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "cuda_common.cuh"
#include "qlora/dora.h"
#include "swiglu_math.cuh"
#include "vector_io.cuh"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kScaleThreads = 256;
constexpr int kVec = 8;  // columns per thread in the backward
constexpr int kMaxBackwardThreads = 256;
constexpr int64_t kMinRowsPerChunk = 16;

// The layer of stacked row i (DoRAStack: at most kMaxDoRAStack layers, row_end cumulative).
__device__ __forceinline__ int stacked_layer(const DoRAStack& stack, int64_t i) {
  int layer = 0;
#pragma unroll
  for (int j = 0; j + 1 < kMaxDoRAStack; ++j) layer += (j + 1 < stack.count && i >= stack.row_end[j]);
  return layer;
}

template <typename T>
__global__ void dora_scale_kernel(const T* __restrict__ wa, const float* __restrict__ b,
                                  const float* __restrict__ gram,
                                  const float* __restrict__ weight_sq,
                                  const float* __restrict__ magnitude, int64_t N, int r,
                                  DoRAStack stack, T* __restrict__ col_scale,
                                  float* __restrict__ inv_norm) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int layer = stacked_layer(stack, i);
  const int width = stack.count * r;  // wa's and gram's row length
  const float scale = stack.scale[layer], two_s = 2.0f * scale, s_sq = scale * scale;
  const float* g = gram + int64_t(layer) * r * (width + 1);  // diagonal block (layer, layer)
  const float* b_row = b + i * r;
  const T* wa_row = wa + i * width + int64_t(layer) * r;
  float cross = 0.0f, quad = 0.0f;  // ⟨B_i, wa_i⟩ and B_i·G·B_iᵀ
  for (int j = 0; j < r; ++j) {
    float g_b = 0.0f;
    for (int l = 0; l < r; ++l) g_b = fmaf(__ldg(g + j * width + l), __ldg(b_row + l), g_b);
    const float b_j = __ldg(b_row + j);
    cross = fmaf(b_j, Element<T>::to_float(wa_row[j]), cross);
    quad = fmaf(b_j, g_b, quad);
  }
  const float norm_sq = weight_sq[i] + (two_s * cross + s_sq * quad);
  // IEEE sqrt and division (no rsqrtf approximation), as the CPU kernel computes it.
  const float inv = 1.0f / sqrtf(fmaxf(norm_sq, 0.0f));
  inv_norm[i] = inv;
  col_scale[i] = Element<T>::from_float(magnitude[i] * inv);
}

// The same math, FMA for FMA (so the same bits), with B's row read once into registers and G from
// shared memory. dora_scale_kernel re-reads B_i from L1 r² times with a 4r-byte stride between
// lanes: 16 L1 wavefronts per load, ~23 µs a launch at r = 16 on the H100 (5.2 ms of a QDoRA step,
// benchmarks/results/lora_family_dora_profile_8b_h100.txt); this reads it with r loads. For r <=
// kMaxRegisterRank, the default: 19.9 against 36.5 µs a call (the A·Aᵀ GEMM included) at N = 4096,
// r = 16 on the H100 (benchmarks/bench_dora_kernels.py, dora_kernels_h100.json).
// QLORA_DORA_SCALE_KERNEL=rows selects dora_scale_kernel instead (read once per process).
constexpr int kMaxRegisterRank = 32;

// R: the rank bucket (8, 16 or 32) the loops unroll to; lanes past r are predicated off. The
// diagonal blocks of the stacked layers' gram go to shared memory (a CTA's rows may span layers).
template <typename T, int R>
__global__ void dora_scale_registers_kernel(const T* __restrict__ wa, const float* __restrict__ b,
                                            const float* __restrict__ gram,
                                            const float* __restrict__ weight_sq,
                                            const float* __restrict__ magnitude, int64_t N, int r,
                                            DoRAStack stack, T* __restrict__ col_scale,
                                            float* __restrict__ inv_norm) {
  __shared__ float gram_s[kMaxDoRAStack * kMaxRegisterRank * kMaxRegisterRank];
  const int width = stack.count * r;
  for (int at = threadIdx.x; at < stack.count * r * r; at += blockDim.x) {
    const int layer = at / (r * r), j = at / r % r, l = at % r;
    gram_s[at] = gram[(layer * r + j) * width + layer * r + l];
  }
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int layer = stacked_layer(stack, i);
  const float scale = stack.scale[layer], two_s = 2.0f * scale, s_sq = scale * scale;
  const float* g = gram_s + layer * r * r;
  float b_row[R];
#pragma unroll
  for (int l = 0; l < R; ++l) b_row[l] = l < r ? __ldg(b + i * r + l) : 0.0f;
  const T* wa_row = wa + i * width + int64_t(layer) * r;
  float cross = 0.0f, quad = 0.0f;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    if (j < r) {
      float g_b = 0.0f;
#pragma unroll
      for (int l = 0; l < R; ++l) {
        if (l < r) g_b = fmaf(g[j * r + l], b_row[l], g_b);
      }
      cross = fmaf(b_row[j], Element<T>::to_float(wa_row[j]), cross);
      quad = fmaf(b_row[j], g_b, quad);
    }
  }
  const float norm_sq = weight_sq[i] + (two_s * cross + s_sq * quad);
  const float inv = 1.0f / sqrtf(fmaxf(norm_sq, 0.0f));
  inv_norm[i] = inv;
  col_scale[i] = Element<T>::from_float(magnitude[i] * inv);
}

// G = A·Aᵀ's diagonal blocks for dora_scale: the S stacked layers' A_j [r, K] (rows j·r.. of A
// [S·r, K], fp32) give G_jj [r, r], written to gram [S·r, S·r] at block (j, j) (the other blocks
// are not read). One CTA per entry (grid r·r × S), its threads striding over K and adding their
// sums in a fixed order (deterministic). It replaces at::mm, which cuBLAS ran as an SGEMM plus a
// split-K reduction on the H100: one launch instead of two per dora_scale call, where a QDoRA step
// is host-bound by its launches (a 1B step: ~5,400; lora_family_dora_profile_concat_1b_h100.txt).
constexpr int kGramThreads = 128;

__global__ void dora_gram_kernel(const float* __restrict__ a, int64_t K, int r,
                                 float* __restrict__ gram) {
  const int layer = blockIdx.y, j = blockIdx.x / r, l = blockIdx.x % r;
  const int width = gridDim.y * r;
  const float* a_j = a + (int64_t(layer) * r + j) * K;
  const float* a_l = a + (int64_t(layer) * r + l) * K;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += kGramThreads) acc = fmaf(__ldg(a_j + k), __ldg(a_l + k), acc);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  __shared__ float warp_sums[kGramThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kGramThreads / 32; ++w) sum += warp_sums[w];
    gram[(int64_t(layer) * r + j) * width + int64_t(layer) * r + l] = sum;
  }
}

bool registers_kernel_selected() {
  static const bool selected = [] {
    const char* v = std::getenv("QLORA_DORA_SCALE_KERNEL");
    return v == nullptr || std::string(v) != "rows";
  }();
  return selected;
}

// Rows [blockIdx.y·rows_per_chunk, +rows_per_chunk) × this thread's 8 columns. `out` receives
// the chunk's column sums of dy ⊙ z (row blockIdx.y of the partials), or, when `finish_inv_norm`
// is given (a single chunk), dm itself.
template <typename T>
__global__ void dora_backward_kernel(const T* __restrict__ dy, const T* __restrict__ z,
                                     const T* __restrict__ col_scale, int64_t M, int64_t N,
                                     int64_t rows_per_chunk, bool vector,
                                     const float* __restrict__ finish_inv_norm,
                                     T* __restrict__ dz, float* __restrict__ out) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= N) return;
  const int64_t n_left = N - col;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(M, row_begin + rows_per_chunk);
  float c[kVec];
  load8(col_scale + col, n_left, vector, c);
  float acc[kVec] = {};
#pragma unroll 2
  for (int64_t m = row_begin; m < row_end; ++m) {
    const int64_t at = m * N + col;
    float g[kVec], v[kVec], d[kVec];
    load8(dy + at, n_left, vector, g);
    load8(z + at, n_left, vector, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc[k] = fmaf(g[k], v[k], acc[k]);
      d[k] = g[k] * c[k];
    }
    if (vector) {
      store_vectorized<kVec>(dz + at, d);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < n_left) dz[at + k] = Element<T>::from_float(d[k]);
      }
    }
  }
  float* dst = out + (finish_inv_norm ? 0 : int64_t(blockIdx.y) * N) + col;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < n_left) dst[k] = finish_inv_norm ? acc[k] * finish_inv_norm[col + k] : acc[k];
  }
}

// DoRA's gate and up backward through the SwiGLU, one pass: dora_backward_kernel's split and
// arithmetic applied to the two gradients that swiglu_scaled_backward would have written (each
// rounded to T first, as storing it would), so every output has the bits of the two-op path.
// Reads dh, z_gate, z_up; writes dz_gate, dz_up and the two column sums' partials
// (gate's then up's: out_gate, out_up).
template <typename T>
__global__ void swiglu_dora_backward_kernel(const T* __restrict__ dh, const T* __restrict__ z_gate,
                                            const T* __restrict__ z_up,
                                            const T* __restrict__ gate_scale,
                                            const T* __restrict__ up_scale, int64_t M, int64_t N,
                                            int64_t rows_per_chunk, bool vector,
                                            const float* __restrict__ gate_finish_inv_norm,
                                            const float* __restrict__ up_finish_inv_norm,
                                            T* __restrict__ dz_gate, T* __restrict__ dz_up,
                                            float* __restrict__ out_gate,
                                            float* __restrict__ out_up) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= N) return;
  const int64_t n_left = N - col;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(M, row_begin + rows_per_chunk);
  float cg[kVec], cu[kVec];
  load8(gate_scale + col, n_left, vector, cg);
  load8(up_scale + col, n_left, vector, cu);
  float acc_g[kVec] = {}, acc_u[kVec] = {};
  for (int64_t m = row_begin; m < row_end; ++m) {
    const int64_t at = m * N + col;
    float d[kVec], zg[kVec], zu[kVec], dzg[kVec], dzu[kVec];
    load8(dh + at, n_left, vector, d);
    load8(z_gate + at, n_left, vector, zg);
    load8(z_up + at, n_left, vector, zu);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float dg, du;  // the gradients for g = T(c_g·z_g) and u = T(c_u·z_u), as stored in T
      swiglu_grad(d[k], round_to<T>(zg[k] * cg[k]), round_to<T>(zu[k] * cu[k]), dg, du);
      dg = round_to<T>(dg);
      du = round_to<T>(du);
      acc_g[k] = fmaf(dg, zg[k], acc_g[k]);
      acc_u[k] = fmaf(du, zu[k], acc_u[k]);
      dzg[k] = dg * cg[k];
      dzu[k] = du * cu[k];
    }
    if (vector) {
      store_vectorized<kVec>(dz_gate + at, dzg);
      store_vectorized<kVec>(dz_up + at, dzu);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < n_left) {
          dz_gate[at + k] = Element<T>::from_float(dzg[k]);
          dz_up[at + k] = Element<T>::from_float(dzu[k]);
        }
      }
    }
  }
  const int64_t offset = (gate_finish_inv_norm ? 0 : int64_t(blockIdx.y) * N) + col;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < n_left) {
      out_gate[offset + k] = gate_finish_inv_norm ? acc_g[k] * gate_finish_inv_norm[col + k] : acc_g[k];
      out_up[offset + k] = up_finish_inv_norm ? acc_u[k] * up_finish_inv_norm[col + k] : acc_u[k];
    }
  }
}

// y = z ⊙ c (+ bias) over rows [blockIdx.y·rows_per_chunk, +rows_per_chunk) × this thread's 8
// columns; the product rounded to fp32 before the add, as the CPU kernel does.
template <typename T>
__global__ void dora_column_scale_kernel(const T* __restrict__ z, const T* __restrict__ col_scale,
                                         const T* __restrict__ bias, int64_t M, int64_t N,
                                         int64_t rows_per_chunk, bool vector, T* __restrict__ y) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= N) return;
  const int64_t n_left = N - col;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(M, row_begin + rows_per_chunk);
  float c[kVec], b[kVec] = {};
  load8(col_scale + col, n_left, vector, c);
  if (bias != nullptr) load8(bias + col, n_left, vector, b);
#pragma unroll 4
  for (int64_t m = row_begin; m < row_end; ++m) {
    const int64_t at = m * N + col;
    float v[kVec];
    load8(z + at, n_left, vector, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k] = bias != nullptr ? __fadd_rn(__fmul_rn(v[k], c[k]), b[k]) : __fmul_rn(v[k], c[k]);
    }
    if (vector) {
      store_vectorized<kVec>(y + at, v);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < n_left) y[at + k] = Element<T>::from_float(v[k]);
      }
    }
  }
}

// dm[col] = inv_norm[col] · Σ_chunk partial[chunk, col], chunks added in order, for `problems`
// (1 or 2: the fused gate/up backward's two) column sums at once: problem p's partials are
// [chunks, N] at partial + p·chunks·N, its inv_norm and dm the p-th pointers.
struct FinishPair {
  const float* inv_norm[2];
  float* dm[2];
};

__global__ void dora_backward_finish_kernel(const float* __restrict__ partial, FinishPair pair,
                                            int problems, int64_t chunks, int64_t N) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= problems * N) return;
  const int p = index >= N;
  const int64_t col = index - p * N;
  const float* column = partial + p * chunks * N + col;
  float sum = 0.0f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += column[chunk * N];
  pair.dm[p][col] = sum * pair.inv_norm[p][col];
}

struct BackwardSplit {
  int threads;             // per CTA, along N
  int64_t blocks_x;        // CTAs along N
  int64_t rows_per_chunk;  // rows per CTA along M
  int64_t chunks;          // CTAs along M
};

BackwardSplit backward_split(int64_t M, int64_t N, int num_sms) {
  BackwardSplit s;
  const int64_t column_threads = ceil_div(N, kVec);
  s.threads = int(std::min<int64_t>(kMaxBackwardThreads, ceil_div(column_threads, 32) * 32));
  s.blocks_x = ceil_div(column_threads, s.threads);
  // ~2 CTAs per SM in all, but no chunk shorter than kMinRowsPerChunk rows (the partial sums'
  // traffic grows with the number of chunks).
  const int64_t target = std::max<int64_t>(1, 2 * int64_t(std::max(num_sms, 1)));
  const int64_t chunks = std::clamp<int64_t>(ceil_div(target, s.blocks_x), 1,
                                             std::max<int64_t>(1, ceil_div(M, kMinRowsPerChunk)));
  s.rows_per_chunk = ceil_div(M, chunks);
  s.chunks = ceil_div(M, s.rows_per_chunk);
  return s;
}

}  // namespace

cudaError_t dora_gram_cuda(const float* lora_a, int64_t K, int64_t r, int layers, float* gram,
                           cudaStream_t stream) {
  if (r == 0) return cudaSuccess;
  dora_gram_kernel<<<dim3(unsigned(r * r), unsigned(layers)), kGramThreads, 0, stream>>>(
      lora_a, K, int(r), gram);
  return cudaGetLastError();
}

int64_t dora_backward_chunks(int64_t M, int64_t N, int num_sms) {
  return backward_split(M, N, num_sms).chunks;
}

cudaError_t dora_scale_cuda(const void* wa, FloatType type, const float* lora_b,
                            const float* gram, const float* weight_sq, const float* magnitude,
                            int64_t N, int64_t r, const DoRAStack& stack, void* col_scale,
                            float* inv_norm, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const unsigned blocks = unsigned(ceil_div(N, kScaleThreads));
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    if (r <= kMaxRegisterRank && registers_kernel_selected()) {
      const auto launch = [&](auto kernel) {
        kernel<<<blocks, kScaleThreads, 0, stream>>>(static_cast<const T*>(wa), lora_b, gram,
                                                     weight_sq, magnitude, N, int(r), stack,
                                                     static_cast<T*>(col_scale), inv_norm);
        return cudaGetLastError();
      };
      if (r <= 8) return launch(dora_scale_registers_kernel<T, 8>);
      if (r <= 16) return launch(dora_scale_registers_kernel<T, 16>);
      return launch(dora_scale_registers_kernel<T, kMaxRegisterRank>);
    }
    dora_scale_kernel<T><<<blocks, kScaleThreads, 0, stream>>>(
        static_cast<const T*>(wa), lora_b, gram, weight_sq, magnitude, N, int(r), stack,
        static_cast<T*>(col_scale), inv_norm);
    return cudaGetLastError();
  });
}

cudaError_t dora_column_scale_cuda(const void* z, const void* col_scale, const void* bias,
                                   FloatType type, int64_t M, int64_t N, int num_sms, void* y,
                                   cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const BackwardSplit s = backward_split(M, N, num_sms);
  const bool vector = N % kVec == 0 && is_aligned(z, 16) && is_aligned(col_scale, 16) &&
                      is_aligned(y, 16) && (bias == nullptr || is_aligned(bias, 16));
  const dim3 grid(unsigned(s.blocks_x), unsigned(s.chunks));
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    dora_column_scale_kernel<T><<<grid, s.threads, 0, stream>>>(
        static_cast<const T*>(z), static_cast<const T*>(col_scale), static_cast<const T*>(bias), M,
        N, s.rows_per_chunk, vector, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

cudaError_t dora_scale_backward_cuda(const void* dy, const void* z, const void* col_scale,
                                     const float* inv_norm, FloatType type, int64_t M, int64_t N,
                                     int num_sms, void* dz, float* dmagnitude, float* partial,
                                     cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const BackwardSplit s = backward_split(M, N, num_sms);
  const bool vector = N % kVec == 0 && is_aligned(dy, 16) && is_aligned(z, 16) &&
                      is_aligned(col_scale, 16) && is_aligned(dz, 16);
  const bool single = s.chunks == 1;
  const dim3 grid(unsigned(s.blocks_x), unsigned(s.chunks));
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    dora_backward_kernel<T><<<grid, s.threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(z), static_cast<const T*>(col_scale), M,
        N, s.rows_per_chunk, vector, single ? inv_norm : nullptr, static_cast<T*>(dz),
        single ? dmagnitude : partial);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess || single) return status;
    const unsigned blocks = unsigned(ceil_div(N, kScaleThreads));
    const FinishPair pair{{inv_norm, nullptr}, {dmagnitude, nullptr}};
    dora_backward_finish_kernel<<<blocks, kScaleThreads, 0, stream>>>(partial, pair, 1, s.chunks,
                                                                       N);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_scaled_dora_backward_cuda(const void* dh, const void* z_gate, const void* z_up,
                                             const void* gate_scale, const void* up_scale,
                                             const float* gate_inv_norm, const float* up_inv_norm,
                                             FloatType type, int64_t M, int64_t N, int num_sms,
                                             void* dz_gate, void* dz_up, float* dm_gate,
                                             float* dm_up, float* partial, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const BackwardSplit s = backward_split(M, N, num_sms);
  const bool vector = N % kVec == 0 && is_aligned(dh, 16) && is_aligned(z_gate, 16) &&
                      is_aligned(z_up, 16) && is_aligned(gate_scale, 16) &&
                      is_aligned(up_scale, 16) && is_aligned(dz_gate, 16) && is_aligned(dz_up, 16);
  const bool single = s.chunks == 1;
  const dim3 grid(unsigned(s.blocks_x), unsigned(s.chunks));
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    swiglu_dora_backward_kernel<T><<<grid, s.threads, 0, stream>>>(
        static_cast<const T*>(dh), static_cast<const T*>(z_gate), static_cast<const T*>(z_up),
        static_cast<const T*>(gate_scale), static_cast<const T*>(up_scale), M, N, s.rows_per_chunk,
        vector, single ? gate_inv_norm : nullptr, single ? up_inv_norm : nullptr,
        static_cast<T*>(dz_gate), static_cast<T*>(dz_up), single ? dm_gate : partial,
        single ? dm_up : partial + s.chunks * N);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess || single) return status;
    const unsigned blocks = unsigned(ceil_div(2 * N, kScaleThreads));
    const FinishPair pair{{gate_inv_norm, up_inv_norm}, {dm_gate, dm_up}};
    dora_backward_finish_kernel<<<blocks, kScaleThreads, 0, stream>>>(partial, pair, 2, s.chunks,
                                                                       N);
    return cudaGetLastError();
  });
}

}  // namespace qlora
