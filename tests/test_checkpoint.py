from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lora_tune.config import LoraCfg, ModelCfg, TrainCfg, load_config
from lora_tune.data.batching import Position
from lora_tune.finetune import finetune
from lora_tune.models import attach_lora, load_model, prepare_for_training
from lora_tune.runtime import Precision
from lora_tune.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics
from lora_tune.train.optim import build_optimizer, build_scheduler
from lora_tune.train.state import TrainState

from conftest import tiny_config

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


def _setup(model_dir, seed, optimizer="adamw", **lora):
    model, _ = load_model(ModelCfg(source=str(model_dir), quantization="fp32"), CPU32)
    prepare_for_training(model, False)
    torch.manual_seed(seed)
    pm = attach_lora(model, LoraCfg(r=4, dropout=0.0, **lora))  # no dropout: both models share the RNG
    params = [p for p in pm.parameters() if p.requires_grad]
    tc = TrainCfg(lr=1e-2, warmup_steps=2, optimizer=optimizer)
    opt = build_optimizer(params, tc)
    sched = build_scheduler(opt, tc, 10)
    return pm, params, opt, sched, torch.amp.GradScaler("cpu", enabled=False)


def _step(pm, params, opt, sched):
    x = torch.tensor([[1, 5, 9, 30, 44, 2]])
    pm(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_32bit"])
def test_checkpoint_round_trip(tiny_model_dir, tmp_path, optimizer):
    pm, params, opt, sched, scaler = _setup(tiny_model_dir, 0, optimizer)
    for _ in range(3):
        _step(pm, params, opt, sched)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, TrainState(step=3, position=Position(0, 3)), pm, opt, sched, scaler, keep_last=2)
    expect_rng = (random.random(), np.random.rand(), torch.rand(1))

    pm2, params2, opt2, sched2, scaler2 = _setup(tiny_model_dir, 99, optimizer)  # different init
    state = load_checkpoint(path, pm2, opt2, sched2, scaler2)
    assert state.step == 3 and state.position == Position(0, 3)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect_rng
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()
    _step(pm, params, opt, sched)
    _step(pm2, params2, opt2, sched2)
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)  # the optimizer state came back too


def test_half_written_checkpoints_are_ignored_and_old_ones_pruned(tiny_model_dir, tmp_path):
    pm, params, opt, sched, scaler = _setup(tiny_model_dir, 0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, TrainState(step=step), pm, opt, sched, scaler, keep_last=2)
    (tmp_path / "checkpoints" / ".step-000004.tmp").mkdir()  # what a crash mid-save leaves behind
    (tmp_path / "checkpoints" / "step-000005").mkdir()  # no state.json: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"use_rslora": True}])
def test_dora_and_rslora_train(tiny_model_dir, tmp_path, lora):
    pm, params, opt, sched, _ = _setup(tiny_model_dir, 0, **lora)
    before = [p.detach().clone() for p in params]
    _step(pm, params, opt, sched)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    if lora.get("use_dora"):
        assert any("lora_magnitude_vector" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_early_stopping(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    # lr 0 can never improve validation loss, so patience 2 stops at the second evaluation after the first
    cfg = tiny_config(
        tiny_model_dir,
        train_file,
        val_file,
        tmp_path / "run",
        **{
            "train.max_steps": 20,
            "train.eval_every": 2,
            "train.lr": 1e-12,
            "train.early_stopping_patience": 2,
            "train.early_stopping_min_delta": 0.01,
        },
    )
    res = train(cfg)
    assert res.stopped_early and res.steps == 6
    vals = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "val"]
    assert vals == [0, 2, 4, 6]
    again = train(cfg, resume=True)  # a stopped run stays stopped: no more steps, no more evaluations
    assert again.stopped_early and again.steps == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "val"] == vals


def test_task_metric_logged_and_drives_early_stopping(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    overrides = {
        "train.max_steps": 20,
        "train.eval_every": 2,
        "train.lr": 1e-12,
        "train.early_stopping_patience": 2,
        "eval.metric": "f1",
        "eval.metric_samples": 2,
        "eval.max_new_tokens": 4,
        "eval.early_stopping_on": "metric",
    }
    res = finetune(tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "run", **overrides))
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "val"]
    assert all("f1" in r and 0.0 <= r["f1"] <= 1.0 for r in vals)
    assert res.stopped_early and res.steps == 6  # an unchanging f1 never improves


def test_early_stopping_on_metric_needs_a_metric():
    from lora_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.metric"):
        load_config(None, ["data.train_file=x", "eval.early_stopping_on=metric"])


class FakeCuda:
    """Two CPU generators standing in for two GPUs' random states."""

    def __init__(self, n=2, seed=0):
        self.gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]

    def is_available(self):
        return True

    def get_rng_state_all(self):
        return [g.get_state() for g in self.gens]

    def set_rng_state_all(self, states):
        for g, s in zip(self.gens, states, strict=True):
            g.set_state(s)

    def draw(self):
        return [torch.rand(3, generator=g) for g in self.gens]


def test_gpu_random_states_round_trip_through_a_checkpoint_file(tmp_path):
    from lora_tune.train.checkpoint import rng_state, set_rng_state

    cuda = FakeCuda()
    cuda.draw()
    torch.save(rng_state(cuda), tmp_path / "rng.pt")
    expected = cuda.draw()
    other = FakeCuda(seed=7)  # a fresh process: the GPUs' generators start elsewhere
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), other)
    assert all(torch.equal(a, b) for a, b in zip(other.draw(), expected, strict=True))


def test_fewer_gpus_on_resume_restores_what_it_can(tmp_path):
    from lora_tune.train.checkpoint import rng_state, set_rng_state

    cuda = FakeCuda(n=2)
    state = rng_state(cuda)
    expected = cuda.draw()[0]
    one, notes = FakeCuda(n=1, seed=9), []
    set_rng_state(state, one, note=notes.append)
    assert torch.equal(one.draw()[0], expected) and "2 GPU random states saved, 1 GPU(s) now" in notes[0]
