"""The built-in model, tokenizer and data set behind `qlora-ext finetune`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qlora_ext.builtin import ByteTokenizer, TinyLlama, TinyLlamaConfig
from qlora_ext.builtin import data as builtin_data
from qlora_ext.builtin.make_data import build_splits
from qlora_ext.finetune_data import IGNORE_INDEX, BatchOrder, ByteEncoding, collate, encode_records, evaluate

SMALL = TinyLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, max_position_embeddings=64)


@pytest.mark.parametrize("text", ["", "abc", "uppercase: qlmx\n", "héllo wörld ✓", "\x00\xff"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text + "<eos>"


def test_tokenizer_rejects_unknown_ids():
    with pytest.raises(ValueError, match="259"):
        ByteTokenizer().decode([65, 259])


def test_chat_format_puts_the_answer_last():
    prompt, answer = ByteTokenizer().format_chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}])
    assert prompt == "user: hi\nassistant: " and answer == "HI"


def _batch(cfg, B=3, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    return ids, labels


def test_forward_shapes_and_shifted_loss():
    model = TinyLlama.from_seed(SMALL, seed=1)
    ids, labels = _batch(SMALL)
    loss, logits = model(ids, labels)
    assert logits.shape == (3, 17, SMALL.vocab_size)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, SMALL.vocab_size), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    assert model(ids)[0] is None
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


def test_forward_is_causal():
    model = TinyLlama.from_seed(SMALL, seed=1)
    ids, _ = _batch(SMALL, B=1)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % SMALL.vocab_size
    torch.testing.assert_close(model(ids)[1][:, :10], model(changed)[1][:, :10])


def test_from_seed_is_deterministic_and_seed_dependent():
    a, b, c = (TinyLlama.from_seed(SMALL, seed=s) for s in (3, 3, 4))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tied_embeddings_share_one_tensor():
    cfg = TinyLlamaConfig(**{**SMALL.to_dict(), "tie_word_embeddings": True})
    model = TinyLlama.from_seed(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyLlamaConfig(num_attention_heads=4, num_key_value_heads=3)


def test_too_long_input_is_refused():
    model = TinyLlama.from_seed(SMALL)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, SMALL.max_position_embeddings + 1, dtype=torch.long))


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss, _ = model(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prepared", [False, True], ids=["float", "qlora"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(prepared):
    torch.manual_seed(0)
    model = TinyLlama.from_seed(SMALL, seed=2)
    if prepared:
        from qlora_ext.prepare import prepare

        prepare(model, r=4, alpha=8, gradient_checkpointing=False, verbose=False)
        with torch.no_grad():  # make B non-zero so that every adapter gradient is non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    model.train()
    ids, labels = _batch(SMALL)
    loss_plain, grads_plain = _loss_and_grads(model, ids, labels)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=0, msg=name)


def test_builtin_data_matches_its_generator_and_splits_are_disjoint():
    train, heldout = builtin_data.load_splits()
    gen_train, gen_heldout = build_splits()
    assert train == gen_train and heldout == gen_heldout
    words = lambda rows: {r["prompt"].split(": ", 1)[1] for r in rows}  # noqa: E731
    assert not words(train) & words(heldout)
    assert {r["task"] for r in heldout} == {r["task"] for r in train} and len(heldout) >= 100


def test_labels_cover_the_answer_only():
    tok = ByteTokenizer()
    recs = [{"prompt": "reverse: abc", "completion": "cba"}, {"prompt": "length: abcdef", "completion": "6"}]
    examples, dropped = encode_records(recs, ByteEncoding(tok), seq_len=64, source="t")
    assert dropped == 0
    ids, labels = collate(examples, tok.pad_token_id)
    assert ids.shape == labels.shape == (2, max(len(e) for e in examples))
    first = examples[0]
    assert ids[0, : len(first)].tolist() == tok.encode("reverse: abc\n", add_bos=True) + tok.encode("cba", add_eos=True)
    supervised = [i for i in labels[0].tolist() if i != IGNORE_INDEX]
    assert tok.decode(supervised) == "cba" and supervised[-1] == tok.eos_token_id
    assert labels[0, : len(first.prompt_ids)].eq(IGNORE_INDEX).all()
    assert ids[1, len(examples[1]):].eq(tok.pad_token_id).all() and labels[1, len(examples[1]):].eq(IGNORE_INDEX).all()


def test_seq_len_cuts_the_answer_and_drops_examples_without_room():
    recs = [{"prompt": "x" * 20, "completion": "yyyy"}, {"prompt": "x" * 40, "completion": "z"}]
    examples, dropped = encode_records(recs, ByteEncoding(ByteTokenizer()), seq_len=24, source="t")
    assert dropped == 1 and len(examples) == 1 and len(examples[0]) == 24


def test_batch_order_is_a_function_of_position():
    order = BatchOrder(10, seed=3)
    whole = order.indices(0, 30)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[10:20] != whole[:10]
    assert BatchOrder(10, seed=3).indices(13, 9) == whole[13:22]


class _Oracle(torch.nn.Module):
    """Predicts the reference answer of known prompts (to test the evaluation itself)."""

    def __init__(self, examples, vocab):
        super().__init__()
        self.table = {tuple(e.prompt_ids + e.answer_ids[:k]): e.answer_ids[k]
                      for e in examples for k in range(len(e.answer_ids))}
        self.vocab = vocab

    def forward(self, input_ids, labels=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                logits[b, t, self.table.get(tuple(row[: t + 1]), 0)] = 50.0
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return loss, logits


def test_evaluate_exact_match():
    tok = ByteTokenizer()
    recs = [{"prompt": f"uppercase: {w}", "completion": w.upper(), "task": "u"} for w in ("ab", "cd", "efg")]
    recs.append({"prompt": "length: abc", "completion": "3", "task": "l"})
    examples, _ = encode_records(recs, ByteEncoding(tok), 64, "t")
    oracle = _Oracle(examples[:3], tok.vocab_size)
    result = evaluate(oracle, examples, tok.pad_token_id, torch.device("cpu"), batch_size=2)
    assert result["exact_match"] == 0.75
    assert result["per_task"] == {"l": 0.0, "u": 1.0}


def test_builtin_data_lines_are_json_objects():
    for path in (builtin_data.TRAIN_FILE, builtin_data.HELDOUT_FILE):
        for line in path.read_text().splitlines():
            assert set(json.loads(line)) == {"task", "prompt", "completion"}
