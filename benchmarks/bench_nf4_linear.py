"""4-bit linear at decode sizes: qlora_ext's fused nf4_gemv against bf16 cuBLAS and bitsandbytes.

    python benchmarks/bench_nf4_linear.py [--out results.jsonl] [--m 1 16] [--dtype bfloat16]
        [--variants mma,factored,...|all]

With --variants, nf4_gemv is timed once per CUDA kernel variant (ops.nf4_gemv_variants()), all in
this process against the same cuBLAS / bitsandbytes timings; each JSON line names its variant.

For each weight shape [N, K] and each M (rows of x) it
  1. checks every contender against the fp32 reference on fresh random data (ours must pass the
     FlashAttention rule: error <= 2x that of plain PyTorch in the same dtype, plus one ulp),
  2. times each one with CUDA events around a CUDA graph of many calls (so host launch overhead,
     not the kernel, cannot dominate microsecond kernels), rotating among enough weight copies
     that the set is 4x the L2 cache, and reports the median over repetitions,
  3. prints one JSON object per case and a table last: median time, achieved DRAM bandwidth
     (bytes each must move, once, over its time), its fraction of the measured device-copy
     bandwidth (read + write), and the speed ratios. The bars (BENCHMARKS.md): M = 1 >= 3.0x and
     M = 16 >= 2.5x faster than bf16 cuBLAS.
bitsandbytes is timed when importable (bnb.matmul_4bit, which takes its gemv_4bit kernel for one
row), and skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import qlora_ext
from qlora_ext import ops, reference

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
BARS = {1: 3.0, 16: 2.5}  # speed-up over bf16 cuBLAS required at this M


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def copies_for(bytes_per_copy: int) -> int:
    """Weight copies to rotate among so that the set is 4x the L2 cache (at least 2)."""
    return max(2, math.ceil(4 * l2_bytes() / max(bytes_per_copy, 1)))


def time_graph(fns, reps: int = 30, calls_per_rep: int | None = None) -> float:
    """Median microseconds per call of `fns` (called round-robin), from CUDA-graph replays.

    Falls back to eager launches when a function cannot be captured.
    """
    calls = calls_per_rep or max(len(fns), 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up: module load, handles, workspaces
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def run_calls():
        for i in range(calls):
            fns[i % len(fns)]()

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run_calls()
        replay = graph.replay
    except Exception as exc:  # noqa: BLE001 - any capture failure: time eagerly instead
        print(f"# note: CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly", file=sys.stderr)
        torch.cuda.synchronize()
        replay = run_calls
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: the median
    of ten 1 GiB copies, each launched eagerly and timed with events.

    Not from a CUDA graph: captured, the same copy ran at 2.43-2.45 TB/s on the H100 against
    2.95-3.0 TB/s launched eagerly (every `*_h100.json` of this script and its importers before
    2026-12-07's session 23 used the graph figure; bench_decode.py always used this one)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    return 2 * n / statistics.median(times)


def nf4_bytes(weight: qlora_ext.NF4Weight) -> int:
    return weight.nbytes


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref).abs().max().item()


def try_import_bnb():
    try:
        import bitsandbytes as bnb  # noqa: PLC0415
        import bitsandbytes.functional as bnbf  # noqa: PLC0415

        return bnb, bnbf
    except Exception as exc:  # noqa: BLE001 - any import problem means "peer not available"
        print(f"# bitsandbytes not importable ({type(exc).__name__}: {exc}): peer skipped", file=sys.stderr)
        return None, None


def bench_case(N, K, M, dtype, blocksize, double_quant, copy_bw, bnb, bnbf, env, variants=(None,)):
    """One JSON-ready dict per variant (None: whatever variant is selected now)."""
    torch.manual_seed(1000 * N + K + M)
    w = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    q = qlora_ext.NF4Weight.from_float(w, blocksize=blocksize, double_quant=double_quant)
    w_deq = q.dequantize(dtype)
    weight_args = ops._weight_args(q)
    # The exact product (fp32 weight); PyTorch's error in x's dtype includes rounding W to it.
    ref = reference.nf4_gemv(x, *weight_args[:4], None, *weight_args[4:])
    base_err = max_err(torch.nn.functional.linear(x, w_deq), ref)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()

    our_bytes = nf4_bytes(q) + x.numel() * x.element_size() + M * N * x.element_size()
    n_ours = copies_for(nf4_bytes(q))
    ours = [q] + [
        qlora_ext.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize,
                            copy.deepcopy(q.nested) if q.nested else None)
        for _ in range(n_ours - 1)
    ]  # fmt: skip
    our_fns = []
    for qi in ours:
        args = ops._weight_args(qi)
        our_fns.append(lambda a=args: torch.ops.qlora_ext.nf4_gemv(x, *a[:4], None, *a[4:]))

    per_variant = []
    before = ops.nf4_gemv_variant()
    try:
        for variant in variants:
            if variant is not None:
                ops.set_nf4_gemv_variant(variant)
            # ---- correctness first ------------------------------------------------------------
            out = ops.nf4_gemv(x, *weight_args[:4], None, *weight_args[4:])
            torch.cuda.synchronize()
            err = max_err(out, ref)
            correct = bool(torch.isfinite(out).all()) and err <= 2 * base_err + ulp
            name = ops.nf4_gemv_variant()
            if not correct:
                print(f"# FAIL correctness N={N} K={K} M={M} variant={name}: err {err:.3g} vs PyTorch {base_err:.3g}",
                      file=sys.stderr)  # fmt: skip
            # ---- timing (the graph captures the variant selected now) --------------------------
            per_variant.append((name, correct, err, time_graph(our_fns)))
    finally:
        ops.set_nf4_gemv_variant(before)
    del ours, our_fns

    # ---- bf16 cuBLAS on the dequantized weight --------------------------------------------------
    dense_bytes = w_deq.numel() * w_deq.element_size() + x.numel() * x.element_size() + M * N * x.element_size()
    n_dense = copies_for(w_deq.numel() * w_deq.element_size())
    dense = [w_deq] + [w_deq.clone() for _ in range(n_dense - 1)]
    t_dense = time_graph([lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in dense])
    del dense

    # ---- bitsandbytes ---------------------------------------------------------------------------
    t_bnb = bnb_err = None
    if bnb is not None:
        try:
            qw, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
            bnb_out = bnb.matmul_4bit(x, qw.t(), quant_state=state)
            torch.cuda.synchronize()
            bnb_err = max_err(bnb_out, ref)
            n_bnb = copies_for(qw.numel() * qw.element_size())
            pairs = [(qw, state)] + [(qw.clone(), copy.deepcopy(state)) for _ in range(n_bnb - 1)]
            t_bnb = time_graph([lambda p=p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]) for p in pairs])
            del pairs
        except Exception as exc:  # noqa: BLE001 - report and go on without the peer
            print(f"# bitsandbytes failed on N={N} K={K} M={M}: {type(exc).__name__}: {exc}", file=sys.stderr)
    torch.cuda.empty_cache()

    return [
        case_result(N, K, M, dtype, blocksize, double_quant, copy_bw, env, name, correct, err, base_err, t_ours,
                    our_bytes, n_ours, t_dense, dense_bytes, t_bnb, bnb_err)
        for name, correct, err, t_ours in per_variant
    ]  # fmt: skip


def case_result(N, K, M, dtype, blocksize, double_quant, copy_bw, env, variant, correct, err, base_err, t_ours,
                our_bytes, n_ours, t_dense, dense_bytes, t_bnb, bnb_err):  # fmt: skip
    speedup = t_dense / t_ours
    result = {
        **env,
        "op": "nf4_gemv",
        "variant": variant,
        "shape_NK": [N, K],
        "M": M,
        "dtype": str(dtype).removeprefix("torch."),
        "blocksize": blocksize,
        "double_quant": double_quant,
        "correct": correct,
        "max_err": err,
        "pytorch_max_err": base_err,
        "median_us": round(t_ours, 3),
        "bytes": our_bytes,
        "GBps": round(our_bytes / (t_ours * 1e-6) / 1e9, 1),
        "copy_bw_fraction": round(our_bytes / (t_ours * 1e-6) / copy_bw, 3),
        "tflops": round(2 * M * N * K / (t_ours * 1e-6) / 1e12, 2),
        "weight_copies": n_ours,
        "bf16_cublas_us": round(t_dense, 3),
        "bf16_cublas_GBps": round(dense_bytes / (t_dense * 1e-6) / 1e9, 1),
        "speedup_vs_bf16": round(speedup, 3),
        "bar_vs_bf16": BARS.get(M),
        "meets_bar": (speedup >= BARS[M]) if M in BARS else None,
        "bnb_us": round(t_bnb, 3) if t_bnb else None,
        "bnb_max_err": bnb_err,
        "bnb_speedup_vs_bf16": round(t_dense / t_bnb, 3) if t_bnb else None,
        "speedup_vs_bnb": round(t_bnb / t_ours, 3) if t_bnb else None,
    }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows of x (<= 16)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--shapes", type=str, help="N1xK1,N2xK2,... (default: the Llama-3-8B set)")
    parser.add_argument("--variants", type=str,
                        help="nf4_gemv CUDA kernel variants to time, comma-separated names or 'all' "
                             "(default: the one selected, i.e. the library default)")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if not qlora_ext.build_info()["with_cuda"]:
        print("qlora_ext was built without CUDA: rebuild with a CUDA toolkit and CUDA torch", file=sys.stderr)
        return 2
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtype = getattr(torch, args.dtype)
    variants = [None]
    if args.variants:
        known = ops.nf4_gemv_variants()
        variants = known if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in known]
        if unknown:
            print(f"unknown variants {unknown}; this build has {known}", file=sys.stderr)
            return 2
    bnb, bnbf = try_import_bnb()

    copy_bw = copy_bandwidth()
    env = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "bitsandbytes": getattr(bnb, "__version__", None),
        "copy_bw_TBps": round(copy_bw / 1e12, 3),
    }
    print(json.dumps({"measured_copy_bandwidth_TBps": env["copy_bw_TBps"], **env}))
    results = []
    out_file = args.out.open("w") if args.out else None
    for N, K in shapes:
        for M in args.m:
            for r in bench_case(N, K, M, dtype, args.blocksize, not args.no_double_quant, copy_bw, bnb, bnbf, env,
                                variants):  # fmt: skip
                results.append(r)
                line = json.dumps(r)
                print(line, flush=True)
                if out_file:
                    out_file.write(line + "\n")
    if out_file:
        out_file.close()

    print()
    print(f"{'N x K':>13} {'M':>3} {'variant':>15} {'ours us':>9} {'GB/s':>7} {'%copy':>6} {'bf16 us':>9} "
          f"{'x bf16':>7} {'bar':>5} {'bnb us':>9} {'x bnb':>6} ok")  # fmt: skip
    for r in results:
        bnb_us = f"{r['bnb_us']:9.2f}" if r["bnb_us"] else f"{'-':>9}"
        x_bnb = f"{r['speedup_vs_bnb']:6.2f}" if r["speedup_vs_bnb"] else f"{'-':>6}"
        bar = f"{r['bar_vs_bf16']:.1f}" if r["bar_vs_bf16"] else "-"
        verdict = ("PASS" if r["meets_bar"] else "MISS") if r["meets_bar"] is not None else ""
        print(
            f"{r['shape_NK'][0]:>6}x{r['shape_NK'][1]:<6} {r['M']:>3} {r['variant']:>15} {r['median_us']:9.2f} {r['GBps']:7.0f} "
            f"{100 * r['copy_bw_fraction']:5.1f}% {r['bf16_cublas_us']:9.2f} {r['speedup_vs_bf16']:7.2f} "
            f"{bar:>5} {bnb_us} {x_bnb} {'yes' if r['correct'] else 'NO'} {verdict}"
        )
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
