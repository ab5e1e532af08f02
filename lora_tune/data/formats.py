"""Record formats: detection, validation and conversion to one canonical `Record`.

Formats: plain `text`; `prompt`/`completion` (strings, or lists of messages as in TRL's conversational
form); Alpaca (`instruction`, optional `input`, `output`); ShareGPT (`conversations` of `from`/`value`);
OpenAI chat (`messages` of `role`/`content`, optional per-turn `weight` 0/1). Chat-like formats become
`messages`. Every problem is reported as `FILE:LINE: message`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "weight", "name"}
FORMATS = ("text", "prompt_completion", "alpaca", "sharegpt", "messages")
PREF_FORMATS = ("openai_preference", "preference", "kto")  # preference data, read by data.pairs
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class Record:
    """One validated record: either `text`, `prompt`+`completion` (raw strings) or `messages`."""

    where: str  # FILE:LINE (or FILE:row N for columnar files)
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "prompt_completion" if self.prompt is not None else "messages"

    def content(self) -> dict[str, Any]:
        """The record's data without its location (for hashing and duplicate checks).

        A turn's `weight` is part of it: it changes which tokens are trained, so two records that differ
        only in a weight are different records, and editing a weight invalidates the token cache.
        """
        if self.text is not None:
            return {"text": self.text}
        if self.prompt is not None:
            return {"prompt": self.prompt, "completion": self.completion}
        keys = ("role", "content", "weight")
        return {"messages": [{k: m[k] for k in keys if k in m} for m in self.messages]}

    def response(self) -> str | None:
        """The final supervised answer (completion or last assistant turn); None for plain text."""
        if self.completion is not None:
            return self.completion
        if self.messages:
            replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
            return replies[-1] if replies else None
        return None

    def prompt_text(self) -> str:
        """Everything but the final answer, as plain text (for leakage checks)."""
        if self.text is not None:
            return self.text
        if self.prompt is not None:
            return self.prompt
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return "\n".join(m["content"] for m in self.messages[:last])


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _maybe_json(value: Any) -> Any:
    """CSV and Parquet cells hold lists of messages as JSON strings."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _check_messages(msgs: Any, where: str, field: str = "messages") -> list[str]:
    if not isinstance(msgs, list) or not msgs:
        return [f"{where}: `{field}` must be a non-empty list of {{role, content}} objects"]
    problems: list[str] = []
    has_assistant = False
    expected: str | None = "user"  # None once a turn is unreadable: order can't be judged after that
    for i, m in enumerate(msgs):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{at} must be an object with `role` and `content`")
            expected = None
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
            expected = None
            continue
        if not isinstance(content, str):
            problems.append(f"{at}: `content` must be a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip():
            problems.append(f"{at}: empty assistant content; remove the turn or fill it in")
        unknown = sorted(map(str, set(m) - MESSAGE_KEYS))
        if unknown:
            problems.append(
                f"{at}: unsupported field(s) {', '.join(unknown)}; a turn has role, content and "
                "optionally weight (tool calls are not supported)"
            )
        if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            problems.append(f"{at}: `weight` must be 0 or 1, got {m['weight']!r}")
        if role == "system":
            if i != 0:
                problems.append(f"{at}: a system message may only come first")
            continue
        if expected is not None and role != expected:
            problems.append(
                f"{at}: expected {'an assistant' if expected == 'assistant' else 'a user'} turn here "
                f"(roles must alternate user/assistant after an optional system message), got {role}"
            )
        if expected is not None:
            expected = "assistant" if role == "user" else "user"
        has_assistant |= role == "assistant"
    if not has_assistant and not problems:
        problems.append(f"{where}: no assistant message, so nothing to learn from; add one")
    return problems


def _nonempty_str(obj: dict, key: str, where: str, required: bool = True) -> list[str]:
    v = obj.get(key)
    if v is None and not required:
        return []
    if not isinstance(v, str):
        return [f"{where}: `{key}` must be a string, got {type(v).__name__}"]
    if required and not v.strip():
        return [f"{where}: `{key}` is empty"]
    return []


def parse_record(
    obj: Any, where: str, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[Record | None, list[str]]:
    """Validate one decoded value and convert it to a `Record`; returns (record, problems)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    if columns:
        obj = {**obj, **{canon: obj[src] for canon, src in columns.items() if src in obj}}
    kind = detect_format(obj) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        return None, [
            f"{where}: no known fields (found: {keys}); expected one of text, prompt+completion, "
            "instruction+output, conversations, messages, or map yours with data.columns"
        ]
    if kind == "text":
        problems = _nonempty_str(obj, "text", where)
        return (None, problems) if problems else (Record(where, text=obj["text"]), [])
    if kind == "prompt_completion":
        prompt, completion = _maybe_json(obj.get("prompt")), _maybe_json(obj.get("completion"))
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt-completion
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                return None, [f"{where}: `prompt` and `completion` must both be strings or both lists of messages"]
            problems = _check_messages(prompt + completion, where, "prompt+completion")
            return (None, problems) if problems else (Record(where, messages=prompt + completion), [])
        problems = _nonempty_str(obj, "prompt", where, required=False) + _nonempty_str(obj, "completion", where)
        if "prompt" not in obj:
            problems.insert(0, f"{where}: missing `prompt`")
        return (None, problems) if problems else (Record(where, prompt=prompt, completion=completion), [])
    if kind == "alpaca":
        problems = (
            _nonempty_str(obj, "instruction", where)
            + _nonempty_str(obj, "input", where, required=False)
            + _nonempty_str(obj, "output", where)
        )
        if problems:
            return None, problems
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input", "").strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        return Record(where, messages=msgs), []
    if kind == "sharegpt":
        conv = _maybe_json(obj.get("conversations"))
        if not isinstance(conv, list) or not conv:
            return None, [f"{where}: `conversations` must be a non-empty list of {{from, value}} objects"]
        msgs, problems = [], []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                problems.append(f"{where}: conversations[{i}] must be an object with `from` and `value`")
                continue
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                problems.append(
                    f"{where}: conversations[{i}]: unknown speaker {turn['from']!r}; "
                    f"use one of {', '.join(sorted(SHAREGPT_ROLES))}"
                )
                continue
            msgs.append({"role": role, "content": turn["value"]})
        if problems:
            return None, problems
        problems = _check_messages(msgs, where, "conversations")
        return (None, problems) if problems else (Record(where, messages=msgs), [])
    if kind == "messages":
        msgs = _maybe_json(obj.get("messages"))
        problems = _check_messages(msgs, where)
        return (None, problems) if problems else (Record(where, messages=msgs), [])
    return None, [f"{where}: unknown data.format {fmt!r}; use auto or one of {', '.join(FORMATS)}"]
