"""Reading and validating JSONL training records (`text` or OpenAI-style `messages`).

Every problem is reported as `FILE:LINE: message`, all of them at once, before any model is loaded,
so a bad line fails a run in seconds instead of after an hour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.errors import DataError, LoraTuneError

ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One validated training record with where it came from."""

    where: str  # FILE:LINE
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def _check_messages(msgs: Any, where: str) -> list[str]:
    if not isinstance(msgs, list) or not msgs:
        return [f"{where}: `messages` must be a non-empty list of {{role, content}} objects"]
    problems = []
    has_assistant = False
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{at} must be an object with `role` and `content`")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"{at}: `content` must be a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip():
            problems.append(f"{at}: empty assistant content; remove the turn or fill it in")
        if role == "system" and i != 0:
            problems.append(f"{at}: a system message may only come first")
        if "weight" in m and m["weight"] not in (0, 1):
            problems.append(f"{at}: `weight` must be 0 or 1, got {m['weight']!r}")
        has_assistant |= role == "assistant"
    if not has_assistant and not problems:
        problems.append(f"{where}: no assistant message, so nothing to learn from; add one")
    return problems


def parse_record(obj: Any, where: str, fmt: str = "auto") -> tuple[Record | None, list[str]]:
    """Validate one decoded JSON value; returns (record, problems)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    if fmt == "auto":
        fmt = "messages" if "messages" in obj else "text" if "text" in obj else ""
    if fmt == "messages":
        problems = _check_messages(obj.get("messages"), where)
        return (None if problems else Record(where, messages=obj["messages"])), problems
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, [f"{where}: `text` must be a non-empty string"]
        return Record(where, text=text), []
    keys = ", ".join(sorted(obj)) or "none"
    return None, [f"{where}: no `text` or `messages` field (found: {keys}); see data.format in the README"]


def read_jsonl(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Read and validate every line; raises DataError listing all bad lines."""
    path = Path(path)
    if not path.is_file():
        raise LoraTuneError(f"data file {path} does not exist; check data.train_file / data.val_file")
    records, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{where}: invalid UTF-8 at byte {e.start}; re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            rec, errs = parse_record(obj, where, fmt)
            problems.extend(errs)
            if rec is not None:
                records.append(rec)
    if problems:
        raise DataError(problems)
    if not records:
        raise LoraTuneError(f"{path} holds no records; add JSONL lines with `text` or `messages`")
    return records
