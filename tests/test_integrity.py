"""Checkpoint integrity, failed writes, and the best checkpoint: damaged files are caught, nothing is lost."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lora_tune.errors import LoraTuneError
from lora_tune.train.checkpoint import damage, list_checkpoints
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics

from conftest import tiny_config

FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng.pt",
    "state.json",
]


def _cfg(tiny_model_dir, chat_files, out, **extra):
    train_file, val_file = chat_files
    base = {"train.max_steps": 6, "train.save_every": 2, "train.keep_last": 3, "lora.dropout": 0.0}
    return tiny_config(tiny_model_dir, train_file, val_file, out, **{**base, **extra})


def _train_losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r.get("split", "train") == "train"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, chat_files, tmp_path, name, how):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out))
    reference = _train_losses(out)
    target = out / "checkpoints" / "step-000006" / name
    data = bytearray(target.read_bytes())
    if how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x55
        target.write_bytes(bytes(data))
    assert damage(target.parent) is not None
    console = Console(record=True, width=250)
    res = train(_cfg(tiny_model_dir, chat_files, out), resume=True, console=console)
    text = console.export_text()
    assert "step-000006 is damaged" in text and "resumed from" in text and res.resumed_from == 4
    assert _train_losses(out) == reference  # steps 5-6 redone from step 4, exactly
    assert (out / "checkpoints" / ".step-000006.damaged").is_dir()  # set aside, not deleted
    assert damage(out / "checkpoints" / "step-000006") is None  # and written anew


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *a, **kw):
        if "step-000004" in str(path) and str(path).endswith("scaler.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(LoraTuneError, match="No space left on device") as e:
        train(_cfg(tiny_model_dir, chat_files, out))
    assert "previous checkpoint" in str(e.value) and "step-000002 is intact" in str(e.value)
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert damage(out / "checkpoints" / "step-000002") is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half folder left
    monkeypatch.setattr(torch, "save", real_save)
    assert train(_cfg(tiny_model_dir, chat_files, out), resume=True).resumed_from == 2


def test_every_checkpoint_file_is_hashed(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out))
    saved = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())
    assert set(saved["sha256"]) >= set(FILES) - {"state.json"} and all(len(h) == 64 for h in saved["sha256"].values())


def test_load_best_at_end_keeps_the_best_weights_and_its_checkpoint(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    extra = {
        "train.max_steps": 16,
        "train.eval_every": 2,
        "train.lr": 0.05,
        "train.save_every": 0,
        "train.keep_last": 1,
        "train.load_best_at_end": True,
        "lora.dropout": 0.1,
        "data.group_by_length": True,  # the batch order this data and lr were chosen for
    }
    train(_cfg(tiny_model_dir, chat_files, out, **extra))
    vals = [(r["loss"], r["step"]) for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
    best_step = min(v for v in vals if v[1] > 0)[1]
    assert best_step != 16, "this data and lr should have their best evaluation before the end"
    names = [p.name for p in list_checkpoints(out)]
    assert names == [f"step-{best_step:06d}", "step-000016"]  # keep_last=1, and the best is never pruned
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    best = load_file(out / "checkpoints" / names[0] / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "step-000016" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    assert json.loads((out / "adapter" / "lora_tune.json").read_text())["weights_of_step"] == best_step


def test_load_best_at_end_needs_validation_data(tiny_model_dir, tmp_path):
    from lora_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="load_best_at_end"):
        tiny_config(tiny_model_dir, tmp_path / "t.jsonl", None, tmp_path / "o", **{"train.load_best_at_end": True})


def test_a_changed_number_in_state_json_is_caught(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out))
    path = out / "checkpoints" / "step-000006" / "state.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "tokens_seen": saved["tokens_seen"] + 1}, indent=2))  # still valid JSON
    assert "state.json" in damage(path.parent)
