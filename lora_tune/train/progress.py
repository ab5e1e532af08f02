"""A live progress bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import resource

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated bytes on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


class StepProgress:
    def __init__(self, console: Console, total: int, start: int, log_every: int):
        self.console = console
        self.log_every = max(log_every, 1)
        self.live = console.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> StepProgress:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, step: int, total: int, info: str) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, info=info)
        elif step % self.log_every == 0 or step == total:
            self.console.print(f"step {step}/{total}  {info}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)
