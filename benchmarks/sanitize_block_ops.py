"""A CUDA workload for compute-sanitizer over the transformer-block kernels (RMSNorm, RoPE, SwiGLU):
every launch shape and path, odd sizes, unaligned views, in-place variants.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python benchmarks/sanitize_block_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python benchmarks/sanitize_block_ops.py

(benchmarks/sanitize_workload.py runs it too, after the other kernels.)"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlora_ext  # noqa: E402,F401  (registers the operators)

dev = "cuda"
# RMSNorm (warp rows D <= 1024, CTA rows, shared and global dweight accumulators,
# fp32 weights, vector and scalar paths), RoPE (vector and scalar, fp32 tables, in place),
# SwiGLU (vector + tail, unaligned, in-place backward)
ops = torch.ops.qlora_ext
torch.manual_seed(0)
for D in (1, 7, 128, 1032, 4096, 12100):
    for rows in (1, 9, 300):
        for dt, wdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32)):
            x = torch.randn(rows, D, device=dev, dtype=dt)
            w = torch.randn(D, device=dev, dtype=wdt)
            for cast in (True, False):
                y, inv = ops.rms_norm(x, w, 1e-6, cast)
                dy = torch.randn_like(y)
                for dweight in (True, False):
                    ops.rms_norm_backward(dy, x, w, inv, cast, dweight)
x = torch.randn(4 * 1024 + 1, device=dev, dtype=torch.bfloat16)[1:].view(4, 1024)
ops.rms_norm_backward(x, x, torch.ones(1024, device=dev, dtype=torch.bfloat16), ops.rms_norm(x, x[0], 1e-6)[1], True, True)
for dt in (torch.bfloat16, torch.float32):
    for B, H, G, T, Dh in ((2, 4, 2, 9, 128), (1, 3, 1, 5, 6), (1, 2, 2, 3, 20)):
        q = torch.randn(B, T, H, Dh, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(B, G, T, Dh, device=dev, dtype=dt)
        for tdt in (dt, torch.float32):
            cos = torch.randn(1, T, Dh, device=dev, dtype=tdt)
            sin = torch.randn(B, T, Dh, device=dev, dtype=tdt)[:1]
            for transpose in (False, True):
                ops.rope(q, k, cos, sin, transpose)
                ops.rope_(q, k, cos, sin, transpose)
for dt in (torch.bfloat16, torch.float32):
    for n in (1, 7, 8, 4097, 70001):
        g, u, dh = (torch.randn(n + 1, device=dev, dtype=dt) for _ in range(3))
        for view in (slice(0, n), slice(1, n + 1)):
            ops.swiglu(g[view], u[view], False)
            ops.swiglu_backward(dh[view], g[view], u[view])
            ops.swiglu_backward_(dh[view], g[view], u[view])
# the column-scaled SwiGLU (DoRA): rows that hold whole 16-byte vectors (vector path), rows that do
# not (13 columns), offset views (scalar path)
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for rows, cols in ((3, 16), (5, 13), (2, 4096), (1, 1)):
        g, u, dh = (torch.randn(rows * cols + 1, device=dev, dtype=dt) for _ in range(3))
        cg, cu = (torch.rand(cols + 1, device=dev, dtype=dt) for _ in range(2))
        for at in (0, 1):
            view = slice(at, at + rows * cols)
            args = (g[view].view(rows, cols), u[view].view(rows, cols), cg[at : at + cols], cu[at : at + cols])
            ops.swiglu_scaled(*args)
            ops.swiglu_scaled_backward(dh[view].view(rows, cols), *args)
torch.cuda.synchronize()
print("block ops sanitize workload done")
