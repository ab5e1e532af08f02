"""Deterministic data builders for the recipes.

Each builder reads a pinned source archive (see `sources.py`) or text written here and writes
`train.jsonl`, `val.jsonl` and `test.jsonl` (raw text as `{"text": ...}` records) plus `manifest.json`
(counts, SHA-256 of every file, sources and licences) into a folder. The same inputs give the same
bytes: splits come from hashes of the content, samples from seeded RNGs, and records keep source order.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import random
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.atomic import atomic_write_text, sha256_of
from lora_tune.recipes import support_data
from lora_tune.recipes.sources import SOURCES, fetch


@dataclass
class Built:
    files: dict[str, int]  # file name -> records
    sources: list[str]  # where the data came from, with licences


def bucket(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for `key`: the split never depends on file order or Python's hash seed."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_key(items: Iterable[Any], key: Callable[[Any], str], val: float, test: float) -> dict[str, list]:
    """Split into train/val/test by a hash of each item's key (equal keys always land together)."""
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for item in items:
        b = bucket(key(item))
        out["test" if b < test else "val" if b < test + val else "train"].append(item)
    return out


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def _finish(out: Path, parts: dict[str, list], sources: list[str]) -> Built:
    """Write each part as `<part>.jsonl` and the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, int] = {}
    for name, rows in parts.items():
        write_jsonl(out / f"{name}.jsonl", rows)
        files[f"{name}.jsonl"] = len(rows)
    manifest = {
        "files": {f: {"records": n, "sha256": sha256_of(out / f)} for f, n in files.items()},
        "sources": sources,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Built(files, sources)


def chat_record(system: str, user: str, assistant: str, **extra: str) -> dict:
    """A three-message chat record (the `messages` format), with any extra fields such as an id."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return {**extra, "messages": [*msgs, {"role": "assistant", "content": assistant}]}


def _cap(rows: list, n: int | None, seed: str) -> list:
    """At most `n` rows, a seeded sample that keeps the original order."""
    if n is None or len(rows) <= n:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def _source_line(name: str) -> str:
    s = SOURCES[name]
    return f"PyPI {s.requirement} ({s.filename}, sha256 {s.sha256[:12]}...): {s.licence}" + (
        f"; {s.note}" if s.note else ""
    )


# ----------------------------------------------------------------------------------------------------
# Customer support (written here + ChatterBot's tech-support pairs)


def build_support_chat(out: Path, params: dict, log=print) -> Built:
    """Multi-turn IT help-desk chats in a fixed house tone: see `support_data` for every phrase."""
    import yaml

    whl = fetch("chatterbot-corpus", log=log)
    with zipfile.ZipFile(whl) as z:
        convs = yaml.safe_load(z.read("chatterbot_corpus/data/english/tech_support.yml"))["conversations"]
    fixes = dict(sorted({(str(c[0]), str(c[1])) for c in convs if len(c) == 2}))
    sizes = (params.get("max_train", 360), params.get("max_val", 40), params.get("max_test", 60))
    parts = support_data.conversations(fixes, *sizes)
    return _finish(
        out,
        parts,
        [
            _source_line("chatterbot-corpus") + " (tech_support.yml: 10 distinct problem/fix pairs)",
            "lora_tune/recipes/support_data.py: company, policies, phrasing and names written for this repo "
            "(Apache-2.0, like lora_tune); the company is fictional",
        ],
    )


# ----------------------------------------------------------------------------------------------------
# Closed-book question answering (ChatterBot corpus)

QA_SYSTEM = "Answer the question briefly, in a few words or one sentence."


def build_chatterbot_qa(out: Path, params: dict, log=print) -> Built:
    """Question/answer pairs from ChatterBot's English knowledge categories, de-duplicated by question."""
    import yaml

    whl = fetch("chatterbot-corpus", log=log)
    categories = params.get("categories", ["trivia", "science", "history", "literature", "movies", "sports"])
    seen: set[str] = set()
    pairs: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(whl) as z:
        for cat in sorted(categories):
            for conv in yaml.safe_load(z.read(f"chatterbot_corpus/data/english/{cat}.yml"))["conversations"]:
                if len(conv) != 2:
                    continue  # multi-turn chit-chat, not a question and its answer
                q, a = (" ".join(str(x).split()) for x in conv)
                if _norm(q) in seen or not a or len(a.split()) > params.get("max_answer_words", 30):
                    continue
                seen.add(_norm(q))
                pairs.append((cat, q, a))
    rows = [chat_record(QA_SYSTEM, q, a) for _, q, a in pairs]
    parts = split_by_key(
        rows, lambda r: _norm(r["messages"][1]["content"]), params.get("val", 0.1), params.get("test", 0.15)
    )
    parts = {k: _cap(v, params.get(f"max_{k}"), k) for k, v in parts.items()}
    return _finish(out, parts, [_source_line("chatterbot-corpus") + f" (categories: {', '.join(sorted(categories))})"])


# ----------------------------------------------------------------------------------------------------
# Sentiment classification (VADER's movie-review snippets)

SENTIMENT_SYSTEM = "Classify the sentiment of the movie review. Answer with one word: positive or negative."
VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def _vader_rows(sdist: Path) -> list[tuple[str, float, str]]:
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as t:
            text = t.extractfile(VADER_MEMBER).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        ident, score, snippet = line.split("\t", 2)
        rows.append((ident, float(score), " ".join(snippet.split())))
    return rows


def build_vader_sentiment(out: Path, params: dict, log=print) -> Built:
    """Balanced positive/negative movie-review snippets; ambiguous ones (|mean rating| < margin) dropped."""
    margin = params.get("margin", 1.0)
    rows = _vader_rows(fetch("vadersentiment-sdist", log=log))
    records = []
    seen: set[str] = set()
    for ident, score, snippet in rows:
        if abs(score) < margin or _norm(snippet) in seen:
            continue
        seen.add(_norm(snippet))
        label = "positive" if score > 0 else "negative"
        records.append(chat_record(SENTIMENT_SYSTEM, snippet, label, id=f"movie-{ident}"))
    parts = split_by_key(records, lambda r: r["id"], params.get("val", 0.1), params.get("test", 0.1))
    balanced = {}
    for name, part in parts.items():
        n = params.get(f"max_{name}")
        by_label = {lab: [r for r in part if r["messages"][-1]["content"] == lab] for lab in ("negative", "positive")}
        half = None if n is None else n // 2
        picked = [r for lab in by_label for r in _cap(by_label[lab], half, f"{name}-{lab}")]
        balanced[name] = sorted(picked, key=lambda r: bucket(r["id"], "order"))  # labels interleaved
    return _finish(out, balanced, [_source_line("vadersentiment-sdist") + f" ({VADER_MEMBER}; |rating| >= {margin})"])


# ----------------------------------------------------------------------------------------------------
# Documentation: summaries and raw text (NetworkX docstrings, read with ast)

SUMMARY_SYSTEM = "Summarize the documentation you are given in one sentence."
_SECTION = re.compile(r"^[=\-~^]{3,}\s*$")


def _docstrings(whl: Path) -> list[tuple[str, str, str]]:
    """(module path, qualified name, docstring) for every documented module, class and function."""
    out = []
    with zipfile.ZipFile(whl) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".py") or "/tests/" in name:
                continue
            tree = ast.parse(z.read(name))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        out.append((name, getattr(node, "name", "<module>"), doc.strip()))
    return out


def summary_pair(doc: str) -> tuple[str, str] | None:
    """(summary line, extended description) of a numpydoc docstring, or None when it has no such parts."""
    paras = re.split(r"\n\s*\n", doc)
    summary = " ".join(paras[0].split())
    body = []
    for para in paras[1:]:
        lines = para.strip().splitlines()
        if len(lines) > 1 and _SECTION.match(lines[1].strip()):  # "Parameters\n----------" starts the sections
            break
        if lines[0].strip().startswith((">>>", "..", ".. ")):
            break
        body.append(" ".join(para.split()))
    return (summary, " ".join(body)) if body else None


def build_docs_summaries(out: Path, params: dict, log=print) -> Built:
    """Extended description -> one-sentence summary, from NetworkX's numpydoc docstrings."""
    whl = fetch("networkx", log=log)
    lo, hi = params.get("min_words", 25), params.get("max_words", 250)
    seen: set[str] = set()
    rows = []
    for _, _, doc in _docstrings(whl):
        pair = summary_pair(doc)
        if pair is None:
            continue
        summary, body = pair
        if not (lo <= len(body.split()) <= hi and 4 <= len(summary.split()) <= 30) or _norm(body) in seen:
            continue
        seen.add(_norm(body))
        rows.append(chat_record(SUMMARY_SYSTEM, body, summary))
    # split by summary so copies of one docstring (Graph / DiGraph / MultiGraph methods) stay together
    parts = split_by_key(
        rows, lambda r: _norm(r["messages"][-1]["content"]), params.get("val", 0.08), params.get("test", 0.12)
    )
    parts = {k: _cap(v, params.get(f"max_{k}"), k) for k, v in parts.items()}
    return _finish(out, parts, [_source_line("networkx")])


def build_docs_corpus(out: Path, params: dict, log=print) -> Built:
    """Raw text for continued pre-training: one document per NetworkX module (its docstrings in order)."""
    whl = fetch("networkx", log=log)
    prefix = params.get("package_prefix", "networkx/algorithms/")
    docs: dict[str, list[str]] = {}
    for module, _, doc in _docstrings(whl):
        if module.startswith(prefix):
            docs.setdefault(module, []).append(doc)
    cut = params.get("max_chars")  # a smoke run's toy size: each document's start only
    texts = {m: "\n\n".join(d)[:cut] for m, d in docs.items()}
    parts = split_by_key(sorted(texts), lambda m: m, params.get("val", 0.05), params.get("test", 0.1))
    parts = {k: _cap(v, params.get(f"max_{k}"), k) for k, v in parts.items()}
    return _finish(
        out,
        {k: [{"text": texts[m]} for m in v] for k, v in parts.items()},
        [_source_line("networkx") + f" (modules under {prefix})"],
    )


DOCS_QA_SYSTEM = "Answer the question from the documentation. Reply with the relevant sentence only."
_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def numpydoc_sections(doc: str) -> dict[str, list[str]]:
    """Section title -> its lines, for the underlined sections of a numpydoc docstring."""
    lines = doc.splitlines()
    out: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        if _SECTION.match(line.strip()):
            continue
        if i + 1 < len(lines) and line.strip() and _SECTION.match(lines[i + 1].strip()):
            current = line.strip()
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def numpydoc_entries(lines: list[str]) -> list[tuple[str, str]]:
    """(name, description) of each `name : type` entry of a Parameters/Returns section."""
    entries: list[tuple[str, list[str]]] = []
    for line in lines:
        if line and not line[0].isspace():
            m = _ENTRY.match(line.strip())
            entries.append((m.group(1) if m else "", []))
        elif entries and line.strip():
            entries[-1][1].append(line.strip())
    return [(name, " ".join(desc)) for name, desc in entries if name and desc]


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text.strip(), maxsplit=1)[0]


def build_docs_qa(out: Path, params: dict, log=print) -> Built:
    """Open-book QA over API documentation: the Parameters/Returns sections of a NetworkX function are the
    context; the question asks what a parameter is or what the function returns; the answer is the first
    sentence of that entry (so token F1 / exact match measure finding and quoting the right entry)."""
    whl = fetch("networkx", log=log)
    max_words, per_function = params.get("max_context_words", 200), params.get("questions_per_function", 2)
    rows = []
    for module, func, doc in _docstrings(whl):
        sections = numpydoc_sections(doc)
        if "Parameters" not in sections or func.startswith("_"):
            continue
        context = "\n\n".join(
            f"{title}\n{'-' * len(title)}\n" + "\n".join(sections[title]).strip()
            for title in ("Parameters", "Returns")
            if title in sections
        )
        if len(context.split()) > max_words:
            continue
        qa = [(f"What is `{n}` in `{func}`?", d) for n, d in numpydoc_entries(sections["Parameters"]) if n != "G"]
        qa += [(f"What does `{func}` return?", d) for _, d in numpydoc_entries(sections.get("Returns", []))[:1]]
        qa = [(q, _first_sentence(d)) for q, d in qa if 3 <= len(_first_sentence(d).split()) <= 30]
        random.Random(f"{module}:{func}").shuffle(qa)
        for question, answer in qa[:per_function]:
            user = f"Documentation of `{func}`:\n\n{context}\n\nQuestion: {question}"
            rows.append(chat_record(DOCS_QA_SYSTEM, user, answer, id=f"{module}:{func}"))
    # split by function name: a held-out question is about documentation never seen in training (functions
    # of the same name in two modules, e.g. bipartite and general closeness_centrality, often share text)
    rows = list({json.dumps(r, sort_keys=True): r for r in rows}.values())
    parts = split_by_key(rows, lambda r: r["id"].split(":")[-1], params.get("val", 0.08), params.get("test", 0.12))
    parts = {k: _cap(v, params.get(f"max_{k}"), k) for k, v in parts.items()}
    return _finish(out, parts, [_source_line("networkx") + " (Parameters and Returns sections)"])


PREFERENCE_SYSTEM = "You are an expert on the NetworkX Python library. Answer questions about its API briefly."


def build_preference_docs(out: Path, params: dict, log=print) -> Built:
    """Preference pairs over API documentation, in TRL's conversational format (`prompt`, `chosen`,
    `rejected` message lists): the user asks what one parameter of a NetworkX function means; CHOSEN is
    that parameter's description from the docstring; REJECTED is a real but wrong answer, the description
    of another parameter of the same function, or (for a function with one documented parameter besides
    `G`) another function's description of a parameter with a different name, from the same module when
    there is one and always from the same split."""
    whl = fetch("networkx", log=log)
    lo, hi = params.get("min_answer_words", 2), params.get("max_answer_words", 60)
    per_function, context = params.get("pairs_per_function", 3), params.get("context", "summary")
    seed = params.get("seed", 0)
    sizes = {
        "train": params.get("max_train", 400),
        "val": params.get("max_val", 50),
        "test": params.get("max_test", 100),
    }

    def fits(desc: str) -> bool:
        return lo <= len(desc.split()) <= hi

    functions = []  # (qualified name, module, function, summary line, [(parameter, description)]), in order
    names: dict[str, int] = {}
    for module, func, doc in _docstrings(whl):
        sections = numpydoc_sections(doc)
        if "Parameters" not in sections or func.startswith("_"):
            continue
        entries: dict[str, str] = {}
        for name, desc in numpydoc_entries(sections["Parameters"]):
            if name != "G" and name not in entries:  # `G` is "a NetworkX graph" everywhere
                entries[name] = " ".join(desc.split())
        if entries:
            qualified = module.removesuffix(".py").replace("/", ".") + "." + func
            names[qualified] = names.get(qualified, 0) + 1  # methods of two classes in one module share it
            qualified += f"~{names[qualified]}" if names[qualified] > 1 else ""
            summary = " ".join(re.split(r"\n\s*\n", doc)[0].split())
            functions.append((qualified, module, func, summary, list(entries.items())))
    # split by bare function name: same-named functions (Graph.add_edge / DiGraph.add_edge, bipartite and
    # general closeness_centrality) share text and give the same question, so they must stay together
    parts = split_by_key(functions, lambda f: f[2], params.get("val", 0.08), params.get("test", 0.15))
    out_parts: dict[str, list] = {}
    for part, funcs in parts.items():
        rows, seen = [], set()
        for qualified, module, func, summary, entries in funcs:
            candidates = [(n, d) for n, d in entries if fits(d)]
            random.Random(f"{seed}:{qualified}").shuffle(candidates)
            for name, chosen in candidates[:per_function]:
                wrong = [d for n, d in entries if n != name and fits(d) and _norm(d) != _norm(chosen)]
                if not wrong:  # another function's parameter of another name: same module first, same split
                    pool = [(m, d) for _, m, f, _, es in funcs if f != func for n, d in es if n != name and fits(d)]
                    pool = [(m, d) for m, d in pool if _norm(d) != _norm(chosen)]
                    wrong = [d for m, d in pool if m == module] or [d for _, d in pool]
                if not wrong:
                    continue
                rejected = random.Random(f"{seed}:{qualified}:{name}").choice(wrong)
                question = f"In networkx, what does the `{name}` parameter of `{func}` mean?"
                user = f"`{func}`: {summary}\n\n{question}" if context == "summary" and summary else question
                if user in seen:  # a same-named function elsewhere already asked it
                    continue
                seen.add(user)
                prompt = [{"role": "system", "content": PREFERENCE_SYSTEM}, {"role": "user", "content": user}]
                rows.append(
                    {
                        "id": f"{qualified}:{name}",
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
        out_parts[part] = _cap(rows, sizes[part], f"{part}:{seed}")
    return _finish(out, out_parts, [_source_line("networkx") + " (Parameters sections: real and wrong descriptions)"])


BUILDERS: dict[str, Callable[..., Built]] = {
    "support_chat": build_support_chat,
    "chatterbot_qa": build_chatterbot_qa,
    "docs_qa": build_docs_qa,
    "vader_sentiment": build_vader_sentiment,
    "docs_summaries": build_docs_summaries,
    "docs_corpus": build_docs_corpus,
    "preference_docs": build_preference_docs,
}
