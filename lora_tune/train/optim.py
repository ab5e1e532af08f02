"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
import warnings

import torch

from lora_tune.config import TrainCfg


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainCfg) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit / paged AdamW (paged falls back to plain on the CPU)."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[cfg.optimizer]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return cls(params, **kwargs)


def warmup_steps(cfg: TrainCfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round((cfg.warmup_ratio or 0.0) * total_steps))


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update made at 0-based `step`.

    Linear warmup from 1/(warmup+1) to 1 over `warmup` steps, then cosine or linear decay to `min_ratio`
    at the last step, or constant.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainCfg, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, cfg.schedule, cfg.min_lr_ratio)
    )
