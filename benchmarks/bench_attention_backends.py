"""Which of PyTorch's SDPA kernels a QLoRA training step should attend with: flash, cuDNN and
memory-efficient attention timed side by side at Llama-3-8B attention shapes, forward and
forward + backward, with the backend PyTorch picks by itself.

    python benchmarks/bench_attention_backends.py [--seq 2048 8192] [--reps 20] [--out FILE.json]

Shapes: batch 1, 32 query heads and 8 key/value heads of 128 (grouped, `enable_gqa=True`, as
transformers calls SDPA when no mask is needed), causal, bf16. Training attends three times a
layer and step (forward, the checkpointed recomputation, backward), so at seq 8192 attention is
about a quarter of an 8B step: a faster backend is worth its ratio times that share.

For each backend: the forward output and the three input gradients are compared with an fp32
math-backend run of the same inputs (at every --seq up to --check-max-seq; above it with the flash
backend's result as the yardstick) by ‖out − ref‖ / ‖ref‖, and the backend must err at most 2x as
much as flash does plus one bf16 rounding; a failure is reported and that backend's times are
not used. "default" is whatever PyTorch selects with every backend enabled; the kernels it
launched (names from the profiler) say which one that is. Median device time over --reps calls
with CUDA events; FLOP/s count causal attention as half the full product (4·S²·D·H/2 forward,
2.5x that backward).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4 import environment, median_ms_cuda  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {
    "default": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}
BF16_EPS = 2.0**-8


def attend(q, k, v, backends):
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def inputs(seq: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, grad


def forward_backward(q, k, v, grad, backends):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attend(q, k, v, backends)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def relative_errors(results, reference):
    return [((r.float() - ref.float()).norm() / ref.float().norm()).item() for r, ref in zip(results, reference)]


def median_ms(fn, reps: int) -> float:
    return median_ms_cuda(lambda _: fn(), [None], reps, warmup=3)


def kernels_launched(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n[:120] for n in names if "elementwise" not in n and "fill" not in n.lower())


def bench_seq(seq: int, reps: int, check_max_seq: int, env: dict) -> list[dict]:
    q, k, v, grad = inputs(seq, seed=seq)
    if seq <= check_max_seq:
        reference = forward_backward(q.float(), k.float(), v.float(), grad.float(), [SDPBackend.MATH])
        yardstick = "fp32 math backend"
    else:
        reference = forward_backward(q, k, v, grad, [SDPBackend.FLASH_ATTENTION])
        yardstick = "flash backend (bf16)"
    flash_errors = relative_errors(forward_backward(q, k, v, grad, [SDPBackend.FLASH_ATTENTION]), reference)
    fwd_flop = 4 * seq * seq * HEAD_DIM * HEADS / 2
    cases = []
    for name, backends in BACKENDS.items():
        case = dict(env, seq=seq, backend=name, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, yardstick=yardstick)
        try:
            errors = relative_errors(forward_backward(q, k, v, grad, backends), reference)
        except RuntimeError as exc:  # the backend does not take this case
            case.update(available=False, reason=str(exc).splitlines()[0][:200])
            cases.append(case)
            print(json.dumps(case), flush=True)
            continue
        limits = [2 * f + BF16_EPS for f in flash_errors]
        case.update(available=True, rel_errors=dict(zip(("out", "dq", "dk", "dv"), errors)),
                    correct=all(e <= lim for e, lim in zip(errors, limits)))  # fmt: skip
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        fwd_ms = median_ms(lambda: attend(q, k, v, backends), reps)
        step_ms = median_ms(lambda: attend(qg, kg, vg, backends).backward(grad), reps)
        case.update(forward_ms=round(fwd_ms, 4), forward_backward_ms=round(step_ms, 4),
                    forward_tflops=round(fwd_flop / fwd_ms / 1e9, 1),
                    forward_backward_tflops=round(3.5 * fwd_flop / step_ms / 1e9, 1))  # fmt: skip
        if name == "default":
            case["kernels"] = kernels_launched(lambda: attend(qg, kg, vg, backends).backward(grad))
        cases.append(case)
        print(json.dumps(case), flush=True)
    return cases


def table(cases: list[dict]) -> str:
    lines = [f"{'seq':>6} {'backend':10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'x flash':>8}  correct"]
    flash = {c["seq"]: c["forward_backward_ms"] for c in cases if c["backend"] == "flash" and c.get("available")}
    for c in cases:
        if not c.get("available"):
            lines.append(f"{c['seq']:>6} {c['backend']:10} not available: {c['reason'][:60]}")
            continue
        ratio = flash.get(c["seq"], float("nan")) / c["forward_backward_ms"]
        lines.append(f"{c['seq']:>6} {c['backend']:10} {c['forward_ms']:>8.3f} {c['forward_backward_ms']:>11.3f} "
                     f"{c['forward_backward_tflops']:>8.1f} {ratio:>8.2f}  {c['correct']}")  # fmt: skip
    for c in cases:
        if "kernels" in c:
            lines.append(f"seq {c['seq']} default launched: {'; '.join(c['kernels'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--check-max-seq", type=int, default=4096,
                        help="longest sequence checked against the fp32 math backend (its S² scores)")
    parser.add_argument("--out", help="write the JSON records here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention_backends: needs a CUDA device")
    env = environment("cuda")
    cases = [c for seq in args.seq for c in bench_seq(seq, args.reps, args.check_max_seq, env)]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(c) + "\n" for c in cases))
    print(table(cases))


if __name__ == "__main__":
    main()
