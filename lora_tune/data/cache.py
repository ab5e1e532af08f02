"""Tokenized-data cache keyed by a fingerprint of the data, tokenizer, template and length settings.

Entries are safetensors files (flat int32 ids/labels + offsets, stats in the metadata), written
atomically; nothing is unpickled when reading them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_tune.data.formats import Record
from lora_tune.data.tokenize import Example, TokenizeStats

VERSION = "1"  # bump when tokenization logic changes, so old entries are not reused


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [
                type(tok).__name__,
                tok.eos_token,
                tok.bos_token,
                tok.pad_token,
                getattr(tok, "chat_template", None),
            ],
            default=str,
        ).encode()
    )
    return h.hexdigest()


def fingerprint(records: list[Record], tok_fp: str, template: str | None, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(VERSION.encode())
    h.update(tok_fp.encode())
    h.update(json.dumps([template, settings], sort_keys=True, default=str).encode())
    for rec in records:
        h.update(json.dumps(rec.content(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def _path(root: Path, fp: str) -> Path:
    return root / "tokenized" / f"{fp}.safetensors"


def load(root: Path, fp: str) -> tuple[list[Example], TokenizeStats] | None:
    from safetensors import safe_open

    path = _path(root, fp)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            ids, labels, offsets = (f.get_tensor(k) for k in ("ids", "labels", "offsets"))
    except Exception:  # noqa: BLE001 - a damaged cache entry is re-made, never trusted
        return None
    ids_l, labels_l, off = ids.tolist(), labels.tolist(), offsets.tolist()
    examples = [Example(ids_l[a:b], labels_l[a:b]) for a, b in zip(off[:-1], off[1:], strict=True)]
    return examples, TokenizeStats(**json.loads(meta["stats"]))


def save(root: Path, fp: str, examples: list[Example], stats: TokenizeStats) -> Path:
    from safetensors.torch import save_file

    path = _path(root, fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e.input_ids))
    tensors = {
        "ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{fp}.", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp, metadata={"stats": json.dumps(dataclasses.asdict(stats))})
    os.replace(tmp, path)
    return path
