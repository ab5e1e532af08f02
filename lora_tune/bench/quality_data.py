"""The quality benchmark's tasks, built reproducibly from real data that ships inside a PyPI wheel.

gensim 4.3.3's wheel carries small public corpora as test data. We read four of them straight out of
the wheel (it is never installed, and nothing in it is run):

- `newsgroups`: 200 Usenet posts from alt.atheism and sci.space (the 20 Newsgroups corpus). Long inputs
  (a post's body, about 150-250 tokens), a one- or two-token answer: classification, scored by macro-F1.
- `sentiment`: 200 movie-review sentences with their polarity (Pang & Lee): short inputs, one-token
  answers; classification, macro-F1.
- `analogy`: word analogies from Mikolov et al.'s questions-words.txt (capitals, currencies, US states,
  family, nine grammatical relations): closed-form QA with one-to-three-token answers, scored by exact
  match. The held-out questions ask about word pairs that no training question contains.
- `news`: 299 Australian Broadcasting Corporation news stories (the Lee corpus): plain text for
  continued pre-training, scored by strided perplexity on 49 held-out stories.

The mini_newsgroup file is a pickle; it is read with `pickletools.genops`, which lists a pickle's
opcodes and their arguments without building any object, so no code in it can run.
"""

from __future__ import annotations

import hashlib
import json
import pickletools
import random
import re
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from lora_tune.atomic import atomic_write_text
from lora_tune.errors import LoraTuneError

WHEEL = "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
PIP_ARGS = ["gensim==4.3.3", "--no-deps", "--only-binary=:all:", "--python-version", "3.11"]
PIP_ARGS += ["--platform", "manylinux_2_17_x86_64", "--implementation", "cp"]
SOURCES = {  # file in the wheel -> its SHA-256, so a different file is an error, not a different benchmark
    "gensim/test/test_data/mini_newsgroup": "be0084ee9aded5eeefabea86bd23f0e5e3a743d9c1875aa1e47bc0728d6a5311",
    "gensim/test/test_data/pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
    "gensim/test/test_data/questions-words.txt": "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
    "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}


@dataclass(frozen=True)
class Task:
    """One benchmark task: its files, how it is scored, and how long both tools train on it."""

    name: str
    kind: str  # classification | qa | text
    metric: str  # macro_f1 | exact_match | text_perplexity
    steps: int
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 8

    def files(self, root: Path) -> tuple[Path, Path]:
        return root / f"{self.name}-train.jsonl", root / f"{self.name}-test.jsonl"


TASKS = (
    Task("newsgroups", "classification", "macro_f1", 30, ("atheism", "space")),
    Task("sentiment", "classification", "macro_f1", 30, ("negative", "positive")),
    Task("analogy", "qa", "exact_match", 40),
    Task("news", "text", "text_perplexity", 24),
)


def fetch_wheel(cache: Path) -> Path:
    """gensim's wheel in `cache`, downloaded from PyPI by pip the first time."""
    wheel = cache / WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(cache), *PIP_ARGS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            raise LoraTuneError(
                f"could not download {WHEEL} from PyPI ({proc.stderr.strip()[-300:]}); "
                f"download it by hand with `pip download {' '.join(PIP_ARGS)}` into {cache}"
            )
    return wheel


def read_sources(wheel: Path) -> dict[str, bytes]:
    """The four data files, each checked against its recorded SHA-256."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name, digest in SOURCES.items():
            data = z.read(name)
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise LoraTuneError(f"{wheel}:{name} has SHA-256 {got}, not {digest}: a different file")
            out[name.rsplit("/", 1)[1]] = data
    return out


def newsgroup_posts(blob: bytes) -> list[tuple[str, str]]:
    """(group, post) pairs from the mini_newsgroup pickle, read opcode by opcode (nothing is unpickled).

    The posts are its unicode strings in order; the groups are the folder names in its `filenames`
    array: one fixed-width byte string (the width is named by an earlier `S47`), a name per post."""
    ops = list(pickletools.genops(zlib.decompress(blob)))
    posts = [arg for op, arg, _ in ops if op.name == "UNICODE"]
    names = [arg for op, arg, _ in ops if op.name in ("STRING", "SHORT_BINSTRING", "BINSTRING")]
    width = int(next(n for n in names if re.fullmatch(r"S\d+", n))[1:])
    paths = next((n for n in names if len(n) == width * len(posts)), None)
    if paths is None:
        longest = max(names, key=len)
        raise LoraTuneError(f"mini_newsgroup: {len(posts)} posts but {len(longest) // width} file names")
    groups = [paths[i : i + width].rstrip("\0").split("/")[-2] for i in range(0, len(paths), width)]
    return list(zip(groups, posts, strict=True))


def _wordy(line: str) -> bool:
    return sum(c.isalnum() or c.isspace() for c in line) >= 0.7 * len(line)


def post_body(post: str, max_chars: int = 520) -> str:
    """The body of a Usenet post (headers and symbol-art lines dropped), cut at a line end near `max_chars`."""
    body = post.split("\n\n", 1)[1] if "\n\n" in post else post
    # lines that are mostly symbols (signature art, rulers) cost many tokens and say nothing
    lines = [
        ln.rstrip() for ln in body.strip().splitlines() if sum(c.isalnum() or c.isspace() for c in ln) >= 0.7 * len(ln)
    ]
    out, size = [], 0
    for ln in lines:
        if size + len(ln) > max_chars and out:
            break
        out.append(ln)
        size += len(ln) + 1
    return "\n".join(out).strip()[:max_chars]


def stratified_split(items: list, key, n_test: int, seed: int) -> tuple[list, list]:
    """Shuffle, then take the same share of every class for the test set."""
    rng = random.Random(seed)
    by: dict = {}
    for it in items:
        by.setdefault(key(it), []).append(it)
    train, test = [], []
    for k in sorted(by):
        group = by[k]
        rng.shuffle(group)
        t = round(n_test * len(group) / len(items))
        test += group[:t]
        train += group[t:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def build_newsgroups(blob: bytes, seed: int = 0) -> tuple[list[dict], list[dict]]:
    short = {"alt.atheism": "atheism", "sci.space": "space"}
    pairs = [(short[g], post_body(p)) for g, p in newsgroup_posts(blob)]
    train, test = stratified_split(pairs, lambda x: x[0], 70, seed)
    ask = "Which newsgroup was this post written for? Answer atheism or space.\n\n"
    return [chat(ask + body, label) for label, body in train], [chat(ask + body, label) for label, body in test]


def build_sentiment(blob: bytes, seed: int = 0) -> tuple[list[dict], list[dict]]:
    pairs = []
    for line in blob.decode("latin-1").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            pairs.append(({"__label__pos": "positive", "__label__neg": "negative"}[label], text.strip()))
    train, test = stratified_split(pairs, lambda x: x[0], 70, seed)
    ask = "Is this movie review positive or negative?\n\n"
    return [chat(ask + t, label) for label, t in train], [chat(ask + t, label) for label, t in test]


def build_analogy(
    blob: bytes, per_category: int = 60, test_per_category: int = 20, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Held-out by word pair: a test question's (c, d) pair is in no training question, as either pair."""
    rng = random.Random(seed)
    cats: dict[str, list[list[str]]] = {}
    cat = ""
    for line in blob.decode().splitlines():
        if line.startswith(":"):
            cat = line[1:].strip()
        elif line.strip():
            cats.setdefault(cat, []).append(line.split())
    train, test = [], []
    for name in sorted(cats):
        qs = cats[name]
        pairs = sorted({(c, d) for _, _, c, d in qs})
        rng.shuffle(pairs)
        held = set(pairs[: max(len(pairs) // 4, 2)])
        held_q = [q for q in qs if (q[2], q[3]) in held and (q[0], q[1]) not in held]
        train_q = [q for q in qs if (q[2], q[3]) not in held and (q[0], q[1]) not in held]
        rng.shuffle(held_q)
        rng.shuffle(train_q)
        test += held_q[:test_per_category]
        train += train_q[: per_category - test_per_category]
    rng.shuffle(train)
    rng.shuffle(test)

    def record(q: list[str]) -> dict:
        a, b, c, d = q
        return chat(f"Complete the analogy with one word.\n{a} is to {b} as {c} is to", d)

    return [record(q) for q in train], [record(q) for q in test]


def sentence_chunks(text: str, max_chars: int) -> list[str]:
    """`text` cut at sentence ends into pieces of at most about `max_chars` characters."""
    sentences = re.split(r"(?<=[.!?\"])\s+", text.strip())
    out, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > max_chars:
            out.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}".strip()
    return out + ([cur] if cur else [])


def build_news(blob: bytes, n_test: int = 49, max_chars: int = 900) -> tuple[list[dict], list[dict]]:
    """The first stories for training, cut into pieces that fit 256 tokens (neither tool truncates);
    the last `n_test` whole stories held out."""
    docs = [d.strip() for d in blob.decode().splitlines() if d.strip()]
    train = [{"text": piece} for d in docs[:-n_test] for piece in sentence_chunks(d, max_chars)]
    return train, [{"text": d} for d in docs[-n_test:]]


BUILDERS = {
    "newsgroups": ("mini_newsgroup", build_newsgroups),
    "sentiment": ("pang_lee_polarity.cor", build_sentiment),
    "analogy": ("questions-words.txt", build_analogy),
    "news": ("lee_background.cor", build_news),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_tasks(out: Path, cache: Path) -> dict[str, dict]:
    """Write every task's train/test JSONL under `out`; returns {task: {split: (rows, sha256)}}."""
    sources = read_sources(fetch_wheel(cache))
    summary = {}
    for task in TASKS:
        source, build = BUILDERS[task.name]
        train, test = build(sources[source])
        train_file, test_file = task.files(out)
        write_jsonl(train_file, train)
        write_jsonl(test_file, test)
        summary[task.name] = {"train": len(train), "test": len(test)}
    return summary
