"""Deterministic, resumable batching: padded, length-grouped or packed.

The order of an epoch is a pure function of (seed, epoch), so restoring a `Position` continues the
exact stream. Packing puts several samples into rows of at most `max_length` tokens; position ids restart
at every sample, which transformers turns into attention that never crosses a sample boundary (its
padding-free path), and the first token of each packed sample is never a target of the previous one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lora_tune.data.tokenize import IGNORE, Example

STRATEGIES = ("pad", "group_by_length", "pack")


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


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's samples; position ids restart per sample; no attention mask.

    The tail of a short row is padding with its own restarting positions (a separate "sample" that
    nothing attends to or from) and IGNORE labels. `real` marks non-padding tokens.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])  # first token: not a target across samples
            pos[r, at : at + n] = torch.arange(n)
            real[r, at : at + n] = 1
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "real": real}


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample lengths into rows of at most `max_length` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, row id), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], row))
    return rows


@dataclass
class Position:
    """Where the data stream is: the next micro-batch is batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0


@dataclass(frozen=True)
class Batching:
    """How training batches its samples, and why (printed by `data inspect` and the train log)."""

    strategy: str
    reason: str


def _plan_stats(examples: list[Example], batch_size: int, seed: int, strategy: str) -> tuple[float, float]:
    """(padding share, coefficient of variation of supervised tokens per batch) of epoch 0's plan."""
    plan = BatchStream(examples, batch_size, seed, 0, strategy=strategy).plan(0)
    lengths = [e.length for e in examples]
    real = sum(lengths)
    computed = sum(len(b) * max(lengths[r[0]] for r in b) for b in plan)
    counts = [sum(examples[r[0]].n_supervised for r in b) for b in plan]
    mean = sum(counts) / len(counts)
    cv = (sum((c - mean) ** 2 for c in counts) / len(counts)) ** 0.5 / mean if mean else 0.0
    return 1 - real / computed, cv


def choose_batching(
    examples: list[Example],
    batch_size: int,
    seed: int,
    packing: bool,
    group_by_length: bool | str,
    weighs_tokens: bool = True,
) -> Batching:
    """`pack`, `group_by_length` or `pad`. With group_by_length "auto", group only where it pays and is
    harmless: it must save at least 5 points of padding, and (when the loss is a mean over tokens,
    `weighs_tokens`) must not make the number of supervised tokens per batch vary much more than random
    batches do. Preference objectives weigh each pair the same whatever its length: for them grouping
    only changes padding.

    Measured in benchmarks/RESULTS.md (quality at equal steps, 3 seeds): on word analogies, whose
    samples are all 49-58 tokens (grouping saves under 1 point of padding), grouped batches scored 0.28
    exact match and random ones 0.33. A step's loss is a mean over its supervised tokens, so a token
    weighs 1/N in a batch of N; when the loss covers whole samples (plain text, multi-turn chats),
    grouping puts short samples in batches of their own and their tokens weigh many times more (news
    text: per-batch counts vary 0.42 instead of 0.14, token weights up to 22x apart instead of 2x).
    With short answers after prompts of mixed lengths, N hardly depends on length: grouping only saves
    padding, and cost nothing there (newsgroup classification, movie-review sentiment).
    """
    if packing:
        return Batching("pack", "packing (data.packing)")
    if group_by_length is not True and group_by_length != "auto":
        return Batching("pad", "random batches (data.group_by_length: false)")
    if group_by_length is True:
        return Batching("group_by_length", "length-grouped batches (data.group_by_length: true)")
    if len(examples) < 2 * batch_size:
        return Batching("pad", "random batches (too few samples for length grouping to matter)")
    pad_share, pad_cv = _plan_stats(examples, batch_size, seed, "pad")
    grouped_share, grouped_cv = _plan_stats(examples, batch_size, seed, "group_by_length")
    saving = f"padding {pad_share:.0%} -> {grouped_share:.0%}"
    if pad_share - grouped_share < 0.05:
        return Batching(
            "pad",
            f"random batches: samples are of similar length, so length grouping would save little ({saving}); "
            "data.group_by_length: true forces it",
        )
    if not weighs_tokens:
        return Batching(
            "group_by_length",
            f"length-grouped batches ({saving}; each pair weighs the same whatever its length); "
            "data.group_by_length: false turns it off",
        )
    if grouped_cv > 1.5 * pad_cv + 0.05:
        return Batching(
            "pad",
            f"random batches: length grouping would make supervised tokens per batch vary {grouped_cv:.2f} "
            f"instead of {pad_cv:.2f} (unequal token weights; it would save {saving}); "
            "data.group_by_length: true forces it",
        )
    return Batching(
        "group_by_length",
        f"length-grouped batches ({saving}; supervised tokens per batch vary {grouped_cv:.2f}, "
        f"random {pad_cv:.2f}); data.group_by_length: false turns it off",
    )


class BatchStream:
    """Micro-batches over `examples`; each micro-batch is a list of rows, each row a list of samples.

    Samples are `tokenize.Example`s or `pairs.PrefExample`s (anything with `length` and `n_supervised`,
    given with a `collate_fn` for it). `pad`: random order, padded. `group_by_length`: random order, then
    samples of similar length batched together (less padding), batches shuffled. `pack`: `batch_size`
    packed rows per micro-batch.

    With `shard=(rank, world)` the micro-batches are global ones (`batch_size` is then the rows of all
    ranks together) and `next()` gives this rank rows rank, rank+world, ... of each; so every rank walks
    the same plan and one `position` says where all of them stand. A rank whose share of a short last
    batch is empty gets one row marked `dummy` (it must still run a forward and backward, which count
    for nothing).
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
        strategy: str = "pad",
        max_length: int | None = None,
        collate_fn: Callable[[list, int], dict[str, torch.Tensor]] = collate,
        shard: tuple[int, int] = (0, 1),
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown batching strategy {strategy!r}")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.strategy = strategy
        self.collate_fn = collate_fn  # padded samples; `data.pairs.collate_prefs` for preference data
        self.shard = shard
        self.position = Position()
        self._cached: tuple[int, list[list[list[int]]]] | None = None
        self._rows = None
        if strategy == "pack":
            width = max_length or max(len(e.input_ids) for e in examples)
            self._rows = pack_rows([len(e.input_ids) for e in examples], width)

    def _perm(self, n: int, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The micro-batches of `epoch` as example indices: [batch][row][sample]."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        bs = self.batch_size
        if self.strategy == "pack":
            rows = [self._rows[i] for i in self._perm(len(self._rows), epoch)]
            batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        else:
            order = self._perm(len(self.examples), epoch)
            if self.strategy == "group_by_length":
                # Sort within windows of 16 batches by length with +-10% seeded jitter: batches hold
                # similar lengths, yet their composition changes from epoch to epoch (plain sorting
                # would give a small data set the very same batches every epoch).
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1)
                jitter = (0.9 + 0.2 * torch.rand(len(self.examples), generator=g)).tolist()
                window = 16 * bs
                order = [
                    i
                    for w in range(0, len(order), window)
                    for i in sorted(order[w : w + window], key=lambda j: -self.examples[j].length * jitter[j])
                ]
            batches = [[[i] for i in order[k : k + bs]] for k in range(0, len(order), bs)]
            if self.strategy == "group_by_length" and self.shuffle:
                batches = [batches[i] for i in self._perm(len(batches), epoch + 7_919)]
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        n = len(self._rows) if self._rows is not None else len(self.examples)
        return math.ceil(n / self.batch_size)

    def collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.strategy == "pack":
            return collate_packed([[self.examples[i] for i in row] for row in batch], self.pad_id)
        return self.collate_fn([self.examples[row[0]] for row in batch], self.pad_id)

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch, moving to a new epoch when one ends."""
        if self.position.index >= len(self):
            self.position = Position(self.position.epoch + 1, 0)
        batch = self.plan(self.position.epoch)[self.position.index]
        self.position.index += 1
        rank, world = self.shard
        mine = batch[rank::world]
        if not mine:
            out = self.collate(batch[:1])
            return out | {"dummy": torch.ones(out["input_ids"].shape[0], dtype=torch.bool)}
        return self.collate(mine)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over epoch 0's plan (for evaluation, with shuffle=False: file order)."""
        for batch in self.plan(0):
            yield self.collate(batch)
