"""Out-of-memory errors name what was being allocated and the setting that lowers it (simulated:
the allocation that fails is made to raise torch.OutOfMemoryError)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import hf_model

import qlora_ext
from qlora_ext.oom import explain_oom


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_explain_oom_keeps_the_type_torchs_message_and_the_cause():
    with pytest.raises(torch.OutOfMemoryError) as info:
        with explain_oom("doing X", "Lower Y"):
            _raise_oom()
    text = str(info.value)
    assert text.startswith("qlora_ext: out of memory while doing X. Lower Y.") and "Tried to allocate 2.00 GiB" in text
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="^plain$"):
        with explain_oom("doing X", "Lower Y"):
            raise ValueError("plain")


def test_prepare_names_the_layer_being_quantized(monkeypatch):
    model = hf_model("llama")
    monkeypatch.setattr(qlora_ext.NF4Weight, "from_float", classmethod(lambda cls, *a, **k: _raise_oom()))
    with pytest.raises(torch.OutOfMemoryError, match=r"quantizing model\.layers\.0\.self_attn\.q_proj \[64, 64\].*load_bnb_4bit"):
        qlora_ext.prepare(model, verbose=False)


def test_optimizer_names_its_state_and_the_budget_knob(monkeypatch):
    from qlora_ext.optim import paged_adamw

    p = torch.nn.Parameter(torch.randn(100))
    p.grad = torch.randn(100)
    opt = qlora_ext.PagedAdamW([p])
    monkeypatch.setattr(paged_adamw, "Pager", _raise_oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"allocating resident optimizer state.*device_budget"):
        opt.step()


def test_training_step_names_the_batch_and_the_knobs(monkeypatch, tmp_path):
    import qlora_ext.finetune as finetune

    monkeypatch.setattr(finetune, "model_loss", _raise_oom)
    from qlora_ext import cli

    with pytest.raises(torch.OutOfMemoryError, match=r"training step 1 \(a micro-batch of \d+ x \d+ tokens.*--batch-size.*--gradient-checkpointing"):
        cli.main(["finetune", "--output-dir", str(tmp_path / "run"), "--steps", "2", "--device", "cpu"])
