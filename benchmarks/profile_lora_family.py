"""Where one training step of a LoRA-family case spends its GPU time, kernel by kernel, against
plain QLoRA: bench_lora_family's model, prepare and optimizer, warm-up steps, then one step under
torch.profiler (CUDA activity). Prints each case's top kernels by self CUDA time with their launch
counts, and the kernels whose summed time differs most between the first case and the others;
with --host also the host side (self CPU time per op and autograd Function), where a host-bound
step (1B) spends it.

    python benchmarks/profile_lora_family.py --shape 1b --cases lora,dora --top 25 [--host]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_family import CASES, SHAPES, Case  # noqa: E402


def step_profile(case: Case, host: bool) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int]]]:
    """Of one step: kernel name -> (self CUDA ms, launches), and with `host` op or Python function
    name -> (self CPU ms, calls) (torch.profiler's CPU activity, with_stack off: aten/qlora ops and
    autograd Functions), else {}."""
    cuda = case.device.startswith("cuda")
    activities = ([ProfilerActivity.CUDA] if cuda else []) + ([ProfilerActivity.CPU] if host or not cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        case.step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = {e.key: (e.self_device_time_total / 1e3, e.count) for e in events if e.device_type == DeviceType.CUDA}
    cpu = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in events if e.device_type == DeviceType.CPU} if host else {}
    return kernels, cpu


def print_differences(title: str, base: dict, other: dict, top: int, unit: str) -> None:
    """The names whose summed time differs most between two profiles."""
    print(f"\n== {title} ({unit}, count other / base)")
    diff = {key: other.get(key, (0.0, 0))[0] - base.get(key, (0.0, 0))[0] for key in set(base) | set(other)}
    for key, ms in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"{ms:+9.3f} {other.get(key, (0, 0))[1]:6d} / {base.get(key, (0, 0))[1]:<6d} {key[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="lora,dora", help="comma-separated, the first is the baseline: " + ",".join(CASES))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (no kernels to list)")
    p.add_argument("--host", action="store_true",
                   help="also profile the host (self CPU time per op and autograd Function): where a host-bound "
                        "step spends its time")  # fmt: skip
    args = p.parse_args()
    args.batch, args.lr, args.no_checkpointing = 1, 1e-4, False
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# {args.shape} seq {args.seq} r {args.r}: one profiled step per case after {args.warmup} warm-up steps, "
          f"{device_name}, torch {torch.__version__}")  # fmt: skip
    profiles, hosts = {}, {}
    for name in names:
        case = Case(name, args.shape, args)
        profiles[name], hosts[name] = step_profile(case, args.host)
        case.close()
        total = sum(ms for ms, _ in profiles[name].values())
        print(f"\n== {name}: summed kernel time {total:.1f} ms, {sum(n for _, n in profiles[name].values())} launches"
              + (f"; host self time {sum(ms for ms, _ in hosts[name].values()):.1f} ms" if args.host else ""))  # fmt: skip
        print(f"{'self ms':>9} {'calls':>6}  kernel")
        for key, (ms, n) in sorted(profiles[name].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"{ms:9.3f} {n:6d}  {key[:110]}")
    for name in names[1:]:
        print_differences(f"{name} - {names[0]}: kernels", profiles[names[0]], profiles[name], args.top, "ms")
        if args.host:
            print_differences(f"{name} - {names[0]}: host, self CPU time per op (profiler overhead included)",
                              hosts[names[0]], hosts[name], args.top, "ms")  # fmt: skip


if __name__ == "__main__":
    main()
