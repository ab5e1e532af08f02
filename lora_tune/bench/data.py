"""A deterministic variable-length chat data set for benchmarks (1-6 turns built from the demo chats)."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path


def write_bench_data(out_dir: Path, n_train: int = 200, n_val: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Write train/val JSONL of multi-turn chats whose lengths vary from ~70 to ~500 tokens."""
    src = Path(str(resources.files("lora_tune") / "assets" / "demo_train.jsonl"))
    pairs = [json.loads(line)["messages"] for line in src.read_text().splitlines() if line.strip()]
    system = pairs[0][0]
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train", n_train), ("val", n_val)):
        rows = []
        for _ in range(n):
            turns = [m for conv in rng.sample(pairs, rng.randint(1, 6)) for m in conv[1:]]
            rows.append(json.dumps({"messages": [system, *turns]}))
        path = out_dir / f"bench_{name}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1]
