"""GGUF export of a merged Llama-family model (f16 or q8_0) for llama.cpp / Ollama, verified by reading
the file back with transformers' GGUF loader and comparing logits with the merged model.

The layout follows llama.cpp's converter: `token_embd`, `blk.N.attn_q/k/v/output`, `ffn_gate/up/down`,
`attn_norm`, `ffn_norm`, `output_norm`, `output` (omitted when embeddings are tied); Q and K rows are
permuted into llama.cpp's rotary layout; norms stay f32; the GPT-2 style BPE tokenizer, its merges,
special tokens and the chat template are embedded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lora_tune.errors import LoraTuneError

TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@dataclass
class GgufReport:
    path: str
    type: str
    tensors: int
    size_mb: float
    max_abs_logit_diff: float | None = None
    mean_kl: float | None = None
    tokenizer_roundtrip: bool | None = None
    worst_tensor: str | None = None  # the tensor furthest from the HF weights (relative L2 error)
    worst_tensor_error: float | None = None
    logits_checked: bool = False  # the short logits check runs only where two fp32 copies fit in RAM


def gguf_name(hf_name: str) -> str:
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    if parts[:2] != ["model", "layers"]:
        raise LoraTuneError(f"tensor {hf_name} has no GGUF name in the llama layout")
    module = ".".join(parts[3:-1])
    if module not in LAYER_NAMES:
        raise LoraTuneError(f"tensor {hf_name} has no GGUF name in the llama layout")
    return f"blk.{parts[2]}.{LAYER_NAMES[module]}.{parts[-1]}"


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved one (the inverse of transformers' un-permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_parameters(cfg: dict) -> dict:
    """The rotary settings of a config.json: transformers 5's `rope_parameters`, or the older `rope_scaling`
    with `rope_theta` beside it."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def llama3_rope_factors(cfg: dict) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3.1/3.2 rotary scaling: per frequency, the divisor that turns
    the plain rotary frequency into the scaled one (1 for high frequencies, `factor` for low ones,
    smoothly in between), as llama.cpp's converter computes it."""
    rope = rope_parameters(cfg)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = (
        float(rope.get("factor", 8.0)),
        rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0),
    )
    old_len = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tokenizer_pre(tok) -> str:
    vocab = tok.get_vocab()
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if "<|im_start|>" in vocab and len(vocab) < 60_000:
        return "smollm"
    if "<|im_start|>" in vocab:
        return "qwen2"
    return "default"


def end_of_turn_token(tok) -> str | None:
    """The token the chat template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), else EOS.

    llama.cpp stops at the GGUF's EOS/EOT: written as the lowest stop id (`<|endoftext|>` for SmolLM2,
    `<|eom_id|>` for Llama 3) the exported model never stops talking in a chat.
    """
    from lora_tune.data.templates import END_OF_TURN

    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    vocab = tok.get_vocab()
    return next((t for t in END_OF_TURN if t in template and t in vocab), tok.eos_token)


def _write_tokenizer(writer, tok, model_dir: Path) -> None:
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        raise LoraTuneError(
            "GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen 2); "
            "this model's tokenizer is not one"
        )
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in data.get("added_tokens", [])}
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
        for i in range(size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    eot = end_of_turn_token(tok)
    if eot is not None:
        writer.add_eos_token_id(vocab[eot])
        writer.add_eot_token_id(vocab[eot])
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(False)  # chat templates write BOS themselves where the model wants one
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def export_gguf(
    model_dir: str | Path, out_file: str | Path, qtype: str = "f16", verify: bool = True, log=print
) -> GgufReport:
    """Write `model_dir` (a merged HF Llama-family folder) as a GGUF file; verify it when asked."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from lora_tune.merge import base_files

    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") not in ("llama", "mistral") or cfg.get("architectures", ["LlamaForCausalLM"])[0] not in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
    ):
        raise LoraTuneError(f"GGUF export supports Llama-family models; {model_dir} is {cfg.get('model_type')}")
    if qtype not in ("f16", "q8_0"):
        raise LoraTuneError("--type must be f16 or q8_0")
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = rope_parameters(cfg)
    if rope["rope_type"] not in ("default", "llama3"):
        raise LoraTuneError(
            f"GGUF export handles plain rotary embeddings and Llama 3.1/3.2 scaling (llama3), not {rope['rope_type']}"
        )

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.stem}.partial.gguf")  # ends in .gguf: the readers want it
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _write_tokenizer(writer, tok, model_dir)

    count = 0
    if rope["rope_type"] == "llama3":  # llama.cpp reads the scaling as this tensor of frequency divisors
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg).numpy())
        count += 1
    _, files = base_files(str(model_dir))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                w = f.get_tensor(name).float()
                if name.endswith("self_attn.q_proj.weight"):
                    w = permute_rotary(w, n_head)
                elif name.endswith("self_attn.k_proj.weight"):
                    w = permute_rotary(w, n_kv)
                arr = w.numpy()
                if arr.ndim == 1:
                    writer.add_tensor(gguf_name(name), arr.astype(np.float32))
                elif qtype == "q8_0" and arr.shape[-1] % 32 == 0:
                    data = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(gguf_name(name), arr.astype(np.float16))
                count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = GgufReport(str(out_file), qtype, count, tmp.stat().st_size / 2**20)
    log(f"wrote {tmp.name} ({qtype}, {count} tensors, {report.size_mb:,.0f} MB)")
    if verify:
        try:  # verified under its temporary name: a refused file never stands at the destination
            verify_gguf(model_dir, tmp, report, log)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, out_file)
    if verify:
        out_file.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2))
    return report


# f16 rounds to ~5e-4 relative; q8_0 (one scale per 32 weights) to ~1e-2
TENSOR_TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}
LOGITS_CHECK_MAX_BYTES = 4 * 2**30  # fp32 size of a model up to which both copies are loaded for logits


@torch.no_grad()
def verify_gguf(model_dir: Path, gguf_file: Path, report: GgufReport, log=print) -> GgufReport:
    """Read the file back and compare it with the HF folder: the tokenizer, every tensor one at a time
    (memory-mapped, so a 7B model needs one tensor's RAM, not two fp32 copies), and, for models small
    enough, the logits of a short text through transformers' GGUF loader."""
    from transformers import AutoTokenizer

    text = "The capital of France is Paris. Café, naïve, 東京, 123 + 456 = 579!"
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    g_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    report.tokenizer_roundtrip = ids == g_tok(text, add_special_tokens=False)["input_ids"]
    report.worst_tensor, report.worst_tensor_error, fp32_bytes = _compare_tensors(model_dir, gguf_file)
    if fp32_bytes <= LOGITS_CHECK_MAX_BYTES:
        _compare_logits(model_dir, gguf_file, ids, report)
    same_tokens = "identical" if report.tokenizer_roundtrip else "DIFFERS"
    log(
        f"verified {gguf_file.name} against {model_dir}: tokenizer {same_tokens}"
        f", worst tensor {report.worst_tensor} (relative error {report.worst_tensor_error:.1e})"
        + (
            f", max |dlogit| {report.max_abs_logit_diff:.4f}, mean KL {report.mean_kl:.2e}"
            if report.logits_checked
            else ""
        )
    )
    bad_kl = report.logits_checked and (not math.isfinite(report.mean_kl) or report.mean_kl > 1e-2)
    if not report.tokenizer_roundtrip or report.worst_tensor_error > TENSOR_TOLERANCE[report.type] or bad_kl:
        raise LoraTuneError(
            f"{gguf_file} does not reproduce {model_dir} (tokenizer {same_tokens.lower()}, "
            f"{report.worst_tensor} off by {report.worst_tensor_error:.1e}"
            + (f", KL {report.mean_kl:.2e}" if report.logits_checked else "")
            + "); do not ship it"
        )
    return report


def _compare_tensors(model_dir: Path, gguf_file: Path) -> tuple[str, float, int]:
    """(worst tensor, its relative L2 error, the model's fp32 bytes), one tensor in memory at a time."""
    import gguf
    from safetensors import safe_open

    from lora_tune.merge import base_files

    cfg = json.loads((model_dir / "config.json").read_text())
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    written = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}
    worst, worst_err, total = "", 0.0, 0
    if rope_parameters(cfg)["rope_type"] == "llama3":
        expected = _transformers_rope_divisors(model_dir)
        got = torch.from_numpy(np.asarray(written["rope_freqs.weight"].data, dtype=np.float32))
        worst, worst_err = "rope_freqs.weight", float((got - expected).norm() / expected.norm())
    for file in base_files(str(model_dir))[1]:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                w = f.get_tensor(name).float()
                total += w.numel() * 4
                if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                    continue
                if name.endswith("self_attn.q_proj.weight"):
                    w = permute_rotary(w, n_head)
                elif name.endswith("self_attn.k_proj.weight"):
                    w = permute_rotary(w, n_kv)
                t = written.get(gguf_name(name))
                if t is None:
                    return gguf_name(name) + " (missing)", float("inf"), total
                got = torch.from_numpy(
                    np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                )  # a copy: writable
                err = float((got.reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-12))
                if err > worst_err:
                    worst, worst_err = gguf_name(name), err
    return worst, worst_err, total


def _transformers_rope_divisors(model_dir: Path) -> torch.Tensor:
    """Plain over scaled rotary frequencies, from transformers' own llama3 implementation (a check of ours)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(model_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    cfg = json.loads((model_dir / "config.json").read_text())
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    plain = 1.0 / (float(rope_parameters(cfg)["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).float()


def _compare_logits(model_dir: Path, gguf_file: Path, ids: list[int], report: GgufReport) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GgufConfig

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    if rope_parameters(ref.config.to_dict())["rope_type"] != "default":
        # transformers' GGUF reader ignores rope_freqs (checked above against transformers' own llama3
        # frequencies): compare the weights through the same rotary embedding
        got.model.rotary_emb = ref.model.rotary_emb
    x = torch.tensor([ids])
    a, b = ref(x).logits.float(), got(x).logits.float()
    report.max_abs_logit_diff = float((a - b).abs().max())
    pa, pb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    report.mean_kl = max(float((pa.exp() * (pa - pb)).sum(-1).mean()), 0.0)  # >= 0 up to float rounding
    report.logits_checked = True
