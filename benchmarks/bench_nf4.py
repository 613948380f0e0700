"""NF4 quantize / dequantize speed, as physics: GB/s and the fraction of the measured copy bandwidth,
side by side with bitsandbytes (BENCHMARKS.md: "Method").

    python benchmarks/bench_nf4.py [--device cuda|cpu] [--out FILE.json]

CUDA: Llama-3-8B weight shapes in bf16, double-quantized (the default storage). Dequantize bytes =
codes (n/2) + 8-bit absmax codes (n/64) + nested fp32 scales + the bf16 output (2n); the bar is
>= 85% of copy bandwidth. Quantize runs NF4Weight.from_float (NF4 + double quantization).
CPU: 4096 x 4096 bf16 against the pure-PyTorch reference (the bar: dequantize >= 5x on 2 cores).

Every kernel is first checked bitwise against qlora_ext.reference on a fresh random input; a
mismatch stops the run. Prints one JSON object per case, then a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import qlora_ext
from qlora_ext import NF4Weight, codebooks, reference

CUDA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
CPU_SHAPES = [(4096, 4096)]
BLOCKSIZE = 64
DTYPE = torch.bfloat16


# ---- environment ------------------------------------------------------------------------------


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_bitsandbytes():
    """(module, version) or (None, why not)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional

        return bnb_functional, f"bitsandbytes {bitsandbytes.__version__}"
    except Exception as exc:  # any import failure means: no peer in this run
        return None, f"bitsandbytes not importable: {type(exc).__name__}: {exc}"


def environment(device: str) -> dict:
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "qlora_ext": qlora_ext.build_info(),
        "git_commit": git_commit(),
    }


# ---- timing -----------------------------------------------------------------------------------


def median_ms_cuda(fn, inputs, reps: int, warmup: int = 10) -> float:
    """Median of per-call CUDA-event times; calls rotate over `inputs` so none is served from L2.

    Before each call the GPU is kept busy (torch.cuda._sleep, ~1 ms) while the host enqueues the
    events and the call, so the interval is device time, not host launch latency. A call that
    synchronizes inside (quantize checks for NaN) still includes that wait: it is what users see.
    """
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = inputs[i % len(inputs)]
        torch.cuda._sleep(2_000_000)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_ms_cpu(fn, inputs, reps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms(device, fn, inputs, reps):
    return (median_ms_cuda if device == "cuda" else median_ms_cpu)(fn, inputs, reps)


def copies_to_defeat_l2(device: str, bytes_per_call: int) -> int:
    """How many distinct inputs to rotate over so that the working set is 3x the L2 cache."""
    if device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(2, math.ceil(3 * l2 / bytes_per_call))


def copy_bandwidth_gbps(device: str) -> tuple[float, float]:
    """Measured ceiling: a large same-device copy, bytes read + written. Returns (GB/s, ms)."""
    size = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(device, lambda s: dst.copy_(s), [src], reps=50 if device == "cuda" else 10)
    return 2 * size / ms / 1e6, ms


# ---- what is measured -------------------------------------------------------------------------


def dequantize_bytes(n: int, out_dtype: torch.dtype) -> int:
    n_blocks = -(-n // BLOCKSIZE)
    return (n + 1) // 2 + n_blocks + 4 * -(-n_blocks // 256) + n * out_dtype.itemsize


def quantize_bytes(n: int, in_dtype: torch.dtype) -> int:
    # read the weight (and the absmax vector for double quantization), write codes and scales
    n_blocks = -(-n // BLOCKSIZE)
    return n * in_dtype.itemsize + (n + 1) // 2 + 4 * n_blocks + n_blocks + 4 * n_blocks + 4 * -(-n_blocks // 256)


def check_against_reference(shape, device) -> None:
    """Bitwise check of quantize (+double quant) and dequantize on a fresh random weight."""
    weight = torch.randn(shape, device=device, dtype=DTYPE)
    q = NF4Weight.from_float(weight, blocksize=BLOCKSIZE, double_quant=True)
    packed, absmax = reference.nf4_quantize(weight, BLOCKSIZE)
    code = codebooks.dynamic_map(device=device)
    codes, absmax2 = reference.blockwise8_quantize(absmax - absmax.mean(), code, 256)
    problems = [name for name, ok in [
        ("packed codes", torch.equal(q.packed, packed)),
        ("absmax codes", torch.equal(q.absmax, codes)),
        ("nested absmax", torch.equal(q.nested.absmax2, absmax2)),
    ] if not ok]  # fmt: skip
    del weight, packed, absmax
    expected = reference.nf4_dequantize(q.packed, codes, BLOCKSIZE, shape, DTYPE, absmax2, code, q.nested.offset.reshape(1))
    if not torch.equal(q.dequantize(), expected):
        problems.append("dequantized values")
    if problems:
        sys.exit(f"bench_nf4: {shape} on {device} differs from qlora_ext.reference in: {', '.join(problems)}; not timing it")


def peer_figures(measure_ms, n_bytes, ours_ms, ceiling_gbps) -> dict:
    """The peer's time for the same work and our speedup over it; a peer that fails says why."""
    try:
        peer_ms = measure_ms()
    except Exception as exc:  # a peer without a working backend for this device must not stop the run
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    gbps = n_bytes / peer_ms / 1e6
    return {"median_ms": peer_ms, "gb_per_s": gbps, "ceiling_fraction": gbps / ceiling_gbps, "speedup": peer_ms / ours_ms}


def bench_shape(device, shape, env, ceiling_gbps, bnb_functional, peer_name, reps) -> list[dict]:
    n = math.prod(shape)
    check_against_reference(shape, device)
    cases = []

    # dequantize (double-quantized storage, bf16 out)
    d_bytes = dequantize_bytes(n, DTYPE)
    weights = [NF4Weight.from_float(torch.randn(shape, device=device, dtype=DTYPE), BLOCKSIZE, True)
               for _ in range(copies_to_defeat_l2(device, d_bytes))]  # fmt: skip
    ours_ms = median_ms(device, lambda q: q.dequantize(), weights, reps)
    peer = {"name": peer_name}
    if bnb_functional is not None:
        def bnb_dequantize_ms():
            states = [bnb_functional.quantize_4bit(q.dequantize(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True) for q in weights]
            return median_ms(device, lambda s: bnb_functional.dequantize_4bit(s[0], s[1]), states, reps)

        peer.update(peer_figures(bnb_dequantize_ms, d_bytes, ours_ms, ceiling_gbps))
    else:
        peer["skipped"] = "not importable"
    del weights
    if device == "cpu":
        q = NF4Weight.from_float(torch.randn(shape, dtype=DTYPE), BLOCKSIZE, True)
        ref_ms = median_ms(device, lambda q: reference.nf4_dequantize(
            q.packed, q.absmax, BLOCKSIZE, shape, DTYPE, q.nested.absmax2, q.nested.code, q.nested.offset.reshape(1)),
            [q], max(3, reps // 4))  # fmt: skip
        reference_figure = {"median_ms": ref_ms, "speedup": ref_ms / ours_ms}
    cases.append({
        **env, "case": "nf4_dequantize", "shape": list(shape), "dtype": "bfloat16", "blocksize": BLOCKSIZE,
        "double_quant": True, "median_ms": ours_ms, "bytes": d_bytes, "gb_per_s": d_bytes / ours_ms / 1e6,
        "ceiling_gb_per_s": ceiling_gbps, "ceiling_fraction": d_bytes / ours_ms / 1e6 / ceiling_gbps, "peer": peer,
        **({"reference": reference_figure} if device == "cpu" else {}),
    })  # fmt: skip

    # quantize + double quantization
    q_bytes = quantize_bytes(n, DTYPE)
    inputs = [torch.randn(shape, device=device, dtype=DTYPE) for _ in range(copies_to_defeat_l2(device, q_bytes))]
    ours_ms = median_ms(device, lambda w: NF4Weight.from_float(w, BLOCKSIZE, True), inputs, reps)
    peer = {"name": peer_name}
    if bnb_functional is not None:
        def bnb_quantize_ms():
            return median_ms(device, lambda w: bnb_functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True), inputs, reps)

        peer.update(peer_figures(bnb_quantize_ms, q_bytes, ours_ms, ceiling_gbps))
    else:
        peer["skipped"] = "not importable"
    if device == "cpu":
        def reference_quantize(w):
            _, absmax = reference.nf4_quantize(w, BLOCKSIZE)
            return reference.blockwise8_quantize(absmax - absmax.mean(), codebooks.dynamic_map(), 256)

        ref_ms = median_ms(device, reference_quantize, inputs[:1], max(3, reps // 4))
        reference_figure = {"median_ms": ref_ms, "speedup": ref_ms / ours_ms}
    cases.append({
        **env, "case": "nf4_quantize_double_quant", "shape": list(shape), "dtype": "bfloat16", "blocksize": BLOCKSIZE,
        "double_quant": True, "median_ms": ours_ms, "bytes": q_bytes, "gb_per_s": q_bytes / ours_ms / 1e6,
        "ceiling_gb_per_s": ceiling_gbps, "ceiling_fraction": q_bytes / ours_ms / 1e6 / ceiling_gbps, "peer": peer,
        **({"reference": reference_figure} if device == "cpu" else {}),
    })  # fmt: skip
    del inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return cases


def table(cases: list[dict]) -> str:
    lines = [f"{'case':<26} {'shape':>12} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'bnb ms':>9} {'vs bnb':>7} {'vs ref':>7}"]
    for c in cases:
        peer, ref = c["peer"], c.get("reference", {})
        lines.append(
            f"{c['case']:<26} {'x'.join(map(str, c['shape'])):>12} {c['median_ms']:>9.3f} {c['gb_per_s']:>8.1f} "
            f"{c['ceiling_fraction']:>7.1%} {peer.get('median_ms', float('nan')):>9.3f} "
            f"{peer.get('speedup', float('nan')):>6.2f}x {ref.get('speedup', float('nan')):>6.1f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write every case as a JSON list to this file")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 100 cuda / 20 cpu)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_nf4: --device cuda but no CUDA device is visible")
    if device == "cuda" and not qlora_ext.build_info()["with_cuda"]:
        sys.exit("bench_nf4: the extension was built without CUDA")
    reps = args.reps or (100 if device == "cuda" else 20)
    torch.manual_seed(0)

    env = environment(device)
    bnb_functional, peer_name = load_bitsandbytes()
    if bnb_functional is None:
        print(f"# peer skipped: {peer_name}", file=sys.stderr)
    ceiling_gbps, copy_ms = copy_bandwidth_gbps(device)
    cases = [{**env, "case": "copy_ceiling", "median_ms": copy_ms, "gb_per_s": ceiling_gbps}]
    print(json.dumps(cases[0]), flush=True)
    for shape in CUDA_SHAPES if device == "cuda" else CPU_SHAPES:
        for case in bench_shape(device, shape, env, ceiling_gbps, bnb_functional, peer_name, reps):
            print(json.dumps(case), flush=True)
            cases.append(case)

    print(f"\n{env['device_name']}, torch {env['torch']}, {env['threads']} threads, copy ceiling {ceiling_gbps:.1f} GB/s; "
          f"peer: {peer_name}; commit {env['git_commit'][:12]}")  # fmt: skip
    print(table(cases[1:]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
