"""Merging a LoRA adapter into a deployable 16-bit model, and checking that it kept its behaviour.

The merge streams the base checkpoint tensor by tensor: each adapted weight becomes W + s * B @ A (or
DoRA's re-normalised form), computed in fp32 and stored in bf16/fp16, into the original 16-bit weights
or, with `dequantized`, into the NF4 weights the adapter was trained against (quantize, then
dequantize, exactly as bitsandbytes did at training time). Peak memory stays near one output shard,
and nothing is ever merged into 4-bit weights (re-quantising would round the update away).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tune.atomic import replace_dir
from lora_tune.errors import LoraTuneError
from lora_tune.runtime import DTYPES, peak_rss_mb

SHARD_BYTES = 2 * 2**30
ADAPTER_PREFIX = "base_model.model."


@dataclass
class Fidelity:
    """How closely the merged model reproduces a reference model on held-out text."""

    reference: str
    max_abs_logit_diff: float
    mean_kl: float  # nats per token, KL(reference || merged)
    ppl_reference: float
    ppl_merged: float
    tokens: int

    @property
    def ppl_rel_diff(self) -> float:
        return abs(self.ppl_merged - self.ppl_reference) / self.ppl_reference


@dataclass
class MergeReport:
    out_dir: str
    base: str
    adapter: str
    base_weights: str
    dtype: str
    merged_tensors: int
    peak_rss_mb: float
    model_mb: float
    fidelity: list[Fidelity] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Reading the adapter


@dataclass
class AdapterWeights:
    config: dict[str, Any]
    meta: dict[str, Any]
    pairs: dict[str, dict[str, torch.Tensor]]  # base weight name -> {"A", "B", optional "m"}

    def scale(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | Path) -> AdapterWeights:
    from safetensors.torch import load_file

    from lora_tune.models import adapter_meta

    adapter_dir = Path(adapter_dir)
    meta = adapter_meta(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraTuneError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA can be merged")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if config.get(k)]
    if unsupported or config.get("fan_in_fan_out"):
        raise LoraTuneError(
            f"{adapter_dir}: adapters with {', '.join(unsupported) or 'fan_in_fan_out'} "
            "are not supported by the streaming merge yet"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?", key.removeprefix(ADAPTER_PREFIX))
        if not m:
            raise LoraTuneError(f"{adapter_dir}: unexpected tensor {key} in the adapter")
        slot = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "m"}[m.group(2)]
        pairs.setdefault(f"{m.group(1)}.weight", {})[slot] = t
    return AdapterWeights(config, meta, pairs)


# ----------------------------------------------------------------------------------------------------
# Base checkpoint files


def base_files(path: str) -> tuple[Path, list[Path]]:
    """(folder, safetensors files) of a local HF model folder."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return folder, [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return folder, [single]
    raise LoraTuneError(
        f"{folder} has no safetensors weights (model.safetensors or an index); "
        "convert the checkpoint to safetensors first"
    )


def nf4_roundtrip(w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True) -> torch.Tensor:
    """The weight as the 4-bit model sees it: quantised and dequantised by bitsandbytes (blocksize 64)."""
    import bitsandbytes.functional as bf

    q, state = bf.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant, quant_storage=torch.uint8
    )
    return bf.dequantize_4bit(q, state).to(w.dtype)


def merged_weight(w: torch.Tensor, lora: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """W + s B A in fp32; with a DoRA magnitude vector m, m * (W + s B A) / ||W + s B A|| (row norms)."""
    w32 = w.float() + scale * (lora["B"].float() @ lora["A"].float())
    if "m" in lora:
        norm = w32.norm(p=2, dim=1, keepdim=True)
        w32 = lora["m"].float().view(-1, 1) * w32 / norm
    return w32


def stream_merge(
    base_dir: str,
    adapter: AdapterWeights,
    out_dir: Path,
    dtype: str,
    base_weights: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[int, float]:
    """Write merged safetensors shards into `out_dir`; returns (merged tensor count, bytes written)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, files = base_files(base_dir)
    want = DTYPES[dtype]
    remaining = dict(adapter.pairs)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes, shards, weight_map = 0, 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    merged = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no iterator
                w = f.get_tensor(name)
                if name in remaining:
                    base_w = (
                        nf4_roundtrip(w.to(torch.bfloat16), quant_type, double_quant)
                        if base_weights == "dequantized"
                        else w
                    )
                    w = merged_weight(base_w, remaining.pop(name), adapter.scale())
                    merged += 1
                out = w.to(want) if w.is_floating_point() else w
                shard[name] = out.contiguous()
                shard_bytes += out.numel() * out.element_size()
                total_bytes += out.numel() * out.element_size()
                if shard_bytes >= SHARD_BYTES:
                    flush()
    flush()
    if remaining:
        raise LoraTuneError(
            f"the adapter targets weights the base model lacks, e.g. {next(iter(remaining))}; "
            "is this the base it was trained on?"
        )
    if len(shards) > 1:
        final = {}
        for i, old in enumerate(shards):
            new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(out_dir / old, out_dir / new)
            final[old] = new
        weight_map = {k: final[v] for k, v in weight_map.items()}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
        )
    else:
        os.replace(out_dir / shards[0], out_dir / "model.safetensors")
    for extra in ("config.json", "generation_config.json"):
        if (folder / extra).is_file():
            shutil.copy(folder / extra, out_dir / extra)
    return merged, total_bytes


# ----------------------------------------------------------------------------------------------------
# Fidelity


BUILTIN_SAMPLES = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "Give me one tip for writing clear emails."},
        {"role": "assistant", "content": "Put the request in the first sentence, then add only the context needed."},
    ],
    [
        {"role": "user", "content": "Translate 'good morning' into Spanish."},
        {"role": "assistant", "content": "Buenos días."},
    ],
    [
        {"role": "user", "content": "Summarise: the meeting moved from Monday to Wednesday at 10am."},
        {"role": "assistant", "content": "The meeting is now on Wednesday at 10am."},
    ],
]


def fidelity_examples(tok, meta: dict[str, Any], n: int = 8, max_length: int = 256):
    """Held-out samples: the run's validation data when known, else a few built-in conversations."""
    from lora_tune.data.formats import Record
    from lora_tune.data.pairs import parse_pref_record
    from lora_tune.data.readers import load_records
    from lora_tune.data.tokenize import encode_records

    data = (meta.get("config") or {}).get("data") or {}
    source = next((p for p in (data.get("val_file"), data.get("train_file")) if p and Path(p).exists()), None)
    if source and meta.get("objective", "sft") != "sft":  # preference data: the prompts with their first answer
        records = [r.as_sft() for r in load_records(source, parse=parse_pref_record)[:n]]
    elif source:
        records = load_records(source)[:n]
    else:
        records = [Record(f"builtin:{i}", messages=m) for i, m in enumerate(BUILTIN_SAMPLES)]
    examples, _ = encode_records(tok, records, max_length=max_length)
    return examples, source or "built-in prompts"


@torch.no_grad()
def _logits(model, examples, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """fp32 logits on the CPU (with masks and labels), the inputs put on the model's own device."""
    from lora_tune.data.batching import collate

    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(examples), 4):
        b = collate(examples[lo : lo + 4], pad_id)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().cpu()
        out.append((logits, b["attention_mask"].bool(), b["labels"]))
    return out


def fidelity_device(model_bytes: int, free_gpu_bytes: int | None) -> str:
    """Where the check runs: the GPU when a 16-bit copy of the model fits in its free memory with room
    for activations (a quarter more, plus 1 GiB), else the CPU. `free_gpu_bytes` None means no GPU."""
    if free_gpu_bytes is not None and model_bytes * 1.25 + 2**30 < free_gpu_bytes:
        return "cuda"
    return "cpu"


def compare_logits(ref, merged, name: str) -> Fidelity:
    import torch.nn.functional as F

    max_diff, kl_sum, n_tok = 0.0, 0.0, 0
    nll = {"ref": 0.0, "merged": 0.0}
    n_sup = 0
    for (lr, mask, labels), (lm, _, _) in zip(ref, merged, strict=True):
        max_diff = max(max_diff, float((lr - lm).abs()[mask].max()))
        pr, pm = F.log_softmax(lr, -1), F.log_softmax(lm, -1)
        kl = (pr.exp() * (pr - pm)).sum(-1)
        kl_sum += float(kl[mask].sum())
        n_tok += int(mask.sum())
        tgt = labels[:, 1:]
        keep = tgt != -100
        for key, lp in (("ref", pr), ("merged", pm)):
            nll[key] -= float(lp[:, :-1][keep].gather(-1, tgt[keep].unsqueeze(-1)).sum())
        n_sup += int(keep.sum())
    return Fidelity(
        name,
        max_diff,
        max(kl_sum / max(n_tok, 1), 0.0),  # KL >= 0; float rounding can give -1e-9
        math.exp(nll["ref"] / max(n_sup, 1)),
        math.exp(nll["merged"] / max(n_sup, 1)),
        n_tok,
    )


def check_fidelity(
    out_dir: Path, base_path: str, adapter_dir: Path, dtype: str, trained_quant: str | None, log=print
) -> tuple[list[Fidelity], str]:
    """Merged model vs base+adapter (16-bit base), and vs the model as trained (quantized base + adapter)."""
    from lora_tune.config import ModelCfg
    from lora_tune.evaluate.run import inference_precision
    from lora_tune.models import adapter_meta, load_adapter, load_model, load_tokenizer
    from lora_tune.runtime import choose_device

    tok = load_tokenizer(str(adapter_dir), ModelCfg(source=str(adapter_dir)))
    examples, source = fidelity_examples(tok, adapter_meta(adapter_dir))
    size = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    device = choose_device(fidelity_device(size, free))
    if device.type == "cpu" and free is not None:
        log(f"fidelity check on the CPU: the {size / 2**30:.1f} GiB merged model does not fit the GPU's free memory")
    # on a CPU, 16-bit weights are up-cast (exactly) to fp32 unless it computes bf16 fast
    load_dtype, prec16 = inference_precision(dtype, device)
    merged, _ = load_model(ModelCfg(source=str(out_dir), quantization=load_dtype), prec16, str(out_dir))
    merged_logits = _logits(merged.eval(), examples, tok.pad_token_id)
    del merged
    refs = [("16-bit base + adapter", load_dtype)]
    if trained_quant in ("nf4", "fp4", "int8"):
        refs.append((f"as trained: {trained_quant} base + adapter", trained_quant))
    results = []
    for name, quant in refs:
        model, _ = load_model(ModelCfg(source=base_path, quantization=quant), prec16, base_path)
        model = load_adapter(model, adapter_dir).eval()
        with prec16.autocast():
            ref_logits = _logits(model, examples, tok.pad_token_id)
        del model
        results.append(compare_logits(ref_logits, merged_logits, name))
        log(
            f"fidelity vs {name}: max |dlogit| {results[-1].max_abs_logit_diff:.4f}, "
            f"mean KL {results[-1].mean_kl:.2e}, ppl {results[-1].ppl_reference:.3f} -> {results[-1].ppl_merged:.3f}"
        )
    return results, source


# ----------------------------------------------------------------------------------------------------
# The merge command


def _generation_config(out_dir: Path, tok) -> None:
    from lora_tune.evaluate.generate import stop_ids

    path = out_dir / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.update({"eos_token_id": stop_ids(tok), "pad_token_id": tok.pad_token_id})
    path.write_text(json.dumps(cfg, indent=2))


def _model_card(report: MergeReport, adapter: AdapterWeights, adapter_dir: Path) -> str:
    c, meta = adapter.config, adapter.meta
    cfg = meta.get("config") or {}
    targets = c["target_modules"]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {report.base}",
        "tags: [lora, lora_tune]",
        "---",
        "",
        f"# {Path(report.out_dir).name}",
        "",
        f"A merged fine-tune of `{report.base}` made with lora_tune.",
        "",
        "## Adapter",
        "",
        f"- LoRA r={c['r']}, alpha={c['lora_alpha']}, dropout={c.get('lora_dropout')}, "
        f"rsLoRA={c.get('use_rslora', False)}, DoRA={c.get('use_dora', False)}",
        f"- target modules: {', '.join(sorted(targets)) if isinstance(targets, list) else targets}",
        f"- trained with base weights in {meta.get('quantization', 'unknown')} for {meta.get('steps', '?')} steps",
    ]
    data = cfg.get("data") or {}
    if data:
        lines.append(
            f"- data: {data.get('train_file')} (validation: {data.get('val_file') or data.get('val_fraction')})"
        )
    lines += [
        "",
        "## Merge",
        "",
        f"- merged into the {report.base_weights} base weights, stored as {report.dtype}",
        f"- {report.merged_tensors} weights merged; peak memory {report.peak_rss_mb:,.0f} MB "
        f"for a {report.model_mb:,.0f} MB model",
    ]
    if report.fidelity:
        lines += [
            "",
            "## Fidelity (merged model vs reference, held-out tokens)",
            "",
            "| reference | max abs logit diff | mean KL (nats/token) | ppl reference | ppl merged |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {f.reference} | {f.max_abs_logit_diff:.4f} | {f.mean_kl:.2e} | {f.ppl_reference:.3f} | "
            f"{f.ppl_merged:.3f} |"
            for f in report.fidelity
        ]
    eval_md = adapter_dir.parent / "eval.md"
    if eval_md.is_file():
        lines += ["", "## Evaluation of the adapter", "", eval_md.read_text().split("\n", 2)[-1].strip()]
    for w in report.warnings:
        lines += ["", f"**Warning:** {w}"]
    return "\n".join(lines) + "\n"


# Mean KL (nats/token) above which a merge is reported as unfaithful: rounding the merged weights to
# 16 bits alone costs a few 1e-3 in bf16 (8-bit mantissa) on SmolLM2, much less in fp16.
KL_WARN = {"bf16": 1e-2, "fp16": 2e-3}


def _judge_fidelity(report: MergeReport, log=print) -> None:
    """Warn when the merge is far from the model it should reproduce; point to the other base option."""
    own = report.fidelity[0] if report.base_weights == "original" else report.fidelity[-1]
    if own.mean_kl > KL_WARN[report.dtype] or own.ppl_rel_diff > 0.02:
        report.warnings.append(
            f"the merged model differs from {own.reference}: mean KL {own.mean_kl:.2e} nats/token (threshold "
            f"{KL_WARN[report.dtype]:.0e}), perplexity {own.ppl_reference:.3f} -> {own.ppl_merged:.3f}; "
            "check the base model and dtype"
        )
    trained = report.fidelity[-1]
    if report.base_weights == "original" and len(report.fidelity) > 1 and trained.mean_kl > KL_WARN[report.dtype]:
        log(
            f"note: this merge differs from the model as trained ({trained.reference}) by a mean KL of "
            f"{trained.mean_kl:.2e}; --base-weights dequantized merges into the weights the adapter was trained "
            "against and usually reproduces it more closely"
        )


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "bf16",
    base_weights: str = "original",
    check: bool = True,
    log=print,
) -> MergeReport:
    """Merge `adapter_dir` into its base; write a standard HF folder to `out_dir` atomically."""
    from lora_tune.config import ModelCfg
    from lora_tune.models import load_tokenizer, resolve_source

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter = read_adapter(adapter_dir)
    base = base or adapter.meta.get("base_model") or adapter.config.get("base_model_name_or_path")
    if not base:
        raise LoraTuneError(f"{adapter_dir} does not say which base model it was trained on; pass --base SRC")
    if dtype not in ("bf16", "fp16"):
        raise LoraTuneError(f"--dtype {dtype}: merged models are written in bf16 or fp16")
    if base_weights not in ("original", "dequantized"):
        raise LoraTuneError("--base-weights must be original or dequantized")
    trained_quant = adapter.meta.get("quantization")
    quant_type = trained_quant if trained_quant in ("nf4", "fp4") else "nf4"
    double_quant = ((adapter.meta.get("config") or {}).get("model") or {}).get("double_quant", True)
    if base_weights == "dequantized" and trained_quant not in ("nf4", "fp4"):
        raise LoraTuneError(
            f"--base-weights dequantized is for adapters trained on a 4-bit base; this one used "
            f"{trained_quant or 'an unknown quantization'}"
        )
    base_path = resolve_source(base, log=log)
    if not Path(base_path).is_dir():
        from huggingface_hub import snapshot_download

        base_path = snapshot_download(base_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    log(f"merging {adapter_dir} into {base} ({base_weights} weights) as {dtype}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged, total = stream_merge(base_path, adapter, tmp, dtype, base_weights, quant_type, double_quant)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok = load_tokenizer(str(adapter_dir), ModelCfg(source=str(adapter_dir)))  # the training template
        tok.save_pretrained(tmp)
        _generation_config(tmp, tok)
        # peak of the merge itself (imports included), before the fidelity check loads whole models
        report = MergeReport(
            str(out_dir), base, str(adapter_dir), base_weights, dtype, merged, peak_rss_mb(), total / 2**20
        )
        if check:
            report.fidelity, _ = check_fidelity(tmp, base_path, adapter_dir, dtype, trained_quant, log)
            _judge_fidelity(report, log)
        (tmp / "README.md").write_text(_model_card(report, adapter, adapter_dir))
        (tmp / "merge_report.json").write_text(json.dumps(asdict(report), indent=2))
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
