"""Per-token losses shared by training and evaluation: causal-LM loss over supervised tokens only.

The usual path computes logits for every position (batch x length x vocab, then an fp32 copy) and
throws most away when the loss is on responses only. We run the decoder, pick the hidden states of
the supervised positions, and apply the LM head to those alone: same loss, a fraction of the logits.
With `chunked` (the default) the head and cross-entropy then run a chunk of rows at a time
(`chunked_ce`), so even those logits are never all alive at once. Both paths also say which supervised
tokens the model's arg-max prediction gets right (token accuracy).

Training (`train/`) and evaluation (`evaluate/`) both import this module, and it imports neither.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_tune.chunked_ce import linear_cross_entropy_with_accuracy
from lora_tune.runtime import evaluating

IGNORE = -100  # the label of a position that is not supervised (the value torch and HF use)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _has_plain_head(base) -> bool:
    """True when logits are exactly `lm_head(decoder(x))` (no soft-capping or scaling after the head)."""
    cfg = base.config
    unusual = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")
    return (
        hasattr(base, "get_decoder")
        and base.get_output_embeddings() is not None
        and not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in unusual)
    )


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Forward arguments for a padded batch (attention mask) or a packed one (position ids only).

    Packed rows must run without a KV cache and without a 2D mask: transformers then derives a
    block-diagonal mask from the restarting position ids. A cache would make it skip that and let
    packed samples attend to each other.
    """
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"].to(device),
            "position_ids": batch["position_ids"].to(device),
            "use_cache": False,
        }
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "use_cache": False,
    }


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in a padded or packed batch."""
    return int(batch["attention_mask" if "attention_mask" in batch else "real"].sum())


def _frozen_plain_linear(head) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


@dataclass
class TokenLosses:
    """Per supervised position: cross-entropy (fp32) and whether the arg-max prediction is the label."""

    losses: torch.Tensor  # [N] fp32, differentiable
    correct: torch.Tensor  # [N] bool
    keep: torch.Tensor  # boolean map of the N supervised positions over labels[:, 1:]


def token_losses_and_accuracy(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> TokenLosses:
    """Cross-entropy and arg-max hits of every supervised position of a padded or packed batch."""
    device = next(p for p in model.parameters()).device
    inputs = model_inputs(batch, device)
    target = batch["labels"][:, 1:].to(device)
    keep = target != IGNORE
    base = _base(model)
    if _has_plain_head(base):
        hidden = base.get_decoder()(**inputs)
        selected = hidden.last_hidden_state[:, :-1][keep]
        head = base.get_output_embeddings()
        if chunked and _frozen_plain_linear(head):
            return TokenLosses(*linear_cross_entropy_with_accuracy(selected, head.weight, target[keep]), keep)
        logits = head(selected)
    else:
        logits = model(**inputs).logits[:, :-1][keep]
    logits = logits.float()
    losses = F.cross_entropy(logits, target[keep], reduction="none")
    return TokenLosses(losses, logits.detach().argmax(dim=-1) == target[keep], keep)


def token_losses(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each supervised position, boolean map of those positions over labels[:, 1:])."""
    out = token_losses_and_accuracy(model, batch, chunked)
    return out.losses, out.keep


def supervised_loss_sum(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised positions, number of those positions)."""
    losses, keep = token_losses(model, batch, chunked)
    return losses.sum(), int(keep.sum())


@dataclass(frozen=True)
class LossTotals:
    """A token-weighted mean loss and token accuracy over some batches."""

    loss: float
    tokens: int
    token_accuracy: float


@torch.no_grad()
def evaluate_loss(model, batches, autocast) -> LossTotals:
    """Token-weighted mean loss and token accuracy over an iterable of batches."""
    total, count, correct = 0.0, 0, 0
    with evaluating(model):
        for batch in batches:
            with autocast():
                out = token_losses_and_accuracy(model, batch)
            total += float(out.losses.sum())
            count += len(out.losses)
            correct += int(out.correct.sum())
    if not count:
        return LossTotals(float("nan"), 0, float("nan"))
    return LossTotals(total / count, count, correct / count)


def sequence_logps(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's supervised tokens [R] fp32, their count per row [R]).

    The preference objectives' building block: rows are answers after their prompts, and only the
    answer tokens are labelled, so each sum is log p(answer | prompt).
    """
    out = token_losses_and_accuracy(model, batch, chunked)
    row = out.keep.nonzero(as_tuple=True)[0]
    logps = torch.zeros(out.keep.shape[0], device=out.losses.device, dtype=torch.float32)
    logps = logps.index_add(0, row, -out.losses.float())
    return logps, out.keep.sum(dim=1)


def pair_rows(batch: dict[str, torch.Tensor], slots: slice = slice(None)) -> dict[str, torch.Tensor]:
    """A pair batch's `[B, A, W]` tensors (`data.pairs.collate_prefs`) as `[B*A', W]` rows of answer slots
    `slots`, for one forward."""
    keys = ("input_ids", "attention_mask", "labels")
    return {k: batch[k][:, slots].reshape(-1, batch[k].shape[-1]) for k in keys}


def answer_logps(model, batch: dict[str, torch.Tensor], slots: slice = slice(None), chunked: bool = True):
    """(summed log-probs, token counts) of a pair batch's answers, each `[B, A]`, in one forward."""
    logps, counts = sequence_logps(model, pair_rows(batch, slots), chunked)
    b = batch["input_ids"].shape[0]
    return logps.view(b, -1), counts.view(b, -1).to(logps.dtype)


@torch.no_grad()
def answer_logps_of(model, batches, autocast, advance=lambda n: None) -> torch.Tensor:
    """`[N, A]` summed answer log-probs over an iterable of pair batches, in eval mode (the preference
    evaluation and the reference precompute); `advance(1)` after each batch."""
    out = []
    with evaluating(model):
        for batch in batches:
            with autocast():
                out.append(answer_logps(model, batch)[0].float().cpu())
            advance(1)
    return torch.cat(out) if out else torch.zeros(0, 2)


@contextmanager
def adapter_disabled(model):
    """The reference model: the policy with its LoRA adapter switched off (no second copy in memory)."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        yield
