"""`qlora-ext`: the command line.

    qlora-ext finetune                       # built-in tiny Llama + built-in data, a few minutes on a CPU
    qlora-ext finetune --model DIR --data train.jsonl [options]
    qlora-ext info                           # version, build, device
    qlora-ext --version

Exit status: 0 done, 2 bad input (nothing written), 1 an unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
from pathlib import Path

import torch

from . import __version__
from .finetune_data import DataError

EPILOG_FINETUNE = """\
With no --model and no --data this fine-tunes the built-in model (a small Llama-architecture
network, 4 layers x 128 wide, byte-level tokenizer) on the built-in data set (string
transformations of random words: uppercase, reverse, first/last letter, length), on CUDA if
available, else the CPU. There is no pretrained checkpoint to download: the base model is
initialised from a fixed seed and quantized to NF4, and the LoRA adapters learn the task on top
of that random base. It shows that the whole path works and that the adapters learn; it is not
a useful language model.

Data (--data, --eval-data): JSONL, one example per line, either
  {"prompt": "...", "completion": "..."}
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
The loss is on the completion (the last, assistant, message) only. Chats use the tokenizer's
chat template when it has one. A malformed line stops the run with its file and line number.

Outputs in --output-dir (default ./qlora-ext-out):
  adapter/          the LoRA adapter, PEFT format (adapter_config.json, adapter_model.safetensors)
  metrics.jsonl     one JSON object per logged step ("type": "train") and evaluation ("eval")
  loss.png          training loss (blue) and held-out answer loss (red) against the step
  checkpoints/      the latest checkpoint (every --save-every steps), for --resume
  run_config.json   the settings of the run
"""

# Settings that change the result: a resumed run must keep them (the run's own values are used).
FIXED_ON_RESUME = ("model", "data", "eval_data", "eval_size", "method", "r", "alpha", "dropout", "rslora", "lr",
                   "seq_len", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "max_grad_norm",
                   "seed", "optimizer", "gradient_checkpointing", "dtype", "builtin_config", "packing")

# The built-in model is so small that recomputing activations (checkpointing) only costs time.
BUILTIN_DEFAULTS = {"lr": 3e-3, "steps": 1200, "r": 16, "alpha": 32.0, "batch_size": 32, "warmup_steps": 30,
                    "gradient_checkpointing": False}
HF_DEFAULTS = {"lr": 2e-4, "epochs": 1.0, "r": 16, "alpha": 16.0, "batch_size": 4, "warmup_steps": 10}
COMMON_DEFAULTS = {"method": "lora", "dropout": 0.0, "rslora": False, "seq_len": 256, "grad_accum": 1, "weight_decay": 0.0,
                   "max_grad_norm": 1.0, "seed": 0, "optimizer": "adamw", "gradient_checkpointing": True,
                   "dtype": "auto", "log_every": 10, "eval_every": 0, "save_every": 100, "eval_size": None,
                   "builtin_config": "default", "packing": False, "offload_checkpoints": None, "model": None, "data": None, "eval_data": None}


class UsageError(Exception):
    """Bad command-line input; reported without a traceback, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-ext", description="QLoRA fine-tuning on one small GPU (or the CPU).")
    parser.add_argument("--version", action="version", version=f"qlora-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,info}")
    sub.add_parser("info", help="print the version, how the extension was built, and the device")
    ft = sub.add_parser("finetune", help="fine-tune a model with QLoRA (built-in demo with no arguments)",
                        description="Fine-tune a causal LM with QLoRA: NF4 base weights, LoRA adapters.",
                        epilog=EPILOG_FINETUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults are None here and filled in later: built-in and --model runs differ, and --resume
    # takes unset values from the run being resumed.
    src = ft.add_argument_group("model and data")
    src.add_argument("--model", metavar="DIR", help="a local transformers checkpoint (default: the built-in model)")
    src.add_argument("--data", metavar="FILE", help="training JSONL (default: the built-in data set)")
    src.add_argument("--eval-data", metavar="FILE",
                     help="held-out JSONL (default: the built-in held-out split, or --eval-size examples of --data)")
    src.add_argument("--eval-size", type=int, metavar="N",
                     help="held-out examples: with --data and no --eval-data, hold out N of --data (default 10%%, "
                          "at most 100); with the built-in data, use the first N of its held-out split (200)")
    src.add_argument("--seq-len", type=int, metavar="T", help="longest example in tokens, the answer is cut past it (256)")
    src.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                     help="--model's compute dtype (auto: bfloat16 on CUDA, else float32)")
    lora = ft.add_argument_group("LoRA")
    # Delta-LoRA is left out: its base update runs after each optimizer step (DeltaLoRAUpdater),
    # which this loop does not drive yet.
    lora.add_argument("--method", choices=["lora", "dora", "lora_fa", "vera"],
                      help="adapter type (lora): DoRA, LoRA-FA (A frozen) or VeRA (shared random projections)")
    lora.add_argument("--r", type=int, help="LoRA rank (16)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha; scale alpha/r (built-in 32, else 16)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout (0)")
    lora.add_argument("--rslora", action="store_true", default=None, help="scale alpha/sqrt(r) (rank-stabilised LoRA)")
    opt = ft.add_argument_group("optimization")
    opt.add_argument("--lr", type=float, help="peak learning rate (built-in 3e-3, else 2e-4)")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (built-in 1200)")
    length.add_argument("--epochs", type=float, help="passes over the training data (with --model: 1)")
    opt.add_argument("--batch-size", type=int, help="examples per micro-batch (built-in 32, else 4)")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (1)")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup steps, then cosine decay to lr/10")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay (0)")
    opt.add_argument("--max-grad-norm", type=float, help="clip the gradient norm (1.0; 0 = off)")
    opt.add_argument("--optimizer", choices=["adamw", "paged_adamw"], help="adamw (torch) or qlora_ext's PagedAdamW")
    ckpt = opt.add_mutually_exclusive_group()
    ckpt.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                      help="recompute activations in backward (default with --model; off for the built-in model)")
    ckpt.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                      default=None, help="keep activations instead of recomputing them (faster, more memory)")
    offload = opt.add_mutually_exclusive_group()
    offload.add_argument("--offload-checkpoints", dest="offload_checkpoints", action="store_true", default=None,
                         help="keep the checkpointed layer inputs in pinned host memory, not on the GPU "
                              "(default wherever it applies: --model with gradient checkpointing, on a GPU)")
    offload.add_argument("--no-offload-checkpoints", dest="offload_checkpoints", action="store_false", default=None,
                         help="keep the checkpointed layer inputs on the GPU")
    opt.add_argument("--packing", action="store_true", default=None,
                     help="pack each micro-batch's examples into as few --seq-len rows as fit (no padding; "
                          "attention stays inside each example)")
    opt.add_argument("--seed", type=int, help="seed of the adapter initialisation, data order and dropout (0)")
    run = ft.add_argument_group("run")
    run.add_argument("--output-dir", default="qlora-ext-out", metavar="DIR", help="where outputs go (./qlora-ext-out)")
    run.add_argument("--overwrite", action="store_true", help="write into a non-empty directory that is not a qlora-ext run")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    run.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    run.add_argument("--log-every", type=int, help="log a metrics line every N steps (10)")
    run.add_argument("--eval-every", type=int, help="also evaluate every N steps (0: only before and after)")
    run.add_argument("--save-every", type=int, help="checkpoint every N steps (100; 0: no checkpoints)")
    # Testing aids, not shown in --help.
    run.add_argument("--builtin-config", choices=["default", "test"], help=argparse.SUPPRESS)
    run.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    return parser


# ---- settings ------------------------------------------------------------------------------------

def _resolve(args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: explicit flags, else the resumed run's values, else the defaults."""
    keys = set(COMMON_DEFAULTS) | set(BUILTIN_DEFAULTS) | set(HF_DEFAULTS) | {"steps", "epochs"}
    explicit = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    for k in ("data", "eval_data", "model"):
        if k in explicit:
            explicit[k] = str(Path(explicit[k]).resolve())
    if saved is not None:
        for k in FIXED_ON_RESUME:
            if k in explicit and explicit[k] != saved.get(k):
                raise UsageError(f"--resume: --{k.replace('_', '-')} {explicit[k]} differs from the run being "
                                 f"resumed ({saved.get(k)}); drop it or start a new run")
        base = dict(saved)
        if "steps" in explicit or "epochs" in explicit:
            base.pop("steps", None), base.pop("epochs", None)
        return {**base, **explicit}
    model_defaults = HF_DEFAULTS if explicit.get("model") else BUILTIN_DEFAULTS
    settings = {**COMMON_DEFAULTS, **model_defaults, **explicit}
    if "steps" in explicit:
        settings.pop("epochs", None)
    if "epochs" in explicit:
        settings.pop("steps", None)
    return settings


def _validate(s: dict) -> None:
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise UsageError(message)

    need(s["seq_len"] >= 8, f"--seq-len must be at least 8, got {s['seq_len']}")
    need(s["r"] >= 1, f"--r must be at least 1, got {s['r']}")
    need(s["alpha"] > 0, f"--alpha must be positive, got {s['alpha']}")
    need(0.0 <= s["dropout"] < 1.0, f"--dropout must be in [0, 1), got {s['dropout']}")
    need(s["lr"] > 0, f"--lr must be positive, got {s['lr']}")
    need(s.get("steps") is None or s["steps"] >= 1, f"--steps must be at least 1, got {s.get('steps')}")
    need(s.get("epochs") is None or s["epochs"] > 0, f"--epochs must be positive, got {s.get('epochs')}")
    need(s["batch_size"] >= 1, f"--batch-size must be at least 1, got {s['batch_size']}")
    need(s["grad_accum"] >= 1, f"--grad-accum must be at least 1, got {s['grad_accum']}")
    need(s["warmup_steps"] >= 0, f"--warmup-steps must be >= 0, got {s['warmup_steps']}")
    need(s["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {s['weight_decay']}")
    need(s["max_grad_norm"] >= 0, f"--max-grad-norm must be >= 0, got {s['max_grad_norm']}")
    need(s["log_every"] >= 1, f"--log-every must be at least 1, got {s['log_every']}")
    need(s["eval_every"] >= 0, f"--eval-every must be >= 0, got {s['eval_every']}")
    need(s["save_every"] >= 0, f"--save-every must be >= 0, got {s['save_every']}")
    need(s["eval_size"] is None or s["eval_size"] >= 0, f"--eval-size must be >= 0, got {s['eval_size']}")
    need(not s["offload_checkpoints"] or (s["gradient_checkpointing"] and s.get("model") is not None),
         "--offload-checkpoints needs --model (a transformers checkpoint) and gradient checkpointing")
    for key in ("data", "eval_data"):
        if s.get(key) is not None and not Path(s[key]).is_file():
            raise UsageError(f"--{key.replace('_', '-')} {s[key]}: no such file")
    if s.get("model") is not None and not Path(s["model"]).is_dir():
        raise UsageError(f"--model {s['model']}: no such directory (a local transformers checkpoint is expected)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


# ---- output directory ----------------------------------------------------------------------------

RUN_CONFIG = "run_config.json"


def _read_run_config(out: Path) -> dict | None:
    """The run_config.json of an earlier qlora-ext run in `out`, or None if `out` is not one."""
    try:
        cfg = json.loads((out / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and "qlora_ext_version" in cfg else None


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume from, its run settings); raises UsageError before anything is written."""
    from .finetune import latest_checkpoint, read_checkpoint_state

    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} exists and is not a directory")
    if resume:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start")
        return ckpt, read_checkpoint_state(ckpt)["run_config"]
    if out.is_dir() and any(out.iterdir()) and _read_run_config(out) is None and not overwrite:
        raise UsageError(f"--output-dir {out} is not empty and holds no qlora-ext run; "
                         "choose another directory or pass --overwrite")
    return None, None


# ---- model and data ------------------------------------------------------------------------------

def _builtin_model(config_name: str):
    from .builtin import TinyLlama, TinyLlamaConfig

    if config_name == "test":
        config = TinyLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128)
    else:
        config = TinyLlamaConfig()
    return TinyLlama.from_seed(config, seed=0)


def _hf_model(model_dir: str, dtype_name: str, device: torch.device):
    try:
        import transformers
        from packaging.version import Version
    except ImportError:
        raise UsageError("--model needs the transformers package: pip install 'qlora_ext[hf]'") from None
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {model_dir}: cannot load a causal LM and tokenizer: {exc}") from None
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # the evaluation decodes without a cache; nothing needs one
    return model, tokenizer


def _load_data(s: dict, encoding, say) -> tuple[list, list]:
    from .builtin import data as builtin_data
    from .finetune_data import encode_records, read_jsonl

    if s["data"] is None:
        train_records, eval_records = builtin_data.load_splits()
        train_src, eval_src = str(builtin_data.TRAIN_FILE), str(builtin_data.HELDOUT_FILE)
        if s["eval_size"] is not None:
            eval_records = eval_records[: s["eval_size"]]
    else:
        train_records, train_src = read_jsonl(s["data"]), s["data"]
        if s["eval_data"] is not None:
            eval_records, eval_src = read_jsonl(s["eval_data"]), s["eval_data"]
        else:
            n = s["eval_size"] if s["eval_size"] is not None else min(100, len(train_records) // 10)
            if n >= len(train_records):
                raise UsageError(f"--eval-size {n} leaves no training examples (the data has {len(train_records)})")
            rng = random.Random(s["seed"])
            picked = set(rng.sample(range(len(train_records)), n))
            eval_records = [r for i, r in enumerate(train_records) if i in picked]
            train_records = [r for i, r in enumerate(train_records) if i not in picked]
            eval_src = f"{n} examples held out of {train_src}"
    if s["eval_data"] is not None and s["data"] is None:
        eval_records, eval_src = read_jsonl(s["eval_data"]), s["eval_data"]
    train_set, dropped = encode_records(train_records, encoding, s["seq_len"], train_src)
    if dropped:
        say(f"warning: {dropped} training example(s) dropped: the prompt alone is longer than --seq-len {s['seq_len']}")
    eval_set = []
    if eval_records:
        eval_set, dropped = encode_records(eval_records, encoding, s["seq_len"], eval_src)
        if dropped:
            say(f"warning: {dropped} held-out example(s) dropped: prompt longer than --seq-len {s['seq_len']}")
    return train_set, eval_set


def _optimizer(name: str, params: list, lr: float, weight_decay: float):
    if name == "paged_adamw":
        from .optim import PagedAdamW

        return PagedAdamW(params, lr=lr, weight_decay=weight_decay) if params else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ---- commands ------------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, flush=True)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import TrainSettings, train
    from .finetune_data import ByteEncoding, HFEncoding, steps_for_epochs

    out = Path(args.output_dir).resolve()
    ckpt, saved = _check_output_dir(out, args.resume, args.overwrite)
    s = _resolve(args, saved)
    _validate(s)
    device = _device(args.device)

    # Everything that can fail on bad input happens before the output directory is touched.
    if s["model"] is None:
        from .builtin import ByteTokenizer

        model = _builtin_model(s["builtin_config"])
        if s["seq_len"] > model.config.max_position_embeddings:
            raise UsageError(f"--seq-len {s['seq_len']}: the built-in model handles at most "
                             f"{model.config.max_position_embeddings} tokens")
        encoding = ByteEncoding(ByteTokenizer())
    else:
        model, tokenizer = _hf_model(s["model"], s["dtype"], device)
        encoding = HFEncoding(tokenizer)
    train_set, eval_set = _load_data(s, encoding, _say)
    per_step = s["batch_size"] * s["grad_accum"]
    if s.get("steps") is None:
        s["steps"] = steps_for_epochs(s["epochs"], len(train_set), per_step)

    from .adapters_io import save_adapter
    from .prepare import prepare

    torch.manual_seed(s["seed"])
    model.to(device)
    prepare(model, r=s["r"], alpha=s["alpha"], dropout=s["dropout"], rslora=s["rslora"], method=s["method"],
            gradient_checkpointing=s["gradient_checkpointing"], offload_checkpoints=s["offload_checkpoints"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(s["optimizer"], params, s["lr"], s["weight_decay"])

    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # an earlier run's, now stale
    from .io_utils import atomic_write_json

    run_config = {**{k: v for k, v in s.items() if k != "epochs"}, "qlora_ext_version": __version__}
    atomic_write_json(out / RUN_CONFIG, run_config)

    source = "built-in tiny Llama" if s["model"] is None else s["model"]
    _say(f"fine-tuning {source} on {len(train_set)} examples ({len(eval_set)} held out), "
         f"{s['steps']} steps x {per_step} examples, device {device}")
    settings = TrainSettings(steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                             warmup_steps=s["warmup_steps"], max_grad_norm=s["max_grad_norm"], seed=s["seed"],
                             log_every=s["log_every"], eval_every=s["eval_every"], save_every=s["save_every"],
                             packing=s["packing"], seq_len=s["seq_len"], stop_after=args.stop_after, run_config=run_config)
    result = train(model, optimizer, train_set, eval_set, encoding.pad_token_id, device, settings, out,
                   save_adapter, resume_from=ckpt, say=_say)
    if result["steps"] < s["steps"]:
        _say(f"stopped at step {result['steps']} of {s['steps']}; continue with --resume")
        return 0
    save_adapter(model, out / "adapter")
    _say(f"done: {result['steps']} steps in {result['seconds']:.0f} s; adapter in {out / 'adapter'}, "
         f"metrics in {out / 'metrics.jsonl'}, plot in {out / 'loss.png'}")
    return 0


def cmd_info() -> int:
    import qlora_ext

    print(f"qlora-ext {__version__}")
    try:
        info = qlora_ext.build_info()
        print("build: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    except ImportError as exc:
        print(f"build: compiled extension not available ({exc})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device: cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}); no CUDA device")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "info":
            return cmd_info()
        return cmd_finetune(args)
    except (UsageError, DataError) as exc:
        print(f"qlora-ext: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqlora-ext: interrupted; the latest checkpoint (if any) continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
