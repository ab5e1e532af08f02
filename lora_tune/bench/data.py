"""Deterministic chat data sets for benchmarks, built from the demo chats: variable-length chats of
1-6 turns, and long chats that every max_length up to 512 truncates (full-length samples)."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

# name -> (turns per chat: fewest, most)
SHAPES = {
    "chats": (1, 6),  # ~70 to ~400 tokens
    "long": (16, 24),  # ~900 to ~1500 tokens: every sample is cut to max_length
}


def write_bench_data(
    out_dir: Path, n_train: int = 200, n_val: int = 24, seed: int = 0, shape: str = "chats"
) -> tuple[Path, Path]:
    """Write train/val JSONL of multi-turn chats of the given `shape` (see SHAPES); returns their paths."""
    lo, hi = SHAPES[shape]
    src = Path(str(resources.files("lora_tune") / "assets" / "demo_train.jsonl"))
    pairs = [json.loads(line)["messages"] for line in src.read_text().splitlines() if line.strip()]
    system = pairs[0][0]
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    prefix = "bench" if shape == "chats" else f"bench_{shape}"
    for name, n in (("train", n_train), ("val", n_val)):
        rows = []
        for _ in range(n):
            turns = [m for conv in rng.sample(pairs, rng.randint(lo, hi)) for m in conv[1:]]
            rows.append(json.dumps({"messages": [system, *turns]}))
        path = out_dir / f"{prefix}_{name}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1]
