"""Benchmark lora_tune against TRL SFTTrainer + PEFT on SmolLM2-135M, side by side in one run.

    pip install -e '.[bench]'        # adds trl
    python benchmarks/compare_trl.py [--reps 3] [--steps 8]

Writes benchmarks/results/trl-<stamp>.json, benchmarks/RESULTS.md and benchmarks/results.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_tune.bench.compare import compare

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    compare(Path(__file__).parent, reps=args.reps, steps=args.steps, warmup=args.warmup)
