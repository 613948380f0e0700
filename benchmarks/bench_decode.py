"""Decode speed of an 8B-shaped Llama: qlora_ext NF4 (adapters merged / active) vs bf16 vs bitsandbytes.

    python benchmarks/bench_decode.py [--out results.json] [--layers 32] [--prompt 32] [--new 512]
    python benchmarks/bench_decode.py --tiny        # a tiny model, CPU or GPU: a smoke test

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab
128256; BENCHMARKS.md), random bf16 weights built on the GPU (speed does not depend on values),
batch 1, a random 32-token prompt, 512 new tokens, greedy, no eos (every run makes 512 tokens).

Every stack decodes through the same `qlora_ext.generate`: transformers' StaticCache, the 4-D mask
built on the device, one decode step captured in a CUDA graph and replayed. So the bf16 baseline
gets the same launch-free step as ours and the ratio measures the linear layers (cuBLAS bf16 GEMV
vs nf4_gemv vs bitsandbytes' gemv_4bit), not Python overhead. (torch.compile of the step would
also fuse the elementwise kernels, for every stack alike; it is not used here.) Stacks:
  bf16        the float model (transformers, bf16 weights)
  bnb         bitsandbytes Linear4bit (NF4, double quant, block 64, bf16 compute) on the same seven
              projections; graphed when its ops capture, else eager (the JSON says which)
  nf4_lora    qlora_ext.prepare(r=16, alpha=16, all linear layers but lm_head), adapters active
  nf4_merged  the same after QLoRALinear.merge() of every layer (the adapters folded into NF4)
lm_head and embeddings stay bf16 in every stack.

Measured per stack: one untimed call (cuBLAS/allocator warm-up), then --repeats timed calls of
`generate(..., stats=...)`: decode tokens/s = decode steps / decode time (prefill and the one-off
graph capture excluded; their times are reported too) and end-to-end tokens/s (new tokens / the
whole call). Median over repeats. Physics: bytes each decode step must read (the weights as the
stack stores them, adapters when active, one embedding row; plus the static KV cache, which the
masked attention reads in full), the achieved weight bandwidth (weight bytes x tokens/s) and its
fraction of the measured device-copy bandwidth (read + write).
Correct first: before timing, each stack's first tokens from graph replays must equal eager steps'.
The bar (issue #5): NF4 decode >= 2.5x the bf16 decode rate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import qlora_ext
from qlora_ext.layers import QLoRALinear

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0),
}  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BAR_VS_BF16 = 2.5
CHECK_TOKENS = 24  # tokens compared between graph replay and eager steps before timing


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_llama(shape: str, layers: int | None, max_len: int, device: str):
    """A Llama of `shape` with random bf16 weights, built directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(**dims, max_position_embeddings=max(max_len, 8192), rms_norm_eps=1e-5,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected transformers to pick SDPA attention, got {model.config._attn_implementation!r}")
    return model.eval()


def try_import_bnb():
    try:
        import bitsandbytes as bnb  # noqa: PLC0415

        return bnb
    except Exception as exc:  # noqa: BLE001 - any import problem means "peer not available"
        print(f"# bitsandbytes not importable ({type(exc).__name__}: {exc}): peer skipped", file=sys.stderr)
        return None


def to_bnb(model, bnb):
    """A copy of `model` whose seven projections are bitsandbytes NF4 Linear4bit layers (double
    quant, block 64, bf16 compute), quantized on the GPU from the same bf16 weights."""
    bnb_model = copy.deepcopy(model)
    for name, module in list(bnb_model.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64)  # fmt: skip
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        layer = layer.to(module.weight.device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(bnb_model.get_submodule(parent), child, layer)
    return bnb_model


def weight_bytes_per_token(model) -> int:
    """Bytes of parameters one decode step reads at batch 1: every weight as stored (NF4 codes and
    scales, bitsandbytes' packed weight and quant state, bf16 tensors), the active adapters only,
    and one row of the input embedding (unless it is tied to the LM head, read in full)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = 0
    for name, p in model.named_parameters():
        if ".adapters." in f".{name}":
            continue  # counted below, only where forward uses them
        if p is embedding and p is not head:
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            total += module.weight.nbytes
            adapter = module.current_adapter()
            if adapter is not None:
                total += sum(p.numel() * p.element_size() for p in adapter.parameters())
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # bitsandbytes: the packed weight is a parameter, its scales are not
            total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
            if getattr(state, "nested", False):
                total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
    return total


def kv_cache_bytes_per_token(model, cache_len: int) -> int:
    """Bytes of the static KV cache a decode step reads (all slots: the masked attention reads them)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * cache_len * 2  # bf16


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus written); None on the CPU."""
    if device != "cuda":
        return None
    from bench_nf4_linear import copy_bandwidth as device_copy_bandwidth  # (this script's directory)

    return device_copy_bandwidth()


def bench_stack(name, model, prompt, new_tokens, repeats, device, copy_bw, graphs) -> dict:
    cuda_graphs = "auto" if graphs else False
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graph_matches = None
    if device == "cuda" and graphs:
        check = min(CHECK_TOKENS, new_tokens)
        eager = qlora_ext.generate(model, prompt, check, cuda_graphs=False)
        graphed = qlora_ext.generate(model, prompt, check, cuda_graphs="auto")
        graph_matches = bool(torch.equal(eager, graphed))
        if not graph_matches:
            print(f"# FAIL {name}: graph replay tokens differ from eager steps", file=sys.stderr)
    warm = {}
    qlora_ext.generate(model, prompt, new_tokens, cuda_graphs=cuda_graphs, stats=warm)  # warm-up
    if device == "cuda" and not warm["cuda_graphs"]:
        repeats = 1  # eager steps are host-bound and slow; their rate varies little between calls
    runs = []
    for _ in range(repeats):
        stats = {}
        start = time.perf_counter()
        qlora_ext.generate(model, prompt, new_tokens, cuda_graphs=cuda_graphs, stats=stats)
        stats["wall_s"] = time.perf_counter() - start
        runs.append(stats)
    decode_tps = statistics.median(r["decode_tokens_per_s"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    weight_bytes = weight_bytes_per_token(model)
    kv_bytes = kv_cache_bytes_per_token(model, prompt.shape[1] + new_tokens)
    weight_bw = weight_bytes * decode_tps
    return {
        "stack": name,
        "cuda_graphs": all(r["cuda_graphs"] for r in runs),
        "graph_matches_eager": graph_matches,
        "new_tokens": runs[0]["new_tokens"],
        "decode_tokens_per_s": round(decode_tps, 2),
        "decode_ms_per_token": round(1e3 / decode_tps, 4),
        "end_to_end_tokens_per_s": round(runs[0]["new_tokens"] / wall, 2),
        "prefill_ms": round(1e3 * statistics.median(r["prefill_s"] for r in runs), 3),
        "capture_ms": round(1e3 * statistics.median(r["capture_s"] for r in runs), 3),
        "weight_bytes_per_token": weight_bytes,
        "kv_cache_bytes_per_token": kv_bytes,
        "weight_GBps": round(weight_bw / 1e9, 1),
        "weight_bw_fraction_of_copy": round(weight_bw / copy_bw, 3) if copy_bw else None,
        "all_bytes_GBps": round((weight_bytes + kv_bytes) * decode_tps / 1e9, 1),
        "peak_allocated_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


@contextlib.contextmanager
def switched(module, name: str, value):
    """module.name = value for the block, then back."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


@contextlib.contextmanager
def environment(setting: str):
    """The environment variables of "NAME=VALUE[,NAME=VALUE]" set for the block, then as before."""
    pairs = [item.split("=", 1) for item in setting.split(",") if item]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise ValueError(f"--env-ab: {setting!r} is not NAME=VALUE[,NAME=VALUE]")
    before = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results (one JSON document) here")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (or GPU): smoke test")
    parser.add_argument("--layers", type=int, help="decoder layers (default: all 32 of the 8B shape)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; tiny 8)")
    parser.add_argument("--new", type=int, default=None, help="new tokens (default 512; tiny 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per stack (default 3; tiny 1)")
    parser.add_argument("--stacks", default="bf16,bnb,nf4_lora,nf4_merged")
    parser.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    parser.add_argument("--gemv-variants", help="nf4_merged once per nf4_gemv CUDA variant (comma-separated names)")
    parser.add_argument("--variants-without-pdl", action="store_true",
                        help="with --gemv-variants: each variant also without programmatic dependent launch "
                             "(does the \"ring\" variant's slower decode come from its launches' overlap?)")
    parser.add_argument("--env-ab", nargs="*", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="with --gemv-variants: each variant also under each of these environment settings "
                             "(the CUDA launchers' experiment switches, read at launch)")
    parser.add_argument("--grouped-ab", action="store_true",
                        help="nf4_merged also with q/k/v and gate/up launching one GEMV each (layers.GROUPED_GEMV_ENABLED off)")
    parser.add_argument("--fusion-ab", action="store_true",
                        help="also nf4_merged without rope_append_kv_ (fused_blocks.ROPE_APPEND_KV_ENABLED off, which also turns "
                             "decode_attention off), "
                             "without programmatic dependent launch (generation.PROGRAMMATIC_LAUNCH off), with the residual adds "
                             "apart from the GEMVs (layers.RESIDUAL_IN_GEMV_ENABLED off), with SwiGLU apart from the gate/up "
                             "GEMV (layers.SWIGLU_IN_GEMV_ENABLED off), with decode_attention's CUDA kernels on "
                             "(block_ops.set_decode_attention_kernel), and bf16 with a bool SDPA mask "
                             "(generation.ADDITIVE_SDPA_MASK off)")  # fmt: skip
    parser.add_argument("--newest-only", action="store_true",
                        help="with --fusion-ab: only SwiGLU apart from the GEMV and decode_attention's CUDA kernels on "
                             "(a short run)")
    parser.add_argument("--decode-attention-kernel", action="store_true",
                        help="switch decode_attention's CUDA kernels on (block_ops.set_decode_attention_kernel) for every stack")
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else "8b"
    prompt_len = args.prompt or (8 if args.tiny else 32)
    new_tokens = args.new or (16 if args.tiny else 512)
    repeats = args.repeats or (1 if args.tiny else 3)
    stacks = [s for s in args.stacks.split(",") if s]
    unknown = set(stacks) - {"bf16", "bnb", "nf4_lora", "nf4_merged"}
    if unknown:
        parser.error(f"unknown stacks {sorted(unknown)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("the 8B benchmark needs a CUDA GPU (use --tiny for the CPU smoke test)", file=sys.stderr)
        return 2
    if device == "cuda" and not qlora_ext.build_info()["with_cuda"]:
        print("qlora_ext was built without CUDA: rebuild with a CUDA toolkit and CUDA torch", file=sys.stderr)
        return 2
    import transformers

    if args.decode_attention_kernel and device == "cuda":
        qlora_ext.block_ops.set_decode_attention_kernel(True)
    bnb = try_import_bnb() if "bnb" in stacks else None
    copy_bw = copy_bandwidth(device)
    env = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None),
        "commit": git_commit(),
        "copy_bw_TBps": round(copy_bw / 1e12, 3) if copy_bw else None,
    }
    model = random_llama(shape, args.layers, prompt_len + new_tokens, device)
    config = {"shape": shape, "layers": model.config.num_hidden_layers, "batch": 1, "prompt_tokens": prompt_len,
              "new_tokens": new_tokens, "greedy": True, "lora_r": 16, "lora_alpha": 16,
              "cuda_graphs_requested": not args.no_graphs, "repeats": repeats,
              "decode_attention_kernel": device == "cuda" and qlora_ext.block_ops.decode_attention_kernel()}  # fmt: skip
    print(json.dumps({**env, **config}), flush=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    bench = lambda name, m: bench_stack(name, m, prompt, new_tokens, repeats, device, copy_bw, not args.no_graphs)  # noqa: E731

    cases = []

    def record(case):
        cases.append(case)
        print(json.dumps({**env, **config, **case}), flush=True)

    if "bf16" in stacks:
        record(bench("bf16", model))
        if args.fusion_ab and not args.newest_only:
            with switched(qlora_ext.generation, "ADDITIVE_SDPA_MASK", False):
                record(bench("bf16[bool mask]", model))
    if "bnb" in stacks and bnb is not None:
        try:
            bnb_model = to_bnb(model, bnb)
            record(bench("bnb", bnb_model))
        except Exception as exc:  # noqa: BLE001 - report and go on without the peer
            print(f"# bitsandbytes stack failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        bnb_model = None
        if device == "cuda":
            torch.cuda.empty_cache()
    if "nf4_lora" in stacks or "nf4_merged" in stacks:
        qlora_ext.prepare(model, r=16, alpha=16, gradient_checkpointing=False, verbose=False)
        if device == "cuda":
            torch.cuda.empty_cache()
        if "nf4_lora" in stacks:
            record(bench("nf4_lora", model))
        if "nf4_merged" in stacks:
            for layer in model.modules():
                if isinstance(layer, QLoRALinear):
                    layer.merge()
            if args.fusion_ab:  # the same model without this session's decode fusions, one at a time
                if not args.newest_only:
                    with switched(qlora_ext.fused_blocks, "ROPE_APPEND_KV_ENABLED", False):  # (and so SDPA attention)
                        record(bench("nf4_merged[rope_ + cache.update]", model))
                    with switched(qlora_ext.generation, "PROGRAMMATIC_LAUNCH", False):
                        record(bench("nf4_merged[no PDL]", model))
                    with switched(qlora_ext.layers, "RESIDUAL_IN_GEMV_ENABLED", False):
                        record(bench("nf4_merged[separate residual adds]", model))
                with switched(qlora_ext.layers, "SWIGLU_IN_GEMV_ENABLED", False):
                    record(bench("nf4_merged[SwiGLU apart from the GEMV]", model))
                if device == "cuda" and not qlora_ext.block_ops.decode_attention_kernel():
                    qlora_ext.block_ops.set_decode_attention_kernel(True)
                    record(bench("nf4_merged[decode_attention kernels]", model))
                    qlora_ext.block_ops.set_decode_attention_kernel(False)
            if args.grouped_ab:  # the same model with every projection launching its own GEMV
                qlora_ext.layers.GROUPED_GEMV_ENABLED = False
                record(bench("nf4_merged[separate projections]", model))
                qlora_ext.layers.GROUPED_GEMV_ENABLED = True
            if args.gemv_variants:  # one model, each nf4_gemv kernel variant in turn
                before = qlora_ext.ops.nf4_gemv_variant()
                for variant in args.gemv_variants.split(","):
                    qlora_ext.ops.set_nf4_gemv_variant(variant)
                    record(bench(f"nf4_merged[{variant}]", model))
                    if args.variants_without_pdl:
                        with switched(qlora_ext.generation, "PROGRAMMATIC_LAUNCH", False):
                            record(bench(f"nf4_merged[{variant}, no PDL]", model))
                    for setting in args.env_ab:
                        with environment(setting):
                            record(bench(f"nf4_merged[{variant}, {setting}]", model))
                qlora_ext.ops.set_nf4_gemv_variant(before)
            else:
                record(bench("nf4_merged", model))

    rate = {c["stack"]: c["decode_tokens_per_s"] for c in cases}
    ratio_bf16 = {s: round(r / rate["bf16"], 3) for s, r in rate.items() if s != "bf16"} if "bf16" in rate else {}
    ratio_bnb = {s: round(r / rate["bnb"], 3) for s, r in rate.items() if s.startswith("nf4")} if "bnb" in rate else {}
    summary = {
        **env, **config,
        "cases": cases,
        "ratio_vs_bf16": ratio_bf16,
        "ratio_vs_bnb": ratio_bnb,
        "bar_vs_bf16": BAR_VS_BF16,
        # the bar is about the 8B shape; a tiny model's ratios only show that the script runs
        "meets_bar": {s: r >= BAR_VS_BF16 for s, r in ratio_bf16.items() if s.startswith("nf4")} if shape == "8b" else {},
        "correct": all(c["graph_matches_eager"] is not False for c in cases),
    }  # fmt: skip
    print(json.dumps({k: summary[k] for k in ("ratio_vs_bf16", "ratio_vs_bnb", "bar_vs_bf16", "meets_bar", "correct")}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")

    print()
    print(f"{shape} Llama, {config['layers']} layers, batch 1, prompt {prompt_len}, {new_tokens} new tokens, "
          f"greedy; {env['device']}")  # fmt: skip
    print(f"{'stack':<11} {'graph':>5} {'decode tokens/s':>15} {'ms/token':>9} {'e2e tok/s':>9} {'weights MB':>10} "
          f"{'weight GB/s':>11} {'%copy':>6} {'x bf16':>7} {'x bnb':>6}")  # fmt: skip
    def cell(value, width, spec):
        return f"{'-' if value is None else format(value, spec):>{width}}"

    for c in cases:
        frac = c["weight_bw_fraction_of_copy"]
        print(
            f"{c['stack']:<11} {'yes' if c['cuda_graphs'] else 'no':>5} {c['decode_tokens_per_s']:15.1f} "
            f"{c['decode_ms_per_token']:9.3f} {c['end_to_end_tokens_per_s']:9.1f} "
            f"{c['weight_bytes_per_token'] / 1e6:10.1f} {c['weight_GBps']:11.1f} "
            f"{cell(None if frac is None else f'{100 * frac:.1f}%', 6, '')} "
            f"{cell(ratio_bf16.get(c['stack']), 7, '.2f')} {cell(ratio_bnb.get(c['stack']), 6, '.2f')}"
        )
    for s, ok in summary["meets_bar"].items():
        print(f"{s}: {ratio_bf16[s]:.2f}x the bf16 decode rate; bar {BAR_VS_BF16}x: {'PASS' if ok else 'MISS'}")
    return 0 if summary["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
