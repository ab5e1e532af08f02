"""Training objectives: how a batch becomes a loss sum, its normaliser, and the figures it reports.

The loop knows nothing about what it optimises. An objective says, for one batch,
- `units`: what the step's loss is normalised by (supervised tokens for SFT; pairs for preference
  objectives), counted before any forward pass so every micro-batch of a step is divided by the same total;
- `loss_sum`: the summed loss over those units (differentiable) and figure sums to report (detached);
- `report`: the figures as per-unit means.
Gradient accumulation, out-of-memory splitting and evaluation then work the same for every objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from lora_tune.losses import IGNORE, token_losses_and_accuracy

Batch = dict[str, torch.Tensor]


@dataclass
class LossSum:
    """A batch's summed loss and the sums behind its figures (e.g. correctly predicted tokens)."""

    loss: torch.Tensor  # scalar, differentiable
    figures: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, detached


class Objective(Protocol):
    """What a training objective provides to the loop (see the module docstring)."""

    name: str

    def units(self, batch: Batch) -> int: ...

    def loss_sum(self, model, batch: Batch) -> LossSum: ...

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]: ...


@dataclass
class SFT:
    """Supervised fine-tuning: cross-entropy summed over supervised tokens, normalised by their count.

    Figures: `token_accuracy`, the share of supervised tokens whose arg-max prediction is the label.
    """

    chunked: bool = True  # LM head + cross-entropy a chunk of positions at a time (see chunked_ce)
    name: str = "sft"

    def units(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_sum(self, model, batch: Batch) -> LossSum:
        out = token_losses_and_accuracy(model, batch, self.chunked)
        return LossSum(out.losses.sum(), {"correct": out.correct.sum()})

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]:
        return {"token_accuracy": figures["correct"] / units if units else float("nan")}
