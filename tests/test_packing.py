"""Packing: per-sample losses of a packed batch equal the same samples run one by one."""

from __future__ import annotations

import pytest
import torch

from lora_tune.config import ModelCfg
from lora_tune.data.batching import BatchStream, Position, collate, collate_packed, pack_rows
from lora_tune.data.formats import parse_record
from lora_tune.data.tokenize import IGNORE, encode_records
from lora_tune.losses import real_tokens, supervised_loss_sum, token_losses
from lora_tune.models import load_model
from lora_tune.runtime import Precision

from conftest import chat

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


def _examples(tok, n=7):
    rows = [
        chat(f"what is {i} plus {i}?" + " the lazy dog" * (i % 3), "the answer is " + "very " * i + f"{2 * i}.")
        for i in range(n)
    ]
    return encode_records(tok, [parse_record(r, f"m:{i}")[0] for i, r in enumerate(rows)], max_length=256)[0]


def _per_sample_packed(model, rows, examples):
    """Sum of token losses per sample from one packed forward pass."""
    batch = collate_packed([[examples[i] for i in row] for row in rows], pad_id=0)
    losses, keep = token_losses(model, batch)
    owner = torch.full(keep.shape, -1)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i].input_ids)
            owner[r, at : at + n - 1] = i  # target positions t (predicting token t+1) inside sample i
            at += n
    owners = owner[keep]
    return {i: float(losses[owners == i].sum()) for i in range(len(examples))}, batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tiny_model_dir, tiny_tokenizer, attn):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32", attn_implementation=attn), CPU32)
    model.eval()
    examples = _examples(tiny_tokenizer)
    width = max(len(e.input_ids) for e in examples) * 3
    rows = pack_rows([len(e.input_ids) for e in examples], width)
    assert any(len(r) > 1 for r in rows)  # really packed
    with torch.no_grad():
        packed, batch = _per_sample_packed(model, rows, examples)
        for i, ex in enumerate(examples):
            alone, _ = supervised_loss_sum(model, collate([ex], pad_id=0))
            assert packed[i] == pytest.approx(float(alone), rel=1e-5, abs=1e-5), i
        # control: the same row without restarting positions (one long sequence) gives different losses
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
        mixed, _ = token_losses(model, batch)
        clean, _ = token_losses(model, collate_packed([[examples[i] for i in row] for row in rows], pad_id=0))
        assert not torch.allclose(mixed, clean)
    assert real_tokens(batch) == sum(len(e.input_ids) for e in examples)


def test_packed_row_never_targets_the_next_samples_first_token(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 3)
    batch = collate_packed([examples], pad_id=0)
    starts = [0, len(examples[0].input_ids), len(examples[0].input_ids) + len(examples[1].input_ids)]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert batch["position_ids"][0, starts[1]] == 0 and batch["position_ids"][0, starts[2]] == 0


def test_pack_rows_is_a_valid_tight_packing():
    lengths = [9, 3, 7, 1, 5, 5, 2, 8, 4, 6] * 5
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 10) + 2  # within 2 rows of the lower bound


def test_group_by_length_covers_every_sample_with_less_padding(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 40)
    pad = BatchStream(examples, 4, seed=3, pad_id=0)
    grouped = BatchStream(examples, 4, seed=3, pad_id=0, strategy="group_by_length")
    for stream in (pad, grouped):
        seen = sorted(i for batch in stream.plan(0) for row in batch for i in row)
        assert seen == list(range(40))

    def padding(stream):
        return sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in stream)

    assert padding(grouped) < padding(pad)


def test_packed_stream_resumes_and_covers_all(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 20)
    s = BatchStream(examples, 2, seed=1, pad_id=0, strategy="pack", max_length=128)
    seen = sorted(i for batch in s.plan(0) for row in batch for i in row)
    assert seen == list(range(20))
    assert s.plan(0) != s.plan(1)  # rows are reshuffled each epoch
    # resuming: a new stream put at a saved position yields exactly what the first one went on to yield
    for _ in range(len(s) + 2):  # into the second epoch
        s.next()
    saved = Position(s.position.epoch, s.position.index)
    expected = [s.next() for _ in range(len(s))]
    resumed = BatchStream(examples, 2, seed=1, pad_id=0, strategy="pack", max_length=128)
    assert saved == Position(1, 2)
    resumed.position = Position(saved.epoch, saved.index)  # a copy: the stream advances its own
    got = [resumed.next() for _ in range(len(s))]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected, strict=True) for k in a)


def _samples(lengths: list[int], answer: int | None) -> list:
    """Samples of the given lengths; every token supervised (text) or only the last `answer` tokens."""
    from lora_tune.data.tokenize import Example

    out = []
    for n in lengths:
        ids = list(range(1, n + 1))
        labels = ids if answer is None else [IGNORE] * (n - answer) + ids[n - answer :]
        out.append(Example(ids, labels))
    return out


def test_auto_length_grouping_keeps_token_weights_even():
    """Plain text of mixed lengths: grouping would put short samples in batches of their own, whose few
    tokens then weigh many times more, so auto picks random batches. Short answers after prompts of
    mixed lengths: the supervised count per batch does not depend on length, so auto groups."""
    from lora_tune.data.batching import choose_batching

    g = torch.Generator().manual_seed(0)
    lengths = (10 + torch.randint(0, 240, (200,), generator=g)).tolist()
    text = choose_batching(_samples(lengths, None), 8, 0, packing=False, group_by_length="auto")
    assert text.strategy == "pad" and "vary" in text.reason and "data.group_by_length: true forces it" in text.reason
    answers = choose_batching(_samples(lengths, 2), 8, 0, packing=False, group_by_length="auto")
    assert answers.strategy == "group_by_length" and "padding" in answers.reason
    # samples of nearly one length: grouping would save almost no padding, so it is not worth its risk
    even = choose_batching(_samples([50 + i % 4 for i in range(200)], 2), 8, 0, packing=False, group_by_length="auto")
    assert even.strategy == "pad" and "save little" in even.reason
    # an explicit setting is obeyed, and packing wins
    assert choose_batching(_samples(lengths, None), 8, 0, False, True).strategy == "group_by_length"
    assert choose_batching(_samples(lengths, 2), 8, 0, False, False).strategy == "pad"
    assert choose_batching(_samples(lengths, 2), 8, 0, True, "auto").strategy == "pack"


def test_group_by_length_setting_accepts_auto_and_booleans():
    from lora_tune.config import load_config

    assert load_config(None, ["data.train_file=x.jsonl"]).data.group_by_length == "auto"
    assert load_config(None, ["data.train_file=x.jsonl", "data.group_by_length=false"]).data.group_by_length is False
    assert load_config(None, ["data.train_file=x.jsonl", "data.group_by_length=true"]).data.group_by_length is True
    with pytest.raises(Exception, match="group_by_length"):
        load_config(None, ["data.train_file=x.jsonl", "data.group_by_length=sometimes"])
