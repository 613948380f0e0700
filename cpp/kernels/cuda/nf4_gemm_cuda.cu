// NF4 GEMM for prefill-sized batches: y[M, N] = x[M, K] · deq(W[N, K])ᵀ (+ bias), 17 <= M <= 256
// (any M >= 1 works; the Python route sends it 17..64 rows, M <= 16 to nf4_gemv, and more rows to the Hopper kernel
// of nf4_gemm_sm90.cu where that wins, else to dequantize + cuBLAS).
//
//   deq(W)[n, k] = T(nf4[code(i)] * scale(i / blocksize)),  i = n*K + k (row-major flat index),
//   exactly the value nf4_dequantize writes (fp32 product, one rounding to T); y accumulates in fp32
//   and is rounded to T once, after the bias is added.
//
// Roofline (bf16, block 64, double quantization): bytes = 0.52 N*K (codes + 8-bit scales) + 2 M*K
// (x) + 2 M*N (y); FLOPs = 2 M*N*K. Against bf16 cuBLAS, which reads 2 N*K bytes of weight, the
// 4-bit weight wins while the product is memory-bound: at M = 64 it is ~240 FLOP/byte for us (the
// H100's balance point with mma.sync is roughly 150-250), so from M ~ 64 on the cost is tensor-core
// time plus the dequantization, which is done once per CTA tile and shared by its BM rows.
//
// Tiling: a CTA computes a BM x 128 tile of y (BM = 32, 64 or 128, chosen by M) in k-steps of 64.
//   x tile [BM, 64] T: cp.async (16 B, zero-filled past M) into shared memory, double-buffered.
//   W tile [128, 64]: each of the 256 threads loads one 16-byte run of 32 codes (half a row of the
//     tile) into registers two k-steps ahead (so 8 KB of codes per CTA are in flight while it
//     computes), with the raw parts of its scale (a 32-code run never straddles a quantization
//     block: blocksize >= 32 and K % 64 == 0; for double quantization the scale is an 8-bit code,
//     a map entry, a nested scale and the offset, decoded once per run), then writes the 32
//     values, T-rounded, to a double-buffered shared tile one k-step before they are used. The NF4 values come from a
//     16 x 32 table replicated per lane (lane l reads bank l whatever the code: no conflicts, 2 KB).
//   Both tiles are stored with rows of 128 B whose 16-byte chunks are XOR-swizzled by row % 8, so
//   the ldmatrix.x4 reads (8 rows of one chunk column) hit 8 distinct bank groups.
//   8 warps as WARPS_M x WARPS_N = BM/32 x 8/(BM/32); a warp owns 32 x (128/WARPS_N) of y: 2 x NT
//   mma.m16n8k16 tiles (A = x from ldmatrix, B = W from ldmatrix, fp32 accumulators).
//   One __syncthreads per k-step: the step computes on buffer s while the cp.async of x for step + 1
//   and the code loads for step + 2 are in flight, then writes W of step + 1 into buffer s ^ 1.
// Split-K: when the (N/128) x (M/BM) tiles do not fill the SMs (N = 4096 gives 32 column tiles on
//   132 SMs), K is cut into `splits` contiguous ranges; each writes fp32 partial sums to a
//   workspace [splits, M, N] and a second small kernel adds them in order (deterministic), adds the
//   bias and rounds once.
// Launch: 256 threads, grid (ceil(N/128), ceil(M/BM), splits); dynamic shared memory
//   2*BM*128 + 2*128*128 + 2048 bytes (50 KB at BM = 64, 66 KB at BM = 128).
//
// Requirements of this kernel (nf4_gemm_cuda_supported): sm_80+ (device and the build's code for
// it), fp16/bf16, K % 64 == 0, x and
// the codes 16-byte aligned. The torch layer routes every other case to nf4_dequantize + a matrix
// product (cuBLAS is not available to this torch-free library).
#include <algorithm>
#include <atomic>
#include <limits>

#include "cuda_common.cuh"
#include "cp_async.cuh"
#include "device_facts.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

// Tensor cores (bf16 mma.m16n8k16, ldmatrix, cp.async) exist on sm_80+; other device passes compile
// the kernel body out and the host never launches it there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QLORA_GEMM_MMA 1
#else
#define QLORA_GEMM_MMA 0
#endif

constexpr int kThreads = 256;
constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kRowBytes = kBK * 2;  // one tile row of T: 8 chunks of 16 bytes
constexpr int kTableBytes = 16 * 32 * 4;
constexpr int kMinKStepsPerSplit = 4;
constexpr int kMaxSplits = 16;

#if QLORA_GEMM_MMA

constexpr int kWarps = kThreads / 32;

// Byte offset of 16-byte chunk `chunk` of tile row `row`: chunks permuted by row % 8.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return uint32_t(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// 16 bytes of codes, read once per CTA: not kept in L1.
__device__ __forceinline__ uint4 load_codes(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// One thread's W run of a k-step as loaded from global memory: 32 codes and the raw parts of its
// scale. Loaded two k-steps ahead; only the map lookup of a double-quantized scale (an L1 hit in a
// 1 KB table) waits until the run is dequantized, so no global-memory latency is serial.
struct RawRun {
  uint4 codes;
  float absmax;      // plain: the scale; double-quantized: the nested scale of the block's group
  uint32_t code8;    // double-quantized: the block's 8-bit absmax code
};

__device__ __forceinline__ RawRun load_run(const uint8_t* packed, const NF4Scales& s, int64_t flat,
                                           int blocksize_log2, int nested_log2) {
  RawRun r;
  r.codes = load_codes(packed + (flat >> 1));
  const int64_t b = flat >> blocksize_log2;
  if (s.absmax != nullptr) {
    r.absmax = __ldg(s.absmax + b);
    r.code8 = 0;
  } else {
    r.absmax = __ldg(s.nested_absmax + (b >> nested_log2));
    r.code8 = __ldg(s.absmax_codes + b);
  }
  return r;
}

// The scale of a run: the same two fp32 roundings as nf4_block_scale.
__device__ __forceinline__ float run_scale(const RawRun& r, const NF4Scales& s, float offset) {
  if (s.absmax != nullptr) return r.absmax;
  return __fadd_rn(__fmul_rn(__ldg(s.nested_code + r.code8), r.absmax), offset);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t address, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ uint32_t pack_rn(__nv_bfloat16, float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_rn(__half, float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a · b, one m16n8k16 tile (A row-major 16 x 16, B "col": stored n-major), fp32 accumulators.
__device__ __forceinline__ void mma_16816(__nv_bfloat16, float (&c)[4], const uint32_t (&a)[4],
                                          uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(__half, float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// NF4 value of the nibble at bit `shift` of `word`, read from this lane's column of the table
// (`table` points at the lane's entry of code 0; code c is c * 128 bytes further).
template <int kShift>
__device__ __forceinline__ float nf4_value(uint32_t word, const char* table) {
  constexpr int kToOffset = kShift - 7;  // nibble -> byte offset code * 128
  const uint32_t off = (kToOffset >= 0 ? word >> kToOffset : word << -kToOffset) & 0x780u;
  return *reinterpret_cast<const float*>(table + off);
}

// One code byte (bits 8b..8b+7 of word) -> packed T pair: the high nibble is the even element and
// takes the low half.
template <typename T, int kByte>
__device__ __forceinline__ uint32_t dequantize_byte(uint32_t word, float scale, const char* table) {
  const float even = nf4_value<8 * kByte + 4>(word, table);
  const float odd = nf4_value<8 * kByte>(word, table);
  return pack_rn(T{}, __fmul_rn(even, scale), __fmul_rn(odd, scale));
}

template <typename T>
__device__ __forceinline__ uint4 dequantize_word(uint32_t word, float scale, const char* table) {
  return make_uint4(dequantize_byte<T, 0>(word, scale, table), dequantize_byte<T, 1>(word, scale, table),
                    dequantize_byte<T, 2>(word, scale, table), dequantize_byte<T, 3>(word, scale, table));
}

// The CTA's k-steps [begin, end) of split blockIdx.z.
__device__ __forceinline__ void split_range(int k_steps, int& begin, int& end) {
  const int splits = gridDim.z, z = blockIdx.z;
  begin = int(int64_t(k_steps) * z / splits);
  end = int(int64_t(k_steps) * (z + 1) / splits);
}

#endif  // QLORA_GEMM_MMA

// partial == nullptr: y = T(acc + bias). Otherwise partial[z, m, n] = acc (fp32, no bias).
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, 2)
nf4_gemm_mma_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed,
                    NF4Scales scales, int blocksize_log2, int nested_log2, int N, int K,
                    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial) {
#if QLORA_GEMM_MMA
  constexpr int kWarpsM = BM / 32;
  constexpr int kWarpsN = kWarps / kWarpsM;
  constexpr int kWarpN = kBN / kWarpsN;  // columns of y per warp
  constexpr int kNT = kWarpN / 8;        // n8 mma tiles per warp
  static_assert(kNT % 2 == 0, "B fragments are loaded for two n8 tiles at once");
  constexpr int kXStage = BM * kRowBytes;
  constexpr int kWStage = kBN * kRowBytes;
  constexpr int kXChunks = BM * 8;  // 16-byte chunks of an x tile

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* x_tiles = smem;                      // [2][BM][64] T, swizzled
  unsigned char* w_tiles = smem + 2 * kXStage;        // [2][128][64] T, swizzled
  float* table = reinterpret_cast<float*>(smem + 2 * kXStage + 2 * kWStage);  // [16][32]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * kBN;
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < 16; ++c) table[c * 32 + lane] = nf4_code(c);  // constant index: an immediate
  }
  const char* my_table = reinterpret_cast<const char*>(table) + lane * 4;

  int step_begin, step_end;
  split_range(K / kBK, step_begin, step_end);

  // This thread's W run: row w_row of the tile, codes [32 * w_half, +32) of each k-step. Rows past
  // N read row N - 1 (finite values; their sums are never stored).
  const int w_row = tid >> 1, w_half = tid & 1;
  const int64_t w_flat = int64_t(min(n0 + w_row, N - 1)) * K + 32 * w_half;  // + k0 per step
  const float offset = scales.absmax != nullptr ? 0.0f : __ldg(scales.nested_offset);

  auto load_x = [&](int step, int stage) {
    const int k0 = step * kBK;
    const uint32_t base = shared_address(x_tiles + stage * kXStage);
#pragma unroll
    for (int c = tid; c < kXChunks; c += kThreads) {
      const int row = c >> 3, chunk = c & 7;
      const int m = m0 + row;
      const T* src = x + int64_t(m < M ? m : 0) * K + k0 + chunk * 8;
      cp_async16(base + swizzle(row, chunk), src, m < M ? 16 : 0);
    }
    cp_async_commit();
  };
  auto store_w = [&](const uint4& codes, float scale, int stage) {
    unsigned char* base = w_tiles + stage * kWStage;
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // Word q holds codes 8q..8q+7 of the run: chunk 4 * w_half + q of the row.
      *reinterpret_cast<uint4*>(base + swizzle(w_row, 4 * w_half + q)) =
          dequantize_word<T>(words[q], scale, my_table);
    }
  };

  float acc[2][kNT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  __syncthreads();  // the table
  // Runs of k-steps step + 1 (pending) and step + 2 (ahead), in registers.
  RawRun pending{}, ahead{};
  auto load_step = [&](int step) {
    return load_run(packed, scales, w_flat + int64_t(step) * kBK, blocksize_log2, nested_log2);
  };
  if (step_begin < step_end) {
    load_x(step_begin, 0);
    const RawRun first = load_step(step_begin);
    if (step_begin + 1 < step_end) pending = load_step(step_begin + 1);
    store_w(first.codes, run_scale(first, scales, offset), 0);
    cp_async_wait_all();
    __syncthreads();
  }

  // ldmatrix addresses: A (x) matrices = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
  // (rows 8-15, k 8-15) -> a0..a3; lane l gives row l % 16 and chunk l / 16. B (W, n-major) for
  // n-tiles j, j+1: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> b0, b1 of
  // tile j, b0, b1 of tile j + 1; lane l gives n row (l % 8) + 8 (l / 16) and chunk (l / 8) % 2.
  const int a_row = warp_m * 32 + (lane & 15), a_chunk = lane >> 4;
  const int b_row = warp_n * kWarpN + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;

  for (int step = step_begin; step < step_end; ++step) {
    const int stage = (step - step_begin) & 1;
    const bool has_next = step + 1 < step_end;
    if (has_next) load_x(step + 1, stage ^ 1);
    if (step + 2 < step_end) ahead = load_step(step + 2);

    const uint32_t x_base = shared_address(x_tiles + stage * kXStage);
    const uint32_t w_base = shared_address(w_tiles + stage * kWStage);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(x_base + swizzle(a_row + 16 * mt, 2 * ks + a_chunk), a[mt]);
#pragma unroll
      for (int nt = 0; nt < kNT; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(w_base + swizzle(b_row + 8 * nt, 2 * ks + b_chunk), b);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816(T{}, acc[mt][nt], a[mt], b[0], b[1]);
          mma_16816(T{}, acc[mt][nt + 1], a[mt], b[2], b[3]);
        }
      }
    }

    if (has_next) {
      store_w(pending.codes, run_scale(pending, scales, offset), stage ^ 1);
      cp_async_wait_all();
    }
    pending = ahead;
    __syncthreads();
  }

  // C fragment: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g + 8, same cols).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + warp_m * 32 + 16 * mt + 8 * half + g;
      if (m >= M) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int n = n0 + warp_n * kWarpN + 8 * nt + 2 * t;
        const float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
        if (partial != nullptr) {
          float* dst = partial + (int64_t(blockIdx.z) * M + m) * N + n;
          if (n < N) dst[0] = v0;
          if (n + 1 < N) dst[1] = v1;
        } else {
          T* dst = y + int64_t(m) * N + n;
          if (n < N) dst[0] = Element<T>::from_float(bias != nullptr ? v0 + Element<T>::to_float(bias[n]) : v0);
          if (n + 1 < N) {
            dst[1] = Element<T>::from_float(bias != nullptr ? v1 + Element<T>::to_float(bias[n + 1]) : v1);
          }
        }
      }
    }
  }
#endif  // QLORA_GEMM_MMA
}

// y[m, n] = T(sum over z of partial[z, m, n] (in order) + bias[n]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_gemm_reduce_kernel(const float* __restrict__ partial, int splits, int64_t count, int N,
                       const T* __restrict__ bias, T* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[int64_t(z) * count + i];
    if (bias != nullptr) sum += Element<T>::to_float(bias[i % N]);
    y[i] = Element<T>::from_float(sum);
  }
}

int tile_rows(int64_t M) { return M <= 32 ? 32 : (M <= 64 ? 64 : 128); }

int shared_bytes(int bm) { return 2 * bm * kRowBytes + 2 * kBN * kRowBytes + kTableBytes; }

// K-splits for this shape: enough CTAs to cover every SM once, each split at least
// kMinKStepsPerSplit k-steps.
int split_count(int64_t M, int64_t N, int64_t K, int sm_count) {
  const int64_t tiles = ceil_div(N, kBN) * ceil_div(M, tile_rows(M));
  const int64_t k_steps = K / kBK;
  const int64_t wanted = ceil_div(int64_t(sm_count), tiles);
  const int64_t most = std::max<int64_t>(1, k_steps / kMinKStepsPerSplit);
  return int(std::clamp<int64_t>(std::min(wanted, most), 1, kMaxSplits));
}

template <typename T, int BM>
cudaError_t launch_mma(const T* x, int64_t M, const uint8_t* packed, const NF4Scales& scales,
                       int blocksize_log2, int nested_log2, int64_t N, int64_t K, const T* bias,
                       T* y, float* workspace, int splits, cudaStream_t stream) {
  const int bytes = shared_bytes(BM);
  // The opt-in above 48 KB is per kernel and device; setting it again is cheap but not free.
  constexpr int kMaxDevices = 64;
  static bool opted_in[kMaxDevices] = {};
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device >= kMaxDevices || !opted_in[device]) {
    status = cudaFuncSetAttribute(nf4_gemm_mma_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (status != cudaSuccess) return status;
    if (device < kMaxDevices) opted_in[device] = true;
  }
  const dim3 grid(unsigned(ceil_div(N, kBN)), unsigned(ceil_div(M, BM)), unsigned(splits));
  nf4_gemm_mma_kernel<T, BM><<<grid, kThreads, bytes, stream>>>(
      x, int(M), packed, scales, blocksize_log2, nested_log2, int(N), int(K), bias, y,
      splits > 1 ? workspace : nullptr);
  status = cudaGetLastError();
  if (status != cudaSuccess || splits == 1) return status;
  const int64_t count = M * N;
  const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), 4096);
  nf4_gemm_reduce_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(workspace, splits, count, int(N), bias, y);
  return cudaGetLastError();
}

// From this many rows nf4_gemm takes the Hopper kernel (kernels_cuda.h): past the rows the route gives the tiled kernel
// (NF4_GEMM_ROUTE_MAX_ROWS). On the H100 it beat the tiled kernel at 256 rows on all four 8B shapes (4096x4096: 50.4
// against 67.2 µs; 28672x8192: 231 against 645) and at 128 where N >= 14336 (56.4 against 97.9 µs at 14336x4096);
// at 128 rows with N = 4096 the tiled one was faster, and the dense route faster than both (docs/nf4_gemm_sm90.md).
std::atomic<int64_t> g_sm90_min_rows{65};

}  // namespace

int64_t nf4_gemm_sm90_min_rows() { return g_sm90_min_rows.load(std::memory_order_relaxed); }

bool nf4_gemm_set_sm90_min_rows(int64_t rows) {
  if (rows < 1) return false;
  g_sm90_min_rows.store(rows, std::memory_order_relaxed);
  return true;
}

#if !defined(QLORA_WITH_SM90_GEMM)
// This build has no sm_90a code (no 90 in its architecture list): the Hopper kernel supports nothing.
bool nf4_gemm_sm90_cuda_device_ready() { return false; }
bool nf4_gemm_sm90_cuda_supported(FloatType, int64_t, int64_t, int64_t, int64_t, const NF4Scales&, const void*,
                                  const uint8_t*) {
  return false;
}
cudaError_t nf4_gemm_sm90_cuda(const void*, FloatType, int64_t, int64_t, const uint8_t*, const NF4Scales&, int64_t,
                               int64_t, const void*, void*, cudaStream_t) {
  return cudaErrorInvalidValue;
}
#endif

bool nf4_gemm_cuda_supported(FloatType type, int64_t M, int64_t N, int64_t K, const void* x,
                             const uint8_t* packed) {
  DeviceFacts facts;
  if (device_facts(facts) != cudaSuccess) return false;
  // int indices inside the kernel: M * K, N and K fit easily below 2^31 for M <= 256.
  return type != FloatType::F32 && facts.major >= 8 && facts.mma_built && M >= 1 && M <= kNF4GemmMaxRows && N >= 1 &&
         N < (int64_t(1) << 31) && K >= kBK && K % kBK == 0 && K < (int64_t(1) << 31) &&
         is_aligned(x, 16) && is_aligned(packed, 16);
}

int64_t nf4_gemm_cuda_workspace(int64_t M, int64_t N, int64_t K) {
  DeviceFacts facts;
  if (M <= 0 || N <= 0 || K < kBK || device_facts(facts) != cudaSuccess) return 0;
  const int splits = split_count(M, N, K, facts.sm_count);
  return splits > 1 ? int64_t(splits) * M * N : 0;
}

cudaError_t nf4_gemm_cuda(const void* x, FloatType type, int64_t M, int64_t K, const uint8_t* packed,
                          const NF4Scales& scales, int64_t blocksize, int64_t N, const void* bias,
                          void* y, float* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (!nf4_gemm_cuda_supported(type, M, N, K, x, packed)) return cudaErrorInvalidValue;
  DeviceFacts facts;
  const cudaError_t status = device_facts(facts);
  if (status != cudaSuccess) return status;
  const int splits = split_count(M, N, K, facts.sm_count);
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const int nested_log2 = log2_of_power_of_two(scales.nested_blocksize);
  return dispatch_float_type(type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // excluded by nf4_gemm_cuda_supported
    } else {
      const T* xt = static_cast<const T*>(x);
      const T* bt = static_cast<const T*>(bias);
      T* yt = static_cast<T*>(y);
      switch (tile_rows(M)) {
        case 32:
          return launch_mma<T, 32>(xt, M, packed, scales, blocksize_log2, nested_log2, N, K, bt, yt,
                                   workspace, splits, stream);
        case 64:
          return launch_mma<T, 64>(xt, M, packed, scales, blocksize_log2, nested_log2, N, K, bt, yt,
                                   workspace, splits, stream);
        default:
          return launch_mma<T, 128>(xt, M, packed, scales, blocksize_log2, nested_log2, N, K, bt,
                                    yt, workspace, splits, stream);
      }
    }
  });
}

}  // namespace qlora
