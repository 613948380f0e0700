"""Experiment (session 21; run in sessions 22-23, its ring is the library's "ring" variant): an NF4 GEMV
whose code loads are 16 bytes a lane, and (session 23, run in session 24) gemv_ring32 for M <= 16.

    python benchmarks/gpu_checks/gemv_v16_experiment.py [--out FILE.json]

Why (docs/nf4_gemv.md, session 21's paragraphs): "factored" runs at 1.5-1.85x the time of its
own access pattern. Neither ~10% fewer instructions ("factored_wide") nor 50% more warps
("factored_lean") moved it. The likelier limit is the L1 data pipe, at 0.67 wavefronts a cycle per SM,
which ncu splits into table lookups (shared) and code, scale and x loads (global). Its 8-byte code
loads touch 8 rows a warp-instruction for 256 bytes; 16-byte loads carry 512 bytes for the same 8
rows, which would cut the code loads' wavefronts in half.

The catch is the factored scale. With 16 bytes (32 k) a lane, the 4 t-lanes of a row span two
quantization blocks: t = 0, 1 hold block 2h and t = 2, 3 block 2h + 1 of the half-step h. The two
blocks' partial sums are kept apart in the MMA's N dimension instead. B column 2m holds x row m at
block 2h's k and zero at block 2h + 1's; column 2m + 1 holds the reverse. One MMA a k-step, as in
"factored", then leaves both partial sums in the lane that holds columns 2m and 2m + 1 (t = m). That
lane scales each by its block's fp32 scale and adds it to the accumulator. This costs half of the
MMA's 8 columns, so it covers M <= 4.

The kernel is compiled at run time with CuPy (the GPU machine's image has it), like
bench_read_floor.py, so the library stays as tested. It covers M <= 4, bf16, blocksize 64, double
quantization, K % 2048 == 0 (every warp has a step in every tile) and N % 16 == 0. It is checked
against the fp32 reference with the tests' rule (<= 2x plain PyTorch's error plus one ulp), then
timed against the library's nf4_gemv (the default variant) and bf16 cuBLAS with bench_nf4_linear's
CUDA-graph timer over weight copies rotating past the L2 cache.

If it wins, it belongs in nf4_gemv_cuda.cu as a variant. The GPU tests then cover it with the rest.

gemv_ring32 (variants r32_s3, r32_s2; docs/nf4_gemv_m16.md) keeps the ring but changes the tile for M <= 16:
32 rows a tile (x is read from L2 once per tile, so taller tiles read it less), and the k order kept
inside each quantization block, so that a plain B carries 16 x rows in two n8 MMAs. It covers
M <= 16, K % 1024 == 0 and N % 32 == 0; emulate_ring32 checks its layout on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import qlora_ext  # noqa: E402
from bench_nf4_gemm import weight_copies  # noqa: E402
from bench_nf4_linear import copies_for, git_commit, time_graph  # noqa: E402
from qlora_ext import codebooks, ops, reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]

KERNEL = r"""
typedef unsigned int u32;
typedef unsigned char u8;
typedef unsigned short u16;
typedef long long i64;

// fp32 -> bf16 bits, round to nearest even (finite inputs).
__device__ __forceinline__ u32 bf16_bits(float f) {
  u32 u = __float_as_uint(f);
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

// 16 bytes of codes, read once: not kept in L1 (x lives there).
__device__ __forceinline__ uint4 load_codes16(const u8* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The table word of byte p of `word` from the lane's copy (`lane_table`: its shared address).
__device__ __forceinline__ u32 lookup(u32 lane_table, u32 word, u32 p) {
  const u32 byte = __byte_perm(word, 0u, 0x4440u | p);  // byte p alone, zero above
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lane_table + (byte << 7)));
  return v;
}

// The scales of half h's two blocks for rows g and g + 8: block 4 step + 2h's is lane t = 2h's,
// block 4 step + 2h + 1's lane 2h + 1's (lane t decodes block 4 step + t of its rows).
struct BlockScales {
  float lo_g, hi_g, lo_g8, hi_g8;
};
__device__ __forceinline__ BlockScales block_scales(const float (&scale)[2], int lane, int h) {
  const int src = lane & ~3;
  return {__shfl_sync(0xffffffffu, scale[0], src | (2 * h)), __shfl_sync(0xffffffffu, scale[0], src | (2 * h + 1)),
          __shfl_sync(0xffffffffu, scale[1], src | (2 * h)), __shfl_sync(0xffffffffu, scale[1], src | (2 * h + 1))};
}

// acc (rows g, g + 8) += each column pair of a half-step's C, times its block's scale.
__device__ __forceinline__ void add_scaled(float (&acc)[2], const float (&c)[4], const BlockScales& s) {
  acc[0] = fmaf(s.hi_g, c[1], fmaf(s.lo_g, c[0], acc[0]));
  acc[1] = fmaf(s.hi_g8, c[3], fmaf(s.lo_g8, c[2], acc[1]));
}

// Half h of an item (128 k: code words of rows g and g + 8, x words, the lane's block scales of both
// rows): 8 MMAs into a fresh C, whose column pairs hold block 2h's and block 2h + 1's partial sums
// in lane t = m, each scaled by its block's scale (from lanes 2h and 2h + 1 of the row's 4) into acc.
__device__ __forceinline__ void half_step(float (&acc)[2], const uint4& cg, const uint4& cg8, const uint4 (&xv)[4],
                                          const float (&scale)[2], u32 lane_table, int lane, int h) {
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    // A: code bytes 2j (k slots 2t, 2t+1) and 2j + 1 (slots 2t+8, 2t+9) of rows g (a0, a2), g + 8 (a1, a3)
    const u32 wg = word_of(cg, j >> 1), wg8 = word_of(cg8, j >> 1);
    const u32 p0 = 2 * (j & 1);
    const u32 a0 = lookup(lane_table, wg, p0), a1 = lookup(lane_table, wg8, p0);
    const u32 a2 = lookup(lane_table, wg, p0 + 1), a3 = lookup(lane_table, wg8, p0 + 1);
    // B: x words 2j and 2j + 1 of the lane's 16 (the same k as a0 / a2)
    mma16816(c, a0, a1, a2, a3, word_of(xv[j >> 1], (2 * j) & 3), word_of(xv[j >> 1], (2 * j + 1) & 3));
  }
  add_scaled(acc, c, block_scales(scale, lane, h));
}

// The end of a tile: the 8 warps' sums meet in shared memory, 64 threads store y rows tile*16.. (bf16).
__device__ __forceinline__ void end_tile(float (&acc)[2], float (&partial)[8][16][5], int warp, int g, int t, int tid,
                                         int M, i64 N, i64 tile, u16* __restrict__ y) {
  if (t < M) {
    partial[warp][g][t] = acc[0];
    partial[warp][g + 8][t] = acc[1];
  }
  __syncthreads();
  if (tid < 16 * 4) {
    const int r = tid & 15, m = tid >> 4;
    if (m < M) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < 8; ++w) s += partial[w][r][m];
      y[i64(m) * N + tile * 16 + r] = u16(bf16_bits(s));
    }
  }
  __syncthreads();
  acc[0] = acc[1] = 0.f;
}

// One (tile, step) item's loads: rows g and g + 8 of the tile, 2 x 16 bytes each (the step's 128
// bytes a row: lane t holds bytes 16t.. of each 64-byte half), and lane t's block-scale ingredients
// (block 4 step + t of each row).
struct Item {
  uint4 codes[2][2];  // [row g / g + 8][half]
  u32 scale_code[2];
  float nested[2];
};

__device__ __forceinline__ void load_item(Item& it, const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                                          const float* __restrict__ nested_absmax, i64 K, i64 tile, i64 step,
                                          int g, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 row = tile * 16 + g + 8 * r;
    const u8* p = packed + row * (K >> 1) + step * 128 + 16 * t;
    it.codes[r][0] = load_codes16(p);
    it.codes[r][1] = load_codes16(p + 64);
    const i64 b = row * (K >> 6) + step * 4 + t;
    it.scale_code[r] = __ldg(absmax_codes + b);
    it.nested[r] = __ldg(nested_absmax + (b >> 8));
  }
}

#ifndef TABLE_V4
#define TABLE_V4 0
#endif
#ifndef PREFETCH
#define PREFETCH 0
#endif

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// The warp's lines of tile `tile` into L2: its items' 128 code bytes of each of the 16 rows (steps
// warp, warp + 8, ...), and the tile's block-scale codes (16 rows x K / 64 bytes, contiguous),
// split over the CTA's 256 threads.
__device__ __forceinline__ void prefetch_tile(const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                                              i64 K, i64 tile, int warp, int lane, i64 n_steps) {
  const i64 row0 = tile * 16;
  const i64 lines = ((n_steps - warp + 7) >> 3) * 16;
  for (i64 l = lane; l < lines; l += 32) prefetch_l2(packed + (row0 + (l & 15)) * (K >> 1) + (warp + 8 * (l >> 4)) * 128);
  const u8* s = absmax_codes + row0 * (K >> 6);
  for (i64 l = warp * 32 + lane; l * 128 < (K >> 2); l += 256) prefetch_l2(s + l * 128);
}

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_v16(const u16* __restrict__ x, int M, const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
         const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
         const float* __restrict__ nested_offset, const float* __restrict__ nf4, i64 N, i64 K, u16* __restrict__ y) {
  __shared__ __align__(16) u32 table[256 * 32];  // the T2 word of code byte b at byte offset b * 128 + lane * 4: conflict-free
  __shared__ float nested_map[256];
  __shared__ float partial[8][16][5];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const i64 n_steps = K >> 8, n_tiles = N >> 4;
  Item cur, nxt;
  i64 tile = blockIdx.x, step = warp;
#if PREFETCH
  // PREFETCH 1: each warp asks L2 for its items of the tile it enters (the first here, the next ones
  // at its tile switch), so a tile's bytes are all requested at once instead of one item ahead.
  // PREFETCH 2: one tile further (the first two here, then tile + grid at each switch).
  if (tile < n_tiles) prefetch_tile(packed, absmax_codes, K, tile, warp, lane, n_steps);
  if (PREFETCH == 2 && tile + gridDim.x < n_tiles) prefetch_tile(packed, absmax_codes, K, tile + gridDim.x, warp, lane, n_steps);
#endif
  if (tile < n_tiles) load_item(cur, packed, absmax_codes, nested_absmax, K, tile, step, g, t);  // under the table build
#if TABLE_V4
  {  // thread b writes code byte b's 32 copies: 8 16-byte stores, rotated so a quarter-warp's 8 hit 8 bank groups
    const u32 w = bf16_bits(nf4[tid >> 4]) | (bf16_bits(nf4[tid & 15]) << 16);
    const uint4 v = make_uint4(w, w, w, w);
    uint4* row = reinterpret_cast<uint4*>(table + tid * 32);
#pragma unroll
    for (int q = 0; q < 8; ++q) row[(q + tid) & 7] = v;
  }
#else
  for (int i = tid; i < 256 * 32; i += 256) {
    const int b = i >> 5;
    table[i] = bf16_bits(nf4[b >> 4]) | (bf16_bits(nf4[b & 15]) << 16);  // even k (high nibble) low
  }
#endif
  nested_map[tid] = nested_code[tid];
  const float offset = nested_offset[0];
  __syncthreads();
  // The lane's copy of the table as a shared-window address: a lookup is then one byte permute (the
  // code byte alone), one LEA (byte * 128 + this) and the load.
  u32 table_address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(table_address) : "l"(table));
  const u32 lane_table = table_address + u32(lane) * 4;
  // B columns in pairs: column 2m holds x row m where the k belongs to block 2h (A lanes t < 2),
  // column 2m + 1 x row m where it belongs to block 2h + 1 (t >= 2), zero elsewhere. One MMA then
  // gives both blocks' partial sums, C[row][2m] and C[row][2m + 1], which lane t = m holds as
  // (c0, c1) for row g and (c2, c3) for row g + 8. Lane (g, t) supplies column g at owner t's k.
  const int xm = g >> 1;
  const bool x_loads = xm < M && ((g & 1) == 0) == (t < 2);
  const u16* x_lane = x + (x_loads ? xm : 0) * K + 32 * t;
  uint4 xv[4] = {make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u),
                 make_uint4(0u, 0u, 0u, 0u)};  // written only where x_loads: zero elsewhere for good
  float acc[2] = {0.f, 0.f};  // rows g and g + 8, x row t (lanes t < M)
  // One item: the next one's loads, this one's arithmetic, the tile's end. Two buffers in turn (the
  // loop below runs it twice a round), so that no item is copied from one to the other.
  auto item = [&](const Item& cur, Item& nxt) {
    i64 next_tile = tile, next_step = step + 8;
    if (next_step >= n_steps) {
      next_tile += gridDim.x;
      next_step = warp;
    }
#if PREFETCH
    if (next_tile != tile) {
      const i64 ahead = next_tile + (PREFETCH == 2 ? gridDim.x : 0);
      if (ahead < n_tiles) prefetch_tile(packed, absmax_codes, K, ahead, warp, lane, n_steps);
    }
#endif
    if (next_tile < n_tiles) load_item(nxt, packed, absmax_codes, nested_absmax, K, next_tile, next_step, g, t);
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) scale[r] = __fadd_rn(__fmul_rn(nested_map[cur.scale_code[r]], cur.nested[r]), offset);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (x_loads) {
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = __ldg(reinterpret_cast<const uint4*>(x_lane + step * 256 + 128 * h + 8 * q));
      }
      half_step(acc, cur.codes[0][h], cur.codes[1][h], xv, scale, lane_table, lane, h);
    }
    if (next_tile != tile) end_tile(acc, partial, warp, g, t, tid, M, N, tile, y);  // every warp, once (K % 2048)
    tile = next_tile;
    step = next_step;
  };
  while (tile < n_tiles) {
    item(cur, nxt);
    if (tile >= n_tiles) break;
    item(nxt, cur);
  }
}

// ---- the ring variant (session 22): the same arithmetic, codes and scale ingredients staged per warp in
// a shared-memory ring of STAGES items filled with cp.async, so that STAGES - 1 items are in flight
// without holding registers (the register kernel above keeps one: session 21's access-pattern replay
// reads 44.8 us at one item in flight and 41.5 at two, 28672 x 8192).
#ifndef STAGES
#define STAGES 4
#endif
#ifndef CTAS
#define CTAS 2
#endif
constexpr int kCodeBytes = 16 * 128;                 // 16 rows x 128 code bytes (one step)
constexpr int kStageBytes = kCodeBytes + 16 * 4 * 2;  // + 16 rows' 4 scale codes and nested absmax

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(a) : "l"(p));
  return a;
}

// One (tile, step) item into the warp's stage: lane l copies 16-byte pieces l, l + 32, l + 64, l + 96
// (row = piece / 8; a row's two 64-byte halves swap places on odd rows so that the compute's 16-byte
// reads, rows g and g + 1 of a quarter-warp, fall in different banks), lanes 0-15 row l's 4 scale codes,
// lanes 16-31 row l - 16's nested absmax.
__device__ __forceinline__ void issue_item(u32 stage, const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                                           const float* __restrict__ nested_absmax, i64 K, i64 tile, i64 step, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int piece = lane + 32 * i, row = piece >> 3, col = (piece & 7) * 16;
    const u8* src = packed + (tile * 16 + row) * (K >> 1) + step * 128 + col;
    const u32 dst = stage + row * 128 + (col ^ ((row & 1) * 64));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
  }
  const int row = lane & 15;
  const i64 b = (tile * 16 + row) * (K >> 6) + step * 4;
  if (lane < 16) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(stage + kCodeBytes + 4 * row), "l"(absmax_codes + b));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(stage + kCodeBytes + 64 + 4 * row),
                 "l"(nested_absmax + (b >> 8)));
  }
}

// The ring kernel's parameters and shared memory: the T2 table (32 KB),
// the nested map (1 KB), the warps' partial sums [8][16][COLS] (COLS: x rows + 1), then the rings.
#define RING_PARAMS                                                                                             \
  const u16 *__restrict__ x, int M, const u8 *__restrict__ packed, const u8 *__restrict__ absmax_codes,         \
      const float *__restrict__ nested_absmax, const float *__restrict__ nested_code,                           \
      const float *__restrict__ nested_offset, const float *__restrict__ nf4, i64 N, i64 K, u16 *__restrict__ y
template <int COLS>
__device__ __forceinline__ constexpr int ring_fixed_bytes() { return 32768 + 1024 + 8 * 16 * COLS * 4; }
template <int COLS>
__device__ __forceinline__ float (&ring_partials(u8* smem))[8][16][COLS] {
  return *reinterpret_cast<float(*)[8][16][COLS]>(smem + 32768 + 1024);
}

// A ring kernel's start: its shared memory (partial sums with COLS columns), thread ids, sizes.
#define RING_CTA(COLS)                                                                 \
  extern __shared__ __align__(16) u8 smem[];                                           \
  u32* table = reinterpret_cast<u32*>(smem);                                           \
  float* nested_map = reinterpret_cast<float*>(smem + 32768);                          \
  float(&partial)[8][16][COLS] = ring_partials<COLS>(smem);                            \
  u8* rings = smem + ring_fixed_bytes<COLS>();                                         \
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3; \
  const i64 n_steps = K >> 8, n_tiles = N >> 4

// The tile-strided kernels' next lines: the warp's ring, its producer STAGES - 1 items ahead (the
// first items fly while the tables are built), the nested offset and the lane's table copy.
// TABLES_FIRST (session 28, ring_timeline_h100.json): by default the tables' global loads are issued after the
// weight's first copies (ptxas places them there whatever the source order) and queue behind them, so the tables
// are ready only when the first item is. Here the NF4 table comes from constants and the nested map is the first
// cp.async group, ahead of the weight's; a wait for that group alone and a barrier make it visible.
#ifdef TABLES_FIRST
#define RING_TABLE_INPUTS() copy_nested_map(nested_map, nested_code, tid)
#define RING_BUILD_TABLES() build_tables_from_constants<STAGES - 1>(table, tid)
#define RING_OFFSET() nested_offset[0]
#else
#define RING_TABLE_INPUTS() (void)0
#define RING_BUILD_TABLES() build_tables(table, nested_map, nf4, nested_code, tid)
#define RING_OFFSET() nested_offset[0]
#endif
#define RING_STRIDED_START()                                                                            \
  u8* ring = rings + warp * STAGES * kStageBytes;                                                       \
  const u32 ring_address = shared_address(ring);                                                        \
  StridedProducer producer{blockIdx.x, warp, n_tiles, n_steps, warp};                                   \
  auto issue_next = [&](int stage) {                                                                    \
    producer.issue_next(ring_address + stage * kStageBytes, packed, absmax_codes, nested_absmax, K, lane); \
  };                                                                                                    \
  RING_TABLE_INPUTS();                                                                                  \
  for (int s = 0; s < STAGES - 1; ++s) issue_next(s);                                                   \
  RING_BUILD_TABLES();                                                                                  \
  const float offset = RING_OFFSET();                                                                   \
  const u32 lane_table = shared_address(table) + u32(lane) * 4

// Thread b writes code byte b's 32 table copies: 8 16-byte stores, rotated so a quarter-warp's 8 hit
// 8 bank groups.
__device__ __forceinline__ void build_table(u32* table, const float* __restrict__ nf4, int tid) {
  const u32 w = bf16_bits(nf4[tid >> 4]) | (bf16_bits(nf4[tid & 15]) << 16);
  const uint4 v = make_uint4(w, w, w, w);
  uint4* row = reinterpret_cast<uint4*>(table + tid * 32);
#pragma unroll
  for (int q = 0; q < 8; ++q) row[(q + tid) & 7] = v;
}

// Lane t's block scales (block 4 step + t of rows g and g + 8) from a stage's staged scale codes and
// nested absmax.
__device__ __forceinline__ void item_scales(float (&scale)[2], const u8* st, const float* nested_map, float offset,
                                            int g, int t) {
  const u32* scale_words = reinterpret_cast<const u32*>(st + kCodeBytes);
  const float* nested = reinterpret_cast<const float*>(st + kCodeBytes + 64);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const u32 code = (scale_words[g + 8 * r] >> (8 * t)) & 0xffu;
    scale[r] = __fadd_rn(__fmul_rn(nested_map[code], nested[g + 8 * r]), offset);
  }
}

// The producer of the tile-strided ring kernels: the warp's items in order (tiles blockIdx.x +
// i * gridDim.x, steps warp + 8j), each copied into the stage the consumer freed; past the last tile
// it commits empty groups (the consumer's wait counts groups).
struct StridedProducer {
  i64 tile, step, n_tiles, n_steps;
  int warp;
  __device__ void issue_next(u32 stage, const u8* __restrict__ packed, const u8* __restrict__ absmax_codes,
                             const float* __restrict__ nested_absmax, i64 K, int lane) {
    if (tile < n_tiles) issue_item(stage, packed, absmax_codes, nested_absmax, K, tile, step, lane);
    asm volatile("cp.async.commit_group;");
    step += 8;
    if (step >= n_steps) {
      step = warp;
      tile += gridDim.x;
    }
  }
};

// The tables every ring kernel builds while its first items fly: the T2 table and the nested map.
__device__ __forceinline__ void build_tables(u32* table, float* nested_map, const float* __restrict__ nf4,
                                             const float* __restrict__ nested_code, int tid) {
  build_table(table, nf4, tid);
  nested_map[tid] = nested_code[tid];
  __syncthreads();
}

// TABLES_FIRST: entry tid of the nested map as a cp.async group of its own, committed before the weight's.
__device__ __forceinline__ void copy_nested_map(float* nested_map, const float* __restrict__ nested_code, int tid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(shared_address(nested_map + tid)), "l"(nested_code + tid));
  asm volatile("cp.async.commit_group;");
}
// TABLES_FIRST: the table from the NF4 constants (no global load), then the map's group awaited (the LATER groups,
// the weight's first items, may still fly) and a barrier.
template <int LATER>
__device__ __forceinline__ void build_tables_from_constants(u32* table, int tid) {
  constexpr float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                              -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                              0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                              0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                              0.7229568362236023f, 1.0f};
  const u32 w = bf16_bits(kNF4[tid >> 4]) | (bf16_bits(kNF4[tid & 15]) << 16);
  const uint4 v = make_uint4(w, w, w, w);
  uint4* row = reinterpret_cast<uint4*>(table + tid * 32);
#pragma unroll
  for (int q = 0; q < 8; ++q) row[(q + tid) & 7] = v;
  asm volatile("cp.async.wait_group %0;" ::"n"(LATER));
  __syncthreads();
}

// One item's arithmetic from its stage `st` (codes, then 16 rows' 4 scale codes and nested absmax).
__device__ __forceinline__ void ring_item(float (&acc)[2], const u8* st, const float* nested_map, float offset,
                                          bool x_loads, const u16* x_lane, uint4 (&xv)[4], i64 step, u32 lane_table,
                                          int lane) {
  const int g = lane >> 2, t = lane & 3, swizzle = (g & 1) * 64;
  float scale[2];
  item_scales(scale, st, nested_map, offset, g, t);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4 cg = *reinterpret_cast<const uint4*>(st + g * 128 + ((16 * t + 64 * h) ^ swizzle));
    const uint4 cg8 = *reinterpret_cast<const uint4*>(st + (g + 8) * 128 + ((16 * t + 64 * h) ^ swizzle));
    if (x_loads) {
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = __ldg(reinterpret_cast<const uint4*>(x_lane + step * 256 + 128 * h + 8 * q));
    }
    half_step(acc, cg, cg8, xv, scale, lane_table, lane, h);
  }
}

// With -DTRACE=SLOTS (ring_timeline.py), lane 0 of each warp stamps %globaltimer and clock64 at: 0 the
// kernel's entry, 1 the tables built, 2 + i item i's wait done (i < SLOTS - 4), SLOTS - 2 the last item's
// arithmetic done, SLOTS - 1 the exit; g_trace_sm holds the warp's SM. Without TRACE the points are empty.
#ifdef TRACE
__device__ unsigned long long g_trace[TRACE_WARPS * TRACE * 2];
__device__ unsigned int g_trace_sm[TRACE_WARPS];
#define TRACE_POINT(slot)                                                                                \
  do {                                                                                                   \
    const int trace_warp = blockIdx.x * 8 + warp, trace_slot = (slot);                                   \
    if (lane == 0 && trace_warp < TRACE_WARPS && trace_slot < TRACE) {                                    \
      unsigned long long now;                                                                            \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));                                             \
      g_trace[(trace_warp * TRACE + trace_slot) * 2] = now;                                              \
      g_trace[(trace_warp * TRACE + trace_slot) * 2 + 1] = clock64();                                    \
    }                                                                                                    \
  } while (0)
#else
#define TRACE_POINT(slot)
#endif

extern "C" __global__ void __launch_bounds__(256, CTAS)
gemv_ring(RING_PARAMS) {
  RING_CTA(5);
  TRACE_POINT(0);
#ifdef TRACE
  if (lane == 0 && blockIdx.x * 8 + warp < TRACE_WARPS) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    g_trace_sm[blockIdx.x * 8 + warp] = sm;
  }
  int trace_item = 0;
#endif
  RING_STRIDED_START();
  TRACE_POINT(1);
  const int xm = g >> 1;
  const bool x_loads = xm < M && ((g & 1) == 0) == (t < 2);
  const u16* x_lane = x + (x_loads ? xm : 0) * K + 32 * t;
  uint4 xv[4] = {make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u), make_uint4(0u, 0u, 0u, 0u),
                 make_uint4(0u, 0u, 0u, 0u)};
  float acc[2] = {0.f, 0.f};
  i64 tile = blockIdx.x, step = warp;
  int stage = 0;
  while (tile < n_tiles) {
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
    __syncwarp();  // every lane's copies of this item landed; every lane is done with the stage refilled next
#ifdef TRACE
    if (trace_item < TRACE - 4) TRACE_POINT(2 + trace_item);
    ++trace_item;
#endif
    issue_next(stage == 0 ? STAGES - 1 : stage - 1);
    ring_item(acc, ring + stage * kStageBytes, nested_map, offset, x_loads, x_lane, xv, step, lane_table, lane);
    stage = stage == STAGES - 1 ? 0 : stage + 1;
    i64 next_tile = tile, next_step = step + 8;
    if (next_step >= n_steps) {
      next_tile += gridDim.x;
      next_step = warp;
    }
    if (next_tile >= n_tiles) TRACE_POINT(TRACE - 2);
    if (next_tile != tile) end_tile(acc, partial, warp, g, t, tid, M, N, tile, y);  // every warp, once (K % 2048)
    tile = next_tile;
    step = next_step;
  }
  asm volatile("cp.async.wait_all;");
  TRACE_POINT(TRACE - 1);
}
// ---- gemv_ring32 (session 23, run in session 24: gemv_ring32_exp_h100.json; docs/nf4_gemv_m16.md): M <= 16 on 32-row tiles. An item is
// 32 rows x 128 k (2 quantization blocks a row, 2 KB of codes). Inside each block lane t takes code bytes
// 8t .. 8t + 7 of its rows (16 k), so every k16 slice of an MMA lies in one block: a plain B (x rows g and
// g + 8 in two n8 MMAs) and the block's scale applied to the MMA's sums in fp32 (factored rounding).
// Stage: 32 rows x 64 bytes, 16-byte pieces of rows with (row >> 1) odd swapped in pairs (p ^ 2) so that a
// half-warp's 8-byte reads of rows g (4 rows) hit 16 distinct bank pairs; then a 4-byte word of scale codes
// a row (the aligned word holding its 2 blocks) and the row's nested absmax.
// TILES (session 24): the CTA's 8 warps work on TILES tiles at a time, 8 / TILES warps (k groups)
// a tile, instead of 8 warps on one tile. Warps on different tiles at the same step read the same slice of x,
// so L1 serves all but the first: ncu at M = 16 (ncu_m16_ring32_vs_factored_h100.txt) showed the L2 moving
// 325-341 MB for 122 MB of DRAM reads, x re-read by every tile. Measured in session 25
// (gemv_ring32_tiles_exp_h100.json): TILES 2 was 2-4% faster at 14336 x 4096, TILES 4 1-2% at 28672 x 8192, both
// 49-236% slower at the 4096-row shapes; the library kernel keeps one tile a CTA.
#ifndef TILES
#define TILES 1
#endif
constexpr int kR32KGroups = 8 / TILES;
static_assert(TILES == 1 || TILES == 2 || TILES == 4 || TILES == 8, "8 warps split into tiles x k groups");
constexpr int kR32Code = 32 * 64;
constexpr int kR32Stage = kR32Code + 32 * 4 + 32 * 4;
constexpr int kR32Fixed = 32768 + 1024 + 8 * 32 * 16 * 4;  // table, nested map, partial sums [8][32][16]

extern "C" __global__ void __launch_bounds__(256, CTAS)
gemv_ring32(RING_PARAMS) {
  extern __shared__ __align__(16) u8 smem[];
  u32* table = reinterpret_cast<u32*>(smem);
  float* nested_map = reinterpret_cast<float*>(smem + 32768);
  float(&partial)[8][32][16] = *reinterpret_cast<float(*)[8][32][16]>(smem + 32768 + 1024);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const i64 n_steps = K >> 7, n_tiles = N >> 5, blocks_per_row = K >> 6;
  u8* ring = smem + kR32Fixed + warp * STAGES * kR32Stage;
  const u32 ring_address = shared_address(ring);
  // The warp's tile in each of the CTA's rounds: base + sub (base = (blockIdx + r grid) TILES); its steps
  // kg, kg + 8 / TILES, ... A tile past the last (the CTA's last round) reads the last tile and stores nothing,
  // so that every warp reaches the round's barriers.
  const int sub = warp % TILES, kg = warp / TILES;
  const i64 base_stride = i64(gridDim.x) * TILES;

  i64 issue_base = i64(blockIdx.x) * TILES, issue_step = kg;
  auto issue_next = [&](int stage) {
    if (issue_base < n_tiles) {
      const i64 issue_tile = min(issue_base + sub, n_tiles - 1);
      const u32 st = ring_address + stage * kR32Stage;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int piece = lane + 32 * i, row = piece >> 2, p16 = piece & 3;
        const u8* src = packed + (issue_tile * 32 + row) * (K >> 1) + issue_step * 64 + 16 * p16;
        const u32 dst = st + row * 64 + 16 * (p16 ^ (2 * ((row >> 1) & 1)));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
      }
      const i64 b0 = (issue_tile * 32 + lane) * blocks_per_row + 2 * issue_step;  // row `lane`'s first block
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(st + kR32Code + 4 * lane), "l"(absmax_codes + (b0 & ~i64(3))));
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(st + kR32Code + 128 + 4 * lane),
                   "l"(nested_absmax + (b0 >> 8)));
    }
    asm volatile("cp.async.commit_group;");
    issue_step += kR32KGroups;
    if (issue_step >= n_steps) {
      issue_step = kg;
      issue_base += base_stride;
    }
  };
  for (int s = 0; s < STAGES - 1; ++s) issue_next(s);
  build_tables(table, nested_map, nf4, nested_code, tid);
  const float offset = nested_offset[0];
  const u32 lane_table = shared_address(table) + u32(lane) * 4;

  // x rows g (n8 0) and g + 8 (n8 1); rows >= M read row 0 and are zeroed
  const bool x0 = g < M, x1 = g + 8 < M;
  const u16* x_row0 = x + (x0 ? g : 0) * K + 16 * t;
  const u16* x_row1 = x + (x1 ? g + 8 : 0) * K + 16 * t;
  float acc[2][2][4];  // [row group q][n8][C fragment]
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int n = 0; n < 2; ++n) acc[q][n][0] = acc[q][n][1] = acc[q][n][2] = acc[q][n][3] = 0.f;
  i64 base = i64(blockIdx.x) * TILES, step = kg;
  int stage = 0;
  while (base < n_tiles) {
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
    __syncwarp();
    issue_next(stage == 0 ? STAGES - 1 : stage - 1);
    const u8* st = ring + stage * kR32Stage;
    // The scales of the lane's rows 16q + g + 8r, blocks 2 step + bb. A row's staged word starts at its
    // first block rounded down to 4; the first block's byte in it, ((tile 32 + row) blocks_per_row +
    // 2 step) & 3, is (2 step + (row & 1) (blocks_per_row & 2)) & 3 for even blocks_per_row, the same for
    // all four rows (their parity is g's).
    const u32 first_byte = (u32(2 * step) + u32(g & 1) * (u32(blocks_per_row) & 2u)) & 3u;
    float sc[2][2][2];  // [q][r][bb]
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * q + g + 8 * r;
        const u32 word = reinterpret_cast<const u32*>(st + kR32Code)[row];
        const float nested = reinterpret_cast<const float*>(st + kR32Code + 128)[row];
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          const u32 code = (word >> (8 * (first_byte + bb))) & 0xffu;
          sc[q][r][bb] = __fadd_rn(__fmul_rn(nested_map[code], nested), offset);
        }
      }
#pragma unroll
    for (int bb = 0; bb < 2; ++bb) {
      // x: k = 64 (2 step + bb) + 16 t .. + 15 of rows g and g + 8 (slice s: words 2s, 2s + 1)
      const i64 k0 = (2 * step + bb) * 64;
      const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
      const uint4 xa0 = x0 ? __ldg(reinterpret_cast<const uint4*>(x_row0 + k0)) : zero;
      const uint4 xa1 = x0 ? __ldg(reinterpret_cast<const uint4*>(x_row0 + k0 + 8)) : zero;
      const uint4 xb0 = x1 ? __ldg(reinterpret_cast<const uint4*>(x_row1 + k0)) : zero;
      const uint4 xb1 = x1 ? __ldg(reinterpret_cast<const uint4*>(x_row1 + k0 + 8)) : zero;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r0 = 16 * q + g, r1 = r0 + 8;  // (r >> 1) & 1 and r & 1 are g's for both
        const int chunk = (bb * 2 + (t >> 1)) ^ (2 * ((g >> 1) & 1));  // the 16-byte piece holding bytes 8t ..
        const uint2 c0 = *reinterpret_cast<const uint2*>(st + r0 * 64 + 16 * chunk + 8 * (t & 1));
        const uint2 c1 = *reinterpret_cast<const uint2*>(st + r1 * 64 + 16 * chunk + 8 * (t & 1));
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          // A: bytes 2s (k slots 2t, 2t + 1) and 2s + 1 (2t + 8, 2t + 9) of the lane's 8, rows r0 (a0, a2), r1 (a1, a3)
          const u32 w0 = s < 2 ? c0.x : c0.y, w1 = s < 2 ? c1.x : c1.y, p = 2 * (s & 1);
          const u32 a0 = lookup(lane_table, w0, p), a1 = lookup(lane_table, w1, p);
          const u32 a2 = lookup(lane_table, w0, p + 1), a3 = lookup(lane_table, w1, p + 1);
          mma16816(c[0], a0, a1, a2, a3, word_of(s < 2 ? xa0 : xa1, (2 * s) & 3), word_of(s < 2 ? xa0 : xa1, (2 * s + 1) & 3));
          mma16816(c[1], a0, a1, a2, a3, word_of(s < 2 ? xb0 : xb1, (2 * s) & 3), word_of(s < 2 ? xb0 : xb1, (2 * s + 1) & 3));
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          acc[q][n][0] = fmaf(sc[q][0][bb], c[n][0], acc[q][n][0]);
          acc[q][n][1] = fmaf(sc[q][0][bb], c[n][1], acc[q][n][1]);
          acc[q][n][2] = fmaf(sc[q][1][bb], c[n][2], acc[q][n][2]);
          acc[q][n][3] = fmaf(sc[q][1][bb], c[n][3], acc[q][n][3]);
        }
      }
    }
    stage = stage == STAGES - 1 ? 0 : stage + 1;
    i64 next_base = base, next_step = step + kR32KGroups;
    if (next_step >= n_steps) {
      next_base += base_stride;
      next_step = kg;
    }
    if (next_base != base) {  // every warp, once a round (K % 1024 == 0)
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          // C: rows g (0, 1) and g + 8 (2, 3), columns (x rows) 8n + 2t, 8n + 2t + 1
          partial[warp][16 * q + g][8 * n + 2 * t] = acc[q][n][0];
          partial[warp][16 * q + g][8 * n + 2 * t + 1] = acc[q][n][1];
          partial[warp][16 * q + g + 8][8 * n + 2 * t] = acc[q][n][2];
          partial[warp][16 * q + g + 8][8 * n + 2 * t + 1] = acc[q][n][3];
          acc[q][n][0] = acc[q][n][1] = acc[q][n][2] = acc[q][n][3] = 0.f;
        }
      __syncthreads();
      for (int i = tid; i < TILES * 32 * 16; i += 256) {
        // a half-warp reads one row's 16 columns: no bank conflict; tile base + sj's sum over its k groups
        const int m = i & 15, r = (i >> 4) & 31, sj = i >> 9;
        const i64 tile = base + sj;
        if (m < M && tile < n_tiles) {
          float sum = 0.f;
#pragma unroll
          for (int k = 0; k < kR32KGroups; ++k) sum += partial[k * TILES + sj][r][m];
          y[i64(m) * N + tile * 32 + r] = u16(bf16_bits(sum));
        }
      }
      __syncthreads();
    }
    base = next_base;
    step = next_step;
  }
  asm volatile("cp.async.wait_all;");
}
"""


def emulate(x: torch.Tensor, q: qlora_ext.NF4Weight, nf4_values: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's data movement in plain PyTorch (CPU, fp32), lane by lane as the kernel indexes it.

    For each (tile, warp, step, half, k-step) it builds the MMA's A fragment words, which lane (g, t)
    fills from its 16 code bytes, and the B column pairs (x row m at block 2h's k in column 2m, at
    block 2h + 1's in column 2m + 1; M <= 4). It multiplies them as mma.m16n8k16 does and scales the partial
    sums as the lanes do. With `nf4_values` exact (the default), the result equals the fp32 reference up
    to summation order, so a wrong index shows up as a large error. tests/test_gemv_v16_emulation.py
    runs it.
    """
    N, K = q.shape
    M = x.shape[0]
    codes = q.packed.reshape(-1).to(torch.int64)
    nested = q.nested
    scales = reference.nested_absmax(q.absmax, nested.absmax2, nested.code, nested.offset, nested.blocksize)
    values = codebooks.nf4_code() if nf4_values is None else nf4_values
    xf = x.float()
    y = torch.zeros(M, N)
    n_steps = K // 256
    if M > MAX_ROWS:
        raise ValueError(f"the kernels take M <= {MAX_ROWS}")
    for tile in range(N // 16):
        acc = torch.zeros(16, M)  # rows of the tile x rows of x, summed over the warps
        for warp in range(8):
            for step in range(warp, n_steps, 8):
                for h in range(2):
                    lo_hi = torch.zeros(16, 8)  # C of this half-step: 16 rows x 8 columns
                    for j in range(8):
                        A = torch.zeros(16, 16)
                        B = torch.zeros(16, 8)
                        for g in range(8):
                            for t in range(4):
                                for r, row in ((g, tile * 16 + g), (g + 8, tile * 16 + g + 8)):
                                    base = row * (K // 2) + step * 128 + 64 * h + 16 * t
                                    for slot0, byte in ((2 * t, 2 * j), (2 * t + 8, 2 * j + 1)):
                                        c = int(codes[base + byte])
                                        A[r, slot0] = values[c >> 4]  # even k: high nibble, low half
                                        A[r, slot0 + 1] = values[c & 15]
                                xm = g >> 1  # column g: x row g / 2 at block parity g % 2
                                if xm < M and ((g & 1) == 0) == (t < 2):
                                    k0 = step * 256 + 128 * h + 32 * t
                                    for slot0, word in ((2 * t, 2 * j), (2 * t + 8, 2 * j + 1)):
                                        B[slot0, g] = xf[xm, k0 + 2 * word]
                                        B[slot0 + 1, g] = xf[xm, k0 + 2 * word + 1]
                        lo_hi += A @ B
                    for r in range(16):
                        row = tile * 16 + r
                        block = row * (K // 64) + step * 4 + 2 * h
                        for m in range(M):
                            col = 2 * m
                            acc[r, m] += scales[block] * lo_hi[r, col] + scales[block + 1] * lo_hi[r, col + 1]
        y[:, tile * 16 : tile * 16 + 16] = acc.T
    return y


def emulate_ring32(x: torch.Tensor, q: qlora_ext.NF4Weight, nf4_values: torch.Tensor | None = None) -> torch.Tensor:
    """gemv_ring32's data movement in plain PyTorch (CPU, fp32), lane by lane as the kernel indexes it.

    Per (tile of 32 rows, step of 128 k, block bb, row group q, k16 slice s): lane (g, t)'s A words come
    from code bytes 8t + 2s (k slots 2t, 2t + 1) and 8t + 2s + 1 (slots 2t + 8, 2t + 9) of the block's 32
    bytes of rows 16q + g and 16q + g + 8, its B words from x rows g and g + 8 (two n8 MMAs) at
    k = 64 block + 16t + 4s .. + 3; each block's product is scaled by the rows' block scales. With exact
    NF4 values it equals the fp32 reference up to summation order (tests/test_gemv_v16_emulation.py).
    """
    N, K = q.shape
    M = x.shape[0]
    if M > 16 or N % 32 or K % 128:
        raise ValueError("gemv_ring32 takes M <= 16, N % 32 == 0, K % 128 == 0")
    codes = q.packed.reshape(N, K // 2).to(torch.int64)
    nested = q.nested
    scales = reference.nested_absmax(q.absmax, nested.absmax2, nested.code, nested.offset, nested.blocksize)
    scales = scales.reshape(N, K // 64)
    values = codebooks.nf4_code() if nf4_values is None else nf4_values
    xf = torch.zeros(16, K)
    xf[:M] = x.float()
    y = torch.zeros(M, N)
    for tile in range(N // 32):
        acc = torch.zeros(32, 16)
        for step in range(K // 128):
            for bb in range(2):
                block = 2 * step + bb
                for qg in range(2):
                    c = torch.zeros(16, 16)  # the block's product: rows 16 qg + 0..15 x the 16 x rows
                    for s in range(4):
                        A = torch.zeros(16, 16)
                        B = torch.zeros(16, 16)
                        for g in range(8):
                            for t in range(4):
                                for r in (g, g + 8):
                                    row = tile * 32 + 16 * qg + r
                                    for slot0, byte in ((2 * t, 8 * t + 2 * s), (2 * t + 8, 8 * t + 2 * s + 1)):
                                        code = int(codes[row, 32 * block + byte])
                                        A[r, slot0] = values[code >> 4]  # even k: high nibble, low half
                                        A[r, slot0 + 1] = values[code & 15]
                                for n8 in range(2):
                                    k = 64 * block + 16 * t + 4 * s
                                    B[2 * t, 8 * n8 + g], B[2 * t + 1, 8 * n8 + g] = xf[8 * n8 + g, k], xf[8 * n8 + g, k + 1]
                                    B[2 * t + 8, 8 * n8 + g] = xf[8 * n8 + g, k + 2]
                                    B[2 * t + 9, 8 * n8 + g] = xf[8 * n8 + g, k + 3]
                        c += A @ B
                    rows = tile * 32 + 16 * qg + torch.arange(16)
                    acc[16 * qg : 16 * qg + 16] += scales[rows, block].unsqueeze(1) * c
        y[:, tile * 32 : tile * 32 + 32] = acc[:, :M].T
    return y

def ring32_schedule(n_tiles: int, n_steps: int, grid: int, tiles: int) -> dict[int, list[tuple[int, int, int]]]:
    """gemv_ring32's work split, as its loops run it: for each output tile, the (CTA, warp, step) items whose
    partial sums its round adds (warps on tiles past the last compute a clamped copy that is never added).
    Every tile must get every step exactly once (tests/test_gemv_v16_emulation.py)."""
    groups = 8 // tiles
    added: dict[int, list[tuple[int, int, int]]] = {}
    for cta in range(grid):
        for warp in range(8):
            sub, kg = warp % tiles, warp // tiles
            base, step = cta * tiles, kg
            while base < n_tiles:  # the consumer loop; the producer issues the same sequence ahead
                if base + sub < n_tiles:  # the round's sum reads partial[k * tiles + sub] for k < groups
                    added.setdefault(base + sub, []).append((cta, warp, step))
                step += groups
                if step >= n_steps:
                    base, step = base + grid * tiles, kg
    return added


# The kernels' compile-time options, A/B'd against each other in one run (session 22): TABLE_V4 (the
# table built with 16-byte stores, one code byte a thread), PREFETCH (tiles asked of L2 ahead), and
# the ring kernel's STAGES and CTAs a SM: name -> (kernel, defines, CTAs a SM).
VARIANTS = {
    "v16": ("gemv_v16", (), 2),
    "v16_tb": ("gemv_v16", ("-DTABLE_V4=1",), 2),
    "v16_pf1": ("gemv_v16", ("-DTABLE_V4=1", "-DPREFETCH=1"), 2),
    "v16_pf2": ("gemv_v16", ("-DTABLE_V4=1", "-DPREFETCH=2"), 2),
    "ring4": ("gemv_ring", ("-DSTAGES=4",), 2),
    "ring3": ("gemv_ring", ("-DSTAGES=3",), 2),
    "ring2_c3": ("gemv_ring", ("-DSTAGES=2", "-DCTAS=3"), 3),
    # session 28: the tables' inputs loaded before the weight's first copies (TABLES_FIRST)
    "ring3_tf": ("gemv_ring", ("-DSTAGES=3", "-DTABLES_FIRST=1"), 2),
    "ring2_c3_tf": ("gemv_ring", ("-DSTAGES=2", "-DCTAS=3", "-DTABLES_FIRST=1"), 3),
    # M <= 16 on 32-row tiles, the k order kept inside each block (gemv_ring32, docs/nf4_gemv_m16.md)
    "r32_s3": ("gemv_ring32", ("-DSTAGES=3",), 2),
    "r32_s2": ("gemv_ring32", ("-DSTAGES=2",), 2),
    # session 24: 2 / 4 tiles at a time a CTA (x slices shared through L1 by the warps of a step)
    "r32_t2": ("gemv_ring32", ("-DSTAGES=2", "-DTILES=2"), 2),
    "r32_t4": ("gemv_ring32", ("-DSTAGES=2", "-DTILES=4"), 2),
}
# Measured and dropped in session 23 (gemv_ring_exp_h100.json; the kernels are in git history before
# its cleanup): gemv_ring_sk, equal item runs a CTA with shared tiles finished by the last CTA, 9-65%
# slower than gemv_ring; gemv_ring_mc, column groups for M <= 16, within 3% of factored_fill at M = 8 and
# 1-35% slower at M = 16.
# Measured and dropped in session 24 (gemv_ring_exp_s24_h100.json; the kernels are in git history at
# 98d8b8c): gemv_ring_p, a two-instruction table lookup (a 64 KB table with 256-byte rows, so that one
# byte permute builds the lookup's offset and the LDS adds the base from a uniform register; one CTA of 16
# warps a SM), 2-18% slower than ring3 and no faster than the same CTA with the three-instruction lookup;
# gemv_ring_g, that lookup at ring2_c3's footprint (the stages' code rows in the table's unused row halves),
# 3-8% slower than ring2_c3. Fewer instructions do not make the ring faster: it is not issue-bound (ncu:
# 44-54% of issue slots busy).
MAX_ROWS = 4  # x rows gemv_ring takes: one column pair each in the MMA's 8 columns
# Per kernel: (x rows, tile rows, K multiple: every warp a step in every tile, fixed shared bytes, stage bytes)
DOMAINS = {
    "gemv_v16": (4, 16, 2048, 0, 0),
    "gemv_ring": (4, 16, 2048, 32768 + 1024 + 8 * 16 * 5 * 4, 16 * 128 + 16 * 4 * 2),
    "gemv_ring32": (16, 32, 1024, 32768 + 1024 + 8 * 32 * 16 * 4, 32 * 64 + 32 * 4 * 2),
}





def make_gemv(cupy, name: str = "v16"):
    kernel_name, defines, ctas = VARIANTS[name]
    kernel = cupy.RawKernel(KERNEL, kernel_name, options=("--std=c++17", *defines))
    rows, tile_rows, k_multiple, fixed_bytes, stage_bytes = DOMAINS[kernel_name]
    smem = 0
    if stage_bytes:
        stages = int(next(d for d in defines if d.startswith("-DSTAGES=")).split("=")[1])
        smem = fixed_bytes + 8 * stages * stage_bytes
        kernel.max_dynamic_shared_size_bytes = smem
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nf4 = codebooks.nf4_code("cuda")

    def covers(M: int, N: int, K: int) -> bool:
        return M <= rows and K % k_multiple == 0 and N % tile_rows == 0

    def gemv(x: torch.Tensor, q: qlora_ext.NF4Weight) -> torch.Tensor:
        N, K = q.shape
        M = x.shape[0]
        if not (covers(M, N, K) and q.blocksize == 64 and q.nested is not None and q.nested.blocksize == 256
                and x.dtype == torch.bfloat16 and x.is_contiguous()):  # fmt: skip
            raise ValueError(f"{name} covers M <= {rows}, bf16, blocksize 64, double quantization, "
                             f"K % {k_multiple}, N % {tile_rows}")  # fmt: skip
        y = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        tiles_a_cta = int(next((d.split("=")[1] for d in defines if d.startswith("-DTILES=")), 1))
        grid = min(-(-(N // tile_rows) // tiles_a_cta), ctas * sms)
        args = (x.data_ptr(), cupy.int32(M), q.packed.data_ptr(), q.absmax.data_ptr(), q.nested.absmax2.data_ptr(),
                q.nested.code.data_ptr(), q.nested.offset.data_ptr(), nf4.data_ptr(), cupy.int64(N), cupy.int64(K),
                y.data_ptr())  # fmt: skip
        kernel((grid,), (256,), args, stream=stream, shared_mem=smem)
        return y

    gemv.covers = covers
    return gemv


def check(gemv, x: torch.Tensor, q: qlora_ext.NF4Weight) -> dict:
    """The tests' rule: error against the fp32 reference <= 2x plain PyTorch's in bf16, plus one ulp."""
    args = ops._weight_args(q)
    ref = reference.nf4_gemv(x, *args[:4], None, *args[4:])
    out = gemv(x, q)
    err = (out.float() - ref).abs().max().item()
    base = (F.linear(x, q.dequantize(torch.bfloat16)).float() - ref).abs().max().item()
    slack = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * base + slack
    return dict(M=x.shape[0], N=q.shape[0], K=q.shape[1], max_err=err, pytorch_max_err=base, correct=ok)


def random_case(M: int, N: int, K: int) -> tuple[torch.Tensor, qlora_ext.NF4Weight]:
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K, device="cuda") * 0.05, 64, True)
    return torch.randn(M, K, device="cuda", dtype=torch.bfloat16), q


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    args = parser.parse_args()
    try:
        import cupy
    except ImportError:
        print("gemv_v16_experiment: needs CuPy (the GPU machine's image has it)", file=sys.stderr)
        return 2
    parser_variants = args.variants or list(VARIANTS)
    gemvs = {name: make_gemv(cupy, name) for name in parser_variants}
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=git_commit(),
               library_variant=ops.nf4_gemv_variant())  # fmt: skip
    failures = 0
    for name, gemv in gemvs.items():
        # odd tile counts, several tiles a CTA, and (gemv_ring32) M up to 16
        cases = [(1, 64, 2048), (3, 48, 4096), (4, 2000, 6144), (1, 4096, 14336), (2, 14336, 4096),
                 (5, 96, 2048), (16, 2048, 6144), (13, 4096, 8192), (8, 14336, 4096), (16, 32, 1024)]  # fmt: skip
        for M, N, K in [c for c in cases if gemv.covers(*c)]:
            case = random_case(M, N, K)
            for call in range(2):
                row = dict(env, kind="check", variant=name, call=call, **check(gemv, *case))
                failures += not row["correct"]
                print(json.dumps(row), flush=True)
    rows = []
    for N, K in SHAPES:
        w = torch.randn(N, K, device="cuda") * 0.05
        q = qlora_ext.NF4Weight.from_float(w, 64, True)
        dense = w.to(torch.bfloat16)
        del w
        copies = weight_copies(q, "cuda")
        denses = [dense] + [dense.clone() for _ in range(copies_for(2 * N * K) - 1)]
        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = dict(env, kind="time", shape_NK=[N, K], M=M)
            verdict = None
            with torch.no_grad():
                for name, gemv in gemvs.items():
                    if not gemv.covers(M, N, K):
                        continue
                    verdict = check(gemv, x, q)
                    failures += not verdict["correct"]
                    row[f"{name}_us"] = round(time_graph([lambda c=c, f=gemv: f(x, c) for c in copies]), 3)
                    row[f"{name}_correct"] = verdict["correct"]
                    row[f"{name}_max_err"] = verdict["max_err"]
                row["library_us"] = round(time_graph([lambda c=c: ops.nf4_gemv_weight(x, c) for c in copies]), 3)
                row["bf16_cublas_us"] = round(time_graph([lambda d=d: F.linear(x, d) for d in denses]), 3)
            row["pytorch_max_err"] = verdict["pytorch_max_err"] if verdict else None
            row["bar_M1"] = 3.0
            rows.append(row)
            print(json.dumps(row), flush=True)
        del copies, denses
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = list(gemvs) + ["library"]
    print(f"\n{'N x K':>13} {'M':>2} " + " ".join(f"{n + ' us':>12}" for n in names) + f" {'bf16 us':>8}  best x bf16")
    for r in rows:  # (a variant that does not take this M: "-")
        best = min(r[f"{n}_us"] for n in names if f"{n}_us" in r)
        cells = " ".join(f"{r[n + '_us']:>12.2f}" if f"{n}_us" in r else f"{'-':>12}" for n in names)
        print(f"{r['shape_NK'][0]:>6}x{r['shape_NK'][1]:<6} {r['M']:>2} {cells} {r['bf16_cublas_us']:>8.2f}  "
              f"{r['bf16_cublas_us'] / best:.2f}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
