"""The HTTP layer: OpenAI's routes, Bearer-token auth, a body-size limit, and OpenAI-shaped errors.

Routes only translate: a request becomes token ids and `Job`s for the engine, the engine's events
become a JSON response or server-sent-event chunks. Every error, including a bad body or an unknown
route, is answered as `{"error": {"message", "type", "param", "code"}}`; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from lora_tune.evaluate.generate import stop_ids
from lora_tune.server.adapters import AdapterSet
from lora_tune.server.dashboard.routes import add_dashboard_routes
from lora_tune.server.dashboard.routes import is_open as dashboard_page
from lora_tune.server.decode import RowSampling, TextTracker
from lora_tune.server.inference import Engine, Failed, Finished, Job, Piece, QueueFull
from lora_tune.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    new_id,
    usage,
    usage_chunk,
)

log = logging.getLogger("lora_tune.server")
OPEN_PATHS = ("/health",)  # answered without an API key


@dataclass
class Limits:
    """What one request may ask for."""

    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_upload_bytes: int = 512 * 2**20  # POST /v1/files
    request_timeout: float = 600.0  # seconds from arrival to the last token
    default_max_tokens: int = 512  # when a request gives no max_tokens (always capped by the context)


def create_app(engine: Engine, adapters: AdapterSet, limits: Limits, context: int, jobs=None, runs=None):
    """The FastAPI app over a started (or soon started) engine; `context` is the base's context length.
    With a `JobService`, the files and fine-tuning jobs routes too; with a `RunsFolder`, the dashboard."""
    app = FastAPI(title="lora-tune serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        body = ApiError(500, f"internal error ({type(e).__name__}); the server keeps running", "server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/stats")
    async def stats():
        return {**asdict(engine.stats), **engine.load(), "adapters_loaded": adapters.loaded_names()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": _cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in _cards():
            if card["id"] == model_id:
                return card
        raise _unknown_model(model_id)

    def _cards() -> list[dict]:
        base = {"kind": "base", "served_on": adapters.served.label, "context_length": context}
        cards = [model_card(adapters.base_id, started, None, base)]
        for name, path in adapters.known().items():
            cards.append(model_card(name, int(path.stat().st_mtime), adapters.base_id, adapters.describe(name, path)))
        return cards

    def _unknown_model(name: str) -> ApiError:
        ids = [adapters.base_id, *adapters.known()]
        return ApiError(404, f"model {name!r} does not exist; models here: {', '.join(ids)}", param="model",
                        code="model_not_found")  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatRequest, await _json(request))
        tok, name = await asyncio.to_thread(_tokenizer, req.model)
        try:
            text = tok.apply_chat_template(req.chat(), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # no template, or one that rejects this order of roles
            raise ApiError(400, f"the chat template of {req.model!r} can't render these messages: {e}",
                           param="messages") from None  # fmt: skip
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        return await _run(request, req, name, tok, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _json(request))
        tok, name = await asyncio.to_thread(_tokenizer, req.model)
        prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in req.prompts()]
        return await _run(request, req, name, tok, prompts, chat=False)

    def _tokenizer(model: str):
        tok = adapters.tokenizer(model)  # one lookup of the adapters (folder listing, jobs' models)
        if tok is None:
            raise _unknown_model(model)
        return tok, model

    async def _run(request: Request, req, name: str, tok, prompts: list[list[int]], chat: bool):
        req.refuse_unsupported()
        stops, limit = req.stops(), req.limit() if chat else req.max_tokens
        ends = frozenset(stop_ids(tok))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        cancel = threading.Event()
        deadline = time.monotonic() + limits.request_timeout
        jobs = []
        for p, prompt in enumerate(prompts):
            room = context - len(prompt)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; {req.model!r} takes at most {context} "
                               "tokens in all (prompt + reply)", param="messages" if chat else "prompt",
                               code="context_length_exceeded")  # fmt: skip
            for k in range(req.n):
                index = p * req.n + k
                seed = None if req.seed is None else req.seed + index
                jobs.append(Job(
                    model=name, prompt=prompt, max_new_tokens=min(limit or limits.default_max_tokens, room),
                    sampling=RowSampling.make(req.temperature, req.top_p, seed, engine.device),
                    stop_ids=ends, text=TextTracker(tok, stops), cancelled=cancel, deadline=deadline,
                    emit=lambda ev, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)),
                ))  # fmt: skip
        try:
            engine.submit(jobs)
        except QueueFull:
            raise ApiError(503, "the server is busy (its queue is full); retry shortly", "server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None  # fmt: skip
        rid, n_prompt = new_id("chatcmpl" if chat else "cmpl"), sum(len(p) for p in prompts)
        if req.stream:
            events = _stream(queue, len(jobs), cancel, rid, req.model, chat, n_prompt, req.include_usage())
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons, tokens = await _collect(request, queue, len(jobs), cancel)
        make = chat_response if chat else completion_response
        return make(rid, req.model, texts, reasons, usage(n_prompt, sum(tokens)))

    if jobs is not None:
        from lora_tune.server.jobs_api import add_job_routes

        add_job_routes(app, jobs, _json)
    if runs is not None:
        add_dashboard_routes(app, runs)
    return app


async def _json(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param=param) from None
        raise ApiError(422, f"{param}: {err['msg']}", param=param, code=err["type"]) from None


def _failure(ev: Failed) -> ApiError:
    kind = "invalid_request_error" if ev.status < 500 else "timeout" if ev.status == 504 else "server_error"
    return ApiError(ev.status, ev.message, kind, code=ev.code)


async def _collect(request, queue: asyncio.Queue, n: int, cancel) -> tuple[list[str], list[str], list[int]]:
    """Wait for every choice; a client that goes away cancels the work."""
    texts, reasons, tokens, left = [""] * n, [""] * n, [0] * n, n
    checked = time.monotonic()
    try:
        while left:
            if time.monotonic() - checked > 0.25:  # a few times a second, whether or not tokens arrive
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the connection")
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                continue
            if isinstance(ev, Piece):
                texts[i] += ev.text
            elif isinstance(ev, Finished):
                reasons[i], tokens[i], left = ev.reason, ev.completion_tokens, left - 1
            else:
                raise _failure(ev)
    finally:
        cancel.set()  # stops any choice still running (after a failure or a disconnect); no-op when done
    return texts, reasons, tokens


async def _stream(queue, n: int, cancel, rid: str, model: str, chat: bool, n_prompt: int, with_usage: bool
                  ) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    left, tokens = n, 0
    try:
        if chat:
            for i in range(n):
                yield sse(chat_chunk(rid, model, i, {"role": "assistant", "content": ""}))
        while left:
            i, ev = await queue.get()
            if isinstance(ev, Piece):
                yield sse(chat_chunk(rid, model, i, {"content": ev.text}) if chat
                          else completion_chunk(rid, model, i, ev.text))  # fmt: skip
            elif isinstance(ev, Finished):
                left, tokens = left - 1, tokens + ev.completion_tokens
                yield sse(chat_chunk(rid, model, i, {}, ev.reason) if chat
                          else completion_chunk(rid, model, i, "", ev.reason))  # fmt: skip
            else:
                yield sse(_failure(ev).body())
                return
        if with_usage:
            yield sse(usage_chunk(rid, model, "chat.completion.chunk" if chat else "text_completion",
                                  usage(n_prompt, tokens)))  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away (the generator is closed early) or all is done


class Guard:
    """ASGI middleware: the Bearer key on every route but /health, and the request body size limits
    (a larger one for file uploads)."""

    def __init__(self, app, limits: Limits):
        self.app, self.api_key = app, limits.api_key
        self.max_body, self.max_upload = limits.max_body_bytes, limits.max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and not (scope["path"] in OPEN_PATHS or dashboard_page(scope["path"])):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "invalid or missing API key; send it as 'Authorization: Bearer KEY'"
                return await _send_error(send, ApiError(401, msg, code="invalid_api_key"))
        limit = self.max_upload if scope["path"] == "/v1/files" else self.max_body
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, self._too_large(limit))
        seen = 0

        async def counting_receive():  # a body sent without (or beyond) its content-length
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit)  # answered by the app's ApiError handler
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self, limit: int) -> ApiError:
        return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _send_error(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
