"""Where the M = 1 ring's time goes at the small shapes: a per-warp timeline of one launch.

The M = 1 ring runs 4096^2 in ~7.7 us (H100) where a pure read of its bytes takes 4.3; a line through the ring's
times gives ~4 us of fixed cost a call against the read's ~1.8 (session 27's reading of gemv_ring_h100.json and
read_floor_h100.json). This compiles gemv_v16_experiment.py's CuPy ring with -DTRACE, so that lane 0 of every
warp stamps %globaltimer and clock64 at its entry, once its tables are built, at each item's arrival (the ring
wait done), after its last item's arithmetic and at its exit, and prints, per shape and configuration
(ring2_c3: 2 stages, 3 CTAs a SM; ring3: 3 stages, 2 CTAs a SM), the spread of those moments over the warps of a
launch with a cold L2: how late warps start, how long the tables take, how long the first item takes to arrive,
how the arrivals advance, and how long the end (last arithmetic, tile sum, exit) takes.

    python benchmarks/gpu_checks/ring_timeline.py [--out ring_timeline.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))

import gemv_v16_experiment as exp  # noqa: E402
import qlora_ext  # noqa: E402
from bench_nf4_linear import git_commit  # noqa: E402
from qlora_ext import codebooks  # noqa: E402

SLOTS = 28  # entry, tables, 24 item arrivals, last arithmetic, exit
# stages, CTAs a SM, TABLES_FIRST (session 28: the NF4 table from constants, the nested map copied ahead of the weight)
CONFIGS = {"ring2_c3": (2, 3, False), "ring3": (3, 2, False), "ring2_c3_tf": (2, 3, True), "ring3_tf": (3, 2, True)}
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]


def pct(values: list[float]) -> dict:
    """min / median / 90th percentile / max, rounded to 0.01."""
    s = sorted(values)
    return {"min": round(s[0], 3), "p50": round(statistics.median(s), 3), "p90": round(s[int(0.9 * (len(s) - 1))], 3),
            "max": round(s[-1], 3)}  # fmt: skip


def traced_ring(cupy, stages: int, ctas: int, sms: int, tables_first: bool = False):
    warps = sms * ctas * 8
    options = ("--std=c++17", f"-DSTAGES={stages}", f"-DCTAS={ctas}", f"-DTRACE={SLOTS}", f"-DTRACE_WARPS={warps}",
               *(("-DTABLES_FIRST=1",) if tables_first else ()))
    module = cupy.RawModule(code=exp.KERNEL, options=options)
    kernel = module.get_function("gemv_ring")
    rows, tile_rows, k_multiple, fixed_bytes, stage_bytes = exp.DOMAINS["gemv_ring"]
    smem = fixed_bytes + 8 * stages * stage_bytes
    kernel.max_dynamic_shared_size_bytes = smem
    trace = cupy.ndarray((warps, SLOTS, 2), dtype=cupy.uint64, memptr=module.get_global("g_trace"))
    trace_sm = cupy.ndarray((warps,), dtype=cupy.uint32, memptr=module.get_global("g_trace_sm"))
    nf4 = codebooks.nf4_code("cuda")

    def launch(x: torch.Tensor, q: qlora_ext.NF4Weight, y: torch.Tensor) -> int:
        N, K = q.shape
        grid = min(N // tile_rows, ctas * sms)
        args = (x.data_ptr(), cupy.int32(x.shape[0]), q.packed.data_ptr(), q.absmax.data_ptr(),
                q.nested.absmax2.data_ptr(), q.nested.code.data_ptr(), q.nested.offset.data_ptr(), nf4.data_ptr(),
                cupy.int64(N), cupy.int64(K), y.data_ptr())  # fmt: skip
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        kernel((grid,), (256,), args, stream=stream, shared_mem=smem)
        return grid

    return launch, trace, trace_sm


def timer_step(values: list[int]) -> int:
    """The smallest step between distinct %globaltimer readings: its resolution, if the stamps are dense."""
    distinct = sorted(set(v for v in values if v))
    return int(min((b - a for a, b in zip(distinct, distinct[1:])), default=0))


def summarize(stamps, sms_of, grid: int) -> dict:
    """The timeline's figures in us (globaltimer) from one launch's stamps [warps, SLOTS, 2]."""
    used = stamps[: grid * 8]
    gt = used[:, :, 0].astype("float64") / 1000.0
    clk = used[:, :, 1].astype("float64")
    t0 = gt[:, 0].min()
    # SM clock from each warp's whole span (cycles over globaltimer), to turn clock64 differences into us
    ghz = float(((clk[:, SLOTS - 1] - clk[:, 0]) / (gt[:, SLOTS - 1] - gt[:, 0]).clip(min=1e-3) / 1000.0).mean())
    to_us = ghz * 1000.0
    # a warp's arrivals: slots 2 .. SLOTS - 3, stamped for its first SLOTS - 4 items (unstamped ones are zero)
    arrivals = used[:, 2 : SLOTS - 2, 0] != 0
    last = arrivals.shape[1] - 1 - np.argmax(arrivals[:, ::-1], axis=1) + 2  # the slot of each warp's last arrival
    rows = np.arange(used.shape[0])
    out = {
        "sm_clock_ghz": round(ghz, 3),
        "globaltimer_step_ns": timer_step(used[:, :, 0].ravel().tolist()),
        "span_us": round(float(gt[:, SLOTS - 1].max() - t0), 3),
        "items_stamped": pct(arrivals.sum(axis=1).astype(float).tolist()),
        "entry_us": pct((gt[:, 0] - t0).tolist()),
        "tables_us": pct(((clk[:, 1] - clk[:, 0]) / to_us).tolist()),
        "first_arrival_after_entry_us": pct(((clk[:, 2] - clk[:, 0]) / to_us).tolist()),
        "first_arrival_us": pct((gt[:, 2] - t0).tolist()),
        "last_arrival_us": pct((gt[rows, last] - t0).tolist()),
        "last_arithmetic_done_us": pct((gt[:, SLOTS - 2] - t0).tolist()),
        "after_last_arrival_us": pct(((clk[:, SLOTS - 2] - clk[rows, last]) / to_us).tolist()),
        "tile_end_and_exit_us": pct(((clk[:, SLOTS - 1] - clk[:, SLOTS - 2]) / to_us).tolist()),
        "exit_us": pct((gt[:, SLOTS - 1] - t0).tolist()),
    }
    both = arrivals[:, 1:] & arrivals[:, :-1]  # consecutive stamped arrivals
    if both.any():
        gaps = (clk[:, 3 : SLOTS - 2] - clk[:, 2 : SLOTS - 3]) / to_us
        out["between_arrivals_us"] = pct(gaps[both].tolist())
    # per SM: its last exit (a few late SMs would make a tail)
    sm_exit: dict[int, float] = {}
    for w, sm in enumerate(sms_of[: grid * 8].tolist()):
        sm_exit[sm] = max(sm_exit.get(sm, 0.0), float(gt[w, SLOTS - 1] - t0))
    out["sm_last_exit_us"] = pct(list(sm_exit.values()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: all")
    args = parser.parse_args(argv)
    try:
        import cupy
    except ImportError:
        print("ring_timeline: needs CuPy (the GPU machine's image has it)", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # past the L2: each launch starts cold
    results = []
    for name, (stages, ctas, tables_first) in CONFIGS.items():
        if args.configs and name not in args.configs:
            continue
        launch, trace, trace_sm = traced_ring(cupy, stages, ctas, sms, tables_first)
        for N, K in SHAPES:
            x, q = exp.random_case(1, N, K)
            y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
            grid = launch(x, q, y)  # warm (module load, L2 of the constants)
            torch.cuda.synchronize()
            check = exp.check(lambda xx, qq: (launch(xx, qq, y), y)[1], x, q)  # the traced kernel still computes
            items_per_warp = -(-(N // 16) // grid) * (K // 256) // 8  # the busiest warp's items (SLOTS - 4 stamped)
            runs = []
            for _ in range(args.runs):
                flush.add_(1)
                trace.fill(0)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(x, q, y)
                end.record()
                torch.cuda.synchronize()
                row = summarize(trace.get(), trace_sm.get(), grid)
                row["event_us"] = round(start.elapsed_time(end) * 1000.0, 3)
                runs.append(row)
            best = min(runs, key=lambda r: r["span_us"])
            result = {"config": name, "N": N, "K": K, "grid": grid, "items_per_warp": items_per_warp,
                      "spans_us": [r["span_us"] for r in runs], "events_us": [r["event_us"] for r in runs],
                      "correct": check["correct"], "fastest_run": best}  # fmt: skip
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit()}
        args.out.write_text("".join(json.dumps({**env, **r}) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
