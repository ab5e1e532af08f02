"""`lora-tune eval`: task metrics for a base model, an adapter, or both side by side."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lora_tune.atomic import atomic_write_text
from lora_tune.config import ModelCfg
from lora_tune.data.formats import Record
from lora_tune.data.hygiene import labels_of
from lora_tune.data.pairs import parse_pref_record
from lora_tune.data.readers import load_records
from lora_tune.data.tokenize import encode_records
from lora_tune.errors import LoraTuneError
from lora_tune.evaluate.classify import predict_labels
from lora_tune.evaluate.generate import Sampling, generate_texts, prompt_text
from lora_tune.evaluate.metrics import classification_report, exact_match, parse_label, rouge_l, token_f1
from lora_tune.evaluate.perplexity import strided_perplexity, supervised_perplexity
from lora_tune.evaluate.preference import score_pairs
from lora_tune.runtime import Precision, choose_device, choose_precision

METRICS = ("perplexity", "f1", "exact_match", "rouge_l", "accuracy", "macro_f1", "preference_accuracy")
GENERATIVE = {"f1": token_f1, "exact_match": exact_match, "rouge_l": rouge_l}


@dataclass
class EvalSettings:
    data: str | None = None  # chat / instruction / prompt-completion records
    text: str | None = None  # raw text for strided perplexity
    metrics: list[str] = field(default_factory=lambda: ["perplexity"])
    labels: list[str] | None = None
    label_mode: str = "likelihood"  # or "generate"
    max_samples: int | None = None
    max_length: int = 2048
    max_prompt_length: int | None = None  # preference pairs: prompt tokens kept; default half of max_length
    batch_size: int = 8
    window: int | None = None  # default: the model's context
    stride: int | None = None  # default: half the window
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class ModelSpec:
    """What to evaluate: a base model source and optionally an adapter on top of it."""

    source: str
    adapter: str | None = None
    quantization: str = "bf16"
    cpu_dequantize: bool | str = "auto"  # a 4-bit base on the CPU: see models.choose_cpu_dequantize

    @classmethod
    def resolve(cls, model: str | None, adapter: str | None, run: str | None, quantization: str | None) -> ModelSpec:
        """Fill in the base model and quantization from the adapter's lora_tune.json where not given."""
        if run:
            adapter = str(Path(run) / "adapter")
        from lora_tune.models import adapter_meta

        meta: dict[str, Any] = adapter_meta(adapter) if adapter else {}
        source = model or meta.get("base_model")
        if not source:
            raise LoraTuneError("say which base model to use: --model SRC (or --run DIR of a lora-tune run)")
        return cls(source, adapter, quantization or meta.get("quantization", "bf16"))


def inference_precision(quantization: str, device) -> tuple[str, Precision]:
    """(weights to load, precision), chosen the way training chooses.

    16-bit weights fix the compute dtype on a GPU. On a CPU they are up-cast (exactly) to fp32 unless
    the CPU computes bf16 fast: bf16 matmuls on a CPU without bf16 instructions, and fp16 ones on any
    CPU, are many times slower than fp32.
    """
    auto = choose_precision("auto", device)
    if quantization not in ("bf16", "fp16"):
        return quantization, auto
    if device.type == "cpu" and not (quantization == "bf16" and auto.dtype is torch.bfloat16):
        return "fp32", Precision(device, torch.float32, f"fp32 (the {quantization} weights up-cast: {auto.reason})")
    return quantization, choose_precision("auto", device, quantization)


def load_for_inference(spec: ModelSpec, device: str = "auto"):
    """(model, tokenizer, precision); the tokenizer saved with the adapter (its training template) wins
    over the base's."""
    from lora_tune.models import load_adapter, load_model, resolve_source

    quantization, precision = inference_precision(spec.quantization, choose_device(device))
    mcfg = ModelCfg(source=spec.source, quantization=quantization, cpu_dequantize=spec.cpu_dequantize)
    model, tok = load_model(mcfg, precision, resolve_source(spec.source))
    if spec.adapter:
        from lora_tune.models import load_tokenizer

        model = load_adapter(model, spec.adapter)
        if (Path(spec.adapter) / "tokenizer_config.json").is_file():  # adapters from other tools may have none
            tok = load_tokenizer(spec.adapter, ModelCfg(source=spec.adapter))
    model.eval()
    return model, tok, precision


def prompt_ids(tok, rec: Record) -> list[int]:
    """The token ids a record's answer is generated after, exactly as training tokenized that part: a raw
    prompt with the tokenizer's special tokens (BOS), a chat up to its last assistant turn as rendered."""
    if rec.prompt is not None:
        return list(tok(rec.prompt, add_special_tokens=True)["input_ids"])
    last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
    return list(tok(prompt_text(tok, rec.messages[:last]), add_special_tokens=False)["input_ids"])


def evaluate_model(
    model,
    tok,
    precision: Precision,
    s: EvalSettings,
    records: list | None,
    docs: list[list[int]] | None,
    reference: bool = False,
) -> dict[str, Any]:
    """Every requested metric for one model; returns {"metrics": {...}, "details": {...}}.

    `records` are preference pairs for `preference_accuracy` (with `reference`, the model's adapter
    disabled is the reference for the implicit-reward accuracy), SFT records otherwise.
    """
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "preference_accuracy" in s.metrics:
        scores, dropped = score_pairs(
            model, tok, precision, records, s.max_length, s.max_prompt_length, s.batch_size, reference
        )
        metrics |= scores.metrics()
        details |= {"pairs": len(scores.policy), "pairs_dropped": dropped, "seconds": time.perf_counter() - t0}
        return {"metrics": {k: metrics[k] for k in sorted(metrics)}, "details": details}
    if "perplexity" in s.metrics and records:
        examples, stats = encode_records(tok, records, s.max_length, loss_on="assistant")
        p = supervised_perplexity(model, examples, tok.pad_token_id, s.batch_size, precision.autocast)
        metrics["perplexity"], metrics["loss"] = p.ppl, p.loss
        details["perplexity_tokens"] = p.tokens
    if docs:
        window = s.window or getattr(model.config, "max_position_embeddings", 2048)
        p = strided_perplexity(model, docs, window, s.stride or max(window // 2, 1), precision.autocast)
        metrics["text_perplexity"], metrics["text_loss"] = p.ppl, p.loss
        details["text_tokens"] = p.tokens
    wanted = [m for m in GENERATIVE if m in s.metrics]
    generated: list[str] = []  # greedy answers, made once for every metric that needs them
    if wanted or ({"accuracy", "macro_f1"} & set(s.metrics) and s.label_mode == "generate"):
        prompts = [prompt_ids(tok, r) for r in records]
        generated, speed = generate_texts(model, tok, prompts, s.sampling, s.batch_size)
        preds = generated
        refs = [r.response() for r in records]
        for m in wanted:
            metrics[m] = sum(GENERATIVE[m](p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)
        details["generation_tokens_per_s"] = speed
        details["examples"] = [
            {"where": r.where, "reference": ref, "prediction": p}
            for r, ref, p in list(zip(records, refs, preds, strict=True))[:5]
        ]
    if {"accuracy", "macro_f1"} & set(s.metrics):
        labels = s.labels or sorted(set(labels_of(records) or []))
        if not labels:
            raise LoraTuneError(
                "accuracy/macro_f1 need a label set: pass --labels a,b,... "
                "(it is inferred only for data with a few short answers)"
            )
        refs = [r.response().strip() for r in records]
        unknown = [(r.where, ref) for r, ref in zip(records, refs, strict=True) if ref not in labels]
        if unknown:
            raise LoraTuneError(f"{unknown[0][0]}: reference {unknown[0][1]!r} is not among the labels {labels}")
        if s.label_mode == "generate":
            parsed = [parse_label(g, labels) for g in generated]
            preds = [p or labels[0] for p in parsed]  # an answer naming no label counts as the first
            details["unparseable_generations"] = sum(p is None for p in parsed)
        else:
            preds, _ = predict_labels(model, tok, records, labels, precision.autocast, batch_size=s.batch_size)
        rep = classification_report(preds, refs, labels)
        metrics["accuracy"], metrics["macro_f1"] = rep.accuracy, rep.macro_f1
        details["classes"] = asdict(rep)
    details["seconds"] = time.perf_counter() - t0
    return {"metrics": {k: metrics[k] for k in sorted(metrics)}, "details": details}


def _read_inputs(tok, s: EvalSettings) -> tuple[list[Record] | None, list[list[int]] | None]:
    records = docs = None
    if "preference_accuracy" in s.metrics:
        if len(s.metrics) > 1 or s.text:
            raise LoraTuneError("preference_accuracy reads preference pairs: evaluate other metrics in another run")
        if not s.data:
            raise LoraTuneError("preference_accuracy needs --data PAIRS.jsonl (prompt, chosen, rejected)")
        return load_records(s.data, parse=parse_pref_record)[: s.max_samples], None
    if s.data:
        records = load_records(s.data)[: s.max_samples]
        needs_response = set(s.metrics) - {"perplexity"}
        if needs_response and any(r.response() is None for r in records):
            raise LoraTuneError(
                f"{s.data}: metrics {sorted(needs_response)} need records with a response "
                "(chat, instruction or prompt/completion), not plain text"
            )
    if s.text:
        text_records = load_records(s.text, fmt="text")
        docs = [list(tok(r.text, add_special_tokens=True)["input_ids"]) for r in text_records]
    if records is None and docs is None:
        raise LoraTuneError("nothing to evaluate on: pass --data FILE and/or --text FILE")
    return records, docs


def run_eval(
    spec: ModelSpec, s: EvalSettings, compare: bool = False, device: str = "auto", console: Console | None = None
) -> dict[str, Any]:
    """Evaluate `spec` (and, with `compare`, its base model alone on the same data); returns the report."""
    console = console or Console(soft_wrap=True)
    bad = [m for m in s.metrics if m not in METRICS]
    if bad:
        raise LoraTuneError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if compare and not spec.adapter:
        raise LoraTuneError("--compare needs an adapter (--adapter DIR or --run DIR) to compare with its base")
    model, tok, precision = load_for_inference(spec, device)
    records, docs = _read_inputs(tok, s)
    results = {}
    if compare:
        with model.disable_adapter():
            results["base"] = evaluate_model(model, tok, precision, s, records, docs)
    name = "tuned" if spec.adapter else "base"
    results[name] = evaluate_model(model, tok, precision, s, records, docs, reference=bool(spec.adapter))
    report = {
        "model": asdict(spec),
        "settings": {**asdict(s), "records": len(records or []), "documents": len(docs or [])},
        "precision": precision.reason,
        "results": results,
    }
    if compare:
        report["delta"] = {k: results["tuned"]["metrics"][k] - v for k, v in results["base"]["metrics"].items()}
    return report


def report_markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    names = list(results)
    keys = sorted({k for r in results.values() for k in r["metrics"]})
    head = ["metric", *names] + (["delta"] if "delta" in report else [])
    lines = [
        f"# Evaluation: {report['model']['source']}"
        + (f" + {report['model']['adapter']}" if report["model"]["adapter"] else ""),
        "",
        f"Data: {report['settings']['data'] or '-'}; text: {report['settings']['text'] or '-'}; "
        f"{report['settings']['records']} records; {report['precision']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k in keys:
        row = [k] + [f"{results[n]['metrics'].get(k, float('nan')):.4f}" for n in names]
        if "delta" in report:
            row.append(f"{report['delta'].get(k, float('nan')):+.4f}")
        lines.append("| " + " | ".join(row) + " |")
    for n in names:
        cls = results[n]["details"].get("classes")
        if cls:
            lines += [
                "",
                f"## {n}: per class",
                "",
                "| label | precision | recall | f1 | support |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {lab} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                for lab, v in cls["per_class"].items()
            ]
            lines += [
                "",
                "Confusion matrix (rows: reference, columns: predicted): "
                + "; ".join(f"{lab}: {row}" for lab, row in zip(cls["labels"], cls["confusion"], strict=True)),
            ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out = Path(out)
    atomic_write_text(out, json.dumps(report, indent=2, default=str))
    md = out.with_suffix(".md")
    atomic_write_text(md, report_markdown(report))
    return out, md


def print_report(report: dict[str, Any], console: Console) -> None:
    results = report["results"]
    table = Table(title="evaluation")
    table.add_column("metric", style="bold")
    for n in results:
        table.add_column(n, justify="right")
    if "delta" in report:
        table.add_column("delta", justify="right")
    for k in sorted({k for r in results.values() for k in r["metrics"]}):
        row = [f"{results[n]['metrics'].get(k, float('nan')):.4f}" for n in results]
        if "delta" in report:
            row.append(f"{report['delta'].get(k, float('nan')):+.4f}")
        table.add_row(k, *row)
    console.print(table)
    for n, r in results.items():
        d = r["details"]
        speed = f", generation {d['generation_tokens_per_s']:.0f} tokens/s" if "generation_tokens_per_s" in d else ""
        console.print(f"{n}: {d['seconds']:.1f} s{speed}", highlight=False)
