"""Where the M = 1 GEMV's fixed cost goes (session 24's question, #5's 3x bar at the small shapes).

A line through session 23's ring times (H100, 14336x4096 and 28672x8192, M = 1) gives ~4.4 us of
fixed cost a call and 2.54 TB/s beyond it; the same line through bf16 cuBLAS gives ~2.3 us and
2.94 TB/s. At 4096^2 the 3x bar (5.5 us) needs the fixed cost near cuBLAS'. This prints, per call,
in bench_nf4_linear's CUDA-graph harness (weights rotated past the L2):
  - the floor of a graph node: a one-element kernel;
  - each GEMV variant and bf16 cuBLAS at M = 1 on a few shapes, with programmatic dependent launch
    off (as bench_nf4_linear times them) and on (consecutive GEMVs of the graph may then overlap
    one's start with the other's end, as in generation);
and writes the figures as JSON (--out).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_nf4_linear as bench  # noqa: E402  (time_graph, copies_for)

import qlora_ext  # noqa: E402
from qlora_ext import ops  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,14336x4096,28672x8192")
    parser.add_argument("--variants", default="ring,factored_fill")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    one = torch.zeros(1, device="cuda")
    floor = bench.time_graph([lambda: one.add_(1.0)])
    print(f"graph node floor (one-element kernel): {floor:.2f} us", flush=True)
    rows.append({"case": "one_element_kernel", "us": floor})
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        q = qlora_ext.NF4Weight.from_float(w, blocksize=64, double_quant=True)
        nf4_bytes = bench.nf4_bytes(q)
        del w
        weights = [q] + [qlora_ext.NF4Weight.from_float(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02,
                                                        blocksize=64, double_quant=True)
                         for _ in range(bench.copies_for(nf4_bytes) - 1)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for variant in args.variants.split(","):
            ops.set_nf4_gemv_variant(variant)
            for pdl in (False, True):
                with ops.programmatic_launch(pdl), torch.no_grad():
                    us = bench.time_graph([lambda wi=wi: ops.nf4_linear_forward(x, wi) for wi in weights])
                rows.append({"case": variant, "shape": shape, "pdl": pdl, "us": us, "tb_per_s": nf4_bytes / us * 1e-6})
                print(f"{shape} {variant:14s} pdl={int(pdl)}: {us:7.2f} us  {nf4_bytes / us * 1e-6:.2f} TB/s", flush=True)
        del weights
        dense = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(bench.copies_for(N * K * 2))]
        us = bench.time_graph([lambda wi=wi: torch.nn.functional.linear(x, wi) for wi in dense])
        rows.append({"case": "bf16_cublas", "shape": shape, "us": us, "tb_per_s": N * K * 2 / us * 1e-6})
        print(f"{shape} bf16 cuBLAS         : {us:7.2f} us  {N * K * 2 / us * 1e-6:.2f} TB/s", flush=True)
        del dense
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "git": bench.git_commit(),
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
