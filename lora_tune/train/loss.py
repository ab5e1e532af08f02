"""Causal-LM loss over supervised tokens only.

The usual path computes logits for every position (batch x length x vocab, then an fp32 copy) and
throws most away when the loss is on responses only. We run the decoder, pick the hidden states of
the supervised positions, and apply the LM head to those alone: same loss, a fraction of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_tune.data.tokenize import IGNORE


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


def supervised_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised positions, number of those positions)."""
    device = next(p for p in model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    target = batch["labels"][:, 1:].to(device)
    keep = target != IGNORE
    n = int(keep.sum())
    base = _base(model)
    if _has_plain_head(base):
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        selected = hidden.last_hidden_state[:, :-1][keep]
        logits = base.get_output_embeddings()(selected)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][
            keep
        ]
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss, n


@torch.no_grad()
def evaluate_loss(model, batches, autocast) -> tuple[float, int]:
    """Token-weighted mean loss over an iterable of batches; returns (loss, tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            loss, n = supervised_loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count
