"""Benchmark lora_tune against TRL SFTTrainer + PEFT on SmolLM2-135M, side by side in one run.

    pip install -e '.[bench]'        # adds trl
    python benchmarks/compare_trl.py [--reps 2] [--steps 6] [--kinds native,avx2]

Writes benchmarks/results/trl-<stamp>.json, benchmarks/RESULTS.md and benchmarks/results.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_tune.bench.compare import MATRIX, compare

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kinds", default="native,avx2", help="CPU kinds to run on (lora_tune.bench.compare.CPU_KINDS)")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    args = p.parse_args()
    only = {x for x in args.only.split(",") if x}
    compare(
        Path(__file__).parent,
        reps=args.reps,
        steps=args.steps,
        warmup=args.warmup,
        matrix=[r for r in MATRIX if not only or r.name in only],
        kinds=tuple(args.kinds.split(",")),
    )
