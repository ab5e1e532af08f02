"""Hooks handed to finetune() see what the loop does, in the documented order."""

from __future__ import annotations

from lora_tune.finetune import finetune
from lora_tune.train.hooks import Hook
from lora_tune.train.metrics import read_metrics

from conftest import tiny_config


class Recorder(Hook):
    def __init__(self, name, calls):
        self.name, self.calls, self.records, self.steps = name, calls, [], []

    def on_start(self, run):
        self.calls.append(("start", self.name))

    def on_log(self, run, record):
        self.records.append(dict(record))

    def on_step_end(self, run, out):
        self.steps.append((run.state.step, out.units > 0))

    def on_end(self, run):
        self.calls.append(("end", self.name))


def test_user_hooks_get_every_record_and_step(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    calls: list = []
    first, second = Recorder("a", calls), Recorder("b", calls)
    cfg = tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "run", **{"train.eval_every": 2})
    finetune(cfg, hooks=[first, second])
    assert first.records == read_metrics(tmp_path / "run" / "metrics.jsonl")  # the log, record for record
    assert [r["step"] for r in first.records if r.get("split") == "val"] == [0, 2, 4, 6]
    assert first.steps == [(s, True) for s in range(1, 7)]
    assert calls == [("start", "a"), ("start", "b"), ("end", "b"), ("end", "a")]  # ends in reverse order
