"""Classification by label likelihood: score each label as the continuation of the prompt.

Each candidate is the prompt followed by the label as the response, with its end-of-turn token (so
"pos" and "positive" are told apart), and its score is the summed log-probability of those tokens.
Nothing is generated, so there is nothing to parse.
"""

from __future__ import annotations

import torch

from lora_tune.data.batching import collate
from lora_tune.data.formats import Record
from lora_tune.data.tokenize import Example, encode_messages, encode_prompt_completion
from lora_tune.losses import token_losses
from lora_tune.progress import item_progress
from lora_tune.runtime import evaluating


def candidate(tok, rec: Record, label: str, template: str | None = None) -> Example:
    """`rec` with its final response replaced by `label`; only the label (+ end of turn) is supervised."""
    if rec.prompt is not None:
        return encode_prompt_completion(tok, rec.prompt, label)
    last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
    msgs = [*rec.messages[:last], {"role": "assistant", "content": label}]
    return encode_messages(tok, msgs, template, loss_on="completion")


@torch.no_grad()
def sequence_logprobs(model, examples: list[Example], pad_id: int, autocast, batch_size: int = 16) -> list[float]:
    """Summed log-probability of each example's supervised tokens."""
    out: list[float] = []
    with item_progress("scoring labels", len(examples)) as advance:
        for lo in range(0, len(examples), batch_size):
            batch = collate(examples[lo : lo + batch_size], pad_id)
            with autocast():
                losses, keep = token_losses(model, batch)
            rows = keep.nonzero()[:, 0]
            sums = torch.zeros(keep.shape[0], device=losses.device).index_add_(0, rows, losses)
            out.extend((-sums).tolist())
            advance(len(batch["input_ids"]))
    return out


def predict_labels(
    model, tok, records: list[Record], labels: list[str], autocast, template: str | None = None, batch_size: int = 16
) -> tuple[list[str], list[list[float]]]:
    """The most likely label for each record, and every label's log-probability."""
    cands = [candidate(tok, rec, lab, template) for rec in records for lab in labels]
    with evaluating(model):
        scores = sequence_logprobs(model, cands, tok.pad_token_id, autocast, batch_size)
    k = len(labels)
    table = [scores[i * k : (i + 1) * k] for i in range(len(records))]
    return [labels[max(range(k), key=row.__getitem__)] for row in table], table
