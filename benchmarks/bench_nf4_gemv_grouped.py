"""nf4_gemv_grouped (one launch for the projections that share an input) against the same weights
one nf4_gemv launch each, and against bf16 cuBLAS on the concatenated dense weight, at decode M.

    python benchmarks/bench_nf4_gemv_grouped.py [--m 1 16] [--variants factored,factored_wide] [--out F]

Groups: Llama 3 8B's attention q/k/v (4096 + 1024 + 1024 rows, K 4096) and its MLP gate/up
(14336 + 14336, K 4096). Weights rotate among copies so the set is 4x L2 (bench_nf4_linear's
method, CUDA-graph replays). Prints one JSON line per (group, M, variant) and, with --out, writes
them to a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4_linear import copies_for, copy_bandwidth, git_commit, time_graph  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import ops  # noqa: E402

GROUPS = {"qkv_8b": ([4096, 1024, 1024], 4096), "gate_up_8b": ([14336, 14336], 4096)}


def clone_weight(q: qlora_ext.NF4Weight) -> qlora_ext.NF4Weight:
    return qlora_ext.NF4Weight(q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize,
                               copy.deepcopy(q.nested) if q.nested else None)  # fmt: skip


def bench_group(name, rows, K, M, variants, env, copy_bw):
    torch.manual_seed(sum(rows) + K + M)
    dense = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) * 0.02 for n in rows]
    weights = [qlora_ext.NF4Weight.from_float(w) for w in dense]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    group_bytes = sum(w.nbytes for w in weights) + x.numel() * 2 + M * sum(rows) * 2
    sets = [weights] + [[clone_weight(w) for w in weights] for _ in range(copies_for(group_bytes) - 1)]
    grouped = [lambda s=s: ops.nf4_gemv_grouped_weights(x, s) for s in sets]
    separate = [lambda s=s: [ops.nf4_gemv_weight(x, w) for w in s] for s in sets]
    w_cat = torch.cat([w.dequantize(torch.bfloat16) for w in weights])
    dense_copies = [w_cat] + [w_cat.clone() for _ in range(copies_for(w_cat.numel() * 2) - 1)]
    t_dense = time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense_copies])
    del dense_copies
    results = []
    before = ops.nf4_gemv_variant()
    try:
        for variant in variants:
            ops.set_nf4_gemv_variant(variant)
            same = torch.equal(ops.nf4_gemv_grouped_weights(x, weights), torch.cat([ops.nf4_gemv_weight(x, w) for w in weights], -1))
            t_grouped, t_separate = time_graph(grouped), time_graph(separate)
            results.append({
                **env, "op": "nf4_gemv_grouped", "group": name, "rows": rows, "K": K, "M": M, "variant": variant,
                "equal_to_separate": same, "grouped_us": round(t_grouped, 3), "separate_us": round(t_separate, 3),
                "grouped_speedup_vs_separate": round(t_separate / t_grouped, 3),
                "bf16_cublas_us": round(t_dense, 3), "grouped_speedup_vs_bf16": round(t_dense / t_grouped, 3),
                "grouped_GBps": round(group_bytes / t_grouped / 1e3, 1),
                "copy_bw_fraction": round(group_bytes / (t_grouped * 1e-6) / copy_bw, 3),
            })  # fmt: skip
    finally:
        ops.set_nf4_gemv_variant(before)
    if len(rows) == 2 and rows[0] == rows[1]:  # gate/up: SwiGLU in the epilogue vs grouped + swiglu
        n = rows[0]

        def two_steps(s):
            both = ops.nf4_gemv_grouped_weights(x, s)
            return qlora_ext.block_ops.swiglu(both[..., :n], both[..., n:])

        same = torch.equal(ops.nf4_gemv_swiglu_weights(x, *weights), two_steps(weights))
        t_fused = time_graph([lambda s=s: ops.nf4_gemv_swiglu_weights(x, *s) for s in sets])
        t_two = time_graph([lambda s=s: two_steps(s) for s in sets])
        results.append({
            **env, "op": "nf4_gemv_swiglu", "group": name, "rows": rows, "K": K, "M": M,
            "equal_to_separate": same, "fused_us": round(t_fused, 3), "grouped_then_swiglu_us": round(t_two, 3),
            "fused_speedup": round(t_two / t_fused, 3), "fused_GBps": round(group_bytes / t_fused / 1e3, 1),
            "copy_bw_fraction": round(group_bytes / (t_fused * 1e-6) / copy_bw, 3),
        })  # fmt: skip
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--variants", default="factored,factored_wide")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    copy_bw = copy_bandwidth()
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "commit": git_commit(),
           "copy_bw_TBps": round(copy_bw / 1e12, 3)}  # fmt: skip
    lines = []
    for name, (rows, K) in GROUPS.items():
        for M in args.m:
            for r in bench_group(name, rows, K, M, args.variants.split(","), env, copy_bw):
                print(json.dumps(r), flush=True)
                lines.append(json.dumps(r))
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)
    # factored_fill's grouped q/k/v takes the 3-CTA shape the per-part launches do not: another sum order
    return 0 if all(r["equal_to_separate"] or r.get("variant") == "factored_fill" for r in map(json.loads, lines)) else 1


if __name__ == "__main__":
    sys.exit(main())
