"""benchmarks/bench_train.py's memory accounting: bitsandbytes' paged optimizer state lives in CUDA
managed memory, which torch.cuda.max_memory_allocated() never sees; the benchmark adds it back so
the peers' peak is compared on the same footing as ours (whose state PyTorch allocates)."""

from __future__ import annotations

from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_managed_state_counts_only_the_paged_tensors(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train  # noqa: PLC0415

    params = [torch.nn.Parameter(torch.zeros(300, 500)), torch.nn.Parameter(torch.zeros(7))]
    opt = torch.optim.AdamW(params)
    paged = torch.zeros(300, 500)
    paged.is_paged = True  # how bitsandbytes marks a buffer from cudaMallocManaged
    opt.state[params[0]] = {"state1": paged, "state2": paged.clone(), "step": torch.tensor(3.0)}
    opt.state[params[1]] = {"state1": torch.zeros(7), "step": 3}
    # Only the first is marked; clone() drops the Python attribute, as a copy would be torch's.
    assert bench_train.managed_optimizer_state_bytes(opt) == 300 * 500 * 4
    opt.state[params[0]]["state2"].is_paged = True
    assert bench_train.managed_optimizer_state_bytes(opt) == 2 * 300 * 500 * 4
    assert bench_train.managed_optimizer_state_bytes(torch.optim.AdamW(params)) == 0


def test_the_warmup_run_is_the_first_case_shortened(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train as bench  # noqa: PLC0415

    cmd = bench.warmup_command("8b", "unsloth", 8192)
    assert cmd == bench.child_command("unsloth", "8b", 8192, 2)
    assert cmd[cmd.index("--steps") + 1] == "2" and cmd[cmd.index("--child") + 1] == "unsloth"
    assert cmd[cmd.index("--seq") + 1] == "8192" and cmd[cmd.index("--model") + 1] == "8b"
    assert bench.child_command("ours", "1b", 2048, 5, 24.0)[-2:] == ["--cap-gib", "24.0"]
    assert "--cap-gib" not in bench.child_command("ours", "1b", 2048, 5)


def test_kernel_time_reaches_the_child(monkeypatch):
    """--kernel-time is passed to every measured case's process (the warm-up run needs none)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train as bench  # noqa: PLC0415

    assert bench.child_command("ours", "8b", 2048, 8, None, True)[-1] == "--kernel-time"
    assert bench.child_command("ours", "8b", 2048, 8, 24.0, True)[-3:] == ["--cap-gib", "24.0", "--kernel-time"]
    assert "--kernel-time" not in bench.child_command("ours", "8b", 2048, 8)
    assert "--kernel-time" not in bench.warmup_command("8b", "ours", 2048)


def test_a_case_past_its_time_is_skipped_and_the_file_keeps_what_was_measured(monkeypatch, tmp_path):
    """--child-timeout: a case that runs too long is recorded as skipped (with --cap-gib its stack
    stops there, as at an out-of-memory) and the JSON is rewritten after every case, so a run
    killed from outside keeps the cases it finished."""
    import json
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train as bench  # noqa: PLC0415

    out = tmp_path / "longest.json"
    written = []

    def fake_run(cmd, capture_output, text, timeout=None):
        seq = int(cmd[cmd.index("--seq") + 1])
        written.append([r["seq"] for r in json.loads(out.read_text())] if out.exists() else None)
        if seq == 8192:
            raise subprocess.TimeoutExpired(cmd, timeout)
        assert seq == 4096 and timeout == 30.0
        result = {"stack": "ours", "model": "1b", "seq": seq, "tokens_per_s": 1.0, "peak_device_gib": 1.0,
                  "peak_allocated_gib": 1.0, "managed_optimizer_state_gib": 0.0, "mfu_vs_748_tflops": 0.5}
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(result) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "environment", lambda: {"device": "test"})
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--model", "1b", "--stacks", "ours", "--cap-gib", "24",
                                      "--seq", "4096", "8192", "16384", "--no-warmup-run", "--child-timeout", "30",
                                      "--out", str(out)])  # fmt: skip
    bench.main()
    records = json.loads(out.read_text())
    assert [r.get("seq") for r in records[:2]] == [4096, 8192]
    assert "tokens_per_s" in records[0] and "timed out after 30 s" in records[1]["skipped"]
    assert len(records) == 3 and records[2]["longest"] == {"ours": 4096}  # 16384 never ran
    assert written == [None, [4096]]  # on disk before the next case starts


def test_rounds_alternate_the_order_and_report_ratios_within_each_round(monkeypatch, tmp_path):
    """--rounds: the stacks run that many times per length, in alternating order, and each
    stack's summary holds its ratio ours/this per round (measured side by side) and their
    median, so a host that drifts between rounds does not bias the ratio."""
    import json
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train as bench  # noqa: PLC0415

    ran = []
    speed = {"ours": 300.0, "peer": 200.0}  # ours 1.5x the peer's in every round ...
    drift = [1.0, 0.5, 2.0]  # ... while the host's speed changes between rounds

    def fake_run(cmd, capture_output, text, timeout=None):
        stack = cmd[cmd.index("--child") + 1]
        round_index = len(ran) // 2
        ran.append(stack)
        result = {"stack": stack, "model": "1b", "seq": 2048, "tokens_per_s": speed[stack] * drift[round_index],
                  "peak_device_gib": 1.0, "peak_allocated_gib": 1.0, "managed_optimizer_state_gib": 0.0,
                  "mfu_vs_748_tflops": 0.5}  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(result) + "\n", "")

    out = tmp_path / "rounds.json"
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "environment", lambda: {"device": "test"})
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--model", "1b", "--stacks", "ours,peer", "--rounds", "3",
                                      "--no-warmup-run", "--out", str(out)])  # fmt: skip
    bench.main()
    assert ran == ["ours", "peer", "peer", "ours", "ours", "peer"]
    records = json.loads(out.read_text())
    assert [r["round"] for r in records if "round" in r] == [0, 0, 1, 1, 2, 2]
    summaries = {r["stack"]: r for r in records if r.get("summary") == "rounds"}
    assert summaries["peer"]["ratios_ours_to_this"] == [1.5, 1.5, 1.5]
    assert summaries["peer"]["median_ratio_ours_to_this"] == 1.5 and summaries["ours"]["median_ratio_ours_to_this"] == 1.0
    assert summaries["peer"]["median_tokens_per_s"] == 200.0 and summaries["peer"]["rounds"] == 3
