"""Per-sequence decoding state: the next token from a row of logits, and the text seen so far.

Every sequence in a batch has its own sampling settings and its own random generator, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowSampling:
    """One sequence's sampling settings; temperature 0 is greedy (argmax, as `generate` does)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def make(cls, temperature: float, top_p: float, seed: int | None, device: torch.device) -> RowSampling:
        if temperature <= 0:
            return cls(0.0, 1.0, None)
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()  # a fresh non-deterministic seed, like an unseeded OpenAI request
        else:
            gen.manual_seed(seed)
        return cls(temperature, top_p, gen)


def next_tokens(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """One token per row of `logits` [B, V], each chosen with its row's settings."""
    picked = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(rows):
        if s.temperature > 0:
            picked[i] = _sample(logits[i].float(), s)
    return picked


def _sample(logits: torch.Tensor, s: RowSampling) -> int:
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=s.generator))


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (so are not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class TextTracker:
    """The text of one generated sequence, released in pieces that never need taking back.

    The whole output is decoded again after every token (a few microseconds) rather than token by token,
    so multi-token characters and the tokenizer's space clean-up come out exactly as one final decode.
    Text that might be the start of a stop string, or half of a UTF-8 character, waits for the next token.
    """

    tok: object
    stops: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: str = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text to send, whether a stop string has now ended the text)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        if cut is not None:
            return self._release(text[:cut]), True
        safe = text.rstrip("\ufffd")
        return self._release(safe[: len(safe) - held_back(safe, self.stops)]), False

    def finish(self) -> str:
        """The rest of the text once the sequence has ended (by EOS or length)."""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        return self._release(text if cut is None else text[:cut])

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        piece, self.sent = upto[len(self.sent) :], upto
        return piece
