"""The engine: one thread owns the model and runs every live sequence in one batch, step by step.

Continuous batching: a request that arrives while others are generating is prefilled on its own (with
the other newcomers), and its KV cache is joined to the running batch's, left-padded to the same length;
from the next step on it decodes together with the rest. Sequences that finish leave the batch at once.
Each row names its adapter (peft's mixed-adapter batches, `adapter_names=`), so requests for different
adapters, and for the base, share one forward pass.

Requests wait in a bounded queue; when it is full, `submit` raises QueueFull (the API answers 503).
A sequence whose client has gone away, or whose deadline has passed, is dropped between two steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lora_tune.errors import LoraTuneError
from lora_tune.server.adapters import AdapterBusy, AdapterSet
from lora_tune.server.decode import RowSampling, TextTracker, next_tokens


class QueueFull(Exception):
    """No room in the waiting queue."""


@dataclass
class Piece:
    """New text of a sequence."""

    text: str


@dataclass
class Finished:
    """A sequence ended: finish_reason is "stop" (end token or stop string) or "length"."""

    reason: str
    completion_tokens: int


@dataclass
class Failed:
    """A sequence could not be completed; `status` is the HTTP status the API answers with."""

    message: str
    status: int = 500
    code: str | None = None


Event = Piece | Finished | Failed


@dataclass
class Job:
    """One sequence to generate (one `choice` of a request)."""

    model: str  # a model id the AdapterSet knows (the base's id or an adapter's name)
    prompt: list[int]
    max_new_tokens: int
    sampling: RowSampling
    stop_ids: frozenset[int]
    text: TextTracker
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it fails with a timeout
    generated: int = 0  # tokens sampled, the end token included
    done: bool = False


@dataclass
class Stats:
    steps: int = 0
    prefills: int = 0
    sequences: int = 0
    finished: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    max_batch_seen: int = 0
    max_models_in_a_step: int = 0  # distinct adapters (the base counts as one) in one forward pass
    tokens_generated: int = 0


class Batch:
    """The running rows: their KV cache, attention mask, next positions and last tokens."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, T] over the cache's positions
        self.pos: torch.Tensor | None = None  # [B] position id of each row's next token
        self.last: torch.Tensor | None = None  # [B] the token each row feeds next

    def __len__(self) -> int:
        return len(self.jobs)

    def join(self, other: Batch) -> None:
        """Append `other`'s rows, left-padding the shorter cache so both have the same length."""
        if not self.jobs:
            self.jobs, self.cache, self.mask, self.pos, self.last = (
                other.jobs, other.cache, other.mask, other.pos, other.last,
            )  # fmt: skip
            return
        from transformers import DynamicCache

        t = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (
                torch.cat([_pad_left(k1, t, 2), _pad_left(k2, t, 2)]),
                torch.cat([_pad_left(v1, t, 2), _pad_left(v2, t, 2)]),
            )
            for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, other.cache, strict=True)
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_pad_left(self.mask, t, 1), _pad_left(other.mask, t, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])
        self.jobs = self.jobs + other.jobs

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, and cut the cache columns that are padding in every remaining row."""
        from transformers import DynamicCache

        if not rows:
            self.__init__()
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).int().argmax())  # first column some row attends to
        self.cache = DynamicCache(ddp_cache_data=[(k[idx, :, start:], v[idx, :, start:]) for k, v, *_ in self.cache])
        self.mask, self.pos, self.last = mask[:, start:], self.pos[idx], self.last[idx]
        self.jobs = [self.jobs[i] for i in rows]


def cache_keyword(model) -> str:
    """The forward argument (and output field) for the KV cache: `cache` in newer transformers 5.x."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _pad_left(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Engine:
    """Owns the model; `submit` jobs from any thread, `start()` the loop, `stop()` it."""

    def __init__(self, adapters: AdapterSet, max_batch: int = 8, max_queue: int = 64):
        self.adapters = adapters
        self.max_batch = max(1, max_batch)
        self.max_queue = max(1, max_queue)
        self.device = next(adapters.model.parameters()).device
        self._cache_kw = cache_keyword(adapters.model)
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch = Batch()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue the sequences of one request together, or raise QueueFull (an empty queue takes any request)."""
        with self._wake:
            if self._waiting and len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull
            self._waiting.extend(jobs)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        return {"running": len(self._batch), "waiting": len(self._waiting), "max_batch": self.max_batch}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lora-tune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._batch.jobs:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # never lose the loop: fail what was running and go on serving
                logging.getLogger("lora_tune.server").exception("generation step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}", 500)
        self._fail_all("the server is shutting down", 503)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting sequences (one prefill), then one decode step for every running sequence."""
        newcomers = self._admit()
        if newcomers:
            try:
                self._batch.join(self._prefill(newcomers))
            except torch.OutOfMemoryError:
                self._release_oom(newcomers)
        self._drop_finished()
        if self._batch.jobs:
            try:
                self._decode()
            except torch.OutOfMemoryError:
                self._release_oom(list(self._batch.jobs))
                self._batch.keep([])
            self._drop_finished()

    def _admit(self) -> list[Job]:
        taken: list[Job] = []
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        kept: list[Job] = []
        now = time.monotonic()
        for job in waiting:
            if job.cancelled.is_set():
                self.stats.cancelled += 1
                continue
            if now > job.deadline:
                self._fail(job, "timed out waiting for a free slot", 504, "timeout", release=False)
                continue
            if len(self._batch) + len(taken) >= self.max_batch:
                kept.append(job)
                continue
            try:
                self.adapters.acquire(job.model)
            except AdapterBusy:
                kept.append(job)  # waits until a running sequence frees an adapter slot
                continue
            except LoraTuneError as e:
                self._fail(job, str(e), 400, "model_not_available", release=False)
                continue
            taken.append(job)
        with self._wake:
            self._waiting.extendleft(reversed(kept))
        return taken

    def _forward(self, jobs: list[Job], **inputs):
        names = [self.adapters.peft_name(j.model) for j in jobs]
        self.stats.max_models_in_a_step = max(self.stats.max_models_in_a_step, len(set(names)))
        if self.adapters.prepare(names):
            inputs["adapter_names"] = names
        return self.adapters.model(**inputs, use_cache=True)

    def _prefill(self, jobs: list[Job]) -> Batch:
        width = max(len(j.prompt) for j in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt) :] = torch.tensor(j.prompt)
            mask[i, width - len(j.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        from transformers import DynamicCache

        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._forward(
            jobs,
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,
            **{self._cache_kw: DynamicCache()},
        )
        self.stats.prefills += 1
        self.stats.sequences += len(jobs)
        batch = Batch()
        batch.jobs, batch.cache, batch.mask = jobs, out[self._cache_kw], mask
        batch.pos = mask.sum(1)
        batch.last = self._take(jobs, out.logits[:, -1])
        return batch

    def _decode(self) -> None:
        b = self._batch
        mask = torch.cat([b.mask, b.mask.new_ones(len(b), 1)], dim=1)
        out = self._forward(
            b.jobs,
            input_ids=b.last[:, None],
            attention_mask=mask,
            position_ids=b.pos[:, None],
            **{self._cache_kw: b.cache},
        )
        b.cache, b.mask, b.pos = out[self._cache_kw], mask, b.pos + 1
        b.last = self._take(b.jobs, out.logits[:, -1])
        self.stats.steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(b))

    def _take(self, jobs: list[Job], logits: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token and pass its new text on; a finished row is marked for removal."""
        tokens = next_tokens(logits, [j.sampling for j in jobs])
        for job, token in zip(jobs, tokens, strict=True):
            if job.done:
                continue
            self.stats.tokens_generated += 1
            job.generated += 1
            if token in job.stop_ids:  # counted as generated, never shown
                self._finish(job, "stop", job.text.finish())
                continue
            piece, stopped = job.text.add(token)
            if piece:
                job.emit(Piece(piece))
            if stopped:
                self._finish(job, "stop", "")
            elif job.generated >= job.max_new_tokens:
                self._finish(job, "length", job.text.finish())
        return torch.tensor(tokens, device=self.device)

    def _finish(self, job: Job, reason: str, rest: str) -> None:
        if rest:
            job.emit(Piece(rest))
        job.emit(Finished(reason, job.generated))
        job.done = True
        self.stats.finished += 1

    def _drop_finished(self) -> None:
        b, now, rows = self._batch, time.monotonic(), []
        for i, job in enumerate(b.jobs):
            if not job.done and job.cancelled.is_set():
                self.stats.cancelled += 1
                job.done = True
            elif not job.done and now > job.deadline:
                job.emit(Failed("the request timed out", 504, "timeout"))
                self.stats.timed_out += 1
                job.done = True
            if job.done:
                self.adapters.release(job.model)
            else:
                rows.append(i)
        if len(rows) < len(b):
            b.keep(rows)

    def _fail(self, job: Job, message: str, status: int, code: str | None, release: bool = True) -> None:
        job.emit(Failed(message, status, code))
        job.done = True
        self.stats.failed += 1
        if release:
            self.adapters.release(job.model)

    def _release_oom(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.done:
                self._fail(job, "the server ran out of memory; retry with a shorter prompt or fewer tokens", 503)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _fail_all(self, message: str, status: int) -> None:
        for job in self._batch.jobs:
            if not job.done:
                self._fail(job, message, status, None)
        self._batch.keep([])
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            self._fail(job, message, status, None, release=False)
