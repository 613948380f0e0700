"""The built-in data set (see make_data.py): short string transformations of random words, a
training split and a held-out split whose words never occur in training."""

from __future__ import annotations

from pathlib import Path

from ..finetune_data import read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "string_tasks_train.jsonl"
HELDOUT_FILE = DATA_DIR / "string_tasks_heldout.jsonl"


def load_splits() -> tuple[list[dict], list[dict]]:
    """(training records, held-out records), each {"task", "prompt", "completion"}."""
    return read_jsonl(TRAIN_FILE), read_jsonl(HELDOUT_FILE)
