"""4-bit linear by rows of x: the route qlora_ext takes (nf4_gemv, nf4_gemm, dequantize + linear)
against bf16 cuBLAS and bitsandbytes.

    python benchmarks/bench_nf4_gemm.py [--out results.jsonl] [--m 1 16 17 64 128 256 2048]
    python benchmarks/bench_nf4_gemm.py --tiny      # seconds-long smoke run, CPU when no GPU

For each weight shape [N, K] (bf16, block 64, double quantization) and each M it
  1. checks `ops.nf4_linear_forward` (under no_grad: the inference route) against the fp32
     reference on fresh random data (FlashAttention rule: error <= 2x plain PyTorch's in bf16,
     plus one ulp),
  2. times it (the route the defaults take), nf4_gemm wherever one of its kernels serves, whatever the route (the
     tiled kernel for 17..256 rows, the Hopper kernel from nf4_gemm_sm90_min_rows() rows where it applies), the
     dense route (dequantize + linear) past 16 rows, bf16 cuBLAS (`F.linear` with a bf16 weight), and
     bnb.matmul_4bit when importable, with bench_nf4_linear's CUDA-graph timer over weight copies
     rotating beyond the L2 cache,
  3. prints one JSON object per case and a table: median time, TFLOP/s, the route, and the speed
     ratios. Bars (issue #5): M = 1 >= 3.0x, M = 16 >= 2.5x, M = 2048 >= 0.95x of bf16 cuBLAS.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora_ext  # noqa: E402
from bench_nf4_linear import copies_for, copy_bandwidth, git_commit, max_err, time_graph, try_import_bnb  # noqa: E402
from qlora_ext import ops, reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
M_VALUES = [1, 16, 17, 64, 128, 256, 2048]
BARS = {1: 3.0, 16: 2.5, 2048: 0.95}  # speed-up over bf16 cuBLAS required at this M
TINY_SHAPES = [(256, 512)]
TINY_M = [1, 17, 300]


def time_calls(fns, device: str) -> float:
    """Median microseconds per call: CUDA graphs on a GPU, wall clock on the CPU (smoke runs)."""
    if device == "cuda":
        return time_graph(fns)
    for f in fns:
        f()
    times = []
    for i in range(5):
        start = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def weight_copies(q: qlora_ext.NF4Weight, device: str) -> list:
    n = copies_for(q.nbytes) if device == "cuda" else 1
    return [q] + [
        qlora_ext.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize,
                            copy.deepcopy(q.nested) if q.nested else None)
        for _ in range(n - 1)
    ]  # fmt: skip


def gemm_kernel_serves(x, q) -> bool:
    """Whether one of nf4_gemm's CUDA kernels computes this case (their domains, whatever the route): the tiled
    kernel for 17..256 rows, the Hopper kernel from nf4_gemm_sm90_min_rows() where it applies."""
    rows = x.numel() // x.shape[-1]
    if not (x.is_cuda and x.dtype != torch.float32 and rows > ops.NF4_GEMV_MAX_ROWS):
        return False
    hopper = rows >= ops.nf4_gemm_sm90_min_rows() >= 1 and ops.nf4_gemm_sm90_applies(x, q)
    return hopper or (rows <= ops.NF4_GEMM_MAX_ROWS and q.shape[1] % ops.NF4_GEMM_K_MULTIPLE == 0)


def gemm_kernel_name(x, q) -> str:
    """Which of nf4_gemm's kernels serves this case ("hopper" or "tiled"), where gemm_kernel_serves."""
    rows = x.numel() // x.shape[-1]
    return "hopper" if rows >= ops.nf4_gemm_sm90_min_rows() >= 1 and ops.nf4_gemm_sm90_applies(x, q) else "tiled"


def time_route(x, weights, device: str) -> float:
    """The route nf4_linear_forward takes with the defaults."""
    with torch.no_grad():
        return time_calls([lambda qi=qi: ops.nf4_linear_forward(x, qi) for qi in weights], device)


def bench_case(N, K, M, dtype, device, bnb, bnbf, env):
    torch.manual_seed(1000 * N + K + M)
    w = torch.randn(N, K, device=device, dtype=dtype) * 0.02
    x = torch.randn(M, K, device=device, dtype=dtype)
    q = qlora_ext.NF4Weight.from_float(w, blocksize=64, double_quant=True)
    w_deq = q.dequantize(dtype)
    weight_args = ops._weight_args(q)
    route = ops.linear_route(x, q)

    # ---- correctness first ------------------------------------------------------------------
    ref = reference.nf4_gemv(x, *weight_args[:4], None, *weight_args[4:])
    with torch.no_grad():
        out = ops.nf4_linear_forward(x, q)
    err = max_err(out, ref)
    base_err = max_err(torch.nn.functional.linear(x, w_deq), ref)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    correct = bool(torch.isfinite(out).all()) and err <= 2 * base_err + ulp
    if not correct:
        print(f"# FAIL correctness N={N} K={K} M={M}: err {err:.3g} vs PyTorch {base_err:.3g}", file=sys.stderr)

    # ---- ours (the route the defaults take), and the nf4_gemm kernel wherever it could serve ------
    # (Before 2026-12-06 the route column was read with NF4_GEMM_ENABLED off while "ours" was timed
    # with it on: nf4_gemm_h100.json of cc417f5 labels nf4_gemm's times at M 17..256 "dequantize +
    # linear". Since the route stops at NF4_GEMM_ROUTE_MAX_ROWS, the kernel is timed by its op.)
    weights = weight_copies(q, device)
    t_ours = time_route(x, weights, device)
    # The dense route (dequantize + linear) that the fused ones replace, past the GEMV's rows.
    t_dense = t_ours if route == ops.ROUTE_DENSE else None
    if t_dense is None and M > ops.NF4_GEMV_MAX_ROWS:
        switches = (ops.NF4_GEMM_ENABLED, ops.NF4_GEMM_SM90_ENABLED)
        ops.NF4_GEMM_ENABLED = ops.NF4_GEMM_SM90_ENABLED = False
        try:
            t_dense = time_route(x, weights, device)
        finally:
            ops.NF4_GEMM_ENABLED, ops.NF4_GEMM_SM90_ENABLED = switches
    t_gemm = None
    if gemm_kernel_serves(x, q):
        if route == ops.ROUTE_GEMM:
            t_gemm = t_ours
        else:
            with torch.no_grad():
                t_gemm = time_calls([lambda qi=qi: ops.nf4_gemm_weight(x, qi) for qi in weights], device)
    del weights

    # ---- bf16 cuBLAS on a bf16 weight ----------------------------------------------------------
    n_dense = copies_for(w_deq.numel() * w_deq.element_size()) if device == "cuda" else 1
    dense = [w_deq] + [w_deq.clone() for _ in range(n_dense - 1)]
    t_bf16 = time_calls([lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in dense], device)
    del dense

    # ---- bitsandbytes ---------------------------------------------------------------------------
    t_bnb = None
    if bnb is not None and device == "cuda":
        try:
            qw, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            n_bnb = copies_for(qw.numel() * qw.element_size())
            pairs = [(qw, state)] + [(qw.clone(), copy.deepcopy(state)) for _ in range(n_bnb - 1)]
            t_bnb = time_calls([lambda p=p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]) for p in pairs], device)
            del pairs
        except Exception as exc:  # noqa: BLE001 - report and go on without the peer
            print(f"# bitsandbytes failed on N={N} K={K} M={M}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if device == "cuda":
        torch.cuda.empty_cache()

    speedup = t_bf16 / t_ours
    return {
        **env,
        "op": "nf4_linear_forward",
        "route": route,
        "shape_NK": [N, K],
        "M": M,
        "dtype": str(dtype).removeprefix("torch."),
        "blocksize": 64,
        "double_quant": True,
        "correct": correct,
        "max_err": err,
        "pytorch_max_err": base_err,
        "median_us": round(t_ours, 3),
        "tflops": round(2 * M * N * K / (t_ours * 1e-6) / 1e12, 2),
        "bf16_cublas_us": round(t_bf16, 3),
        "speedup_vs_bf16": round(speedup, 3),
        "dense_route_us": round(t_dense, 3) if t_dense else None,
        "dense_route_speedup_vs_bf16": round(t_bf16 / t_dense, 3) if t_dense else None,
        "nf4_gemm_kernel": gemm_kernel_name(x, q) if t_gemm else None,
        "nf4_gemm_us": round(t_gemm, 3) if t_gemm else None,
        "nf4_gemm_speedup_vs_bf16": round(t_bf16 / t_gemm, 3) if t_gemm else None,
        "bar_vs_bf16": BARS.get(M),
        "meets_bar": (speedup >= BARS[M]) if M in BARS else None,
        "bnb_us": round(t_bnb, 3) if t_bnb else None,
        "speedup_vs_bnb": round(t_bnb / t_ours, 3) if t_bnb else None,
    }


def print_table(results) -> None:
    print()
    print(f"{'N x K':>13} {'M':>5} {'route':>20} {'ours us':>9} {'TFLOP/s':>8} {'bf16 us':>9} {'x bf16':>7} "
          f"{'bar':>5} {'gemm xbf16':>9} {'dense xbf16':>11} {'bnb us':>9} {'x bnb':>6} ok")  # fmt: skip
    for r in results:
        bnb_us = f"{r['bnb_us']:9.2f}" if r["bnb_us"] else f"{'-':>9}"
        x_bnb = f"{r['speedup_vs_bnb']:6.2f}" if r["speedup_vs_bnb"] else f"{'-':>6}"
        x_deq = f"{r['nf4_gemm_speedup_vs_bf16']:9.2f}" if r["nf4_gemm_speedup_vs_bf16"] else f"{'-':>9}"
        x_dense = f"{r['dense_route_speedup_vs_bf16']:11.2f}" if r["dense_route_speedup_vs_bf16"] else f"{'-':>11}"
        bar = f"{r['bar_vs_bf16']:.2f}" if r["bar_vs_bf16"] else "-"
        verdict = ("PASS" if r["meets_bar"] else "MISS") if r["meets_bar"] is not None else ""
        print(
            f"{r['shape_NK'][0]:>6}x{r['shape_NK'][1]:<6} {r['M']:>5} {r['route']:>20} {r['median_us']:9.2f} "
            f"{r['tflops']:8.2f} {r['bf16_cublas_us']:9.2f} {r['speedup_vs_bf16']:7.2f} {bar:>5} {x_deq} {x_dense} "
            f"{bnb_us} {x_bnb} {'yes' if r['correct'] else 'NO'} {verdict}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--m", type=int, nargs="+", help="rows of x (default: 1 16 17 64 128 256 2048)")
    parser.add_argument("--shapes", type=str, help="N1xK1,N2xK2,... (default: the Llama-3-8B set)")
    parser.add_argument("--tiny", action="store_true", help="one small shape, a few M; runs on the CPU too")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"] else "cpu"
    if device == "cpu" and not args.tiny:
        print("needs a CUDA GPU and a CUDA build of qlora_ext (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    m_values = args.m or (TINY_M if args.tiny else M_VALUES)
    bnb, bnbf = try_import_bnb() if device == "cuda" else (None, None)
    env = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "bitsandbytes": getattr(bnb, "__version__", None),
    }
    if device == "cuda" and not args.tiny:
        env["copy_bw_TBps"] = round(copy_bandwidth() / 1e12, 3)
    print(json.dumps(env))
    results = []
    out_file = args.out.open("w") if args.out else None
    for N, K in shapes:
        for M in m_values:
            r = bench_case(N, K, M, torch.bfloat16, device, bnb, bnbf, env)
            results.append(r)
            line = json.dumps(r)
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
    if out_file:
        out_file.close()
    print_table(results)
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
