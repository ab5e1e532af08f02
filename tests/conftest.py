"""Shared fixtures: a tiny random Llama with a tiny BPE tokenizer, saved as a local HF folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Any accidental hub access must fail loudly, not download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def threads_per_worker() -> int | None:
    """CPU threads for each pytest-xdist worker: the cores shared out, so that workers (and the servers and
    trainings they start) do not oversubscribe them; None outside xdist. OpenMP threads spinning on a
    core another worker needs made the suite ~25% slower on 2 cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // workers) if workers else None


if threads_per_worker() is not None:  # before torch starts its thread pool; children inherit it
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker()))

from lora_tune.data.templates import CHATML  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "user assistant system: answer the question about notes and sync",
    "0123456789 + - * / = ! ? . , ; : ' \" ( ) [ ] { }",
]


def build_tokenizer(with_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>"
    )
    if with_template:
        tok.chat_template = CHATML
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local HF folder (config, fp32 safetensors, tokenizer with a chat template)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_tiny_model(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": [*msgs, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    """Small train/validation chat files the tiny model can learn from."""
    pairs = [(f"what is {i} plus {i}?", f"the answer is {2 * i}.") for i in range(24)]
    train = write_jsonl(tmp_path / "train.jsonl", [chat(q, a, "answer the question") for q, a in pairs[:20]])
    val = write_jsonl(tmp_path / "val.jsonl", [chat(q, a, "answer the question") for q, a in pairs[20:]])
    return train, val


def tiny_overrides(model_dir: Path, train: Path, val: Path | None, out: Path, **extra) -> list[str]:
    """Config overrides for a fast fp32 LoRA run on the tiny model."""
    base = {
        "model.source": str(model_dir),
        "model.quantization": "fp32",
        "data.train_file": str(train),
        "data.max_length": 64,
        "train.micro_batch_size": 4,
        "train.max_steps": 6,
        "train.lr": 5e-3,
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.save_every": 2,
        "train.gradient_checkpointing": False,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.1,
        "output_dir": str(out),
    }
    if val is not None:
        base["data.val_file"] = str(val)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(model_dir: Path, train: Path, val: Path | None, out: Path, **extra):
    """A validated RunCfg for a fast fp32 LoRA run on the tiny model (see `tiny_overrides`)."""
    from lora_tune.config import load_config

    return load_config(None, tiny_overrides(model_dir, train, val, out, **extra))


def train_in_process(args: list[str]) -> None:
    """`lora-tune train CONFIG KEY=VALUE ...` run in this process, with one thread as `cli_process` gives its
    children, so that its numbers equal theirs bit for bit (a reference run without a start-up of its own)."""
    import torch
    from rich.console import Console

    from lora_tune.config import load_config
    from lora_tune.train.loop import train

    assert args[0] == "train" and not [a for a in args[2:] if a.startswith("--")], args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(args[1], args[2:]), console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)


def cli_process(args: list[str], **env: str):
    """`lora-tune ARGS` in a child process (one thread, unbuffered), with `env` added to the environment."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# the test files that take longest, longest first: `make test` hands whole files to its workers in
# collection order, so starting these first keeps one worker from finishing a long file alone at the end
LONGEST_FIRST = (
    "test_e2e_smollm2.py",
    "test_distributed.py",
    "test_serve_jobs.py",
    "test_serve_smollm2.py",
    "test_faults.py",
    "test_train.py",
    "test_preference.py",
    "test_compile.py",
    "test_dashboard.py",
    "test_recipes.py",
)


def pytest_collection_modifyitems(config, items):
    """Longest files first (see LONGEST_FIRST); `@pytest.mark.cuda` tests need a GPU: skipped where torch
    sees none (CI, this project's machines)."""
    import torch

    if threads_per_worker() is not None:
        torch.set_num_threads(threads_per_worker())
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_acceptance.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
