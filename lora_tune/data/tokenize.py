"""Turning records into token ids and labels, with the loss on responses only.

The mask is derived from the rendered conversation, not from `{% generation %}` markers (which most
templates, SmolLM2's included, lack): for each assistant turn we render the conversation up to the
turn's start (with the generation prompt) and up to its end; the characters between the two are the
response, cut just after its end-of-turn token so the model learns to stop. Token offsets then map
those character spans onto tokens. This works with any template that renders earlier turns the same
way whatever follows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lora_tune.data.formats import Record
from lora_tune.data.templates import end_markers
from lora_tune.errors import LoraTuneError
from lora_tune.losses import IGNORE

LOSS_ON = ("assistant", "completion", "all")
TRUNCATION = ("truncate", "keep_end", "drop")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        # position 0 is never predicted (labels are shifted by one in the loss)
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class TokenizeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    chunked: int = 0  # long plain-text documents split into several samples
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    dropped_where: list[str] = field(default_factory=list)


def _render(tok, messages, template, add_generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def render_with_spans(tok, messages, template=None, loss_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the loss is computed on.

    `loss_on`: `assistant` (every assistant turn with weight 1), `completion` (the last assistant turn
    only) or `all`.
    """
    if not getattr(tok, "chat_template", None) and template is None:
        raise LoraTuneError(
            "this tokenizer has no chat template, so chat data can't be formatted; "
            "set data.chat_template=chatml (or llama-3, alpaca, or a .jinja file)"
        )
    text = _render(tok, messages, template, add_generation_prompt=False)
    if loss_on == "all":
        return text, [(0, len(text))]
    markers = end_markers(tok)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans: list[tuple[int, int]] = []
    inserts: list[int] = []  # positions where the template wrote no end-of-turn token: we add EOS
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0 or (loss_on == "completion" and i != last):
            continue
        before = _render(tok, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1], template, add_generation_prompt=False)
        if not text.startswith(before):
            raise LoraTuneError(
                "the chat template renders earlier turns differently depending on what follows "
                f"(assistant turn {i}), so the response can't be located; use data.loss_on=completion "
                "(last turn only) or data.loss_on=all"
            )
        start = len(before)
        # Where the turn ends in the full text: the part `upto` shares with it (some templates, e.g.
        # Phi-3's, append EOS only after the last turn, so `upto` need not be a prefix of `text`).
        bound = len(os.path.commonprefix([upto, text]))
        content = m["content"].strip()
        content_at = text.find(content, start, bound) if content else -1
        search_from = content_at + len(content) if content_at >= 0 else start
        hits = [(text.find(mk, search_from, bound), mk) for mk in markers]
        hits = [(pos, mk) for pos, mk in hits if pos >= 0]
        if hits:
            pos, mk = min(hits)
            spans.append((start, pos + len(mk)))
        elif content and content_at < 0:
            # we would not know where the reply ends: an EOS put at the turn's start would teach the
            # model to stop at once
            raise LoraTuneError(
                f"assistant turn {i}: the chat template changes the reply's text (it is not found in the "
                "rendered conversation) and ends turns with no end-of-turn token, so the reply's end can't be "
                "located; use a template that keeps the text, e.g. data.chat_template=chatml"
            )
        else:
            spans.append((start, search_from))
            inserts.append(search_from)
    if inserts:
        if not tok.eos_token:
            raise LoraTuneError("the chat template ends turns with no end token and the tokenizer has no EOS")
        width = len(tok.eos_token)
        for pos in reversed(inserts):
            text = text[:pos] + tok.eos_token + text[pos:]
        spans = [(s + width * sum(p < s for p in inserts), e + width * sum(p <= e for p in inserts)) for s, e in spans]
    return text, spans


def encode_messages(tok, messages, template=None, loss_on: str = "assistant") -> Example:
    text, spans = render_with_spans(tok, messages, template, loss_on)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tid, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(max(a, s) < min(b, e) for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return Example(ids, labels)


def _with_eos(tok, ids: list[int]) -> list[int]:
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        return [*ids, tok.eos_token_id]  # so the model learns where a response or document ends
    return ids


def encode_text(tok, text: str) -> Example:
    ids = _with_eos(tok, list(tok(text, add_special_tokens=True)["input_ids"]))
    return Example(ids, list(ids))


def encode_prompt_completion(tok, prompt: str, completion: str, loss_on: str = "completion") -> Example:
    """Raw (template-free) prompt + completion + EOS; the loss is on the completion and EOS by default.

    The two parts are tokenized separately, as they are seen at inference (prompt given, completion
    generated), so a token never straddles the boundary.
    """
    p = list(tok(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    c = _with_eos(tok, list(tok(completion, add_special_tokens=not p)["input_ids"]))
    labels = p + c if loss_on == "all" else [IGNORE] * len(p) + c
    return Example(p + c, labels)


def encode_record(tok, rec: Record, template: str | None = None, loss_on: str = "assistant") -> Example:
    if rec.text is not None:
        return encode_text(tok, rec.text)
    if rec.prompt is not None:
        return encode_prompt_completion(tok, rec.prompt, rec.completion, loss_on)
    try:
        return encode_messages(tok, rec.messages, template, loss_on)
    except LoraTuneError as e:
        raise LoraTuneError(f"{rec.where}: {e}") from None


def fit_length(ex: Example, max_length: int, truncation: str) -> Example | None:
    """Cut a too-long example: keep its start (`truncate`), its end (`keep_end`), or None (`drop`)."""
    if len(ex.input_ids) <= max_length:
        return ex
    if truncation == "drop":
        return None
    if truncation == "keep_end":
        return Example(ex.input_ids[-max_length:], ex.labels[-max_length:])
    return Example(ex.input_ids[:max_length], ex.labels[:max_length])


def chunk_text(ex: Example, max_length: int) -> list[Example]:
    """Split a long plain-text document into consecutive windows, so nothing of it is thrown away."""
    return [
        Example(ex.input_ids[i : i + max_length], ex.labels[i : i + max_length])
        for i in range(0, len(ex.input_ids), max_length)
    ]


def encode_records(
    tok,
    records: list[Record],
    max_length: int,
    truncation: str = "truncate",
    template: str | None = None,
    loss_on: str = "assistant",
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize records; samples with no supervised token left are dropped and counted, never trained on."""
    stats = TokenizeStats(records=len(records))
    out = []
    for rec in records:
        ex = encode_record(tok, rec, template, loss_on)
        if rec.text is not None and len(ex.input_ids) > max_length and truncation != "drop":
            pieces = [c for c in chunk_text(ex, max_length) if c.n_supervised > 0]
            stats.chunked += 1
            out.extend(pieces)
            continue
        fitted = fit_length(ex, max_length, truncation)
        if fitted is None:
            stats.dropped_too_long += 1
            stats.dropped_where.append(rec.where)
            continue
        if fitted.n_supervised == 0:
            stats.dropped_no_supervised += 1
            stats.dropped_where.append(f"{rec.where} (no supervised token within {max_length} tokens)")
            continue
        stats.truncated += fitted is not ex
        out.append(fitted)
    stats.kept = len(out)
    return out, stats
