"""Where lora_tune's speed comes from: the default QLoRA benchmark configuration with one lever turned
off at a time (each run in a fresh process, median of --reps).

    python benchmarks/ablation.py [--reps 2]

Appends a table to benchmarks/RESULTS.md and writes benchmarks/results/ablation-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.bench.compare import run_one
from lora_tune.bench.data import write_bench_data
from lora_tune.bench.worker import Spec

HERE = Path(__file__).parent
VARIANTS = [
    ("lora_tune default (QLoRA NF4, checkpointing)", {}),
    ("+ packing", {"packing": True}),
    ("- length grouping (plain padded batches)", {"extra": {"data.group_by_length": False}}),
    ("- response-only logits (loss on all tokens)", {"extra": {"data.loss_on": "all"}}),
    ("- chunked loss (all logits at once)", {"extra": {"train.chunked_loss": False}}),
    ("- bf16 autocast (fp32 compute)", {"extra": {"train.precision": "fp32"}}),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    train_file, val_file = write_bench_data(HERE / "data")
    rows = []
    for name, settings in VARIANTS:
        runs = [
            run_one(
                Spec(tool="ours", name=name, train_file=str(train_file), val_file=str(val_file), steps=8, **settings)
            )
            for _ in range(args.reps)
        ]
        ok = [r for r in runs if "error" not in r]
        row = {
            "name": name,
            "settings": settings,
            "runs": runs,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok) if ok else None,
            "peak_mb": statistics.median(r["peak_mb"] for r in ok) if ok else None,
        }
        rows.append(row)
        print(f"{name:48s} {row['tokens_per_s'] or 0:7.0f} tok/s {row['peak_mb'] or 0:7.0f} MB", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"ablation-{stamp}.json").write_text(json.dumps({"rows": rows}, indent=2, default=str))
    base = rows[0]["tokens_per_s"]
    lines = [
        "",
        f"## Where the speed comes from (ablation, {stamp}, median of {args.reps})",
        "",
        "| variant | real tokens/s | vs default | peak MB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['peak_mb']:.0f} |"
        for r in rows
        if r["tokens_per_s"]
    ]
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
