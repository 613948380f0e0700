// The implementation of nf4_gemm_sm90.cuh (included by it). Design and measurements: docs/nf4_gemm_sm90.md.
//
// Yᵀ = W Xᵀ with W as the register operand of wgmma (A: the consumers dequantize straight into fragment registers,
// so the dequantized weight never touches shared memory) and X as the shared-memory operand (B: TMA, 128-byte
// swizzle, K-major, the layout wgmma reads as is). A CTA computes a tile of 128 W rows x 256 X rows:
//   - 256 threads, two warpgroups, 64 W rows each (the wgmma's M), 128 fp32 accumulators a thread (m64n256),
//     4 wgmma a 64-k stage;
//   - thread 0 also issues each stage's two TMA copies (X: 256 rows x 64 k, 32 KB; the codes: 128 rows x 32 bytes,
//     4 KB) on the stage's full barrier: the first kStages before the loop, then in stage kb the refill of the slot
//     that stage kb - 2 read (retired by every warp one stage earlier, so the wait is short).
// No producer warp: the register file is split among the SM's four sub-partitions (16K registers each) and a
// warp takes its registers from one of them, so a ninth warp puts three warps of 224 registers (21.5K) on one
// sub-partition and the launch fails (cudaErrorLaunchOutOfResources, seen on the H100; ptxas' 168-register choice
// under __launch_bounds__(288, 1) was this limit). Eight warps, two a sub-partition, may use up to 255.
//
// Dequantization is exact: the weight is T(nf4[c] * s), the product in fp32 rounded once to bf16, as
// nf4_dequantize writes it, so the kernel's error is that of a bf16 GEMM on the dequantized weight. A lane holds
// the A fragment of mma.m16n8k16's layout for each k16 slice: rows g and g + 8 of its warp's 16, k = 2t, 2t + 1
// (one code byte: byte 8j + t of the row's 32-byte stage segment for slice j) and 2t + 8, 2t + 9 (byte 8j + 4 + t).
// Per byte: a byte permute, one 8-byte lookup of the (nf4[hi], nf4[lo]) float pair (16 table copies, one per
// lane of a half-warp: no bank conflict), two fp32 multiplies by the row's block scale and one paired conversion.
//
// Pipelining: the A registers of stage kb are read by its wgmmas asynchronously, so the consumer loop is unrolled
// by two stages with two register sets: stage kb + 1 is dequantized while stage kb's wgmmas run, and
// wgmma.wait_group 1 after committing kb + 1 frees kb's set and X stage (then the warp arrives on kb's empty
// barrier, from which thread 0 refills it).
//
// Experiments (macros, off by default; timed by benchmarks/gpu_checks/run.sh gemm_sm90_variants): a producer
// warpgroup with setmaxnreg (QLORA_SM90_PRODUCER_WG: the 12 warps fit the sub-partitions once the producer drops to
// 40 registers), each slice's wgmma issued once dequantized (QLORA_SM90_SLICED), clusters sharing X by multicast
// (QLORA_SM90_CLUSTER_N), three A-register sets (QLORA_SM90_SETS), a bf16-pair table with one bf16x2 multiply a
// byte (QLORA_SM90_BF16_PAIRS).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <mutex>

#include "qlora/nf4.h"

namespace qlora {
namespace sm90 {
namespace detail {

constexpr int kTileN = 128;                           // W rows a CTA: 2 consumer warpgroups x 64
constexpr int kTileM = 256;                           // X rows a CTA: the wgmma's N
constexpr int kStageK = 64;                           // one quantization block of each row
constexpr int kStages = 5;
constexpr int kConsumerWarps = 8;
// QLORA_SM90_PRODUCER_WG (an experiment, off): a third warpgroup issues the copies, so that no consumer warp waits on
// an empty barrier or spends issue slots on TMA; `setmaxnreg` moves registers from it (40 a thread) to the consumers
// (232): per sub-partition 2 x 232 x 32 + 40 x 32 = 16,128 of 16,384.
#ifndef QLORA_SM90_PRODUCER_WG
#define QLORA_SM90_PRODUCER_WG 0
#endif
constexpr bool kProducerWarpgroup = QLORA_SM90_PRODUCER_WG != 0;
constexpr int kThreads = kConsumerWarps * 32 + (kProducerWarpgroup ? 128 : 0);
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
// Two consumer warps a sub-partition (16K registers each): up to 255 registers a thread (the accumulators alone
// take 128).
constexpr int kMaxRegisters = 255;
static_assert(((kMaxRegisters + 7) / 8 * 8) * 32 * ((kConsumerWarps + 3) / 4) <= 16384, "registers a sub-partition");
static_assert(2 * kConsumerRegisters * 32 + kProducerRegisters * 32 <= 16384, "registers a sub-partition (producer)");
// QLORA_SM90_SLICED (an experiment, off): each k16 slice's wgmma is issued as soon as its 4 fragment registers are
// dequantized, instead of after the whole stage, so that the tensor cores get a stage's first work a quarter of
// the dequantization earlier (one wgmma.fence a slice instead of one a stage).
#ifndef QLORA_SM90_SLICED
#define QLORA_SM90_SLICED 0
#endif
constexpr bool kSliced = QLORA_SM90_SLICED != 0;
// QLORA_SM90_SETS (an experiment; 2 by default): A-register sets, i.e. stages whose wgmmas may be in flight while
// the next is dequantized (wgmma.wait_group kSets - 1). 3 keeps two stages of each warpgroup queued (+16 registers).
#ifndef QLORA_SM90_SETS
#define QLORA_SM90_SETS 2
#endif
constexpr int kSets = QLORA_SM90_SETS;
static_assert(kSets == 2 || kSets == 3, "2 or 3 register sets");
// QLORA_SM90_CLUSTER_N (an experiment, 1 = off): clusters of 2 or 4 CTAs along W rows (grid y) share each X tile;
// each CTA copies its share of the rows and multicasts it into every CTA of the cluster, dividing the X traffic
// from L2 (32 KB a CTA and stage; without the dequantization the kernel moves ~6 TB/s from L2). Each slot's empty
// barrier then counts every CTA's consumer warps. Without a producer warpgroup that made
// warpgroup 0 wait at every refill for the slowest warp of the cluster: 1.7-3.9x slower (session 29).
#ifndef QLORA_SM90_CLUSTER_N
#define QLORA_SM90_CLUSTER_N 1
#endif
constexpr int kClusterN = QLORA_SM90_CLUSTER_N;
static_assert(kClusterN == 1 || kClusterN == 2 || kClusterN == 4, "clusters of 1, 2 or 4 CTAs");
// QLORA_SM90_BF16_PAIRS (an experiment, off): the table holds (T(nf4[hi]), T(nf4[lo])) as a bf16 pair, 32 copies
// (one a lane: conflict-free 4-byte loads), and a code byte's fragment register is one bf16x2 multiply by (T(s),
// T(s)): 4 instructions a byte instead of 6 and half the table's shared-memory bytes (16 KB a stage instead of 32),
// for two more roundings (the weight becomes T(T(nf4[c]) T(s)) instead of T(nf4[c] s)). For the case where the
// dequantization slows the wgmmas beside it (diag 3 near the kernel) rather than only delaying them.
#ifndef QLORA_SM90_BF16_PAIRS
#define QLORA_SM90_BF16_PAIRS 0
#endif
constexpr bool kBf16Pairs = QLORA_SM90_BF16_PAIRS != 0;
#if defined(QLORA_SM90_DIAG) && (QLORA_SM90_DIAG == 1 || QLORA_SM90_DIAG == 2)
static_assert(!kBf16Pairs, "diag 1 and 2 replace the fp32 table's lookup: build them without QLORA_SM90_BF16_PAIRS");
#endif
constexpr int kXStageBytes = kTileM * kStageK * 2;    // 32 KB
constexpr int kCodeStageBytes = kTileN * kStageK / 2; // 4 KB: 128 rows x 32 bytes
constexpr int kTableEntryBytes = kBf16Pairs ? 4 : 8;  // a bf16 pair, or an fp32 pair
constexpr int kTableCopies = kBf16Pairs ? 32 : 16;    // one a lane of the warp, or of the half-warp an LDS.64 serves
constexpr int kTableStride = kTableCopies * kTableEntryBytes;  // 128 bytes from one entry's copies to the next's
constexpr int kTableBytes = 256 * kTableStride;       // 32 KB
constexpr int kXOffset = 0;                           // 1024-aligned: the 128-byte swizzle's period
constexpr int kCodeOffset = kXOffset + kStages * kXStageBytes;
constexpr int kTableOffset = kCodeOffset + kStages * kCodeStageBytes;
constexpr int kMapOffset = kTableOffset + kTableBytes;
constexpr int kBarrierOffset = kMapOffset + 256 * 4;
constexpr int kSharedBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + the base's alignment slack
// The epilogue's staging of the output tile (after the main loop, over the X stages): per warpgroup 256 X rows
// of 64 outputs, rows padded to 72 so that a quarter-warp's 2-byte stores hit distinct banks.
constexpr int kStageRowElems = 72;
constexpr int kEpilogueBytes = 2 * kTileM * kStageRowElems * 2;
static_assert(kEpilogueBytes <= kStages * kXStageBytes, "the epilogue reuses the X stages");
static_assert(kSharedBytes <= 227 * 1024, "one CTA a SM");

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QLORA_SM90_DEVICE 1
#else
#define QLORA_SM90_DEVICE 0
#endif

#if QLORA_SM90_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
// QLORA_SM90_WATCHDOG (the check's build): a wait still incomplete after 2^22 polls traps instead of hanging the
// device, so a protocol error ends as an error. The count lives in the asm: no register held across the loop.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef QLORA_SM90_WATCHDOG
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      ".reg .u32 polls;\n"
      "mov.u32 polls, 0;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@done bra DONE_%=;\n"
      "add.u32 polls, polls, 1;\n"
      "setp.lt.u32 done, polls, 4194304;\n"
      "@done bra WAIT_%=;\n"
      "trap;\n"
      "DONE_%=:\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives on the barrier at the same offset in cluster CTA `rank`'s shared memory (this CTA's own included).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
// tma_load_2d's copy written into every CTA of `cta_mask` at this CTA's offsets, completing on each one's barrier
// at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                                      int c1, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
      : "memory");
}
// A 2-D TMA copy of the box at (c0, c1) (innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of these registers across the wgmma fences (CUTLASS does the same).
__device__ __forceinline__ void fence_registers(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_registers(uint32_t (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[i])::"memory");
}
__device__ __forceinline__ void fence_registers(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) fence_registers(a[j]);
}

// The shared-memory matrix descriptor of a K-major, 128-byte-swizzled operand tile (rows of 64 bf16, 8-row groups
// 1024 bytes apart) at shared address `addr` (1024-aligned at the tile, plus the slice's 32-byte k offset).
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t b_desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22,"
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43,"
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64,"
      "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85,"
      "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104,"
      "%105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121,"
      "%122, %123, %124, %125, %126, %127"
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),
        "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]),
        "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),
        "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(1));
}
// The A-fragment register of one code byte (byte t of `word`, t in the selector): T(nf4[hi] * s) in the low half
// (the even k), T(nf4[lo] * s) in the high half.
//
// QLORA_SM90_DIAG (a diagnostic build of the standalone check only; wrong results, timing alone): 1 skips the
// dequantization (the fragment is the code word itself), 2 replaces the table lookup by an integer conversion (the
// products and the paired rounding stay), so that three timings split the main loop's time between the wgmma/TMA
// pipeline, the table and the arithmetic. 3 does the whole dequantization but feeds the wgmmas diag 1's fragments
// (the real ones go into a sink that is never read): nothing waits for it, so its time against diag 1 says whether
// the dequantization only delays the wgmmas (3 ≈ 1) or slows the SM beside them (3 ≈ the real kernel).
__device__ __forceinline__ uint32_t dequantize_byte(uint32_t table_lane, uint32_t word, uint32_t selector, float s) {
  const uint32_t code = __byte_perm(word, 0u, selector);
#if defined(QLORA_SM90_DIAG) && QLORA_SM90_DIAG == 1
  return code ^ table_lane;
#endif
  float hi_nibble, lo_nibble;
#if defined(QLORA_SM90_DIAG) && QLORA_SM90_DIAG == 2
  hi_nibble = __uint2float_rn(code >> 4), lo_nibble = __uint2float_rn(code & 15u);
#else
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
               : "=f"(hi_nibble), "=f"(lo_nibble)
               : "r"(table_lane + code * kTableStride));
#endif
  uint32_t pair;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(__fmul_rn(lo_nibble, s)), "f"(__fmul_rn(hi_nibble, s)));
  return pair;
}

// QLORA_SM90_BF16_PAIRS's form: the byte's (T(nf4[hi]), T(nf4[lo])) pair times (T(s), T(s)), one bf16x2 multiply.
__device__ __forceinline__ uint32_t dequantize_byte_bf16_pairs(uint32_t table_lane, uint32_t word, uint32_t selector,
                                                               uint32_t scale_pair) {
  const uint32_t code = __byte_perm(word, 0u, selector);
  uint32_t pair, scaled;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(pair) : "r"(table_lane + code * kTableStride));
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(scaled) : "r"(pair), "r"(scale_pair));
  return scaled;
}

// Which of the two A-register sets (and scale-input sets) a stage uses: a type, so that each is a compile-time index.
template <int kSet>
struct RegisterSet {
  static constexpr int value = kSet;
};
#endif  // QLORA_SM90_DEVICE

template <bool kDoubleQuant>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_gemm_sm90_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap code_map,
                         const NF4GemmArgs p) {  // (x and packed arrive through the tensor maps)
#if QLORA_SM90_DEVICE
  extern __shared__ unsigned char shared_raw[];
  __shared__ float nf4_values[16];
  // 1024-aligned (the swizzle's period), by an offset from the array so that the compiler keeps these accesses
  // in the shared space (an integer round trip made them generic loads)
  unsigned char* const smem = shared_raw + ((1024u - (smem_u32(shared_raw) & 1023u)) & 1023u);
  const uint32_t base = smem_u32(smem);
  const uint32_t full0 = base + kBarrierOffset, empty0 = full0 + kStages * 8;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;  // m fastest: a wave's CTAs share W tiles in L2
  const int n_k = p.K / kStageK;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);                 // the issuing thread's arrive (with the stage's bytes)
      mbar_init(empty0 + 8 * s, kConsumerWarps * kClusterN);  // one arrive a consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (tid == i) nf4_values[i] = nf4_code(i);
  }
  __syncthreads();
  if (tid < 256) {  // table entry `tid`: its copies in 8 16-byte stores, rotated across the bank groups
    const float hi = nf4_values[tid >> 4], lo = nf4_values[tid & 15];
    uint4* const copies = reinterpret_cast<uint4*>(smem + kTableOffset + tid * kTableStride);
    uint4 piece;  // 16 bytes of copies: 2 fp32 pairs or 4 bf16 pairs
    if constexpr (kBf16Pairs) {
      uint32_t pair;
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(lo), "f"(hi));  // hi in the low half: the even k
      piece = make_uint4(pair, pair, pair, pair);
    } else {
      piece = make_uint4(__float_as_uint(hi), __float_as_uint(lo), __float_as_uint(hi), __float_as_uint(lo));
    }
    static_assert(kTableStride == 8 * 16, "an entry's copies are 8 16-byte pieces");
#pragma unroll
    for (int q = 0; q < 8; ++q) copies[(q + tid) & 7] = piece;
    if constexpr (kDoubleQuant) reinterpret_cast<float*>(smem + kMapOffset)[tid] = __ldg(p.nested_code + tid);
  }
  __syncthreads();
  // In a cluster, the peers' barriers are initialised before any multicast or remote arrive reaches them.
  const uint32_t rank = kClusterN > 1 ? cluster_rank() : 0;
  if constexpr (kClusterN > 1) cluster_arrive(), cluster_wait();

  // Stage kb's copies into slot kb % kStages, issued by thread 0 (whose warp computes too) or the producer. In a
  // cluster this CTA's share of the X tile goes to every CTA of it; the full barrier counts the whole tile's bytes,
  // whichever CTA sent them.
  auto issue_copies = [&](int kb) {
    const int s = kb % kStages;
    mbar_arrive_expect_tx(full0 + 8 * s, kXStageBytes + kCodeStageBytes);
    if constexpr (kClusterN > 1) {
      constexpr int kShareRows = kTileM / kClusterN;
      tma_load_2d_multicast(base + kXOffset + s * kXStageBytes + rank * (kXStageBytes / kClusterN), &x_map,
                            full0 + 8 * s, kb * kStageK, m0 + int(rank) * kShareRows, (1u << kClusterN) - 1);
    } else {
      tma_load_2d(base + kXOffset + s * kXStageBytes, &x_map, full0 + 8 * s, kb * kStageK, m0);
    }
    tma_load_2d(base + kCodeOffset + s * kCodeStageBytes, &code_map, full0 + 8 * s, kb * (kStageK / 2), n0);
  };
  if constexpr (kProducerWarpgroup) {
    if (tid >= kConsumerWarps * 32) {  // the producer warpgroup: one thread issues every stage's copies
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegisters));
      if (tid == kConsumerWarps * 32) {
        for (int kb = 0; kb < n_k; ++kb) {
          if (kb >= kStages) mbar_wait(empty0 + 8 * (kb % kStages), ((kb / kStages) - 1) & 1);
          issue_copies(kb);
        }
      }
      if constexpr (kClusterN > 1) {  // every thread of the cluster takes part in its barrier (see the end)
        __syncwarp();
        cluster_arrive();
        cluster_wait();
      }
      return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegisters));
  } else if (tid == 0) {
    for (int kb = 0; kb < kStages && kb < n_k; ++kb) issue_copies(kb);
  }

  // Lane (g, t) of warp w in warpgroup wg holds tile rows row0 = 64 wg + 16 (w % 4) + g and
  // row0 + 8 of W (the A fragment's rows), and after the loop their outputs for X rows 8c + 2t, 8c + 2t + 1.
  const int wg = warp >> 2, g = lane >> 2, t = lane & 3;
  const int row0 = wg * 64 + (warp & 3) * 16 + g;
  const uint32_t selector = 0x4440u | uint32_t(t);  // byte t of a word, zeros above
  const uint32_t table_lane = base + kTableOffset + (lane % kTableCopies) * kTableEntryBytes;
  const float* const nested_map = reinterpret_cast<const float*>(smem + kMapOffset);
  const int64_t blocks_per_row = p.K / kStageK;
  // rows past N take row N - 1's scales (their codes are TMA's zero fill; their outputs are not stored)
  const int64_t block0 = int64_t(min(n0 + row0, p.N - 1)) * blocks_per_row;
  const int64_t block1 = int64_t(min(n0 + row0 + 8, p.N - 1)) * blocks_per_row;
  const float offset = kDoubleQuant ? __ldg(p.nested_offset) : 0.0f;

  // The block scales' inputs of stage kb in set kb % kSets, loaded two stages ahead: under double quantization the
  // 8-bit code and the nested absmax of each row, plain the absmax itself.
  uint32_t scale_code[kSets][2] = {};
  float scale_factor[kSets][2] = {};
  auto load_scale_inputs = [&](auto set_tag, int kb) {
    constexpr int set = decltype(set_tag)::value;
    if (kb < n_k) {
      if constexpr (kDoubleQuant) {
        scale_code[set][0] = __ldg(p.absmax_codes + block0 + kb);
        scale_code[set][1] = __ldg(p.absmax_codes + block1 + kb);
        scale_factor[set][0] = __ldg(p.nested_absmax + ((block0 + kb) >> p.nested_log2));
        scale_factor[set][1] = __ldg(p.nested_absmax + ((block1 + kb) >> p.nested_log2));
      } else {
        scale_factor[set][0] = __ldg(p.absmax + block0 + kb);
        scale_factor[set][1] = __ldg(p.absmax + block1 + kb);
      }
    }
  };
  auto block_scale = [&](auto set_tag, int r) -> float {
    constexpr int set = decltype(set_tag)::value;
    if constexpr (kDoubleQuant) {  // nf4_block_scale's two roundings
      return __fadd_rn(__fmul_rn(nested_map[scale_code[set][r]], scale_factor[set][r]), offset);
    } else {
      return scale_factor[set][r];
    }
  };

#if defined(QLORA_SM90_DIAG) && QLORA_SM90_DIAG == 3
  uint32_t diag_sink = 0;
#endif
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  uint32_t a[kSets][4][4] = {};  // [set][k16 slice][fragment register] (zero: the first stage fences set 1 unwritten)
  load_scale_inputs(RegisterSet<0>{}, 0);
  load_scale_inputs(RegisterSet<1>{}, 1);

  auto stage = [&](auto set_tag, int kb) {
    constexpr int set = decltype(set_tag)::value;
    const int s = kb % kStages;
    const float scale0 = block_scale(set_tag, 0), scale1 = block_scale(set_tag, 1);
    // stage kb + 2's set: its previous stage (kb + 2 - kSets, this one with two sets) has read its scales already
    load_scale_inputs(RegisterSet<(set + 2) % kSets>{}, kb + 2);
    mbar_wait(full0 + 8 * s, (kb / kStages) & 1);
    const unsigned char* const codes = smem + kCodeOffset + s * kCodeStageBytes;
    // the two rows' 32 code bytes of the stage (16-byte reads; the 4 t-lanes of a row read the same bytes)
    const uint4 row0_lo = *reinterpret_cast<const uint4*>(codes + row0 * 32);
    const uint4 row0_hi = *reinterpret_cast<const uint4*>(codes + row0 * 32 + 16);
    const uint4 row1_lo = *reinterpret_cast<const uint4*>(codes + (row0 + 8) * 32);
    const uint4 row1_hi = *reinterpret_cast<const uint4*>(codes + (row0 + 8) * 32 + 16);
    const uint32_t words0[8] = {row0_lo.x, row0_lo.y, row0_lo.z, row0_lo.w, row0_hi.x, row0_hi.y, row0_hi.z, row0_hi.w};
    const uint32_t words1[8] = {row1_lo.x, row1_lo.y, row1_lo.z, row1_lo.w, row1_hi.x, row1_hi.y, row1_hi.z, row1_hi.w};
    const uint32_t x_stage = base + kXOffset + s * kXStageBytes;
    [[maybe_unused]] uint32_t scale_pair0 = 0, scale_pair1 = 0;  // (T(s), T(s)) of each row, for QLORA_SM90_BF16_PAIRS
    if constexpr (kBf16Pairs) {
      asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(scale_pair0) : "f"(scale0));
      asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(scale_pair1) : "f"(scale1));
    }
    auto dequantize = [&](uint32_t word, int row) {  // row 0 or 1 of the lane's two (a constant at each call)
      if constexpr (kBf16Pairs) {
        return dequantize_byte_bf16_pairs(table_lane, word, selector, row == 0 ? scale_pair0 : scale_pair1);
      } else {
        return dequantize_byte(table_lane, word, selector, row == 0 ? scale0 : scale1);
      }
    };
    auto dequantize_slice = [&](int j) {  // slice j: byte t of word 2j (k 16j + 2t) and of word 2j + 1 (k 16j + 8 + 2t)
      a[set][j][0] = dequantize(words0[2 * j], 0);
      a[set][j][1] = dequantize(words1[2 * j], 1);
      a[set][j][2] = dequantize(words0[2 * j + 1], 0);
      a[set][j][3] = dequantize(words1[2 * j + 1], 1);
#if defined(QLORA_SM90_DIAG) && QLORA_SM90_DIAG == 3
#pragma unroll
      for (int i = 0; i < 4; ++i) diag_sink ^= a[set][j][i];
      a[set][j][0] = words0[2 * j] ^ table_lane, a[set][j][1] = words1[2 * j] ^ table_lane;
      a[set][j][2] = words0[2 * j + 1] ^ table_lane, a[set][j][3] = words1[2 * j + 1] ^ table_lane;
#endif
    };
    if constexpr (kSliced) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dequantize_slice(j);
        fence_registers(a[set][j]);
        wgmma_fence();
        wgmma_m64n256k16_rs(acc, a[set][j], sw128_descriptor(x_stage + 32 * j));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) dequantize_slice(j);
      fence_registers(a[set]);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_m64n256k16_rs(acc, a[set][j], sw128_descriptor(x_stage + 32 * j));
    }
    wgmma_commit();
    // stage kb - (kSets - 1)'s wgmmas are done (kb - 1 with two sets): its register set and its stage are free
    wgmma_wait<kSets - 1>();
    fence_registers(a[(set + 1) % kSets]);
    const int retired = kb - (kSets - 1);
    if (retired >= 0 && lane == 0) {  // in a cluster, every CTA's copies of the slot's next use write into this CTA
      if constexpr (kClusterN > 1) {
#pragma unroll
        for (int r = 0; r < kClusterN; ++r) mbar_arrive_cluster(empty0 + 8 * (retired % kStages), r);
      } else {
        mbar_arrive(empty0 + 8 * (retired % kStages));
      }
    }
    // Refill the slot of stage retired - 1 (every warp arrived on it during stage kb - 1) with its stage + kStages.
    const int refill = retired - 1 + kStages;
    if (!kProducerWarpgroup && tid == 0 && retired >= 1 && refill < n_k) {
      mbar_wait(empty0 + 8 * ((retired - 1) % kStages), ((retired - 1) / kStages) & 1);
      issue_copies(refill);
    }
    __syncwarp();  // warp 0 whole again before the next stage's warpgroup-wide (.aligned) wgmma instructions
  };

  fence_registers(acc);
  int kb = 0;
#pragma unroll 1
  for (; kb + kSets - 1 < n_k; kb += kSets) {
    stage(RegisterSet<0>{}, kb);
    stage(RegisterSet<1>{}, kb + 1);
    if constexpr (kSets == 3) stage(RegisterSet<2 % kSets>{}, kb + 2);
  }
  if (kb < n_k) stage(RegisterSet<0>{}, kb);
  if (kSets == 3 && kb + 1 < n_k) stage(RegisterSet<1>{}, kb + 1);
  wgmma_wait<0>();
  fence_registers(acc);
  // No CTA of a cluster exits while a peer may still arrive on its barriers (waited for at the end). The X stages
  // are free for the epilogue already: every copy into them completed before this CTA's last full-barrier wait.
  if constexpr (kClusterN > 1) cluster_arrive();

  // Epilogue: every consumer warp is past its last wgmma before the X stages are overwritten; each warpgroup
  // stages its 64 x 256 outputs (bias added in fp32, one rounding) as rows of Y, then stores 16-byte pieces.
  asm volatile("bar.sync 1, 256;" ::: "memory");
  __nv_bfloat16* const staged = reinterpret_cast<__nv_bfloat16*>(smem + kXOffset) + wg * kTileM * kStageRowElems;
  const int col = (warp & 3) * 16 + g;  // the lane's first output column in the warpgroup's 64
  const bool has_bias = p.bias != nullptr;
  const float bias0 = has_bias && n0 + row0 < p.N ? __bfloat162float(p.bias[n0 + row0]) : 0.0f;
  const float bias1 = has_bias && n0 + row0 + 8 < p.N ? __bfloat162float(p.bias[n0 + row0 + 8]) : 0.0f;
#pragma unroll
  for (int c = 0; c < 32; ++c) {
    const int m = 8 * c + 2 * t;
    staged[m * kStageRowElems + col] = __float2bfloat16_rn(acc[4 * c] + bias0);
    staged[(m + 1) * kStageRowElems + col] = __float2bfloat16_rn(acc[4 * c + 1] + bias0);
    staged[m * kStageRowElems + col + 8] = __float2bfloat16_rn(acc[4 * c + 2] + bias1);
    staged[(m + 1) * kStageRowElems + col + 8] = __float2bfloat16_rn(acc[4 * c + 3] + bias1);
  }
  if (wg == 0) {
    asm volatile("bar.sync 2, 128;" ::: "memory");
  } else {
    asm volatile("bar.sync 3, 128;" ::: "memory");
  }
  const int thread_in_wg = tid & 127;
#pragma unroll 4
  for (int i = 0; i < kTileM * 8 / 128; ++i) {  // 256 rows x 8 pieces of 16 bytes
    const int piece = thread_in_wg + 128 * i, row = piece >> 3, col8 = (piece & 7) * 8;
    const int m = m0 + row, n = n0 + wg * 64 + col8;
    if (m < p.M && n < p.N) {  // N % 8 == 0: a piece is whole or out
      *reinterpret_cast<uint4*>(p.y + int64_t(m) * p.N + n) =
          *reinterpret_cast<const uint4*>(staged + row * kStageRowElems + col8);
    }
  }
  if constexpr (kClusterN > 1) cluster_wait();
#if defined(QLORA_SM90_DIAG) && QLORA_SM90_DIAG == 3
  if (p.M < 0) reinterpret_cast<uint32_t*>(p.y)[0] = diag_sink;  // never true; keeps the sink's inputs computed
#endif
#else
  __trap();  // built without sm_90a code: nf4_gemm_sm90_covers refuses such builds, so this is a caller's error
#endif
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess) {
      encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }
  });
  return encode;
}

// A row-major [rows, cols] tensor's map with boxes of box_rows x box_cols.
inline bool encode_2d(CUtensorMap& map, CUtensorMapDataType type, const void* data, uint64_t rows, uint64_t cols,
                      uint64_t row_bytes, uint32_t box_rows, uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(&map, type, 2, const_cast<void*>(data), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// What a device offers this kernel, asked once per device: compute capability 9.0 and sm_90a machine code in this
// binary (a plain sm_90 or PTX-only build compiles the kernel body down to a trap, a handful of registers), and the
// dynamic shared memory limit raised for both kernels.
inline bool device_ready() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < kMaxDevices && cache[device].load(std::memory_order_relaxed) != 0) {
    return cache[device].load(std::memory_order_relaxed) == 2;
  }
  int major = 0, minor = 0;
  cudaFuncAttributes attributes{};
  const bool ready =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess && major == 9 &&
      minor == 0 && cudaFuncGetAttributes(&attributes, nf4_gemm_sm90_kernel<true>) == cudaSuccess &&
      attributes.binaryVersion == 90 && attributes.numRegs > 32 &&
      cudaFuncSetAttribute(nf4_gemm_sm90_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes) ==
          cudaSuccess &&
      cudaFuncSetAttribute(nf4_gemm_sm90_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes) ==
          cudaSuccess &&
      tensor_map_encoder() != nullptr;
  if (device < kMaxDevices) cache[device].store(ready ? 2 : 1, std::memory_order_relaxed);
  return ready;
}

template <bool kDoubleQuant>
cudaError_t launch(const NF4GemmArgs& args, cudaStream_t stream) {
  constexpr auto kernel = nf4_gemm_sm90_kernel<kDoubleQuant>;
  CUtensorMap x_map, code_map;
  if (!encode_2d(x_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, args.x, args.M, args.K, uint64_t(args.K) * 2,
                 kTileM / kClusterN, kStageK, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_2d(code_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.packed, args.N, args.K / 2, uint64_t(args.K) / 2,
                 kTileN, kStageK / 2, CU_TENSOR_MAP_SWIZZLE_NONE)) {
    return cudaErrorInvalidValue;
  }
  // A cluster's CTAs are adjacent along y; a last CTA past N (a tile count not a multiple of the cluster) computes
  // rows it does not store.
  const int n_tiles = (args.N + kTileN - 1) / kTileN;
  const dim3 grid((args.M + kTileM - 1) / kTileM, (n_tiles + kClusterN - 1) / kClusterN * kClusterN);
  if constexpr (kClusterN == 1) {
    kernel<<<grid, kThreads, kSharedBytes, stream>>>(x_map, code_map, args);
    return cudaGetLastError();
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = kSharedBytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = 1;
    attribute[0].val.clusterDim.y = kClusterN;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, x_map, code_map, args);
  }
}

}  // namespace detail

inline bool nf4_gemm_sm90_covers(const NF4GemmArgs& args) {
  if (args.M <= 0 || args.N <= 0 || args.K <= 0 || args.K % detail::kStageK != 0 || args.N % 8 != 0) return false;
  // grid y (N tiles rounded up to whole clusters) at most 65535
  if (args.N > 65535 / detail::kClusterN * detail::kClusterN * detail::kTileN) return false;
  if (args.x == nullptr || args.packed == nullptr || args.y == nullptr) return false;
  if (reinterpret_cast<uintptr_t>(args.x) % 16 != 0 || reinterpret_cast<uintptr_t>(args.packed) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(args.y) % 16 != 0) {
    return false;
  }
  const bool double_quant = args.absmax == nullptr;
  if (double_quant && (args.absmax_codes == nullptr || args.nested_code == nullptr || args.nested_absmax == nullptr ||
                       args.nested_offset == nullptr || args.nested_log2 < 0 || args.nested_log2 > 30)) {
    return false;
  }
  return detail::device_ready();
}

inline cudaError_t nf4_gemm_sm90(const NF4GemmArgs& args, cudaStream_t stream) {
  if (!nf4_gemm_sm90_covers(args)) return cudaErrorInvalidValue;
  return args.absmax == nullptr ? detail::launch<true>(args, stream) : detail::launch<false>(args, stream);
}

}  // namespace sm90
}  // namespace qlora
