"""OpenAI's request and response shapes for the routes we serve, and its error shape.

Requests are pydantic models: a wrong type or range is a 422 naming the field. OpenAI parameters we do
not implement are accepted at their default value (clients send some of them always) and refused, with a
400 naming the parameter, at any other value. Unknown fields are refused as OpenAI refuses them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request
MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are accepted and unused
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # accepted only at their defaults
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    _unsupported: ClassVar[dict[str, tuple]] = {}

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self) -> None:
        defaults = {"presence_penalty": (0.0, None), "frequency_penalty": (0.0, None), "logit_bias": (None, {})}
        defaults |= {"logprobs": (None, False, 0)} | self._unsupported
        for name, allowed in defaults.items():
            if getattr(self, name) not in allowed:
                raise ApiError(400, f"{name} is not supported by lora-tune serve; leave it unset", param=name)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    modalities: list[str] | None = None

    _unsupported: ClassVar[dict[str, tuple]] = {
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
    }

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: text only, `developer` read as `system`."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                parts = [p for p in m.content if p.type != "text" or p.text is None]
                if parts:
                    raise ApiError(
                        400, f"messages[{i}]: only text content is supported, not {parts[0].type!r}", param="messages"
                    )
                text = "".join(p.text for p in m.content)
            else:
                text = m.content or ""
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    _unsupported: ClassVar[dict[str, tuple]] = {"echo": (False,), "best_of": (None, 1), "suffix": (None, "")}

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ----------------------------------------------------------------------------------------------------
# Responses (plain dicts in OpenAI's shapes)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": reason,
            "logprobs": None,
        }
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}  # fmt: skip


def chat_chunk(rid: str, model: str, index: int, delta: dict, reason: str | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


def completion_response(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict[str, Any]:
    choices = [
        {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}  # fmt: skip


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def model_card(model_id: str, created: int, parent: str | None, details: dict[str, Any]) -> dict[str, Any]:
    """One entry of GET /v1/models; lora_tune's own facts go under `lora_tune`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lora_tune", "parent": parent,
            "lora_tune": details}  # fmt: skip
