"""Merging: our streaming merge equals peft's merge, the dequantized path reproduces the NF4-trained
model, and the output folder is a standard HF model that loads offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_tune.config import LoraCfg, ModelCfg
from lora_tune.merge import merge_adapter, merged_weight, nf4_roundtrip, read_adapter
from lora_tune.models import attach_lora, load_adapter, load_model, prepare_for_training
from lora_tune.runtime import Precision
from lora_tune.train.loop import train

from conftest import tiny_config

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")
CPU16 = Precision(torch.device("cpu"), torch.bfloat16, "test")
X = torch.tensor([[1, 5, 9, 30, 44, 2, 17, 60]])


def _random_adapter(model_dir, out, **lora):
    model, tok = load_model(ModelCfg(source=str(model_dir), quantization="fp32"), CPU32)
    prepare_for_training(model, False)
    torch.manual_seed(0)
    pm = attach_lora(model, LoraCfg(r=4, alpha=8, dropout=0.0, **lora))
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1) if "magnitude" not in n else p.data.mul_(1.1)
    pm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "lora_tune.json").write_text(json.dumps({"base_model": str(model_dir), "quantization": "fp32"}))
    return pm


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merged_weights_equal_peft_merge(tiny_model_dir, tmp_path, lora):
    pm = _random_adapter(tiny_model_dir, tmp_path / "a", **lora)
    adapter = read_adapter(tmp_path / "a")
    base = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    peft_merged = pm.merge_and_unload().state_dict()
    assert len(adapter.pairs) == 14
    for name, parts in adapter.pairs.items():
        torch.testing.assert_close(
            merged_weight(base[name], parts, adapter.scale()), peft_merged[name], rtol=1e-5, atol=1e-6
        )


def test_merge_output_loads_offline_and_matches_adapter(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, train_file, val_file, run, **{"train.max_steps": 6}))
    rep = merge_adapter(run / "adapter", tmp_path / "merged", dtype="fp16", log=lambda *_: None)
    out = tmp_path / "merged"
    assert rep.merged_tensors == 14 and not rep.warnings
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".merged.*"))  # no temporary folder left behind
    fid = rep.fidelity[0]
    assert fid.reference == "16-bit base + adapter" and fid.mean_kl < 2e-3 and fid.ppl_rel_diff < 0.01
    merged = AutoModelForCausalLM.from_pretrained(out)  # HF_HUB_OFFLINE=1 in conftest
    assert merged.dtype == torch.float16
    base = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.float()(X).logits, base(X).logits, rtol=2e-2, atol=2e-2)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    card = (out / "README.md").read_text()
    assert "LoRA r=4" in card and "Fidelity" in card and "merged into the original base weights" in card


def test_nf4_roundtrip_is_what_the_4bit_model_computes_with(tiny_model_dir):
    import bitsandbytes.functional as bf

    q_model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="nf4", cpu_dequantize=False), CPU16)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    layer = q_model.model.layers[1].self_attn.q_proj
    want = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    got = nf4_roundtrip(dense["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got, want)


def test_dequantized_merge_reproduces_the_qlora_model(tiny_model_dir, chat_files, tmp_path):
    train_file, val_file = chat_files
    run = tmp_path / "run"
    train(
        tiny_config(
            tiny_model_dir,
            train_file,
            val_file,
            run,
            **{"train.max_steps": 6, "model.quantization": "nf4", "train.precision": "bf16"},
        )
    )
    orig = merge_adapter(run / "adapter", tmp_path / "m-orig", dtype="fp16", log=lambda *_: None)
    deq = merge_adapter(
        run / "adapter", tmp_path / "m-deq", dtype="fp16", base_weights="dequantized", log=lambda *_: None
    )
    vs_trained = {r.base_weights: r.fidelity[-1] for r in (orig, deq)}
    assert vs_trained["dequantized"].reference.startswith("as trained: nf4")
    assert vs_trained["dequantized"].mean_kl < vs_trained["original"].mean_kl / 5


def test_merge_errors(tmp_path):
    from lora_tune.errors import LoraTuneError

    with pytest.raises(LoraTuneError, match="not an adapter folder"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_cat_combination_is_the_weighted_sum_of_updates(tiny_model_dir, tmp_path):
    from lora_tune.combine import combine_adapters

    _random_adapter(tiny_model_dir, tmp_path / "a")
    torch.manual_seed(1)
    model, tok = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    pm = attach_lora(model, LoraCfg(r=2, alpha=4, dropout=0.0))
    for p in pm.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "lora_tune.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    out = combine_adapters([tmp_path / "a", tmp_path / "b"], [0.7, 0.3], "cat", tmp_path / "c")
    a, b, c = (read_adapter(tmp_path / x) for x in "abc")
    assert c.config["r"] == 4 + 2
    name = "model.layers.0.self_attn.q_proj.weight"
    zero = torch.zeros_like(a.pairs[name]["B"] @ a.pairs[name]["A"])
    want = 0.7 * merged_weight(zero, a.pairs[name], a.scale()) + 0.3 * merged_weight(zero, b.pairs[name], b.scale())
    torch.testing.assert_close(merged_weight(zero, c.pairs[name], c.scale()), want, rtol=1e-4, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "lora_tune.json").read_text())["method"] == "cat"


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "svd"])
def test_other_combinations_load_and_differ(tiny_model_dir, tmp_path, method):
    from peft import PeftModel

    from lora_tune.combine import combine_adapters

    _random_adapter(tiny_model_dir, tmp_path / "a")
    _random_adapter(tiny_model_dir, tmp_path / "b", use_rslora=True)  # same rank, other scale and values
    torch.manual_seed(0)
    combine_adapters([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], method, tmp_path / "c")
    outs = []
    for name in "abc":
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            outs.append(PeftModel.from_pretrained(base, tmp_path / name).eval()(X).logits)
    assert not torch.allclose(outs[2], outs[0]) and not torch.allclose(outs[2], outs[1])
    assert torch.isfinite(outs[2]).all()


@pytest.mark.parametrize("qtype, max_kl", [("f16", 1e-6), ("q8_0", 1e-2)])
def test_gguf_round_trip_on_tiny_model(tiny_model_dir, tmp_path, qtype, max_kl):
    from lora_tune.export_gguf import export_gguf

    rep = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", qtype, log=lambda *_: None)
    assert rep.tokenizer_roundtrip and rep.mean_kl < max_kl and rep.tensors == 2 * 9 + 3
    assert json.loads((tmp_path / "tiny.json").read_text())["type"] == qtype


def test_gguf_refuses_other_architectures(tmp_path):
    from lora_tune.errors import LoraTuneError
    from lora_tune.export_gguf import export_gguf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LoraTuneError, match="Llama-family"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_the_fidelity_check_runs_where_the_model_fits():
    from lora_tune.merge import fidelity_device

    gib = 2**30
    assert fidelity_device(14 * gib, None) == "cpu"  # no GPU
    assert fidelity_device(14 * gib, 10 * gib) == "cpu"  # a 7B model in 16 bits on a 12 GB card
    assert fidelity_device(int(0.27 * gib), 10 * gib) == "cuda"  # SmolLM2-135M fits anywhere
    assert fidelity_device(14 * gib, 20 * gib) == "cuda"


def _gguf_field(path, key):
    import gguf

    field = gguf.GGUFReader(str(path)).fields[key]
    return field.parts[field.data[0]].tolist()[0]


def test_gguf_eos_is_the_chat_templates_end_of_turn(tiny_model_dir, tmp_path):
    """Not the lowest stop id: a tokenizer whose EOS is <|endoftext|> but whose template ends turns with
    <|im_end|> must be exported with <|im_end|> as EOS and EOT, or llama.cpp never stops."""
    import shutil

    from transformers import AutoTokenizer

    from lora_tune.export_gguf import export_gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(model)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, verify=False, log=lambda *_: None)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _gguf_field(out, "tokenizer.ggml.eos_token_id") == im_end
    assert _gguf_field(out, "tokenizer.ggml.eot_token_id") == im_end


def test_a_gguf_that_fails_verification_never_reaches_the_destination(tiny_model_dir, tmp_path, monkeypatch):
    from lora_tune import export_gguf as eg
    from lora_tune.errors import LoraTuneError

    def refuse(*a, **kw):
        raise LoraTuneError("does not reproduce")

    monkeypatch.setattr(eg, "verify_gguf", refuse)
    with pytest.raises(LoraTuneError, match="does not reproduce"):
        eg.export_gguf(tiny_model_dir, tmp_path / "m.gguf", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary copy is left


def test_gguf_verification_compares_every_tensor_without_logits_for_big_models(tiny_model_dir, tmp_path, monkeypatch):
    """Above the logits-check size only the tensor-by-tensor comparison runs; a corrupted tensor is caught."""
    import gguf
    import numpy as np

    from lora_tune import export_gguf as eg
    from lora_tune.errors import LoraTuneError

    monkeypatch.setattr(eg, "LOGITS_CHECK_MAX_BYTES", 0)  # as if the model were too big for two fp32 copies
    rep = eg.export_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16", log=lambda *_: None)
    assert not rep.logits_checked and rep.worst_tensor_error < eg.TENSOR_TOLERANCE["f16"]
    # damage one tensor of the written file in place, then verify again
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"), "r+")
    target = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    target.data[:] = np.float16(0.5)
    reader.data.flush()
    with pytest.raises(LoraTuneError, match="blk.1.ffn_up.weight off by"):
        eg.verify_gguf(tiny_model_dir, tmp_path / "m.gguf", eg.GgufReport(str(tmp_path / "m.gguf"), "f16", 0, 0.0))


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_gguf_of_a_llama_31_style_rope_scaling(tiny_model_dir, tmp_path, key):
    """Llama 3.1/3.2 (rope_type llama3) exports with llama.cpp's rope_freqs, checked against transformers'
    own llama3 frequencies, and the weights' logits still match."""
    import shutil

    import gguf

    from lora_tune.export_gguf import export_gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 64
    cfg[key] = {**scaling, "rope_theta": 10000.0} if key == "rope_parameters" else scaling
    (model / "config.json").write_text(json.dumps(cfg))
    rep = export_gguf(model, tmp_path / "m.gguf", "f16", log=lambda *_: None)
    assert rep.logits_checked and rep.mean_kl < 1e-5 and rep.tensors == 2 * 9 + 3 + 1
    freqs = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "rope_freqs.weight")
    values = freqs.data.tolist()
    assert values[0] == 1.0 and values[-1] == 8.0 and values == sorted(values)  # high frequencies kept, low ones /8
