"""Large-M 4-bit linear forward (issue #5's M = 2048 bar) by dequantizing the weight in row chunks
into a reused buffer, each chunk's product written into its columns of y.

    python benchmarks/bench_dense_chunks.py [--m 2048] [--chunks 1024 2048 4096] [--out r.jsonl]
    python benchmarks/bench_dense_chunks.py --tiny     # seconds-long smoke run (CPU when no GPU)

Why: the dense route dequantizes the whole weight (2 B a weight written at copy bandwidth) and then
calls cuBLAS; at 0.83-0.88x of bf16 cuBLAS (`nf4_gemm_h100.json`) the dequantization is the gap. A
chunk of at most a few MB of bf16 may stay in the L2 cache between its dequantization and its
GEMM, so that it costs an L2 write and read instead of an HBM round trip. Chunks add kernel tails
and smaller GEMMs, so whether it pays is measured here, per shape, against

  - bf16 cuBLAS on a bf16 weight (the bar's yardstick), weights rotating beyond the L2 cache,
  - the dense route as it is (`ops.nf4_linear_forward` under no_grad),
  - the dequantization alone into a reused buffer, and cuBLAS alone on that buffer,
  - chunked, serial: dequantize chunk i, then its GEMM,
  - chunked, two streams: chunk i + 1 dequantizes on a side stream while chunk i multiplies
    (two buffers), which shows whether the dequantization can run beside cuBLAS at all.

Every chunked result is checked against the fp32 reference with the FlashAttention rule first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora_ext  # noqa: E402
from bench_nf4_gemm import time_calls, weight_copies  # noqa: E402
from bench_nf4_linear import copies_for, git_commit, max_err  # noqa: E402
from qlora_ext import ops, reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
TINY_SHAPES = [(512, 256)]


def row_chunk_args(q: qlora_ext.NF4Weight, n0: int, n1: int) -> tuple:
    """nf4_dequantize_into's weight arguments for rows [n0, n1) of q: views, no copies. The row range
    must start on a nested-scale boundary (n0·K a multiple of blocksize · nested blocksize)."""
    K = q.shape[1]
    b0, b1 = n0 * K // q.blocksize, n1 * K // q.blocksize
    packed = q.packed[n0 * K // 2 : n1 * K // 2]
    absmax = q.absmax[b0:b1]
    if q.nested is None:
        return packed, absmax, q.blocksize, None, None, None, 256
    nb = q.nested.blocksize
    if b0 % nb:
        raise ValueError(f"row {n0} does not start a nested scale block")
    return (packed, absmax, q.blocksize, q.nested.absmax2[b0 // nb : -(-b1 // nb)], q.nested.code,
            q.nested.offset.reshape(1), nb)  # fmt: skip


def chunk_bounds(N: int, K: int, chunk_rows: int, q: qlora_ext.NF4Weight) -> list[tuple[int, int]]:
    align = q.blocksize * (q.nested.blocksize if q.nested else 1)
    step = chunk_rows
    while (step * K) % align:
        step += 1
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def chunked_serial(x, q, buf, bounds):
    y = x.new_empty(x.shape[0], q.shape[0])
    for n0, n1 in bounds:
        w = buf[: n1 - n0]
        ops.nf4_dequantize_into(w, *row_chunk_args(q, n0, n1))
        torch.mm(x, w.t(), out=y[:, n0:n1])
    return y


def chunked_two_streams(x, q, bufs, bounds, side):
    """Chunk i + 1 dequantizes on `side` while chunk i multiplies on the current stream."""
    main = torch.cuda.current_stream()
    y = x.new_empty(x.shape[0], q.shape[0])
    ready = [torch.cuda.Event() for _ in bounds]
    side.wait_stream(main)

    def dequantize(i):
        n0, n1 = bounds[i]
        with torch.cuda.stream(side):
            ops.nf4_dequantize_into(bufs[i % 2][: n1 - n0], *row_chunk_args(q, n0, n1))
            ready[i].record(side)

    # Enqueued in dependency order: a buffer's next dequantization waits for the GEMM that read it
    # (an event must be recorded before a wait on it is enqueued, or the wait is a no-op; the
    # first run of this benchmark, 2026-12-07, got that wrong and raced: its two-stream rows).
    for i in range(min(2, len(bounds))):
        dequantize(i)
    for i, (n0, n1) in enumerate(bounds):
        main.wait_event(ready[i])
        torch.mm(x, bufs[i % 2][: n1 - n0].t(), out=y[:, n0:n1])
        if i + 2 < len(bounds):
            side.wait_stream(main)  # buffer i % 2 has been read
            dequantize(i + 2)
    main.wait_stream(side)
    return y


def bench_shape(N, K, M, dtype, device, chunk_list, env):
    torch.manual_seed(N + 7 * K + M)
    w = torch.randn(N, K, device=device, dtype=dtype) * 0.02
    x = torch.randn(M, K, device=device, dtype=dtype)
    q = qlora_ext.NF4Weight.from_float(w, blocksize=64, double_quant=True)
    w_deq = q.dequantize(dtype)
    ref = reference.nf4_gemv(x, *ops._weight_args(q)[:4], None, *ops._weight_args(q)[4:])
    base_err = max_err(torch.nn.functional.linear(x, w_deq), ref)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    rows = []
    weights = weight_copies(q, device)

    def record(name, t, err=None, **extra):
        row = {**env, "shape_NK": [N, K], "M": M, "dtype": str(dtype).replace("torch.", ""), "case": name,
               "median_us": round(t, 3), **extra}  # fmt: skip
        if err is not None:
            row.update(max_err=err, pytorch_max_err=base_err, correct=bool(err <= 2 * base_err + ulp))
        rows.append(row)

    n_dense = copies_for(w_deq.numel() * w_deq.element_size()) if device == "cuda" else 1
    dense = [w_deq] + [w_deq.clone() for _ in range(n_dense - 1)]
    t_bf16 = time_calls([lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in dense], device)
    del dense
    record("bf16_cublas", t_bf16)
    with torch.no_grad():
        err = max_err(ops.nf4_linear_forward(x, q), ref)
        t = time_calls([lambda qi=qi: ops.nf4_linear_forward(x, qi) for qi in weights], device)
    record("dense_route", t, err, vs_bf16=round(t_bf16 / t, 3))
    buf = torch.empty(N, K, device=device, dtype=dtype)
    t = time_calls([lambda qi=qi: ops.nf4_dequantize_into(buf, *row_chunk_args(qi, 0, N)) for qi in weights], device)
    record("dequantize_alone", t)
    t = time_calls([lambda: torch.mm(x, buf.t())], device)
    record("cublas_alone_one_buffer", t)
    del buf
    side = torch.cuda.Stream() if device == "cuda" else None
    for chunk_rows in chunk_list:
        if chunk_rows >= N:
            continue
        bounds = chunk_bounds(N, K, chunk_rows, q)
        rows_max = max(n1 - n0 for n0, n1 in bounds)
        buf = torch.empty(rows_max, K, device=device, dtype=dtype)
        err = max_err(chunked_serial(x, q, buf, bounds), ref)
        t = time_calls([lambda qi=qi: chunked_serial(x, qi, buf, bounds) for qi in weights], device)
        record(f"chunked_serial_{rows_max}", t, err, vs_bf16=round(t_bf16 / t, 3), chunks=len(bounds))
        if side is not None:
            bufs = [buf, torch.empty_like(buf)]
            err = max_err(chunked_two_streams(x, q, bufs, bounds, side), ref)
            torch.cuda.synchronize()
            t = time_calls([lambda qi=qi: chunked_two_streams(x, qi, bufs, bounds, side) for qi in weights], device)
            record(f"chunked_two_streams_{rows_max}", t, err, vs_bf16=round(t_bf16 / t, 3), chunks=len(bounds))
            del bufs
        del buf
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--out", type=Path)
    p.add_argument("--tiny", action="store_true", help="one small shape, seconds (CPU when no GPU)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        p.error("needs a GPU (use --tiny for a CPU smoke run)")
    dtype = torch.bfloat16
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "commit": git_commit()}  # fmt: skip
    shapes = TINY_SHAPES if args.tiny else SHAPES
    chunk_list = [128, 256] if args.tiny else args.chunks
    m = 96 if args.tiny else args.m
    out = args.out.open("w") if args.out else None
    failures = 0
    print(f"{'N x K':>13} {'case':>28} {'us':>9} {'vs bf16':>8} correct")
    for N, K in shapes:
        for row in bench_shape(N, K, m, dtype, device, chunk_list, env):
            failures += row.get("correct") is False
            print(f"{N:>6}x{K:<6} {row['case']:>28} {row['median_us']:>9.2f} {row.get('vs_bf16', ''):>8} "
                  f"{row.get('correct', '')}")  # fmt: skip
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    if out:
        out.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
