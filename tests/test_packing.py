"""Sequence packing: examples back to back in one row, positions restarting at each example, must
give every example exactly the loss (and the batch exactly the gradient) it gets unpacked."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import qlora_ext
from qlora_ext.builtin.tiny_llama import TinyLlama, TinyLlamaConfig, packed_causal_mask
from qlora_ext.finetune_data import IGNORE_INDEX, Example, collate, collate_packed, model_loss, pack_rows
from train_helpers import VOCAB, hf_model, randomize_adapters


def random_examples(n: int, seed: int, vocab: int = VOCAB, max_len: int = 12) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, a = rng.randint(0, 6), rng.randint(1, max_len - 6)  # an empty prompt is allowed
        out.append(Example([rng.randrange(vocab) for _ in range(p)], [rng.randrange(vocab) for _ in range(a)]))
    return out


def test_pack_rows_places_every_example_once_within_the_row_length():
    examples = random_examples(40, seed=3)
    rows = pack_rows(examples, 24)
    placed = [id(e) for row in rows for e in row]
    assert sorted(placed) == sorted(id(e) for e in examples)
    assert all(sum(len(e) for e in row) <= 24 for row in rows)
    total = sum(len(e) for e in examples)
    assert len(rows) < len(examples) and len(rows) >= -(-total // 24)
    assert pack_rows(examples, 24) == rows  # deterministic


def test_pack_rows_gives_an_oversized_example_its_own_row():
    long, short = Example([1] * 5, [2] * 10), Example([1], [2])
    assert pack_rows([short, long], 8) == [[long], [short]]
    with pytest.raises(ValueError, match="max_tokens"):
        pack_rows([short], 0)


def test_collate_packed_positions_and_labels():
    a, b = Example([5, 6], [7, 8]), Example([], [9, 10, 11])
    ids, labels, pos = collate_packed([[a, b], [b]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 11], [9, 10, 11, 0, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    # Answer tokens are labelled, except an example's first token (no context of its own).
    assert labels.tolist() == [[-100, -100, 7, 8, -100, 10, 11], [-100, 10, 11, -100, -100, -100, -100]]


def test_packed_mask_keeps_attention_inside_each_example():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_causal_mask(pos)[0, 0]
    segment = [0, 0, 0, 1, 1, 2]
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and segment[i] == segment[j]), (i, j)


def per_example_losses_unpacked(model, examples, pad) -> list[torch.Tensor]:
    out = []
    for e in examples:
        ids, labels = collate([e], pad)
        logits = _logits(model, ids)
        out.append(F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"))
    return out


def per_example_losses_packed(model, rows, pad) -> list[torch.Tensor]:
    ids, labels, pos = collate_packed(rows, pad)
    logits = _logits(model, ids, pos)
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(len(rows), -1)  # fmt: skip
    out = []
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            out.append(token_loss[r, at : at + len(e) - 1].sum())  # the targets of this example's tokens
            at += len(e)
    return out


def _logits(model, ids, pos=None):
    extra = {} if pos is None else {"position_ids": pos}
    out = model(input_ids=ids, **extra)
    return out[1] if isinstance(out, tuple) else out.logits


def _models():
    return [
        pytest.param("builtin", id="builtin"),
        pytest.param("llama", id="hf-llama"),
        pytest.param("qwen2", id="hf-qwen2"),
    ]


def _prepared(kind: str):
    if kind == "builtin":
        cfg = TinyLlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)  # fmt: skip
        model = TinyLlama.from_seed(cfg, seed=0)
    else:
        model = hf_model(kind)
    torch.manual_seed(0)
    qlora_ext.prepare(model, r=4, alpha=8)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("kind", _models())
def test_packed_per_example_losses_equal_unpacked(kind):
    model = _prepared(kind).eval()
    examples = random_examples(9, seed=11)
    rows = pack_rows(examples, 30)
    assert any(len(row) > 1 for row in rows)
    order = [e for row in rows for e in row]
    with torch.no_grad():
        packed = per_example_losses_packed(model, rows, pad=0)
        alone = per_example_losses_unpacked(model, order, pad=0)
    for got, want in zip(packed, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", _models())
def test_packed_batch_loss_and_lora_gradients_equal_unpacked(kind):
    """Through model_loss, as the trainer calls it (the fused LM-head loss for transformers models)."""
    examples = random_examples(7, seed=5)
    grads, losses = [], []
    for packed in (False, True):
        model = _prepared(kind).train()
        if packed:
            ids, labels, pos = collate_packed(pack_rows(examples, 28), 0)
        else:
            (ids, labels), pos = collate(examples, 0), None
        loss, _ = model_loss(model, ids, labels, pos)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_without_positions_would_leak_across_examples():
    """The equality above is not vacuous: the same packed row without its position ids (one long
    causal sequence) gives the second example a different loss."""
    model = _prepared("builtin").eval()
    a, b = random_examples(2, seed=2)
    ids, labels, pos = collate_packed([[a, b]], 0)
    with torch.no_grad():
        with_pos = _logits(model, ids, pos)[0, len(a):]
        without = _logits(model, ids)[0, len(a):]
    assert not torch.allclose(with_pos, without, atol=1e-3)


def test_builtin_rejects_bad_position_ids():
    model = TinyLlama.from_seed(TinyLlamaConfig(), seed=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids has shape"):
        model(ids, position_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids must lie"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 10**6]]))
