"""Host (CPU-side) overhead of a training step, per method: LoRA vs DoRA (and the other variants).

Why: on the H100 the 8B QDoRA step was host-bound (a 2-layer profile: +11% GPU time but +65% host
time over QLoRA), so what decides the QDoRA/QLoRA ratio there is how much Python and dispatch work
each decoder layer costs, not FLOPs. This measures exactly that, on any machine: a transformers
LlamaForCausalLM so small (hidden 64, a few tokens) that the arithmetic is negligible, prepared by
`qlora_ext.prepare(method=...)` as the real benchmark does (NF4 base, adapters on all 7
projections, fp32 adapters, gradient checkpointing, fused MLP/block ops as prepare sets them).

What it reports, per method:
- host ms per decoder layer of a training step (forward + backward + zero_grad): the slope of the
  step time between two depths (--layers 2,6), so the embedding, loss and other fixed costs
  cancel; and the step time at the deeper model. Cases are timed in interleaved rounds; "best" is
  the fastest round's median (a shared, noisy host disturbs it least), plain is the median;
- with --profile, per decoder layer (same slope): ops dispatched (aten and qlora_ext), of which
  computing (leaf ops that are not views/metadata/allocation: a kernel launch each on a GPU), and
  autograd nodes evaluated in backward (`autograd::engine::evaluate_function` events).
Timings use one CPU thread (small tensors: waking OpenMP threads costs more than the work).

    python benchmarks/bench_host_overhead.py                                  # lora vs dora, CPU
    python benchmarks/bench_host_overhead.py --methods lora,dora --profile --fused-cpu   # GPU-like op counts
    python benchmarks/bench_host_overhead.py --device cuda --dtype bfloat16   # host-bound on a GPU too
    python benchmarks/bench_host_overhead.py --methods lora --qkv both --profile --fused-cpu   # fused Q/K/V vs modules
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlora_ext  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(method: str, layers: int, args, fused_qkv: bool = True):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max(64, args.seq))  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype),
                                                       attn_implementation="sdpa")  # fmt: skip
    model.to(args.device)
    qlora_ext.prepare(model, target_modules=TARGETS, r=args.r, alpha=2 * args.r, method=method, verbose=False,
                      gradient_checkpointing=not args.no_checkpointing, fused_mlp=not args.no_fused_mlp,
                      fused_qkv=fused_qkv)  # fmt: skip
    if args.fused_cpu:  # the fused RMSNorm/RoPE/SwiGLU kernels on the CPU too, as CUDA runs them
        from qlora_ext import fused_blocks

        fused_blocks.disable_fused_block_ops(model)
        fused_blocks.enable_fused_block_ops(model, devices=("cpu", "cuda"))
    return model.train()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model, args):
    ids = torch.randint(0, 128, (1, args.seq), device=args.device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_steps(model, args) -> list[float]:
    step = make_step(model, args)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return times


# Ops that only make views or metadata, or allocate: on a GPU they launch nothing.
_NO_KERNEL = {"aten::" + n for n in (
    "view", "reshape", "t", "transpose", "as_strided", "detach", "resolve_conj", "resolve_neg", "empty",
    "empty_strided", "empty_like", "_unsafe_view", "expand", "slice", "narrow", "unsqueeze", "squeeze", "select",
    "permute", "result_type", "alias", "lift_fresh", "split", "chunk", "unbind", "contiguous", "to", "_to_copy",
    "linear", "matmul", "size", "stride", "is_nonzero", "item", "_local_scalar_dense", "set_", "zeros", "new_empty",
    "numpy_T", "flatten", "unflatten", "view_as", "expand_as", "_reshape_alias", "split_with_sizes", "movedim",
)}  # fmt: skip


def count_ops(model, args) -> dict[str, int]:
    """aten ops, compute ops (the leaf ops that would launch a kernel on a GPU), autograd nodes
    evaluated in backward, and Python autograd.Function applies, in one step."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, args)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    def computes(e) -> bool:  # not a view/metadata op, and (aten) no computing op beneath it
        if e.name in _NO_KERNEL or not e.name.startswith(("aten::", "qlora_ext::")):
            return False
        # qlora_ext's native ops launch their own kernel even when they also call ATen (dora_scale's A·Aᵀ)
        return e.name.startswith("qlora_ext::") or not any(map(below, e.cpu_children))

    def below(e) -> bool:
        return computes(e) or any(map(below, e.cpu_children))

    counts = collections.Counter()
    for e in prof.events():
        if e.name.startswith(("aten::", "qlora_ext::")):
            counts["aten_ops"] += 1
            counts["compute_ops"] += computes(e)
        elif e.name.startswith("autograd::engine::evaluate_function"):
            counts["autograd_nodes"] += 1
    return dict(counts)


def measure_all(methods: list[str], args) -> list[dict]:
    """Per case (a method, with the fused Q/K/V unit on and/or off: --qkv): step time and its
    per-layer slope. All models are built first and then timed in interleaved rounds (each round:
    every case at both depths), so that a slow spell of a shared host hits every case alike; the
    per-layer slope uses, per depth, the fastest round's median (`best`, the least disturbed) and
    the median over all steps (`median`)."""
    lo, hi = args.layers
    qkv = {"on": (True,), "off": (False,), "both": (True, False)}[args.qkv]
    cases = [m if on else m + "/qkv-off" for m in methods for on in qkv]
    models = {(c, n): build(c.split("/")[0], n, args, fused_qkv=not c.endswith("/qkv-off"))
              for c in cases for n in (lo, hi)}  # fmt: skip
    rounds = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            rounds[key].append(time_steps(model, args))
    results = []
    for m in cases:
        best = {n: min(statistics.median(r) for r in rounds[(m, n)]) for n in (lo, hi)}
        median = {n: statistics.median([t for r in rounds[(m, n)] for t in r]) for n in (lo, hi)}
        result = {"method": m, "layers": hi, "step_ms": 1e3 * median[hi], "step_ms_best": 1e3 * best[hi],
                  "host_ms_per_layer": 1e3 * (median[hi] - median[lo]) / (hi - lo),
                  "host_ms_per_layer_best": 1e3 * (best[hi] - best[lo]) / (hi - lo)}  # fmt: skip
        if args.profile:
            ops = {n: count_ops(models[(m, n)], args) for n in (lo, hi)}
            for key in ops[hi]:
                result[f"{key}_per_layer"] = (ops[hi].get(key, 0) - ops[lo].get(key, 0)) / (hi - lo)
                result[f"{key}_per_step"] = ops[hi][key]
        results.append(result)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="lora,dora")
    p.add_argument("--layers", default="2,6", help="two depths; per-layer numbers are the slope between them")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round, method and depth")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="also count aten ops and autograd nodes")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--no-fused-mlp", action="store_true")
    p.add_argument("--qkv-three-gemms", action="store_true",
                   help="the fused Q/K/V unit with three base GEMMs instead of one on the concatenated weights")
    p.add_argument("--qkv", choices=["on", "off", "both"], default="on",
                   help="the fused Q/K/V unit (prepare(fused_qkv=...)): on, off, or both as separate cases "
                        "(\"<method>/qkv-off\" is the module path)")  # fmt: skip
    p.add_argument("--fused-cpu", action="store_true",
                   help="CPU: use the fused block-op kernels (RMSNorm, RoPE, SwiGLU) as a CUDA run does, so that "
                        "op counts resemble the GPU's")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object per method")
    args = p.parse_args(argv)
    args.layers = tuple(int(n) for n in args.layers.split(","))
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        p.error("--layers takes two increasing depths, e.g. 2,6")
    torch.set_num_threads(args.threads)
    if args.qkv_three_gemms:
        from qlora_ext import fused_qkv

        fused_qkv.CONCAT_WEIGHTS = False
    results = measure_all(args.methods.split(","), args)
    base = next((r for r in results if r["method"] == "lora"), None)
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        line = (f"{r['method']:10} step {r['step_ms']:7.2f} ms ({r['layers']} layers; best round {r['step_ms_best']:.2f})"
                f"  per layer {r['host_ms_per_layer']:6.3f} ms (best rounds {r['host_ms_per_layer_best']:.3f})")  # fmt: skip
        if base is not None and r is not base:
            line += (f"  x LoRA: step {r['step_ms'] / base['step_ms']:.3f}, per layer "
                     f"{r['host_ms_per_layer'] / base['host_ms_per_layer']:.3f} "
                     f"(best {r['host_ms_per_layer_best'] / base['host_ms_per_layer_best']:.3f})")  # fmt: skip
        print(line)
        if args.profile:
            print(f"{'':10} per layer: {r.get('aten_ops_per_layer', 0):.0f} ops ({r.get('compute_ops_per_layer', 0):.0f} "
                  f"computing), "
                  f"{r.get('autograd_nodes_per_layer', 0):.0f} autograd nodes; per step: "
                  f"{r.get('aten_ops_per_step', 0)} aten ops, {r.get('autograd_nodes_per_step', 0)} autograd nodes")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
