"""Deterministic, resumable batching: the order is a pure function of (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_tune.data.tokenize import IGNORE, Example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padded positions get attention 0 and label IGNORE."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class Position:
    """Where the data stream is: the next micro-batch is batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


class BatchStream:
    """Micro-batches over `examples` in an order fixed by `seed` and the epoch number.

    Because the order depends on nothing else, restoring a `Position` continues the exact stream.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True
    ):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.position = Position()
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(len(self.examples), generator=g).tolist()
            else:
                order = list(range(len(self.examples)))
            self._cached = (epoch, order)
        return self._cached[1]

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch, moving to a new epoch when one ends."""
        if self.position.index >= len(self):
            self.position = Position(self.position.epoch + 1, 0)
        order = self._order(self.position.epoch)
        lo = self.position.index * self.batch_size
        batch = [self.examples[i] for i in order[lo : lo + self.batch_size]]
        self.position.index += 1
        return collate(batch, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in file order (for evaluation)."""
        for lo in range(0, len(self.examples), self.batch_size):
            yield collate(self.examples[lo : lo + self.batch_size], self.pad_id)
