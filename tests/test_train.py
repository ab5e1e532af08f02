"""The training loop on the tiny model: outputs, checkpoints, resume rules (exact resume after SIGKILL:
test_faults' chain)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_tune.errors import LoraTuneError
from lora_tune.train.checkpoint import list_checkpoints
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics

from conftest import tiny_config


def _cfg(tiny_model_dir, chat_files, out, **extra):
    train_file, val_file = chat_files
    return tiny_config(tiny_model_dir, train_file, val_file, out, **extra)


def test_train_writes_a_complete_run(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 12, "train.eval_every": 4}))
    assert res.steps == 12
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "adapter",
        "checkpoints",
    }
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if r.get("split", "train") == "train"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens"} <= r.keys() and r["tokens"] > 0 for r in steps)
    vals = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in vals] == [0, 4, 8, 12]
    assert vals[-1]["loss"] < vals[0]["loss"]  # it learns
    # keep_last=2, and the best evaluation's checkpoint is never pruned
    best = min((r["loss"], r["step"]) for r in vals if r["step"] > 0)[1]
    kept = sorted({"step-000010", "step-000012", f"step-{best:06d}"})
    assert [p.name for p in list_checkpoints(out)] == kept
    ck = list_checkpoints(out)[-1]
    assert {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "rng.pt",
        "state.json",
    } <= {p.name for p in ck.iterdir()}
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 12 and "config_hash" in state and "position" in state
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "adapter" / "tokenizer_config.json").read_text()
    )


def test_saved_adapter_reproduces_trained_model(tiny_model_dir, chat_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_tune.train.hooks import Hook

    x = torch.tensor([[1, 5, 9, 30, 44, 2]])

    class Capture(Hook):  # the logits of the model as it is in memory when training ends
        def on_end(self, run):
            model = run.parts.model
            model.eval()
            with torch.no_grad():
                self.logits = model(input_ids=x).logits.clone()
            model.train()

    out, capture = tmp_path / "run", Capture()
    train(_cfg(tiny_model_dir, chat_files, out), hooks=[capture])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref = base(x).logits.clone()
        tuned = PeftModel.from_pretrained(base, out / "adapter").eval()(x).logits
    assert not torch.allclose(ref, tuned)  # the adapter is not a no-op
    torch.testing.assert_close(tuned, capture.logits, rtol=1e-5, atol=1e-5)  # and it is the trained model


def test_existing_run_needs_resume_or_overwrite(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2}))
    with pytest.raises(LoraTuneError, match="--resume"):
        train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2}))
    res = train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2}), overwrite=True)
    assert res.steps == 2


def test_resume_refuses_changed_settings(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2}))
    with pytest.raises(LoraTuneError) as e:
        train(
            _cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2, "train.lr": 1e-3, "lora.r": 8}),
            resume=True,
        )
    assert "train.lr" in str(e.value) and "lora.r" in str(e.value)
    # cadence settings may change
    res = train(_cfg(tiny_model_dir, chat_files, out, **{"train.max_steps": 2, "train.log_every": 5}), resume=True)
    assert res.resumed_from == 2
    vals = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
    assert vals == [0, 2]  # resuming a finished run logs its final evaluation once, not twice
