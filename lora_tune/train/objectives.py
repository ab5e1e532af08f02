"""Training objectives: how a batch becomes a loss sum, its normaliser, and the figures it reports.

The loop knows nothing about what it optimises. An objective says, for one batch,
- `units`: what the step's loss is normalised by (supervised tokens for SFT; pairs for preference
  objectives), counted before any forward pass so every micro-batch of a step is divided by the same total;
- `begin_step`: anything computed once over all micro-batches of a step before its forwards (KTO's KL
  estimate), so k micro-batches still equal one k-times-larger batch;
- `loss_sum`: the summed loss over those units (differentiable) and figure sums to report (detached);
- `report`: the figures as per-unit means.
Gradient accumulation, out-of-memory splitting and evaluation then work the same for every objective.

Preference objectives (DPO, ORPO, SimPO, KTO) read pair batches (`data.pairs.collate_prefs`: chosen and
rejected of a pair in one forward). The reference model of DPO and KTO is the policy with its adapter
disabled (no second model), or log-probs precomputed into the batch (`ref_logps`). Their figures carry
TRL's names: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen`,
`logps/rejected`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from lora_tune.losses import IGNORE, adapter_disabled, answer_logps, token_losses_and_accuracy

Batch = dict[str, torch.Tensor]
Sum = Callable[[list[float]], list[float]]  # sums over the training processes (`Dist.sum`; `list` when alone)


@dataclass
class LossSum:
    """A batch's summed loss and the sums behind its figures (e.g. correctly predicted tokens)."""

    loss: torch.Tensor  # scalar, differentiable
    figures: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, detached


class Objective(Protocol):
    """What a training objective provides to the loop (see the module docstring)."""

    name: str
    unit: str  # what `units` counts, the key it is logged under: tokens, pairs or examples

    def units(self, batch: Batch) -> int: ...

    def begin_step(self, model, micro: list[Batch], all_ranks: Sum = list) -> None: ...

    def loss_sum(self, model, batch: Batch) -> LossSum: ...

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]: ...


@dataclass
class SFT:
    """Supervised fine-tuning: cross-entropy summed over supervised tokens, normalised by their count.

    Figures: `token_accuracy`, the share of supervised tokens whose arg-max prediction is the label.
    """

    chunked: bool = True  # LM head + cross-entropy a chunk of positions at a time (see chunked_ce)
    name: str = "sft"
    unit: str = "tokens"

    def units(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def begin_step(self, model, micro: list[Batch], all_ranks: Sum = list) -> None:
        pass

    def loss_sum(self, model, batch: Batch) -> LossSum:
        out = token_losses_and_accuracy(model, batch, self.chunked)
        return LossSum(out.losses.sum(), {"correct": out.correct.sum()})

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]:
        return {"token_accuracy": figures["correct"] / units if units else float("nan")}


# ----------------------------------------------------------------------------------------------------
# Preference objectives


def reference_logps(model, batch: Batch, slots: slice = slice(None), chunked: bool = True) -> torch.Tensor:
    """The reference's summed log-probs `[B, A]`: precomputed in the batch, else with the adapter disabled."""
    if "ref_logps" in batch:
        return batch["ref_logps"][:, slots].to(next(model.parameters()).device)
    with torch.no_grad(), adapter_disabled(model):
        return answer_logps(model, batch, slots, chunked)[0]


def dpo_losses(logits: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO loss from `logits` = (policy chosen - rejected) - (reference chosen - rejected).

    sigmoid: -(1-e) log sigmoid(beta x) - e log sigmoid(-beta x) (Rafailov et al.; e: label smoothing, the
    conservative DPO of Mitchell 2023). ipo: (x - 1/(2 beta))^2 (Azar et al. 2023).
    """
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def orpo_losses(avg: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair ORPO loss, its NLL part, its log odds-ratio) from mean token log-probs `avg` `[B, 2]`.

    loss = -avg_chosen - beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds(p) = p / (1 - p)
    of the mean per-token probability (Hong et al. 2024). log(1 - p) is log(-expm1(log p)), exact near p=1.
    """
    avg = avg.clamp(max=-1e-6)
    log_odds = avg - torch.log(-torch.expm1(avg))
    ratio = F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    nll = -avg[:, 0]
    return nll - beta * ratio, nll, ratio


def simpo_losses(avg: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss from mean token log-probs `avg` `[B, 2]` (Meng et al. 2024): no reference;
    -log sigmoid(beta (avg_chosen - avg_rejected) - gamma), with label smoothing as for DPO."""
    x = beta * (avg[:, 0] - avg[:, 1]) - gamma
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def kto_losses(logratio: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float, w_d: float, w_u: float):
    """Per-example KTO loss (Ethayarajh et al. 2024): desirable w_d (1 - sigmoid(beta (r - kl))), undesirable
    w_u (1 - sigmoid(beta (kl - r))), with r = log pi(y|x) - log ref(y|x) and kl the batch's KL estimate."""
    good = w_d * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = w_u * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad)


def _pair_figures(rewards: torch.Tensor, logps: torch.Tensor, extra: dict | None = None) -> dict[str, torch.Tensor]:
    r, lp = rewards.detach(), logps.detach()
    figures = {
        "rewards/chosen": r[:, 0].sum(),
        "rewards/rejected": r[:, 1].sum(),
        "rewards/margins": (r[:, 0] - r[:, 1]).sum(),
        "rewards/accuracies": (r[:, 0] > r[:, 1]).float().sum(),
        "logps/chosen": lp[:, 0].sum(),
        "logps/rejected": lp[:, 1].sum(),
    }
    return figures | {k: v.detach().sum() for k, v in (extra or {}).items()}


@dataclass
class PairObjective:
    """What DPO, ORPO and SimPO share: a pair is the unit, figures are per-pair means."""

    beta: float = 0.1
    chunked: bool = True
    name: str = "pairs"
    unit: str = "pairs"
    needs_reference: bool = False

    def units(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    def begin_step(self, model, micro: list[Batch], all_ranks: Sum = list) -> None:
        pass

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]:
        return {k: v / units if units else float("nan") for k, v in figures.items()}


@dataclass
class DPO(PairObjective):
    """Direct preference optimisation against the reference (sigmoid or IPO loss; IPO on mean log-probs, as TRL)."""

    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    name: str = "dpo"
    needs_reference: bool = True

    def loss_sum(self, model, batch: Batch) -> LossSum:
        logps, counts = answer_logps(model, batch, chunked=self.chunked)
        ref = reference_logps(model, batch, chunked=self.chunked)
        pi, rf = (logps / counts, ref / counts) if self.loss_type == "ipo" else (logps, ref)
        logits = (pi[:, 0] - pi[:, 1]) - (rf[:, 0] - rf[:, 1])
        losses = dpo_losses(logits, self.beta, self.loss_type, self.label_smoothing)
        return LossSum(losses.sum(), _pair_figures(self.beta * (pi - rf), logps))


@dataclass
class ORPO(PairObjective):
    """Odds-ratio preference optimisation: NLL on the chosen answer plus the odds-ratio term; no reference."""

    name: str = "orpo"

    def loss_sum(self, model, batch: Batch) -> LossSum:
        logps, counts = answer_logps(model, batch, chunked=self.chunked)
        avg = logps / counts
        losses, nll, ratio = orpo_losses(avg, self.beta)
        extra = {"nll_loss": nll, "log_odds_ratio": ratio}
        return LossSum(losses.sum(), _pair_figures(self.beta * avg, logps, extra))


@dataclass
class SimPO(PairObjective):
    """Simple preference optimisation: length-normalised log-probs with a target margin; no reference."""

    gamma: float = 1.0
    label_smoothing: float = 0.0
    name: str = "simpo"

    def loss_sum(self, model, batch: Batch) -> LossSum:
        logps, counts = answer_logps(model, batch, chunked=self.chunked)
        avg = logps / counts
        losses = simpo_losses(avg, self.beta, self.gamma, self.label_smoothing)
        return LossSum(losses.sum(), _pair_figures(self.beta * avg, logps))


@dataclass
class KTO:
    """Kahneman-Tversky optimisation on unpaired desirable/undesirable answers, each with its weight.

    The KL estimate (detached, as in the paper and TRL) is the mean over the step's examples of
    log pi - log ref of each prompt with another record's answer (`PrefExample` slot 1), computed once per
    step in `begin_step` over all its micro-batches, so accumulation does not change it.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    chunked: bool = True
    name: str = "kto"
    unit: str = "examples"
    needs_reference: bool = True
    kl: torch.Tensor | None = None

    def units(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    @torch.no_grad()
    def begin_step(self, model, micro: list[Batch], all_ranks: Sum = list) -> None:
        total, n = 0.0, 0
        for batch in micro:
            if "dummy" in batch:  # a rank's empty share of a short batch (see BatchStream)
                continue
            policy = answer_logps(model, batch, slice(1, 2), self.chunked)[0]
            total += float((policy - reference_logps(model, batch, slice(1, 2), self.chunked)).sum())
            n += policy.shape[0]
        total, n = all_ranks([total, n])
        self.kl = torch.tensor(max(total / max(n, 1), 0.0))

    def loss_sum(self, model, batch: Batch) -> LossSum:
        if self.kl is None:
            self.begin_step(model, [batch])
        logps = answer_logps(model, batch, slice(0, 1), self.chunked)[0][:, 0]
        ratio = logps - reference_logps(model, batch, slice(0, 1), self.chunked)[:, 0]
        good = batch["desirable"].to(logps.device)
        kl = self.kl.to(logps.device)
        losses = kto_losses(ratio, good, kl, self.beta, self.desirable_weight, self.undesirable_weight)
        r, lp = (self.beta * ratio).detach(), logps.detach()
        figures = {
            "rewards/chosen": r[good].sum(),
            "rewards/rejected": r[~good].sum(),
            "logps/chosen": lp[good].sum(),
            "logps/rejected": lp[~good].sum(),
            "count/chosen": good.sum().float(),
            "count/rejected": (~good).sum().float(),
            "kl": kl * len(good),
        }
        return LossSum(losses.sum(), figures)

    def report(self, figures: dict[str, float], units: int) -> dict[str, float]:
        out = {"kl": figures["kl"] / units} if units else {}
        for side in ("chosen", "rejected"):  # a side with no example in these batches reports nothing
            n = figures[f"count/{side}"]
            if n:
                out |= {f"{k}/{side}": figures[f"{k}/{side}"] / n for k in ("rewards", "logps")}
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


def build_objective(cfg) -> Objective:
    """The objective `cfg.train.objective` names, with its `preference` settings."""
    tc, pc = cfg.train, cfg.preference
    name = tc.objective
    if name == "sft":
        return SFT(chunked=tc.chunked_loss)
    beta = pc.beta if pc.beta is not None else DEFAULT_BETA[name]
    if name == "dpo":
        return DPO(beta, tc.chunked_loss, loss_type=pc.loss_type, label_smoothing=pc.label_smoothing)
    if name == "orpo":
        return ORPO(beta, tc.chunked_loss)
    if name == "simpo":
        return SimPO(beta, tc.chunked_loss, gamma=pc.simpo_gamma, label_smoothing=pc.label_smoothing)
    return KTO(beta, pc.desirable_weight, pc.undesirable_weight, tc.chunked_loss)
