"""Causal-LM loss over supervised tokens only.

The usual path computes logits for every position (batch x length x vocab, then an fp32 copy) and
throws most away when the loss is on responses only. We run the decoder, pick the hidden states of
the supervised positions, and apply the LM head to those alone: same loss, a fraction of the logits.
With `chunked` (the default) the head and cross-entropy then run a chunk of rows at a time
(`chunked_ce`), so even those logits are never all alive at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_tune.data.tokenize import IGNORE
from lora_tune.train.chunked_ce import linear_cross_entropy


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


def token_losses(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each supervised position, boolean map of those positions over labels[:, 1:])."""
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
            return linear_cross_entropy(selected, head.weight, target[keep]), keep
        logits = head(selected)
    else:
        logits = model(**inputs).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), target[keep], reduction="none"), keep


def supervised_loss_sum(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised positions, number of those positions)."""
    losses, keep = token_losses(model, batch, chunked)
    return losses.sum(), int(keep.sum())


@torch.no_grad()
def evaluate_loss(model, batches, autocast) -> tuple[float, int]:
    """Token-weighted mean loss over an iterable of batches; returns (loss, tokens)."""
    from lora_tune.models import evaluating

    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            with autocast():
                loss, n = supervised_loss_sum(model, batch)
            total += float(loss)
            count += n
    return (total / count if count else float("nan")), count
