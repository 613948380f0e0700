"""Where a training step leaves the GPU idle, and what the host was doing meanwhile.

bench_train.py --kernel-time showed an 8B step whose kernels summed to 214.7 ms in a 237.5 ms
step (H100, session 17): ~23 ms with no kernel running. This profiles one step of a bench_train
case (same model, prepare() and optimizer, after warm-up) with CPU and CUDA activity and reports:

- the step's span, the union of its device activity (kernels, copies, memsets on every stream) and
  the idle rest, split by phase (forward / backward / optimizer, marked with record_function);
- idle time by the host op that was running while the GPU idled (the overlap of each CPU event's
  interval with the idle intervals, inclusive of its children): a synchronisation shows up as a
  runtime call (cudaStreamSynchronize, cudaEventSynchronize, cudaMemcpy...) and host-bound
  stretches as the Python-level autograd Functions and aten ops that dispatch too slowly;
- the largest single gaps with the op that launched the next kernel and its ancestors;
- the host's own time by op (self CPU time, the profiler's overhead included): where a host-bound
  step spends it.

    python benchmarks/profile_step_gaps.py --model 8b --seq 2048 --stack ours [--out F.json]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import BUILDERS, SHAPES  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def overlap(intervals: list[tuple[float, float]], starts: list[float], start: float, end: float) -> float:
    """Length of [start, end] ∩ the union of sorted disjoint `intervals` (starts: their starts)."""
    total, i = 0.0, max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(intervals) and intervals[i][0] < end:
        a, b = intervals[i]
        total += max(0.0, min(b, end) - max(a, start))
        i += 1
    return total


def analyse(events, min_gap_us: float, top: int) -> dict:
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    # (record_function ranges appear on the GPU timeline too, spanning their kernels: not activity)
    device = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in PHASES
              and not getattr(e, "is_user_annotation", False)]  # fmt: skip
    by_id = {e.id: e for e in cpu}
    phases = {e.name: (e.time_range.start, e.time_range.end) for e in cpu if e.name in PHASES}
    span = (min(a for a, _ in phases.values()), max(b for _, b in phases.values()))
    busy = merged([(e.time_range.start, e.time_range.end) for e in device])
    idle, previous_end = [], span[0]
    for start, end in busy:
        if start > previous_end:
            idle.append((previous_end, start))
        previous_end = max(previous_end, end)
    if span[1] > previous_end:
        idle.append((previous_end, span[1]))
    idle = [(max(a, span[0]), min(b, span[1])) for a, b in idle if min(b, span[1]) > max(a, span[0])]
    idle_starts = [a for a, _ in idle]
    busy_us = sum(b - a for a, b in busy)
    phase_idle = {name: overlap(idle, idle_starts, *rng) / 1e3 for name, rng in phases.items()}
    phase_ms = {name: (b - a) / 1e3 for name, (a, b) in phases.items()}

    # What the host ran while the GPU idled: inclusive overlap per op name.
    by_name: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for e in cpu:
        if e.name in PHASES:
            continue
        o = overlap(idle, idle_starts, e.time_range.start, e.time_range.end)
        if o > 0:
            by_name[e.name] += o
            counts[e.name] += 1
    host_table = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]

    # The largest gaps: the op that launched the kernel that ended each.
    device_sorted = sorted(device, key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in device_sorted]
    gaps = []
    for a, b in sorted(idle, key=lambda g: -(g[1] - g[0]))[:top]:
        if (b - a) < min_gap_us:
            break
        i = bisect.bisect_left(starts, b)
        chain = []
        if i < len(device_sorted):
            op = by_id.get(getattr(device_sorted[i], "linked_correlation_id", None))  # (torch >= 2.12)
            while op is not None and len(chain) < 6:
                chain.append(op.name)
                op = op.cpu_parent
        gaps.append({"us": round(b - a, 1), "at_ms": round((a - span[0]) / 1e3, 2),
                     "next": device_sorted[i].name[:80] if i < len(device_sorted) else None, "launched_by": chain})
    hist = collections.Counter()
    for a, b in idle:
        d = b - a
        hist["<10us" if d < 10 else "10-50us" if d < 50 else "50-200us" if d < 200 else "200us-1ms" if d < 1000 else ">=1ms"] += d / 1e3
    return {
        "step_ms": (span[1] - span[0]) / 1e3, "device_busy_ms": busy_us / 1e3,
        "idle_ms": sum(b - a for a, b in idle) / 1e3, "idle_gaps": len(idle),
        "idle_ms_by_gap_size": dict(hist), "phase_ms": phase_ms, "phase_idle_ms": phase_idle,
        "host_ops_during_idle_ms": [(name, round(ms / 1e3, 3), counts[name]) for name, ms in host_table],
        "largest_gaps": gaps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--stack", default="ours", choices=sorted(BUILDERS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.manual_seed(0)
    model, opt = BUILDERS[args.stack](args.model, args.seq)
    model.train()
    vocab = SHAPES[args.model]["vocab_size"]

    def step():
        ids = torch.randint(0, vocab, (1, args.seq), device="cuda")
        with record_function("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    host = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()
                   if e.device_type == DeviceType.CPU), key=lambda row: -row[1])[: args.top]  # fmt: skip
    result = {"stack": args.stack, "model": args.model, "seq": args.seq, "device": torch.cuda.get_device_name(),
              **analyse(prof.events(), args.min_gap_us, args.top),
              "host_self_ms_by_op": [(name, round(ms, 3), n) for name, ms, n in host]}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
