"""Duplicates, train/validation leakage and label balance."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from lora_tune.data.formats import Record

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form, for near-duplicate checks."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def record_key(rec: Record, mode: str) -> str:
    blob = json.dumps(rec.content(), sort_keys=True, ensure_ascii=False)
    return blob if mode == "exact" else normalize(blob)


@dataclass
class DedupReport:
    removed: int = 0
    examples: list[str] = field(default_factory=list)  # "FILE:LINE duplicates FILE:LINE"


def deduplicate(records: list[Record], mode: str) -> tuple[list[Record], DedupReport]:
    """Keep the first of each group of exact (`exact`) or normalised (`normalized`) duplicates."""
    report = DedupReport()
    if mode == "none":
        return records, report
    seen: dict[str, str] = {}
    kept = []
    for rec in records:
        key = record_key(rec, mode)
        if key in seen:
            report.removed += 1
            if len(report.examples) < 5:
                report.examples.append(f"{rec.where} duplicates {seen[key]}")
            continue
        seen[key] = rec.where
        kept.append(rec)
    return kept, report


def leaked(train: list[Record], val: list[Record]) -> list[int]:
    """Indices of validation records whose normalised prompt+response also appears in training."""
    train_keys = {record_key(r, "normalized") for r in train}
    return [i for i, r in enumerate(val) if record_key(r, "normalized") in train_keys]


def labels_of(records: list[Record], max_classes: int = 20) -> list[str] | None:
    """The response of each record when the data looks like classification (few short labels), else None."""
    responses = [r.response() for r in records]
    if any(x is None for x in responses) or len(records) < 4:
        return None
    labels = [x.strip() for x in responses]
    counts = Counter(labels)
    if len(counts) > max_classes or len(counts) > len(labels) / 2 or any(len(x.split()) > 4 for x in counts):
        return None
    return labels


def oversample(records: list[Record], labels: list[str], seed: int) -> list[Record]:
    """Repeat minority-label records (seeded) until every label is as frequent as the largest one."""
    by_label: dict[str, list[Record]] = {}
    for rec, lab in zip(records, labels, strict=True):
        by_label.setdefault(lab, []).append(rec)
    target = max(len(v) for v in by_label.values())
    rng = random.Random(seed)
    out = list(records)
    for group in by_label.values():
        out.extend(rng.choice(group) for _ in range(target - len(group)))
    return out
