"""Never silently wrong: weights key the cache and deduplication, override paths resume, precision is stable,
and a best score never outlives the unit it was measured in."""

from __future__ import annotations

import shutil

import pytest
from rich.console import Console

from lora_tune.config import load_config
from lora_tune.data.cache import fingerprint
from lora_tune.data.formats import parse_record
from lora_tune.data.hygiene import deduplicate
from lora_tune.finetune import finetune
from lora_tune.runtime import cpu_bf16_flag
from lora_tune.train.loop import train

from conftest import tiny_config, tiny_overrides


def _weighted(weight):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "weight": weight},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    return parse_record({"messages": msgs}, f"mem:{weight}")[0]


def test_a_weight_is_part_of_a_record():
    a, b = _weighted(0), _weighted(1)
    kept, report = deduplicate([a, b], "exact")
    assert kept == [a, b] and report.removed == 0
    kept, _ = deduplicate([a, b], "normalized")
    assert len(kept) == 2
    assert fingerprint([a], "tok", None, {}) != fingerprint([b], "tok", None, {})  # the token cache is re-keyed


def test_a_run_with_relative_override_paths_resumes(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    train_file, val_file = chat_files
    monkeypatch.chdir(train_file.parent)
    over = tiny_overrides(tiny_model_dir, train_file, val_file, tmp_path / "run", **{"train.max_steps": 2})
    over = [o.replace(str(train_file), "train.jsonl").replace(str(val_file), "val.jsonl") for o in over]
    cfg = load_config(None, over)
    assert cfg.data.train_file == str(train_file.resolve())  # resolved at parse time, against the cwd
    train(cfg)
    assert train(load_config(None, over), resume=True).resumed_from == 2


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        (CPUINFO.format("avx512f avx512_bf16"), "avx512_bf16"),
        (CPUINFO.format("amx_tile amx_bf16"), "amx_bf16"),
        (CPUINFO.format("fma"), False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", "bf16"),
        ("model name: something without a feature list\n", None),
    ],
)
def test_cpu_bf16_is_decided_from_its_flags(text, expected):
    assert cpu_bf16_flag(text) == expected


def test_changing_what_early_stopping_watches_resets_the_best(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    out = tmp_path / "run"
    base = {"train.max_steps": 6, "train.eval_every": 2, "train.save_every": 2, "train.keep_last": 5}
    train(tiny_config(tiny_model_dir, train_file, val_file, out, **base))
    for p in (out / "checkpoints" / "step-000006", out / "adapter"):  # as if it had died after step 4
        shutil.rmtree(p)
    changed = {"eval.early_stopping_on": "metric", "eval.metric": "f1", "eval.metric_samples": 2}
    changed["eval.max_new_tokens"] = 2
    console = Console(record=True, width=250)
    res = finetune(
        tiny_config(tiny_model_dir, train_file, val_file, out, **base, **changed), resume=True, console=console
    )
    assert res.resumed_from == 4
    assert "early stopping now watches metric (f1), not loss (none)" in console.export_text()


@pytest.mark.parametrize(
    "flags, kernels, expected",
    [
        ("avx2 fma", "AVX2", "fp32"),
        ("avx2 avx512f avx512_bf16", "AVX2", "fp32"),
        ("avx512f avx512_bf16", "AVX512", "bf16"),
    ],
)
def test_inference_chooses_precision_as_training_does(tiny_model_dir, monkeypatch, flags, kernels, expected):
    """16-bit weights on a CPU without fast bf16 are up-cast to fp32 (bf16 there is ~20x slower)."""
    import torch

    from lora_tune.evaluate.run import ModelSpec, load_for_inference
    from lora_tune.runtime import CPU_FLAGS_ENV, CPU_KERNELS_ENV

    monkeypatch.setenv(CPU_FLAGS_ENV, flags)  # the runtime seam stands in for this machine's CPU
    monkeypatch.setenv(CPU_KERNELS_ENV, kernels)
    model, _, precision = load_for_inference(ModelSpec(str(tiny_model_dir), None, "bf16"), "cpu")
    assert precision.name == expected
    assert next(model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[expected]
