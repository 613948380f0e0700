"""Where one training step of a LoRA-family case spends its GPU time, kernel by kernel, against
plain QLoRA: bench_lora_family's model, prepare and optimizer, warm-up steps, then one step under
torch.profiler (CUDA activity). Prints each case's top kernels by self CUDA time with their launch
counts, and the kernels whose summed time differs most between the first case and the others.

    python benchmarks/profile_lora_family.py --shape 1b --cases lora,dora --top 25
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_family import CASES, SHAPES, Case  # noqa: E402


def kernel_times(case: Case) -> dict[str, tuple[float, int]]:
    """kernel name -> (self CUDA ms, launches) of one step."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        case.step()
        torch.cuda.synchronize()
    return {e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="lora,dora", help="comma-separated, the first is the baseline: " + ",".join(CASES))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    args.device, args.batch, args.lr, args.no_checkpointing = "cuda", 1, 1e-4, False
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}")
    print(f"# {args.shape} seq {args.seq} r {args.r}: one profiled step per case after {args.warmup} warm-up steps, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")  # fmt: skip
    profiles = {}
    for name in names:
        case = Case(name, args.shape, args)
        profiles[name] = kernel_times(case)
        case.close()
        total = sum(ms for ms, _ in profiles[name].values())
        print(f"\n== {name}: summed kernel time {total:.1f} ms, {sum(n for _, n in profiles[name].values())} launches")
        print(f"{'self ms':>9} {'calls':>6}  kernel")
        for key, (ms, n) in sorted(profiles[name].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"{ms:9.3f} {n:6d}  {key[:110]}")
    base = profiles[names[0]]
    for name in names[1:]:
        diff = collections.Counter()
        for key in set(base) | set(profiles[name]):
            diff[key] = profiles[name].get(key, (0.0, 0))[0] - base.get(key, (0.0, 0))[0]
        print(f"\n== {name} - {names[0]}: the kernels adding the most time (ms, launches {name} / {names[0]})")
        for key, ms in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
            print(f"{ms:+9.3f} {profiles[name].get(key, (0, 0))[1]:6d} / {base.get(key, (0, 0))[1]:<6d} {key[:100]}")


if __name__ == "__main__":
    main()
