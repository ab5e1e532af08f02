"""Generation: batched and KV-cached with left padding, using the tokenizer's (training) chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lora_tune.data.templates import end_markers
from lora_tune.progress import item_progress
from lora_tune.runtime import evaluating


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        sample = self.temperature > 0
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sample,
            "temperature": self.temperature if sample else None,
            "top_p": self.top_p if sample else None,
            "top_k": None,
            "repetition_penalty": self.repetition_penalty,
        }


def stop_ids(tok) -> list[int]:
    """EOS and every end-of-turn token the tokenizer knows: generation stops at any of them."""
    ids = {tok.convert_tokens_to_ids(t) for t in end_markers(tok)}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def prompt_text(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_texts(
    model, tok, prompts: list[str] | list[list[int]], sampling: Sampling, batch_size: int = 8
) -> tuple[list[str], float]:
    """Complete prompts (rendered text, or token ids) in left-padded batches; returns (texts, new tokens/s).

    A progress bar shows on a terminal. On an out-of-memory error the batch is halved and retried.
    """
    side = tok.padding_side
    tok.padding_side = "left"  # new tokens must follow each prompt directly
    outs: list[str] = []
    new_tokens, t0, lo = 0, time.perf_counter(), 0
    try:
        with evaluating(model), item_progress("generating", len(prompts)) as advance:
            while lo < len(prompts):
                try:
                    texts, n = _generate_batch(model, tok, prompts[lo : lo + batch_size], sampling)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    texts = None
                if texts is None:  # out of memory: free the failed batch's cache (outside `except`), halve
                    batch_size //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                outs += texts
                new_tokens += n
                lo += len(texts)
                advance(len(texts))
    finally:
        tok.padding_side = side
    return outs, new_tokens / max(time.perf_counter() - t0, 1e-9)


def _generate_batch(model, tok, prompts, sampling: Sampling) -> tuple[list[str], int]:
    device = next(model.parameters()).device
    ids = [p if isinstance(p, list) else tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(
        **enc, **sampling.kwargs(), use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(tok)
    )
    gen = out[:, enc["input_ids"].shape[1] :]
    stops = torch.tensor(stop_ids(tok), device=gen.device)
    texts, new_tokens = [], 0
    for row in gen:
        ended = torch.isin(row, stops).nonzero()
        n = int(ended[0]) + 1 if len(ended) else len(row)
        new_tokens += n
        texts.append(tok.decode(row[:n], skip_special_tokens=True).strip())
    return texts, new_tokens


def generate_reply(model, tok, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The assistant's reply to one conversation."""
    texts, _ = generate_texts(model, tok, [prompt_text(tok, messages)], Sampling(max_new_tokens, temperature))
    return texts[0]


def stream_reply(model, tok, messages: list[dict], sampling: Sampling, emit) -> str:
    """Generate one reply, passing text pieces to `emit(text, nl=False)` as they come; returns the reply."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    enc = tok(prompt_text(tok, messages), return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **enc,
        **sampling.kwargs(),
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=stop_ids(tok),
        streamer=streamer,
    )
    failed: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as e:  # handed to the caller below; the streamer must still be ended
            failed.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        emit(piece, nl=False)
    thread.join()
    emit("")
    if failed:
        raise RuntimeError(f"generation failed: {type(failed[0]).__name__}: {failed[0]}") from failed[0]
    return "".join(pieces).strip()


def trim_history(tok, messages: list[dict], context: int, max_new_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest user/assistant exchanges (never the system message or the newest turn) until the
    prompt and the reply fit in `context` tokens; returns (messages, exchanges dropped)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while len(turns) > 1:
        n = len(tok(prompt_text(tok, system + turns), add_special_tokens=False)["input_ids"])
        if n + max_new_tokens <= context:
            break
        turns = turns[2:]  # one user turn and the assistant reply to it
        dropped += 1
    return system + turns, dropped
