"""Where the M = 1 GEMV loses time on small weights: its time against the weight's size.

At M = 1 the ring reaches 3.13x bf16 at 28672 x 8192 but 2.19x at 4096 x 4096 (H100, session 25), where the 3x
bar asks 5.3 us against a 4.3 us pure read. This times nf4_gemv ("auto": the ring at M = 1, programmatic launch
off) and bf16 cuBLAS on the dequantized weight for K = 4096 and 14336 and N from a few SM rounds of 16-row tiles
up to the largest shapes, with bench_nf4_linear's method (CUDA-graph replays over rotating copies, 4x L2), and
fits time = fixed + bytes / bandwidth by least squares to each. The fixed part is what the launch, the first
DRAM round trip and the tail cost, the slope's bandwidth the streaming rate: which of the two keeps the small
shapes from the bar decides what to change next (docs/nf4_gemv_m16.md, session 26).

    python benchmarks/gpu_checks/gemv_scaling.py [--out gemv_scaling.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import qlora_ext  # noqa: E402
from bench_nf4_linear import copies_for, git_commit, nf4_bytes, time_graph  # noqa: E402
from qlora_ext import ops  # noqa: E402

# N for each K: from 512 rows (32 tiles, a fraction of one round) to the shapes
SIZES = {
    4096: [512, 1024, 2048, 4096, 6144, 8192, 14336, 20480, 28672],
    14336: [1024, 2048, 4096, 8192],
}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return mean_y - slope * mean_x, slope


def time_case(N: int, K: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(N * 100003 + K)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = qlora_ext.NF4Weight.from_float(w)
    weights = [q] + [
        qlora_ext.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize, copy.deepcopy(q.nested))
        for _ in range(copies_for(nf4_bytes(q)) - 1)
    ]
    ours = time_graph([lambda wi=wi: ops.nf4_gemv_weight(x, wi) for wi in weights])
    dense_w = q.dequantize(torch.bfloat16)
    dense = [dense_w] + [dense_w.clone() for _ in range(copies_for(dense_w.numel() * 2) - 1)]
    t_dense = time_graph([lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in dense])
    result = {"N": N, "K": K, "nf4_bytes": nf4_bytes(q), "bf16_bytes": dense_w.numel() * 2, "nf4_us": round(ours, 3),
              "bf16_cublas_us": round(t_dense, 3), "speedup_vs_bf16": round(t_dense / ours, 3)}  # fmt: skip
    del weights, dense
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON lines: one per case, then one fit per K")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not qlora_ext.build_info()["with_cuda"]:
        print("needs a CUDA build and GPU", file=sys.stderr)
        return 2
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
           "gemv_variant": ops.nf4_gemv_variant(), "programmatic_launch": ops.programmatic_launch_enabled()}  # fmt: skip
    rows = []
    for K, ns in SIZES.items():
        cases = [time_case(N, K) for N in ns]
        for case in cases:
            rows.append({**env, **case})
        fixed, per_byte = fit_line([c["nf4_bytes"] for c in cases], [c["nf4_us"] for c in cases])
        d_fixed, d_per_byte = fit_line([c["bf16_bytes"] for c in cases], [c["bf16_cublas_us"] for c in cases])
        rows.append({**env, "fit_K": K, "nf4_fixed_us": round(fixed, 3), "nf4_stream_TBps": round(1e-6 / per_byte, 3),
                     "bf16_fixed_us": round(d_fixed, 3), "bf16_stream_TBps": round(1e-6 / d_per_byte, 3)})  # fmt: skip
    print(f"{'N':>6} {'K':>6} {'nf4 us':>8} {'bf16 us':>8} {'x bf16':>7}")
    for r in rows:
        if "fit_K" in r:
            print(f"fit K={r['fit_K']}: nf4 {r['nf4_fixed_us']} us + bytes at {r['nf4_stream_TBps']} TB/s; "
                  f"bf16 {r['bf16_fixed_us']} us + bytes at {r['bf16_stream_TBps']} TB/s")  # fmt: skip
        else:
            print(f"{r['N']:>6} {r['K']:>6} {r['nf4_us']:>8.2f} {r['bf16_cublas_us']:>8.2f} {r['speedup_vs_bf16']:>7.2f}")
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(args.out)  # atomic: no half-written results
    return 0


if __name__ == "__main__":
    sys.exit(main())
