// Check and benchmark of the Hopper NF4 GEMM qlora::sm90::nf4_gemm_sm90 (cpp/kernels/cuda/nf4_gemm_sm90.cuh)
// against bf16 cuBLAS on the same dequantized weight. Standalone (no torch): nf4_gemm_sm90_check.sh builds and runs it.
//
// Correctness, the project's rule: the reference is cuBLAS with fp32 output on W dequantized exactly as
// nf4_dequantize writes it; "PyTorch" is the same GEMM with bf16 output. PASS iff every output is finite and
//   max|ours - ref| <= 2 * max|pytorch - ref| + 2^-7 * max|ref|.
// Timing: median of 7 runs, each the mean of 10 back-to-back launches, ours and cuBLAS interleaved run by run, with
// the weight hot in L2 and with weight copies rotating past it (the bars' method: bench_nf4_gemm.py).
// Probes (after a failed check, or alone with --probe): small exact problems (X = identity, W = a selector, W = its
// scales) whose wrong outputs name where the kernel's data mapping goes wrong; see "Probes" below.
// stdout: one JSON object per line per check, probe and timing, then a table. Exit 0: all ran cases passed; 1: a
// check failed or the kernel reported an error (probes do not change it), or with --probe alone, a probe found
// wrong elements; 2: a CUDA/cuBLAS error in the harness itself.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "nf4_gemm_sm90.cuh"
#include "qlora/nf4.h"

// Harness failures (not the kernel's) exit 2 with the call, its place and the library's message.
[[noreturn]] static void die(const char* file, int line, const char* expr, const char* message, const char* name) {
  std::fprintf(stderr, "%s:%d: %s: %s (%s)\n", file, line, expr, message, name);
  std::exit(2);
}
#define CUDA_CHECK(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess)                                                               \
      die(__FILE__, __LINE__, #expr, cudaGetErrorString(err_), cudaGetErrorName(err_));   \
  } while (0)
#define CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                     \
    const cublasStatus_t st_ = (expr);                                                     \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                      \
      die(__FILE__, __LINE__, #expr, cublasGetStatusString(st_), cublasGetStatusName(st_)); \
  } while (0)

namespace {

using qlora::sm90::NF4GemmArgs;
using bf16 = __nv_bfloat16;

constexpr float kBf16Eps = 0.0078125f;  // 2^-7: the slack of the rule, relative to max|ref|
constexpr int kNestedLog2 = 8;          // 256 blocks of 64 per nested scale, bitsandbytes' default

// Owns one cudaMalloc'd array, so an early return cannot leak the large buffers of the big cases.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count) {
    CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(count, 1) * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(count_, other.count_);
    return *this;
  }
  ~DeviceBuffer() { if (ptr_ != nullptr) cudaFree(ptr_); }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// ---- Inputs: a counter-based hash, so each value depends only on (seed, stream, index) and not on the launch shape.
enum RandomStream : uint32_t { kPacked = 1, kAbsmaxCodes, kNestedCode, kNestedAbsmax, kAbsmax, kX, kBias };

__device__ __forceinline__ uint64_t mix64(uint64_t seed, uint32_t stream, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + (uint64_t(stream) << 40) + index;  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform(uint64_t seed, uint32_t stream, uint64_t index, float lo, float hi) {
  const float unit = float(mix64(seed, stream, index) >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in [0, 1)
  return lo + (hi - lo) * unit;
}

#define GRID_STRIDE_LOOP(i, n) \
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < (n); i += size_t(gridDim.x) * blockDim.x)

__global__ void fill_bytes(uint8_t* out, size_t n, uint64_t seed, uint32_t stream) {
  GRID_STRIDE_LOOP(i, n) out[i] = uint8_t(mix64(seed, stream, i) >> 56);
}
__global__ void fill_f32(float* out, size_t n, float lo, float hi, uint64_t seed, uint32_t stream) {
  GRID_STRIDE_LOOP(i, n) out[i] = uniform(seed, stream, i, lo, hi);
}
__global__ void fill_bf16(bf16* out, size_t n, float lo, float hi, uint64_t seed, uint32_t stream) {
  GRID_STRIDE_LOOP(i, n) out[i] = __float2bfloat16_rn(uniform(seed, stream, i, lo, hi));
}

// The weight exactly as nf4_dequantize stores it: bf16(nf4[code] * scale), one fp32 product, one rounding; with
// double quantization the scale is two separate fp32 roundings (no FMA), as bitsandbytes computes it.
__global__ void dequantize_reference(const NF4GemmArgs args, bf16* w) {
  const size_t K = size_t(args.K);
  GRID_STRIDE_LOOP(i, size_t(args.N) * K) {
    const size_t n = i / K, k = i % K;
    const uint8_t byte = args.packed[n * (K / 2) + k / 2];
    const int code = (k % 2 == 0) ? (byte >> 4) : (byte & 0xF);  // even k in the high nibble
    const size_t block = n * (K / 64) + k / 64;
    const float scale = args.absmax != nullptr
                            ? args.absmax[block]
                            : __fadd_rn(__fmul_rn(args.nested_code[args.absmax_codes[block]],
                                                  args.nested_absmax[block >> args.nested_log2]),
                                        args.nested_offset[0]);
    w[i] = __float2bfloat16_rn(__fmul_rn(qlora::nf4_code(code), scale));
  }
}

// C of the bias cases before the GEMM (beta = 1): the bias broadcast over the rows, so that cuBLAS adds it to the
// fp32 sum and rounds once, as F.linear's epilogue and the kernel under test do.
__global__ void broadcast_bias(float* ref, bf16* pytorch, const bf16* bias, int M, int N) {
  GRID_STRIDE_LOOP(i, size_t(M) * N) {
    ref[i] = __bfloat162float(bias[i % N]);
    pytorch[i] = bias[i % N];
  }
}

struct ErrorStats {
  unsigned ours_err_bits, pytorch_err_bits, ref_abs_bits;  // nonnegative floats: their bits order like the values
  unsigned long long ours_nonfinite, differing, guard_overwritten;
};

__device__ __forceinline__ unsigned warp_max(unsigned v) { return __reduce_max_sync(0xffffffffu, v); }
__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block size must be a multiple of 32 (whole warps reach the shuffles).
__global__ void compare(const bf16* ours, const bf16* pytorch, const float* ref, size_t n, const uint16_t* guard,
                        size_t guard_n, ErrorStats* stats) {
  float ours_err = 0.0f, pytorch_err = 0.0f, ref_abs = 0.0f;
  unsigned long long nonfinite = 0, differing = 0, overwritten = 0;
  GRID_STRIDE_LOOP(i, n) {
    const float o = __bfloat162float(ours[i]), p = __bfloat162float(pytorch[i]), r = ref[i];
    if (!isfinite(o)) ++nonfinite;
    else ours_err = fmaxf(ours_err, fabsf(o - r));
    pytorch_err = fmaxf(pytorch_err, fabsf(p - r));
    ref_abs = fmaxf(ref_abs, fabsf(r));
    differing += (o != p);  // a NaN counts as differing
  }
  GRID_STRIDE_LOOP(i, guard_n) overwritten += (guard[i] != 0xFFFFu);
  ours_err = __uint_as_float(warp_max(__float_as_uint(ours_err)));
  pytorch_err = __uint_as_float(warp_max(__float_as_uint(pytorch_err)));
  ref_abs = __uint_as_float(warp_max(__float_as_uint(ref_abs)));
  nonfinite = warp_sum(nonfinite);
  differing = warp_sum(differing);
  overwritten = warp_sum(overwritten);
  if (threadIdx.x % 32 == 0) {
    atomicMax(&stats->ours_err_bits, __float_as_uint(ours_err));
    atomicMax(&stats->pytorch_err_bits, __float_as_uint(pytorch_err));
    atomicMax(&stats->ref_abs_bits, __float_as_uint(ref_abs));
    atomicAdd(&stats->ours_nonfinite, nonfinite);
    atomicAdd(&stats->differing, differing);
    atomicAdd(&stats->guard_overwritten, overwritten);
  }
}

unsigned grid_for(size_t n) { return unsigned(std::min<size_t>((n + 255) / 256, 1u << 16)); }

// ---- One problem's inputs and the dequantized weight.
struct Problem {
  DeviceBuffer<bf16> x, bias, w;  // w: the reference's dequantized weight [N, K]
  DeviceBuffer<uint8_t> packed, absmax_codes;
  DeviceBuffer<float> absmax, nested_code, nested_absmax, nested_offset;
  NF4GemmArgs args;
};

void make_problem(Problem& p, int M, int N, int K, bool double_quant, bool with_bias, uint64_t seed,
                  cudaStream_t stream) {
  const size_t blocks = size_t(N) * K / 64, nested = (blocks + (size_t(1) << kNestedLog2) - 1) >> kNestedLog2;
  p.x = DeviceBuffer<bf16>(size_t(M) * K);
  p.packed = DeviceBuffer<uint8_t>(size_t(N) * K / 2);
  p.w = DeviceBuffer<bf16>(size_t(N) * K);
  fill_bf16<<<grid_for(p.x.size()), 256, 0, stream>>>(p.x.get(), p.x.size(), -1.0f, 1.0f, seed, kX);
  fill_bytes<<<grid_for(p.packed.size()), 256, 0, stream>>>(p.packed.get(), p.packed.size(), seed, kPacked);
  NF4GemmArgs& a = p.args;
  a = NF4GemmArgs{};
  a.x = p.x.get(), a.packed = p.packed.get(), a.M = M, a.N = N, a.K = K, a.nested_log2 = kNestedLog2;
  if (double_quant) {
    p.absmax_codes = DeviceBuffer<uint8_t>(blocks);
    p.nested_code = DeviceBuffer<float>(256);
    p.nested_absmax = DeviceBuffer<float>(nested);
    p.nested_offset = DeviceBuffer<float>(1);
    fill_bytes<<<grid_for(blocks), 256, 0, stream>>>(p.absmax_codes.get(), blocks, seed, kAbsmaxCodes);
    fill_f32<<<1, 256, 0, stream>>>(p.nested_code.get(), 256, 0.05f, 1.0f, seed, kNestedCode);
    fill_f32<<<grid_for(nested), 256, 0, stream>>>(p.nested_absmax.get(), nested, 0.01f, 0.1f, seed, kNestedAbsmax);
    const float offset = 0.003f;
    CUDA_CHECK(cudaMemcpyAsync(p.nested_offset.get(), &offset, sizeof offset, cudaMemcpyHostToDevice, stream));
    a.absmax_codes = p.absmax_codes.get(), a.nested_code = p.nested_code.get();
    a.nested_absmax = p.nested_absmax.get(), a.nested_offset = p.nested_offset.get();
  } else {
    p.absmax = DeviceBuffer<float>(blocks);
    fill_f32<<<grid_for(blocks), 256, 0, stream>>>(p.absmax.get(), blocks, 0.001f, 0.1f, seed, kAbsmax);
    a.absmax = p.absmax.get();
  }
  if (with_bias) {
    p.bias = DeviceBuffer<bf16>(N);
    fill_bf16<<<grid_for(N), 256, 0, stream>>>(p.bias.get(), N, -1.0f, 1.0f, seed, kBias);
    a.bias = p.bias.get();
  }
  dequantize_reference<<<grid_for(p.w.size()), 256, 0, stream>>>(a, p.w.get());
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaStreamSynchronize(stream));  // the memcpy above reads a stack variable
}

// Row-major Y[M, N] = X[M, K] W[N, K]^T in column-major terms: C (N x M, ldc N) = op(A) op(B) with A = W seen as
// K x N (lda K) transposed and B = X seen as K x M (ldb K) as is. The same "TN" call PyTorch makes for x @ W.T.
// beta = 1 adds the C already in y (the bias cases).
// (p.args.x is the X read: p.x, or another problem's shared by weight copies.)
void cublas_gemm(cublasHandle_t handle, const Problem& p, void* y, cudaDataType_t y_type, float beta = 0.0f) {
  const float alpha = 1.0f;
  const NF4GemmArgs& a = p.args;
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, a.N, a.M, a.K, &alpha, p.w.get(), CUDA_R_16BF, a.K,
                            a.x, CUDA_R_16BF, a.K, &beta, y, y_type, a.N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The kernel under test; an error here is the kernel's failure (exit 1), not the harness's.
void run_ours(const NF4GemmArgs& args, cudaStream_t stream, bool sync) {
  cudaError_t err = qlora::sm90::nf4_gemm_sm90(args, stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err == cudaSuccess && sync) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) {
    std::printf("{\"kind\":\"error\",\"M\":%d,\"N\":%d,\"K\":%d,\"error\":\"%s: %s\"}\n", args.M, args.N, args.K,
                cudaGetErrorName(err), cudaGetErrorString(err));
    std::fprintf(stderr, "nf4_gemm_sm90 failed at M=%d N=%d K=%d: %s\n", args.M, args.N, args.K,
                 cudaGetErrorString(err));
    std::exit(1);
  }
}

std::string json_escape(const char* s) {
  std::string out;
  for (; *s != '\0'; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    if (static_cast<unsigned char>(*s) >= 0x20) out += *s;
  }
  return out;
}

float host_bf16(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

struct Context {
  cudaStream_t stream;
  cublasHandle_t handle;
  std::string device;  // JSON-escaped name
  std::vector<std::string> table;  // the summary, printed after the JSON lines
};

struct Case { int M, N, K; bool dq, bias; };

// The worst outputs name the operand at fault more directly than a max does (one bad row n, or column m).
void print_worst(const bf16* ours, const float* ref, int M, int N) {
  const size_t count = size_t(M) * N;
  std::vector<uint16_t> h_ours(count);
  std::vector<float> h_ref(count);
  CUDA_CHECK(cudaMemcpy(h_ours.data(), ours, count * sizeof(bf16), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(h_ref.data(), ref, count * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<std::pair<float, size_t>> worst;  // (|error|, index), largest first, at most 8
  const auto larger = [](const std::pair<float, size_t>& a, const std::pair<float, size_t>& b) {
    return a.first > b.first;
  };
  for (size_t i = 0; i < count; ++i) {
    const float o = host_bf16(h_ours[i]);
    const float e = std::isfinite(o) ? std::fabs(o - h_ref[i]) : INFINITY;
    if (worst.size() == 8 && e <= worst.back().first) continue;
    if (worst.size() == 8) worst.pop_back();
    const std::pair<float, size_t> entry{e, i};
    worst.insert(std::upper_bound(worst.begin(), worst.end(), entry, larger), entry);
  }
  for (const auto& [e, i] : worst)
    std::printf("#   worst: m=%zu n=%zu ours=%.6g ref=%.6g |err|=%.4g\n", i / N, i % N, host_bf16(h_ours[i]),
                h_ref[i], e);
}

// One correctness case. Returns false when it ran and failed; a skipped case is not a failure.
bool check_case(Context& ctx, const Case& cs, uint64_t seed, int& ran, int& skipped) {
  char head[160], row[160];
  std::snprintf(head, sizeof head, "\"M\":%d,\"N\":%d,\"K\":%d,\"mode\":\"%s\",\"bias\":%s", cs.M, cs.N, cs.K,
                cs.dq ? "dq" : "plain", cs.bias ? "true" : "false");
  std::snprintf(row, sizeof row, "check %5d x %5d x %5d  %-5s %-7s", cs.M, cs.N, cs.K, cs.dq ? "dq" : "plain",
                cs.bias ? "bias" : "no-bias");
  Problem p;
  make_problem(p, cs.M, cs.N, cs.K, cs.dq, cs.bias, seed, ctx.stream);
  const size_t count = size_t(cs.M) * cs.N, guard = size_t(256) * cs.N;  // guard: 256 rows past row M - 1
  DeviceBuffer<bf16> ours(count + guard), pytorch(count);
  DeviceBuffer<float> ref(count);
  p.args.y = ours.get();
  if (!qlora::sm90::nf4_gemm_sm90_covers(p.args)) {
    std::printf("{\"kind\":\"check\",%s,\"skipped\":\"not covered\",\"device\":\"%s\"}\n", head, ctx.device.c_str());
    ctx.table.push_back(std::string(row) + "  SKIP (not covered)");
    ++skipped;
    return true;
  }
  if (cs.bias) {
    broadcast_bias<<<grid_for(count), 256, 0, ctx.stream>>>(ref.get(), pytorch.get(), p.bias.get(), cs.M, cs.N);
    CUDA_CHECK(cudaGetLastError());
  }
  cublas_gemm(ctx.handle, p, ref.get(), CUDA_R_32F, cs.bias ? 1.0f : 0.0f);
  cublas_gemm(ctx.handle, p, pytorch.get(), CUDA_R_16BF, cs.bias ? 1.0f : 0.0f);
  // 0xFFFF is a bf16 NaN: an output the kernel never writes fails the finiteness test, a store past the last row
  // shows in the guard.
  CUDA_CHECK(cudaMemsetAsync(ours.get(), 0xFF, ours.size() * sizeof(bf16), ctx.stream));
  std::fprintf(stderr, "# running %s\n", row);
  run_ours(p.args, ctx.stream, /*sync=*/true);

  DeviceBuffer<ErrorStats> stats(1);
  CUDA_CHECK(cudaMemsetAsync(stats.get(), 0, sizeof(ErrorStats), ctx.stream));
  compare<<<grid_for(count), 256, 0, ctx.stream>>>(ours.get(), pytorch.get(), ref.get(), count,
                                                   reinterpret_cast<const uint16_t*>(ours.get() + count), guard,
                                                   stats.get());
  CUDA_CHECK(cudaGetLastError());
  ErrorStats s{};
  CUDA_CHECK(cudaMemcpyAsync(&s, stats.get(), sizeof s, cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  float err_ours, err_pytorch, ref_abs;
  std::memcpy(&err_ours, &s.ours_err_bits, 4);
  std::memcpy(&err_pytorch, &s.pytorch_err_bits, 4);
  std::memcpy(&ref_abs, &s.ref_abs_bits, 4);
  const float limit = 2.0f * err_pytorch + kBf16Eps * ref_abs;
  const bool correct = s.ours_nonfinite == 0 && s.guard_overwritten == 0 && err_ours <= limit;
  std::printf("{\"kind\":\"check\",%s,\"max_err\":%.9g,\"pytorch_max_err\":%.9g,\"limit\":%.9g,\"max_abs_ref\":%.9g,"
              "\"nonfinite\":%llu,\"guard_overwritten\":%llu,\"differing_elements\":%llu,\"correct\":%s,"
              "\"device\":\"%s\"}\n",
              head, err_ours, err_pytorch, limit, ref_abs, s.ours_nonfinite, s.guard_overwritten, s.differing,
              correct ? "true" : "false", ctx.device.c_str());
  char result[200];
  std::snprintf(result, sizeof result, "  err %.4g  pytorch %.4g  limit %.4g  differing %llu%s%s  %s", err_ours,
                err_pytorch, limit, s.differing, s.ours_nonfinite ? "  NON-FINITE" : "",
                s.guard_overwritten ? "  WROTE PAST Y" : "", correct ? "PASS" : "FAIL");
  ctx.table.push_back(std::string(row) + result);
  ++ran;
  if (!correct) print_worst(ours.get(), ref.get(), cs.M, cs.N);
  return correct;
}

// ---- Probes: WHERE the kernel's data mapping goes wrong, not only that it does. Each probe's inputs make every
// output one nonzero product (or 64 equal ones), so the fp32 sum is exact in any order and each output must equal
// the host's bit for bit (+0 and -0 aside); a wrong output's value is then looked up in the matrix it should have
// come from, and where it does occur, relative to where it should, names the mapping error. Diagnostics: they run
// after a failed check (the exit status still follows the checks), or alone with --probe.

void to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));  // src is the caller's pageable memory
}

std::vector<uint16_t> to_host_bits(const bf16* src, size_t count, cudaStream_t stream) {
  std::vector<uint16_t> out(count);
  CUDA_CHECK(cudaMemcpyAsync(out.data(), src, count * sizeof(bf16), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

uint16_t bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
// Value equality: a NaN (0xFFFF, the unwritten marker, included) never matches; +0 matches -0, whose sign a
// sum of zero products may set either way.
bool same_value(uint16_t a, uint16_t b) { return host_bf16(a) == host_bf16(b); }

// bf16(X W^T) on the host. Exact for the probes' inputs (every partial sum is representable), so the fp32 order
// does not matter; it checks each probe's premise (below) as much as it gives the expected outputs.
std::vector<uint16_t> host_gemm(const std::vector<uint16_t>& x, const std::vector<uint16_t>& w, int M, int N, int K) {
  std::vector<uint16_t> y(size_t(M) * N);
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc += host_bf16(x[size_t(m) * K + k]) * host_bf16(w[size_t(n) * K + k]);
      y[size_t(m) * N + n] = bf16_bits(acc);
    }
  }
  return y;
}

__attribute__((format(printf, 2, 3))) void appendf(std::string& out, const char* format, ...) {
  char buffer[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof buffer, format, args);
  va_end(args);
  out += buffer;
}

// The matrix a wrong output's value is looked up in (W, X or the block scales), indexed by value.
struct Source {
  std::string name, row, col, scope;      // e.g. "W", "n", "k", "W's n-tile"
  int rows = 0, cols = 0, tile_rows = 0;  // lookups keep the expected row's tile of tile_rows rows (0: all rows)
  std::vector<uint16_t> bits;             // [rows, cols] row-major
  std::vector<std::pair<uint16_t, uint32_t>> by_bits;  // (bits, flat index), sorted
};

Source make_source(const char* name, const char* row, const char* col, const char* scope, std::vector<uint16_t> bits,
                   int rows, int cols, int tile_rows) {
  Source s{name, row, col, scope, rows, cols, tile_rows, std::move(bits), {}};
  for (size_t i = 0; i < s.bits.size(); ++i) s.by_bits.emplace_back(s.bits[i], uint32_t(i));
  std::sort(s.by_bits.begin(), s.by_bits.end());
  return s;
}

// The positions (row, col) holding exactly `bits` in (row, col)'s tile, nearest first: the same row, then by distance.
std::vector<std::pair<int, int>> find_in(const Source& s, uint16_t bits, int row, int col) {
  const auto by_value = [](const std::pair<uint16_t, uint32_t>& a, const std::pair<uint16_t, uint32_t>& b) {
    return a.first < b.first;
  };
  const auto range = std::equal_range(s.by_bits.begin(), s.by_bits.end(), std::make_pair(bits, 0u), by_value);
  std::vector<std::pair<int, int>> found;
  for (auto it = range.first; it != range.second; ++it) {
    const int r = int(it->second / s.cols), c = int(it->second % s.cols);
    if (s.tile_rows == 0 || r / s.tile_rows == row / s.tile_rows) found.emplace_back(r, c);
  }
  const auto distance = [&](const std::pair<int, int>& p) {
    return std::make_tuple(p.first != row, std::abs(p.first - row), std::abs(p.second - col));
  };
  std::sort(found.begin(), found.end(), [&](const auto& a, const auto& b) { return distance(a) < distance(b); });
  return found;
}

// A class of outputs to count wrong elements by, e.g. "n%16": 16 bins.
struct Histogram {
  const char* name;
  int bins;
  std::function<int(int m, int n)> bin;
};

struct ProbeRun {
  std::string name, title;              // "weight"; what it shows, for people
  int M = 0, N = 0, K = 0, kb = -1;     // kb: the scale probe's k-block
  bool dq = false;
  std::vector<uint16_t> y, expected;    // [M, N]: the kernel's (empty: not covered) and the host's
  const Source* source = nullptr;
  std::function<std::pair<int, int>(int m, int n)> expected_at;  // where Y[m][n]'s right value sits in the source
  std::vector<Histogram> histograms;
  bool examples_by_n = false;           // identical rows: spread the examples over n rather than m
};

// Y of the kernel on p (pre-filled with 0xFFFF, a NaN it never writes), or empty where the kernel does not cover p.
std::vector<uint16_t> probe_output(Context& ctx, Problem& p, const std::string& name) {
  DeviceBuffer<bf16> y(size_t(p.args.M) * p.args.N);
  p.args.y = y.get();
  if (!qlora::sm90::nf4_gemm_sm90_covers(p.args)) return {};
  CUDA_CHECK(cudaMemsetAsync(y.get(), 0xFF, y.size() * sizeof(bf16), ctx.stream));
  std::fprintf(stderr, "# running probe %s\n", name.c_str());
  run_ours(p.args, ctx.stream, /*sync=*/true);
  return to_host_bits(y.get(), y.size(), ctx.stream);
}

// Compares, classifies and prints one probe run (a JSON line, "#" lines, a table row). Returns its wrong count, or
// -1 where the probe's own premise failed (a harness bug: its outputs would mislead, so none are judged).
long long report_probe(Context& ctx, const ProbeRun& r) {
  constexpr size_t kExamples = 16, kShown = 4, kMaxVoters = 64, kTopShifts = 6;
  const Source& s = *r.source;
  std::string head, row_label;
  appendf(head, "\"kind\":\"probe\",\"probe\":\"%s\",\"M\":%d,\"N\":%d,\"K\":%d,\"mode\":\"%s\"", r.name.c_str(), r.M,
          r.N, r.K, r.dq ? "dq" : "plain");
  appendf(row_label, "probe %-10s %5d x %5d x %5d  %-5s", r.name.c_str(), r.M, r.N, r.K, r.dq ? "dq" : "plain");
  if (r.kb >= 0) {
    appendf(head, ",\"kb\":%d", r.kb);
    appendf(row_label, " kb=%d", r.kb);
  }
  if (r.y.empty()) {
    std::printf("{%s,\"skipped\":\"not covered\",\"device\":\"%s\"}\n", head.c_str(), ctx.device.c_str());
    ctx.table.push_back(row_label + "  SKIP (not covered)");
    return 0;
  }
  std::vector<size_t> wrong;
  std::vector<std::vector<long long>> hist;
  for (const Histogram& h : r.histograms) hist.emplace_back(h.bins, 0);
  long long unwritten = 0, nonfinite = 0, zero = 0, nowhere = 0;
  std::map<std::pair<int, int>, long long> shifts;  // (found - expected) position in the source -> votes
  for (int m = 0; m < r.M; ++m) {
    for (int n = 0; n < r.N; ++n) {
      const size_t i = size_t(m) * r.N + n;
      const auto [row, col] = r.expected_at(m, n);
      const uint16_t closed_form = s.bits[size_t(row) * s.cols + col];
      if (!same_value(r.expected[i], closed_form)) {  // the probe's own premise: the host GEMM is that one value
        std::printf("{%s,\"error\":\"premise: host Y[%d][%d] = 0x%04x, not %s[%d][%d] = 0x%04x\",\"device\":\"%s\"}\n",
                    head.c_str(), m, n, r.expected[i], s.name.c_str(), row, col, closed_form, ctx.device.c_str());
        ctx.table.push_back(row_label + "  PROBE BUG (premise failed; see its JSON line)");
        return -1;
      }
      const uint16_t got = r.y[i];
      if (same_value(got, r.expected[i])) continue;
      wrong.push_back(i);
      for (size_t h = 0; h < hist.size(); ++h) ++hist[h][r.histograms[h].bin(m, n)];
      const float v = host_bf16(got);
      if (got == 0xFFFFu) {
        ++unwritten;
      } else if (!std::isfinite(v)) {
        ++nonfinite;
      } else if (v == 0.0f) {
        ++zero;  // not looked up: zeros are everywhere in W, and an input a wrong mapping read as zero fill
      } else {
        const auto found = find_in(s, got, row, col);
        if (found.empty()) ++nowhere;
        // Every candidate votes for its displacement: a layout bug moves whole classes of elements by the same
        // offsets, which then outvote the coincidences (a W block has only 16 distinct values in 64 places).
        if (found.size() <= kMaxVoters)
          for (const auto& [fr, fc] : found) ++shifts[{fr - row, fc - col}];
      }
    }
  }
  std::vector<std::pair<long long, std::pair<int, int>>> top;
  for (const auto& [shift, votes] : shifts) top.push_back({votes, shift});
  std::sort(top.begin(), top.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  if (top.size() > kTopShifts) top.resize(kTopShifts);

  // Examples spread evenly over the wrong elements (over n first when the rows are all alike).
  std::vector<size_t> order = wrong;
  if (r.examples_by_n) {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return a % r.N < b % r.N; });
  }
  std::vector<size_t> examples;
  for (size_t e = 0; e < std::min(kExamples, order.size()); ++e)
    examples.push_back(order[e * order.size() / kExamples]);

  std::string json, human;
  appendf(json, "{%s,\"elements\":%zu,\"wrong\":%zu,\"unwritten\":%lld,\"nonfinite\":%lld,\"zero\":%lld,"
          "\"not_found\":%lld,\"hist\":{",
          head.c_str(), r.y.size(), wrong.size(), unwritten, nonfinite, zero, nowhere);
  for (size_t h = 0; h < hist.size(); ++h) {
    appendf(json, "%s\"%s\":[", h ? "," : "", r.histograms[h].name);
    for (size_t b = 0; b < hist[h].size(); ++b) appendf(json, "%s%lld", b ? "," : "", hist[h][b]);
    json += "]";
  }
  json += "},\"shifts\":[";
  for (size_t t = 0; t < top.size(); ++t) {
    appendf(json, "%s{\"d%s\":%d,\"d%s\":%d,\"votes\":%lld}", t ? "," : "", s.row.c_str(), top[t].second.first,
            s.col.c_str(), top[t].second.second, top[t].first);
  }
  json += "],\"examples\":[";
  for (size_t e = 0; e < examples.size(); ++e) {
    const int m = int(examples[e] / r.N), n = int(examples[e] % r.N);
    const std::pair<int, int> right = r.expected_at(m, n);
    const int row = right.first, col = right.second;  // (not a structured binding: the lambda below captures them)
    const uint16_t got = r.y[examples[e]], want = r.expected[examples[e]];
    const float v = host_bf16(got);
    auto found = std::isfinite(v) && v != 0.0f ? find_in(s, got, row, col) : std::vector<std::pair<int, int>>{};
    // The places whose displacement most wrong elements share first: the mapping's, not the coincidences.
    const auto votes = [&](const std::pair<int, int>& at) {
      const auto it = shifts.find({at.first - row, at.second - col});
      return it == shifts.end() ? 0ll : it->second;
    };
    std::stable_sort(found.begin(), found.end(), [&](const auto& a, const auto& b) { return votes(a) > votes(b); });
    appendf(json, "%s{\"m\":%d,\"n\":%d,\"got\":\"0x%04x\",\"want\":\"0x%04x\",\"matches\":%zu,\"at\":[", e ? "," : "",
            m, n, got, want, found.size());
    appendf(human, "#   Y[%d][%d] = %.6g (0x%04x), want %.6g (0x%04x) = %s[%d][%d]; ", m, n, v, got,
            host_bf16(want), want, s.name.c_str(), row, col);
    if (got == 0xFFFFu) human += "never written";
    else if (!std::isfinite(v)) human += "non-finite";
    else if (v == 0.0f) human += "zero, not looked up";
    else if (found.empty()) appendf(human, "found nowhere in %s", s.scope.c_str());
    else human += "found at";
    for (size_t c = 0; c < std::min(kShown, found.size()); ++c) {
      appendf(json, "%s[%d,%d]", c ? "," : "", found[c].first, found[c].second);
      appendf(human, " %s[%d][%d]", s.name.c_str(), found[c].first, found[c].second);
    }
    if (!found.empty()) appendf(human, " (%zu in %s)", found.size(), s.scope.c_str());
    json += "]}";
    human += "\n";
  }
  appendf(json, "],\"device\":\"%s\"}", ctx.device.c_str());
  std::printf("%s\n# probe %s: %s\n# probe %s: %zu of %zu wrong\n", json.c_str(), r.name.c_str(), r.title.c_str(),
              r.name.c_str(), wrong.size(), r.y.size());
  if (!wrong.empty()) {
    std::printf("#   wrong values: %lld never written (0xffff), %lld other non-finite, %lld zero, "
                "%lld found nowhere in %s\n", unwritten, nonfinite, zero, nowhere, s.scope.c_str());
    for (size_t h = 0; h < hist.size(); ++h) {
      std::printf("#   wrong by %-18s:", r.histograms[h].name);
      for (long long count : hist[h]) std::printf(" %lld", count);
      std::printf("\n");
    }
    std::printf("#   where the wrong values sit in %s, relative to the right %s[%s][%s], by votes (d%s, d%s):",
                s.name.c_str(), s.name.c_str(), s.row.c_str(), s.col.c_str(), s.row.c_str(), s.col.c_str());
    for (const auto& [votes, shift] : top) std::printf("  (%+d, %+d) %lld votes", shift.first, shift.second, votes);
    std::printf("%s\n%s", top.empty() ? "  none" : "", human.c_str());
  }
  std::string result;
  appendf(result, "  wrong %zu of %zu", wrong.size(), r.y.size());
  if (!wrong.empty()) appendf(result, " (%lld unwritten, %lld zero)", unwritten, zero);
  if (!top.empty()) {
    appendf(result, "  top shift (d%s,d%s) = (%+d,%+d)", s.row.c_str(), s.col.c_str(), top[0].second.first,
            top[0].second.second);
  }
  ctx.table.push_back(row_label + result + (wrong.empty() ? "  OK" : "  WRONG"));
  return (long long)wrong.size();
}

using qlora::sm90::detail::kTileM;
using qlora::sm90::detail::kTileN;

// The probes' host-built inputs (bf16 as bits).
constexpr uint16_t kOne = 0x3F80;  // 1.0

std::vector<uint16_t> identity_x(int M, int K) {
  std::vector<uint16_t> x(size_t(M) * K, 0);
  for (int m = 0; m < std::min(M, K); ++m) x[size_t(m) * K + m] = kOne;
  return x;
}

// Every value distinct and naming its place: sign = m % 2, exponent 52 + m / 2 (normal numbers from 2^-75 up, exact
// through the products and the fp32 sum), mantissa = k. Needs K <= 128 and M <= 404.
std::vector<uint16_t> activation_x(int M, int K) {
  std::vector<uint16_t> x(size_t(M) * K);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) x[size_t(m) * K + k] = uint16_t((m & 1) << 15 | (52 + (m >> 1)) << 7 | k);
  return x;
}

// Codes 7 (0.0) everywhere but 15 (1.0) at k = n % K: with scales 1, W[n][k] = (k == n % K).
std::vector<uint8_t> selector_codes(int N, int K) {
  std::vector<uint8_t> packed(size_t(N) * K / 2);
  for (int n = 0; n < N; ++n)
    for (int b = 0; b < K / 2; ++b)  // k = 2b in the high nibble, 2b + 1 in the low one
      packed[size_t(n) * (K / 2) + b] = uint8_t((2 * b == n % K ? 0xF0 : 0x70) | (2 * b + 1 == n % K ? 0xF : 0x7));
  return packed;
}

// X = 1 on k-block kb (k in [64 kb, 64 kb + 64)), 0 elsewhere, in every row.
std::vector<uint16_t> block_x(int M, int K, int kb) {
  std::vector<uint16_t> x(size_t(M) * K, 0);
  for (int m = 0; m < M; ++m) std::fill_n(x.begin() + size_t(m) * K + 64 * kb, 64, kOne);
  return x;
}

// 64 * W[n][64 b] for each block (n, b): with all codes 15, W[n][k] = bf16(scale(n, k / 64)), and a bf16 times 64
// is exact, so this is the block's whole sum.
std::vector<uint16_t> block_sums(const std::vector<uint16_t>& w, int N, int K) {
  std::vector<uint16_t> sums(size_t(N) * (K / 64));
  for (int n = 0; n < N; ++n)
    for (int b = 0; b < K / 64; ++b)
      sums[size_t(n) * (K / 64) + b] = bf16_bits(64.0f * host_bf16(w[size_t(n) * K + 64 * b]));
  return sums;
}

// The probes' classes of outputs (the kernel's: 16-row fragments, 64-row warpgroups, 128-row n-tiles, 256-row m-tiles).
Histogram by_n(const char* name, int divisor, int modulus) {
  return {name, modulus / divisor, [=](int, int n) { return n % modulus / divisor; }};
}
Histogram by_m(const char* name, int divisor, int modulus) {
  return {name, modulus / divisor, [=](int m, int) { return m % modulus / divisor; }};
}

// 1. The weight's mapping: X = identity (M = K), so Y[m][n] must be W[n][m], with random codes and double-quantized
// scales. K = 192: three k-stages, i.e. both register sets and the odd tail; N = 256: two n-tiles.
long long probe_weight(Context& ctx) {
  constexpr int M = 192, N = 256, K = M;
  Problem p;
  make_problem(p, M, N, K, /*double_quant=*/true, /*with_bias=*/false, 0x9B0BE000ull, ctx.stream);
  const std::vector<uint16_t> x = identity_x(M, K);
  to_device(p.x.get(), x.data(), x.size() * 2, ctx.stream);
  const std::vector<uint16_t> w = to_host_bits(p.w.get(), p.w.size(), ctx.stream);
  const Source source = make_source("W", "n", "k", "W's n-tile", w, N, K, kTileN);
  ProbeRun r;
  r.name = "weight", r.title = "X = identity, so Y[m][n] must be W[n][m] (m is k here)";
  r.M = M, r.N = N, r.K = K, r.dq = true, r.source = &source;
  r.expected = host_gemm(x, w, M, N, K);
  r.expected_at = [](int m, int n) { return std::make_pair(n, m); };
  r.histograms = {by_m("k%16", 1, 16),      by_m("k%64/16 (slice)", 16, 64), by_m("k/64 (stage)", 64, K),
                  by_n("n%16", 1, 16),      by_n("n%64/16 (warp)", 16, 64),  by_n("n%128/64 (wgroup)", 64, kTileN),
                  by_n("n/128 (n-tile)", kTileN, N)};
  r.y = probe_output(ctx, p, r.name);
  return report_probe(ctx, r);
}

// 2. The activation's mapping: W selects k = n % K (plain scales, all 1), so Y[m][n] must be X[m][n % K], with X's
// values unique (activation_x). M = 300: a second, partial m-tile.
long long probe_activation(Context& ctx) {
  constexpr int M = 300, N = 256, K = 128;
  Problem p;
  make_problem(p, M, N, K, /*double_quant=*/false, /*with_bias=*/false, 0xAC71000ull, ctx.stream);
  const std::vector<uint16_t> x = activation_x(M, K);
  const std::vector<uint8_t> packed = selector_codes(N, K);
  const std::vector<float> ones(p.absmax.size(), 1.0f);
  to_device(p.x.get(), x.data(), x.size() * 2, ctx.stream);
  to_device(p.packed.get(), packed.data(), packed.size(), ctx.stream);
  to_device(p.absmax.get(), ones.data(), ones.size() * sizeof(float), ctx.stream);
  dequantize_reference<<<grid_for(p.w.size()), 256, 0, ctx.stream>>>(p.args, p.w.get());
  CUDA_CHECK(cudaGetLastError());
  const std::vector<uint16_t> w = to_host_bits(p.w.get(), p.w.size(), ctx.stream);
  const Source source = make_source("X", "m", "k", "X", x, M, K, 0);  // values unique: all of X
  ProbeRun r;
  r.name = "activation", r.title = "W selects k = n % 128, so Y[m][n] must be X[m][n % 128] (X's values unique)";
  r.M = M, r.N = N, r.K = K, r.dq = false, r.source = &source;
  r.expected = host_gemm(x, w, M, N, K);
  r.expected_at = [](int m, int n) { return std::make_pair(m, n % K); };
  r.histograms = {by_m("m%16", 1, 16), by_m("m%256/64", 64, kTileM), by_m("m/256 (m-tile)", kTileM, 2 * kTileM),
                  by_n("n%16", 1, 16), by_n("n%128/64 (wgroup)", 64, kTileN)};
  r.y = probe_output(ctx, p, r.name);
  return report_probe(ctx, r);
}

// 3. The block scales' indexing: all codes 15 (W = its scales) and X = 1 on k-block kb only, so Y[m][n] must be
// 64 * scale(n, kb) (64 equal bf16 terms: exact in fp32, and a bf16 again), for kb = 0, 1 and the last, in one
// scale mode. K = 448: 7 k-blocks, so the 5-stage ring wraps and the last block is the odd tail. Returns the runs
// that found wrong elements (or failed their premise).
int probe_scales(Context& ctx, bool dq) {
  constexpr int M = 64, N = 256, K = 448;
  Problem p;
  make_problem(p, M, N, K, dq, /*with_bias=*/false, dq ? 0x5CA1E000ull : 0x5CA1E001ull, ctx.stream);
  CUDA_CHECK(cudaMemsetAsync(p.packed.get(), 0xFF, p.packed.size(), ctx.stream));
  dequantize_reference<<<grid_for(p.w.size()), 256, 0, ctx.stream>>>(p.args, p.w.get());
  CUDA_CHECK(cudaGetLastError());
  const std::vector<uint16_t> w = to_host_bits(p.w.get(), p.w.size(), ctx.stream);
  const Source source = make_source("64*scale", "n", "kb", "the n-tile's scales", block_sums(w, N, K), N, K / 64,
                                    kTileN);
  int failing = 0;
  for (const int kb : {0, 1, K / 64 - 1}) {
    const std::vector<uint16_t> x = block_x(M, K, kb);
    to_device(p.x.get(), x.data(), x.size() * 2, ctx.stream);
    ProbeRun r;
    r.name = "scale";
    appendf(r.title, "codes all 15, X = 1 on k-block %d only, so Y[m][n] must be 64 * scale(n, %d)", kb, kb);
    r.M = M, r.N = N, r.K = K, r.kb = kb, r.dq = dq, r.source = &source, r.examples_by_n = true;
    r.expected = host_gemm(x, w, M, N, K);
    r.expected_at = [kb](int, int n) { return std::make_pair(n, kb); };
    r.histograms = {by_n("n%16", 1, 16), by_n("n%64/16 (warp)", 16, 64), by_n("n%128/64 (wgroup)", 64, kTileN),
                    by_n("n/128 (n-tile)", kTileN, N)};
    r.y = probe_output(ctx, p, "scale " + std::string(dq ? "dq" : "plain") + " kb=" + std::to_string(kb));
    failing += report_probe(ctx, r) != 0;
  }
  return failing;
}

// All probes (8 runs); returns how many found wrong elements (or failed their premise).
int run_probes(Context& ctx) {
  int failing = (probe_weight(ctx) != 0) + (probe_activation(ctx) != 0);
  for (const bool dq : {true, false}) failing += probe_scales(ctx, dq);
  return failing;
}

// Weight copies to rotate among so that their bytes are 4x the L2 cache (at least 2), as bench_nf4_linear.py's
// copies_for: every launch then reads its weight from DRAM, the way the bars are timed through the operator.
int copies_for(size_t bytes_per_copy, int l2_bytes) {
  const size_t wanted = (4 * size_t(l2_bytes) + bytes_per_copy - 1) / std::max<size_t>(bytes_per_copy, 1);
  return int(std::max<size_t>(2, wanted));
}

// Median microseconds a launch of `ours` and of `cublas`, each called with its launch's running index (so that
// launches with copies walk through them all): 7 runs, each the mean of 10 back-to-back launches, interleaved run
// by run so that a clock or thermal drift hits both alike.
std::pair<double, double> median_us(Context& ctx, const std::function<void(int)>& ours,
                                    const std::function<void(int)>& cublas) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  int launched = 0;
  const auto batch_us = [&](const std::function<void(int)>& launch) {
    CUDA_CHECK(cudaEventRecord(start, ctx.stream));
    for (int i = 0; i < 10; ++i) launch(launched + i);
    CUDA_CHECK(cudaEventRecord(stop, ctx.stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms * 1000.0f / 10.0f;
  };
  for (int i = 0; i < 3; ++i) ours(i), cublas(i);  // clocks, caches, cuBLAS' heuristics
  std::vector<float> ours_runs, cublas_runs;
  for (int r = 0; r < 7; ++r, launched += 10) {
    ours_runs.push_back(batch_us(ours));
    cublas_runs.push_back(batch_us(cublas));
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ours_runs.begin(), ours_runs.end());
  std::sort(cublas_runs.begin(), cublas_runs.end());
  return {ours_runs[3], cublas_runs[3]};
}

// Timing of one M x N x K shape (double quantization, no bias): ours against the bf16 cuBLAS GEMM on the
// dequantized weight, the dense route's GEMM alone (its dequantization pass is not counted: the bar is the GEMM).
// Twice: with one weight, hot in L2 after the first launch, and with weights rotating past L2 (X shared, as the
// operator's benchmark does; cuBLAS then reads 4 bytes of weight for every one of ours, so it slows more).
void time_shape(Context& ctx, int M, int N, int K, uint64_t seed) {
  char row[160];
  std::snprintf(row, sizeof row, "time  %5d x %5d x %5d  dq    no-bias", M, N, K);
  Problem p;
  make_problem(p, M, N, K, /*double_quant=*/true, /*with_bias=*/false, seed, ctx.stream);
  DeviceBuffer<bf16> ours(size_t(M) * N), cublas_out(size_t(M) * N);
  p.args.y = ours.get();
  if (!qlora::sm90::nf4_gemm_sm90_covers(p.args)) {
    std::printf("{\"kind\":\"time\",\"M\":%d,\"N\":%d,\"K\":%d,\"mode\":\"dq\",\"bias\":false,"
                "\"skipped\":\"not covered\",\"device\":\"%s\"}\n", M, N, K, ctx.device.c_str());
    ctx.table.push_back(std::string(row) + "  SKIP (not covered)");
    return;
  }
  // The copies: the first is p; the others have their own codes, scales and dequantized weight, and p's X.
  const size_t nf4_bytes = size_t(N) * K / 2 + size_t(N) * K / 64;
  int device = 0, l2_bytes = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const int copies = copies_for(nf4_bytes, l2_bytes);  // more than cuBLAS' 4-byte-a-weight copies need
  std::vector<Problem> rotating(copies - 1);
  for (int c = 0; c + 1 < copies; ++c) {
    make_problem(rotating[c], 1, N, K, /*double_quant=*/true, /*with_bias=*/false, seed ^ (uint64_t(c + 1) << 32),
                 ctx.stream);
    rotating[c].args.x = p.x.get(), rotating[c].args.M = M, rotating[c].args.y = ours.get();
  }
  const auto copy = [&](int i) -> const Problem& { return i % copies == 0 ? p : rotating[i % copies - 1]; };

  run_ours(p.args, ctx.stream, /*sync=*/true);  // a fault in the first launch is named as the kernel's here
  const auto [hot_ours, hot_cublas] = median_us(
      ctx, [&](int) { run_ours(p.args, ctx.stream, /*sync=*/false); },
      [&](int) { cublas_gemm(ctx.handle, p, cublas_out.get(), CUDA_R_16BF); });
  const auto [cold_ours, cold_cublas] = median_us(
      ctx, [&](int i) { run_ours(copy(i).args, ctx.stream, /*sync=*/false); },
      [&](int i) { cublas_gemm(ctx.handle, copy(i), cublas_out.get(), CUDA_R_16BF); });
  run_ours(p.args, ctx.stream, /*sync=*/true);

  const double flop = 2.0 * M * double(N) * K;
  const auto report = [&](const char* weights, int weight_copies, double ours_us, double cublas_us) {
    const double ours_tflops = flop / (ours_us * 1e6), cublas_tflops = flop / (cublas_us * 1e6);
    const double speed = cublas_us / ours_us;
    std::printf("{\"kind\":\"time\",\"M\":%d,\"N\":%d,\"K\":%d,\"mode\":\"dq\",\"bias\":false,\"weights\":\"%s\","
                "\"copies\":%d,\"ours_us\":%.2f,\"cublas_us\":%.2f,\"ours_tflops\":%.1f,\"cublas_tflops\":%.1f,"
                "\"speed_vs_bf16\":%.4f,\"device\":\"%s\"}\n",
                M, N, K, weights, weight_copies, ours_us, cublas_us, ours_tflops, cublas_tflops,
                speed, ctx.device.c_str());
    char result[220];
    std::snprintf(result, sizeof result,
                  " %-8s ours %8.1f us (%4.0f TFLOP/s)  cuBLAS %8.1f us (%4.0f)  speed %.3f %s", weights, ours_us,
                  ours_tflops, cublas_us, cublas_tflops, speed, speed >= 0.95 ? "(bar 0.95 met)" : "(< 0.95)");
    ctx.table.push_back(std::string(row) + result);
  };
  report("hot", 1, hot_ours, hot_cublas);
  report("rotating", copies, cold_ours, cold_cublas);
}

struct Options {
  bool check = true, time = true, time_anyway = false, probe = false;
  int time_m = 2048;
  std::vector<std::pair<int, int>> shapes{{4096, 4096}, {14336, 4096}, {4096, 14336}, {28672, 8192}};
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--check-only | --time-only] [--time-anyway] [--probe] [--shapes NxK,...] [--m M]\n"
               "  --probe alone runs only the probes; with --check-only or --time-only, those as well\n", argv0);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  bool mode_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--check-only") {
      o.time = false, mode_given = true;
    } else if (arg == "--time-only") {
      o.check = false, mode_given = true;
    } else if (arg == "--probe") {
      o.probe = true;
    } else if (arg == "--time-anyway") {
      o.time_anyway = true;
    } else if (arg == "--m" && i + 1 < argc) {
      if ((o.time_m = std::atoi(argv[++i])) <= 0) usage(argv[0]);
    } else if (arg == "--shapes" && i + 1 < argc) {
      o.shapes.clear();
      const std::string list = argv[++i];
      for (size_t start = 0; start <= list.size();) {
        const size_t stop = std::min(list.find(',', start), list.size());
        int n = 0, k = 0;
        char tail = 0;
        if (std::sscanf(list.substr(start, stop - start).c_str(), "%dx%d%c", &n, &k, &tail) != 2 || n <= 0 || k <= 0)
          usage(argv[0]);
        o.shapes.emplace_back(n, k);
        start = stop + 1;
      }
    } else {
      usage(argv[0]);
    }
  }
  if (!o.check && !o.time) usage(argv[0]);
  if (o.probe && !mode_given) o.check = o.time = false;  // --probe alone: the probes only
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every JSON line reaches tee before a possible hang or kill
  const Options opt = parse(argc, argv);
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::fprintf(stderr, "# device %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  {  // what nf4_gemm_sm90_covers reads: a "not covered" on every case is explained here
    cudaFuncAttributes attributes{};
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, qlora::sm90::detail::nf4_gemm_sm90_kernel<true>));
    std::fprintf(stderr, "# kernel: binaryVersion %d, %d registers, %zu bytes static shared\n",
                 attributes.binaryVersion, attributes.numRegs, attributes.sharedSizeBytes);
    namespace d = qlora::sm90::detail;
    std::fprintf(stderr, "# build: %d threads, producer warpgroup %d, sliced issue %d, cluster %d, %d A-register sets, "
                 "bf16 pairs %d, diag %d\n", d::kThreads, int(d::kProducerWarpgroup), int(d::kSliced), d::kClusterN,
                 d::kSets, int(d::kBf16Pairs),
#ifdef QLORA_SM90_DIAG
                 QLORA_SM90_DIAG
#else
                 0
#endif
    );
  }
  Context ctx;
  ctx.device = json_escape(prop.name);
  CUDA_CHECK(cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&ctx.handle));
  CUBLAS_CHECK(cublasSetStream(ctx.handle, ctx.stream));

  bool all_passed = true;
  int ran = 0, skipped = 0;
  if (opt.check) {
    // Odd M (a partial tile, M = 1), N a multiple of 8 but not of a tile, K of 1..224 blocks, both scale modes.
    const Case cases[] = {{256, 128, 64, true, false},    {17, 136, 128, true, true},
                          {300, 200, 192, false, false},  {1, 8, 64, true, true},
                          {513, 384, 1024, false, true},  {2048, 4096, 4096, true, false},
                          {2048, 14336, 4096, true, true}, {2048, 4096, 14336, true, false},
                          {2048, 28672, 8192, true, false}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c)
      all_passed &= check_case(ctx, cases[c], 0x5EED0000ull + c, ran, skipped);
  }
  int probes_failing = 0;
  if (opt.probe || !all_passed) probes_failing = run_probes(ctx);  // before the timings: a hang there loses nothing
  if (opt.time && (all_passed || opt.time_anyway)) {
    for (size_t s = 0; s < opt.shapes.size(); ++s)
      time_shape(ctx, opt.time_m, opt.shapes[s].first, opt.shapes[s].second, 0x7143E000ull + s);
  } else if (opt.time) {
    ctx.table.push_back("time  skipped: a check failed (--time-anyway times regardless)");
  }

  std::printf("\nnf4_gemm_sm90 on %s\n", prop.name);
  for (const std::string& line : ctx.table) std::printf("%s\n", line.c_str());
  const bool probes_only = !opt.check && !opt.time;
  if (probes_only) {  // --probe alone: the probes decide
    all_passed = probes_failing == 0;
    std::printf("RESULT: %s (probes only: %d of 8 runs found wrong elements)\n", all_passed ? "PASS" : "FAIL",
                probes_failing);
  } else {
    if (opt.probe || !all_passed) {
      std::printf("PROBES: %d of 8 runs found wrong elements (diagnostics: the exit status follows the checks)\n",
                  probes_failing);
    }
    std::printf("RESULT: %s (%d checks ran, %d skipped as not covered)\n", all_passed ? "PASS" : "FAIL", ran, skipped);
  }
  CUBLAS_CHECK(cublasDestroy(ctx.handle));
  CUDA_CHECK(cudaStreamDestroy(ctx.stream));
  return all_passed ? 0 : 1;
}
