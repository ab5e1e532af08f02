"""One optimizer step: accumulate micro-batches, normalise by the step's units, clip, step, zero.

Each micro-batch's summed loss is divided by the units of the whole step (supervised tokens for SFT),
so k micro-batches give the gradients of one k-times-larger batch whatever their padding or lengths.
With several processes the units are summed over all ranks first and gradients are averaged by DDP in
the step's last backward (`no_sync` before it), so N ranks give the gradients of one N-times-larger batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from lora_tune.errors import LoraTuneError
from lora_tune.losses import real_tokens
from lora_tune.runtime import Precision
from lora_tune.train.distributed import Dist, full_tensor, no_sync
from lora_tune.train.objectives import Batch, Objective

T = TypeVar("T")


@dataclass
class StepParts:
    """What an optimizer step works with."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]  # the trainable ones (clipped together)
    precision: Precision
    max_grad_norm: float = 1.0  # 0 disables clipping
    dist: Dist = field(default_factory=Dist)  # this process among the training processes
    wrapped: torch.nn.Module | None = None  # with several processes: DDP or FSDP around `LossOf(model, objective)`
    sharded: bool = False  # FSDP: the weights are sharded, so every forward goes through `wrapped` on all ranks

    def loss(self, piece: Batch, training: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's (loss sum, figure sums) of `piece`: through DDP in training (so its backward
        all-reduces), through FSDP always (it gathers the weights), else on the model itself."""
        if self.wrapped is not None and (training or self.sharded):
            return self.wrapped(piece)
        out = self.objective.loss_sum(self.model, piece)
        return out.loss, out.figures


class LossOf(torch.nn.Module):
    """The objective's loss as a module's forward, for DDP to wrap: DDP prepares its gradient all-reduce
    in its own forward, and our losses call the decoder and LM head directly (not the model's forward)."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch):
        out = self.objective.loss_sum(self.model, batch)
        return out.loss, out.figures


@dataclass
class StepOut:
    """What one optimizer step did."""

    loss: float  # mean loss per unit
    units: int  # the normaliser: supervised tokens for SFT
    real_tokens: int  # non-padding tokens fed to the model
    padded_tokens: int  # every token the model computed on
    grad_norm: float  # before clipping (nan when clipping is off)
    split: int  # pieces each micro-batch ran as (more than asked after an out-of-memory error)
    recovered: bool  # this step hit an out-of-memory error and was redone in smaller pieces
    figures: dict[str, float] = field(default_factory=dict)  # the objective's report, e.g. token_accuracy


def optimizer_step(parts: StepParts, micro: list[Batch], split: int = 1, log: Callable[[str], None] = print) -> StepOut:
    """One optimizer step over the micro-batches `micro`, each run as `split` smaller pieces.

    Since the loss is a sum divided by the step's units, the pieces give the same gradients. On an
    out-of-memory error the step is redone with twice the pieces (no data is skipped), and the new
    `split` is returned for the steps that follow.
    """
    dist = parts.dist
    local = [sum(parts.objective.units(b) for b in micro if "dummy" not in b)]
    local += [sum(real_tokens(b) for b in micro if "dummy" not in b), sum(b["input_ids"].numel() for b in micro)]
    units, real, padded = (int(v) for v in dist.sum(local))
    rows = micro[0]["input_ids"].shape[0]
    with parts.precision.autocast():
        parts.objective.begin_step(parts.model, micro, dist.sum)

    def retrying(new_split: int) -> None:
        parts.optimizer.zero_grad(set_to_none=True)  # the failed try's partial gradients
        log(
            f"out of memory: running each micro-batch of {rows} as {new_split} pieces of "
            f"{math.ceil(rows / new_split)} (same effective batch and gradients), and continuing"
        )

    asked = split
    (loss_total, figures), split = in_pieces(lambda s: _accumulate(parts, micro, s, units), split, rows, retrying)
    if dist.enabled:  # the step's totals over all ranks; the next step's pieces as the most any rank needed
        keys = sorted(figures)
        loss_total, *values = dist.sum([float(loss_total), *(float(figures[k]) for k in keys)])
        figures = dict(zip(keys, values, strict=True))
        split = dist.max(split)
    grad_norm = float("nan")
    if parts.max_grad_norm > 0:
        parts.scaler.unscale_(parts.optimizer)
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(parts.params, parts.max_grad_norm)))
    try:
        parts.scaler.step(parts.optimizer)  # the first step allocates the optimizer states
    except torch.OutOfMemoryError:
        raise LoraTuneError(
            "out of memory in the optimizer step (its states are allocated on the first step); use "
            "train.optimizer=paged_adamw_8bit or adamw_8bit, a smaller lora.r, or fewer lora.target_modules"
        ) from None
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepOut(
        loss=float(loss_total) / units,
        units=units,
        real_tokens=real,
        padded_tokens=padded,
        grad_norm=grad_norm,
        split=split,
        recovered=split != asked,
        figures=parts.objective.report({k: float(v) for k, v in figures.items()}, units),
    )


def _accumulate(parts: StepParts, micro: list[Batch], split: int, units: int):
    """Forward and backward over every piece; returns the detached loss total and figure sums.

    With DDP the loss is multiplied by the world size, since DDP averages the ranks' gradients and the
    step's gradient is their sum (each rank's loss is already divided by the units of all ranks). A
    `dummy` piece (a rank's empty share of a short batch) runs with weight 0.
    """
    loss_total = torch.zeros((), device=parts.precision.device)
    figures: dict[str, torch.Tensor] = {}
    per_unit = max(units, 1)
    work = [(batch, piece) for batch in micro for piece in pieces(batch, split)]
    for i, (batch, piece) in enumerate(work):
        weight = 0.0 if "dummy" in batch else 1.0
        with no_sync(parts.wrapped, skip=i < len(work) - 1):
            with parts.precision.autocast():
                loss, piece_figures = parts.loss(piece)
            parts.scaler.scale(loss / per_unit * (weight * parts.dist.world)).backward()
        loss_total += weight * loss.detach()
        for k, v in piece_figures.items():
            figures[k] = figures.get(k, 0) + weight * v
    return loss_total, figures


def pieces(batch: Batch, split: int) -> list[Batch]:
    """`batch` as `split` row slices (fewer when it has fewer rows); `split` 1 gives the batch itself."""
    rows = batch["input_ids"].shape[0]
    size = math.ceil(rows / split)
    return [{k: v[lo : lo + size] for k, v in batch.items()} for lo in range(0, rows, size)]


def in_pieces(work: Callable[[int], T], split: int, rows: int, retrying: Callable[[int], None]) -> tuple[T, int]:
    """(`work(split)`, the split it ran with): on an out-of-memory error `work` is redone with twice the
    pieces, down to one row each; `retrying(new_split)` is told before each new try.

    The CUDA cache is emptied between tries, outside `except`: the exception holds the failed try's tensors.
    """
    while True:
        try:
            return work(split), split
        except torch.OutOfMemoryError:
            if split >= rows:
                raise
            split *= 2
        retrying(split)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
