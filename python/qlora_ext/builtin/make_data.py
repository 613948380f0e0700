"""Writes the built-in data set: short string transformations of random lowercase words.

    python -m qlora_ext.builtin.make_data      # rewrites builtin/data/string_tasks_{train,heldout}.jsonl

Deterministic (fixed seed). Held-out words never occur in the training split, so the held-out
score measures whether the model learned each transformation, not the words.
Each line: {"task": ..., "prompt": "uppercase: qlmx", "completion": "QLMX"}.
"""

from __future__ import annotations

import json
import os
import random
import string
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 1234
N_TRAIN_PER_TASK = 800
N_HELDOUT_PER_TASK = 40
MIN_LEN, MAX_LEN = 3, 6

TASKS = {
    "uppercase": lambda w: w.upper(),
    "reverse": lambda w: w[::-1],
    "first letter": lambda w: w[0],
    "last letter": lambda w: w[-1],
    "length": lambda w: str(len(w)),
}


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_split(rng: random.Random, n_per_task: int, avoid: set[str]) -> list[dict]:
    rows = []
    for task, fn in TASKS.items():
        words: list[str] = []
        seen = set(avoid)
        while len(words) < n_per_task:
            w = random_word(rng)
            if w not in seen:
                seen.add(w)
                words.append(w)
        rows += [{"task": task, "prompt": f"{task}: {w}", "completion": fn(w)} for w in words]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_splits() -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), the same on every call."""
    rng = random.Random(SEED)
    heldout = make_split(rng, N_HELDOUT_PER_TASK, avoid=set())
    train = make_split(rng, N_TRAIN_PER_TASK, avoid={r["prompt"].split(": ", 1)[1] for r in heldout})
    return train, heldout


def main() -> None:
    train, heldout = build_splits()
    DATA_DIR.mkdir(exist_ok=True)
    write_jsonl(DATA_DIR / "string_tasks_train.jsonl", train)
    write_jsonl(DATA_DIR / "string_tasks_heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {DATA_DIR}")


if __name__ == "__main__":
    main()
