"""model.cpu_dequantize: a frozen 4-bit base de-quantized once on the CPU computes what the 4-bit layers do."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from lora_tune.config import ModelCfg
from lora_tune.evaluate.generate import generate_reply
from lora_tune.evaluate.run import ModelSpec, load_for_inference
from lora_tune.models import choose_cpu_dequantize, dequantized_bytes, is_4bit, load_model
from lora_tune.runtime import Precision
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics

from conftest import tiny_config

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


def test_auto_dequantizes_only_what_fits_in_half_the_free_memory():
    assert choose_cpu_dequantize("auto", 2 * 2**30, available=8 * 2**30)[0]
    kept, why = choose_cpu_dequantize("auto", 6 * 2**30, available=8 * 2**30)
    assert not kept and "over half" in why and "true forces it" in why
    assert choose_cpu_dequantize(True, 6 * 2**30, available=8 * 2**30)[0]
    assert not choose_cpu_dequantize(False, 1, available=8 * 2**30)[0]


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_dequantized_layers_hold_the_weights_bitsandbytes_computes_with(tiny_model_dir, quant):
    import bitsandbytes.functional as bf

    four, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization=quant, cpu_dequantize=False), CPU32)
    plain, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization=quant, cpu_dequantize=True), CPU32)
    assert is_4bit(four) and not is_4bit(plain) and dequantized_bytes(plain, torch.float32) == 0
    layers = dict(plain.named_modules())
    checked = 0
    for name, mod in four.named_modules():
        if mod.__class__.__name__ == "Linear4bit":
            want = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            assert type(layers[name]) is torch.nn.Linear and not layers[name].weight.requires_grad
            assert torch.equal(layers[name].weight, want), name
            checked += 1
    assert checked == 14  # 7 linear layers in each of the 2 decoder layers; the head stays as loaded
    ids = torch.tensor([[1, 5, 9, 30, 44, 2]])
    # in training mode, as QLoRA computes: in eval mode bitsandbytes (0.50) on AVX512-BF16 CPUs repacks the
    # weights for a fused kernel that computes in bf16, which is not what training saw
    four.train()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, four(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_losses_equal_the_4bit_run(tiny_model_dir, chat_files, tmp_path, precision):
    """The same QLoRA run (dropout, checkpointing, validation) with the 4-bit layers and with the base
    de-quantized once: per-step losses equal within float tolerance, the 4-bit run being the reference."""
    train_file, val_file = chat_files
    losses = {}
    for dequantize in (False, True):
        out = tmp_path / f"run-{dequantize}"
        over = {"model.quantization": "nf4", "model.cpu_dequantize": dequantize, "train.precision": precision}
        over |= {"train.max_steps": 4, "train.eval_every": 2, "train.gradient_checkpointing": True}
        console = Console(record=True, width=200)
        train(tiny_config(tiny_model_dir, train_file, val_file, out, **over), console=console)
        assert ("de-quantized once" in console.export_text()) is dequantize
        losses[dequantize] = [(r["step"], r.get("split"), r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert [k[:2] for k in losses[True]] == [k[:2] for k in losses[False]] and len(losses[True]) == 7
    tol = 1e-6 if precision == "fp32" else 1e-2
    for (_, _, a), (_, _, b) in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, rel=tol)


def test_generation_on_a_dequantized_base_equals_the_4bit_one(tiny_model_dir, tiny_tokenizer):
    msgs = [{"role": "user", "content": "hello world"}]
    replies = []
    for dequantize in (False, True):
        model, tok, _ = load_for_inference(ModelSpec(str(tiny_model_dir), None, "nf4", dequantize), "cpu")
        assert is_4bit(model) is not dequantize
        replies.append(generate_reply(model, tok, msgs, max_new_tokens=12))
    assert replies[0] == replies[1] and replies[0]
