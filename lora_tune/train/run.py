"""`Run`: one training run in progress, what the loop and its hooks work on."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lora_tune.config import RunCfg
from lora_tune.data.batching import BatchStream
from lora_tune.train.state import TrainState
from lora_tune.train.step import StepParts

if TYPE_CHECKING:
    from lora_tune.train.hooks import Hook


@dataclass
class Run:
    """One training run in progress: what the loop and its hooks work on."""

    cfg: RunCfg
    console: Console
    parts: StepParts
    scheduler: Any
    stream: BatchStream
    val_stream: BatchStream
    tok: Any
    val_records: list
    state: TrainState
    total_steps: int
    resumed_from: int | None = None
    hooks: Sequence[Hook] = ()
    stop_reason: str | None = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        """Hand a metrics record (a training step's or an evaluation's) to every hook."""
        for hook in self.hooks:
            hook.on_log(self, record)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def stop(self, reason: str) -> None:
        """End the loop after the current step."""
        self.stop_reason = self.state.stopped = reason
        self.note(reason)
