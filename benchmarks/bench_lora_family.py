"""End-to-end training step of each LoRA-family variant vs plain QLoRA, in one run.

What it measures: one optimizer step (forward + backward + AdamW) of a transformers
LlamaForCausalLM with random bf16 weights, prepared by `qlora_ext.prepare(method=...)` (NF4 base,
double quantization, adapters on q,k,v,o,gate,up,down, fp32 adapters, non-reentrant gradient
checkpointing unless --no-checkpointing), batch 1 x seq 2048 by default, r 16.

Timing: every step is bracketed by torch.cuda.synchronize() and time.perf_counter(); --warmup
steps are dropped, then the median and the min of --steps steps are reported. Per shape, plain
QLoRA (`lora`) runs both first and last: the two runs expose drift (clocks, thermals, allocator
state), and every ratio is taken against the mean of their medians. Per case: step time, tokens/s,
model TFLOP/s by the 6·N·T convention (N = all parameters, T = tokens; checkpointing's recomputed
forward is not counted, so this is "useful" throughput), peak allocated memory, and the ratios.
Prints one JSON object per run and a table; --out FILE writes the JSON list. The issue's bar:
QDoRA step time <= 1.15x QLoRA. With --interleave every case's model is built at once and their
timed steps alternate (one step of each per round), so that drift falls on all alike; the table
then adds the median of the per-round ratios, and peak memory is each model's own plus its steps'
transient peak (the others' models, resident too, are not counted). With --kernel-time one more
step of each case runs under torch.profiler and the sum of its GPU kernels' and copies' device
time is reported too: a host slowed by other tenants stretches the wall-clock step (and the GPU
idles) but not that sum, so its ratio separates what the kernels cost from the host's noise.

    python benchmarks/bench_lora_family.py --shapes 1b,8b --cases lora,dora --out bench_dora.json   # ~4 min, H100
    python benchmarks/bench_lora_family.py --shapes 1b --out bench_lora_family.json
    python benchmarks/bench_lora_family.py --shapes 1b,8b --out bench_lora_family.json
    python benchmarks/bench_lora_family.py --shapes 8b --cases lora,dora --interleave --steps 12   # drift-proof
    python benchmarks/bench_lora_family.py --shapes 8b --cases lora,dora --interleave --kernel-time
    python benchmarks/bench_lora_family.py --shapes tiny --device cpu --steps 2 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_ext  # noqa: E402
from device_time import device_time_ms  # noqa: E402
from qlora_ext.io_utils import atomic_write_json  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # fmt: skip
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # fmt: skip
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),  # fmt: skip
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (prepare kwargs, whether the optimizer gets LoRA+ groups, whether a DeltaLoRAUpdater steps[,
# module settings "module.ATTRIBUTE" -> value that hold during the case's steps only: a candidate
# code path measured against the default in one (interleaved) run])
CASES = {
    "lora": ({"method": "lora"}, False, False),
    "lora+rslora": ({"method": "lora", "rslora": True}, False, False),
    "lora+loraplus": ({"method": "lora"}, True, False),
    "dora": ({"method": "dora"}, False, False),
    # y = z ⊙ c by PyTorch's broadcasting multiply at every width (before qlora_ext::dora_column_scale)
    "dora+torch_mul": ({"method": "dora"}, False, False, {"qlora_ext.dora.COLUMN_SCALE_DEVICES": ("cpu",)}),
    # the defaults without one of their parts, each measured against them: the recomputation
    # skips DoRA's down projection with its z kept from the first forward (where the MLP is wide
    # enough), the SwiGLU reads z and c of gate and up (swiglu_scaled) instead of their c ⊙ z
    "dora-keep_z": ({"method": "dora"}, False, False, {"qlora_ext.fused_mlp.DORA_KEEPS_DOWN_Z_DEVICES": ("cpu",)}),
    "dora-scaled_swiglu": ({"method": "dora"}, False, False, {"qlora_ext.fused_mlp.DORA_SCALED_SWIGLU_DEVICES": ("cpu",)}),
    # z kept at every MLP width (DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE lifted)
    "dora+keep_z_any_width": ({"method": "dora"}, False, False, {"qlora_ext.fused_mlp.DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE": {}}),
    # the norm's W·Aᵀ by nf4_gemv from the NF4 codes instead of a GEMM over the dequantized W
    "dora+norm_from_codes": ({"method": "dora"}, False, False, {"qlora_ext.dora.NORM_FROM_CODES_DEVICES": ("cpu", "cuda")}),
    # DoRA's Q/K/V unit on the three weights one by one (fused_qkv._DoRAQKV) instead of the
    # concatenated ones (_DoRAQKVConcat, the default)
    "dora-qkv_concat": ({"method": "dora"}, False, False, {"qlora_ext.fused_qkv.DORA_CONCAT_DEVICES": ("cpu",)}),
    # the defaults without one of session 10's parts (on by default since 2026-12-06): the Q/K/V
    # unit's three norms in one call (dora_scale_stacked), dora_scale's A·Aᵀ by qlora's kernel (one
    # launch) instead of at::mm (cuBLAS: two), a DoRA MLP narrower than
    # DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE (1B) keeping its down z on the device; and none of them nor
    # the fused gate/up backward below (the defaults as session 10 left them)
    "dora-stacked_norms": ({"method": "dora"}, False, False, {"qlora_ext.fused_qkv.DORA_STACKED_NORM_DEVICES": ("cpu",)}),
    "dora-gram_kernel": ({"method": "dora"}, False, False, {"qlora_ext.dora.GRAM_KERNEL_DEVICES": ()}),
    "dora-narrow_z_on_device": ({"method": "dora"}, False, False,
                                {"qlora_ext.fused_mlp.DORA_KEEPS_NARROW_DOWN_Z_ON_DEVICE_DEVICES": ()}),
    "dora-session10": ({"method": "dora"}, False, False,
                       {"qlora_ext.fused_qkv.DORA_STACKED_NORM_DEVICES": ("cpu",),
                        "qlora_ext.dora.GRAM_KERNEL_DEVICES": (),
                        "qlora_ext.fused_mlp.DORA_KEEPS_NARROW_DOWN_Z_ON_DEVICE_DEVICES": (),
                        "qlora_ext.fused_mlp.DORA_FUSED_SWIGLU_BACKWARD_DEVICES": ("cpu",)}),
    # DoRA's gate/up backward in three ops (swiglu_scaled_backward, two dora_scale_backward) instead
    # of one swiglu_scaled_dora_backward
    "dora-fused_swiglu_backward": ({"method": "dora"}, False, False,
                                   {"qlora_ext.fused_mlp.DORA_FUSED_SWIGLU_BACKWARD_DEVICES": ("cpu",)}),
    "lora_fa": ({"method": "lora_fa"}, False, False),
    "vera": ({"method": "vera"}, False, False),
    "vera_r256": ({"method": "vera", "r": 256}, False, False),
    "delta_lora": ({"method": "delta_lora"}, False, True),
}


def build_model(shape: str, device: str, seq: int):
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048))
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


@contextlib.contextmanager
def module_settings(settings: dict):
    """Sets each "package.module.ATTRIBUTE" to its value for the block, then restores it."""
    saved = []
    try:
        for path, value in settings.items():
            module_name, attr = path.rsplit(".", 1)
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Case:
    """One prepared model of a case with its optimizer, ready to step."""

    def __init__(self, name: str, shape: str, args):
        prepare_kw, loraplus, delta, *rest = CASES[name]
        self.settings = rest[0] if rest else {}
        self.name, self.shape, self.args, self.device = name, shape, args, args.device
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        before = _allocated(self.device)
        torch.manual_seed(0)
        self.model = build_model(shape, self.device, args.seq)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.kw = {"r": args.r, "alpha": 2 * args.r, **prepare_kw}
        qlora_ext.prepare(self.model, target_modules=TARGETS, gradient_checkpointing=not args.no_checkpointing,
                          verbose=False, **self.kw)  # fmt: skip
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in trainable)
        params = qlora_ext.loraplus_param_groups(self.model, lr=args.lr) if loraplus else trainable
        self.opt = torch.optim.AdamW(params, lr=args.lr, fused=self.device.startswith("cuda"))
        self.updater = qlora_ext.DeltaLoRAUpdater(self.model) if delta else None
        self.ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq), device=self.device)
        self.times: list[float] = []
        self.transient_peak = 0  # the most memory one step allocated beyond what was held before it
        self.loss = None
        self.kernel_ms = None  # measure_kernel_time(): one step's summed device time
        for _ in range(args.warmup):
            self.step()
        sync(self.device)
        self.static = _allocated(self.device) - before  # model, adapters, optimizer state

    def step(self):
        with module_settings(self.settings):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.updater is not None:
                self.updater.step()
        return loss

    def timed_step(self) -> None:
        cuda = self.device.startswith("cuda")
        sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        held = _allocated(self.device)
        t0 = time.perf_counter()
        self.loss = self.step()
        sync(self.device)
        self.times.append(time.perf_counter() - t0)
        if cuda:
            self.transient_peak = max(self.transient_peak, torch.cuda.max_memory_allocated() - held)

    def measure_kernel_time(self) -> None:
        self.kernel_ms = device_time_ms(self.step, self.device)

    def result(self, paired: bool) -> dict:
        args, times, tokens = self.args, self.times, self.args.batch * self.args.seq
        median = statistics.median(times)
        cuda = self.device.startswith("cuda")
        return {
            "case": self.name, "settings": {k: repr(v) for k, v in self.settings.items()}, "shape": self.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "r": self.kw["r"], "batch": args.batch, "seq": args.seq, "checkpointing": not args.no_checkpointing,
            "params": self.n_params, "trainable_params": self.n_trainable,
            "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times), "step_s": times,
            "interleaved": paired,
            "tokens_per_s": tokens / median, "model_tflops": 6 * self.n_params * tokens / median / 1e12,
            # alone: the model's own memory plus its steps' transient peak (in an interleaved run
            # the other cases' models are resident too, and not counted)
            "peak_alloc_gib": (self.static + self.transient_peak) / 2**30 if cuda else 0.0,
            "final_loss": float(self.loss.detach()), "torch": torch.__version__,
            "kernel_ms": self.kernel_ms,
        }  # fmt: skip

    def close(self) -> None:
        self.model = self.opt = self.updater = None


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def run_case(name: str, shape: str, args) -> dict:
    """One case alone: build, warm up, --steps timed steps, free."""
    case = Case(name, shape, args)
    for _ in range(args.steps):
        case.timed_step()
    if getattr(args, "kernel_time", False):
        case.measure_kernel_time()
    result = case.result(paired=False)
    case.close()
    return result


def run_interleaved(names: list[str], shape: str, args) -> list[dict]:
    """Every case's model at once, their timed steps in turns (round i: one step of each, the order
    rotating by one each round), so that drift of the machine (clocks, thermals, other tenants)
    falls on all of them alike; print_table then also gives the median of the per-round ratios."""
    cases = [Case(name, shape, args) for name in names]
    for i in range(args.steps):
        for j in range(len(cases)):
            cases[(i + j) % len(cases)].timed_step()
    if getattr(args, "kernel_time", False):
        for case in cases:
            case.measure_kernel_time()
    results = [case.result(paired=True) for case in cases]
    for case in cases:
        case.close()
    return results


def paired_ratio(result: dict, baseline: dict) -> float:
    """Median over rounds of result's step time / baseline's in the same round (interleaved runs)."""
    return statistics.median(t / b for t, b in zip(result["step_s"], baseline["step_s"]))


def lora_baselines(results: list[dict]) -> dict[str, dict]:
    """Per shape: the mean of the `lora` runs' median and min step times and peak memory."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in results):
        runs = [r for r in results if r["shape"] == shape and r["case"] == "lora"]
        if runs:
            out[shape] = {k: statistics.fmean(r[k] for r in runs) for k in ("step_s_median", "step_s_min", "peak_alloc_gib")}
            out[shape]["runs"] = [r["step_s_median"] for r in runs]
    return out


def print_table(results: list[dict]) -> None:
    base = lora_baselines(results)
    head = (f"{'shape':5} {'case':18} {'trainable':>11} {'median ms':>10} {'min ms':>8} {'x QLoRA':>8} {'min x':>7} "
            f"{'tok/s':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'x QLoRA':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    nan = float("nan")
    for r in results:
        b = base.get(r["shape"])
        t_ratio = r["step_s_median"] / b["step_s_median"] if b else nan
        min_ratio = r["step_s_min"] / b["step_s_min"] if b else nan
        m_ratio = r["peak_alloc_gib"] / b["peak_alloc_gib"] if b and b["peak_alloc_gib"] else nan
        print(f"{r['shape']:5} {r['case']:18} {r['trainable_params']:>11,} {1e3 * r['step_s_median']:>10.1f} "
              f"{1e3 * r['step_s_min']:>8.1f} {t_ratio:>8.3f} {min_ratio:>7.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['model_tflops']:>8.1f} {r['peak_alloc_gib']:>9.2f} {m_ratio:>8.3f}")  # fmt: skip
    for shape, b in base.items():
        if len(b["runs"]) == 2:
            first, last = b["runs"]
            print(f"[{shape}] QLoRA drift: last / first run median = {last / first:.3f} (ratios use their mean)")
        lora = next(r for r in results if r["shape"] == shape and r["case"] == "lora")
        for dora in (r for r in results if r["shape"] == shape and r["case"].startswith("dora")):
            ratio = dora["step_s_median"] / b["step_s_median"]
            paired = f", {paired_ratio(dora, lora):.3f} median of the rounds' ratios" if dora["interleaved"] else ""
            if dora["kernel_ms"] and lora["kernel_ms"]:
                print(f"[{shape}] {dora['case']} / QLoRA summed kernel time of one step = "
                      f"{dora['kernel_ms'] / lora['kernel_ms']:.3f} ({dora['kernel_ms']:.1f} / {lora['kernel_ms']:.1f} ms)")
            print(f"[{shape}] {dora['case']} / QLoRA step time = {ratio:.3f} median, {dora['step_s_min'] / b['step_s_min']:.3f} min"
                  f"{paired} (bar <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1b", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--interleave", action="store_true",
                   help="build every case's model at once and time their steps in turns (drift-proof ratios; "
                        "needs the memory of all the models together)")  # fmt: skip
    p.add_argument("--kernel-time", action="store_true",
                   help="also profile one more step per case: the summed device time of its kernels (CUDA)")
    p.add_argument("--out", type=Path, help="write the JSON list of results here")
    args = p.parse_args(argv)
    shapes, cases = args.shapes.split(","), args.cases.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {list(SHAPES)}")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {list(CASES)}")
    # the baseline every ratio refers to, first and last (drift shows as a difference between them)
    others = [c for c in dict.fromkeys(cases) if c != "lora"]
    order = ["lora", *others, "lora"] if others else ["lora"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu (with --shapes tiny) for a smoke test")
    print(json.dumps({"build": qlora_ext.build_info()} if hasattr(qlora_ext, "build_info") else {}, default=str))
    results = []
    for shape in shapes:
        if args.interleave:
            runs = run_interleaved(list(dict.fromkeys(["lora", *others])), shape, args)
        else:
            runs = (run_case(case, shape, args) for case in order)
        for run, r in enumerate(runs):
            r["run"] = run
            print(json.dumps(r), flush=True)
            results.append(r)
    print_table(results)
    if args.out:
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
