"""Summed GPU device time of one call, for the end-to-end benchmarks (bench_lora_family.py,
bench_train.py --kernel-time).

A wall-clock step on a shared machine stretches when the host is slowed (the GPU then idles
between kernels); the sum of the step's kernel and copy durations does not. Comparing both tells
host noise from kernel cost: on the H100 of 2026-12-06 one QLoRA 8B step ranged 209-362 ms
within a run, against 221 +- 3 ms on a quiet day. Imports only torch (Unsloth's process must not
load qlora_ext).
"""

from __future__ import annotations


def device_time_ms(fn, device: str) -> float | None:
    """The summed self device time (ms) of the CUDA kernels and memory copies that one call of fn
    runs (torch.profiler's CUDA activity); None on other devices (fn is not called then)."""
    if not str(device).startswith("cuda"):
        return None
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e3
