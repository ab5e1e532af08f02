"""Quality at equal steps: lora_tune vs TRL SFTTrainer + PEFT, task metrics over several seeds.

    pip install -e '.[bench]'        # adds trl
    python benchmarks/quality.py [--seeds 0,1,2] [--tasks newsgroups,analogy] [--ablate]
    lora-tune bench --quality        # the same

Builds the tasks from real corpora (lora_tune/bench/quality_data.py), trains both tools with one
protocol and equal steps, scores every adapter with one function, and writes
benchmarks/results/quality-<stamp>.json and the quality section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_tune.bench.quality import ABLATIONS, run_quality

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--ablate", action="store_true", help="add lora_tune runs with one default changed at a time")
    args = p.parse_args()
    run_quality(
        Path(__file__).parent,
        tasks=args.tasks.split(",") if args.tasks else None,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        ablate=list(ABLATIONS) if args.ablate else None,
    )
