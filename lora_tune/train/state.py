"""`TrainState`: exactly what a checkpoint saves besides tensors, and what a resume restores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lora_tune.data.batching import Position


@dataclass
class TrainState:
    """The loop's progress. Tensors (adapter, optimizer, scheduler, scaler, RNG) are saved beside it."""

    step: int = 0  # optimizer steps done
    position: Position = field(default_factory=Position)  # where the training data stream stands
    best_score: float | None = None  # best evaluation so far, higher is better (minus the loss, or the metric)
    best_step: int | None = None  # the step of that evaluation
    bad_evals: int = 0  # evaluations since the best one (early stopping's patience count)
    tokens_seen: int = 0  # normaliser units trained on (supervised tokens for SFT)
    precision: str | None = None  # the compute dtype chosen when the run started ("bf16", ...)
    threads: int = 0  # torch's thread count when the run started (results depend on it in the last digits)
    config_hash: str = ""  # of the settings that must not change on resume
    split: int = 1  # pieces each micro-batch runs as (doubled by out-of-memory recovery)
    stopped: str | None = None  # why training ended early (a resumed run that stopped does not go on)
    objective: dict[str, Any] = field(default_factory=dict)  # whatever the objective needs to resume
    world: int = 1  # training processes (each trains on its share of every micro-batch; see BatchStream)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the checkpoint's `state.json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a `state.json`; keys it lacks (older checkpoints) keep their defaults, unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("position"), dict):
            values["position"] = Position(**values["position"])
        return cls(**values)
