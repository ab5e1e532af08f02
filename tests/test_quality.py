"""The quality benchmark: its data builders, its safe reading of a pickle, its summary and table, and
one training-and-scoring run per tool on a tiny setup."""

from __future__ import annotations

import zlib
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from lora_tune.bench import quality_data as qd
from lora_tune.bench.quality import SECTION, markdown, spec_for, summarize, task_by_name, update_results


def test_newsgroup_posts_reads_the_pickle_without_running_it(tmp_path):
    """The parser only lists opcodes: a pickle that would run a command when loaded runs nothing."""
    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR".encode()
    blob = b"(lp0\nVfirst post\np1\naVsecond post\np2\naS'S9'\np3\naS'x/alt.a/1y/sci.b/2'\np4\na" + evil + b"."
    posts = qd.newsgroup_posts(zlib.compress(blob))
    assert posts == [("alt.a", "first post"), ("sci.b", "second post")]
    assert not marker.exists()
    with pytest.raises(qd.LoraTuneError, match="1 posts but 2 file names"):
        qd.newsgroup_posts(zlib.compress(b"(lp0\nVonly one\np1\naS'S9'\np3\naS'x/alt.a/1y/sci.b/2'\np4\na."))


def test_post_body_drops_headers_and_symbol_art():
    post = "From: a@b\nSubject: hi\n\nFirst line of text.\n=-=-=-=-=-=-=-=-=-=\nSecond line here.\n" + "word " * 300
    body = qd.post_body(post, max_chars=60)
    assert body.startswith("First line of text.\nSecond line here.")
    assert "From:" not in body and "=-=" not in body and len(body) <= 60


def test_stratified_split_keeps_each_class_share_and_is_deterministic():
    items = [("a", i) for i in range(60)] + [("b", i) for i in range(40)]
    train, test = qd.stratified_split(list(items), lambda x: x[0], 20, seed=3)
    assert len(test) == 20 and sum(x[0] == "a" for x in test) == 12  # 60% of the test set, as in the data
    assert sorted(train + test) == sorted(items)
    assert (train, test) == qd.stratified_split(list(items), lambda x: x[0], 20, seed=3)


def test_analogy_test_pairs_are_in_no_training_question():
    lines = [": capitals"]
    pairs = [(f"city{i}", f"land{i}") for i in range(12)]
    lines += [f"{a} {b} {c} {d}" for a, b in pairs for c, d in pairs if a != c]
    train, test = qd.build_analogy("\n".join(lines).encode(), per_category=40, test_per_category=10)
    assert len(test) == 10 and len(train) == 30

    def words(rec):  # "a is to b as c is to" -> (a, b, c), and the answer d
        q = rec["messages"][0]["content"].splitlines()[1].split()
        return q[0], q[3], q[5], rec["messages"][1]["content"]

    held = {(c, d) for _, _, c, d in map(words, test)}
    for a, b, c, d in map(words, train):
        assert (a, b) not in held and (c, d) not in held


def test_sentiment_and_news_builders():
    blob = b"__label__neg dull .\n__label__pos lovely and warm .\n" * 50
    train, test = qd.build_sentiment(blob)
    assert len(test) == 70 and len(train) == 30
    assert {r["messages"][1]["content"] for r in train + test} == {"negative", "positive"}
    story = " ".join(f"Sentence number {i} is here." for i in range(200))
    docs = "\n".join([story] * 5 + ["held out one", "held out two"]).encode()
    train, test = qd.build_news(docs, n_test=2, max_chars=300)
    assert [r["text"] for r in test] == ["held out one", "held out two"]
    assert all(len(r["text"]) <= 300 for r in train)
    assert " ".join(r["text"] for r in train[: len(train) // 5]) == story  # cut at sentence ends, nothing lost


def run(task: str, variant: str, seed: int, value: float, losses=(1.0,)) -> dict:
    metric = task_by_name(task).metric
    return {
        "task": task,
        "variant": variant,
        "seed": seed,
        "score": {"metrics": {metric: value}},
        "train_losses": list(losses),
        "seconds": 10.0,
    }


def test_summary_and_results_section(tmp_path):
    runs = [run("newsgroups", "ours", s, v) for s, v in enumerate([0.80, 0.90, 1.00])]
    runs += [run("newsgroups", "trl", s, v) for s, v in enumerate([0.70, 0.75, 0.80])]
    runs += [run("newsgroups", "ours, fp32", s, v) for s, v in enumerate([0.85, 0.85, 0.85])]
    runs.append({"task": "newsgroups", "variant": "ours, unchunked loss", "seed": 0, "error": "boom"})
    rows = {r["variant"]: r for r in summarize(runs)}
    assert rows["ours"]["mean"] == pytest.approx(0.9) and rows["ours"]["std"] == pytest.approx(0.1)
    assert rows["trl"]["min"] == 0.70 and rows["trl"]["max"] == 0.80
    assert rows["ours, unchunked loss"]["runs"] == 0
    result = {
        "date": "d",
        "git_sha": "g",
        "hardware": {"cpu": "cpu", "cores": 2, "gpu": None},
        "cpu_bf16": "flags",
        "seeds": [0, 1, 2],
        "steps": {"newsgroups": 30},
        "base": {"newsgroups": {"score": {"metrics": {"macro_f1": 0.5}}}},
        "summary": summarize(runs),
    }
    table = markdown(result)
    assert "| newsgroups | macro_f1 (higher is better) | 30 | 0.500 | 0.900 ± 0.100 | 0.750 ± 0.050 | +0.150 |" in table
    assert "| newsgroups | ours, fp32 | 0.850 ± 0.000 | -0.050 | +0.100 |" in table
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# speed\n\ntable\n\n## Ablation\n\nrows\n")
    update_results(results_md, table)
    update_results(results_md, table.replace("0.900", "0.950"))  # a rerun replaces the section in place
    text = results_md.read_text()
    assert text.count(SECTION) == 1 and "0.950 ± 0.100" in text and "0.900 ± 0.100" not in text
    assert text.startswith("# speed\n\ntable\n\n## Ablation\n\nrows\n")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["ours", "trl"])
def test_quality_worker_trains_saves_and_scores(tiny_model_dir, tmp_path, tool):
    """One run of the worker as `run_quality` makes it: trains with the shared protocol, saves the
    adapter, and scores it on the held-out file."""
    from lora_tune.bench.quality import _worker

    if tool == "trl":
        pytest.importorskip("trl", reason="TRL is a benchmark-only extra: pip install -e '.[bench]'")
    task = task_by_name("sentiment")
    train_file, test_file = task.files(tmp_path)
    rows = [qd.chat(f"review {i}", ["negative", "positive"][i % 2]) for i in range(12)]
    qd.write_jsonl(train_file, rows)
    qd.write_jsonl(test_file, rows[:4])
    spec = spec_for(task, tool, 0, tmp_path, str(tmp_path / "adapter"), {}, str(tiny_model_dir), steps=2)
    r = _worker({"task": task.name, "data_root": str(tmp_path), "spec": asdict(spec)})
    assert "error" not in r, r.get("error")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert len(r["train_losses"]) == 2 and all(x > 0 for x in r["train_losses"])
    classes = r["score"]["classes"]
    assert sum(map(sum, classes["confusion"])) == 4 and 0 <= r["score"]["metrics"]["macro_f1"] <= 1
    # both tools supervise the answer and the end of the turn, nothing of the prompt
    assert 0 < r["supervised_tokens"] < r["real_tokens"] / 2
    base = _worker({"task": task.name, "data_root": str(tmp_path), "base": str(tiny_model_dir)})
    assert "error" not in base and set(base["score"]["metrics"]) == {"accuracy", "macro_f1"}


def test_bench_quality_cli_names_unknown_tasks_and_bad_seeds():
    from lora_tune.cli import main

    r = CliRunner().invoke(main, ["bench", "--quality", "--tasks", "newsgroups,poetry"])
    assert r.exit_code == 1 and "no task named poetry" in r.output and "analogy" in r.output
    r = CliRunner().invoke(main, ["bench", "--quality", "--seeds", "0,x"])
    assert r.exit_code == 1 and "whole numbers" in r.output


def test_an_interrupted_quality_benchmark_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """Finished runs in quality-partial.json are kept; failed ones, and any measured under another
    protocol, are run again."""
    import json

    from lora_tune.bench import quality

    calls = []

    def fake_worker(payload):
        calls.append((payload.get("spec", {}).get("tool"), payload.get("spec", {}).get("seed"), "base" in payload))
        return {"score": {"metrics": {"macro_f1": 0.5}}, "train_losses": [1.0], "seconds": 1.0}

    monkeypatch.setattr(quality, "build_tasks", lambda *a: None)
    monkeypatch.setattr(quality, "_worker", fake_worker)
    key = {"protocol": quality.PROTOCOL, "model": quality.MODEL, "steps": {t.name: t.steps for t in qd.TASKS}}
    partial = tmp_path / "results" / "quality-partial.json"
    partial.parent.mkdir()
    done = [run("sentiment", "ours", 0, 0.9), {**run("sentiment", "trl", 0, 0.8), "error": "killed"}]
    partial.write_text(json.dumps({"key": key, "base": {"sentiment": {"score": {}}}, "runs": done}))
    result = quality.run_quality(tmp_path, ["sentiment"], seeds=(0,), log=lambda *_: None)
    assert calls == [("trl", 0, False)]  # only the failed run; the base score was kept
    assert sorted(r["variant"] for r in result["runs"]) == ["ours", "trl"]
    assert not partial.exists()  # a finished benchmark leaves no partial file

    calls.clear()
    partial.write_text(json.dumps({"key": {**key, "model": "other"}, "base": {}, "runs": done}))
    quality.run_quality(tmp_path, ["sentiment"], seeds=(0,), log=lambda *_: None)
    assert sorted(calls, key=str) == sorted([(None, None, True), ("ours", 0, False), ("trl", 0, False)], key=str)
