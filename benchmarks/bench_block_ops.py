"""Fused RMSNorm / RoPE / SwiGLU (qlora_ext.block_ops) against the PyTorch composites they replace
(transformers' LlamaRMSNorm, apply_rotary_pos_emb, silu(gate) * up), at Llama-3-8B shapes, as
physics: median device time, GB/s of the bytes each op must move, the fraction of the measured
copy bandwidth, and the speed-up over the composite measured in the same run.

    python benchmarks/bench_block_ops.py [--tokens 2048] [--reps 50] [--out FILE.json]

Shapes: tokens x hidden 4096 (RMSNorm), 32 query + 8 key/value heads of 128 (RoPE, q and k as
transposed views of [B, T, H, Dh] projections, as transformers makes them), tokens x 14336
(SwiGLU); bf16. Forward and backward are timed separately: the backward of the composite is
autograd's (graph built once, `retain_graph`), ours is the backward operator that autograd calls.
Each op is first checked against qlora_ext.reference on the benchmark's inputs; a failure stops
the run. Also printed: the peak memory of forward + backward, which is where the composites pay
for the fp32 intermediates autograd keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4 import copies_to_defeat_l2, copy_bandwidth_gbps, environment, median_ms_cuda  # noqa: E402

from qlora_ext import block_ops, reference  # noqa: E402

OPS = torch.ops.qlora_ext
DTYPE = torch.bfloat16
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


def hf_rms_norm(x, weight, eps=1e-5):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def hf_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + reference.rotate_half(q) * sin, k * cos + reference.rotate_half(k) * sin


def silu_mul(gate, up):
    return F.silu(gate) * up


def rope_tables(tokens):
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    freqs = torch.arange(tokens, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)[None]
    return emb.cos().to(DTYPE), emb.sin().to(DTYPE)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check(name, got, ref, baseline):
    err = (got.float() - ref).abs().max().item()
    base = (baseline.float() - ref).abs().max().item()
    slack = torch.finfo(got.dtype).eps * ref.abs().max().item()
    if not err <= 3 * base + slack:
        raise SystemExit(f"{name}: error {err:.3g} vs the composite's {base:.3g}: not measuring a wrong kernel")


def cases(tokens):
    """(name, bytes moved per call, fused fn, its input sets, composite fn, its input sets)."""
    e = DTYPE.itemsize
    out = []

    # RMSNorm: forward reads x, writes y (+ inv_rms); backward reads dy, x, writes dx (+ dweight)
    n = tokens * HIDDEN
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DTYPE)
    xs = [torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE) for _ in range(copies_to_defeat_l2("cuda", 3 * n * e))]
    dy = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
    y, inv = OPS.rms_norm(xs[0], weight, 1e-5, True)
    check("rms_norm", y, reference.rms_norm(xs[0], weight, 1e-5)[0], hf_rms_norm(xs[0], weight))
    out.append(("rms_norm fwd", 2 * n * e, lambda x: OPS.rms_norm(x, weight, 1e-5, True), xs,
                lambda x: hf_rms_norm(x, weight), xs))  # fmt: skip
    graphs = []
    for x in xs:
        xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        graphs.append((hf_rms_norm(xg, wg), xg, wg, x, OPS.rms_norm(x, weight, 1e-5, True)[1]))
    out.append(("rms_norm bwd (dx, dweight)", 3 * n * e,
                lambda g: OPS.rms_norm_backward(dy, g[3], weight, g[4], True, True), graphs,
                lambda g: torch.autograd.grad(g[0], (g[1], g[2]), dy, retain_graph=True), graphs))  # fmt: skip

    # RoPE: q and k read and written once
    cos, sin = rope_tables(tokens)
    qk_elems = tokens * (HEADS + KV_HEADS) * HEAD_DIM

    def qk():
        q = torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2)
        k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2)
        return q, k

    pairs = [qk() for _ in range(copies_to_defeat_l2("cuda", 2 * qk_elems * e))]
    q0, k0 = pairs[0]
    q_ref, _ = reference.rope(q0, k0, cos, sin)
    check("rope", OPS.rope(q0, k0, cos, sin, False)[0], q_ref, hf_rope(q0, k0, cos, sin)[0])
    out.append(("rope fwd (q and k)", 2 * qk_elems * e, lambda p: OPS.rope(p[0], p[1], cos, sin, False), pairs,
                lambda p: hf_rope(p[0], p[1], cos, sin), pairs))  # fmt: skip
    # (rotates its inputs again on every call: the values change, the bytes do not)
    out.append(("rope_ fwd in place", 2 * qk_elems * e, lambda p: OPS.rope_(p[0], p[1], cos, sin, False), pairs,
                lambda p: hf_rope(p[0], p[1], cos, sin), pairs))  # fmt: skip
    rope_graphs = []
    for q, k in pairs:
        qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        rope_graphs.append((hf_rope(qg, kg, cos, sin), qg, kg, q, k))
    out.append(("rope bwd", 2 * qk_elems * e, lambda g: OPS.rope(g[3], g[4], cos, sin, True), rope_graphs,
                lambda g: torch.autograd.grad(g[0], (g[1], g[2]), (g[3], g[4]), retain_graph=True), rope_graphs))  # fmt: skip

    # SwiGLU: forward reads gate, up and writes h; backward reads dh, gate, up, writes dgate, dup
    m = tokens * INTERMEDIATE
    gu = [(3 * torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE),
           torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE)) for _ in range(2)]  # fmt: skip
    check("swiglu", OPS.swiglu(*gu[0], False), reference.swiglu(*gu[0]), silu_mul(*gu[0]))
    dh = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE)
    out.append(("swiglu fwd", 3 * m * e, lambda p: OPS.swiglu(p[0], p[1], False), gu, lambda p: silu_mul(*p), gu))
    swiglu_graphs = []
    for g, u in gu:
        gg, ug = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        swiglu_graphs.append((silu_mul(gg, ug), gg, ug, g, u))
    composite_backward = lambda s: torch.autograd.grad(s[0], (s[1], s[2]), dh, retain_graph=True)  # noqa: E731
    out.append(("swiglu bwd", 5 * m * e, lambda s: OPS.swiglu_backward(dh, s[3], s[4]), swiglu_graphs,
                composite_backward, swiglu_graphs))  # fmt: skip
    # (in place: overwrites its inputs with gradients on every call; the values drift, the bytes do not)
    scratch = [(g.clone(), u.clone()) for g, u in gu]
    out.append(("swiglu_ bwd in place", 5 * m * e, lambda s: OPS.swiglu_backward_(dh, s[0], s[1]), scratch,
                composite_backward, swiglu_graphs))  # fmt: skip
    return out


def memory_report(tokens) -> dict:
    """Peak extra memory of forward + backward through autograd, fused vs composite."""
    report = {}
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    w = torch.ones(HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    report["rms_norm"] = (peak_mib(lambda: block_ops.rms_norm(x, w).sum().backward()),
                          peak_mib(lambda: hf_rms_norm(x, w).sum().backward()))  # fmt: skip
    g0 = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE)
    u0 = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE)
    wg = torch.ones((), device="cuda", dtype=DTYPE, requires_grad=True)

    def mlp(fused):
        gate, up = g0 * wg, u0 * wg  # non-leaf activations, as a projection makes them
        h = block_ops.swiglu(gate, up, backward_inplace=True) if fused else silu_mul(gate, up)
        del gate, up
        h.sum().backward()

    report["swiglu (gate, up dead after)"] = (peak_mib(lambda: mlp(True)), peak_mib(lambda: mlp(False)))
    return {k: {"fused_mib": round(a, 1), "composite_mib": round(b, 1)} for k, (a, b) in report.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (the fused ops are used on CUDA only)")
    env = environment("cuda")
    ceiling, _ = copy_bandwidth_gbps("cuda")
    rows = []
    for name, n_bytes, fused, fused_inputs, composite, composite_inputs in cases(args.tokens):
        fused_ms = median_ms_cuda(fused, fused_inputs, args.reps)
        composite_ms = median_ms_cuda(composite, composite_inputs, args.reps)
        gbps = n_bytes / fused_ms / 1e6
        rows.append({"op": name, "tokens": args.tokens, "fused_ms": round(fused_ms, 4),
                     "composite_ms": round(composite_ms, 4), "speedup": round(composite_ms / fused_ms, 2),
                     "bytes": n_bytes, "fused_gbps": round(gbps, 1),
                     "fraction_of_copy_bw": round(gbps / ceiling, 3)})  # fmt: skip
        print(json.dumps(rows[-1]))
    memory = memory_report(args.tokens)
    print(json.dumps({"peak_memory_fwd_bwd": memory}))
    print(f"\ncopy bandwidth {ceiling:.0f} GB/s; {env['device_name']}, torch {env['torch']}")
    print(f"{'op':30} {'fused ms':>9} {'torch ms':>9} {'speedup':>8} {'GB/s':>7} {'of copy':>8}")
    for r in rows:
        print(f"{r['op']:30} {r['fused_ms']:9.4f} {r['composite_ms']:9.4f} {r['speedup']:7.2f}x "
              f"{r['fused_gbps']:7.0f} {r['fraction_of_copy_bw']:8.1%}")  # fmt: skip
    for k, v in memory.items():
        print(f"peak fwd+bwd memory, {k}: fused {v['fused_mib']} MiB, composite {v['composite_mib']} MiB")
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "copy_gbps": ceiling, "rows": rows, "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
