"""What QLORA_SM90_BF16_PAIRS costs in accuracy, simulated on the CPU (no GPU, no kernel).

The Hopper NF4 GEMM today uses the weight T(nf4[c] * s) (fp32 product, one rounding to bf16), exactly what
nf4_dequantize writes. The BF16_PAIRS experiment looks up T(nf4[c]) in bf16 and multiplies by T(s) in bf16, so its
weight is T(T(nf4[c]) * T(s)). This script builds both weights for random NF4 problems (double quantization,
blocksize 64), computes each GEMM in fp32 with a bf16 output, and reports each error against the fp32 GEMM on the
exact weight, next to the tests' rule (max error <= 2 x PyTorch's bf16 error + one bf16 ulp of the largest output).

    PYTHONPATH=python python benchmarks/gpu_checks/nf4_gemm_sm90_bf16_pairs_error.py [--seeds 6]
"""

from __future__ import annotations

import argparse

import torch

import qlora_ext


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 1024, 4096], metavar=("M", "N", "K"))
    args = parser.parse_args()
    M, N, K = args.shape
    worst = 0.0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.02, blocksize=64, double_quant=True)
        x = bf16(torch.randn(M, K))
        exact = q.dequantize(torch.float32)  # nf4[c] * s in fp32
        blocks = exact.view(N, K // 64, 64)
        # Each block holds a code of value +-1 (its absmax), so |w| there is the block scale s.
        scale = blocks.abs().amax(-1, keepdim=True)
        pairs = bf16(bf16(blocks / scale) * bf16(scale)).view(N, K)  # T(T(nf4[c]) * T(s))
        ref = x @ exact.t()
        err_pytorch = (bf16(x @ bf16(exact).t()) - ref).abs().max().item()
        err_pairs = (bf16(x @ pairs.t()) - ref).abs().max().item()
        allowed = 2 * err_pytorch + torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
        worst = max(worst, err_pairs / allowed)
        print(f"seed {seed}: PyTorch's error {err_pytorch:.4g}, bf16 pairs' {err_pairs:.4g} "
              f"({err_pairs / err_pytorch:.2f}x), allowed {allowed:.4g} ({err_pairs / allowed:.0%} of it), "
              f"weights that differ from T(nf4[c] * s): {(pairs != bf16(exact)).float().mean():.1%}")
    print(f"worst: {worst:.0%} of the rule's allowance")


if __name__ == "__main__":
    main()
