"""A CUDA workload for compute-sanitizer that reaches every qlora_ext kernel with odd sizes, every
dtype and block size, unaligned views, multi-tensor batches and the GEMV fast and generic paths.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python benchmarks/sanitize_workload.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python benchmarks/sanitize_workload.py
    compute-sanitizer --tool initcheck --error-exitcode 9 python benchmarks/sanitize_workload.py

(The pytest CUDA suites run too long under the sanitizer's instrumentation; this covers the same
kernels and launch shapes in seconds of GPU time.)"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_ext  # noqa: E402
from qlora_ext import NF4Weight, codebooks  # noqa: E402
from qlora_ext.optim import ops as optim_ops  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
code = codebooks.dynamic_map(device=dev)
# NF4 quantize / double quantize / dequantize, blockwise8 (with and without the offset)
for n in (1, 7, 33, 1000, 4097, 65537):
    for bs in (32, 64, 512, 4096):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            w = torch.randn(n, dtype=dt, device=dev)
            for dq in (False, True):
                q = NF4Weight.from_float(w, bs, double_quant=dq)
                q.dequantize()
                q.dequantize(torch.float32)
        x = torch.randn(n, device=dev)
        for offset in (None, x.mean().reshape(1)):
            c, a = qlora_ext.ops.blockwise8_quantize(x, code, 256, offset)
            qlora_ext.ops.blockwise8_dequantize(c, a, code, 256)
# unaligned views (scalar paths)
w = torch.randn(10001, dtype=torch.bfloat16, device=dev)[1:]
q = NF4Weight.from_float(w, 64)
q.dequantize()
p = torch.empty(5001, dtype=torch.uint8, device=dev)[1:]
p.copy_(q.packed.view(-1))
qlora_ext.ops.nf4_dequantize(p, q.absmax, 64, [10000], torch.bfloat16, q.nested.absmax2, q.nested.code,
                             q.nested.offset.reshape(1))  # fmt: skip
# ... and into a row range of a larger buffer (nf4_dequantize_into: the fused Q/K/V unit's weights)
buffer = torch.empty(3, 10000, dtype=torch.bfloat16, device=dev)
qlora_ext.ops.nf4_dequantize_into(buffer[1], p, q.absmax, 64, q.nested.absmax2, q.nested.code, q.nested.offset.reshape(1))
# AdamW 32-bit and 8-bit, multi-tensor batches of odd sizes and dtypes (> 32 tensors: two batches)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    sizes = [1, 3, 255, 256, 257, 4096, 5000, 70001] * 5
    params = [torch.randn(s, device=dev).to(dt) for s in sizes]
    grads = [torch.randn(s, device=dev).to(dt) for s in sizes]
    m = [torch.zeros(s, device=dev) for s in sizes]
    v = [torch.zeros(s, device=dev) for s in sizes]
    optim_ops.adamw_step(params, grads, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1)
    nb = [-(-s // 256) for s in sizes]
    zero = (int(torch.argmin(codebooks.dynamic_map(True).abs())), int(torch.argmin(codebooks.dynamic_map(False).abs())))
    c1 = [torch.full((s,), zero[0], dtype=torch.uint8, device=dev) for s in sizes]
    c2 = [torch.full((s,), zero[1], dtype=torch.uint8, device=dev) for s in sizes]
    a1 = [torch.zeros(b, device=dev) for b in nb]
    a2 = [torch.zeros(b, device=dev) for b in nb]
    for step in (1, 2):
        optim_ops.adamw_step_8bit(params, grads, c1, a1, c2, a2, codebooks.dynamic_map(True, torch.device(dev)),
                                  codebooks.dynamic_map(False, torch.device(dev)), lr=1e-3, beta1=0.9,
                                  beta2=0.999, eps=1e-8, weight_decay=0.01, step=step)  # fmt: skip
# PagedAdamW paged through a small pool
ps = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in (5000, 70001, 300)]
for prm in ps:
    prm.grad = torch.randn_like(prm)
opt = qlora_ext.PagedAdamW(ps, device_budget=(64 << 10) + 512 * 3 + 3 * 65536, page_bytes=65536)
for _ in range(2):
    opt.step()
# GEMV: M 1..16, fast path (K % 32 == 0) and generic (odd K, fp32), bias, plain and nested scales,
# under every CUDA kernel variant (ops.nf4_gemv_variants(): "mma", "factored", ...): the factored
# ones take 64-blocks with K % 64 == 0 (here (64, 128), (130, 256), (96, 4096)), M <= 8 and 9..16
# tiles, and K = 4096 splits the reduction over several warps
variants = qlora_ext.ops.nf4_gemv_variants()
default_variant = qlora_ext.ops.nf4_gemv_variant()
for variant in variants:
    qlora_ext.ops.set_nf4_gemv_variant(variant)
    for (n_out, k) in ((64, 128), (33, 96), (17, 45), (130, 256), (96, 4096)):
        for dq in (False, True):
            q = NF4Weight.from_float(torch.randn(n_out, k, device=dev) * 0.1, 64, double_quant=dq)
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                for m_rows in (1, 2, 7, 9, 16):
                    x = torch.randn(m_rows, k, device=dev, dtype=dt)
                    bias = torch.randn(n_out, device=dev, dtype=dt)
                    nested = q.nested
                    scales = (nested.absmax2, nested.code, nested.offset.reshape(1), nested.blocksize) if nested else ()
                    for b in (bias, None):  # the operator itself: fast path for 16-bit x, generic for fp32/odd K
                        qlora_ext.ops.nf4_gemv(x, q.packed, q.absmax, q.blocksize, list(q.shape), b, *scales)
qlora_ext.ops.set_nf4_gemv_variant(default_variant)
print(f"GEMV variants: {variants}")
# GEMM: M 17..256 (tiles of 32, 64, 128 rows; partial tiles), split-K (N = 64 needs many splits),
# a partial column tile, blocks of 32 (two scales per k-step), fallback (K % 64 != 0, fp32)
for (n_out, k, bs) in ((64, 2048, 64), (130, 256, 32), (40, 96, 64)):
    for dq in (False, True):
        q = NF4Weight.from_float(torch.randn(n_out, k, device=dev) * 0.1, bs, double_quant=dq)
        nested = q.nested
        scales = (nested.absmax2, nested.code, nested.offset.reshape(1), nested.blocksize) if nested else ()
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for m_rows in (17, 64, 100, 256):
                x = torch.randn(m_rows, k, device=dev, dtype=dt)
                for b in (torch.randn(n_out, device=dev, dtype=dt), None):
                    qlora_ext.ops.nf4_gemm(x, q.packed, q.absmax, q.blocksize, list(q.shape), b, *scales)
# DoRA's scale, its backward and the column scale y = z ⊙ c (+ bias): odd N (scalar columns), N % 8 == 0 (vector columns), one and several
# row chunks, r = 1 and 16, every activation dtype
for n_out, r in ((45, 4), (64, 16), (1, 1)):
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        wa = torch.randn(n_out, r, device=dev).to(dt)
        a, b = torch.randn(r, 70, device=dev), torch.randn(n_out, r, device=dev)
        col_scale, inv_norm = torch.ops.qlora_ext.dora_scale(wa, a, b, torch.rand(n_out, device=dev) + 1,
                                                             torch.rand(n_out, device=dev), 0.5)  # fmt: skip
        for m_rows in (1, 33, 3000):
            dy, z = (torch.randn(m_rows, n_out, device=dev, dtype=dt) for _ in range(2))
            torch.ops.qlora_ext.dora_scale_backward(dy, z, col_scale, inv_norm)
            for bias in (None, torch.randn(n_out, device=dev, dtype=dt)):
                torch.ops.qlora_ext.dora_column_scale(z, col_scale, bias)
# ... the stacked layers' scales (dora_scale_stacked: each row block its own column block of wa and
# diagonal block of A·Aᵀ; an empty layer; r 4, 16 and 33: both scale kernels), with A·Aᵀ by
# at::mm and by qlora's kernel
for gram_kernel in (False, True):
    qlora_ext._native.native()._set_dora_gram_kernel(gram_kernel)
    for rows, r in (([45, 7, 7], 4), ([0, 64, 300], 16), ([33, 40], 33)):
        n_out = sum(rows)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            wa = torch.randn(n_out, len(rows) * r, device=dev).to(dt)
            a, b = torch.randn(len(rows) * r, 70, device=dev), torch.randn(n_out, r, device=dev)
            torch.ops.qlora_ext.dora_scale_stacked(wa, a, b, torch.rand(n_out, device=dev) + 1,
                                                   torch.rand(n_out, device=dev), rows, [0.5] * len(rows))  # fmt: skip
            torch.ops.qlora_ext.dora_scale(wa[:, :r].contiguous(), a[:r], b, torch.rand(n_out, device=dev) + 1,
                                           torch.rand(n_out, device=dev), 0.5)  # fmt: skip
qlora_ext._native.native()._set_dora_gram_kernel(True)
# ... the MLP's gate/up backward through the SwiGLU in one pass (swiglu_scaled_dora_backward): odd
# and vector widths, one and several row chunks, a misaligned (scalar-path) view
for n_out in (45, 64, 1):
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        scales = [torch.rand(n_out, device=dev, dtype=dt) + 0.5 for _ in range(2)]
        inv_norms = [torch.rand(n_out, device=dev) + 0.5 for _ in range(2)]
        for m_rows in (1, 33, 3000):
            dh, zg, zu = (torch.randn(m_rows * n_out + 1, device=dev, dtype=dt) for _ in range(3))
            for offset in (0, 1):
                views = [t[offset : offset + m_rows * n_out].view(m_rows, n_out) for t in (dh, zg, zu)]
                torch.ops.qlora_ext.swiglu_scaled_dora_backward(*views, *scales, *inv_norms)
# Block ops (RMSNorm, RoPE, SwiGLU): their own workload file, also run alone by
# benchmarks/gpu_checks/block_ops.sh
import sanitize_block_ops  # noqa: E402,F401

torch.cuda.synchronize()
print("sanitize workload done")
