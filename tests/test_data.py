from __future__ import annotations

import pytest

from lora_tune.config import DataCfg
from lora_tune.data.batching import BatchStream, Position
from lora_tune.data.formats import parse_record
from lora_tune.data.readers import load_records
from lora_tune.data.splits import read_splits
from lora_tune.data.templates import resolve_chat_template
from lora_tune.data.tokenize import IGNORE, encode_messages, encode_records, encode_text
from lora_tune.errors import DataError, LoraTuneError

from conftest import chat, write_jsonl


def supervised_text(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def test_every_bad_line_reported_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = '{"text": "fine"}'
    lines = [
        good.encode(),
        b'{"text": "unterminated',
        b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
        b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
        b'{"prompt": "no known field"}',
        b'{"text": "caf\xe9"}',
        b'{"messages": [{"role": "user", "content": "only a question"}]}',
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    probs = e.value.problems
    assert [pr.split(":")[1] for pr in probs] == ["2", "3", "4", "5", "6", "7", "8"]
    text = "\n".join(probs)
    assert "invalid JSON" in text and "unknown role 'robot'" in text and "empty assistant content" in text
    assert "must be a string" in text and "no known fields" in text and "invalid UTF-8" in text
    assert "no assistant message" in text


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(LoraTuneError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


def test_assistant_only_mask_covers_replies_and_end_of_turn(tiny_tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "and you?"},
        {"role": "assistant", "content": "fine, thank you."},
    ]
    ex = encode_messages(tiny_tokenizer, msgs)
    assert supervised_text(tiny_tokenizer, ex) == "hi there<|im_end|>fine, thank you.<|im_end|>"
    assert tiny_tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nbe brief")


def test_weight_zero_turn_is_not_supervised(tiny_tokenizer):
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "good answer"},
    ]
    assert supervised_text(tiny_tokenizer, encode_messages(tiny_tokenizer, msgs)) == "good answer<|im_end|>"


def test_template_without_end_token_gets_eos(tiny_tokenizer):
    tmpl = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = encode_messages(tiny_tokenizer, msgs, template=tmpl)
    assert (
        tiny_tokenizer.decode(ex.input_ids)
        == "user: hello\nassistant: hi<|im_end|>\nuser: bye\nassistant: ok<|im_end|>\n"
    )
    assert supervised_text(tiny_tokenizer, ex).replace(" ", "") == "hi<|im_end|>ok<|im_end|>"


def test_loss_on_all_and_text(tiny_tokenizer):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    ex = encode_messages(tiny_tokenizer, msgs, loss_on="all")
    assert ex.labels == ex.input_ids
    t = encode_text(tiny_tokenizer, "hello world")
    assert t.input_ids[-1] == tiny_tokenizer.eos_token_id and t.labels == t.input_ids


def test_no_template_needs_fallback():
    from conftest import build_tokenizer

    tok = build_tokenizer(with_template=False)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(LoraTuneError, match="data.chat_template=chatml"):
        encode_messages(tok, msgs)
    tmpl = resolve_chat_template(tok, "chatml")
    assert supervised_text(tok, encode_messages(tok, msgs, template=tmpl)) == "hi<|im_end|>"


def test_truncation_drops_samples_without_supervised_tokens(tiny_tokenizer):
    long_q = "the quick brown fox " * 20
    rows = [chat(long_q, "yes"), chat("short?", "yes"), chat("hello", "the lazy dog " * 10)]
    records = [parse_record(r, f"f:{i + 1}")[0] for i, r in enumerate(rows)]
    kept, stats = encode_records(tiny_tokenizer, records, max_length=30)
    assert stats.dropped_no_supervised == 1 and stats.dropped_where[0].startswith("f:1 ")
    assert stats.truncated == 1 and len(kept) == 2  # the long answer is cut, the short chat fits
    assert all(len(e.input_ids) <= 30 and e.n_supervised > 0 for e in kept)
    kept, stats = encode_records(tiny_tokenizer, records, max_length=30, truncation="drop")
    assert stats.dropped_too_long == 2 and len(kept) == 1


def test_val_fraction_split_is_seeded(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    a = read_splits(DataCfg(train_file=str(p), val_fraction=0.25), seed=1)
    b = read_splits(DataCfg(train_file=str(p), val_fraction=0.25), seed=1)
    assert [r.text for r in a[1]] == [r.text for r in b[1]] and len(a[1]) == 5 and len(a[0]) == 15
    assert not {r.text for r in a[0]} & {r.text for r in a[1]}


def test_batch_stream_resumes_exactly(tiny_tokenizer):
    records = [parse_record({"text": f"doc {i} " * (i % 5 + 1)}, f"f:{i}")[0] for i in range(10)]
    examples, _ = encode_records(tiny_tokenizer, records, max_length=64)
    full = BatchStream(examples, 3, seed=7, pad_id=0)
    seq = [full.next()["input_ids"].tolist() for _ in range(9)]  # crosses two epoch boundaries
    resumed = BatchStream(examples, 3, seed=7, pad_id=0)
    resumed.position = Position(epoch=1, index=1)  # after 5 batches: 4 in epoch 0, 1 in epoch 1
    assert [resumed.next()["input_ids"].tolist() for _ in range(4)] == seq[5:]
    assert seq[:4] != seq[4:8]  # epochs are shuffled differently
