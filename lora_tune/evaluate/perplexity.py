"""Perplexity: over supervised (response) tokens of chat/instruction data, or strided over raw text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_tune.data.batching import BatchStream
from lora_tune.data.tokenize import Example
from lora_tune.losses import evaluate_loss
from lora_tune.progress import item_progress
from lora_tune.runtime import evaluating


@dataclass
class Perplexity:
    loss: float  # mean negative log-likelihood per scored token (nats)
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


def supervised_perplexity(model, examples: list[Example], pad_id: int, batch_size: int, autocast) -> Perplexity:
    """Perplexity over the supervised tokens only (the responses, with their end-of-turn tokens)."""
    stream = BatchStream(examples, batch_size, seed=0, pad_id=pad_id, shuffle=False)
    with item_progress("perplexity (batches)", len(stream)) as advance:
        totals = evaluate_loss(model, _counted(stream, advance), autocast)
    return Perplexity(totals.loss, totals.tokens)


def _counted(batches, advance):
    for batch in batches:
        yield batch
        advance(1)


@torch.no_grad()
def strided_nll(model, ids: list[int], window: int, stride: int, autocast) -> tuple[float, int]:
    """(summed NLL, scored tokens) of one document with a sliding window.

    Windows start every `stride` tokens; each window scores only the tokens the previous one did not,
    so every token after the first is scored exactly once, with at least `window - stride` tokens of
    left context (all of the window before it in the first one). With stride == window that is no
    context at all, and each window's first token cannot be scored: use a smaller stride.
    """
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window]; got stride={stride}, window={window}")
    device = next(model.parameters()).device
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        new = end - prev_end  # tokens this window is responsible for
        x = torch.tensor([ids[begin:end]], device=device)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        targets = x[0, 1:]
        first = max(len(targets) - new, 0)  # score only the last `new` positions
        total += float(F.cross_entropy(logits[first:], targets[first:], reduction="sum"))
        count += len(targets) - first
        prev_end = end
        if end == len(ids):
            break
    return total, count


def strided_perplexity(model, docs: list[list[int]], window: int, stride: int, autocast) -> Perplexity:
    """Token-weighted perplexity over several documents, each scored with `strided_nll`."""
    total, count = 0.0, 0
    with evaluating(model), item_progress("perplexity (documents)", len(docs)) as advance:
        for ids in docs:
            t, c = strided_nll(model, ids, window, stride, autocast)
            total, count = total + t, count + c
            advance(1)
    return Perplexity(total / count if count else float("nan"), count)
