"""The training loop on the tiny model: outputs, checkpoints, resume rules, exact resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from lora_tune.errors import LoraTuneError
from lora_tune.train.checkpoint import list_checkpoints
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics

from conftest import cli_process, tiny_config, tiny_overrides


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


def _train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r.get("split", "train") == "train"]


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, chat_files, tmp_path):
    """Kill -9 mid-run, resume, and get the very same per-step losses as a run never interrupted."""
    train_file, val_file = chat_files
    extra = {
        "train.max_steps": 40,
        "train.save_every": 1,
        "train.precision": "bf16",
        "train.grad_accum": 2,
        "train.micro_batch_size": 2,
        "train.eval_every": 5,
    }

    def args(out):
        return ["train", "-", *tiny_overrides(tiny_model_dir, train_file, val_file, out, **extra)]

    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = cli_process([a if a != "-" else str(cfg) for a in args(ref_out)])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    victim = cli_process([a if a != "-" else str(cfg) for a in args(cut_out)])
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        done = _train_losses(cut_out) if (cut_out / "metrics.jsonl").exists() else []
        if len(done) >= 7:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(_train_losses(cut_out))
    assert killed_at < 40

    resumed = cli_process([a if a != "-" else str(cfg) for a in args(cut_out)] + ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resumed from" in resumed.stdout.read()
    assert _train_losses(cut_out) == _train_losses(ref_out)  # exact, same thread count
    ref_val = [r for r in read_metrics(ref_out / "metrics.jsonl") if r.get("split") == "val"]
    cut_val = [r for r in read_metrics(cut_out / "metrics.jsonl") if r.get("split") == "val"]
    assert [(r["step"], r["loss"]) for r in cut_val] == [(r["step"], r["loss"]) for r in ref_val]
