"""benchmarks/bench_lora_family.py's interleaved mode: every case's model built at once, their
timed steps in turns, ratios per round (drift on the machine falls on all cases alike)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_lora_family  # noqa: PLC0415

    return bench_lora_family


def test_paired_ratio_is_the_median_of_the_rounds(bench):
    base = {"step_s": [1.0, 2.0, 4.0]}
    other = {"step_s": [1.1, 2.4, 4.0]}  # per round: 1.1, 1.2, 1.0
    assert bench.paired_ratio(other, base) == pytest.approx(1.1)


def test_interleaved_run_times_every_case_each_round(bench, monkeypatch):
    order = []
    original = bench.Case.timed_step

    def spy(case):
        order.append(case.name)
        original(case)

    monkeypatch.setattr(bench.Case, "timed_step", spy)
    args = argparse.Namespace(device="cpu", batch=1, seq=16, r=4, lr=1e-3, warmup=1, steps=3, no_checkpointing=False)
    results = bench.run_interleaved(["lora", "dora"], "tiny", args)
    assert [r["case"] for r in results] == ["lora", "dora"]
    assert all(r["interleaved"] and len(r["step_s"]) == 3 for r in results)
    # round i starts with case i mod 2: the order rotates so neither always goes first
    assert order == ["lora", "dora", "dora", "lora", "lora", "dora"]
    assert all(r["final_loss"] == r["final_loss"] and r["final_loss"] > 0 for r in results)  # finite


def test_case_settings_hold_during_its_steps_only(bench, monkeypatch):
    """A case with settings (dora+torch_mul) runs its steps with its module settings, then restores
    them: the default case in the same interleaved run keeps the default path."""
    from qlora_ext import dora  # noqa: PLC0415

    seen = []
    original = dora.dora_output

    def spy(z, c, bias):
        seen.append(dora.COLUMN_SCALE_DEVICES)
        return original(z, c, bias)

    monkeypatch.setattr(dora, "dora_output", spy)
    monkeypatch.setattr(dora, "COLUMN_SCALE_DEVICES", ("sentinel",))
    with bench.module_settings({"qlora_ext.dora.COLUMN_SCALE_DEVICES": ("cpu", "cuda")}):
        assert dora.COLUMN_SCALE_DEVICES == ("cpu", "cuda")
    assert dora.COLUMN_SCALE_DEVICES == ("sentinel",)
    with pytest.raises(RuntimeError), bench.module_settings({"qlora_ext.dora.COLUMN_SCALE_DEVICES": ()}):
        raise RuntimeError("restored on error too")
    assert dora.COLUMN_SCALE_DEVICES == ("sentinel",)

    args = argparse.Namespace(device="cpu", batch=1, seq=16, r=4, lr=1e-3, warmup=1, steps=1, no_checkpointing=False)
    results = bench.run_interleaved(["dora", "dora+torch_mul"], "tiny", args)
    assert results[1]["settings"] == {"qlora_ext.dora.COLUMN_SCALE_DEVICES": "('cpu',)"}
    assert ("sentinel",) in seen and ("cpu",) in seen
    assert dora.COLUMN_SCALE_DEVICES == ("sentinel",)


def test_device_time_sums_the_cuda_events_of_one_call(bench, monkeypatch):
    """--kernel-time: the summed self device time of the CUDA events (kernels, copies) of one step,
    in ms; CPU-side events do not count; None off CUDA."""
    import types  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.profiler  # noqa: PLC0415
    from torch.autograd import DeviceType  # noqa: PLC0415

    events = [types.SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=1500.0),
              types.SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=9999.0),
              types.SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=250.0)]  # fmt: skip
    calls = []

    class FakeProfile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert bench.device_time_ms(lambda: calls.append(1), "cuda") == pytest.approx(1.75)
    assert calls == [1]
    assert bench.device_time_ms(lambda: calls.append(2), "cpu") is None
    assert calls == [1]  # off CUDA nothing runs


def test_interleaved_run_with_kernel_time_on_cpu(bench):
    args = argparse.Namespace(device="cpu", batch=1, seq=16, r=4, lr=1e-3, warmup=1, steps=2, no_checkpointing=False,
                              kernel_time=True)  # fmt: skip
    results = bench.run_interleaved(["lora", "dora"], "tiny", args)
    assert [r["kernel_ms"] for r in results] == [None, None]
    bench.print_table(results)  # no kernel-time line without CUDA, and no error
