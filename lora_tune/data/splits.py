"""From the data config to training and validation examples.

`read_splits` reads and validates every record (before any model loads, so bad input fails in seconds);
`prepare` removes duplicates and leaked validation records, optionally balances labels, and tokenizes
(through the cache).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from lora_tune.config import DataCfg
from lora_tune.data import cache
from lora_tune.data.formats import PREF_FORMATS, Record, parse_record
from lora_tune.data.hygiene import DedupReport, deduplicate, labels_of, leaked, oversample
from lora_tune.data.pairs import PairStats, PrefExample, encode_prefs, parse_pref_record
from lora_tune.data.readers import load_records
from lora_tune.data.tokenize import Example, TokenizeStats, encode_records
from lora_tune.errors import LoraTuneError


def read_splits(cfg: DataCfg, seed: int, preference: bool = False) -> tuple[list, list]:
    """Validated train and validation records; a `val_fraction` split is seeded and reproducible.

    `preference`: the records are preference pairs or KTO records (`data.pairs`), not SFT records.
    """
    parse = parse_pref_record if preference else parse_record
    if cfg.format != "auto" and (cfg.format in PREF_FORMATS) != preference:
        kind = "a preference objective" if preference else "train.objective=sft"
        raise LoraTuneError(f"data.format={cfg.format} does not fit {kind}; use data.format=auto")
    read = dict(fmt=cfg.format, columns=cfg.columns or None, split=cfg.split, parse=parse)
    train = load_records(cfg.train_file, **read)
    if cfg.val_file:
        return train, load_records(cfg.val_file, **read)
    if cfg.val_fraction:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(train)))
        if n_val >= len(train):
            raise LoraTuneError(f"data.val_fraction={cfg.val_fraction} leaves no training records; lower it")
        val_idx = set(order[:n_val])
        return [r for i, r in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]
    return train, []


@dataclass
class DataReport:
    train: TokenizeStats | PairStats = field(default_factory=TokenizeStats)
    val: TokenizeStats | PairStats | None = None
    dedup_train: DedupReport = field(default_factory=DedupReport)
    dedup_val: DedupReport = field(default_factory=DedupReport)
    leaked: list[str] = field(default_factory=list)  # where of leaked validation records
    labels: Counter | None = None
    oversampled: int = 0
    cache_hits: int = 0
    val_records: list[Record] = field(default_factory=list)  # after duplicate and leakage removal

    def lines(self) -> list[str]:
        out = []
        for name, d in (("train", self.dedup_train), ("validation", self.dedup_val)):
            if d.removed:
                out.append(f"{name}: removed {d.removed} duplicate(s), e.g. {d.examples[0]}")
        if self.leaked:
            out.append(f"validation: {len(self.leaked)} record(s) also in training (leakage), e.g. {self.leaked[0]}")
        if self.labels:
            out.append("labels: " + ", ".join(f"{k!r} {v}" for k, v in self.labels.most_common()))
        if self.oversampled:
            out.append(f"oversampled minority labels: +{self.oversampled} training records")
        if self.cache_hits:
            out.append(f"tokenized data loaded from the cache ({self.cache_hits} split(s))")
        return out


def tokenize_cached(
    tok, records: list[Record], cfg: DataCfg, template: str | None, use_cache: bool, tok_fp: str
) -> tuple[list[Example], TokenizeStats, bool]:
    from lora_tune.runtime import cache_dir

    settings = {"max_length": cfg.max_length, "truncation": cfg.truncation, "loss_on": cfg.loss_on}
    fp = cache.fingerprint(records, tok_fp, template, settings) if use_cache else ""
    if use_cache and (hit := cache.load(cache_dir(), fp)) is not None:
        return hit[0], hit[1], True
    examples, stats = encode_records(tok, records, template=template, **settings)
    if use_cache:
        cache.save(cache_dir(), fp, examples, stats)
    return examples, stats, False


def _clean(cfg: DataCfg, report: DataReport, train_records: list, val_records: list) -> tuple[list, list]:
    """Remove duplicates within each split and (with leakage: drop) validation records also in training."""
    train_records, report.dedup_train = deduplicate(train_records, cfg.dedup)
    val_records, report.dedup_val = deduplicate(val_records, cfg.dedup)
    bad = leaked(train_records, val_records)
    report.leaked = [val_records[i].where for i in bad]
    if bad and cfg.leakage == "drop":
        drop = set(bad)
        val_records = [r for i, r in enumerate(val_records) if i not in drop]
    report.val_records = val_records
    return train_records, val_records


def prepare_prefs(
    cfg: DataCfg, tok, template: str | None, max_prompt_length: int | None, train_records: list, val_records: list
) -> tuple[list[PrefExample], list[PrefExample], DataReport]:
    """Clean and tokenize preference records of both splits (pairs keep their order: KTO's KL partners)."""
    report = DataReport()
    train_records, val_records = _clean(cfg, report, train_records, val_records)
    train_ex, report.train = encode_prefs(tok, train_records, cfg.max_length, max_prompt_length, template)
    val_ex: list[PrefExample] = []
    if val_records:
        val_ex, report.val = encode_prefs(tok, val_records, cfg.max_length, max_prompt_length, template)
    return train_ex, val_ex, report


def prepare(
    cfg: DataCfg, tok, template: str | None, seed: int, train_records: list[Record], val_records: list[Record]
) -> tuple[list[Example], list[Example], DataReport]:
    """Clean and tokenize both splits; returns (train examples, validation examples, report)."""
    report = DataReport()
    train_records, val_records = _clean(cfg, report, train_records, val_records)
    labels = labels_of(train_records)
    if labels is not None:
        report.labels = Counter(labels)
        if cfg.oversample_minority:
            before = len(train_records)
            train_records = oversample(train_records, labels, seed)
            report.oversampled = len(train_records) - before
    tok_fp = cache.tokenizer_fingerprint(tok) if cfg.cache else ""
    train_ex, report.train, hit = tokenize_cached(tok, train_records, cfg, template, cfg.cache, tok_fp)
    report.cache_hits += hit
    val_ex: list[Example] = []
    if val_records:
        val_ex, report.val, hit = tokenize_cached(tok, val_records, cfg, template, cfg.cache, tok_fp)
        report.cache_hits += hit
    return train_ex, val_ex, report
