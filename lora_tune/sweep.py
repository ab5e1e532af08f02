"""`lora-tune sweep`: a grid of settings, each trained for the same step budget, ranked by validation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from lora_tune.atomic import atomic_write_text
from lora_tune.config import load_config
from lora_tune.errors import LoraTuneError


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["train.lr=1e-4,2e-4", "lora.r=8,16"] -> {"train.lr": ["1e-4", "2e-4"], "lora.r": ["8", "16"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise LoraTuneError(f"grid entry {item!r} is not of the form section.key=v1,v2 (e.g. train.lr=1e-4,2e-4)")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    if not grid:
        raise LoraTuneError("give at least one grid dimension, e.g. --grid train.lr=1e-4,2e-4")
    return grid


def run_sweep(
    config: str | Path,
    grid: dict[str, list[str]],
    out_dir: str | Path,
    budget_steps: int | None = None,
    overrides: tuple[str, ...] = (),
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Train every combination (each in `out_dir/run-NN`), rank by the last validation score, write a table."""
    from lora_tune.finetune import finetune
    from lora_tune.train.metrics import read_metrics

    console = console or Console(soft_wrap=True)
    out_dir = Path(out_dir)
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    budget = [f"train.max_steps={budget_steps}"] if budget_steps else []
    # validate every combination before any training starts
    cfgs = [
        load_config(
            config, (*overrides, *budget, *(f"{k}={v}" for k, v in c.items()), f"output_dir={out_dir / f'run-{i:02d}'}")
        )
        for i, c in enumerate(combos)
    ]
    if any(not c.data.val_file and not c.data.val_fraction for c in cfgs):
        raise LoraTuneError("a sweep ranks by validation: set data.val_file or data.val_fraction")
    metric = cfgs[0].eval.metric
    rows = []
    for i, (combo, cfg) in enumerate(zip(combos, cfgs, strict=True)):
        console.rule(f"run {i + 1}/{len(combos)}: " + ", ".join(f"{k}={v}" for k, v in combo.items()))
        res = finetune(cfg, overwrite=True, console=console)
        vals = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r.get("split") == "val"]
        last = vals[-1] if vals else {}
        rows.append(
            {
                "run": cfg.output_dir,
                **combo,
                "steps": res.steps,
                "seconds": round(res.seconds, 1),
                "val_loss": last.get("loss", math.nan),
                **({metric: last.get(metric, math.nan)} if metric != "none" else {}),
            }
        )
    if metric != "none":  # the task metric, higher is better
        rows.sort(key=lambda r: -r[metric] if not math.isnan(r[metric]) else math.inf)
    else:
        rows.sort(key=lambda r: r["val_loss"] if not math.isnan(r["val_loss"]) else math.inf)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "sweep.json", json.dumps({"grid": grid, "ranked": rows}, indent=2))
    keys = list(grid) + ["val_loss"] + ([metric] if metric != "none" else []) + ["steps", "seconds"]
    lines = ["| rank | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for rank, r in enumerate(rows, 1):
        cells = [f"{r[k]:.4f}" if isinstance(r[k], float) and k not in ("seconds",) else str(r[k]) for k in keys]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    atomic_write_text(out_dir / "sweep.md", "\n".join(lines) + "\n")
    console.print("\n".join(lines), highlight=False, markup=False)
    return rows
