"""train.compile: compiled decoder layers train to the same losses as eager ones, with checkpointing,
length-grouped batches of changing shapes and 4-bit layers; `auto` decides by device and run length."""

from __future__ import annotations

import json

import pytest
import torch

from lora_tune.errors import LoraTuneError
from lora_tune.train import compile as C

from conftest import chat, tiny_config, write_jsonl


def test_auto_compiles_long_cpu_runs_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not C.choose_compile(False, cpu, 10_000).on
    assert not C.choose_compile("auto", cuda, 10_000).on  # not measured on GPUs yet
    short = C.choose_compile("auto", cpu, C.AUTO_MIN_STEPS - 1)
    assert not short.on and "too few" in short.reason
    assert C.choose_compile("auto", cpu, C.AUTO_MIN_STEPS).on == (C.cxx_compiler() is not None)
    monkeypatch.setattr(C, "cxx_compiler", lambda: None)
    assert not C.choose_compile("auto", cpu, 10_000).on
    with pytest.raises(LoraTuneError, match="needs a C.. compiler"):
        C.choose_compile(True, cpu, 10)


def _varied_chats(tmp_path):
    """Chats of clearly different lengths, so length-grouped batches change shape from step to step."""
    rows = [chat(f"what is {i} plus {i}?" + " and then" * (i % 5 * 4), f"the answer is {2 * i}.") for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("split", "train") == "train"]


def _train_eager_and_compiled(model_dir, tmp_path, **over) -> dict[bool, list[float]]:
    """The per-step training losses of the same run with train.compile false and true."""
    from lora_tune.finetune import finetune

    train = _varied_chats(tmp_path)
    over = {"train.gradient_checkpointing": True, "lora.dropout": 0.0, "train.save_every": 0, **over}
    runs = {}
    for setting in (False, True):
        out = tmp_path / f"compile-{setting}"
        finetune(tiny_config(model_dir, train, None, out, **over, **{"train.compile": setting}))
        runs[setting] = _losses(out)
    return runs


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones_with_checkpointing_and_grouped_batches(tiny_model_dir, tmp_path):
    runs = _train_eager_and_compiled(tiny_model_dir, tmp_path, **{"train.max_steps": 4, "data.group_by_length": True})
    assert len(runs[True]) == 4
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.slow
def test_compiled_4bit_layers_train_like_eager_ones(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    over = {"model.quantization": "nf4", "train.precision": "bf16", "train.max_steps": 3}
    runs = _train_eager_and_compiled(tiny_model_dir, tmp_path, **over)
    # bf16 compute: fused kernels round differently, so equal to bf16's precision, not bit for bit
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)


def test_evaluation_runs_compiled_layers_eagerly_and_restores_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_tune.runtime import evaluating

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    assert C.compile_layers(model) == 2
    layers = C.decoder_layers(model)
    with evaluating(model):
        assert all(layer._compiled_call_impl is None for layer in layers) and not model.training
    assert all(layer._compiled_call_impl is not None for layer in layers) and model.training
