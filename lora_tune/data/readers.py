"""Reading data files into validated records.

JSONL, JSON and CSV are parsed here so every problem carries its real line number (a whole-file loader
can only say that the file failed). Parquet and hub datasets come through `datasets`, located by row.
Plain-text files are one document each. A folder means every supported file inside it, sorted.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_tune.data.formats import Record, parse_record
from lora_tune.errors import DataError, LoraTuneError

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}


def _decode(raw: bytes, where: str, problems: list[str]) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{where}: invalid UTF-8 at byte {e.start}; re-save the file as UTF-8")
        return None


def _objects_jsonl(path: Path, problems: list[str]):
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, problems)
            if line is None or not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _objects_json(path: Path, problems: list[str]):
    """A JSON array of objects (or {"data": [...]}) with each element's line number."""
    text = _decode(path.read_bytes(), f"{path}:1", problems)
    if text is None:
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        whole, start = whole["data"], re.search(r'"data"\s*:\s*\[', text).end()
    elif isinstance(whole, list):
        start = text.index("[") + 1
    else:
        problems.append(f"{path}:1: expected a JSON array of records (or JSONL, one record per line)")
        return
    # walk the array once more to learn the line each element starts on
    dec, i = json.JSONDecoder(), start
    for _ in whole:
        while text[i] in " \t\r\n,":
            i += 1
        obj, end = dec.raw_decode(text, i)
        yield obj, f"{path}:{text.count(chr(10), 0, i) + 1}"
        i = end


def _objects_csv(path: Path, problems: list[str]):
    text = _decode(path.read_bytes(), f"{path}:1", problems)
    if text is None:
        return
    reader = csv.DictReader(text.splitlines(keepends=True))
    start = 2
    for row in reader:
        yield {k: v for k, v in row.items() if k is not None}, f"{path}:{start}"
        start = reader.line_num + 1


def _objects_parquet(path: Path, problems: list[str]):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(path), split="train")
    for i, row in enumerate(ds):
        yield row, f"{path}:row {i + 1}"


def _objects_text(path: Path, problems: list[str]):
    text = _decode(path.read_bytes(), f"{path}:1", problems)
    if text is not None and text.strip():
        yield {"text": text}, f"{path}:1"


READERS = {
    "jsonl": _objects_jsonl,
    "json": _objects_json,
    "csv": _objects_csv,
    "parquet": _objects_parquet,
    "text": _objects_text,
}


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise LoraTuneError(f"folder {path} holds no data files ({', '.join(SUFFIXES)})")
        return found
    if path.suffix.lower() not in SUFFIXES:
        raise LoraTuneError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return [path]


def _hub_objects(name: str, split: str, problems: list[str]):
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable"
        raise LoraTuneError(
            f"{name} is not a local path and could not be loaded as a hub dataset "
            f"({type(e).__name__}); check the path, or go online"
        ) from None
    for i, row in enumerate(ds):
        yield row, f"{name}:row {i + 1}"


def read_records(
    source: str | Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    parse: Callable[..., tuple[Any, list[str]]] = parse_record,
) -> tuple[list, list[str]]:
    """All valid records and every problem found (nothing raised for bad records).

    `parse(obj, where, fmt, columns)` turns one decoded object into a record: SFT records by default,
    preference records with `data.pairs.parse_pref_record`.
    """
    path = Path(source)
    records: list[Record] = []
    problems: list[str] = []
    if path.exists():
        streams = [READERS[SUFFIXES[f.suffix.lower()]](f, problems) for f in _files(path)]
    elif isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        streams = [_hub_objects(source, split, problems)]
    else:
        raise LoraTuneError(f"data file {source} does not exist; check data.train_file / data.val_file")
    for stream in streams:
        for obj, where in stream:
            rec, errs = parse(obj, where, fmt, columns)
            problems.extend(errs)
            if rec is not None:
                records.append(rec)
    return records, problems


def load_records(
    source: str | Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    split: str = "train",
    parse: Callable[..., tuple[Any, list[str]]] = parse_record,
) -> list:
    """Records of `source`; raises DataError listing every invalid record, or if there are none."""
    records, problems = read_records(source, fmt, columns, split, parse)
    if problems:
        raise DataError(problems)
    if not records:
        raise LoraTuneError(f"{source} holds no records; see the data formats in the README")
    return records
