"""A fine-tuning job killed with SIGKILL at random moments, several times, and resumed each time
ends with the same adapter, bit for bit, as a run that was never interrupted (CPU)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 40
ARGS = ["--builtin-config", "test", "--warmup-steps", "3", "--log-every", "2", "--device", "cpu",
        "--eval-size", "20", "--eval-every", "20", "--steps", str(STEPS), "--save-every", "1",
        "--batch-size", "8", "--dropout", "0.1", "--optimizer", "paged_adamw"]  # fmt: skip
import qlora_ext  # noqa: E402

# The children import the same qlora_ext as this process (a source tree with its built module, or
# the installed package), single-threaded so that their arithmetic is reproducible.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(qlora_ext.__file__).resolve().parents[1])}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_ext.cli", "finetune", "--output-dir", str(out), *ARGS, *extra]


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) if root.exists() else []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_random_moments_then_resume_gives_the_same_adapter(tmp_path):
    rng = random.Random(int(os.environ.get("QLORA_TEST_SEED", "0")))
    whole = tmp_path / "whole"
    subprocess.run(_command(whole), env=ENV, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    kills = 0
    for attempt in range(3):
        extra = ["--resume"] if _checkpoints(killed) else []
        proc = subprocess.Popen(_command(killed, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Only the newest checkpoint is kept, so "a checkpoint of its own" is a step name not seen before.
        seen = set(_checkpoints(killed))
        deadline = time.monotonic() + 120
        while proc.poll() is None and not set(_checkpoints(killed)) - seen and time.monotonic() < deadline:
            time.sleep(0.02)  # until this run has written a checkpoint of its own
        time.sleep(rng.uniform(0.0, 0.15))  # then at an arbitrary moment: mid-step, mid-save, ...
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2, "the job finished before it could be killed; make it longer"
    final = subprocess.run(_command(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]

    expected = load_file(whole / "adapter" / "adapter_model.safetensors")
    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
