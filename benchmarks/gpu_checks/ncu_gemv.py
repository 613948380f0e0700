"""One nf4_gemv launch per (variant, shape, M), for Nsight Compute to profile:

    ncu --kernel-name regex:nf4_gemv --section SpeedOfLight ... python benchmarks/gpu_checks/ncu_gemv.py

Each case runs twice (the first launch warms the module), so profile with --launch-skip 1 per case
or read the second report of each. Cases: VARIANTS x SHAPES x M from the environment, or defaults.
"""

import os

import torch

import qlora_ext
from qlora_ext import ops

variants = os.environ.get("VARIANTS", "factored,ring").split(",")
shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("SHAPES", "28672x8192,4096x4096").split(",")]
ms = [int(m) for m in os.environ.get("MS", "1").split(",")]
for N, K in shapes:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    q = qlora_ext.NF4Weight.from_float(w, blocksize=64, double_quant=True)
    del w
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        for v in variants:
            ops.set_nf4_gemv_variant(v)
            with torch.no_grad():
                for _ in range(2):
                    ops.nf4_linear_forward(x, q)
            torch.cuda.synchronize()
            print(f"ran {v} {N}x{K} M={M}", flush=True)
