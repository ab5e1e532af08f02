from __future__ import annotations

import pytest
import torch

from lora_tune.config import LoraCfg, ModelCfg
from lora_tune.errors import LoraTuneError
from lora_tune.models import (
    attach_lora,
    fix_tokenizer,
    load_model,
    prepare_for_training,
    resolve_source,
)
from lora_tune.runtime import CpuKind, Precision, avx2_kind_env, choose_precision, cpu_flags, cpu_kind

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")
CPU16 = Precision(torch.device("cpu"), torch.bfloat16, "test")


def test_resolve_source_errors(tmp_path):
    with pytest.raises(LoraTuneError, match="does not exist"):
        resolve_source(str(tmp_path / "missing-model"))
    with pytest.raises(LoraTuneError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(LoraTuneError, match="unknown builtin"):
        resolve_source("builtin:gpt-17")
    assert resolve_source("org/model-name") == "org/model-name"  # a hub id passes through


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(LoraTuneError, match="could not load"):
        load_model(ModelCfg(source="nobody-here/no-such-model", quantization="fp32"), CPU32)


def test_pad_token_made_distinct_from_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.pad_token = tok.eos_token
    note = fix_tokenizer(tok)
    assert tok.pad_token != tok.eos_token and note
    assert tok.padding_side == "right"


def _inputs():
    return torch.tensor([[1, 5, 9, 30, 44, 2], [1, 7, 7, 12, 3, 2]])


def test_lora_at_init_equals_base(tiny_model_dir):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    with torch.no_grad():
        base = model(_inputs()).logits.clone()
    prepare_for_training(model, gradient_checkpointing=False)
    peft_model = attach_lora(model, LoraCfg(r=4, alpha=8, dropout=0.0))
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(_inputs()).logits, base)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # all-linear: every projection of every layer is adapted (the LM head is not)
    assert sum("lora_A" in n for n in names) == 2 * 7


def test_bad_target_modules_lists_real_names(tiny_model_dir):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    with pytest.raises(LoraTuneError, match="q_proj"):
        attach_lora(model, LoraCfg(target_modules=["qq_proj"]))


def test_prepare_does_not_upcast_frozen_weights(tiny_model_dir):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="bf16"), CPU16)
    prepare_for_training(model, gradient_checkpointing=True)
    model = attach_lora(model, LoraCfg(r=4))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}  # peft's prepare_model_for_kbit_training would make these fp32
    assert trainable == {torch.float32}


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_load_on_cpu(tiny_model_dir, quant):
    import bitsandbytes as bnb

    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization=quant, cpu_dequantize=False), CPU16)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quant != "int8" else bnb.nn.Linear8bitLt)
    with torch.no_grad(), CPU16.autocast():
        assert torch.isfinite(model(_inputs()).logits).all()


def test_nf4_lora_gradients_match_dequantized_model(tiny_model_dir):
    """QLoRA backward through bnb's 4-bit matmul equals backward through the same weights in dense form."""
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    q_model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="nf4", cpu_dequantize=False), CPU32)
    d_model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    # give the dense model exactly the weights the 4-bit model computes with
    dense = dict(d_model.named_modules())
    for name, mod in q_model.named_modules():
        if mod.__class__.__name__ == "Linear4bit":
            w = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            dense[name].weight.data.copy_(w)
    grads = []
    for m in (q_model, d_model):
        prepare_for_training(m, gradient_checkpointing=True)
        torch.manual_seed(1)
        pm = attach_lora(m, LoraCfg(r=4, alpha=8, dropout=0.0))
        for n, p in pm.named_parameters():  # non-zero B so gradients flow to A as well
            if "lora_B" in n:
                torch.manual_seed(hash(n) % 1000)
                p.data.normal_(0, 0.02)
        x = _inputs()
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5, msg=n)


AVX512_BF16 = CpuKind(frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512")


@pytest.mark.parametrize(
    "kind, dtype, why",
    [
        (AVX512_BF16, torch.bfloat16, "avx512_bf16"),
        (CpuKind(AVX512_BF16.flags, "AVX2"), torch.float32, "torch runs AVX2 kernels here"),  # ATEN_CPU_CAPABILITY
        (CpuKind(frozenset({"avx2", "fma"}), "AVX2"), torch.float32, "no bf16 instructions"),
        (CpuKind(frozenset({"amx_tile", "amx_bf16"}), "AVX512"), torch.bfloat16, "amx_bf16"),
        (CpuKind(frozenset({"amx_bf16"}), "DEFAULT"), torch.float32, "DEFAULT kernels"),
        (CpuKind(frozenset({"asimd", "bf16"}), "DEFAULT"), torch.bfloat16, "(bf16)"),  # Arm needs no x86 kernels
    ],
)
def test_auto_precision_on_each_cpu_kind(kind, dtype, why):
    auto = choose_precision("auto", torch.device("cpu"), cpu=kind)
    assert auto.dtype is dtype and why in auto.reason


def test_precision_choices():
    cpu = torch.device("cpu")
    assert choose_precision("fp32", cpu).dtype is torch.float32
    assert choose_precision("auto", cpu, weight_dtype="bf16").dtype is torch.bfloat16
    unknown = choose_precision("auto", cpu, cpu=CpuKind(frozenset(), "AVX2"))  # no feature list: measured
    assert unknown.dtype in (torch.float32, torch.bfloat16) and "measured" in unknown.reason
    assert choose_precision("auto", cpu, saved="fp32", cpu=AVX512_BF16).dtype is torch.float32  # a resume keeps it
    with pytest.raises(LoraTuneError, match="fp16"):
        choose_precision("fp16", cpu)
    with pytest.raises(LoraTuneError, match="does not match"):
        choose_precision("fp32", cpu, weight_dtype="bf16")


def test_the_cpu_kind_comes_from_the_seam_when_set():
    """LORA_TUNE_CPU_FLAGS / LORA_TUNE_CPU_KERNELS stand in for this machine's CPU (tests and benchmarks
    use them to see another kind); without them the kind is this machine's /proc/cpuinfo and torch's level."""
    kind = cpu_kind({"LORA_TUNE_CPU_FLAGS": "avx2, fma avx512_bf16", "LORA_TUNE_CPU_KERNELS": "avx2"})
    assert kind == CpuKind(frozenset({"avx2", "fma", "avx512_bf16"}), "AVX2") and kind.bf16_fast is False
    own = cpu_kind({})
    assert own.flags == frozenset(cpu_flags()) and own.kernels == torch.backends.cpu.get_cpu_capability()
    assert cpu_kind(avx2_kind_env({})).bf16_flag is False


def test_a_process_sees_the_avx2_kind_under_its_environment():
    """With torch's kernels held to AVX2 (ATEN_CPU_CAPABILITY) and the seam's flags those of an AVX2 CPU,
    a fresh process chooses fp32 as such a machine does, whatever this machine's CPU is."""
    import subprocess
    import sys

    code = "import torch; from lora_tune.runtime import choose_precision as c; print(c('auto', torch.device('cpu')))"
    env = avx2_kind_env()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "torch.float32" in out and "no bf16 instructions" in out


def test_validation_does_not_break_qlora_gradients(tiny_model_dir):
    """Regression: bitsandbytes repacks a 4-bit weight for inference the first time it runs in eval mode
    on AVX512-BF16 CPUs and never unpacks it, silently dropping gradients through it afterwards. A
    validation pass in the middle of training must leave the gradients exactly as they were.
    (On CPUs without AVX512-BF16 bitsandbytes never repacks, and this passes either way.)"""
    from lora_tune.data.batching import collate
    from lora_tune.data.tokenize import Example
    from lora_tune.losses import evaluate_loss

    batch = collate([Example([1, 5, 9, 30, 44, 2], [1, 5, 9, 30, 44, 2])] * 2, pad_id=0)
    grads = []
    for validate_first in (False, True):
        model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="nf4", cpu_dequantize=False), CPU16)
        prepare_for_training(model, gradient_checkpointing=True)
        torch.manual_seed(1)
        pm = attach_lora(model, LoraCfg(r=4, alpha=8, dropout=0.0))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
        pm.train()
        if validate_first:
            evaluate_loss(pm, [batch], CPU16.autocast)
            assert pm.training
        with CPU16.autocast():
            pm(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    """No network, a hub id not in the cache: one clear error in seconds, not five retries with back-off."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    code = "from lora_tune.models import resolve_source; resolve_source('someorg/somemodel')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "can't be reached" in out.stderr and "Retrying" not in out.stderr
