"""The floor under a 4-bit GEMV: how fast can ONE kernel only read the bytes it must read?

    python benchmarks/bench_read_floor.py [--out FILE.json]

For each of BENCHMARKS.md's four weight shapes [N, K] at M = 1, a pure streaming-read kernel
(16-byte non-caching loads, xor-folded, nothing written unless the fold hits a magic value) reads
exactly the bytes of the NF4 weight with double quantization (codes N·K/2, 8-bit scales N·K/64,
the nested fp32 scales and map) and, for comparison, the bytes of the bf16 weight (2·N·K). It is
timed the way bench_nf4_linear.py times the GEMVs: CUDA-graph replays of many calls rotating over
enough copies that the set is 4x the L2 cache, median per call. The best of a sweep of launch shapes
(threads per CTA, CTAs per SM, loads in flight per thread) is the floor.

What it says: no kernel that reads the NF4 bytes once can beat `nf4_read_us`, so
bf16_cublas_us / nf4_read_us is the largest speed-up over bf16 cuBLAS any NF4 GEMV can show in
this method, and read GB/s / copy GB/s the largest "fraction of copy bandwidth". At small
weights the fixed cost of a launch (ramp-up and drain, ~2-3 us) is a large part of both.
bf16 cuBLAS is timed here too (torch.mv-shaped F.linear), so the ratios come from one run.

The kernel is compiled at run time with CuPy (on the GPU machine's image); without CuPy the script
says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import qlora_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4_linear import SHAPES, copies_for, copy_bandwidth, git_commit, time_graph  # noqa: E402

KERNEL = r"""
extern "C" __global__ void read_floor(const uint4* __restrict__ p, long long n16, unsigned* out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + (UNROLL - 1) * stride < n16; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint4* q = p + i + u * stride;
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(q));
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; practically never taken
}
"""


# The GEMV's own access pattern without its arithmetic (`--patterns`): what "factored" could read
# at best with its tiles, its lanes' load width and its loads in flight. 256 threads (8 warps) a CTA,
# a persistent grid of CTAS per SM, 16-row tiles; the warps split a tile's row length in steps of
# 128 bytes a row (256 k, SEG 4). Lane (g, t) reads rows g and g + 8 of the tile: LOADB 8 as the
# kernel does (8 bytes at 8t + 32s, s < 4: one 32-byte sector of a row per 4-lane group and
# instruction), LOADB 16 the same bytes as 16-byte loads (16t + 64s, s < 2). DEPTH steps' loads are
# issued before any is used (the kernel's prefetch of the next step is DEPTH 2). A __syncthreads
# after each tile stands for the kernel's per-tile reduction.
PATTERN_KERNEL = r"""
// The fold as volatile asm, so that NVVM keeps it after every load above it. ptxas may still
// interleave: LOADB 16 with DEPTH 4 compiles to 43 registers, fewer than its 64 bytes of loads a
// lane, so not all of them are in flight at once there: its rows in read_floor_patterns_h100.json
// measure less depth than they name.
#define FOLD(acc, v) asm volatile("xor.b32 %0, %0, %1;" : "+r"(acc) : "r"(v))
extern "C" __global__ void read_tiles(const unsigned char* __restrict__ p, long long n_rows,
                                      long long row_bytes, unsigned* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const long long n_tiles = n_rows / 16, n_steps = row_bytes / 128;
  unsigned acc = 0;
  for (long long tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const unsigned char* r0 = p + (tile * 16 + g) * row_bytes;
    const unsigned char* r1 = r0 + 8 * row_bytes;
    for (long long step = warp; step < n_steps; step += 8 * DEPTH) {
#if LOADB == 8
      uint2 v[DEPTH][8];
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const long long off = (step + 8 * d < n_steps ? step + 8 * d : step) * 128;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
                       : "=r"(v[d][s].x), "=r"(v[d][s].y) : "l"(r0 + off + 32 * s + 8 * t));
          asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
                       : "=r"(v[d][4 + s].x), "=r"(v[d][4 + s].y) : "l"(r1 + off + 32 * s + 8 * t));
        }
      }
#pragma unroll
      for (int d = 0; d < DEPTH; ++d)
#pragma unroll
        for (int s = 0; s < 8; ++s) FOLD(acc, v[d][s].x ^ v[d][s].y);
#else
      uint4 v[DEPTH][4];
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const long long off = (step + 8 * d < n_steps ? step + 8 * d : step) * 128;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(v[d][s].x), "=r"(v[d][s].y), "=r"(v[d][s].z), "=r"(v[d][s].w)
                       : "l"(r0 + off + 64 * s + 16 * t));
          asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                       : "=r"(v[d][2 + s].x), "=r"(v[d][2 + s].y), "=r"(v[d][2 + s].z), "=r"(v[d][2 + s].w)
                       : "l"(r1 + off + 64 * s + 16 * t));
        }
      }
#pragma unroll
      for (int d = 0; d < DEPTH; ++d)
#pragma unroll
        for (int s = 0; s < 4; ++s) FOLD(acc, v[d][s].x ^ v[d][s].y ^ v[d][s].z ^ v[d][s].w);
#endif
    }
    __syncthreads();
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"""
PATTERNS = [(loadb, depth, ctas) for loadb in (8, 16) for depth in (1, 2, 4) for ctas in (2, 4, 8)]


def pattern_us(cupy, n: int, k: int) -> dict:
    """Median µs of the GEMV's access pattern over the codes of an [n, k] weight, per (LOADB, DEPTH,
    CTAS per SM)."""
    row_bytes = k // 2
    nbytes = n * row_bytes
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_() for _ in range(copies_for(nbytes))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = cupy.zeros(1, dtype=cupy.uint32)
    out = {}
    for loadb, depth, ctas in PATTERNS:
        kernel = cupy.RawKernel(PATTERN_KERNEL, "read_tiles", options=(f"-DLOADB={loadb}", f"-DDEPTH={depth}"))

        def read(buf, kernel=kernel, ctas=ctas):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            kernel((min(sms * ctas, n // 16),), (256,), (buf.data_ptr(), cupy.int64(n), cupy.int64(row_bytes), sink),
                   stream=stream)  # fmt: skip

        out[f"load{loadb}_depth{depth}_ctas{ctas}"] = round(time_graph([lambda b=b: read(b) for b in bufs], reps=15), 3)
    del bufs
    return out


def make_reader(cupy, unroll: int, threads: int, ctas_per_sm: int):
    kernel = cupy.RawKernel(KERNEL, "read_floor", options=(f"-DUNROLL={unroll}",))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = cupy.zeros(1, dtype=cupy.uint32)

    def read(buf: torch.Tensor):
        n16 = buf.numel() // 16
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        grid = min(sms * ctas_per_sm, max(1, -(-n16 // threads)))
        kernel((grid,), (threads,), (buf.data_ptr(), cupy.int64(n16), sink), stream=stream)

    return read


def best_read_us(cupy, nbytes: int) -> tuple[float, dict]:
    nbytes = -(-nbytes // 16) * 16
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_() for _ in range(copies_for(nbytes))]
    best, best_cfg = float("inf"), {}
    for unroll in (2, 4, 8):
        for threads in (256, 512, 1024):
            for ctas in (1, 2, 4, 8):
                if threads * ctas > 2048:
                    continue
                read = make_reader(cupy, unroll, threads, ctas)
                us = time_graph([lambda b=b: read(b) for b in bufs], reps=15)
                if us < best:
                    best, best_cfg = us, dict(unroll=unroll, threads=threads, ctas_per_sm=ctas)
    del bufs
    return best, best_cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--patterns", action="store_true",
                        help="also time the GEMV's own access pattern (tiles, load width, depth, CTAs a SM)")
    args = parser.parse_args()
    try:
        import cupy
    except ImportError:
        sys.exit("bench_read_floor: needs CuPy (the GPU machine's image has it)")
    copy_bw = copy_bandwidth()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=git_commit(),
               copy_bw_TBps=round(copy_bw / 1e12, 3))  # fmt: skip
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16)]
        ws = [w] + [w.clone() for _ in range(copies_for(2 * n * k) - 1)]
        bf16_us = time_graph([lambda w=w: F.linear(xs[0], w) for w in ws])
        nf4_bytes = qlora_ext.NF4Weight.from_float(w, 64, True).nbytes  # codes and every scale, as the GEMV reads
        del ws, w
        nf4_us, nf4_cfg = best_read_us(cupy, nf4_bytes)
        bf16_read_us, bf16_cfg = best_read_us(cupy, 2 * n * k)
        row = dict(env, shape_NK=[n, k], M=1, nf4_bytes=nf4_bytes, nf4_read_us=round(nf4_us, 3), nf4_read_cfg=nf4_cfg,
                   nf4_read_fraction_of_copy=round(nf4_bytes / (nf4_us * 1e-6) / copy_bw, 3),
                   bf16_read_us=round(bf16_read_us, 3), bf16_read_cfg=bf16_cfg, bf16_cublas_us=round(bf16_us, 3),
                   max_speedup_vs_bf16=round(bf16_us / nf4_us, 3), bar_M1=3.0)  # fmt: skip
        if args.patterns:
            row["codes_pattern_us"] = pattern_us(cupy, n, k)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\nread floor, one kernel per call, graph replays; {env['device']}, copy {env['copy_bw_TBps']} TB/s")
    print(f"{'shape':>12} {'NF4 MB':>8} {'NF4 read us':>12} {'%copy':>6} {'bf16 read us':>13} {'bf16 cuBLAS us':>15} {'max x bf16':>10}")
    for r in rows:
        print(f"{r['shape_NK'][0]:>5}x{r['shape_NK'][1]:<6} {r['nf4_bytes'] / 1e6:>8.2f} {r['nf4_read_us']:>12.2f} "
              f"{100 * r['nf4_read_fraction_of_copy']:>5.0f}% {r['bf16_read_us']:>13.2f} {r['bf16_cublas_us']:>15.2f} "
              f"{r['max_speedup_vs_bf16']:>10.2f}")  # fmt: skip
    for r in rows:
        if "codes_pattern_us" in r:
            print(f"\nthe GEMV's access pattern over the codes of {r['shape_NK'][0]}x{r['shape_NK'][1]} "
                  f"(floor {r['nf4_read_us']:.2f} us for codes and scales):")
            for name, us in sorted(r["codes_pattern_us"].items(), key=lambda kv: kv[1]):
                print(f"  {name:<24} {us:>8.2f} us")


if __name__ == "__main__":
    main()
