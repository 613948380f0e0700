"""PagedAdamW step time and device memory on Llama-3-8B-shaped LoRA state (BENCHMARKS.md).

LoRA r=16 on q, k, v, o, gate, up, down of 32 layers (hidden 4096, intermediate 14336, kv dim
1024): 448 tensors, 41.9M fp32 parameters. Cases:

  resident   state on the device; vs torch.optim.AdamW(fused=True) in the same run.
             Ceiling: bytes the update must move (28 B/param fp32 32-bit state, 16.06 B/param
             8-bit) / the device copy bandwidth measured here.
  paged      device_budget = 1/8 of the state: step time vs the PCIe lower bound measured here
             (pinned copies of the state bytes host->device and device->host: both directions
             one after the other, and both at once on two streams), and the most device memory
             the optimizer held (torch.cuda.max_memory_allocated above params + grads) vs the
             budget.

Prints one JSON object per case, then a table.  python benchmarks/bench_paged_adamw.py --out FILE
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

import qlora_ext

HIDDEN, INTERMEDIATE, KV, LAYERS, RANK = 4096, 14336, 1024, 32, 16
PROJECTIONS = {  # name: (in_features, out_features)
    "q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
    "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN),
}  # fmt: skip


def lora_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for _ in range(LAYERS):
        for fan_in, fan_out in PROJECTIONS.values():
            for shape in ((RANK, fan_in), (fan_out, RANK)):
                p = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 0.01)
                p.grad = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 1e-3
                params.append(p)
    return params


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() / (ms * 1e-3)


def pcie_bounds(nbytes: int) -> dict:
    """Pinned host<->device copy of nbytes: H2D, D2H, both in sequence, both at once."""
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = time_ms(lambda: dev.copy_(host_in, non_blocking=True), reps=5)
    d2h = time_ms(lambda: host_out.copy_(dev, non_blocking=True), reps=5)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        main = torch.cuda.current_stream()
        s1.wait_stream(main)
        s2.wait_stream(main)
        with torch.cuda.stream(s1):
            dev.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(s2):
            host_out.copy_(dev2, non_blocking=True)
        main.wait_stream(s1)
        main.wait_stream(s2)

    duplex = time_ms(both, reps=5)
    del host_in, host_out, dev, dev2
    return {"h2d_ms": h2d, "d2h_ms": d2h, "sequential_ms": h2d + d2h, "duplex_ms": duplex,
            "h2d_GBps": nbytes / h2d / 1e6, "d2h_GBps": nbytes / d2h / 1e6}  # fmt: skip


def run_steps(make_optimizer, steps: int = 20):
    """(optimizer, median step time in ms, the most device memory allocated over steps 3..N
    above what was allocated before the optimizer existed: what the optimizer holds)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    opt = make_optimizer()
    opt.step()
    opt.step()  # steps 1-2: state laid out and placed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(opt.step, warmup=1, reps=steps)
    torch.cuda.synchronize()
    return opt, ms, torch.cuda.max_memory_allocated() - base


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def host_proxy(n_tensors: int = 448, numel: int = 256, reps: int = 50) -> list[dict]:
    """Host cost of a step, measured on the CPU: the LoRA tensor count with tiny tensors (256
    elements each), so the update's arithmetic is negligible and what remains is the per-step
    Python/dispatch work that an accelerator's step also pays. Median of `reps` steps, in ms.
    One intra-op thread: with tiny tensors a second thread only adds wake-up latency, which on a
    shared machine is noise (0.7 vs 8 ms for the same step)."""
    import time

    torch.set_num_threads(1)

    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(numel, generator=g)) for _ in range(n_tensors)]
        for p in ps:
            p.grad = torch.randn(numel, generator=g) * 1e-3
        return ps

    def median_ms(opt) -> float:
        opt.step()
        opt.step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    state = n_tensors * 2 * 4 * numel  # 32-bit state bytes
    cases = {
        "resident-32bit": lambda ps: qlora_ext.PagedAdamW(ps, lr=2e-4),
        "paged-32bit (1/8 budget)": lambda ps: qlora_ext.PagedAdamW(ps, lr=2e-4, device_budget=state // 8),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=2e-4, foreach=True),
        "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=2e-4, foreach=False),
    }  # fmt: skip
    out = []
    for name, make in cases.items():
        opt = make(params())
        row = {"case": f"host-proxy {name}", "n_tensors": n_tensors, "numel": numel,
               "median_ms": median_ms(opt), "threads": torch.get_num_threads()}  # fmt: skip
        if isinstance(opt, qlora_ext.PagedAdamW):
            row.update(page_bytes=opt.page_bytes, pages=len(opt._pager.pages), paged=opt.paged)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--page-mib", type=int, default=None,
                        help="page size (default: PagedAdamW's automatic choice, a quarter of the budget up to 16 MiB)")
    parser.add_argument("--host-proxy", action="store_true",
                        help="measure only the host cost of a step on the CPU (no CUDA needed)")
    args = parser.parse_args()
    if args.host_proxy:
        host_proxy()
        return
    if not torch.cuda.is_available():
        sys.exit("bench_paged_adamw needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    page_bytes = None if args.page_mib is None else args.page_mib << 20
    common = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "commit": commit(), "param_dtype": args.dtype, "n_tensors": LAYERS * len(PROJECTIONS) * 2,
    }  # fmt: skip
    copy_bw = copy_bandwidth()
    results = []

    def emit(case: dict) -> None:
        case = {**common, **case}
        results.append(case)
        print(json.dumps(case), flush=True)

    elem = torch.tensor([], dtype=dtype).element_size()
    for bits in (32, 8):
        params = lora_params(dtype)
        n = sum(p.numel() for p in params)
        opt, ms, held = run_steps(lambda: qlora_ext.PagedAdamW(params, lr=2e-4, bits=bits, page_bytes=page_bytes))
        state_b = 8 if bits == 32 else 2 + 8 / 256
        moved = n * (3 * elem + 2 * state_b)
        case = {"case": f"resident-{bits}bit", "n_params": n, "median_ms": ms, "GBps": moved / ms / 1e6,
                "copy_ceiling_fraction": moved / (ms * 1e-3) / copy_bw, "state_bytes": opt.state_bytes(),
                "device_bytes": opt.device_bytes(), "max_extra_allocated": held}  # fmt: skip
        if bits == 32:
            peer_params = lora_params(dtype)
            peer, peer_ms, _ = run_steps(lambda: torch.optim.AdamW(peer_params, lr=2e-4, fused=True))
            case.update({"torch_fused_ms": peer_ms, "speedup_vs_torch_fused": peer_ms / ms})
            del peer, peer_params
        emit(case)

        state_bytes = opt.state_bytes()
        del opt
        budget = state_bytes // 8 if page_bytes is None else max(state_bytes // 8, 2 * page_bytes + 2048)
        torch.cuda.empty_cache()
        opt, ms, held = run_steps(lambda: qlora_ext.PagedAdamW(
            params, lr=2e-4, bits=bits, device_budget=budget, page_bytes=page_bytes), steps=10)
        bound = pcie_bounds(state_bytes)
        emit({"case": f"paged-{bits}bit", "n_params": n, "median_ms": ms, "state_bytes": state_bytes,
              "device_budget": budget, "page_bytes": opt.page_bytes, "device_bytes": opt.device_bytes(),
              "max_extra_allocated": held,
              "within_budget": held <= budget, "pcie": bound,
              "fraction_of_duplex_bound": bound["duplex_ms"] / ms,
              "fraction_of_sequential_bound": bound["sequential_ms"] / ms})  # fmt: skip
        del opt, params
        torch.cuda.empty_cache()

    print(f"\n{'case':<16}{'ms':>9}{'peer ms':>9}{'ratio':>7}{'bound ms':>10}{'held MiB':>10}{'budget MiB':>11}")
    for r in results:
        peer = r.get("torch_fused_ms")
        bound = r.get("pcie", {}).get("duplex_ms")
        ms = r["median_ms"]
        peer_s = f"{peer:.2f}" if peer else "-"
        ratio_s = f"{peer / ms:.2f}" if peer else "-"
        bound_s = f"{bound:.2f}" if bound else "-"
        held = r["max_extra_allocated"] / 2**20
        budget = r.get("device_budget", 0) / 2**20
        print(f"{r['case']:<16}{ms:>9.2f}{peer_s:>9}{ratio_s:>7}{bound_s:>10}{held:>10.1f}{budget:>11.1f}")
    print(f"device copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
