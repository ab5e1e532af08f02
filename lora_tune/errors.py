"""User-facing errors: the CLI prints these as one line (or a short list) without a traceback."""

from __future__ import annotations


class LoraTuneError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class ConfigError(LoraTuneError):
    """One or more problems in a run configuration, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the configuration{where}:\n{lines}")


class DataError(LoraTuneError):
    """Invalid training data; each problem is a `FILE:LINE: message` string."""

    def __init__(self, problems: list[str], limit: int = 20):
        self.problems = problems
        shown = "\n".join(problems[:limit])
        more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} invalid record(s):\n{shown}{more}")
