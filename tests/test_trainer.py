"""A prepared model trains under transformers' Trainer (README's recipe): loss falls, only the
adapters change, and the adapter it saves loads back with the same logits."""

from __future__ import annotations

import pytest
import torch

import qlora_ext
from train_helpers import hf_model, logits

transformers = pytest.importorskip("transformers")


class RepeatedBatch(torch.utils.data.Dataset):
    """One fixed sequence, many times: a task a LoRA adapter learns in a few steps."""

    def __init__(self, vocab: int, seq: int = 16, items: int = 64):
        self.ids = torch.randint(0, vocab, (seq,), generator=torch.Generator().manual_seed(0))
        self.items = items

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        return {"input_ids": self.ids, "labels": self.ids}


def test_trainer_trains_a_prepared_model(tmp_path):
    model = qlora_ext.prepare(hf_model("llama"), r=8, alpha=16, verbose=False)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = RepeatedBatch(model.config.vocab_size)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(logged) == 32 and all(torch.isfinite(torch.tensor(logged)))
    assert logged[-1] < 0.75 * logged[0], logged  # measured: 4.18 -> 2.88 over 32 steps
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters_before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed"

    qlora_ext.save_adapter(model, tmp_path / "adapter")
    reloaded = qlora_ext.load_adapter(qlora_ext.prepare(hf_model("llama"), r=8, alpha=16, verbose=False), tmp_path / "adapter")
    ids = data[0]["input_ids"][None]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=1e-5)
