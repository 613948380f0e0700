"""The fine-tuning loop behind `qlora-ext finetune`: training steps with gradient accumulation,
a warmup + cosine learning rate, logging to metrics.jsonl, held-out evaluation, loss.png, and
crash-safe checkpoints that resume bit-exactly on the CPU.

Checkpoint layout, `<output>/checkpoints/step-00000050/`:
  trainable.safetensors   every trainable parameter, by name, exact (for resuming)
  adapter/                the same adapter in PEFT format (usable on its own)
  optimizer.safetensors   optimizer state tensors, keys "<param index>.<name>"
  optimizer.json          param_groups and non-tensor state
  rng.safetensors         torch CPU (and CUDA) generator states
  trainer_state.json      step, samples consumed, run config; written last
A checkpoint is built under a temporary name, synced to disk, then renamed into place; the
previous one is deleted only after that, so a crash at any moment leaves a complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .finetune_data import BatchOrder, Example, collate, collate_packed, evaluate, model_loss, pack_rows
from .io_utils import atomic_save_safetensors, atomic_write, atomic_write_json
from .oom import explain_oom
from .png_plot import plot_lines
from .progress import ProgressBar

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainSettings:
    steps: int
    lr: float
    batch_size: int
    grad_accum: int
    warmup_steps: int
    max_grad_norm: float
    seed: int
    log_every: int
    eval_every: int
    save_every: int
    packing: bool = False  # pack each micro-batch's examples into as few rows of seq_len as fit
    seq_len: int = 0  # row length for packing
    stop_after: int | None = None  # end early at this step, as if interrupted (tests)
    run_config: dict = field(default_factory=dict)


#: What lowers a training step's memory, in the order that usually helps most.
TRAINING_OOM_REMEDY = ("Lower --batch-size (raise --grad-accum to keep the effective batch) or the "
                       "example length, keep gradient checkpointing on (--gradient-checkpointing), "
                       "or use --optimizer paged_adamw, whose state can live in host memory")


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to `lr` over warmup_steps, then cosine decay to lr/10 at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, s.steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- checkpoints -------------------------------------------------------------------------------

def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    # Other top-level entries (PagedAdamW's "qlora_ext": state format and bit width) are JSON.
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    return tensors, {"param_groups": groups, "scalars": scalars, "extra": extra}


def _optimizer_from_files(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups, **meta.get("extra", {})})


def save_checkpoint(output_dir: Path, step: int, samples: int, model, optimizer, settings: TrainSettings,
                    save_adapter) -> Path:
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_save_safetensors(tmp / "trainable.safetensors",
                            {n: p.detach().cpu() for n, p in trainable_parameters(model).items()})
    save_adapter(model, tmp / "adapter")
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
    atomic_write_json(tmp / "optimizer.json", opt_meta)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    atomic_save_safetensors(tmp / "rng.safetensors", rng)
    atomic_write_json(tmp / STATE_FILE, {"step": step, "samples": samples, "run_config": settings.run_config})
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json exists), or None."""
    root = output_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def read_checkpoint_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Restores parameters, optimizer and RNG state; returns trainer_state.json."""
    params = trainable_parameters(model)
    saved = load_file(ckpt / "trainable.safetensors")
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"checkpoint {ckpt} does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); was it made with other --r/--model?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    meta = json.loads((ckpt / "optimizer.json").read_text(encoding="utf-8"))
    _optimizer_from_files(optimizer, load_file(ckpt / "optimizer.safetensors"), meta)
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return read_checkpoint_state(ckpt)


# ---- metrics and plot --------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        self.records: list[dict] = []
        if keep_until_step is not None and path.is_file():
            # Resuming: keep what was logged up to the checkpoint; later lines are re-logged.
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= keep_until_step:
                        self.records.append(rec)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self._file = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()


def write_loss_plot(path: Path, records: list[dict]) -> None:
    """loss.png: training loss per logged step (blue) and held-out answer loss (red)."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    series = [
        ([r["step"] for r in train], [r["loss"] for r in train], (31, 119, 180)),
        ([r["step"] for r in evals], [r["loss"] for r in evals], (214, 39, 40)),
    ]
    png = plot_lines(series)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))


# ---- the loop ----------------------------------------------------------------------------------

def _fmt_eval(result: dict) -> str:
    s = f"exact match {result['exact_match'] * 100:.1f}%, answer loss {result['loss']:.4f}"
    if "per_task" in result:
        s += " (" + ", ".join(f"{k} {v * 100:.0f}%" for k, v in result["per_task"].items()) + ")"
    return s


def train(model, optimizer, train_set: list[Example], eval_set: list[Example], pad_token_id: int,
          device: torch.device, settings: TrainSettings, output_dir: Path, save_adapter,
          resume_from: Path | None = None, say=print) -> dict:
    """Runs (or resumes) fine-tuning and writes metrics.jsonl, loss.png and checkpoints into
    `output_dir`. Returns {"before": eval, "after": eval, "steps", "seconds"}."""
    start_step, samples = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        start_step, samples = state["step"], state["samples"]
        say(f"resumed from {resume_from} at step {start_step}")
    metrics = MetricsLog(output_dir / "metrics.jsonl", keep_until_step=start_step if resume_from else None)
    order = BatchOrder(len(train_set), settings.seed)
    per_step = settings.batch_size * settings.grad_accum
    params = list(trainable_parameters(model).values())

    before = next((r for r in metrics.records if r.get("type") == "eval" and r.get("step") == 0), None)
    if before is None and eval_set:
        before = {"type": "eval", "step": 0, **evaluate(model, eval_set, pad_token_id, device)}
        metrics.log(before)
    if before is not None:
        say(f"held-out before fine-tuning: {_fmt_eval(before)}")

    end = settings.steps if settings.stop_after is None else min(settings.steps, settings.stop_after)
    bar = ProgressBar(settings.steps, start=start_step, every=settings.log_every)
    window_loss, window_tokens, window_steps, window_t0 = 0.0, 0, 0, time.monotonic()
    t_start = time.monotonic()
    model.train()
    step = start_step
    while step < end:
        lr = lr_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order.indices(samples, per_step)
        step_loss = 0.0
        for micro in range(settings.grad_accum):
            batch = [train_set[i] for i in idx[micro * settings.batch_size : (micro + 1) * settings.batch_size]]
            if settings.packing:
                input_ids, labels, position_ids = collate_packed(pack_rows(batch, settings.seq_len), pad_token_id)
                position_ids = position_ids.to(device)
            else:
                (input_ids, labels), position_ids = collate(batch, pad_token_id), None
            window_tokens += sum(len(e) for e in batch)
            doing = (f"training step {step + 1} (a micro-batch of {input_ids.shape[0]} x "
                     f"{input_ids.shape[1]} tokens: forward and backward)")  # fmt: skip
            with explain_oom(doing, TRAINING_OOM_REMEDY):
                loss, _ = model_loss(model, input_ids.to(device), labels.to(device), position_ids)
                (loss / settings.grad_accum).backward()
            step_loss += float(loss.detach()) / settings.grad_accum
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"the training loss became {step_loss} at step {step + 1}; try a lower --lr")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                          if settings.max_grad_norm > 0 else 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples += per_step
        window_loss += step_loss
        window_steps += 1

        fields = {"loss": f"{window_loss / window_steps:.4f}", "lr": f"{lr:.2e}",
                  "tok/s": f"{window_tokens / max(time.monotonic() - window_t0, 1e-9):.0f}"}
        if step % settings.log_every == 0 or step == end:
            now = time.monotonic()
            metrics.log({"type": "train", "step": step, "loss": window_loss / window_steps, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(now - window_t0, 1e-9),
                         "elapsed_s": now - t_start})
            bar.update(step, fields)
            window_loss, window_tokens, window_steps, window_t0 = 0.0, 0, 0, now
        else:
            bar.update(step, fields)
        if eval_set and settings.eval_every and step % settings.eval_every == 0 and step != settings.steps:
            result = evaluate(model, eval_set, pad_token_id, device)
            metrics.log({"type": "eval", "step": step, **result})
            bar.write(f"step {step}: held-out {_fmt_eval(result)}")
        if settings.save_every and (step % settings.save_every == 0 or step == end):
            save_checkpoint(output_dir, step, samples, model, optimizer, settings, save_adapter)
    bar.close()
    seconds = time.monotonic() - t_start

    after = None
    if eval_set and step == settings.steps:
        after = {"type": "eval", "step": step, **evaluate(model, eval_set, pad_token_id, device)}
        metrics.log(after)
        say(f"held-out after fine-tuning:  {_fmt_eval(after)}")
    metrics.close()
    write_loss_plot(output_dir / "loss.png", metrics.records)
    return {"before": before, "after": after, "steps": step, "seconds": seconds}
