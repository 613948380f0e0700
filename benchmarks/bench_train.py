"""End-to-end QLoRA training step: qlora_ext vs transformers+bitsandbytes+PEFT vs Unsloth.

    python benchmarks/bench_train.py --model 8b --seq 2048 --steps 10 [--stacks ours,bnb_peft,unsloth] [--out F]
    python benchmarks/bench_train.py --model 8b --seq 2048 --steps 6 --stacks ours,ours_s19,unsloth --rounds 3
    python benchmarks/bench_train.py --model 8b --cap-gib 24 --steps 3 --stacks ours_offload,unsloth \
        --seq 16384 24576 32768 49152 65536        # the longest sequence that trains under a 24 GiB cap

Random bf16 weights of Llama-3 shapes (BENCHMARKS.md: speed and memory do not depend on the
values), batch 1, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down, gradient checkpointing,
lr 2e-4, random token ids with labels = inputs. Each stack runs in its own subprocess (Unsloth
patches transformers on import, and peak-memory counters must not mix). Tokens/s is measured over
steps 3..N (after warm-up; the last step when --steps < 3); peak memory is torch.cuda.max_memory_allocated() over the same steps,
plus, for the peers, the optimizer state that bitsandbytes' paged optimizers keep in CUDA managed
memory (cudaMallocManaged, every state tensor of >= 1e5 elements): PyTorch's allocator never sees
it, yet it lives on the GPU whenever the GPU has room, as it does here, and the 24 GiB cap of
--cap-gib does not bound it. "peak_device_gib" is the sum, the figure the bars compare;
"peak_allocated_gib" is PyTorch's alone.
Peers are skipped, with the reason, when not importable (bring them with
shared/tools/peer-bundle.sh). Prints one JSON object per case and a table last.

Stacks: ours (prepare's defaults: the checkpointed layer inputs offloaded to pinned host memory),
ours_resident (the same with them kept on the GPU), ours_offload (offloading asked for explicitly),
ours_qkv_off (the attention's q/k/v as three modules instead of the fused unit, fused_qkv.py),
ours_qkv_three_gemms (the fused unit with three base GEMMs instead of one on the concatenated
weights), ours_qkv_cat (the three weights dequantized apart and concatenated by torch.cat
instead of straight into one buffer, fused_qkv.DEQUANTIZE_INTO_DEVICES), ours_full_recompute (the checkpointed layers' recomputation
also runs the MLP's down projection, whose output nobody reads: fused_mlp.SKIP_UNUSED_RECOMPUTATION
off), ours_no_replay (the checkpointed layers' attention half recomputed instead of kept in host
memory: attention_replay.REPLAY "never"), ours_library_autograd (RMSNorm, RoPE and SwiGLU through
torch.library's autograd instead of block_ops' autograd.Function twins), ours_two_gemm_gate_up (the
MLP's gate and up as x·Wᵀ then a rank-r addmm_ instead of one GEMM over K + r:
fused_mlp.K_EXTENDED_GATE_UP_DEVICES off), ours_recast (a checkpointed layer's recomputation casts
the adapters to the compute dtype again instead of reusing its first forward's casts:
checkpointing.KEEP_CONSTANTS off), ours_s19 (that, a remembered tuple offloaded tensor by tensor and
the MLP's gate and up backward one by one, q/k/v's low-rank products by three GEMMs each:
checkpointing.PARK_TOGETHER, fused_mlp.JOINT_GATE_UP_BACKWARD_DEVICES and
fused_qkv.BLOCK_DIAGONAL_B_DEVICES off too), ours_sdpa_cudnn / ours_sdpa_flash (the fused attention's SDPA calls try cuDNN's or flash
attention first: fused_blocks.SDPA_PRIORITY), bnb_peft, unsloth. With --cap-gib each process may allocate at most that much
(torch.cuda.set_per_process_memory_fraction); a stack stops at its first sequence length that
fails, and the table ends with each stack's longest trainable length. With --kernel-time each case
also profiles one more step and reports the summed device time of its GPU kernels and copies
(device_time.py): a noisy host stretches the wall-clock step, not that sum.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from device_time import device_time_ms  # benchmarks/ (the script's folder is on sys.path)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0),
}  # fmt: skip


def llama_config(size: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[size], max_position_embeddings=max(seq, 8192), rms_norm_eps=1e-5,
                       tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip


def random_model(size: str, seq: int):
    """A Llama of the given shapes with random bf16 weights, built directly on the GPU."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama_config(size, seq))
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model


def save_word_tokenizer(path: str, vocab_size: int) -> None:
    """A stand-in tokenizer (no hub here): Unsloth's loader insists on one beside the weights.
    The benchmark feeds token ids directly, so its vocabulary is irrelevant."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, min(vocab_size, 1024))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)  # fmt: skip


def checkpoint_dir(size: str, seq: int) -> str:
    """Peers load from disk, as their users do: save the random model (and a tokenizer) once."""
    path = os.path.join(tempfile.gettempdir(), f"qlora_bench_llama_{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        model = random_model(size, seq)
        model.save_pretrained(path, safe_serialization=True)
        del model
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        save_word_tokenizer(path, SHAPES[size]["vocab_size"])
    return path


def build_ours(size, seq, offload=None, fused_qkv=None):
    import torch

    import qlora_ext

    model = random_model(size, seq)
    model = qlora_ext.prepare(model, r=16, alpha=16, dropout=0.0, target_modules=TARGETS, gradient_checkpointing=True,
                              offload_checkpoints=offload, fused_qkv=fused_qkv)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(qlora_ext, "PagedAdamW"):
        opt = qlora_ext.PagedAdamW(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    return model, opt


def build_bnb_peft(size, seq):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = checkpoint_dir(size, seq)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, opt


def build_unsloth(size, seq):
    import unsloth  # noqa: F401  (must be imported before transformers)
    import bitsandbytes as bnb
    from unsloth import FastLanguageModel

    path = checkpoint_dir(size, seq)
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=True, max_seq_length=seq, dtype=None)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0)  # fmt: skip
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, opt


def build_ours_offload(size, seq):
    return build_ours(size, seq, offload=True)


def build_ours_resident(size, seq):
    return build_ours(size, seq, offload=False)


def build_ours_qkv_off(size, seq):
    return build_ours(size, seq, fused_qkv=False)


def build_ours_qkv_three_gemms(size, seq):
    from qlora_ext import fused_qkv

    fused_qkv.CONCAT_WEIGHTS = False  # (each stack runs in its own child process)
    return build_ours(size, seq)


def build_ours_qkv_cat(size, seq):
    from qlora_ext import fused_qkv

    fused_qkv.DEQUANTIZE_INTO_DEVICES = ("cpu",)  # the former CUDA path: torch.cat of the weights
    return build_ours(size, seq)


def build_ours_full_recompute(size, seq):
    from qlora_ext import fused_mlp

    fused_mlp.SKIP_UNUSED_RECOMPUTATION = False  # what the skip saves
    return build_ours(size, seq)


def build_ours_no_replay(size, seq):
    from qlora_ext import attention_replay

    attention_replay.REPLAY = "never"  # the attention half recomputed, as before session 18
    return build_ours(size, seq)


def build_ours_two_gemm_gate_up(size, seq):
    from qlora_ext import fused_mlp

    fused_mlp.K_EXTENDED_GATE_UP_DEVICES = ()  # x·Wᵀ then a rank-r addmm_, as before session 19
    return build_ours(size, seq)


def build_ours_recast(size, seq):
    from qlora_ext import checkpointing

    checkpointing.KEEP_CONSTANTS = False  # the recomputation casts the adapters again, as before session 20
    return build_ours(size, seq)


def build_ours_s19(size, seq):
    from qlora_ext import checkpointing, fused_mlp, fused_qkv

    checkpointing.KEEP_CONSTANTS = False  # session 19's backward: adapter casts made again,
    checkpointing.PARK_TOGETHER = False  # the replayed attention half fetched tensor by tensor,
    fused_mlp.JOINT_GATE_UP_BACKWARD_DEVICES = ()  # the gate and up projections' backward one by one,
    fused_qkv.BLOCK_DIAGONAL_B_DEVICES = ()  # q/k/v's low-rank products three GEMMs each way
    return build_ours(size, seq)


def build_ours_library_autograd(size, seq):
    from qlora_ext import block_ops

    block_ops._TWINS.clear()  # RMSNorm/RoPE/SwiGLU through torch.library's autograd, as before session 18
    return build_ours(size, seq)


def build_ours_sdpa(first: str):
    """ours with the fused attention's SDPA calls trying backend `first` before the others."""
    def build(size, seq):
        from torch.nn.attention import SDPBackend

        from qlora_ext import fused_blocks

        fused_blocks.SDPA_PRIORITY = fused_blocks.sdpa_order(getattr(SDPBackend, first))
        return build_ours(size, seq)

    return build


BUILDERS = {"ours": build_ours, "ours_offload": build_ours_offload, "ours_resident": build_ours_resident,
            "ours_qkv_off": build_ours_qkv_off, "ours_qkv_three_gemms": build_ours_qkv_three_gemms,
            "ours_qkv_cat": build_ours_qkv_cat, "ours_full_recompute": build_ours_full_recompute,
            "ours_no_replay": build_ours_no_replay, "ours_library_autograd": build_ours_library_autograd,
            "ours_two_gemm_gate_up": build_ours_two_gemm_gate_up, "ours_recast": build_ours_recast,
            "ours_s19": build_ours_s19,
            "ours_sdpa_cudnn": build_ours_sdpa("CUDNN_ATTENTION"), "ours_sdpa_flash": build_ours_sdpa("FLASH_ATTENTION"),
            "bnb_peft": build_bnb_peft, "unsloth": build_unsloth}  # fmt: skip


def flops_per_token(size: str, seq: int) -> float:
    """Forward + recomputation + input-gradient backward over the frozen matmuls, plus attention."""
    s = SHAPES[size]
    h, i, layers, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = h // heads
    matmul_params = layers * (h * h * 2 + 2 * h * kv * head_dim + 3 * h * i) + h * s["vocab_size"]
    attention = layers * 2 * 2 * seq * h / 2  # QK^T and PV, causal half, per token
    # 2 FLOP per MAC; forward, recompute forward, backward for inputs = 3 passes of the weights.
    return 2 * 3 * matmul_params + 3 * 2 * attention


def run_one(stack: str, size: str, seq: int, steps: int, cap_gib: float | None = None,
            kernel_time: bool = False) -> dict:  # fmt: skip
    """Runs in the subprocess: build, train `steps` steps, measure steps 3..N (then, with
    `kernel_time`, one more step under the profiler: its summed GPU kernel time, device_time.py)."""
    import torch

    if cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    torch.manual_seed(0)
    build_start = time.perf_counter()
    model, opt = BUILDERS[stack](size, seq)
    build_s = time.perf_counter() - build_start
    vocab = SHAPES[size]["vocab_size"]
    model.train()
    times, losses = [], []

    def train_step():
        ids = torch.randint(0, vocab, (1, seq), device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for step in range(steps):
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    measured = times[2:] or times[-1:]  # --steps 1 or 2 (the longest-sequence search): the last step
    managed_gib = managed_optimizer_state_bytes(opt) / 2**30
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    kernel_ms = device_time_ms(train_step, "cuda") if kernel_time else None
    step_s = sorted(measured)[len(measured) // 2]
    tokens_per_s = seq / step_s
    return {
        "stack": stack, "model": size, "seq": seq, "batch": 1, "steps": steps,
        "median_step_s": step_s, "tokens_per_s": tokens_per_s,
        "peak_allocated_gib": peak_gib, "managed_optimizer_state_gib": managed_gib,
        "peak_device_gib": peak_gib + managed_gib,
        "mfu_vs_748_tflops": tokens_per_s * flops_per_token(size, seq) / 748e12,
        "build_s": build_s, "first_loss": losses[0], "last_loss": losses[-1], "cap_gib": cap_gib,
        "kernel_ms": kernel_ms,
    }  # fmt: skip


def managed_optimizer_state_bytes(opt) -> int:
    """Bytes of optimizer state held outside PyTorch's allocator: bitsandbytes' paged buffers
    (`is_paged`, CUDA managed memory). Ours (PagedAdamW) allocates through PyTorch: 0."""
    import torch

    return sum(t.nbytes for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t) and getattr(t, "is_paged", False))  # fmt: skip


def environment() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit or None}


def child_command(stack: str, model: str, seq: int, steps: int, cap_gib: float | None = None,
                  kernel_time: bool = False) -> list[str]:  # fmt: skip
    """The command of one measured case: a fresh process per (stack, seq)."""
    cmd = [sys.executable, __file__, "--child", stack, "--model", model, "--seq", str(seq), "--steps", str(steps)]
    return cmd + (["--cap-gib", str(cap_gib)] if cap_gib else []) + (["--kernel-time"] if kernel_time else [])


def warmup_command(model: str, stack: str, seq: int) -> list[str]:
    """A short run of the first case, discarded. On the H200 (2026-12-06) whichever stack ran first
    at seq 2048 measured 15-25% below its own rate in a later process of the same run (ours 6,016
    first, 8,864 later; ours_full_recompute 7,423 second, 7,068 first), whatever the stack: the
    first process after start-up pays for something (GPU clocks, the page cache of the
    checkpoint, the kernel cache) that its own warm-up steps do not cover."""
    return child_command(stack, model, seq, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stacks", default="ours,bnb_peft,unsloth")
    parser.add_argument("--out", help="write all JSON records to this file")
    parser.add_argument("--cap-gib", type=float, help="per-process device memory cap (longest-sequence search)")
    parser.add_argument("--no-warmup-run", action="store_true",
                        help="skip the discarded first run (see warmup_command)")  # fmt: skip
    parser.add_argument("--kernel-time", action="store_true",
                        help="also profile one more step per case: its summed GPU kernel time (device_time.py)")
    parser.add_argument("--child-timeout", type=float,
                        help="seconds one case (stack, length) may run; past it the case is recorded as skipped "
                             "(with --cap-gib its stack stops there too)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the stacks this many times per length, alternating their order, and report per "
                             "stack the median over rounds of tokens/s and of its ratio to ours in the same round "
                             "(a shared host drifts by tens of percent within minutes; ratios within a round "
                             "cancel most of it)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child, args.model, args.seq[0], args.steps, args.cap_gib, args.kernel_time)
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = environment()
    records = []
    failed: set[str] = set()
    seqs = sorted(args.seq) if args.cap_gib else args.seq
    stacks = args.stacks.split(",")
    if not args.no_warmup_run:
        print("warm-up run (discarded): " + " ".join(warmup_command(args.model, stacks[0], seqs[0])), flush=True)
        subprocess.run(warmup_command(args.model, stacks[0], seqs[0]), capture_output=True, text=True)
    order = [(seq, k, stack) for seq in seqs for k in range(max(1, args.rounds))
             for stack in (stacks if k % 2 == 0 else stacks[::-1])]  # fmt: skip
    for seq, round_index, stack in order:
        if stack in failed:
            continue
        cmd = child_command(stack, args.model, seq, args.steps, args.cap_gib, args.kernel_time)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            lines, tail = [], [f"timed out after {args.child_timeout:g} s (--child-timeout)"]
        if lines:
            record = {**env, **json.loads(lines[-1][len("RESULT "):]), "round": round_index}
        else:
            record = {**env, "stack": stack, "model": args.model, "seq": seq, "skipped": " | ".join(tail),
                      "cap_gib": args.cap_gib}  # fmt: skip
            if args.cap_gib:
                failed.add(stack)
        print(json.dumps(record), flush=True)
        records.append(record)
        if args.out:  # after every case: a run cut short keeps what it measured
            write_records(args.out, records)
    ours = {(r["seq"], r.get("round")): r for r in records if r["stack"] == "ours" and "tokens_per_s" in r}
    print(f"\n{'stack':10} {'seq':>6} {'tokens/s':>9} {'peak GiB':>9} {'(torch':>7} {'+ paged)':>8} {'MFU':>6} {'ours/this':>9}"
          f"{' kernel ms' if args.kernel_time else ''}")
    for r in records:
        if "tokens_per_s" not in r:
            print(f"{r['stack']:10} {r['seq']:>6}  skipped: {r['skipped'][:90]}")
            continue
        same_round = ours.get((r["seq"], r.get("round")))
        ratio = same_round["tokens_per_s"] / r["tokens_per_s"] if same_round else float("nan")
        print(f"{r['stack']:10} {r['seq']:>6} {r['tokens_per_s']:>9.0f} {r['peak_device_gib']:>9.2f} {r['peak_allocated_gib']:>7.2f} "
              f"{r['managed_optimizer_state_gib']:>8.2f} {r['mfu_vs_748_tflops']:>6.1%} {ratio:>9.2f}"
              + ("" if r.get("kernel_ms") is None else f" {r['kernel_ms']:>9.1f}"))
    if args.rounds > 1:
        records += round_summaries(records, env)
        print(f"\nover {args.rounds} rounds (medians): ")
        for summary in (r for r in records if r.get("summary") == "rounds"):
            print(f"{summary['stack']:10} {summary['seq']:>6} {summary['median_tokens_per_s']:>9.0f} tok/s  "
                  f"ours/this {summary['median_ratio_ours_to_this']:.3f} (rounds: "
                  + ", ".join(f"{x:.3f}" for x in summary["ratios_ours_to_this"]) + ")")
    if args.cap_gib:
        longest = {s: max((r["seq"] for r in records if r["stack"] == s and "tokens_per_s" in r), default=0)
                   for s in args.stacks.split(",")}  # fmt: skip
        print(f"\nlongest sequence trained under {args.cap_gib:g} GiB (of those tried): " +
              ", ".join(f"{s} {n}" for s, n in longest.items()))
        records.append({**env, "summary": "longest_seq", "cap_gib": args.cap_gib, "longest": longest})
    if args.out:
        write_records(args.out, records)


def round_summaries(records: list[dict], env: dict) -> list[dict]:
    """Per (stack, seq) over the rounds: the median tokens/s, and the ratio ours/this of each round
    (ours and this stack measured minutes apart in one round) with its median."""
    measured = [r for r in records if "tokens_per_s" in r and "round" in r]
    ours = {(r["seq"], r["round"]): r["tokens_per_s"] for r in measured if r["stack"] == "ours"}
    summaries = []
    for stack, seq in dict.fromkeys((r["stack"], r["seq"]) for r in measured):
        mine = [r for r in measured if r["stack"] == stack and r["seq"] == seq]
        ratios = [ours[seq, r["round"]] / r["tokens_per_s"] for r in mine if (seq, r["round"]) in ours]
        summaries.append({**env, "summary": "rounds", "stack": stack, "seq": seq, "rounds": len(mine),
                          "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                          "ratios_ours_to_this": ratios,
                          "median_ratio_ours_to_this": statistics.median(ratios) if ratios else float("nan")})  # fmt: skip
    return summaries


def write_records(path: str, records: list[dict]) -> None:
    """The records as one JSON list, written atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
