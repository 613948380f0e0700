// NF4 GEMV / skinny GEMM for decoding: y[M, N] = x[M, K] · deq(W[N, K])ᵀ (+ bias), M <= 16.
//
//   deq(W)[n, k] = T(nf4[code(i)] * scale(i / blocksize)),  i = n*K + k (row-major flat index),
//   exactly the value nf4_dequantize writes (fp32 product, one rounding to T); y accumulates in fp32
//   and is rounded to T once, after the bias is added.
//
// Roofline (N*K weights, bf16, block 64, double quantization): bytes = N*K/2 (codes) + N*K/64
// (8-bit scales) + 2*M*K (x) + 2*M*N (y) ~= 0.52 N*K bytes, FLOPs = 2*M*N*K. For M <= 16 that is
// <= 62 FLOP per byte, far under the H100's ~240 (tensor cores, bf16): memory-bound, the target is
// the device's read bandwidth. bf16 cuBLAS reads 2 N*K bytes, so the ideal ratio to it is ~3.9x.
//
// Fast path (sm_80+, fp16/bf16, K % 32 == 0, 16-byte aligned x and codes): tensor cores.
//   mma.m16n8k16 with A = 16 rows of dequantized W (n) and B = x^T (8 columns m; two MMAs when
//   M > 8), fp32 accumulators. Since the dot product is a sum over k, A and B may use any common
//   permutation of k: lane (g = lane/4, t = lane%4) takes the 32 consecutive codes of its rows
//   g and g+8 at k = chunk + 32t with one 16-byte load each, and the matching 32 x values of row
//   m = g with 16-byte loads; k-step j of the 8 in a chunk uses codes 4j..4j+3 of every lane.
//   A 32-code run never straddles a quantization block (blocksize >= 32, K % 32 == 0), so it has
//   one scale, decoded once (for double quantization: an 8-bit code, a map entry and a nested
//   scale, per run).
//   Dequantization looks each code byte up in a shared table of (nf4[hi], nf4[lo]) float pairs:
//   one 8-byte load gives both values, then two fp32 multiplies by the scale and one packed
//   conversion to T. The table is replicated 16 times so that lane l always reads bank pair l % 16:
//   conflict-free whatever the codes (256 bytes x 16 lanes x 8 B = 32 KB per CTA).
//   Shared-memory bandwidth, not arithmetic, is the second limit here: the table reads are 4 B per
//   weight against 0.5 B of HBM traffic, ~75% of the L1 budget at full HBM speed; x is reused from
//   registers across 16 (or 32) rows to keep its share small.
// Launch: 256 threads = 8 warps per CTA; a CTA owns 16*R output rows and its warps split K in
//   runs of U chunks of 128 (so a warp reads 64*U contiguous bytes of each of its rows), each with
//   2*R*U 16-byte code loads in flight before any use; the 8 partial sums meet in shared memory.
//   Persistent grid: min(tiles, 2 CTAs per SM), so the table is built once per CTA.
//
// Generic path (anything else: fp32, K % 32 != 0, misaligned pointers, pre-Ampere GPUs): one warp
// per output row, lanes striding over k with scalar loads, scale decoded per element. Correct for
// every shape (blocks straddling rows included), not fast.
#include <algorithm>

#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

// The tensor-core path exists on sm_80+ (bf16 mma.m16n8k16); other device passes compile it out
// and the launcher never picks it there. The host pass sees it, to launch it.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QLORA_GEMV_MMA 1
#else
#define QLORA_GEMV_MMA 0
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = 16;

// Decode the NF4 table (16 entries) into shared memory; constant indices fold to immediates.
__device__ __forceinline__ void load_nf4_codes(float* codes) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (threadIdx.x == i) codes[i] = nf4_code(i);
  }
}

// Scale of block b: the same two fp32 roundings as nf4_block_scale, with the nested block index
// by shift (nested_blocksize is a power of two) and the offset loaded once per thread.
__device__ __forceinline__ float block_scale(const NF4Scales& s, int64_t b, int nested_log2,
                                             float offset) {
  if (s.absmax != nullptr) return __ldg(s.absmax + b);
  const float product = __fmul_rn(__ldg(s.nested_code + __ldg(s.absmax_codes + b)),
                                  __ldg(s.nested_absmax + (b >> nested_log2)));
  return __fadd_rn(product, offset);
}

// ---- fast path: tensor cores -----------------------------------------------------------------
#if QLORA_GEMV_MMA

constexpr int kChunk = 128;       // k per warp step: 4 lane groups x 32 codes
constexpr int kTableLanes = 16;   // table copies: one per bank pair of a half-warp 8-byte access

// 16 bytes of codes, read once: skip L1 (x lives there) and do not keep them in the read-only cache.
__device__ __forceinline__ uint4 load_codes(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// (lo, hi) -> packed T2 bits, round to nearest even (one cvt.rn.{bf16x2,f16x2}.f32 on sm_80+).
__device__ __forceinline__ uint32_t pack_rn(__nv_bfloat16, float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_rn(__half, float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a · b for one m16n8k16 tile, fp32 accumulators.
__device__ __forceinline__ void mma_16816(__nv_bfloat16, float (&c)[4], uint32_t a0, uint32_t a1,
                                          uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(__half, float (&c)[4], uint32_t a0, uint32_t a1,
                                          uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Dequantize code bytes 2j and 2j+1 of a 16-byte run: the A-fragment words of k-step j.
// `table` is this lane's view of the replicated pair table (byte b at offset b * 128).
template <typename T>
__device__ __forceinline__ void dequantize_step(const uint4& run, int j, float scale,
                                                const char* table, uint32_t& lo_word,
                                                uint32_t& hi_word) {
  const uint32_t word = j < 2 ? run.x : (j < 4 ? run.y : (j < 6 ? run.z : run.w));  // bytes 2j, 2j+1
  const bool upper = (j & 1) != 0;  // bytes 2,3 of the word, else 0,1
  const uint32_t off_a = upper ? (word >> 9) & 0x7f80u : (word << 7) & 0x7f80u;
  const uint32_t off_b = upper ? (word >> 17) & 0x7f80u : (word >> 1) & 0x7f80u;
  const float2 a = *reinterpret_cast<const float2*>(table + off_a);
  const float2 b = *reinterpret_cast<const float2*>(table + off_b);
  // The even element is the high nibble (.x) and takes the low half of the word.
  lo_word = pack_rn(T{}, __fmul_rn(a.x, scale), __fmul_rn(a.y, scale));
  hi_word = pack_rn(T{}, __fmul_rn(b.x, scale), __fmul_rn(b.y, scale));
}

#endif  // QLORA_GEMV_MMA

// MT: groups of 8 rows of x (1: M <= 8, 2: M <= 16). R: 16-row weight tiles per CTA.
// U: 128-wide k chunks per warp step (loads in flight: 2*R*U codes + 4*MT*U x vectors per lane).
template <typename T, int MT, int R, int U>
__global__ void __launch_bounds__(kThreads, 2)
nf4_gemv_mma_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed,
                    NF4Scales scales, int blocksize_log2, int nested_log2, int64_t N, int64_t K,
                    const T* __restrict__ bias, T* __restrict__ y) {
#if QLORA_GEMV_MMA
  constexpr int kRows = 16 * R;
  constexpr int kCols = 8 * MT;
  __shared__ float2 table[256 * kTableLanes];            // 32 KB
  __shared__ float partial[kWarps / 2][kRows][kCols + 1];  // +1: fewer bank conflicts
  __shared__ float codes[16];
  load_nf4_codes(codes);
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * kTableLanes; i += kThreads) {
    const int byte = i / kTableLanes;
    table[i] = make_float2(codes[byte >> 4], codes[byte & 15]);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const char* my_table = reinterpret_cast<const char*>(table) + (lane % kTableLanes) * 8;
  const float offset = scales.absmax != nullptr ? 0.0f : __ldg(scales.nested_offset);
  const int64_t n_chunks = (K + kChunk - 1) / kChunk;
  const int64_t n_tiles = (N + kRows - 1) / kRows;

  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kRows;
    // Flat index of the first element of each row this lane reads (rows past N read row N-1;
    // their sums are never written).
    int64_t row_start[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = min(row0 + 16 * r + 8 * h + g, N - 1);
        row_start[r][h] = n * K;
      }
    }
    float acc[R][MT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][mt][i] = 0.0f;

    for (int64_t first = int64_t(warp) * U; first < n_chunks; first += int64_t(kWarps) * U) {
      uint4 w[U][R][2];
      uint4 xv[U][MT][4];
      bool valid[U];
      int64_t k[U];
      // All loads of the step first, so they are in flight together.
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k_run = (first + u) * kChunk + 32 * t;
        valid[u] = k_run < K;
        k[u] = valid[u] ? k_run : 0;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) w[u][r][h] = load_codes(packed + ((row_start[r][h] + k[u]) >> 1));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = g + 8 * mt;
          const uint4* src = reinterpret_cast<const uint4*>(x + int64_t(m) * K + k[u]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            xv[u][mt][q] = (valid[u] && m < M) ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
          }
        }
      }
      float scale[U][R][2];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // An invalid run multiplies zeros of x by zeros of W (scale 0 keeps W finite).
            scale[u][r][h] = valid[u] ? block_scale(scales, (row_start[r][h] + k[u]) >> blocksize_log2,
                                                    nested_log2, offset)
                                      : 0.0f;
          }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint32_t b[MT][2];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& v = xv[u][mt][j >> 1];
            b[mt][0] = (j & 1) ? v.z : v.x;
            b[mt][1] = (j & 1) ? v.w : v.y;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            uint32_t a0, a1, a2, a3;  // rows g / g+8, k slots {2t, 2t+1} / {2t+8, 2t+9}
            dequantize_step<T>(w[u][r][0], j, scale[u][r][0], my_table, a0, a2);
            dequantize_step<T>(w[u][r][1], j, scale[u][r][1], my_table, a1, a3);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_16816(T{}, acc[r][mt], a0, a1, a2, a3, b[mt][0], b[mt][1]);
          }
        }
      }
    }

    // C fragment: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols). The 8 warps'
    // sums meet in two rounds (upper half stores, lower half adds), so partial holds 4 copies.
    auto slot = [&](int r, int mt, int i) -> float& {
      return partial[warp % (kWarps / 2)][16 * r + g + 8 * (i >> 1)][8 * mt + 2 * t + (i & 1)];
    };
    if (warp >= kWarps / 2) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) slot(r, mt, i) = acc[r][mt][i];
    }
    __syncthreads();
    if (warp < kWarps / 2) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) slot(r, mt, i) += acc[r][mt][i];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
      const int row = i % kRows, m = i / kRows;
      const int64_t n = row0 + row;
      if (m < M && n < N) {
        float sum = 0.0f;
#pragma unroll
        for (int v = 0; v < kWarps / 2; ++v) sum += partial[v][row][m];
        if (bias != nullptr) sum += Element<T>::to_float(bias[n]);
        y[int64_t(m) * N + n] = Element<T>::from_float(sum);
      }
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
#endif  // QLORA_GEMV_MMA
}

// ---- generic path ----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_gemv_generic_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed,
                        NF4Scales scales, int blocksize_log2, int nested_log2, int64_t N,
                        int64_t K, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float codes[16];
  load_nf4_codes(codes);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const float offset = scales.absmax != nullptr ? 0.0f : __ldg(scales.nested_offset);
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t i = n * K + k;
    const uint8_t byte = __ldg(packed + (i >> 1));
    const int code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    const float scale = block_scale(scales, i >> blocksize_log2, nested_log2, offset);
    // Round to T exactly as nf4_dequantize stores it, then accumulate in fp32.
    const float w = Element<T>::to_float(Element<T>::from_float(__fmul_rn(codes[code], scale)));
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) acc[m] += Element<T>::to_float(x[int64_t(m) * K + k]) * w;
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      float v = acc[m];
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
      if (lane == 0) {
        if (bias != nullptr) v += Element<T>::to_float(bias[n]);
        y[int64_t(m) * N + n] = Element<T>::from_float(v);
      }
    }
  }
}

// Per-device facts, read once (the attribute queries are cheap, but not free per call).
struct DeviceFacts {
  int major = 0;
  int sm_count = 0;
};
cudaError_t device_facts(DeviceFacts& facts) {
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
  if (status == cudaSuccess && device < kMaxDevices) cache[device] = facts;
  return status;
}

template <typename T, int MT, int R, int U>
cudaError_t launch_mma(const T* x, int M, const uint8_t* packed, const NF4Scales& scales,
                       int blocksize_log2, int nested_log2, int64_t N, int64_t K, const T* bias,
                       T* y, int sm_count, cudaStream_t stream) {
  const int64_t tiles = ceil_div(N, 16 * R);
  const int64_t grid = std::min<int64_t>(tiles, int64_t(sm_count) * 2);
  nf4_gemv_mma_kernel<T, MT, R, U><<<dim3(unsigned(grid)), kThreads, 0, stream>>>(
      x, M, packed, scales, blocksize_log2, nested_log2, N, K, bias, y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_gemv_cuda(const void* x, FloatType type, int64_t M, int64_t K,
                          const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                          int64_t N, const void* bias, void* y, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kMaxM || K <= 0) return cudaErrorInvalidValue;  // the torch glue handles K == 0
  DeviceFacts facts;
  const cudaError_t status = device_facts(facts);
  if (status != cudaSuccess) return status;
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const int nested_log2 = log2_of_power_of_two(scales.nested_blocksize);
  const bool fast = type != FloatType::F32 && facts.major >= 8 && K % 32 == 0 &&
                    is_aligned(x, 16) && is_aligned(packed, 16);
  const int m = int(M);
  return dispatch_float_type(type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if constexpr (!std::is_same_v<T, float>) {
      if (fast) {
        if (m <= 8) {
          return launch_mma<T, 1, 1, 2>(xt, m, packed, scales, blocksize_log2, nested_log2, N, K,
                                        bt, yt, facts.sm_count, stream);
        }
        return launch_mma<T, 2, 2, 1>(xt, m, packed, scales, blocksize_log2, nested_log2, N, K,
                                      bt, yt, facts.sm_count, stream);
      }
    }
    const int64_t grid = ceil_div(N, kWarps);
    nf4_gemv_generic_kernel<T><<<dim3(unsigned(grid)), kThreads, 0, stream>>>(
        xt, m, packed, scales, blocksize_log2, nested_log2, N, K, bt, yt);
    return cudaGetLastError();
  });
}

}  // namespace qlora
