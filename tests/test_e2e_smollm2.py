"""End to end on the real SmolLM2-135M-Instruct (embedded GGUF, converted once into the cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from lora_tune.config import ModelCfg
from lora_tune.data.tokenize import IGNORE, encode_messages
from lora_tune.models import ensure_builtin, load_tokenizer
from lora_tune.runtime import cache_dir
from lora_tune.train.metrics import read_metrics

pytestmark = pytest.mark.slow
ASSETS = Path(str(resources.files("lora_tune") / "assets"))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return ensure_builtin("smollm2-135m", log=lambda *_: None)


def test_builtin_conversion_is_a_clean_hf_folder(smollm2):
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in (cache_dir() / "models").iterdir() if p.name.startswith(".")]  # no half-written copies
    tok = load_tokenizer(str(smollm2), ModelCfg())
    assert tok.chat_template and tok.pad_token != tok.eos_token


def test_mask_on_smollm2_template(smollm2):
    """SmolLM2's template has no {% generation %} markers (TRL refuses it); our mask still works."""
    tok = load_tokenizer(str(smollm2), ModelCfg())
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ex = encode_messages(tok, msgs)
    sup = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert sup == "Hello!<|im_end|>Goodbye.<|im_end|>"
    # the default system prompt the template injects is context, not a target
    assert "SmolLM" in tok.decode(ex.input_ids)


@pytest.fixture(scope="module")
def qlora_run(smollm2, tmp_path_factory) -> Path:
    """A short QLoRA run of the demo config through the CLI (shared by the tests below)."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = [
        sys.executable,
        "-m",
        "lora_tune.cli",
        "train",
        str(ASSETS / "demo.yaml"),
        f"output_dir={out}",
        "train.max_steps=6",  # the fewest steps that still lower the validation loss clearly
        "train.epochs=1",
        "train.eval_every=3",
        "train.save_every=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_qlora_cli_run_lowers_validation_loss(qlora_run):
    out = qlora_run
    val = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
    assert len(val) == 3
    assert val[-1] < val[0] - 0.3, val
    assert "quantization: nf4" in (out / "config.yaml").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def cli(*args: str):
    """`lora-tune ARGS` run in this process (the command itself, without a start-up of its own)."""
    from click.testing import CliRunner

    from lora_tune.cli import main

    return CliRunner().invoke(main, list(args))


def test_merge_and_gguf_export_of_a_qlora_run(qlora_run, tmp_path):
    """Merge after a short QLoRA run: fidelity within threshold, then a verified f16 GGUF."""
    merged = tmp_path / "merged"
    result = cli("merge", "--run", str(qlora_run), "--out", str(merged), "--base-weights", "dequantized")
    assert result.exit_code == 0, result.output[-3000:]
    assert "WARNING" not in result.output
    rep = json.loads((merged / "merge_report.json").read_text())
    trained = rep["fidelity"][-1]
    assert trained["reference"] == "as trained: nf4 base + adapter"
    assert trained["mean_kl"] < 1e-2 and abs(trained["ppl_merged"] / trained["ppl_reference"] - 1) < 0.02
    gguf_file = tmp_path / "model.gguf"
    result = cli("export-gguf", str(merged), "--out", str(gguf_file))
    assert result.exit_code == 0, result.output[-3000:]
    check = json.loads(gguf_file.with_suffix(".json").read_text())
    assert check["tokenizer_roundtrip"] and check["mean_kl"] < 1e-4


def test_data_inspect_with_the_real_tokenizer(smollm2):
    args = ["data", "inspect", str(ASSETS / "demo_train.jsonl"), "--max-length", "24"]
    result = cli(*args)
    assert result.exit_code == 1  # the 37-token prompts leave no answer in 24 tokens
    assert f"{ASSETS / 'demo_train.jsonl'}:1: no supervised token left" in result.output
    args[-1] = "256"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "37 (messages 37)" in result.output and "⟦Hi, this is Nimbus Support!" in result.output


def test_eval_cli_on_smollm2(smollm2, tmp_path):
    """A handful of examples: perplexity, F1/EM on generations, strided text perplexity, label likelihood."""
    sentiment = tmp_path / "sentiment.jsonl"
    rows = [
        ("I loved this film, wonderful acting.", "positive"),
        ("Terrible, boring and far too long.", "negative"),
        ("A delight from start to finish.", "positive"),
        ("I want my money back. Awful.", "negative"),
    ]
    sentiment.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Is this review positive or negative? {t}"},
                        {"role": "assistant", "content": lab},
                    ]
                }
            )
            + "\n"
            for t, lab in rows
        )
    )
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "r.json"
    result = cli(
        "eval", "--model", "builtin:smollm2-135m", "--data", str(ASSETS / "demo_val.jsonl"), "--max-samples", "3",
        "--metrics", "perplexity,f1,exact_match", "--max-new-tokens", "16", "--text", str(text), "--window", "64",
        "--stride", "32", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output[-2000:]
    m = json.loads(out.read_text())["results"]["base"]["metrics"]
    assert 1 < m["perplexity"] < 1000 and 0 <= m["f1"] <= 1 and m["exact_match"] == 0.0
    assert 1 < m["text_perplexity"] < 10  # a repeated sentence becomes very predictable
    args = ["eval", "--model", "builtin:smollm2-135m", "--data", str(sentiment), "--metrics", "accuracy,macro_f1"]
    result = cli(*args, "--out", str(out))
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(out.read_text())["results"]["base"]
    assert report["details"]["classes"]["labels"] == ["negative", "positive"]
    assert report["metrics"]["accuracy"] >= 0.75  # the instruct model already gets these easy reviews


def test_a_dequantized_smollm2_trains_as_its_4bit_layers_do(smollm2, tmp_path):
    """model.cpu_dequantize on the real model: two QLoRA steps with SmolLM2's 4-bit layers and with the
    base de-quantized once give the same losses (float tolerance: bf16 autocast where the CPU has it)."""
    from rich.console import Console

    from lora_tune.config import load_config
    from lora_tune.train.loop import train

    losses = {}
    for dequantize in (False, True):
        out = tmp_path / f"run-{dequantize}"
        over = [f"output_dir={out}", f"model.cpu_dequantize={str(dequantize).lower()}", "train.max_steps=2"]
        over += ["train.micro_batch_size=2", "data.max_length=64", "train.eval_every=0", "train.save_every=0"]
        over += ["data.val_file=null", "lora.dropout=0"]
        train(load_config(ASSETS / "demo.yaml", over), console=Console(quiet=True))
        losses[dequantize] = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)  # bit-equal here (bf16 autocast)
