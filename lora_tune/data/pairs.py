"""Preference data: formats, validation, tokenization with pair truncation, and pair batches.

Formats (auto-detected per record, like the SFT ones):
- OpenAI preference JSONL: `{"input": {"messages": [...]}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]}`;
- TRL `prompt`/`chosen`/`rejected`, as strings or as message lists, including the implicit-prompt form
  where `chosen` and `rejected` are whole conversations that share everything but their last turn;
- KTO `prompt`/`completion`/`label` (true: a desirable answer, false: an undesirable one).

Every record becomes a `PrefRecord`: a prompt (chat messages, or a raw string) and one or two answers.
Tokens: the prompt is rendered with the generation prompt, each answer is the text the model would
generate after it, up to and including the end-of-turn token, tokenized on its own (as at inference).
Only answer tokens are scored. Too-long samples keep the end of the prompt (at most
`max_prompt_length` tokens) and the start of the answers (the whole at most `max_length`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tune.data.formats import Record, _check_messages, _maybe_json
from lora_tune.data.tokenize import _with_eos, render_with_spans
from lora_tune.errors import LoraTuneError
from lora_tune.losses import IGNORE


@dataclass
class PrefRecord:
    """A validated preference record: a prompt and (chosen, rejected), or one answer and its label (KTO)."""

    where: str  # FILE:LINE
    prompt: list[dict[str, Any]] | str  # chat messages ending with a user turn, or a raw prompt
    answers: tuple[str, ...]  # (chosen, rejected), or (completion,) for KTO
    label: bool | None = None  # KTO: is the completion desirable

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def paired(self) -> bool:
        return self.label is None

    def content(self) -> dict[str, Any]:
        """The record's data without its location (duplicate checks, cache keys)."""
        prompt = [{"role": m["role"], "content": m["content"]} for m in self.prompt] if self.chat else self.prompt
        return {"prompt": prompt, "answers": list(self.answers), "label": self.label}

    def as_sft(self) -> Record:
        """The prompt with its first answer (the chosen one) as an SFT record, e.g. for a merge's fidelity check."""
        if self.chat:
            return Record(self.where, messages=[*self.prompt, {"role": "assistant", "content": self.answers[0]}])
        return Record(self.where, prompt=self.prompt, completion=self.answers[0])


def detect_pref_format(obj: dict[str, Any]) -> str | None:
    if "input" in obj and ("preferred_output" in obj or "non_preferred_output" in obj):
        return "openai_preference"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "label" in obj and "completion" in obj:
        return "kto"
    return None


def _answer_message(value: Any, where: str, name: str) -> tuple[str | None, list[str]]:
    """The content of a one-message assistant answer (a list of one message, as both formats write it)."""
    value = _maybe_json(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        return None, [f"{where}: `{name}` must be a list holding one assistant message {{role, content}}"]
    msg = value[0]
    if msg.get("role") != "assistant":
        return None, [f"{where}: `{name}[0]` must have role assistant, got {msg.get('role')!r}"]
    content = msg.get("content")
    if not isinstance(content, str):
        return None, [f"{where}: `{name}[0].content` must be a string, got {type(content).__name__}"]
    if not content.strip():
        return None, [f"{where}: `{name}` is empty; fill in the answer or remove the record"]
    return content, []


def _check_prompt(prompt: Any, where: str, name: str = "prompt") -> list[str]:
    """A chat prompt: valid turns ending with a user turn (checked with a stand-in answer after it)."""
    if not isinstance(prompt, list) or not prompt:
        return [f"{where}: `{name}` must be a non-empty list of {{role, content}} messages (or a string)"]
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        return [f"{where}: `{name}` must end with a user turn (the answers follow it), not an assistant one"]
    problems = _check_messages([*prompt, {"role": "assistant", "content": "x"}], where, name)
    return [p for p in problems if "no assistant message" not in p]


def _text(obj: dict, key: str, where: str) -> tuple[str | None, list[str]]:
    v = obj.get(key)
    if key not in obj:
        return None, [f"{where}: missing `{key}`"]
    if not isinstance(v, str):
        return None, [f"{where}: `{key}` must be a string or a list of messages, got {type(v).__name__}"]
    if not v.strip():
        return None, [f"{where}: `{key}` is empty; fill in the answer or remove the record"]
    return v, []


def _implicit_prompt(chosen: str, rejected: str) -> str:
    """The shared start of two whole texts, cut back to a word boundary (as TRL's `extract_prompt`)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(" ") + 1  # after the last space; a shared start without one is kept whole
    return shared[:cut] if cut else shared


def _pair(where: str, prompt, chosen, rejected, problems: list[str]) -> tuple[PrefRecord | None, list[str]]:
    if problems:
        return None, problems
    if chosen == rejected:
        return None, [f"{where}: chosen and rejected answers are identical; a pair must differ (or remove it)"]
    return PrefRecord(where, prompt, (chosen, rejected)), []


def _parse_openai(obj: dict, where: str) -> tuple[PrefRecord | None, list[str]]:
    problems: list[str] = []
    inp = _maybe_json(obj.get("input"))
    msgs = inp.get("messages") if isinstance(inp, dict) else None
    if msgs is None:
        problems.append(f"{where}: `input` must be an object with `messages` (the conversation before the answers)")
    else:
        problems += _check_prompt(_maybe_json(msgs), where, "input.messages")
    answers = []
    for key in ("preferred_output", "non_preferred_output"):
        content, errs = _answer_message(obj[key], where, key) if key in obj else (None, [f"{where}: missing `{key}`"])
        problems += errs
        answers.append(content)
    return _pair(where, _maybe_json(msgs), answers[0], answers[1], problems)


def _parse_trl(obj: dict, where: str) -> tuple[PrefRecord | None, list[str]]:
    missing = [f"{where}: missing `{k}`" for k in ("chosen", "rejected") if k not in obj]
    if missing:
        return None, missing
    chosen, rejected = _maybe_json(obj["chosen"]), _maybe_json(obj["rejected"])
    prompt = _maybe_json(obj.get("prompt"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None and not isinstance(prompt, str):
            return None, [f"{where}: with string answers, `prompt` must be a string too"]
        problems = _text(obj, "chosen", where)[1] + _text(obj, "rejected", where)[1]
        if prompt is None and not problems:  # implicit prompt: the texts' shared start
            prompt = _implicit_prompt(chosen, rejected)
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
            if not prompt.strip():
                problems.append(f"{where}: no `prompt`, and chosen and rejected share no start to take it from")
        return _pair(where, prompt or "", chosen, rejected, problems)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None, [f"{where}: `chosen` and `rejected` must both be strings or both lists of messages"]
    if isinstance(prompt, str):
        return None, [f"{where}: with message-list answers, `prompt` must be a list of messages too"]
    if prompt is None:  # implicit prompt: whole conversations that differ only in their last turn
        if not chosen or not rejected:
            return None, [f"{where}: `chosen` and `rejected` must be non-empty conversations"]
        if chosen[:-1] != rejected[:-1]:
            return None, [
                f"{where}: no `prompt`, and the chosen and rejected conversations differ before their last turn; "
                "they must share the prompt (or give it as `prompt`)"
            ]
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    problems = _check_prompt(prompt, where)
    c, errs_c = _answer_message(chosen, where, "chosen")
    r, errs_r = _answer_message(rejected, where, "rejected")
    return _pair(where, prompt, c, r, problems + errs_c + errs_r)


def _parse_kto(obj: dict, where: str) -> tuple[PrefRecord | None, list[str]]:
    problems: list[str] = []
    label = obj.get("label")
    if not isinstance(label, bool):
        problems.append(f"{where}: `label` must be true (desirable) or false (undesirable), got {label!r}")
    prompt, completion = _maybe_json(obj.get("prompt")), _maybe_json(obj.get("completion"))
    if "prompt" not in obj:
        problems.append(f"{where}: missing `prompt`")
    elif isinstance(prompt, list):  # a chat prompt; the completion as a message or its text
        problems += _check_prompt(prompt, where)
        completion, errs = (
            _text(obj, "completion", where)
            if isinstance(completion, str)
            else _answer_message(completion, where, "completion")
        )
        problems += errs
    else:
        if not isinstance(prompt, str):
            problems.append(f"{where}: `prompt` must be a string or a list of messages")
        completion, errs = _text(obj, "completion", where)
        problems += errs
    return (None, problems) if problems else (PrefRecord(where, prompt, (completion,), label), [])


PARSERS = {"openai_preference": _parse_openai, "preference": _parse_trl, "kto": _parse_kto}


def parse_pref_record(
    obj: Any, where: str, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[PrefRecord | None, list[str]]:
    """Validate one decoded object as a preference record; returns (record, problems)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    if columns:
        obj = {**obj, **{canon: obj[src] for canon, src in columns.items() if src in obj}}
    kind = detect_pref_format(obj) if fmt == "auto" else fmt
    if kind not in PARSERS:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        return None, [
            f"{where}: not a preference record (found: {keys}); expected prompt+chosen+rejected, "
            "input+preferred_output+non_preferred_output (OpenAI), or prompt+completion+label (KTO)"
        ]
    return PARSERS[kind](obj, where)


def check_kind(records: list[PrefRecord], paired: bool, objective: str) -> None:
    """Pairs for DPO/ORPO/SimPO, labelled single answers for KTO; the first mismatch is an error."""
    for rec in records:
        if rec.paired != paired:
            want = "pairs (prompt, chosen, rejected)" if paired else "KTO records (prompt, completion, label)"
            raise LoraTuneError(
                f"{rec.where}: train.objective={objective} needs {want}; this record is "
                f"{'a pair' if rec.paired else 'a KTO record'}"
            )


# ----------------------------------------------------------------------------------------------------
# Tokens


@dataclass
class PrefExample:
    """Token ids of a prompt and its answers; `ref` holds reference log-probs once precomputed.

    For KTO, `answers` is (completion, the KL partner's completion): the second is another record's
    answer to this prompt, used only for the KL estimate.
    """

    where: str
    prompt: list[int]
    answers: tuple[list[int], ...]
    label: bool | None = None
    ref: list[float] | None = None  # summed reference log-prob of each answer

    @property
    def length(self) -> int:
        """The longest prompt+answer row this example makes."""
        return len(self.prompt) + max(len(a) for a in self.answers)

    @property
    def n_supervised(self) -> int:
        return sum(len(a) for a in self.answers)


@dataclass
class PairStats:
    records: int = 0
    kept: int = 0
    truncated_prompts: int = 0
    truncated_answers: int = 0
    dropped_identical: int = 0  # answers identical after truncation
    dropped_no_supervised: int = 0
    dropped_where: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # before truncation
    answer_tokens: list[list[int]] = field(default_factory=list)  # per answer slot, before truncation


def _encode_answer(tok, rec: PrefRecord, answer: str, template: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt as rendered with the generation prompt, the answer up to and
    including its end-of-turn token; a raw prompt gets the tokenizer's special tokens, a raw answer EOS."""
    if not rec.chat:
        prompt = list(tok(rec.prompt, add_special_tokens=True)["input_ids"]) if rec.prompt else []
        ids = list(tok(answer, add_special_tokens=not prompt)["input_ids"])
        return prompt, _with_eos(tok, ids)
    msgs = [*rec.prompt, {"role": "assistant", "content": answer}]
    try:
        text, spans = render_with_spans(tok, msgs, template, loss_on="completion")
    except LoraTuneError as e:
        raise LoraTuneError(f"{rec.where}: {e}") from None
    start, end = spans[0]
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(text[:start]), enc(text[start:end])


def encode_pref(tok, rec: PrefRecord, template: str | None = None, partner: str | None = None) -> PrefExample:
    """Tokenize one record (a KTO record with its KL `partner` answer)."""
    answers = [*rec.answers, *([partner] if partner is not None else [])]
    encoded = [_encode_answer(tok, rec, a, template) for a in answers]
    return PrefExample(rec.where, encoded[0][0], tuple(e[1] for e in encoded), rec.label)


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """The prompt tokens a too-long sample keeps: `max_prompt_length`, by default half of `max_length`."""
    return max_prompt_length or max_length // 2


def fit_pair(ex: PrefExample, max_length: int, max_prompt_length: int) -> tuple[PrefExample, bool, bool]:
    """Cut a too-long example: the prompt keeps its end (at most `max_prompt_length` tokens), then the answers
    keep their start so every row fits `max_length`. Returns (example, prompt cut, answers cut)."""
    prompt, answers = ex.prompt, ex.answers
    cut_prompt = cut_answers = False
    if ex.length > max_length and len(prompt) > max_prompt_length:
        prompt, cut_prompt = prompt[len(prompt) - max_prompt_length :], True
    room = max_length - len(prompt)
    if any(len(a) > room for a in answers):
        answers, cut_answers = tuple(a[: max(room, 0)] for a in answers), True
    return PrefExample(ex.where, prompt, answers, ex.label, ex.ref), cut_prompt, cut_answers


def encode_prefs(
    tok, records: list[PrefRecord], max_length: int, max_prompt_length: int | None, template: str | None = None
) -> tuple[list[PrefExample], PairStats]:
    """Tokenize and fit every record. Dropped (and counted, with where): pairs whose answers became
    identical after truncation, and samples with no answer token left. A KTO record's KL partner is the
    next record's answer (the first record's for the last), fixed so its reference log-prob can be cached."""
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    stats = PairStats(records=len(records))
    out = []
    for i, rec in enumerate(records):
        partner = records[(i + 1) % len(records)].answers[0] if not rec.paired else None
        ex = encode_pref(tok, rec, template, partner)
        stats.prompt_tokens.append(len(ex.prompt))
        stats.answer_tokens.append([len(a) for a in ex.answers[: 2 if rec.paired else 1]])
        fitted, cut_p, cut_a = fit_pair(ex, max_length, max_prompt_length)
        scored = fitted.answers if rec.paired else fitted.answers[:1]
        if any(not a for a in scored):
            stats.dropped_no_supervised += 1
            stats.dropped_where.append(f"{rec.where} (no answer token left within {max_length} tokens)")
            continue
        if rec.paired and fitted.answers[0] == fitted.answers[1]:
            stats.dropped_identical += 1
            stats.dropped_where.append(f"{rec.where} (answers identical after truncation to {max_length} tokens)")
            continue
        stats.truncated_prompts += cut_p
        stats.truncated_answers += cut_a
        out.append(fitted)
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------------
# Batches


def collate_prefs(examples: list[PrefExample], pad_id: int) -> dict[str, torch.Tensor]:
    """`[B, A, W]` tensors (A answers per example: chosen and rejected, or KTO's completion and KL partner),
    right-padded; labels are the answer tokens only. Pairs stay together when a batch is cut into pieces
    (rows are examples). Adds `ref_logps` `[B, A]` when precomputed, and `desirable` `[B]` for KTO."""
    n_ans = len(examples[0].answers)
    width = max(e.length for e in examples)
    shape = (len(examples), n_ans, width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for i, e in enumerate(examples):
        p = len(e.prompt)
        for j, a in enumerate(e.answers):
            n = p + len(a)
            ids[i, j, :n] = torch.tensor(e.prompt + a)
            labels[i, j, p:n] = torch.tensor(a)
            mask[i, j, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all(e.ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float32)
    if examples[0].label is not None:
        batch["desirable"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def dump_pairs(examples: list[PrefExample]) -> str:
    """A stable text form of tokenized examples (a fingerprint input for the reference cache)."""
    return json.dumps([[e.prompt, list(e.answers), e.label] for e in examples])
