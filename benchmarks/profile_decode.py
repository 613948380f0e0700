"""Where a decode step's GPU time goes: the kernels of eager decode steps of an 8B-shaped Llama
(bench_decode's random model, fewer layers by default), per stack, grouped by kernel name.

    python benchmarks/profile_decode.py [--layers 8] [--steps 8] [--stacks bf16,nf4_merged]

Eager steps (no CUDA graph) under torch.profiler: each kernel's device time is what it costs in a
graph replay too; a replay adds ~1-2 us of launch gap per kernel, which the kernel count shows.
Prints, per stack, the kernels by total device time per decode step: calls per step, us per step,
and the share of the step's kernel time; and the step's kernel count and summed kernel time.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qlora_ext  # noqa: E402
from bench_decode import random_llama  # noqa: E402
from qlora_ext.layers import QLoRALinear  # noqa: E402


def profile_stack(name, model, prompt, steps, top) -> None:
    qlora_ext.generate(model, prompt, 4, cuda_graphs=False)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        qlora_ext.generate(model, prompt, steps + 1, cuda_graphs=False)  # prefill + `steps` decode steps
        torch.cuda.synchronize()
    # The prefill's kernels are told apart by size: profile a prefill alone and subtract.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prefill:
        qlora_ext.generate(model, prompt, 1, cuda_graphs=False)
        torch.cuda.synchronize()

    def totals(p):
        t = collections.defaultdict(lambda: [0, 0.0])
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t[e.name][0] += 1
                t[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        return t

    both, pre = totals(prof), totals(prefill)
    rows = []
    for kernel, (count, us) in both.items():
        c0, u0 = pre.get(kernel, (0, 0.0))
        if count - c0 > 0:
            rows.append((kernel, (count - c0) / steps, max(us - u0, 0.0) / steps))
    rows.sort(key=lambda r: -r[2])
    step_us = sum(r[2] for r in rows)
    step_kernels = sum(r[1] for r in rows)
    print(f"\n== {name}: {step_kernels:.0f} kernels a decode step, {step_us:.0f} us of kernel time")
    print(f"{'calls':>7} {'us/step':>9} {'share':>6}  kernel")
    for kernel, calls, us in rows[:top]:
        print(f"{calls:7.1f} {us:9.1f} {us / step_us:6.1%}  {kernel[:110]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stacks", default="bf16,nf4_merged")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--decode-attention-kernel", action="store_true",
                        help="switch decode_attention's CUDA kernels on (block_ops.set_decode_attention_kernel)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.decode_attention_kernel:
        qlora_ext.block_ops.set_decode_attention_kernel(True)
    stacks = args.stacks.split(",")
    model = random_llama("8b", args.layers, 64, "cuda")
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    print(f"8B-shaped Llama, {args.layers} layers, batch 1, prompt 16, {args.steps} eager decode steps; "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    if "bf16" in stacks:
        profile_stack("bf16", model, prompt, args.steps, args.top)
    if "nf4_merged" in stacks:
        qlora_ext.prepare(model, r=16, alpha=16, gradient_checkpointing=False, verbose=False)
        for layer in model.modules():
            if isinstance(layer, QLoRALinear):
                layer.merge()
        profile_stack("nf4_merged", model, prompt, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
