"""Train/validation records from the data config (read and validated before any model loads)."""

from __future__ import annotations

import random

from lora_tune.config import DataCfg
from lora_tune.data.formats import Record, read_jsonl
from lora_tune.errors import LoraTuneError


def read_splits(cfg: DataCfg, seed: int) -> tuple[list[Record], list[Record]]:
    """Validated train and validation records; a `val_fraction` split is seeded and reproducible."""
    train = read_jsonl(cfg.train_file, cfg.format)
    if cfg.val_file:
        return train, read_jsonl(cfg.val_file, cfg.format)
    if cfg.val_fraction:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(train)))
        if n_val >= len(train):
            raise LoraTuneError(f"data.val_fraction={cfg.val_fraction} leaves no training records; lower it")
        val_idx = set(order[:n_val])
        return [r for i, r in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]
    return train, []
