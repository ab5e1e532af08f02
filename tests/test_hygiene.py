"""Duplicates, leakage, label balance, the tokenized-data cache, and training on packed rows."""

from __future__ import annotations

import pytest

from lora_tune.config import DataCfg
from lora_tune.data.formats import parse_record
from lora_tune.data.hygiene import deduplicate, labels_of, leaked, normalize, oversample
from lora_tune.data.splits import prepare
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics

from conftest import chat, tiny_config


def recs(rows):
    return [parse_record(r, f"f:{i + 1}")[0] for i, r in enumerate(rows)]


def test_normalize():
    assert normalize("  Héllo,   WORLD!! ") == "hello world"


def test_dedup_exact_and_normalized():
    rows = [chat("Hi there", "Hello!"), chat("Hi there", "Hello!"), chat("hi   THERE", "hello"), chat("bye", "ciao")]
    kept, rep = deduplicate(recs(rows), "exact")
    assert len(kept) == 3 and rep.removed == 1 and rep.examples == ["f:2 duplicates f:1"]
    kept, rep = deduplicate(recs(rows), "normalized")
    assert len(kept) == 2 and rep.removed == 2
    assert deduplicate(recs(rows), "none")[1].removed == 0


def test_leakage_found_across_splits():
    train = recs([chat("What is 2+2?", "4"), chat("capital of France?", "Paris")])
    val = recs([chat("what is 2 + 2", "4."), chat("capital of Spain?", "Madrid")])
    assert leaked(train, val) == [0]


def test_labels_and_oversampling():
    rows = [chat(f"review {i}", "positive") for i in range(6)] + [chat(f"review x{i}", "negative") for i in range(2)]
    records = recs(rows)
    labels = labels_of(records)
    assert labels is not None and labels.count("positive") == 6
    balanced = oversample(records, labels, seed=0)
    assert sum(r.response() == "negative" for r in balanced) == 6 and len(balanced) == 12
    assert labels_of(recs([chat(f"q{i}", f"a long free-form answer number {i}") for i in range(8)])) is None


def test_prepare_drops_leaked_and_uses_the_cache(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path / "cache"))
    train_r = recs([chat(f"what is {i} plus {i}?", f"{2 * i}") for i in range(10)] + [chat("what is 0 plus 0?", "0")])
    val_r = recs([chat("What is 1 plus 1", "2"), chat("what is 50 plus 50?", "100")])
    cfg = DataCfg(train_file="x", max_length=64)
    tr, va, rep = prepare(cfg, tiny_tokenizer, None, 0, train_r, val_r)
    assert rep.dedup_train.removed == 1 and len(tr) == 10
    assert rep.leaked == ["f:1"] and len(va) == 1
    assert rep.cache_hits == 0
    tr2, va2, rep2 = prepare(cfg, tiny_tokenizer, None, 0, train_r, val_r)
    assert rep2.cache_hits == 2 and tr2 == tr and va2 == va
    _, _, rep3 = prepare(DataCfg(train_file="x", max_length=32), tiny_tokenizer, None, 0, train_r, val_r)
    assert rep3.cache_hits == 0  # a setting that changes tokenization misses the cache
    (tmp_path / "cache" / "tokenized").joinpath("junk").write_text("x")
    for f in (tmp_path / "cache" / "tokenized").glob("*.safetensors"):
        f.write_bytes(b"broken")  # a damaged entry is re-made, never trusted
    tr4, _, rep4 = prepare(cfg, tiny_tokenizer, None, 0, train_r, val_r)
    assert rep4.cache_hits == 0 and tr4 == tr


@pytest.mark.parametrize("packing", [True, False])
def test_training_on_packed_or_grouped_batches_learns(tiny_model_dir, chat_files, tmp_path, packing):
    train_file, val_file = chat_files
    cfg = tiny_config(
        tiny_model_dir,
        train_file,
        val_file,
        tmp_path / "run",
        **{"data.packing": packing, "data.max_length": 128, "train.max_steps": 10, "train.micro_batch_size": 2},
    )
    res = train(cfg)
    vals = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "val"]
    assert res.steps == 10 and vals[-1] < vals[0]
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split", "train") == "train"]
    if packing:  # two packed rows of up to 128 tokens hold more samples than two padded ones
        assert max(r["real_tokens"] for r in steps) > 2 * 70
