"""Memory over 1,000 QLoRA training steps on the GPU: host RSS, live tensors, device memory.

A small Llama (hidden 512, 4 layers, vocab 8192; random weights), prepared with qlora_ext.prepare
(NF4, LoRA r 16, checkpointing, fused loss) and PagedAdamW, seq 512. Records after warm-up and
every 100 steps; the check is that nothing grows after warm-up.

    python benchmarks/leak_check.py --out benchmarks/results/leak_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import qlora_ext  # noqa: E402
from qlora_ext.io_utils import atomic_write_json  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024)  # fmt: skip
    model = LlamaForCausalLM(config).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    qlora_ext.prepare(model, r=16, method=args.method, verbose=False)
    model.train()
    opt = qlora_ext.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    records = []
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (1, 512), device=device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup and step % 100 == 0 or step == args.warmup:
            gc.collect()
            record = {"step": step, "rss_bytes": rss(),
                      "live_tensors": sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)),
                      "device_allocated": torch.cuda.memory_allocated() if device == "cuda" else 0,
                      "loss": float(loss)}  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
    first, last = records[0], records[-1]
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "method": args.method, "steps": args.steps, "warmup": args.warmup,
        "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
        "live_tensor_growth": last["live_tensors"] - first["live_tensors"],
        "device_allocated_growth_bytes": last["device_allocated"] - first["device_allocated"],
        "records": records,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    if args.out:
        atomic_write_json(args.out, summary)


if __name__ == "__main__":
    main()
