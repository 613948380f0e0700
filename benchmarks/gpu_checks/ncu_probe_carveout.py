"""Kernels for Nsight Compute's launch__shared_mem_config_size (run.sh carveout): which shared-memory
configuration each kernel gets, to test session 23's hypothesis that the "ring" GEMV slows the 8B
decode under programmatic dependent launch because its carveout differs from its neighbours'.

    ncu --metrics launch__shared_mem_config_size,... python benchmarks/gpu_checks/ncu_probe_carveout.py
        # the default GEMV variant and "ring", twice each, at 4096 x 4096, M = 1
    ncu ... python benchmarks/gpu_checks/ncu_probe_carveout.py --decode [--variant ring]
        # a prefill and two eager decode steps of a 2-layer 8B-shaped Llama (NF4, merged), under
        # ncu --profile-from-start off: every kernel of those steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qlora_ext  # noqa: E402
from qlora_ext import _ops as ops  # noqa: E402


def gemv_kernels() -> None:
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    q = qlora_ext.NF4Weight.from_float(torch.randn(4096, 4096, device="cuda") * 0.05, 64, True)
    for variant in ["factored_fill", "ring"]:
        ops.set_nf4_gemv_variant(variant)
        for _ in range(2):
            ops.nf4_gemv_weight(x, q)
    torch.cuda.synchronize()


def decode_kernels(variant: str) -> None:
    from bench_decode import random_llama
    from qlora_ext.layers import QLoRALinear

    model = random_llama("8b", 2, 64, "cuda")
    qlora_ext.prepare(model, r=16, alpha=16, gradient_checkpointing=False, verbose=False)
    for layer in model.modules():
        if isinstance(layer, QLoRALinear):
            layer.merge()
    ops.set_nf4_gemv_variant(variant)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    qlora_ext.generate(model, prompt, 3, cuda_graphs=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # ncu --profile-from-start off: only what follows
    qlora_ext.generate(model, prompt, 3, cuda_graphs=False)  # prefill + 2 decode steps, PDL on
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", action="store_true", help="a 2-layer decode instead of the GEMVs alone")
    parser.add_argument("--variant", default="ring", help="with --decode: the nf4_gemv variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.decode:
        decode_kernels(args.variant)
    else:
        gemv_kernels()
    return 0


if __name__ == "__main__":
    sys.exit(main())
