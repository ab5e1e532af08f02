"""What the dashboard shows of run folders, read from the folders alone (never written).

A run folder is what `lora-tune train` writes (`config.yaml`, `metrics.jsonl`, `checkpoints/`, `adapter/`,
eval reports). Summaries are cached by each file's (size, mtime), so a page of hundreds of runs re-reads
only what changed; a summary reads `metrics.jsonl` once, a run page then only its new lines.

Status, from what the folder holds (`status.json` is the trainer's own word, `train.hooks.RunStatus`):
- running: `.lock` names a live process (the trainer holds it while it trains);
- interrupted: Ctrl-C (`status.json`), or killed outright (`.lock` or a "running" status left by a dead
  process);
- failed: `status.json` says so, with the error;
- finished / stopped early: `adapter/` is there (stopped early: the status or the last checkpoint says so);
- incomplete: none of these (a run that never got far, or a folder copied in part).
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_tune.train.checkpoint import PREFIX, latest_checkpoint, list_checkpoints, read_state

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # folder names the API accepts (no paths)


@dataclass
class RunSummary:
    """One row of the runs page."""

    name: str
    base_model: str | None = None
    objective: str = "sft"
    quantization: str | None = None
    status: str = "incomplete"
    steps: int = 0
    total_steps: int | None = None
    best_val_loss: float | None = None
    last_loss: float | None = None
    tokens_per_s: float | None = None
    started: float | None = None  # the run folder's config.yaml time (seconds since the epoch)
    updated: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Cached:
    key: tuple
    summary: RunSummary


@dataclass
class RunsFolder:
    """The run folders under `root` (each a direct child), read-only, with summaries cached."""

    root: Path
    _cache: dict[str, _Cached] = field(default_factory=dict)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and RUN_NAME.match(p.name) and _looks_like_run(p)
        )

    def folder(self, name: str) -> Path | None:
        """The folder of run `name`, or None when there is no such run (names never reach outside root)."""
        if not RUN_NAME.match(name):
            return None
        path = self.root / name
        return path if path.is_dir() and _looks_like_run(path) else None

    def summaries(self) -> list[RunSummary]:
        out = []
        names = self.names()
        for name in names:
            path = self.root / name
            key = _fingerprint(path)
            hit = self._cache.get(name)
            if hit is None or hit.key != key:
                hit = _Cached(key, summarize(path))
                self._cache[name] = hit
            out.append(hit.summary)
        for gone in set(self._cache) - set(names):
            del self._cache[gone]
        return out

    def detail(self, name: str) -> dict[str, Any] | None:
        """Everything the run page shows but the curves (`metrics` serves those)."""
        path = self.folder(name)
        if path is None:
            return None
        summary = summarize(path)
        adapter = path / "adapter"
        return {
            **summary.to_dict(),
            "path": str(path.resolve()),
            "config": _read_text(path / "config.yaml"),
            "checkpoints": checkpoints(path),
            "evaluations": evaluations(path),
            "adapter": str(adapter.resolve()) if adapter.is_dir() else None,
            "commands": commands(path, summary) if adapter.is_dir() else [],
        }


def load_yaml(text: str):
    """`yaml.safe_load` through libyaml's C parser where PyYAML has it (30x faster: hundreds of configs)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader


def _looks_like_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return (None, None)


def _fingerprint(path: Path) -> tuple:
    """What a summary depends on; it changes whenever one of its files does."""
    parts = ("config.yaml", "metrics.jsonl", ".lock", "status.json", "adapter", "checkpoints")
    return tuple(_stat_key(path / p) for p in parts)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The lines of a metrics.jsonl the trainer has finished writing (a half-written last line is left for
    the next read); none when the file is missing."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    return
                yield raw
    except OSError:
        return


def _parsed(lines) -> list[dict]:
    out = []
    for raw in lines:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def read_records(path: Path, after: int = 0) -> tuple[list[dict], int]:
    """The metrics records from line `after` on (0-based), and the line count read so far."""
    lines = list(_complete_lines(path))
    if not lines and not path.is_file():
        return [], after
    return _parsed(lines[after:]), len(lines)


def _pid_alive(text: str) -> bool | None:
    """Whether the process a `.lock` names is alive here (None when the file names none)."""
    m = re.search(r"pid=(\d+)", text)
    if not m:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SUMMARY_KEYS = ("model.source", "model.quantization", "train.objective", "train.max_steps")


def config_fields(text: str) -> dict[str, Any]:
    """The `SUMMARY_KEYS` of a run's config.yaml. The file is our own `safe_dump` of two-level sections,
    so those lines are found without building the whole document (a full parse of hundreds of configs
    takes seconds); anything written otherwise falls back to the full parse."""
    out: dict[str, Any] = {}
    section = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section, _, rest = line.partition(":")
            if rest.strip() and section.strip() in {k.split(".")[0] for k in SUMMARY_KEYS}:
                return _fields_of(load_yaml(text) or {})  # flow style: not the layout we write
            continue
        key, _, value = line.strip().partition(":")
        name = f"{section}.{key}"
        if line.startswith("  ") and not line.startswith("   ") and name in SUMMARY_KEYS:
            out[name] = load_yaml(value.strip()) if value.strip() else None
    return out


def _fields_of(cfg: dict) -> dict[str, Any]:
    out = {}
    for name in SUMMARY_KEYS:
        section, key = name.split(".")
        value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), dict) else None
        out[name] = value
    return out


def _summary_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(the last 20 training records, every validation record) of a metrics.jsonl, parsing only those
    (training records carry no `split` key)."""
    last: deque[bytes] = deque(maxlen=20)
    vals = []
    for raw in _complete_lines(path):
        if b'"split"' not in raw:
            last.append(raw)
            continue
        record = next(iter(_parsed([raw])), None)
        if record is None:
            continue
        if record.get("split") == "val":
            vals.append(record)
        else:
            last.append(raw)
    return _parsed(last), vals


def summarize(path: Path) -> RunSummary:
    """The runs-page row of run folder `path`."""
    s = RunSummary(name=path.name)
    text = _read_text(path / "config.yaml")
    fields: dict[str, Any] = {}
    if text:
        try:
            fields = config_fields(text)
        except yaml.YAMLError:
            fields = {}
        s.started = (path / "config.yaml").stat().st_mtime
    s.base_model, s.quantization = fields.get("model.source"), fields.get("model.quantization")
    s.objective = fields.get("train.objective") or "sft"
    s.total_steps = fields.get("train.max_steps")
    steps, val_records = _summary_records(path / "metrics.jsonl")
    vals = [r["loss"] for r in val_records if isinstance(r.get("loss"), (int, float))]
    if steps:
        s.steps, s.last_loss = int(steps[-1].get("step", len(steps))), steps[-1].get("loss")
        rates = sorted(r["tokens_per_s"] for r in steps if r.get("tokens_per_s"))
        s.tokens_per_s = rates[len(rates) // 2] if rates else None
    s.best_val_loss = min(vals) if vals else None
    if (path / "metrics.jsonl").is_file():
        s.updated = (path / "metrics.jsonl").stat().st_mtime
    s.status, s.error, marker = status(path)
    s.total_steps = marker.get("total_steps") or s.total_steps
    return s


def status(path: Path) -> tuple[str, str | None, dict]:
    """(status, the error if it failed, the trainer's `status.json`) of run folder `path`."""
    marker = {}
    text = _read_text(path / "status.json")
    if text:
        try:
            marker = json.loads(text)
        except ValueError:
            marker = {}
    lock = _read_text(path / ".lock")
    if lock is not None and _pid_alive(lock) is not False:
        return "running", None, marker
    said = marker.get("status")
    if said == "running" or lock is not None:  # the trainer died without a word (SIGKILL, power cut)
        return "interrupted", None, marker
    if said in ("failed", "interrupted"):
        return said, marker.get("error"), marker
    if (path / "adapter").is_dir():
        stopped = said == "stopped early" or _stopped_early(path)
        return ("stopped early" if stopped else "finished"), None, marker
    return "incomplete", None, marker


def _stopped_early(path: Path) -> bool:
    """Whether the run's last checkpoint says it stopped early (runs from before `status.json`)."""
    last = latest_checkpoint(path)
    try:
        return last is not None and bool(read_state(last).stopped)
    except (OSError, ValueError):
        return False


def checkpoints(path: Path) -> list[dict[str, Any]]:
    """The run's checkpoints, oldest first: name, step, and when written."""
    return [
        {"name": p.name, "step": int(p.name.removeprefix(PREFIX)), "time": (p / "state.json").stat().st_mtime}
        for p in list_checkpoints(path)
    ]


def evaluations(path: Path) -> list[dict[str, Any]]:
    """The eval reports in the run folder (`lora-tune eval --out`, recipes' eval.json): base vs tuned."""
    out = []
    for file in sorted(path.glob("eval*.json")):
        try:
            report = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        results = report.get("results")
        if not isinstance(results, dict):
            continue
        rows = {}
        for side, result in results.items():
            for metric, value in ((result or {}).get("metrics") or {}).items():
                rows.setdefault(metric, {})[side] = value
        out.append({"file": file.name, "sides": list(results), "metrics": rows, "delta": report.get("delta") or {}})
    return out


def commands(path: Path, summary: RunSummary) -> list[str]:
    """The exact commands that take this run's adapter further."""
    run = str(path.resolve())
    out = [
        f"lora-tune merge --run {run} --out {run}-merged",
        f"lora-tune export-gguf {run}-merged --out {run}.gguf",
        f"lora-tune serve --adapter {path.name}={run}/adapter",
    ]
    if summary.quantization in ("nf4", "fp4"):
        out[0] += " --base-weights dequantized"
    return out
