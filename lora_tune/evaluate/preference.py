"""Preference accuracy: on held-out pairs, how often the model gives the preferred answer the higher
summed log-probability; with a reference (the base under an adapter), also the DPO implicit-reward
accuracy: how often log pi/ref of the preferred answer beats that of the other one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_tune.data.batching import BatchStream
from lora_tune.data.pairs import PrefRecord, collate_prefs, encode_prefs
from lora_tune.errors import LoraTuneError
from lora_tune.losses import adapter_disabled, answer_logps_of
from lora_tune.progress import item_progress
from lora_tune.runtime import Precision


@dataclass
class PairScores:
    """Summed answer log-probs of every pair, `[N, 2]` (chosen, rejected), under the model and the reference."""

    policy: torch.Tensor
    reference: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """preference_accuracy, the mean log-prob margin, and reward_accuracy when there is a reference."""
        p = self.policy
        out = {
            "preference_accuracy": float((p[:, 0] > p[:, 1]).float().mean()),
            "logp_margin": float((p[:, 0] - p[:, 1]).mean()),
        }
        if self.reference is not None:
            r = p - self.reference
            out["reward_accuracy"] = float((r[:, 0] > r[:, 1]).float().mean())
            out["reward_margin"] = float((r[:, 0] - r[:, 1]).mean())
        return out


def score_pairs(
    model,
    tok,
    precision: Precision,
    records: list[PrefRecord],
    max_length: int,
    max_prompt_length: int | None,
    batch_size: int,
    reference: bool,
) -> tuple[PairScores, int]:
    """(scores of every pair that fits, pairs dropped by truncation), truncated as training truncates; the
    reference is the model with its adapter disabled, scored only when `reference`."""
    paired = [r for r in records if r.paired]
    if len(paired) != len(records):
        raise LoraTuneError(f"{records[0].where}: preference_accuracy needs pairs (prompt, chosen, rejected), not KTO")
    examples, stats = encode_prefs(tok, paired, max_length, max_prompt_length)
    if not examples:
        raise LoraTuneError(f"no pair fits within --max-length {max_length}; raise it")
    stream = BatchStream(examples, batch_size, 0, tok.pad_token_id, shuffle=False, collate_fn=collate_prefs)
    with item_progress("preference pairs (batches)", len(stream)) as advance:
        policy = answer_logps_of(model, stream, precision.autocast, advance)
    ref = None
    if reference:
        with adapter_disabled(model), item_progress("reference (base) log-probs", len(stream)) as advance:
            ref = answer_logps_of(model, stream, precision.autocast, advance)
    return PairScores(policy, ref), stats.records - stats.kept
