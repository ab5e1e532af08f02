"""Where lora_tune's CPU speed and memory come from: rows of the TRL matrix with one of our defaults
changed at a time (allocator, train.compile), on each CPU kind; each run in a fresh process. The
default itself is the matrix's own runs of lora_tune (the newest results/trl-*.json), not run again.

    python benchmarks/ablation.py [--reps 1] [--kinds native,avx2]

Writes benchmarks/results/ablation-<stamp>.json and appends a table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.bench.compare import CPU_KINDS, MATRIX, hardware, run_one, write_results_json
from lora_tune.bench.data import write_bench_data
from lora_tune.bench.worker import Spec

HERE = Path(__file__).parent
ROWS = ("full256-fp32-mb8", "full256-bf16-mb8")
DEFAULT = "lora_tune default (preloaded allocator, compiled layers; the matrix's runs)"
VARIANTS = [
    ("- compile (train.compile: false)", {"compile": False}),
    ("- allocator (glibc malloc: LORA_TUNE_ALLOCATOR=system)", {"allocator": "system"}),
    ("mimalloc instead of tcmalloc (what a pip install brings)", {"allocator": "mimalloc"}),
]
FIGURES = ("tokens_per_s", "peak_mb", "step_s", "warmup_s", "val_loss")


def matrix_runs() -> tuple[str, list[dict]]:
    """The newest TRL matrix result file's name and its runs of lora_tune."""
    path = max((HERE / "results").glob("trl-*.json"), key=lambda p: p.name)
    return path.name, [r for r in json.loads(path.read_text())["runs"] if r["tool"] == "ours" and "error" not in r]


def figures(name: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"variant": name, "runs": runs}
    for key in FIGURES:
        out[key] = statistics.median(r[key] for r in ok) if ok and all(key in r for r in ok) else None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--kinds", default="native,avx2")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    unknown = set(args.kinds.split(",")) - set(CPU_KINDS)
    if unknown:
        p.error(f"--kinds: no kind {', '.join(sorted(unknown))}; choose from {', '.join(CPU_KINDS)}")
    source, defaults = matrix_runs()
    rows = []
    for kind in args.kinds.split(","):
        for row in (r for r in MATRIX if r.name in ROWS and kind in r.kinds):
            train_file, val_file = write_bench_data(HERE / "data", shape=row.data)
            mine = [r for r in defaults if r["name"] == row.name and r.get("cpu_kind") == kind]
            rows.append({"cpu_kind": kind, "row": row.name, "change": {}, **figures(DEFAULT, mine)})
            # the allocator's effect does not hang on the kernels: measured on the native kind only (time)
            for name, change in VARIANTS if kind == "native" else VARIANTS[:1]:
                spec = dict(tool="ours", name=row.name, train_file=str(train_file), val_file=str(val_file))
                spec |= {"steps": args.steps, "cpu_kind": kind, "data": row.data, "compile": True, **row.settings}
                spec |= change
                runs = [run_one(Spec(**spec)) for _ in range(args.reps)]
                out = {"cpu_kind": kind, "row": row.name, "change": change, **figures(name, runs)}
                rows.append(out)
                print(
                    f"{kind:6s} {row.name:18s} {name:58s} {out['tokens_per_s'] or 0:6.0f} tok/s "
                    f"{out['peak_mb'] or 0:6.0f} MB warm-up {out['warmup_s'] or 0:5.1f} s",
                    flush=True,
                )
    result = {"hardware": hardware(), "reps": args.reps, "defaults_from": source, "rows": rows}
    path = write_results_json(HERE, "ablation", result)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## Where the CPU speed and memory come from (ablation, {stamp}, {path.name})",
        "",
        f"One default changed at a time; {args.reps} run(s) each, {args.steps} timed steps after 2 warm-up "
        f"steps (the warm-up holds the compile). The default rows are the matrix's runs ({source}).",
        "",
        "| CPU kind | configuration | variant | real tokens/s | vs default | peak MB | warm-up s | val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["cpu_kind"] == r["cpu_kind"] and x["row"] == r["row"])
        if r["tokens_per_s"] is None:
            lines.append(f"| {r['cpu_kind']} | {r['row']} | {r['variant']} | failed | | | | |")
            continue
        lines.append(
            f"| {r['cpu_kind']} | {r['row']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak_mb']:.0f} | {r['warmup_s']:.1f} | "
            f"{r['val_loss']:.3f} |"
        )
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
