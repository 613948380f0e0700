// NF4 GEMV / skinny GEMM for decoding: y[M, N] = x[M, K] · deq(W[N, K])ᵀ (+ bias), M <= 16.
//
//   W[n, k] = nf4[code(i)] * scale(i / blocksize),  i = n*K + k (row-major flat index).
//   Contract: the products use W held at least to T's precision; y accumulates in fp32 and is
//   rounded to T once, after the bias is added. Per kernel:
//     "mma" (variant 0, the default) and the generic path: T(nf4 * scale), exactly the value
//       nf4_dequantize writes (fp32 product, one rounding to T), as the CPU kernel does;
//     "factored", "factored_r2", "factored_r1": T(nf4) * scale (nf4 rounded to T, the scale
//       applied in fp32 to each block's partial sum);
//     "factored_split": (T(nf4) + T(nf4 - T(nf4))) * scale, nf4 * scale to ~2^-17 relative.
//   The tests judge every variant against the exact fp32 product (reference.nf4_gemv), with plain
//   PyTorch's error in T (which includes rounding W to T) as the yardstick.
//   Variants are switchable at run time (nf4_gemv_cuda_set_variant, kernels_cuda.h) so that one
//   process can measure them against each other; see the factored kernel's comment for why each.
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
// Factored fast path (variant 1 "factored", the default since 2026-12-06, and its relatives 2-4,
//   7-9; runtime switch): the block scale leaves the per-element work, see
//   nf4_gemv_factored_kernel. It also serves nf4_gemv_grouped_cuda (several weights stacked along
//   N in one launch, FactoredParts).
//
// Ring path (variant 13 "ring", session 22; not the default): M <= 4 with blocksize 64 and K % 256 == 0,
//   per-warp cp.async rings and 16-byte code runs, see nf4_gemv_ring_kernel.
//
// Generic path (anything else: fp32, K % 32 != 0, misaligned pointers, pre-Ampere GPUs or a build
// without sm_80+ code for the device): one warp per output row, lanes striding over k with scalar
// loads, scale decoded per element. Correct for every shape (blocks straddling rows included), not
// fast.
#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "cuda_common.cuh"
#include "cp_async.cuh"
#include "dependent_launch.cuh"
#include "device_facts.cuh"
#include "qlora/kernels_cuda.h"
#include "swiglu_math.cuh"

namespace qlora {
namespace {

using namespace cuda_detail;

// The weights of one factored launch: `count` matrices [rows_p, K] stacked along N (the attention's
// q, k, v or the MLP's gate and up: one launch where there would be several, each too small to
// fill the GPU alone), read as one weight of N = end_row[count - 1] rows whose outputs lie side
// by side in y [M, N]. Part p holds rows [end_row[p - 1], end_row[p]) (end_row[-1] = 0); every
// part but the last is a whole number of tiles, so a tile reads one part. Each part has its own
// codes and scales, in one form for all (plain: absmax; double quantization: absmax_codes,
// nested_absmax, nested_offset), and one shared nested map (nested_code).
struct FactoredParts {
  const uint8_t* packed[kMaxGemvParts] = {};
  const float* absmax[kMaxGemvParts] = {};
  const uint8_t* absmax_codes[kMaxGemvParts] = {};
  const float* nested_absmax[kMaxGemvParts] = {};
  const float* nested_offset[kMaxGemvParts] = {};
  int64_t end_row[kMaxGemvParts] = {};
  const float* nested_code = nullptr;
  int count = 0;

  void add(const uint8_t* part_packed, const NF4Scales& scales, int64_t rows) {
    packed[count] = part_packed;
    absmax[count] = scales.absmax;
    absmax_codes[count] = scales.absmax_codes;
    nested_absmax[count] = scales.nested_absmax;
    nested_offset[count] = scales.nested_offset;
    if (count == 0) nested_code = scales.nested_code;
    end_row[count] = (count == 0 ? 0 : end_row[count - 1]) + rows;
    ++count;
  }
};

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

// The end of a tile, shared by the tensor-core kernels: the 8 warps' fp32 C fragments (c0, c1 =
// row g, cols 2t, 2t+1; c2, c3 = row g+8, same cols) meet in shared memory in two rounds (upper
// half of the warps stores, lower half adds, so `partial` holds 4 copies), then one thread per
// output sums the copies, adds the bias and rounds to T once. The caller's __syncthreads() after
// it guards `partial` against the next tile.
template <int MT, int R, int kRows, int kPaddedCols>
__device__ __forceinline__ void reduce_partials(const float (&acc)[R][MT][4],
                                                float (&partial)[kWarps / 2][kRows][kPaddedCols], int warp,
                                                int g, int t) {
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
}

// Tile row `row`'s fp32 sum for x row m: the 4 copies reduce_partials leaves.
template <int kRows, int kPaddedCols>
__device__ __forceinline__ float partial_sum(const float (&partial)[kWarps / 2][kRows][kPaddedCols], int row, int m) {
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < kWarps / 2; ++v) sum += partial[v][row][m];
  return sum;
}

template <typename T, int MT, int R, int kRows, int kPaddedCols>
__device__ __forceinline__ void reduce_and_store(const float (&acc)[R][MT][4],
                                                 float (&partial)[kWarps / 2][kRows][kPaddedCols], int warp,
                                                 int g, int t, int64_t row0, int M, int64_t N,
                                                 const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int kCols = kPaddedCols - 1;  // the +1 column only spreads the banks
  reduce_partials<MT, R>(acc, partial, warp, g, t);
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const int row = i % kRows, m = i / kRows;
    const int64_t n = row0 + row;
    if (m < M && n < N) {
      float sum = partial_sum(partial, row, m);
      if (bias != nullptr) sum += Element<T>::to_float(bias[n]);
      y[int64_t(m) * N + n] = Element<T>::from_float(sum);
    }
  }
}

// The SwiGLU epilogue (GLU tiles, see nf4_gemv_factored_kernel): tile row 16r + i (i < 8) is gate
// row out0 + 8r + i and tile row 16r + 8 + i the up row of the same index. Each is rounded to T as
// the grouped GEMV would store it (bias [2 N] = gate's then up's, added first), then
// y[m, n] = T(silu(gate) * up) with the SwiGLU kernels' fp32 math: the bits of nf4_gemv_grouped
// followed by swiglu.
template <typename T, int MT, int R, int kRows, int kPaddedCols>
__device__ __forceinline__ void reduce_and_store_glu(const float (&acc)[R][MT][4],
                                                     float (&partial)[kWarps / 2][kRows][kPaddedCols], int warp,
                                                     int g, int t, int64_t out0, int M, int64_t N,
                                                     const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int kCols = kPaddedCols - 1;
  constexpr int kOutRows = kRows / 2;
  reduce_partials<MT, R>(acc, partial, warp, g, t);
  for (int i = threadIdx.x; i < kOutRows * kCols; i += kThreads) {
    const int out_row = i % kOutRows, m = i / kOutRows;
    const int tile_row = 16 * (out_row / 8) + out_row % 8;
    const int64_t n = out0 + out_row;
    if (m < M && n < N) {
      float gate = partial_sum(partial, tile_row, m), up = partial_sum(partial, tile_row + 8, m);
      if (bias != nullptr) {
        gate += Element<T>::to_float(bias[n]);
        up += Element<T>::to_float(bias[N + n]);
      }
      const float gate_t = Element<T>::to_float(Element<T>::from_float(gate));
      const float up_t = Element<T>::to_float(Element<T>::from_float(up));
      y[int64_t(m) * N + n] = Element<T>::from_float(swiglu(gate_t, up_t));
    }
  }
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

    reduce_and_store<T, MT, R>(acc, partial, warp, g, t, row0, M, N, bias, y);
    __syncthreads();  // partial is rewritten by the next tile
  }
#endif  // QLORA_GEMV_MMA
}

// ---- fast path, factored scale (variants "factored", "factored_split", "factored_r2/_r1") ----
//
// The block scale leaves the per-element work: every MMA k-step's 16 k values lie in ONE
// quantization block, so sum_k x[k] * nf4[k] * scale = scale * sum_k x[k] * nf4[k], and the
// tensor cores multiply the raw NF4 values. Lane (g, t) takes codes [16t, 16t+16) of each
// 64-code segment of its rows g and g+8 (one 8-byte load each), so a k-step's 4 t-lanes hold
// codes of one segment, and a segment (64-aligned in the flat index: K % 64 == 0) lies inside one
// block when blocksize >= 64. Per segment and 16-row tile: 4 k-steps into a zeroed fp32 temp
// fragment, then acc += scale * temp (one FFMA per accumulator; c0, c1 are row g, c2, c3 row g+8,
// each with its own scale). Blocksize 32 or K % 64 != 0 keep the "mma" kernel.
//
// Per code byte (2 weights) that leaves one LDS.32 and two integer ops (shift, and-or of the
// lane's copy offset): the table holds T2 words (T(nf4[hi]) | T(nf4[lo]) << 16), i.e. the
// A-fragment word itself, replicated 32 times so that lane l always reads bank l (conflict-free
// whatever the codes; 256 x 32 x 4 B = 32 KB). The "mma" kernel spends an LDS.64 (two bank
// cycles), two FMUL and a packed cvt per byte on top.
//
// Precision: the weight the tensor cores see is T(nf4) * scale (scale exact in fp32) instead of
// T(nf4 * scale): one rounding of the same size, at a different place. SPLIT (variant
// "factored_split") adds lo = T(nf4 - T(nf4)) and a second MMA per k-step into the same temp
// (LDS.64 of (hi, lo) words, 16 copies = 32 KB): the weight is then nf4 * scale to about 2^-17
// relative (bf16) or better (fp16), i.e. more exact than any dequantized weight in T.
//
// Pipelining: a warp's work is a flat list of (tile, step) items (step = SEG segments of 64 k).
// The codes and scale ingredients of the next item are loaded into registers before the current
// one is computed, across tile boundaries too, and the first item's loads are issued before the
// CTA builds its tables, so the table build hides under the first DRAM latency. x is not
// prefetched (it is small and L1/L2-resident; its latency only matters if it outlasts a DRAM
// round trip), which keeps the register budget for deeper code loads.
// Scales: lane t computes the scale of segment t % SEG of its rows (the 4 t-lanes need the same
// scales) and the others come by __shfl_sync; the 256-entry map of double quantization is copied
// to shared memory once per CTA.
// Tile shapes (template MT, R, SEG; the variants pick them per M, see nf4_gemv_cuda):
//   "factored"  M <= 8: 16-row tiles, SEG 4 (2 KB of codes per warp in flight, ~32 KB per SM at
//               2 CTAs x 8 warps, above the ~14 KB that Little's law asks at ~3 TB/s and ~600 ns);
//               M > 8: 32-row tiles, SEG 2 (x, 2 x 32 B per lane per segment, is re-read from
//               L1/L2 per tile: 32 rows halve that traffic per code byte; ptxas spills ~16 B).
//   "factored_r2" / "factored_r1": the other row-tile / step shapes, for the A/B (r2 halves x
//               traffic at M <= 8 but leaves SMs idle where N / 32 < 2 x SMs; r1 keeps more CTAs).
// Not tried here (candidates if these fall short): cp.async multi-stage rings in shared memory
// (deeper prefetch without registers), split-K across CTAs for N = 4096 at M = 16 (a 32-row tile
// grid has fewer CTAs than 2 x SMs there), x staged in shared memory for M = 1.
#if QLORA_GEMV_MMA

constexpr int kSegment = 64;

// 8 bytes of codes, read once (see load_codes).
__device__ __forceinline__ uint2 load_codes8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Byte `pos` of `word` as a table offset, or'ed with the lane's copy offset. The narrow table
// (WIDE = false, 32 KB) keeps 128 bytes per code byte: byte * 128 | lane_offset (< 128), a shift,
// an and and an or. The wide one (64 KB) keeps 256: byte * 256 | lane_offset (< 256) is one
// byte permute (result byte 0 = lane_offset's byte 0, byte 1 = word's byte pos, bytes 2-3 =
// lane_offset's zero bytes 1), 2 instructions fewer per lookup.
template <int kPos, bool WIDE = false>
__device__ __forceinline__ uint32_t table_offset(uint32_t word, uint32_t lane_offset) {
  if constexpr (WIDE) {
    return __byte_perm(word, lane_offset, 0x5504u | (uint32_t(kPos) << 4));
  } else {
    const uint32_t shifted = kPos == 0 ? (word << 7) : (word >> (8 * kPos - 7));
    return (shifted & 0x7f80u) | lane_offset;
  }
}

// Table offsets of k-step j's A-fragment words from the codes of rows g (cg) and g+8 (cg8), code
// bytes 2j (k slots 2t, 2t+1) and 2j+1 (slots 2t+8, 2t+9): o[0] row g low byte, o[1] row g+8 low,
// o[2] row g high, o[3] row g+8 high (a0..a3 of mma.m16n8k16). j is a compile-time constant after
// unrolling, so the selects fold away.
template <bool WIDE = false>
__device__ __forceinline__ void step_table_offsets(int j, const uint2& cg, const uint2& cg8,
                                                   uint32_t lane_offset, uint32_t (&o)[4]) {
  const uint32_t wg = j < 2 ? cg.x : cg.y;
  const uint32_t wg8 = j < 2 ? cg8.x : cg8.y;
  if ((j & 1) == 0) {
    o[0] = table_offset<0, WIDE>(wg, lane_offset);
    o[1] = table_offset<0, WIDE>(wg8, lane_offset);
    o[2] = table_offset<1, WIDE>(wg, lane_offset);
    o[3] = table_offset<1, WIDE>(wg8, lane_offset);
  } else {
    o[0] = table_offset<2, WIDE>(wg, lane_offset);
    o[1] = table_offset<2, WIDE>(wg8, lane_offset);
    o[2] = table_offset<3, WIDE>(wg, lane_offset);
    o[3] = table_offset<3, WIDE>(wg8, lane_offset);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits_of(T v) {
  return uint32_t(*reinterpret_cast<const uint16_t*>(&v));
}

#endif  // QLORA_GEMV_MMA

template <int MT, int R, int SEG>
struct FactoredStage {
  uint2 codes[R][2][SEG];  // rows g / g+8 of each tile, 16 codes of each segment
  uint32_t scale_code[R][2];  // double quantization: the block's 8-bit code (segment t % SEG)
  float scale_raw[R][2];      // the fp32 absmax (plain) or the nested absmax (double quantization)
  int part;                   // the FactoredParts entry the tile reads
};

// v[p] for a warp-uniform p < count without indexing the kernel-parameter array at run time
// (which would copy the whole struct to local memory): a chain of selects.
template <typename V>
__device__ __forceinline__ V select_part(const V (&v)[kMaxGemvParts], int p) {
  V out = v[0];
#pragma unroll
  for (int i = 1; i < kMaxGemvParts; ++i) out = p == i ? v[i] : out;
  return out;
}

// WIDE: the 64 KB table of 256 bytes per code byte in dynamic shared memory (see table_offset).
// The weights are `parts` stacked along N (one part: a plain GEMV; see FactoredParts), y [M, N] with
// N = parts.end_row[parts.count - 1], bias [N] or nullptr.
// CTAS: CTAs per SM the launch bounds promise (2: up to 128 registers a thread; 3: 80; 4: 64) and
// the persistent grid fills.
// GLU: the MLP's gate and up in one launch with SwiGLU in the epilogue (nf4_gemv_swiglu_cuda):
// parts = {gate, up}, both [N, K]; y [M, N] = swiglu(x·gateᵀ, x·upᵀ). A tile then holds 8R output
// rows: MMA rows g (h = 0) read gate row out0 + 8r + g and rows g + 8 (h = 1) the up row of the same
// index, so both sums of an output meet in one CTA (reduce_and_store_glu). The same work per byte
// as the grouped launch; one kernel and the [M, 2N] round trip fewer.
// LEAN: one weight (parts.count == 1, no GLU), known at compile time: the part search and the
// select chains over the parts' pointers fold away, which cuts the per-step address work of the
// plain GEMV (session 21's Nsight Compute: 10.4 instructions per code byte, most of them around
// the table lookups rather than in them) and the registers it holds. Measured (H100,
// nf4_gemv_lean_h100.json): M = 1 from 4% slower to 8% faster than factored_fill at 3 CTAs a SM, M > 8 3-5% faster.
template <typename T, int MT, int R, int SEG, bool SPLIT, bool WIDE, int CTAS = 2, bool GLU = false, bool LEAN = false>
__global__ void __launch_bounds__(kThreads, CTAS)
nf4_gemv_factored_kernel(const T* __restrict__ x, int M, FactoredParts parts, int blocksize_log2,
                         int nested_log2, int64_t K, const T* __restrict__ bias, T* __restrict__ y) {
#if QLORA_GEMV_MMA
  static_assert(SEG == 1 || SEG == 2 || SEG == 4, "lane t computes the scale of segment t % SEG");
  static_assert(!(LEAN && GLU), "LEAN is the one-weight GEMV");
  constexpr int kRows = 16 * R;
  constexpr int kCols = 8 * MT;
  constexpr int kStepK = kSegment * SEG;
  using Stage = FactoredStage<MT, R, SEG>;
  // SPLIT: uint2 (hi, lo) at byte * 128 + (lane % 16) * 8; else uint32 at byte * 128 + lane * 4.
  // WIDE: the same at byte * 256 + lane * 8 (SPLIT) or + lane * 4 (copies 32..63 unused).
  constexpr int kTableVectors = WIDE ? 4096 : 2048;  // uint4s: 64 KB or 32 KB
  extern __shared__ __align__(16) uint4 wide_table[];
  __shared__ uint4 narrow_table[WIDE ? 1 : 2048];
  uint4* const table = WIDE ? wide_table : narrow_table;
  __shared__ float partial[kWarps / 2][kRows][kCols + 1];
  __shared__ float nested_map[256];
  __shared__ float codes[16];
  __shared__ float part_offset[kMaxGemvParts];  // each part's nested offset (double quantization)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const bool double_quant = parts.absmax[0] == nullptr;  // the same form for every part
  // GLU: N is the output width (gate's rows), a tile covers kRows / 2 outputs.
  const int64_t N = GLU ? parts.end_row[0] : parts.end_row[parts.count - 1];
  constexpr int kTileOutputs = GLU ? kRows / 2 : kRows;
  const int64_t n_steps = (K + kStepK - 1) / kStepK;
  const int64_t n_tiles = (N + kTileOutputs - 1) / kTileOutputs;
  const bool active = warp < n_steps;  // a warp with no step in a tile has none in any tile

  auto load_stage = [&](Stage& st, int64_t tile, int64_t step) {
    const int64_t k0 = step * kStepK;
    const int64_t k_mine = k0 + kSegment * (t % SEG);
    // The tile's part (a tile never straddles two: every part but the last is whole tiles). GLU:
    // part h for rows g + 8h (below), st.part unused.
    const int64_t tile_row = tile * kTileOutputs;
    int p = 0;
    if constexpr (!GLU && !LEAN) {
#pragma unroll
      for (int i = 0; i + 1 < kMaxGemvParts; ++i) p += (i + 1 < parts.count && tile_row >= parts.end_row[i]) ? 1 : 0;
    }
    st.part = p;
    const uint8_t* const packed = LEAN ? parts.packed[0] : select_part(parts.packed, p);
    const float* const absmax = LEAN ? parts.absmax[0] : select_part(parts.absmax, p);
    const uint8_t* const absmax_codes = LEAN ? parts.absmax_codes[0] : select_part(parts.absmax_codes, p);
    const float* const nested_absmax = LEAN ? parts.nested_absmax[0] : select_part(parts.nested_absmax, p);
    const int64_t part_start = LEAN || p == 0 ? 0 : select_part(parts.end_row, p - 1);
    const int64_t part_last = (LEAN ? N : select_part(parts.end_row, p)) - 1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Rows past the part's (i.e. N's) end read its last row; their sums are never written.
        const int64_t row_start = GLU ? min(tile_row + 8 * r + g, N - 1) * K
                                      : (min(tile_row + 16 * r + 8 * h + g, part_last) - part_start) * K;
        // row_start + k0 is a multiple of 64 (K % 64 == 0): byte offsets of the segments are
        // immediates from one pointer.
        const uint8_t* row_codes = (GLU ? parts.packed[h] : packed) + ((row_start + k0) >> 1) + 8 * t;
#pragma unroll
        for (int s = 0; s < SEG; ++s) {
          st.codes[r][h][s] = k0 + kSegment * s < K ? load_codes8(row_codes + 32 * s) : make_uint2(0, 0);
        }
        const int64_t b = (row_start + (k_mine < K ? k_mine : 0)) >> blocksize_log2;
        if (double_quant) {
          st.scale_code[r][h] = __ldg((GLU ? parts.absmax_codes[h] : absmax_codes) + b);
          st.scale_raw[r][h] = __ldg((GLU ? parts.nested_absmax[h] : nested_absmax) + (b >> nested_log2));
        } else {
          st.scale_code[r][h] = 0;
          st.scale_raw[r][h] = __ldg((GLU ? parts.absmax[h] : absmax) + b);
        }
      }
    }
  };

  allow_dependents();  // (programmatic dependent launch: dependent_launch.cuh)
  int64_t tile = blockIdx.x;
  Stage cur;
  if (active) load_stage(cur, tile, warp);  // in flight while the tables are built

  load_nf4_codes(codes);
  if (double_quant) {
    // One map for every part (the grouped launcher's contract), each part its own offset.
    for (int i = threadIdx.x; i < 256; i += kThreads) nested_map[i] = __ldg(parts.nested_code + i);
    if (threadIdx.x < parts.count) part_offset[threadIdx.x] = __ldg(select_part(parts.nested_offset, threadIdx.x));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTableVectors; i += kThreads) {
    const int byte = WIDE ? i >> 4 : i >> 3;  // 16 or 8 uint4 (256 or 128 bytes) per byte value
    const float hi_nibble = codes[byte >> 4], lo_nibble = codes[byte & 15];
    const T a = Element<T>::from_float(hi_nibble), b = Element<T>::from_float(lo_nibble);
    const uint32_t word = bits_of(a) | (bits_of(b) << 16);  // the even element (high nibble) low
    if constexpr (SPLIT) {
      const T a_lo = Element<T>::from_float(hi_nibble - Element<T>::to_float(a));
      const T b_lo = Element<T>::from_float(lo_nibble - Element<T>::to_float(b));
      const uint32_t lo_word = bits_of(a_lo) | (bits_of(b_lo) << 16);
      table[i] = make_uint4(word, lo_word, word, lo_word);
    } else {
      table[i] = make_uint4(word, word, word, word);
    }
  }
  __syncthreads();

  const char* table_bytes = reinterpret_cast<const char*>(table);
  const uint32_t lane_offset = SPLIT ? uint32_t(WIDE ? lane : lane & 15) * 8 : uint32_t(lane) * 4;
  // Everything above read weights and constants only; x (and y's memory) may belong to the
  // kernel before this one, which a programmatic launch overlaps up to here.
  dependency_wait();

  for (; tile < n_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kRows;
    float acc[R][MT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][mt][i] = 0.0f;

    for (int64_t step = warp; step < n_steps; step += kWarps) {
      // The next item's loads first: the rest of this iteration hides their latency.
      int64_t next_tile = tile, next_step = step + kWarps;
      if (next_step >= n_steps) {
        next_tile += gridDim.x;
        next_step = warp;
      }
      Stage next;
      if (next_tile < n_tiles) load_stage(next, next_tile, next_step);

      const int64_t k0 = step * kStepK;
      // x (B fragments: row m = g + 8 mt, the lane's 16 k of a segment): one segment ahead.
      auto load_x = [&](int s, uint4 (&v)[MT][2]) {
        const int64_t k = k0 + kSegment * s;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = g + 8 * mt;
          const bool ok = m < M && k < K;
          const uint4* src = reinterpret_cast<const uint4*>(x + (int64_t(ok ? m : 0) * K + (ok ? k : 0)) + 16 * t);
          v[mt][0] = ok ? __ldg(src) : make_uint4(0, 0, 0, 0);
          v[mt][1] = ok ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
        }
      };
      uint4 xv[MT][2];
      load_x(0, xv);
      // Scale of this lane's segment (t % SEG) of rows g and g+8; segment s's comes from lane t = s.
      // An invalid segment has zero x and scale 0 (never a NaN from a clamped block's scale).
      const bool mine_valid = k0 + kSegment * (t % SEG) < K;
      float mine[R][2];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float offset = double_quant ? part_offset[GLU ? h : LEAN ? 0 : cur.part] : 0.0f;
          float v = cur.scale_raw[r][h];
          if (double_quant) v = __fadd_rn(__fmul_rn(nested_map[cur.scale_code[r][h]], v), offset);
          mine[r][h] = mine_valid ? v : 0.0f;
        }
#pragma unroll
      for (int s = 0; s < SEG; ++s) {
        uint4 xn[MT][2];
        if (s + 1 < SEG) load_x(s + 1, xn);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float tmp[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) tmp[mt][i] = 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t o[4];
            step_table_offsets<WIDE>(j, cur.codes[r][0][s], cur.codes[r][1][s], lane_offset, o);
            const uint32_t o0 = o[0], o1 = o[1], o2 = o[2], o3 = o[3];
            uint32_t b[MT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const uint4& v = xv[mt][j >> 1];
              b[mt][0] = (j & 1) ? v.z : v.x;
              b[mt][1] = (j & 1) ? v.w : v.y;
            }
            if constexpr (SPLIT) {
              const uint2 a0 = *reinterpret_cast<const uint2*>(table_bytes + o0);
              const uint2 a1 = *reinterpret_cast<const uint2*>(table_bytes + o1);
              const uint2 a2 = *reinterpret_cast<const uint2*>(table_bytes + o2);
              const uint2 a3 = *reinterpret_cast<const uint2*>(table_bytes + o3);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                mma_16816(T{}, tmp[mt], a0.x, a1.x, a2.x, a3.x, b[mt][0], b[mt][1]);
                mma_16816(T{}, tmp[mt], a0.y, a1.y, a2.y, a3.y, b[mt][0], b[mt][1]);
              }
            } else {
              const uint32_t a0 = *reinterpret_cast<const uint32_t*>(table_bytes + o0);
              const uint32_t a1 = *reinterpret_cast<const uint32_t*>(table_bytes + o1);
              const uint32_t a2 = *reinterpret_cast<const uint32_t*>(table_bytes + o2);
              const uint32_t a3 = *reinterpret_cast<const uint32_t*>(table_bytes + o3);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) mma_16816(T{}, tmp[mt], a0, a1, a2, a3, b[mt][0], b[mt][1]);
            }
          }
          const float scale_g = SEG == 1 ? mine[r][0] : __shfl_sync(0xffffffffu, mine[r][0], (lane & ~3) | s);
          const float scale_g8 = SEG == 1 ? mine[r][1] : __shfl_sync(0xffffffffu, mine[r][1], (lane & ~3) | s);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            acc[r][mt][0] = fmaf(scale_g, tmp[mt][0], acc[r][mt][0]);
            acc[r][mt][1] = fmaf(scale_g, tmp[mt][1], acc[r][mt][1]);
            acc[r][mt][2] = fmaf(scale_g8, tmp[mt][2], acc[r][mt][2]);
            acc[r][mt][3] = fmaf(scale_g8, tmp[mt][3], acc[r][mt][3]);
          }
        }
        if (s + 1 < SEG) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            xv[mt][0] = xn[mt][0];
            xv[mt][1] = xn[mt][1];
          }
        }
      }
      cur = next;
    }

    if constexpr (GLU) {
      reduce_and_store_glu<T, MT, R>(acc, partial, warp, g, t, tile * kTileOutputs, M, N, bias, y);
    } else {
      reduce_and_store<T, MT, R>(acc, partial, warp, g, t, row0, M, N, bias, y);
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
#endif  // QLORA_GEMV_MMA
}

// ---- fast path for M <= 4: per-warp rings, 16-byte code runs (variant "ring") ---------------
//
// "factored"'s arithmetic (T(nf4) table words, each 64-k segment's fp32 partial sum times its
// block's fp32 scale) with two changes, measured first as a CuPy experiment
// (benchmarks/gpu_checks/gemv_v16_experiment.py, gemv_ring_h100.json; H100, M = 1: 22-35% less time
// than factored_fill; this port 15-30% less, nf4_gemv_ring_h100.json, see docs/nf4_gemv.md for why not more):
//   - Each warp streams its own items (one item = 16 rows x 256 k: 2 KB of codes) through a ring of
//     STAGES shared-memory stages filled by cp.async, so STAGES - 1 items are in flight without
//     holding registers and without a CTA barrier per item (the former streamed kernel had both). "factored" keeps one
//     item in registers; session 21's replay of its access pattern read 44.8 us at one item in flight
//     and 41.5 at two (28672 x 8192), where "factored" took 72.
//   - 16-byte code runs: lane (g, t) reads bytes [16t, 16t + 16) of each 64-byte half of its rows'
//     128 bytes, so the 4 t-lanes of a row span two quantization blocks (t < 2: block 2h, t >= 2:
//     block 2h + 1 of half h). Their partial sums are kept apart in the MMA's N dimension: B column
//     2m holds x row m at block 2h's k and zero at block 2h + 1's, column 2m + 1 the reverse. One MMA
//     a k-step leaves both sums in lane t = m (c0 / c1 for row g, c2 / c3 for row g + 8), which scales
//     each by its block's scale. That spends 2 of the MMA's 8 columns a row of x, hence M <= 4.
//   A lookup is 3 instructions (byte permute, multiply-add into the lane's table copy, LDS from a
//   32-bit shared address); the table is built with one 16-byte store per thread and copy group.
// Stage layout: 16 rows x 128 code bytes, a row's two 64-byte halves swapped on odd rows (the
// compute reads rows g and g + 1 in one quarter-warp: different banks), then the scales: plain,
// 4 fp32 absmax a row (16 B); double quantization, 4 block codes a row (64 B) and a nested absmax a
// row (64 B). Every block of a row's step shares one nested block (nested blocksize >= 4, K % 256).
// Domain: fp16/bf16, M <= 4, blocksize 64, K % 256 == 0, aligned x, codes and scales (see
// ring_applies); elsewhere "factored_fill". Any N: rows past N read row N - 1 and are not stored.
constexpr int kRingMaxM = 4;
constexpr int kRingStepK = 256;                              // k of one item
constexpr int kRingCodeBytes = 16 * kRingStepK / 2;          // 16 rows x 128 bytes
constexpr int kRingScaleBytes = 16 * 16;                     // see the stage layout above
constexpr int kRingStageBytes = kRingCodeBytes + kRingScaleBytes;
// The ring kernels' table: 256 T2 words, a copy per lane (no bank conflict), 32 KB. (Session 25's PDL
// decode ran the ring with 16 copies, half the bytes, at 252-256 tok/s against 242 with 32, both behind
// factored_fill's 277: decode_8b_ring_configs_h100.json. That switch is gone; the copies are 32.)
constexpr int kRingTableBytes = 256 * 32 * 4;

template <int STAGES>
constexpr int ring_shared_bytes() {
  return kRingTableBytes + kWarps * STAGES * kRingStageBytes;
}

#if QLORA_GEMV_MMA
// The table word of byte `pos` of `word`, from the lane's copy (`lane_table`: its shared address;
// byte b's 32 copies lie at b * 128).
__device__ __forceinline__ uint32_t ring_lookup(uint32_t lane_table, uint32_t word, uint32_t pos) {
  const uint32_t byte = __byte_perm(word, 0u, 0x4440u | pos);  // byte pos alone, zeros above
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lane_table + byte * 128));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// A 16-byte load of x that keeps its place in program order. The compiler and ptxas move __ldg (an
// invariant load to them) freely: in session 26 they placed an x prefetch above dependency_wait (a read
// of x before the kernel that writes it has finished) and loads meant to overlap a ring wait below it.
// A coherent load in volatile asm stays after dependency_wait; ptxas still sinks it below a
// cp.async.wait_group that follows it in the same block, so ring32's prefetches sit at an item's end.
__device__ __forceinline__ uint4 load_x_ordered(const void* src) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src));
  return v;
}

// The ring kernels' tables, built by the CTA's 256 threads while their first items fly: the T2 table
// (32 copies of byte b's word at table + b * 128; thread b writes them in 16-byte stores,
// rotated so that a quarter-warp's stores spread over the bank groups), under double quantization the
// nested code map. Returns the nested offset (0 for plain scales). Ends with the CTA's barrier.
template <typename T, bool DQ>
__device__ __forceinline__ float build_ring_tables(unsigned char* table, float* codes, float* nested_map,
                                                   const NF4Scales& scales, int tid) {
  load_nf4_codes(codes);
  if constexpr (DQ) nested_map[tid] = __ldg(scales.nested_code + tid);  // 256 threads, 256 entries
  const float offset = DQ ? __ldg(scales.nested_offset) : 0.0f;
  __syncthreads();
  const T hi = Element<T>::from_float(codes[tid >> 4]), lo = Element<T>::from_float(codes[tid & 15]);
  const uint32_t word = bits_of(hi) | (bits_of(lo) << 16);  // the even element (high nibble) low
  uint4* const copies = reinterpret_cast<uint4*>(table + tid * 128);
#pragma unroll
  for (int q = 0; q < 8; ++q) copies[(q + tid) & 7] = make_uint4(word, word, word, word);
  __syncthreads();
  return offset;
}

// The ring kernels' end of a tile: output n (tile row `row`) for x row m is the sum of the CTA's 8 warps'
// partial sums in warp order, plus the bias, rounded once to T. Rows past N and x rows past M store nothing.
template <typename T, int kRows, int kCols>
__device__ __forceinline__ void store_warp_sums(const float (&partial)[kWarps][kRows][kCols], int row, int m,
                                                int64_t n, int M, int64_t N, const T* __restrict__ bias,
                                                T* __restrict__ y) {
  if (m >= M || n >= N) return;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w][row][m];
  if (bias != nullptr) sum += Element<T>::to_float(bias[n]);
  y[int64_t(m) * N + n] = Element<T>::from_float(sum);
}
#endif

// DQ: double quantization (8-bit block codes, nested absmax) or plain fp32 absmax, known at compile
// time so that neither the producer nor the consumer branches on it per item.
// An item's first half-step x loads sit right after the ring wait, above the producer's branches, as
// the CuPy ring issues them (session 24's variant "ring_early_x", made the only order in session 25).
// With them below the producer, Nsight Compute at 4096 x 14336 (ncu_ring_library_vs_cupy_h100.txt) found
// this kernel stalling on the long scoreboard twice as long as the CuPy ring2_c3 (2.25 against 1.2 cycles
// an issue); hoisted, M = 1 took 4-7% less time at the four shapes (nf4_gemv_ring_early_x_h100.json:
// 7.70 / 16.58 / 16.21 / 51.21 -> 7.34 / 15.90 / 15.13 / 49.42 us).
template <typename T, int STAGES, int CTAS, bool DQ>
__global__ void __launch_bounds__(kThreads, CTAS)
nf4_gemv_ring_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed, NF4Scales scales,
                     int nested_log2, int64_t N, int64_t K, const T* __restrict__ bias, T* __restrict__ y) {
#if QLORA_GEMV_MMA
  static_assert(STAGES >= 2, "one stage computes while the others fill");
  extern __shared__ __align__(16) unsigned char ring_shared[];
  __shared__ float partial[kWarps][16][kRingMaxM + 1];
  __shared__ float nested_map[256];
  __shared__ float codes[16];
  uint32_t* const table = reinterpret_cast<uint32_t*>(ring_shared);
  unsigned char* const ring =
      ring_shared + kRingTableBytes + (threadIdx.x >> 5) * STAGES * kRingStageBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n_steps = int(K / kRingStepK);  // K < 2^31 * 256
  const int64_t n_tiles = (N + 15) / 16, blocks_per_row = K / 64;
  const uint32_t ring_address = shared_address(ring);

  // The producer: the warp's items in order (tiles blockIdx.x + i * gridDim.x, steps warp + 8j), each
  // issued into the slot the consumer freed; a warp with no step (K < 2048) issues nothing but still
  // commits a group per call. Lane l copies rows l / 8 + 4i (i < 4) of the item at column (l % 8) * 16,
  // and its scale piece: row l % 16's 4 block codes (l < 16) or nested absmax (l >= 16) under double
  // quantization, row l's 4 absmax (l < 16) without. Within a tile its sources advance by constants
  // (1 KB of codes, 32 blocks a step); they are recomputed where the tile changes, and in the last
  // tile rows past N read row N - 1 (finite codes, never stored).
  const int copy_row = lane >> 3, copy_col = (lane & 7) * 16, scale_row = lane & 15;
  const uint32_t lane_stage_offset = copy_row * 128 + (copy_col ^ ((copy_row & 1) * 64));  // same parity for all i
  const uint32_t lane_scale_offset = kRingCodeBytes + (DQ ? (lane < 16 ? 4 * scale_row : 64 + 4 * scale_row) : 16 * scale_row);
  int64_t issue_tile = blockIdx.x;
  int issue_step = warp;
  bool full_tile = true;
  const uint8_t* code_src = nullptr;  // row copy_row's byte copy_col of the item (full tiles)
  int64_t block = 0;                  // scale_row's first block of the item
  auto enter_tile = [&]() {
    const int64_t first_row = issue_tile * 16;
    full_tile = first_row + 16 <= N;
    code_src = packed + (first_row + copy_row) * (K >> 1) + issue_step * 128 + copy_col;
    block = min(first_row + scale_row, N - 1) * blocks_per_row + issue_step * 4;
  };
  if (issue_tile < n_tiles && issue_step < n_steps) enter_tile();
  auto issue_next = [&](int slot) {
    if (issue_tile < n_tiles && issue_step < n_steps) {
      const uint32_t stage = ring_address + slot * kRingStageBytes;
      if (full_tile) {
#pragma unroll
        for (int i = 0; i < 4; ++i) cp_async16(stage + lane_stage_offset + 512 * i, code_src + i * 2 * K);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t n = min(issue_tile * 16 + copy_row + 4 * i, N - 1);
          cp_async16(stage + lane_stage_offset + 512 * i, packed + n * (K >> 1) + issue_step * 128 + copy_col);
        }
      }
      if constexpr (DQ) {
        if (lane < 16) {
          cp_async4(stage + lane_scale_offset, scales.absmax_codes + block);
        } else {
          cp_async4(stage + lane_scale_offset, scales.nested_absmax + (block >> nested_log2));
        }
      } else if (lane < 16) {  // plain: a row's 4 absmax in one 16-byte piece
        cp_async16(stage + lane_scale_offset, scales.absmax + block);
      }
      issue_step += kWarps;
      code_src += kWarps * kRingStepK / 2;
      block += kWarps * kRingStepK / 64;
      if (issue_step >= n_steps) {
        issue_step = warp;
        issue_tile += gridDim.x;
        if (issue_tile < n_tiles) enter_tile();
      }
    }
    cp_async_commit();  // empty groups too: the consumer's wait counts groups
  };

  allow_dependents();  // (programmatic dependent launch: dependent_launch.cuh)
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue_next(s);  // in flight while the tables are built

  const float offset = build_ring_tables<T, DQ>(ring_shared, codes, nested_map, scales, tid);
  // Everything above read weights and constants only; x (and y's memory) may belong to the
  // kernel before this one, which a programmatic launch overlaps up to here.
  dependency_wait();

  const uint32_t lane_table = shared_address(table) + uint32_t(lane) * 4;
  // B columns: lane (g, t) supplies column g at its own k; column 2m is x row m where t < 2 (block
  // 2h), column 2m + 1 x row m where t >= 2 (block 2h + 1), zero elsewhere.
  const int xm = g >> 1;
  const bool x_loads = xm < M && ((g & 1) == 0) == (t < 2);
  const T* const x_lane = x + int64_t(x_loads ? xm : 0) * K + 32 * t;
  const int swizzle = (g & 1) * 64;  // rows g and g + 8 have the same parity
  uint4 xv[4] = {};  // written only where x_loads: zero elsewhere for good
  int slot = 0;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    float acc[2] = {0.0f, 0.0f};  // rows g and g + 8, x row t
#pragma unroll 1
    for (int step = warp; step < n_steps; step += kWarps) {
      // The wait without cp_async_wait's "memory" clobber: the __syncwarp after it already orders the
      // stage's reads, and the clobber also pinned the x loads below it (the CuPy kernel without it
      // ran 47 us at 28672 x 8192, M = 1, this one with it 54).
      asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
      __syncwarp();  // every lane's copies of this item landed; every lane is done with the previous slot
      if (x_loads) {  // h = 0's x: its L2 latency hides under the producer below
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = __ldg(reinterpret_cast<const uint4*>(x_lane + int64_t(step) * kRingStepK + 8 * q));
      }
      issue_next(slot == 0 ? STAGES - 1 : slot - 1);
      const unsigned char* const stage = ring + slot * kRingStageBytes;
      const unsigned char* const scale_bytes = stage + kRingCodeBytes;
      float scale[2];  // lane t's block (4 step + t) of rows g and g + 8
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = g + 8 * r;
        if constexpr (DQ) {
          const uint32_t block_codes = reinterpret_cast<const uint32_t*>(scale_bytes)[row];  // the row's 4 blocks
          const float nested = reinterpret_cast<const float*>(scale_bytes + 64)[row];
          scale[r] = __fadd_rn(__fmul_rn(nested_map[(block_codes >> (8 * t)) & 0xffu], nested), offset);
        } else {
          scale[r] = reinterpret_cast<const float*>(scale_bytes)[4 * row + t];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 cg = *reinterpret_cast<const uint4*>(stage + g * 128 + ((16 * t + 64 * h) ^ swizzle));
        const uint4 cg8 = *reinterpret_cast<const uint4*>(stage + (g + 8) * 128 + ((16 * t + 64 * h) ^ swizzle));
        if (x_loads && h == 1) {  // (h = 0's above)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            xv[q] = __ldg(reinterpret_cast<const uint4*>(x_lane + int64_t(step) * kRingStepK + 128 * h + 8 * q));
          }
        }
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          // A: code bytes 2j (k slots 2t, 2t + 1) and 2j + 1 (slots 2t + 8, 2t + 9) of rows g (a0, a2)
          // and g + 8 (a1, a3); B: the lane's x words 2j and 2j + 1 (the same k)
          const uint32_t wg = word_of(cg, j >> 1), wg8 = word_of(cg8, j >> 1), p0 = 2 * (j & 1);
          const uint32_t a0 = ring_lookup(lane_table, wg, p0);
          const uint32_t a1 = ring_lookup(lane_table, wg8, p0);
          const uint32_t a2 = ring_lookup(lane_table, wg, p0 + 1);
          const uint32_t a3 = ring_lookup(lane_table, wg8, p0 + 1);
          mma_16816(T{}, c, a0, a1, a2, a3, word_of(xv[j >> 1], (2 * j) & 3), word_of(xv[j >> 1], (2 * j + 1) & 3));
        }
        // block 4 step + 2h's scale is lane t = 2h's, block 4 step + 2h + 1's lane 2h + 1's
        const int src = lane & ~3;
        const float lo_g = __shfl_sync(0xffffffffu, scale[0], src | (2 * h));
        const float hi_g = __shfl_sync(0xffffffffu, scale[0], src | (2 * h + 1));
        const float lo_g8 = __shfl_sync(0xffffffffu, scale[1], src | (2 * h));
        const float hi_g8 = __shfl_sync(0xffffffffu, scale[1], src | (2 * h + 1));
        acc[0] = fmaf(hi_g, c[1], fmaf(lo_g, c[0], acc[0]));
        acc[1] = fmaf(hi_g8, c[3], fmaf(lo_g8, c[2], acc[1]));
      }
      slot = slot == STAGES - 1 ? 0 : slot + 1;
    }
    // The 8 warps' sums meet (a warp without a step adds zeros); bias, one rounding to T.
    if (t < M) {
      partial[warp][g][t] = acc[0];
      partial[warp][g + 8][t] = acc[1];
    }
    __syncthreads();
    if (tid < 16 * kRingMaxM) {
      const int row = tid & 15, m = tid >> 4;
      store_warp_sums(partial, row, m, tile * 16 + row, M, N, bias, y);
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
  cp_async_wait_all();  // no copy may outlive the CTA (the trailing groups are empty, but be sure)
#endif  // QLORA_GEMV_MMA
}

// ---- M <= 16: per-warp rings on 32-row tiles (variant "ring32"; "auto" at 5 <= M <= 16) ----------------------
//
// The CuPy gemv_ring32 (benchmarks/gpu_checks/gemv_v16_experiment.py, docs/nf4_gemv_m16.md) with the library's
// domain (fp16, plain scales, bias, any N). H100 (nf4_gemv_ring32_h100.json, the four shapes): at M = 16
// 9.40 / 22.77 / 23.08 / 80.34 us against factored_fill's 12.71 / 30.25 / 32.77 / 103.79, at M = 8 8.93 /
// 20.64 / 22.48 / 71.33 against 9.39 / 27.24 / 23.04 / 82.73; at M <= 4 the ring is faster.
//   - The ring's per-warp cp.async rings, but an item is 32 rows x 128 k (2 quantization blocks a row,
//     2 KB of codes): x, re-read from L2 by every tile, costs half of what 16-row tiles cost.
//   - Inside each block lane t takes code bytes 8t .. 8t + 7 of its rows (16 k), so every k16 slice of an
//     MMA lies in one block: a plain B carries x rows g and g + 8 in two n8 MMAs (M <= 16), and each
//     block's 4 slices sum into a temporary C that its fp32 scale then adds to the accumulators.
//   - Stage: 32 rows x 64 bytes, the 16-byte pieces of rows with (row >> 1) odd swapped in pairs (p ^ 2), so
//     that a half-warp's 8-byte reads of rows g (4 rows) fall in 16 distinct bank pairs; then the scales:
//     double quantization, each row's aligned 4-byte word of block codes holding its 2 blocks (128 bytes)
//     and its nested absmax (128 bytes); plain, each row's 2 fp32 absmax (256 bytes).
//   - The CTA's 8 warps split a tile's k steps; their sums meet in shared memory. (The CuPy r32_t2 / r32_t4,
//     2 or 4 tiles a CTA round so that the warps of a step share x through L1, were 1-4% faster at the two
//     large-N shapes and 49-236% slower at the 4096-row ones: gemv_ring32_tiles_exp_h100.json.)
// Domain (ring32_applies): fp16/bf16, M <= 16, blocksize 64, K % 128 == 0, 16-byte aligned x and codes;
// double quantization with 4-byte aligned codes and nested absmax, nested blocksize >= 2 and N * K / 64 % 4
// == 0 (the last row's 4-byte word of block codes must lie inside the array), or plain absmax 8-byte
// aligned. Any N: rows past N read row N - 1 and are not stored.
constexpr int kR32Rows = 32;
constexpr int kR32StepK = 128;
constexpr int kR32CodeBytes = kR32Rows * kR32StepK / 2;  // 2 KB
constexpr int kR32ScaleBytes = kR32Rows * 8;
constexpr int kR32StageBytes = kR32CodeBytes + kR32ScaleBytes;
constexpr int kR32PartialBytes = kWarps * kR32Rows * kMaxM * 4;
constexpr int kRing32AutoMinM = kRingMaxM + 1;  // "auto": the ring up to kRingMaxM, ring32 above

template <int STAGES>
constexpr int ring32_shared_bytes() {
  return kRingTableBytes + kWarps * STAGES * kR32StageBytes + kR32PartialBytes;
}

template <typename T, int STAGES, bool DQ>
__global__ void __launch_bounds__(kThreads, 2)
nf4_gemv_ring32_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed, NF4Scales scales,
                       int nested_log2, int64_t N, int64_t K, const T* __restrict__ bias, T* __restrict__ y) {
#if QLORA_GEMV_MMA
  static_assert(STAGES >= 2, "one stage computes while the others fill");
  extern __shared__ __align__(16) unsigned char ring32_shared[];
  __shared__ float nested_map[256];
  __shared__ float codes[16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  unsigned char* const ring = ring32_shared + kRingTableBytes + warp * STAGES * kR32StageBytes;
  float(&partial)[kWarps][kR32Rows][kMaxM] = *reinterpret_cast<float(*)[kWarps][kR32Rows][kMaxM]>(
      ring32_shared + kRingTableBytes + kWarps * STAGES * kR32StageBytes);
  const int n_steps = int(K / kR32StepK);  // K < 2^31 * 128
  const int64_t n_tiles = (N + kR32Rows - 1) / kR32Rows, blocks_per_row = K / 64;
  const uint32_t ring_address = shared_address(ring);

  // The producer: the warp's items in order (tiles blockIdx.x + i gridDim.x, steps warp + 8j), each into the
  // slot the consumer freed; a warp with no step issues nothing but commits a group per call. Lane l copies
  // 16-byte pieces l + 32i (row (l + 32i) / 4) and row l's scales.
  int64_t issue_tile = blockIdx.x;
  int issue_step = warp;
  auto issue_next = [&](int slot) {
    if (issue_tile < n_tiles && issue_step < n_steps) {
      const uint32_t stage = ring_address + slot * kR32StageBytes;
      const int64_t first_row = issue_tile * kR32Rows;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int piece = lane + 32 * i, row = piece >> 2, p16 = piece & 3;
        const int64_t n = min(first_row + row, N - 1);
        cp_async16(stage + row * 64 + 16 * (p16 ^ (2 * ((row >> 1) & 1))),
                   packed + n * (K >> 1) + int64_t(issue_step) * 64 + 16 * p16);
      }
      const int64_t b0 = min(first_row + lane, N - 1) * blocks_per_row + 2 * issue_step;  // row lane's first block
      if constexpr (DQ) {
        cp_async4(stage + kR32CodeBytes + 4 * lane, scales.absmax_codes + (b0 & ~int64_t(3)));
        cp_async4(stage + kR32CodeBytes + 128 + 4 * lane, scales.nested_absmax + (b0 >> nested_log2));
      } else {
        cp_async8(stage + kR32CodeBytes + 8 * lane, scales.absmax + b0);
      }
      issue_step += kWarps;
      if (issue_step >= n_steps) {
        issue_step = warp;
        issue_tile += gridDim.x;
      }
    }
    cp_async_commit();  // empty groups too: the consumer's wait counts groups
  };

  allow_dependents();  // (programmatic dependent launch: dependent_launch.cuh)
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue_next(s);  // in flight while the tables are built

  const float offset = build_ring_tables<T, DQ>(ring32_shared, codes, nested_map, scales, tid);
  dependency_wait();  // x (and y's memory) may belong to the kernel before this one

  const uint32_t lane_table = shared_address(ring32_shared) + uint32_t(lane) * 4;
  // B: x rows g (n8 0) and g + 8 (n8 1) at k = 64 block + 16t .. + 15; rows >= M are zero
  const bool x0 = g < M, x1 = g + 8 < M;
  const T* const x_row0 = x + int64_t(x0 ? g : 0) * K + 16 * t;
  const T* const x_row1 = x + int64_t(x1 ? g + 8 : 0) * K + 16 * t;
  // x one item ahead: both blocks' B words of the warp's next item ([block][xa0, xa1, xb0, xb1]; rows >= M
  // stay zero). Loaded after the first item's wait they left the consumer stalled on their L2 latency;
  // one item ahead, at 5 <= M <= 16, it took 4-16% less time at the four shapes (session 26, H200,
  // nf4_gemv_ring32_xpf_h200.json; variant "ring32_xpf", the only form since). In 128 registers, no spills.
  uint4 xnext[2][4] = {};
  auto prefetch_x = [&](int step, int bb) {
    const int64_t k0 = int64_t(step) * kR32StepK + 64 * bb;
    if (x0) {
      xnext[bb][0] = load_x_ordered(x_row0 + k0);
      xnext[bb][1] = load_x_ordered(x_row0 + k0 + 8);
    }
    if (x1) {
      xnext[bb][2] = load_x_ordered(x_row1 + k0);
      xnext[bb][3] = load_x_ordered(x_row1 + k0 + 8);
    }
  };
  if (warp < n_steps) {  // the first item's, in flight beside its codes
    prefetch_x(warp, 0);
    prefetch_x(warp, 1);
  }
  int slot = 0;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    float acc[2][2][4] = {};  // [row group q (rows 16q + g, + 8)][n8][C fragment]
#pragma unroll 1
    for (int step = warp; step < n_steps; step += kWarps) {
      asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));  // (no "memory" clobber: see the ring)
      __syncwarp();  // every lane's copies of this item landed; every lane is done with the previous slot
      issue_next(slot == 0 ? STAGES - 1 : slot - 1);
      const unsigned char* const stage = ring + slot * kR32StageBytes;
      // The block scales of the lane's rows 16q + g + 8r, blocks 2 step + bb. Under double quantization a
      // row's staged word starts at its first block rounded down to 4, so that block's byte in it is
      // ((tile 32 + row) blocks_per_row + 2 step) & 3 = (2 step + (row & 1) (blocks_per_row & 2)) & 3
      // (blocks_per_row is even), the same for the lane's four rows (their parity is g's). Rows past N
      // read row N - 1's word with the wrong byte: finite, and never stored.
      const uint32_t first_byte = (uint32_t(2 * step) + uint32_t(g & 1) * (uint32_t(blocks_per_row) & 2u)) & 3u;
      float sc[2][2][2];  // [q][r][bb]
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * q + g + 8 * r;
          if constexpr (DQ) {
            const uint32_t word = reinterpret_cast<const uint32_t*>(stage + kR32CodeBytes)[row];
            const float nested = reinterpret_cast<const float*>(stage + kR32CodeBytes + 128)[row];
#pragma unroll
            for (int bb = 0; bb < 2; ++bb) {
              const uint32_t code = (word >> (8 * (first_byte + bb))) & 0xffu;
              sc[q][r][bb] = __fadd_rn(__fmul_rn(nested_map[code], nested), offset);
            }
          } else {
            const float2 pair = reinterpret_cast<const float2*>(stage + kR32CodeBytes)[row];
            sc[q][r][0] = pair.x;
            sc[q][r][1] = pair.y;
          }
        }
      }
#pragma unroll
      for (int bb = 0; bb < 2; ++bb) {
        const uint4 xa0 = xnext[bb][0], xa1 = xnext[bb][1], xb0 = xnext[bb][2], xb1 = xnext[bb][3];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int r0 = 16 * q + g, r1 = r0 + 8;  // (r >> 1) & 1 is g's for both
          const int chunk = (bb * 2 + (t >> 1)) ^ (2 * ((g >> 1) & 1));  // the 16-byte piece holding bytes 8t ..
          const uint2 c0 = *reinterpret_cast<const uint2*>(stage + r0 * 64 + 16 * chunk + 8 * (t & 1));
          const uint2 c1 = *reinterpret_cast<const uint2*>(stage + r1 * 64 + 16 * chunk + 8 * (t & 1));
          float c[2][4] = {};
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            // A: bytes 2s (k slots 2t, 2t + 1) and 2s + 1 (2t + 8, 2t + 9) of the lane's 8, rows r0 (a0, a2),
            // r1 (a1, a3); B: x words 2s and 2s + 1 of the lane's 8 (the same k)
            const uint32_t w0 = s < 2 ? c0.x : c0.y, w1 = s < 2 ? c1.x : c1.y, p = 2 * (s & 1);
            const uint32_t a0 = ring_lookup(lane_table, w0, p), a1 = ring_lookup(lane_table, w1, p);
            const uint32_t a2 = ring_lookup(lane_table, w0, p + 1), a3 = ring_lookup(lane_table, w1, p + 1);
            const uint4& xa = s < 2 ? xa0 : xa1;
            const uint4& xb = s < 2 ? xb0 : xb1;
            mma_16816(T{}, c[0], a0, a1, a2, a3, word_of(xa, (2 * s) & 3), word_of(xa, (2 * s + 1) & 3));
            mma_16816(T{}, c[1], a0, a1, a2, a3, word_of(xb, (2 * s) & 3), word_of(xb, (2 * s + 1) & 3));
          }
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            acc[q][n][0] = fmaf(sc[q][0][bb], c[n][0], acc[q][n][0]);
            acc[q][n][1] = fmaf(sc[q][0][bb], c[n][1], acc[q][n][1]);
            acc[q][n][2] = fmaf(sc[q][1][bb], c[n][2], acc[q][n][2]);
            acc[q][n][3] = fmaf(sc[q][1][bb], c[n][3], acc[q][n][3]);
          }
        }
        // this block's x of the warp's next item (the next tile's first step past this tile's last; a warp
        // with no item left loads one it never uses)
        prefetch_x(step + kWarps < n_steps ? step + kWarps : warp, bb);
      }
      slot = slot == STAGES - 1 ? 0 : slot + 1;
    }
    // The 8 warps' sums meet (a warp without a step adds zeros), in a fixed order; bias, one rounding to T.
#pragma unroll
    for (int q = 0; q < 2; ++q) {
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        // C: rows g (0, 1) and g + 8 (2, 3), columns (x rows) 8n + 2t, 8n + 2t + 1
        partial[warp][16 * q + g][8 * n + 2 * t] = acc[q][n][0];
        partial[warp][16 * q + g][8 * n + 2 * t + 1] = acc[q][n][1];
        partial[warp][16 * q + g + 8][8 * n + 2 * t] = acc[q][n][2];
        partial[warp][16 * q + g + 8][8 * n + 2 * t + 1] = acc[q][n][3];
      }
    }
    __syncthreads();
    for (int i = tid; i < kR32Rows * kMaxM; i += kThreads) {
      const int m = i % kMaxM, row = i / kMaxM;
      store_warp_sums(partial, row, m, tile * kR32Rows + row, M, N, bias, y);
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
  cp_async_wait_all();  // no copy may outlive the CTA (the trailing groups are empty, but be sure)
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

// Raises `kernel`'s dynamic shared-memory limit to `bytes` once per device (a bit per device in
// `configured`, one mask per kernel); `max_shared` also asks for the whole unified L1/shared array
// as shared memory, so that as many CTAs fit as the launch bounds promise (factored_lean_wide:
// 3 x 64 KB tables a SM; these kernels read their codes past L1, x stays in the rest).
template <typename Kernel>
cudaError_t allow_dynamic_shared(Kernel kernel, int bytes, std::atomic<uint64_t>& configured, bool max_shared = false) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status == cudaSuccess && max_shared) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (status == cudaSuccess) configured.fetch_or(bit, std::memory_order_relaxed);
  return status;
}

template <typename T, int MT, int R, int SEG, bool SPLIT, bool WIDE = false, int CTAS = 2, bool GLU = false,
          bool LEAN = false>
cudaError_t launch_factored(const T* x, int M, const FactoredParts& parts, int blocksize_log2, int nested_log2,
                            int64_t K, const T* bias, T* y, int sm_count, cudaStream_t stream) {
  if (LEAN && parts.count != 1) return cudaErrorInvalidValue;  // the launcher's contract
  auto kernel = nf4_gemv_factored_kernel<T, MT, R, SEG, SPLIT, WIDE, CTAS, GLU, LEAN>;
  constexpr int kDynamicBytes = WIDE ? 64 * 1024 : 0;
  if constexpr (WIDE) {
    static std::atomic<uint64_t> configured{0};
    const cudaError_t status = allow_dynamic_shared(kernel, kDynamicBytes, configured, CTAS > 2);
    if (status != cudaSuccess) return status;
  }
  const int64_t tiles = GLU ? ceil_div(parts.end_row[0], 8 * R) : ceil_div(parts.end_row[parts.count - 1], 16 * R);
  // Persistent: CTAS CTAs per SM (__launch_bounds__), each builds its tables once.
  const int64_t grid = std::min<int64_t>(tiles, int64_t(sm_count) * CTAS);
  return launch_kernel(kernel, dim3(unsigned(grid)), dim3(kThreads), kDynamicBytes, stream, x, M, parts, blocksize_log2,
                       nested_log2, K, bias, y);
}

// A persistent kernel's grid (the ring kernels'): as many CTAs a SM as fit on this device (CTAS on an
// H100; fewer where a SM has less shared memory, 100 KB on consumer Ampere / Ada) with kBytes of dynamic
// shared memory, asked once per device. 0: it does not fit at all (the caller falls back).
template <auto kKernel, int kBytes, int CTAS>
cudaError_t persistent_ctas_per_sm(int& ctas) {
  const auto kernel = kKernel;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // CTAs a SM + 1; 0: not asked yet
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device < kMaxDevices && cache[device].load(std::memory_order_relaxed) > 0) {
    ctas = cache[device].load(std::memory_order_relaxed) - 1;
    return cudaSuccess;
  }
  int optin = 0;
  status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  ctas = 0;
  if (optin >= kBytes) {
    status = allow_dynamic_shared(kernel, kBytes, configured, /*max_shared=*/CTAS > 2);  // 2 CTAs: L1 keeps the rest
    if (status == cudaSuccess) status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, kBytes);
    if (status != cudaSuccess) return status;
    ctas = std::min(ctas, CTAS);
  }
  if (device < kMaxDevices) cache[device].store(ctas + 1, std::memory_order_relaxed);
  return cudaSuccess;
}

// The ring kernel for these scales (double quantization or plain) at STAGES / CTAS, or `launched` false
// where it does not fit this device.
// `programmatic` false: a plain launch even where generation turned programmatic dependent launch on
// (variant "ring_plain"), so that the persistent grid starts whole once the kernel before has ended
// instead of CTA by CTA beside it.
template <typename T, int STAGES, int CTAS, bool DQ>
cudaError_t launch_ring_form(const T* x, int M, const uint8_t* packed, const NF4Scales& scales, int nested_log2,
                             int64_t N, int64_t K, const T* bias, T* y, int sm_count, cudaStream_t stream,
                             bool programmatic, bool& launched) {
  constexpr auto kernel = nf4_gemv_ring_kernel<T, STAGES, CTAS, DQ>;
  constexpr int kBytes = ring_shared_bytes<STAGES>();
  int ctas = 0;
  const cudaError_t status = persistent_ctas_per_sm<kernel, kBytes, CTAS>(ctas);
  launched = status == cudaSuccess && ctas > 0;
  if (!launched) return status;
  const int64_t grid = std::min<int64_t>(ceil_div(N, 16), int64_t(sm_count) * ctas);
  if (!programmatic) {
    kernel<<<dim3(unsigned(grid)), kThreads, kBytes, stream>>>(x, M, packed, scales, nested_log2, N, K, bias, y);
    return cudaGetLastError();
  }
  return launch_kernel(kernel, dim3(unsigned(grid)), dim3(kThreads), kBytes, stream, x, M, packed, scales, nested_log2,
                       N, K, bias, y);
}

template <typename T, int STAGES, int CTAS>
cudaError_t launch_ring(const T* x, int M, const uint8_t* packed, const NF4Scales& scales, int nested_log2, int64_t N,
                        int64_t K, const T* bias, T* y, int sm_count, cudaStream_t stream, bool programmatic,
                        bool& launched) {
  if (scales.absmax == nullptr) {
    return launch_ring_form<T, STAGES, CTAS, true>(x, M, packed, scales, nested_log2, N, K, bias, y, sm_count, stream,
                                                   programmatic, launched);
  }
  return launch_ring_form<T, STAGES, CTAS, false>(x, M, packed, scales, nested_log2, N, K, bias, y, sm_count, stream,
                                                  programmatic, launched);
}

// The ring32 kernel for one scale form at STAGES, or `launched` false where it does not fit this device.
template <typename T, int STAGES, bool DQ>
cudaError_t launch_ring32_form(const T* x, int M, const uint8_t* packed, const NF4Scales& scales, int nested_log2,
                               int64_t N, int64_t K, const T* bias, T* y, int sm_count, cudaStream_t stream,
                               bool& launched) {
  constexpr auto kernel = nf4_gemv_ring32_kernel<T, STAGES, DQ>;
  constexpr int kBytes = ring32_shared_bytes<STAGES>();
  int ctas = 0;
  const cudaError_t status = persistent_ctas_per_sm<kernel, kBytes, 2>(ctas);
  launched = status == cudaSuccess && ctas > 0;
  if (!launched) return status;
  const int64_t grid = std::min<int64_t>(ceil_div(N, int64_t(kR32Rows)), int64_t(sm_count) * ctas);
  return launch_kernel(kernel, dim3(unsigned(grid)), dim3(kThreads), kBytes, stream, x, M, packed, scales, nested_log2,
                       N, K, bias, y);
}

template <typename T, int STAGES>
cudaError_t launch_ring32(const T* x, int M, const uint8_t* packed, const NF4Scales& scales, int nested_log2,
                          int64_t N, int64_t K, const T* bias, T* y, int sm_count, cudaStream_t stream, bool& launched) {
  if (scales.absmax == nullptr) {
    return launch_ring32_form<T, STAGES, true>(x, M, packed, scales, nested_log2, N, K, bias, y, sm_count, stream,
                                               launched);
  }
  return launch_ring32_form<T, STAGES, false>(x, M, packed, scales, nested_log2, N, K, bias, y, sm_count, stream,
                                              launched);
}

// Whether the ring32 kernel covers this case (see its comment); the device checks are the caller's.
inline bool ring32_applies(int M, int64_t N, int64_t K, int64_t blocksize, const void* x, const uint8_t* packed,
                           const NF4Scales& scales) {
  if (M > kMaxM || blocksize != 64 || K % kR32StepK != 0 || !is_aligned(x, 16) || !is_aligned(packed, 16)) {
    return false;
  }
  if (scales.absmax != nullptr) return is_aligned(scales.absmax, 8);
  return scales.nested_blocksize >= 2 && (N * (K / 64)) % 4 == 0 && is_aligned(scales.absmax_codes, 4) &&
         is_aligned(scales.nested_absmax, 4);
}

// Whether the ring kernel covers this case (see its comment); the device checks are the caller's.
inline bool ring_applies(int M, int64_t K, int64_t blocksize, const void* x, const uint8_t* packed,
                         const NF4Scales& scales) {
  if (M > kRingMaxM || blocksize != 64 || K % kRingStepK != 0 || !is_aligned(x, 16) || !is_aligned(packed, 16)) {
    return false;
  }
  if (scales.absmax != nullptr) return is_aligned(scales.absmax, 16);
  return scales.nested_blocksize >= 4 && is_aligned(scales.absmax_codes, 4) && is_aligned(scales.nested_absmax, 4);
}

// Fast-path kernel choice, switchable at run time so that one process can A/B them (see
// kernels_cuda.h). The variant number is the index into kVariantNames. (Session 25 removed "stream" and
// "stream2", a cp.async shared-memory ring with a CTA barrier a stage: 0-35% slower than "factored" at
// M = 1, nf4_gemv_stream_h100.json; the kernel is in history at 4bb9552.)
enum GemvVariant : int {
  kVariantMma,
  kVariantFactored,
  kVariantFactoredSplit,
  kVariantFactoredR2,
  kVariantFactoredR1,
  kVariantFactoredWide,
  kVariantFactoredO3,
  kVariantFactoredO4,
  kVariantFactoredFill,
  kVariantFactoredLean,
  kVariantFactoredLeanWide,
  kVariantRing,
  kVariantRingPlain,
  kVariantAuto,
  kVariantRing32,
  kVariantCount
};
constexpr const char* kVariantNames[] = {"mma",         "factored",      "factored_split", "factored_r2",
                                         "factored_r1", "factored_wide", "factored_o3",    "factored_o4",
                                         "factored_fill", "factored_lean", "factored_lean_wide", "ring",
                                         "ring_plain",  "auto",          "ring32"};
static_assert(sizeof(kVariantNames) / sizeof(kVariantNames[0]) == kVariantCount, "a name for every variant");
// "factored_fill": "factored" (faster than "mma" at every measured shape, nf4_gemv_variants_h100.json)
// with one round of 3-CTA tiles where "factored" takes two rounds: 8B's grouped q/k/v 13.9 -> 12.0 us,
// decode +2% (H200, 2026-12-06, nf4_gemv_swiglu_h200.json and decode_8b_glu_h200.json).
// "ring" (session 22): M <= 4 in its domain takes the ring kernel, everything else (M > 4, other
// shapes, the grouped and SwiGLU launches) factored_fill's kernels. Alone it is 15-27% faster than
// factored_fill at M = 1 (nf4_gemv_ring_s23_h100.json). "ring_plain": the same, never launched
// programmatically. "auto" (session 23; the default since session 24): where programmatic dependent
// launch is off, the ring at M <= 4 and ring32 at 5 <= M <= 16 (session 25), factored_fill's kernels
// elsewhere and wherever it is on (qlora_ext.generate's decode). The 8B decode on the H100
// (decode_8b_ring_pdl_h100.json, one run): without PDL ring 258.8 against factored_fill 248.4 tok/s; with
// PDL factored_fill 273.7, ring 238.8, ring_plain 241.4. The ring's footprint is not the whole cause: in
// session 25 (decode_8b_ring_configs_h100.json; auto 277.3 with PDL, 264.5 without, factored_fill 277.4 /
// 252.2 in decode_8b_auto_rings_h100.json) the ring at <2, 2>, <2, 1> or with 16 table copies decoded at
// 242-256 tok/s under PDL; only with its dependents launched at its end did it reach 274, still below
// factored_fill's 277. So the decode keeps factored_fill.
std::atomic<int> g_variant{kVariantAuto};  // the default since session 24

}  // namespace

int nf4_gemv_cuda_variant_count() { return kVariantCount; }

const char* nf4_gemv_cuda_variant_name(int variant) {
  return variant >= 0 && variant < kVariantCount ? kVariantNames[variant] : nullptr;
}

bool nf4_gemv_cuda_set_variant(int variant) {
  if (variant < 0 || variant >= kVariantCount) return false;
  g_variant.store(variant, std::memory_order_relaxed);
  return true;
}

int nf4_gemv_cuda_variant() { return g_variant.load(std::memory_order_relaxed); }

namespace {

// A variant's factored kernel for these parts; "mma" gets "factored", the ring variants
// factored_fill's kernels. Tile shapes (MT, R, SEG): MT groups of 8 x rows, R 16-row tiles
// per CTA, SEG 64-k segments per step (a warp has one step of codes in flight while it computes
// the previous one). Every shape's tile is 16 or 32 rows (see kGroupedPartRows).
template <typename T>
cudaError_t launch_factored_variant(int variant, const T* x, int m, const FactoredParts& parts, int blocksize_log2,
                                    int nested_log2, int64_t K, const T* bias, T* y, int sm_count,
                                    cudaStream_t stream) {
#define QLORA_FACTORED_CTAS(MT, R, SEG, SPLIT, WIDE, CTAS)                                                  \
  return launch_factored<T, MT, R, SEG, SPLIT, WIDE, CTAS>(x, m, parts, blocksize_log2, nested_log2, K, bias, y, \
                                                           sm_count, stream)
#define QLORA_FACTORED(MT, R, SEG, SPLIT, WIDE) QLORA_FACTORED_CTAS(MT, R, SEG, SPLIT, WIDE, 2)
#define QLORA_FACTORED_LEAN(MT, R, SEG, WIDE, CTAS)                                                         \
  return launch_factored<T, MT, R, SEG, false, WIDE, CTAS, false, true>(x, m, parts, blocksize_log2, nested_log2, K, \
                                                                       bias, y, sm_count, stream)
  switch (variant) {
    // factored_lean / factored_lean_wide (session 21): one weight (a grouped launch takes
    // factored_fill's shapes). For M <= 8 "factored"'s tiles and its full step (256 k, SEG 4) at 3 CTAs
    // a SM: LEAN drops the per-step part search and pointer selects, which brings the kernel from 128
    // registers to 80 without spills, so 50% more warps have the same bytes in flight each (the
    // earlier factored_o3 had to halve the step to fit). _wide: with the 64 KB table (one PRMT a lookup).
    // H100 2026-12-07: M = 1 unchanged (more warps did not help, as with o3); _wide 22-61% slower
    // (three 64 KB tables leave ~28 KB of L1 for x and the scales). Kept for the A/B.
    case kVariantFactoredLeanWide:
      if (parts.count == 1) {
        if (m <= 8) QLORA_FACTORED_LEAN(1, 1, 4, true, 3);
        QLORA_FACTORED_LEAN(2, 2, 2, false, 2);
      }
      [[fallthrough]];
    case kVariantFactoredLean:
      if (parts.count == 1) {
        if (m <= 8) QLORA_FACTORED_LEAN(1, 1, 4, false, 3);
        QLORA_FACTORED_LEAN(2, 2, 2, false, 2);
      }
      [[fallthrough]];
    case kVariantRing:  // ring, ring_plain, auto, ring32: what the ring kernels do not take
    case kVariantRingPlain:
    case kVariantAuto:
    case kVariantRing32:
      [[fallthrough]];
    case kVariantFactoredFill:  // factored_fill: "factored", except that an M <= 8 launch whose 16-row tiles need a second
              // round at 2 CTAs a SM but fit one at 3 (Llama-3-8B's grouped q/k/v: 384 tiles, 264 CTAs,
              // 120 of them working twice) takes factored_o3's shape, one round of slower CTAs
      if (m <= 8) {
        const int64_t tiles = ceil_div(parts.end_row[parts.count - 1], int64_t(16));
        if (tiles > 2 * int64_t(sm_count) && tiles <= 3 * int64_t(sm_count)) QLORA_FACTORED_CTAS(1, 1, 2, false, false, 3);
        QLORA_FACTORED(1, 1, 4, false, false);
      }
      QLORA_FACTORED(2, 2, 2, false, false);
    // H100 2026-12-06, M = 1: o3 7-25% and o4 41-63% slower than "factored" (nf4_gemv_occupancy_h100.json):
    // more warps with fewer bytes in flight each lose. Kept for the A/B.
    case kVariantFactoredO3:  // factored_o3: M <= 8: 128 k per step in 80 registers, 3 CTAs a SM (more warps in flight)
      if (m <= 8) QLORA_FACTORED_CTAS(1, 1, 2, false, false, 3);
      QLORA_FACTORED(2, 2, 2, false, false);
    case kVariantFactoredO4:  // factored_o4: M <= 8: 64 k per step in 64 registers, 4 CTAs a SM
      if (m <= 8) QLORA_FACTORED_CTAS(1, 1, 1, false, false, 4);
      QLORA_FACTORED(2, 2, 2, false, false);
    case kVariantFactoredSplit:  // factored_split: "factored"'s shapes, hi/lo weights
      if (m <= 8) QLORA_FACTORED(1, 1, 4, true, false);
      QLORA_FACTORED(2, 2, 2, true, false);
    case kVariantFactoredR2:  // factored_r2: 32-row tiles, 128 k per step; M > 8: 64 k per step (registers)
      if (m <= 8) QLORA_FACTORED(1, 2, 2, false, false);
      QLORA_FACTORED(2, 2, 1, false, false);
    case kVariantFactoredR1:  // factored_r1: 16-row tiles, 128 k per step (twice the CTAs of r2 on small N)
      if (m <= 8) QLORA_FACTORED(1, 1, 2, false, false);
      QLORA_FACTORED(2, 1, 2, false, false);
    case kVariantFactoredWide:  // factored_wide: "factored"'s shapes with the 64 KB table (one PRMT per lookup). H100
             // 2026-12-06: 8% fewer instructions issued, the same time (-4..+2%): latency-bound
      if (m <= 8) QLORA_FACTORED(1, 1, 4, false, true);
      QLORA_FACTORED(2, 2, 2, false, true);
    default:  // factored: M <= 8: 16-row tiles, 256 k per step; M > 8: 32-row tiles (x reuse)
      if (m <= 8) QLORA_FACTORED(1, 1, 4, false, false);
      QLORA_FACTORED(2, 2, 2, false, false);
  }
#undef QLORA_FACTORED
#undef QLORA_FACTORED_CTAS
#undef QLORA_FACTORED_LEAN
}

// Whether the factored kernels serve this case on this device: sm_80+ with this file's sm_80+ code
// (a build for "75" alone would JIT a compiled-out body on an sm_86 GPU: see device_facts.cuh),
// fp16/bf16, K % 64 == 0, blocksize >= 64, 16-byte aligned x and codes.
bool factored_applies(const DeviceFacts& facts, FloatType type, int64_t K, int64_t blocksize, const void* x) {
  return type != FloatType::F32 && facts.major >= 8 && facts.mma_built && is_aligned(x, 16) && K % 64 == 0 &&
         blocksize >= 64;
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
  const bool tensor_cores = type != FloatType::F32 && facts.major >= 8 && facts.mma_built &&
                            is_aligned(x, 16) && is_aligned(packed, 16);
  const bool fast = tensor_cores && K % 32 == 0;
  const bool factored = tensor_cores && factored_applies(facts, type, K, blocksize, x);
  const int variant = factored ? nf4_gemv_cuda_variant() : kVariantMma;
  const int m = int(M);
  return dispatch_float_type(type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if constexpr (!std::is_same_v<T, float>) {
      // Without programmatic dependent launch "auto" takes the ring at M <= 4 and ring32 at 5 <= M <= 16;
      // with it (qlora_ext.generate's decode), factored_fill's kernels (see kVariantNames)
      const bool auto_rings = variant == kVariantAuto && !programmatic_launch_enabled();
      if ((variant == kVariantRing32 || (auto_rings && m >= kRing32AutoMinM)) &&
          ring32_applies(m, N, K, blocksize, x, packed, scales)) {
        // 2 stages at 2 CTAs a SM. 4 stages where the tiles fit one round at one CTA a SM anyway (N <= 32 SMs)
        // were 0-5% slower at the 4096-row shapes (session 25, nf4_gemv_ring32_stages_h100.json): bytes in
        // flight are not what holds those back, more likely 8 warps a SM too few to hide the consumer's latencies
        bool launched = false;
        const cudaError_t ring32_status =
            launch_ring32<T, 2>(xt, m, packed, scales, nested_log2, N, K, bt, yt, facts.sm_count, stream, launched);
        if (launched || ring32_status != cudaSuccess) return ring32_status;  // else: does not fit this device
      }
      const bool ring_variant = variant == kVariantRing || variant == kVariantRingPlain || auto_rings;
      if (ring_variant && ring_applies(m, K, blocksize, x, packed, scales)) {
        // 3 stages at 2 CTAs a SM for the large weights, 2 stages at 3 CTAs below: H100, M = 1
        // (gemv_ring_h100.json): 28672 x 8192 47.2 against 49.3 us, the three smaller shapes 6-10% the
        // other way (more CTAs fill the SMs where a CTA has few tiles)
        bool launched = false;
        const bool programmatic = variant != kVariantRingPlain;
        const bool large = N * K >= (int64_t(1) << 27);
        const cudaError_t ring_status =
            large ? launch_ring<T, 3, 2>(xt, m, packed, scales, nested_log2, N, K, bt, yt, facts.sm_count, stream,
                                         programmatic, launched)
                  : launch_ring<T, 2, 3>(xt, m, packed, scales, nested_log2, N, K, bt, yt, facts.sm_count, stream,
                                         programmatic, launched);
        if (launched || ring_status != cudaSuccess) return ring_status;  // else: does not fit this device
      }
      if (variant != kVariantMma) {
        FactoredParts parts;
        parts.add(packed, scales, N);
        return launch_factored_variant<T>(variant, xt, m, parts, blocksize_log2, nested_log2, K, bt, yt,
                                          facts.sm_count, stream);
      }
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

bool nf4_gemv_grouped_cuda_supported(FloatType type, int64_t M, int64_t K, const void* x,
                                     const NF4GemvPart* parts, int count, int64_t blocksize) {
  if (M < 1 || M > kMaxM || count < 1 || count > kMaxGemvParts) return false;
  DeviceFacts facts;
  if (device_facts(facts) != cudaSuccess || !factored_applies(facts, type, K, blocksize, x)) return false;
  const bool double_quant = parts[0].scales.absmax == nullptr;
  for (int p = 0; p < count; ++p) {
    const NF4Scales& s = parts[p].scales;
    if (parts[p].rows <= 0 || !is_aligned(parts[p].packed, 16)) return false;
    if (p + 1 < count && parts[p].rows % kGroupedPartRows != 0) return false;
    if ((s.absmax == nullptr) != double_quant) return false;
    if (double_quant && s.nested_blocksize != parts[0].scales.nested_blocksize) return false;
  }
  return true;
}

cudaError_t nf4_gemv_grouped_cuda(const void* x, FloatType type, int64_t M, int64_t K, const NF4GemvPart* parts,
                                  int count, int64_t blocksize, const void* bias, void* y, cudaStream_t stream) {
  if (!nf4_gemv_grouped_cuda_supported(type, M, K, x, parts, count, blocksize)) return cudaErrorInvalidValue;
  DeviceFacts facts;
  const cudaError_t status = device_facts(facts);
  if (status != cudaSuccess) return status;
  FactoredParts stacked;
  for (int p = 0; p < count; ++p) stacked.add(parts[p].packed, parts[p].scales, parts[p].rows);
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const int nested_log2 = log2_of_power_of_two(parts[0].scales.nested_blocksize);
  const int variant = nf4_gemv_cuda_variant();
  return dispatch_float_type(type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // unreachable: supported() refuses fp32
    } else {
      return launch_factored_variant<T>(variant, static_cast<const T*>(x), int(M), stacked, blocksize_log2,
                                        nested_log2, K, static_cast<const T*>(bias), static_cast<T*>(y),
                                        facts.sm_count, stream);
    }
  });
}

bool nf4_gemv_swiglu_cuda_supported(FloatType type, int64_t M, int64_t K, const void* x, const NF4GemvPart& gate,
                                    const NF4GemvPart& up, int64_t blocksize) {
  // (the grouped launch's conditions but the part-size one: GLU tiles read both parts row by row)
  const NF4GemvPart both[2] = {{gate.packed, gate.scales, kGroupedPartRows}, up};
  return gate.rows == up.rows && gate.rows > 0 && nf4_gemv_grouped_cuda_supported(type, M, K, x, both, 2, blocksize);
}

cudaError_t nf4_gemv_swiglu_cuda(const void* x, FloatType type, int64_t M, int64_t K, const NF4GemvPart& gate,
                                 const NF4GemvPart& up, int64_t blocksize, const void* bias, void* y,
                                 cudaStream_t stream) {
  if (!nf4_gemv_swiglu_cuda_supported(type, M, K, x, gate, up, blocksize)) return cudaErrorInvalidValue;
  DeviceFacts facts;
  const cudaError_t status = device_facts(facts);
  if (status != cudaSuccess) return status;
  FactoredParts parts;
  parts.add(gate.packed, gate.scales, gate.rows);
  parts.add(up.packed, up.scales, up.rows);
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const int nested_log2 = log2_of_power_of_two(gate.scales.nested_blocksize);
  return dispatch_float_type(type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // unreachable: supported() refuses fp32
    } else {
      const T* xt = static_cast<const T*>(x);
      const T* bt = static_cast<const T*>(bias);
      T* yt = static_cast<T*>(y);
      // "factored"'s tile shapes whatever the variant switch says (the A/B variants stay grouped-only)
      if (M <= 8) {
        return launch_factored<T, 1, 1, 4, false, false, 2, true>(xt, int(M), parts, blocksize_log2, nested_log2, K,
                                                                  bt, yt, facts.sm_count, stream);
      }
      return launch_factored<T, 2, 2, 2, false, false, 2, true>(xt, int(M), parts, blocksize_log2, nested_log2, K,
                                                                bt, yt, facts.sm_count, stream);
    }
  });
}

}  // namespace qlora
