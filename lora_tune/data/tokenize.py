"""Turning records into token ids and labels, with the loss on assistant turns only.

The mask is derived from the rendered conversation, not from `{% generation %}` markers (which most
templates, SmolLM2's included, lack): for each assistant turn we render the conversation up to the
turn's start (with the generation prompt) and up to its end; the characters between the two are the
response, cut just after its end-of-turn token so the model learns to stop. Token offsets then map
those character spans onto tokens. This works with any template that renders earlier turns the same
way whatever follows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_tune.data.formats import Record
from lora_tune.errors import LoraTuneError

IGNORE = -100

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_TEMPLATES = {"chatml": CHATML}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_supervised(self) -> int:
        # position 0 is never predicted (labels are shifted by one in the loss)
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class TokenizeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    dropped_where: list[str] = field(default_factory=list)


def resolve_chat_template(tok, fallback: str | None) -> str | None:
    """The tokenizer's own template; else the named fallback (`chatml`) or a .jinja file."""
    if getattr(tok, "chat_template", None):
        return None  # use the tokenizer's
    if fallback is None:
        return None
    if fallback in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[fallback]
    path = Path(fallback)
    if not path.is_file():
        raise LoraTuneError(
            f"data.chat_template={fallback!r} is neither 'chatml' nor an existing .jinja file"
        )
    return path.read_text(encoding="utf-8")


def _end_markers(tok) -> list[str]:
    markers = {tok.eos_token} if tok.eos_token else set()
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"):
        if t in tok.get_vocab():
            markers.add(t)
    return sorted(markers, key=len, reverse=True)


def _render(tok, messages, template, add_generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def render_with_spans(
    tok, messages, template=None, loss_on: str = "assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the loss is computed on."""
    if not getattr(tok, "chat_template", None) and template is None:
        raise LoraTuneError(
            "this tokenizer has no chat template, so `messages` data can't be formatted; "
            "set data.chat_template=chatml (or a .jinja file)"
        )
    text = _render(tok, messages, template, add_generation_prompt=False)
    if loss_on == "all":
        return text, [(0, len(text))]
    markers = _end_markers(tok)
    spans: list[tuple[int, int]] = []
    inserts: list[int] = []  # positions where the template wrote no end-of-turn token: we add EOS
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = _render(tok, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1], template, add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise LoraTuneError(
                "the chat template renders earlier turns differently depending on what follows "
                f"(assistant turn {i}), so the response can't be located; use data.loss_on=all"
            )
        start, end = len(before), len(upto)
        content_at = text.find(m["content"], start, end)
        search_from = content_at + len(m["content"]) if content_at >= 0 else start
        hits = [(text.find(mk, search_from, end), mk) for mk in markers]
        hits = [(pos, mk) for pos, mk in hits if pos >= 0]
        if hits:
            pos, mk = min(hits)
            spans.append((start, pos + len(mk)))
        else:
            spans.append((start, search_from))
            inserts.append(search_from)
    if inserts:
        if not tok.eos_token:
            raise LoraTuneError("the chat template ends turns with no end token and the tokenizer has no EOS")
        for pos in reversed(inserts):
            text = text[:pos] + tok.eos_token + text[pos:]
        spans = [
            (
                s + _shift(s, inserts, len(tok.eos_token), strict=True),
                e + _shift(e, inserts, len(tok.eos_token)),
            )
            for s, e in spans
        ]
    return text, spans


def _shift(pos: int, inserts: list[int], width: int, strict: bool = False) -> int:
    return width * sum(1 for p in inserts if (p < pos if strict else p <= pos))


def encode_messages(tok, messages, template=None, loss_on: str = "assistant") -> Example:
    text, spans = render_with_spans(tok, messages, template, loss_on)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tid, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(max(a, s) < min(b, e) for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return Example(ids, labels)


def encode_text(tok, text: str) -> Example:
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)  # so the model learns where a document ends
    return Example(ids, list(ids))


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
        ex = (
            encode_text(tok, rec.text)
            if rec.text is not None
            else encode_messages(tok, rec.messages, template, loss_on)
        )
        cut = len(ex.input_ids) > max_length
        if cut:
            if truncation == "drop":
                stats.dropped_too_long += 1
                stats.dropped_where.append(rec.where)
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if ex.n_supervised == 0:
            stats.dropped_no_supervised += 1
            stats.dropped_where.append(rec.where)
            continue
        stats.truncated += cut
        out.append(ex)
    stats.kept = len(out)
    return out, stats
