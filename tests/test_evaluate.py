"""Evaluation: metric functions by hand, strided perplexity vs a direct computation, label likelihood,
left-padded batched generation, and the eval CLI on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lora_tune.cli import main
from lora_tune.config import ModelCfg
from lora_tune.data.formats import parse_record
from lora_tune.evaluate.classify import predict_labels
from lora_tune.evaluate.generate import Sampling, generate_texts, prompt_text
from lora_tune.evaluate.metrics import (
    classification_report,
    exact_match,
    normalize_answer,
    parse_label,
    rouge_l,
    token_f1,
)
from lora_tune.evaluate.perplexity import strided_nll
from lora_tune.models import load_model
from lora_tune.runtime import Precision
from lora_tune.train.loop import train

from conftest import chat, tiny_config

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


@pytest.mark.parametrize(
    "pred, ref, em, f1",
    [
        ("The Cat!", "cat", 1.0, 1.0),
        ("the cat sat", "a cat sat down", 0.0, 0.8),  # P = 2/2, R = 2/3
        ("", "", 1.0, 1.0),
        ("", "paris", 0.0, 0.0),
        ("!!! ...", "", 1.0, 1.0),  # punctuation only normalises to nothing
        ("¿Qué?", "qué", 1.0, 1.0),  # Unicode punctuation
        ("Café  au   lait", "café au lait", 1.0, 1.0),
        ("dog", "cat", 0.0, 0.0),
        ("paris paris", "paris", 0.0, 2 / 3),  # P = 1/2, R = 1
    ],
)
def test_squad_metrics(pred, ref, em, f1):
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_normalize_and_rouge():
    assert normalize_answer("  An Apple, the PEAR. ") == "apple pear"
    assert rouge_l("x y z w", "x z w") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("p q", "r s") == 0.0


def test_classification_report_by_hand():
    refs = ["pos", "pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", "pos", "neg", "pos", "pos"]
    rep = classification_report(preds, refs, ["pos", "neg", "neu"])
    assert rep.accuracy == pytest.approx(3 / 6)
    assert rep.confusion == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert rep.per_class["pos"]["precision"] == pytest.approx(2 / 4)
    assert rep.per_class["pos"]["recall"] == pytest.approx(2 / 3)
    assert rep.per_class["neg"]["f1"] == pytest.approx(0.5)
    assert rep.per_class["neu"]["f1"] == 0.0
    pos_f1 = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert rep.macro_f1 == pytest.approx((pos_f1 + 0.5 + 0.0) / 3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    return model.eval(), tok


def _direct_nll(model, ids, window, stride):
    """Token by token: each token t >= 1 scored once, by the first window whose end is past it.

    With stride == window a window's first token has no context inside it and is not scored."""
    begins = list(range(0, len(ids), stride))
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        begin = next(b for b in begins if min(b + window, len(ids)) > t)
        if begin == t:
            continue
        assert t - begin >= min(t, window - stride)  # the promised left context
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]  # predicts token t
        total -= float(F.log_softmax(logits.float(), -1)[ids[t]])
        n += 1
    return total, n


@pytest.mark.parametrize("window, stride", [(40, 40), (40, 20), (16, 8), (10, 3), (8, 8), (7, 1)])
def test_strided_perplexity_equals_direct_computation(tiny, window, stride):
    model, _ = tiny
    ids = torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    total, n = strided_nll(model, ids, window, stride, CPU32.autocast)
    want_total, want_n = _direct_nll(model, ids, window, stride)
    assert n == want_n
    assert n == len(ids) - 1 if stride < window else n == len(ids) - math.ceil(len(ids) / stride)
    assert total == pytest.approx(want_total, rel=1e-5)


def test_label_likelihood_with_a_forced_answer(tiny_model_dir):
    """With a zeroed LM head every token has probability 1/V, so the label with the fewest tokens wins."""
    model, tok = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    model.lm_head.weight.data.zero_()
    records = [parse_record(chat(f"review {i}", "positive"), f"f:{i}")[0] for i in range(3)]
    labels = ["a very long negative label", "ok"]
    preds, scores = predict_labels(model.eval(), tok, records, labels, CPU32.autocast)
    assert preds == ["ok"] * 3
    n_ok = len(tok("ok<|im_end|>", add_special_tokens=False)["input_ids"])
    assert scores[0][1] == pytest.approx(-n_ok * math.log(model.config.vocab_size), rel=1e-5)


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = [prompt_text(tok, [{"role": "user", "content": q}]) for q in ("hi", "what is the lazy dog doing?", "ok")]
    s = Sampling(max_new_tokens=8)
    batched, speed = generate_texts(model, tok, prompts, s, batch_size=3)
    alone = [generate_texts(model, tok, [p], s, batch_size=1)[0][0] for p in prompts]
    assert batched == alone and speed > 0
    assert tok.padding_side == "right"  # restored for training


def test_eval_cli_compare_writes_json_and_markdown(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, train_file, val_file, run, **{"train.max_steps": 8}))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--run",
            str(run),
            "--data",
            str(val_file),
            "--compare",
            "--metrics",
            "perplexity,f1,exact_match,rouge_l",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    base, tuned = report["results"]["base"]["metrics"], report["results"]["tuned"]["metrics"]
    assert set(base) == {"perplexity", "loss", "f1", "exact_match", "rouge_l"}
    assert tuned["loss"] < base["loss"]  # training on the same task lowered the loss
    assert report["delta"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert report["model"]["source"] == str(tiny_model_dir)  # taken from the run's adapter
    md = out.with_suffix(".md").read_text()
    assert "| metric | base | tuned | delta |" in md and "| perplexity |" in md
    assert "delta" in result.output


def test_eval_cli_errors(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(main, ["eval", "--model", str(tiny_model_dir), "--metrics", "bleu", "--data", "x"])
    assert r.exit_code == 1 and "unknown metric" in r.output
    r = CliRunner().invoke(main, ["eval", "--adapter", str(tmp_path)])
    assert r.exit_code == 1 and "not an adapter folder" in r.output


def test_parse_label_reads_what_a_person_would():
    labels = ["positive", "negative"]
    assert parse_label("Positive.", labels) == "positive"
    assert parse_label("  negative", labels) == "negative"
    assert parse_label("The review is negative overall", labels) == "negative"
    assert parse_label("positive or negative?", labels) is None  # names both: no answer
    assert parse_label("positively", labels) is None  # a word that merely contains a label
    assert parse_label("", labels) is None
    assert parse_label("Sci Space", ["sci space", "atheism"]) == "sci space"


def test_generate_label_mode_counts_unparseable_answers(tiny_model_dir, tmp_path):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "c.jsonl", [chat(f"review {i}", lab) for i, lab in enumerate(["good", "bad"] * 2)])
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--quantization",
            "fp32",
            "--data",
            str(data),
            "--metrics",
            "accuracy,f1",
            "--label-mode",
            "generate",
            "--labels",
            "good,bad",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    base = json.loads(out.read_text())["results"]["base"]
    examples = base["details"]["examples"]
    assert len(examples) == 4
    # the count is of the greedy answers shown: those that name neither label
    assert base["details"]["unparseable_generations"] == sum(
        parse_label(e["prediction"], ["good", "bad"]) is None for e in examples
    )
    assert set(base["metrics"]) == {"accuracy", "macro_f1", "f1"}
