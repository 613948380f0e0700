"""One table of every nf4_gemm_sm90_check result in a folder: each build (variant) with its checks and, per shape,
its speed against bf16 cuBLAS with the weight hot in L2 and with weights rotating past it (the bars' method).

    python3 benchmarks/gpu_checks/nf4_gemm_sm90_summary.py OUT_DIR [--out summary.md]

Reads OUT_DIR/nf4_gemm_sm90*.json.txt (one per build, as nf4_gemm_sm90_check.sh names them: the suffix is the
variant, "_check" for the library's build), standard library only (the GPU machine's python3 may lack numpy).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULT_NAME = re.compile(r"^nf4_gemm_sm90(?P<variant>.*)_(?P<tag>[a-z0-9]+)\.json\.txt$")


def read_results(path: Path) -> tuple[list[dict], bool]:
    """The JSON lines of one result file, and whether it ended with RESULT: PASS (a hang or a crash ends without)."""
    records, passed = [], False
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        elif line.startswith("RESULT: PASS"):
            passed = True
    return records, passed


def summarize(folder: Path) -> str:
    rows, shapes = [], []
    for path in sorted(folder.glob("nf4_gemm_sm90*.json.txt")):
        match = RESULT_NAME.match(path.name)
        if match is None:
            continue
        variant = match["variant"].lstrip("_") or "check"
        records, passed = read_results(path)
        checks = [r for r in records if r.get("kind") == "check" and "correct" in r]
        failed = sum(not r["correct"] for r in checks)
        errors = [r for r in records if r.get("kind") == "error"]
        speeds = {}
        for r in records:
            if r.get("kind") == "time" and "speed_vs_bf16" in r:
                shape = f"{r['N']}x{r['K']}"
                if shape not in shapes:
                    shapes.append(shape)
                speeds[(shape, r.get("weights", "hot"))] = r["speed_vs_bf16"]
        if errors:
            verdict = "ERROR"
        elif failed:
            verdict = f"{failed} FAIL"
        elif not passed:  # killed (a hang, the step's timeout) or crashed before its end
            verdict = f"no RESULT line ({len(checks)} passed)"
        else:
            verdict = f"{len(checks)}/{len(checks)} pass" if checks else "timed only"
        rows.append((variant, verdict, speeds))
    head = "| build | checks | " + " | ".join(f"{s} hot / rotating" for s in shapes) + " |"
    lines = [head, "|" + "---|" * (2 + len(shapes))]
    for variant, verdict, speeds in rows:
        cells = []
        for shape in shapes:
            hot, rotating = speeds.get((shape, "hot")), speeds.get((shape, "rotating"))
            cells.append(" / ".join("-" if v is None else f"{v:.3f}" for v in (hot, rotating)))
        lines.append(f"| {variant} | {verdict} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Speed = bf16 cuBLAS time / ours at M = 2048 (bar: 0.95 rotating). Diagnostic builds (diag*) "
                 "compute wrong results on purpose: timed only.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = summarize(args.folder)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
