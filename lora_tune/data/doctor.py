"""`lora-tune data inspect`: validate every record and show what the model will really be trained on."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lora_tune.data.batching import Batching, choose_batching, pack_rows
from lora_tune.data.hygiene import deduplicate, labels_of
from lora_tune.data.readers import read_records
from lora_tune.data.tokenize import IGNORE, Example, chunk_text, encode_record, fit_length


@dataclass
class InspectReport:
    source: str
    problems: list[str] = field(default_factory=list)
    records: int = 0
    kinds: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)  # tokens per record before truncation
    supervised: int = 0  # after truncation
    tokens: int = 0  # after truncation
    would_cut: int = 0
    would_drop: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    labels: Counter | None = None
    packed_rows: int = 0
    max_length: int = 0
    sample: Example | None = None
    sample_where: str = ""
    batching: Batching | None = None  # what training would do with these samples

    @property
    def ok(self) -> bool:
        return not self.problems


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else 0


def inspect_data(
    source: str,
    tok,
    fmt: str = "auto",
    max_length: int = 1024,
    truncation: str = "truncate",
    loss_on: str = "assistant",
    template: str | None = None,
    columns: dict | None = None,
    sample_index: int = 0,
    batch_size: int = 4,
) -> InspectReport:
    """Validate and tokenize every record of `source`; never raises on bad records."""
    records, problems = read_records(source, fmt, columns)
    rep = InspectReport(source=str(source), problems=problems, records=len(records), max_length=max_length)
    rep.kinds = Counter(r.kind for r in records)
    fitted_lengths = []
    kept: list[Example] = []  # the samples training would batch
    for i, rec in enumerate(records):
        try:
            ex = encode_record(tok, rec, template, loss_on)
        except Exception as e:  # noqa: BLE001 - a template error on one record is reported, not fatal
            rep.problems.append(f"{rec.where}: could not be formatted ({e})")
            continue
        rep.lengths.append(len(ex.input_ids))
        fitted = fit_length(ex, max_length, truncation) if rec.text is None else ex
        if fitted is None:
            rep.would_drop += 1
            continue
        if fitted is not ex:
            rep.would_cut += 1
        if fitted.n_supervised == 0:
            rep.would_drop += 1
            rep.problems.append(
                f"{rec.where}: no supervised token left after truncation to {max_length} tokens; "
                "raise --max-length, shorten the prompt, or use truncation keep_end"
            )
            continue
        rep.supervised += fitted.n_supervised
        rep.tokens += min(len(fitted.input_ids), max_length) if rec.text is None else len(fitted.input_ids)
        fitted_lengths.append(min(len(fitted.input_ids), max_length))
        pieces = [c for c in chunk_text(fitted, max_length) if c.n_supervised] if rec.text is not None else [fitted]
        kept.extend(pieces)
        if i == sample_index or (rep.sample is None and i > sample_index):
            rep.sample, rep.sample_where = fitted, rec.where
    rep.exact_duplicates = deduplicate(records, "exact")[1].removed
    rep.near_duplicates = deduplicate(records, "normalized")[1].removed - rep.exact_duplicates
    labels = labels_of(records)
    rep.labels = Counter(labels) if labels else None
    rep.packed_rows = len(pack_rows(fitted_lengths, max_length)) if fitted_lengths else 0
    if kept:
        rep.batching = choose_batching(kept, batch_size, 42, packing=False, group_by_length="auto")
    return rep


def _histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    return [
        f"{lo + b * step:>7}-{lo + (b + 1) * step - 1:<7} {'#' * max(1, round(width * counts[b] / top)):<{width}} "
        f"{counts[b]}"
        for b in range(bins)
        if counts.get(b)
    ]


def render_sample(tok, ex: Example, color: bool = True) -> str:
    """Rich markup of a sample: supervised tokens in bold green (or inside ⟦ ⟧ without colour), the rest dim."""
    parts, current, run = [], None, []
    for tid, lab in zip(ex.input_ids, ex.labels, strict=True):
        sup = lab != IGNORE
        if current is not None and sup != current:
            parts.append((current, tok.decode(run)))
            run = []
        current = sup
        run.append(tid)
    if run:
        parts.append((current, tok.decode(run)))
    if not color:
        return escape("".join(f"⟦{t}⟧" if sup else t for sup, t in parts))
    return "".join(f"[bold green]{escape(t)}[/]" if sup else f"[dim]{escape(t)}[/]" for sup, t in parts)


def print_report(rep: InspectReport, tok, console: Console) -> None:
    for p in rep.problems:
        console.print(p, highlight=False, markup=False)
    if rep.problems:
        console.print(f"[red]{len(rep.problems)} problem(s)[/] in {escape(rep.source)}")
    table = Table(title=f"{rep.source}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    kinds = ", ".join(f"{k} {v}" for k, v in rep.kinds.most_common())
    table.add_row("valid records", f"{rep.records} ({kinds})" if rep.records else "0")
    if rep.lengths:
        pct = "  ".join(f"p{q} {percentile(rep.lengths, q)}" for q in (50, 90, 95, 99))
        table.add_row("tokens per record", f"{pct}  max {max(rep.lengths)}")
        table.add_row("supervised tokens", f"{rep.supervised} ({rep.supervised / max(rep.tokens, 1):.0%} of tokens)")
        table.add_row(f"over max_length {rep.max_length}", f"{rep.would_cut} cut, {rep.would_drop} dropped")
        table.add_row("duplicates", f"{rep.exact_duplicates} exact, {rep.near_duplicates} near (normalised)")
        table.add_row(
            "tokens per epoch",
            f"{rep.tokens:,} (packed into {rep.packed_rows} rows of "
            f"{rep.max_length}: {rep.tokens / max(rep.packed_rows * rep.max_length, 1):.0%} full)",
        )
    if rep.batching:
        table.add_row("batching (group_by_length: auto)", rep.batching.reason)
    if rep.labels:
        table.add_row("labels", ", ".join(f"{k!r} {v}" for k, v in rep.labels.most_common()))
    console.print(table)
    if rep.lengths:
        console.print("[bold]token length histogram[/]")
        for line in _histogram(rep.lengths):
            console.print(line, highlight=False, markup=False)
    if rep.sample is not None:
        color = console.color_system is not None
        legend = "[bold green]trained on[/], [dim]context[/]" if color else "⟦trained on⟧, context"
        console.print(f"[bold]sample[/] {escape(rep.sample_where)} - {legend}:")
        console.print(render_sample(tok, rep.sample, color), highlight=False)
