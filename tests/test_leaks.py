"""1,000 training steps of a tiny prepared model hold no more memory at the end than after warm-up.

Host: resident set size (/proc/self/statm) and the number of live tensors the garbage collector
tracks; device (CUDA runs): torch.cuda.memory_allocated. benchmarks/leak_check.py measures the
same on the GPU machine at a larger size."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from train_helpers import hf_model, token_batch

import qlora_ext

STEPS, WARMUP = 1000, 100
RSS_GROWTH_LIMIT = 16 << 20  # allocator noise is a few MB; a per-step leak of 16 KB would pass 16 MB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_steps_do_not_grow_memory(method):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model("llama").to(device)
    qlora_ext.prepare(model, r=4, method=method, verbose=False)  # checkpointing and fused loss on
    model.train()
    opt = qlora_ext.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = token_batch().to(device)
    marks = {}
    for step in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in (WARMUP, STEPS):
            gc.collect()
            marks[step + 1] = (_rss(), _live_tensors(), torch.cuda.memory_allocated() if device == "cuda" else 0)
    (rss0, tensors0, dev0), (rss1, tensors1, dev1) = marks[WARMUP], marks[STEPS]
    assert tensors1 <= tensors0, (tensors0, tensors1)
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (rss0, rss1)
    assert dev1 <= dev0, (dev0, dev1)
    assert torch.isfinite(loss)
