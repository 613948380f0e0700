"""Fine-tuning data: JSONL reading with line-numbered errors, tokenization with the loss on the
answer only, deterministic batching, and the held-out evaluation (exact match + answer loss).

A JSONL line is either ``{"prompt": str, "completion": str}`` or
``{"messages": [{"role": str, "content": str}, ...]}`` whose last message is the assistant's
answer. Other keys are kept (e.g. "task", used to report per-task accuracy).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]  # ends with EOS (or what the chat template puts after the answer)
    task: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def _check_record(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least 2 messages (a prompt and the answer)")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (the answer trained on), "
                            f"got {msgs[-1]['role']!r}")
        return obj
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string")
        if not obj["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
        return obj
    raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(obj)}")


def read_jsonl(path: str | Path) -> list[dict]:
    """Validated records of a JSONL file; blank lines are allowed, anything malformed raises
    DataError naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(_check_record(obj, where))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


class ByteEncoding:
    """Records → token ids with the built-in ByteTokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def encode(self, rec: dict) -> tuple[list[int], list[int]]:
        if "messages" in rec:
            prompt, answer = self.tok.format_chat(rec["messages"])
        else:
            prompt, answer = self.tok.format_prompt(rec["prompt"]), rec["completion"]
        return self.tok.encode(prompt, add_bos=True), self.tok.encode(answer, add_eos=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)


class HFEncoding:
    """Records → token ids with a transformers tokenizer; chats use its chat template if it has one.

    The prompt and the answer are tokenized separately so that the boundary between them (where
    the loss starts) is exact.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; the model could not learn where an answer ends")
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def encode(self, rec: dict) -> tuple[list[int], list[int]]:
        if "messages" in rec and self.has_template:
            msgs = rec["messages"]
            prompt = self.tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
            full = self.tok.apply_chat_template(msgs, tokenize=False)
            if not full.startswith(prompt):
                raise DataError("the chat template renders the conversation without its prompt as a prefix; "
                                "cannot tell where the answer starts")
            answer_ids = self._ids(full[len(prompt):], special=False)
            if self.eos_token_id not in answer_ids:
                answer_ids.append(self.eos_token_id)
            return self._ids(prompt, special=False), answer_ids
        if "messages" in rec:
            msgs = rec["messages"]
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
            answer = msgs[-1]["content"]
        else:
            prompt, answer = rec["prompt"], rec["completion"]
        return self._ids(prompt, special=True), self._ids(answer, special=False) + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def encode_records(records: list[dict], encoding, seq_len: int, source: str) -> tuple[list[Example], int]:
    """Tokenized examples, cut to `seq_len` tokens (the answer's tail is cut first). Returns
    (examples, number dropped because not one answer token fit)."""
    examples, dropped = [], 0
    for rec in records:
        prompt_ids, answer_ids = encoding.encode(rec)
        answer_ids = answer_ids[: max(0, seq_len - len(prompt_ids))]
        if not answer_ids:
            dropped += 1
            continue
        examples.append(Example(prompt_ids, answer_ids, str(rec.get("task", ""))))
    if not examples:
        raise DataError(f"{source}: no example has room for its answer within --seq-len {seq_len}")
    return examples, dropped


def collate(examples: Sequence[Example], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, labels: [B, T] int64, right-padded to the longest example; labels are the input
    ids on answer tokens and IGNORE_INDEX on prompt and padding (the model shifts them)."""
    T = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        p, n = len(e.prompt_ids), len(e)
        input_ids[i, :n] = torch.tensor(e.prompt_ids + e.answer_ids)
        labels[i, p:n] = torch.tensor(e.answer_ids)
    return input_ids, labels


def pack_rows(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """Examples grouped into rows of at most `max_tokens` tokens, first-fit decreasing: the fewest
    rows this simple rule finds, deterministically (ties keep the input order). An example longer
    than `max_tokens` gets a row of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=len, reverse=True):  # sorted() is stable
        slot = next((i for i, r in enumerate(room) if r >= len(e)), None)
        if slot is None:
            rows.append([e])
            room.append(max_tokens - len(e))
        else:
            rows[slot].append(e)
            room[slot] -= len(e)
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels, position_ids: [R, T] int64 for rows of packed examples, right-padded to
    the longest row. Each example's positions restart at 0, which is what tells the model where
    one example ends (attention stays inside an example, RoPE sees the example's own positions).
    The first token of
    each example never carries a label: predicting it would need the previous example's context."""
    T = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            p, n = len(e.prompt_ids), len(e)
            input_ids[i, at : at + n] = torch.tensor(e.prompt_ids + e.answer_ids)
            labels[i, at + max(p, 1) : at + n] = torch.tensor(e.answer_ids[max(0, 1 - p):])
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        # Padding is a segment of its own (positions from 0), so no real token attends to it.
        position_ids[i, at:] = torch.arange(T - at)
    return input_ids, labels, position_ids


class BatchOrder:
    """Which examples each optimizer step sees: epoch e is a permutation drawn from
    seed + e, and sample k of the run is example perm_{k // n}[k % n]. The data position is
    therefore a pure function of the step, so a resumed run sees exactly the same batches."""

    def __init__(self, n_examples: int, seed: int):
        self.n, self.seed = n_examples, seed
        self._cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + count)]


def model_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer-token loss, logits) for the built-in model (returns a tuple) and for
    transformers models (return an object with .loss and .logits). With `position_ids` (packed
    rows, see collate_packed) and no attention mask, transformers models keep attention inside
    each packed example."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=input_ids, labels=labels, **extra)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out.loss, out.logits


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out[1] if isinstance(out, tuple) else out.logits


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], pad_token_id: int, device, batch_size: int = 64) -> dict:
    """Held-out scores: `exact_match`, the fraction of examples whose greedy answer equals the
    reference token for token (through its EOS); `loss`, the mean answer-token cross-entropy;
    `per_task` exact match where the examples name a task.

    Greedy decoding batches examples of equal prompt length, so no padding or attention mask is
    needed and the result does not depend on the batch size."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, n_tokens = 0.0, 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            input_ids, labels = collate(chunk, pad_token_id)
            loss, _ = model_loss(model, input_ids.to(device), labels.to(device))
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss_sum += float(loss) * k
            n_tokens += k

        correct: dict[str, list[bool]] = {}
        by_len: dict[int, list[Example]] = {}
        for e in examples:
            by_len.setdefault(len(e.prompt_ids), []).append(e)
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                x = torch.tensor([e.prompt_ids for e in chunk], device=device)
                steps = max(len(e.answer_ids) for e in chunk)
                for _ in range(steps):
                    nxt = _logits(model, x)[:, -1].argmax(-1, keepdim=True)
                    x = torch.cat([x, nxt], dim=1)
                generated = x[:, len(chunk[0].prompt_ids) :].tolist()
                for e, g in zip(chunk, generated):
                    correct.setdefault(e.task, []).append(g[: len(e.answer_ids)] == e.answer_ids)
        flat = [c for v in correct.values() for c in v]
        result = {"exact_match": sum(flat) / len(flat), "loss": loss_sum / max(n_tokens, 1)}
        if any(correct) and len(correct) > 1:
            result["per_task"] = {k: sum(v) / len(v) for k, v in sorted(correct.items())}
        return result
    finally:
        model.train(was_training)


def steps_for_epochs(epochs: float, n_examples: int, examples_per_step: int) -> int:
    return max(1, math.ceil(epochs * n_examples / examples_per_step))
