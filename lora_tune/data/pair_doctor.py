"""`lora-tune data inspect` for preference data: pair statistics and one rendered pair."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lora_tune.data.doctor import percentile
from lora_tune.data.hygiene import deduplicate
from lora_tune.data.pairs import (
    PairStats,
    PrefExample,
    detect_pref_format,
    encode_prefs,
    parse_pref_record,
    prompt_budget,
)
from lora_tune.data.readers import READERS, SUFFIXES, read_records
from lora_tune.errors import LoraTuneError


def looks_like_preferences(source: str | Path) -> bool:
    """True when the first record of a local file is in a preference format (pairs or KTO)."""
    path = Path(source)
    if not path.is_file() or SUFFIXES.get(path.suffix.lower()) not in ("jsonl", "json", "csv"):
        return False
    for obj, _ in READERS[SUFFIXES[path.suffix.lower()]](path, []):
        return isinstance(obj, dict) and detect_pref_format(obj) is not None
    return False


@dataclass
class PairReport:
    source: str
    problems: list[str] = field(default_factory=list)
    records: int = 0
    kto: int = 0  # records that are KTO's single labelled answers
    desirable: int = 0
    stats: PairStats = field(default_factory=PairStats)
    exact_duplicates: int = 0
    max_length: int = 0
    max_prompt_length: int = 0
    sample: PrefExample | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_pairs(
    source: str, tok, max_length: int, max_prompt_length: int | None, template: str | None = None, sample_index: int = 0
) -> PairReport:
    """Validate and tokenize every preference record of `source`; never raises on bad records."""
    records, problems = read_records(source, parse=parse_pref_record)
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    rep = PairReport(str(source), problems, len(records), max_length=max_length, max_prompt_length=max_prompt_length)
    rep.kto = sum(not r.paired for r in records)
    rep.desirable = sum(bool(r.label) for r in records)
    if rep.kto and rep.kto != len(records):
        rep.problems.append(f"{source}: mixes pairs and KTO records; an objective trains on one kind")
    try:
        examples, rep.stats = encode_prefs(tok, records, max_length, max_prompt_length, template)
    except LoraTuneError as e:
        rep.problems.append(str(e))
        return rep
    rep.problems += [f"{w}: dropped" for w in rep.stats.dropped_where]
    rep.exact_duplicates = deduplicate(records, "exact")[1].removed
    if examples:
        rep.sample = examples[min(sample_index, len(examples) - 1)]
    return rep


def _dist(values: list[int]) -> str:
    if not values:
        return "-"
    pct = "  ".join(f"p{q} {percentile(values, q)}" for q in (50, 90, 99))
    return f"mean {sum(values) / len(values):.0f}  {pct}  max {max(values)}"


def print_pair_report(rep: PairReport, tok, console: Console) -> None:
    for p in rep.problems:
        console.print(p, highlight=False, markup=False)
    if rep.problems:
        console.print(f"[red]{len(rep.problems)} problem(s)[/] in {escape(rep.source)}")
    s = rep.stats
    kind = f"KTO records ({rep.desirable} desirable, {rep.kto - rep.desirable} undesirable)" if rep.kto else "pairs"
    table = Table(title=rep.source, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("valid records", f"{rep.records} {kind}")
    table.add_row("prompt tokens", _dist(s.prompt_tokens))
    names = ("completion",) if rep.kto else ("chosen", "rejected")
    for i, name in enumerate(names):
        table.add_row(f"{name} tokens", _dist([a[i] for a in s.answer_tokens]))
    table.add_row(
        f"truncated (max_length {rep.max_length}, prompt {rep.max_prompt_length})",
        f"{s.truncated_prompts} prompts cut to their end, {s.truncated_answers} pairs' answers cut to their start",
    )
    table.add_row("dropped", f"{s.dropped_identical} identical after truncation, {s.dropped_no_supervised} empty")
    table.add_row("kept", f"{s.kept} of {s.records}; {rep.exact_duplicates} exact duplicates")
    console.print(table)
    if rep.sample is not None:
        color = console.color_system is not None
        legend = "[bold green]scored[/], [dim]context[/]" if color else "⟦scored⟧, context"
        console.print(f"[bold]sample[/] {escape(rep.sample.where)} - {legend}:")
        prompt = escape(tok.decode(rep.sample.prompt))
        console.print(f"[dim]{prompt}[/]" if color else prompt, highlight=False)
        for name, ids in zip(names, rep.sample.answers, strict=False):
            text = escape(tok.decode(ids))
            console.print(f"[bold]{name}:[/] " + (f"[bold green]{text}[/]" if color else f"⟦{text}⟧"), highlight=False)
