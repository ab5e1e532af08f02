"""Progress bars: training steps (live on a terminal, plain log lines elsewhere) and counted items."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _columns(what: str) -> tuple:
    """what, bar, done/total, elapsed, ETA."""
    return TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()


@contextmanager
def item_progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient bar over `total` items on a terminal's stderr, nothing elsewhere; yields `advance(n)`."""
    console = Console(stderr=True)
    with Progress(*_columns(what), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


class StepProgress:
    def __init__(self, console: Console, total: int, start: int, log_every: int):
        self.console = console
        self.log_every = max(log_every, 1)
        self.live = console.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(*_columns("[bold]train"), TextColumn("{task.fields[info]}"), console=console)
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
