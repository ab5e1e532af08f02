"""A live progress bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


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
