"""DoRA's native kernels against what they replace, at Llama-3-8B projection shapes, bf16, r 16:
median device time per call (CUDA events, inputs rotated so none is served from L2).

- dora_scale (n² and c = m/n per output row, from W·Aᵀ): the kernel in use (the registers kernel;
  run the script once more with QLORA_DORA_SCALE_KERNEL=rows to time the former one: the choice
  is read once per process) with A·Aᵀ by qlora's kernel (the CUDA default, dora.GRAM_KERNEL_DEVICES)
  and by at::mm ("mm"), and the six-op PyTorch reference.
- y = z ⊙ c: qlora_ext::dora_column_scale (16-byte accesses) vs PyTorch's broadcasting multiply.
- dora_scale_backward (dz = dy ⊙ c, dm = Σ_rows dy ⊙ z / n): one pass over dy and z.
- The MLP's SwiGLU of DoRA's gate and up outputs (c ⊙ z), 8B intermediate width: swiglu_scaled
  reading z and c, against the column scale of both then swiglu (forward), and against the same
  two column scales then swiglu_backward (backward); DoRA's gate/up backward from dh in one
  swiglu_scaled_dora_backward against swiglu_scaled_backward then two dora_scale_backward.

Each op is first checked against its reference on the benchmark's inputs.

    python benchmarks/bench_dora_kernels.py [--tokens 2048] [--reps 50] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4 import copies_to_defeat_l2, environment, median_ms_cuda  # noqa: E402

from qlora_ext import dora  # noqa: E402

DTYPE = torch.bfloat16
# (name, out features N, in features K) of the 8B's projections
PROJECTIONS = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]


def rotated(make, bytes_per_call: int) -> list:
    return [make() for _ in range(copies_to_defeat_l2("cuda", bytes_per_call))]


def bench_projection(name: str, n: int, k: int, tokens: int, r: int, reps: int) -> dict:
    s = 2.0

    def scale_inputs():
        a = torch.randn(r, k, device="cuda") / k**0.5
        b = torch.randn(n, r, device="cuda") * 0.01
        wa = torch.randn(n, r, device="cuda", dtype=DTYPE)
        weight_sq = torch.rand(n, device="cuda") * k + 1.0
        m = weight_sq.sqrt()
        return wa, a, b, weight_sq, m

    scale_sets = rotated(scale_inputs, n * r * 6 + k * r * 4)
    want = dora.dora_scale_reference(*scale_sets[0], s)
    scale_ref_ms = median_ms_cuda(lambda t: dora.dora_scale_reference(*t, s), scale_sets, reps)
    scale_ms = {}  # A·Aᵀ by at::mm (cuBLAS), then by qlora's kernel (dora.GRAM_KERNEL_DEVICES)
    saved = dora.GRAM_KERNEL_DEVICES
    try:
        for gram, devices in (("mm", ()), ("gram_kernel", ("cuda",))):
            dora.GRAM_KERNEL_DEVICES = devices
            torch.testing.assert_close(dora.dora_scale(*scale_sets[0], s)[1], want[1], rtol=1e-5, atol=0)
            scale_ms[gram] = median_ms_cuda(lambda t: dora.dora_scale(*t, s), scale_sets, reps)
    finally:
        dora.GRAM_KERNEL_DEVICES = saved

    def activations():
        return (torch.randn(tokens, n, device="cuda", dtype=DTYPE), torch.rand(n, device="cuda", dtype=DTYPE) + 0.5,
                torch.randn(tokens, n, device="cuda", dtype=DTYPE), torch.rand(n, device="cuda") + 0.5)  # fmt: skip

    sets = rotated(activations, 3 * tokens * n * 2)
    z, c, dy, inv_norm = sets[0]
    torch.testing.assert_close(dora.dora_column_scale(z, c), dora.dora_column_scale_reference(z, c), rtol=0, atol=0)
    column_ms = median_ms_cuda(lambda t: torch.ops.qlora_ext.dora_column_scale(t[0], t[1], None), sets, reps)
    mul_ms = median_ms_cuda(lambda t: torch.mul(t[0], t[1]), sets, reps)
    backward_ms = median_ms_cuda(lambda t: dora.dora_scale_backward(t[2], t[0], t[1], t[3]), sets, reps)
    io_bytes = tokens * n * 2
    return {
        "projection": name, "N": n, "K": k, "tokens": tokens, "r": r,
        "dora_scale_kernel": "rows" if os.environ.get("QLORA_DORA_SCALE_KERNEL") == "rows" else "registers",
        "dora_scale_mm_us": 1e3 * scale_ms["mm"], "dora_scale_reference_us": 1e3 * scale_ref_ms,
        "dora_scale_gram_kernel_us": 1e3 * scale_ms["gram_kernel"], "gram_kernel_default": "cuda" in dora.GRAM_KERNEL_DEVICES,
        "column_scale_us": 1e3 * column_ms, "torch_mul_us": 1e3 * mul_ms,
        "column_scale_gbps": 2 * io_bytes / column_ms / 1e6, "torch_mul_gbps": 2 * io_bytes / mul_ms / 1e6,
        "scale_backward_us": 1e3 * backward_ms, "scale_backward_gbps": 3 * io_bytes / backward_ms / 1e6,
    }  # fmt: skip


def bench_swiglu(tokens: int, width: int, reps: int) -> dict:
    ops = torch.ops.qlora_ext

    def operands():
        return (torch.randn(tokens, width, device="cuda", dtype=DTYPE), torch.randn(tokens, width, device="cuda", dtype=DTYPE),
                torch.rand(width, device="cuda", dtype=DTYPE) + 0.5, torch.rand(width, device="cuda", dtype=DTYPE) + 0.5,
                torch.randn(tokens, width, device="cuda", dtype=DTYPE))  # fmt: skip

    sets = rotated(operands, 5 * tokens * width * 2)
    z_g, z_u, c_g, c_u, dh = sets[0]
    g, u = ops.dora_column_scale(z_g, c_g, None), ops.dora_column_scale(z_u, c_u, None)
    assert torch.equal(ops.swiglu_scaled(z_g, z_u, c_g, c_u), ops.swiglu(g, u, False))

    def two_passes_then(fn):
        return lambda t: fn(t, ops.dora_column_scale(t[0], t[2], None), ops.dora_column_scale(t[1], t[3], None))

    fwd_ms = median_ms_cuda(lambda t: ops.swiglu_scaled(t[0], t[1], t[2], t[3]), sets, reps)
    fwd_before_ms = median_ms_cuda(two_passes_then(lambda t, g, u: ops.swiglu(g, u, False)), sets, reps)
    bwd_ms = median_ms_cuda(lambda t: ops.swiglu_scaled_backward(t[4], t[0], t[1], t[2], t[3]), sets, reps)
    bwd_before_ms = median_ms_cuda(two_passes_then(lambda t, g, u: ops.swiglu_backward_(t[4], g, u)), sets, reps)
    # DoRA's whole gate/up backward from dh: one swiglu_scaled_dora_backward against
    # swiglu_scaled_backward then dora_scale_backward of each gradient (the same bits, checked)
    inv = torch.rand(width, device="cuda") + 0.5

    def unfused(t):
        dg, du = ops.swiglu_scaled_backward(t[4], t[0], t[1], t[2], t[3])
        return ops.dora_scale_backward(dg, t[0], t[2], inv), ops.dora_scale_backward(du, t[1], t[3], inv)

    (dz_g, dm_g), (dz_u, dm_u) = unfused(sets[0])
    fused = ops.swiglu_scaled_dora_backward(dh, z_g, z_u, c_g, c_u, inv, inv)
    assert all(torch.equal(a, b) for a, b in zip(fused, (dz_g, dz_u, dm_g, dm_u)))
    dora_bwd_ms = median_ms_cuda(lambda t: ops.swiglu_scaled_dora_backward(t[4], t[0], t[1], t[2], t[3], inv, inv), sets, reps)
    dora_bwd_before_ms = median_ms_cuda(unfused, sets, reps)
    return {"tokens": tokens, "width": width, "swiglu_scaled_us": 1e3 * fwd_ms, "column_scales_then_swiglu_us": 1e3 * fwd_before_ms,
            "swiglu_scaled_backward_us": 1e3 * bwd_ms, "column_scales_then_swiglu_backward_us": 1e3 * bwd_before_ms,
            "swiglu_scaled_dora_backward_us": 1e3 * dora_bwd_ms,
            "swiglu_scaled_backward_then_scale_backwards_us": 1e3 * dora_bwd_before_ms}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    torch.manual_seed(0)
    rows = [bench_projection(name, n, k, args.tokens, args.r, args.reps) for name, n, k in PROJECTIONS]
    print(f"{'projection':10} {'N':>6} {'scale us':>9} {'(mm)':>8} {'(ref)':>8} {'col us':>7} {'mul us':>7} "
          f"{'col GB/s':>9} {'mul GB/s':>9} {'bwd us':>7} {'bwd GB/s':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['projection']:10} {r['N']:>6} {r['dora_scale_gram_kernel_us']:>9.1f} {r['dora_scale_mm_us']:>8.1f} "
              f"{r['dora_scale_reference_us']:>8.1f} "
              f"{r['column_scale_us']:>7.1f} {r['torch_mul_us']:>7.1f} {r['column_scale_gbps']:>9.0f} "
              f"{r['torch_mul_gbps']:>9.0f} {r['scale_backward_us']:>7.1f} {r['scale_backward_gbps']:>9.0f}")  # fmt: skip
    swiglu = bench_swiglu(args.tokens, 14336, args.reps)
    print(f"SwiGLU of DoRA's gate/up [{args.tokens}, 14336]: forward {swiglu['swiglu_scaled_us']:.1f} us "
          f"(column scales + swiglu {swiglu['column_scales_then_swiglu_us']:.1f}), backward "
          f"{swiglu['swiglu_scaled_backward_us']:.1f} us (column scales + swiglu_backward_ "
          f"{swiglu['column_scales_then_swiglu_backward_us']:.1f}); DoRA's gate/up backward from dh "
          f"{swiglu['swiglu_scaled_dora_backward_us']:.1f} us (swiglu_scaled_backward + two scale backwards "
          f"{swiglu['swiglu_scaled_backward_then_scale_backwards_us']:.1f})")  # fmt: skip
    result = {"environment": environment("cuda"), "rows": rows, "swiglu": swiglu}
    print(json.dumps(result))
    if args.out:
        from qlora_ext.io_utils import atomic_write_json  # noqa: PLC0415

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
