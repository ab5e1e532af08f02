"""Run configuration: dataclasses are the single source of truth; YAML holds data only.

`load_config(path, overrides)` reads a YAML file, applies dotted `key=value` overrides and returns a
validated `RunCfg`. Every problem (unknown key, wrong type, bad value, conflicting settings) is collected
and raised once as a `ConfigError` that names the key and, for typos, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_tune.errors import ConfigError

Quantization = Literal["nf4", "fp4", "int8", "bf16", "fp16", "fp32"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
Objective = Literal["sft", "dpo", "orpo", "simpo", "kto"]
# tracker -> (the module it needs, the extra that installs it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with a one-line doc (shown in `lora-tune config-reference`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ModelCfg:
    source: str = _f("builtin:smollm2-135m", "hub id, local HF folder, or builtin:smollm2-135m")
    quantization: Quantization = _f("nf4", "base weights: nf4/fp4 (QLoRA), int8, or unquantized bf16/fp16/fp32")
    double_quant: bool = _f(True, "4-bit only: quantize the quantization constants too (~0.4 bit/param saved)")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run (opt-in; only for sources you trust)")
    revision: str | None = _f(None, "hub revision (branch, tag or commit) to load")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa, eager, or flash_attention_2")
    cpu_dequantize: bool | Literal["auto"] = _f(
        "auto",
        "nf4/fp4 on the CPU: de-quantize the frozen 4-bit base once into the compute dtype (the exact weights "
        "its 4-bit layers compute with, at 16-bit speed); auto: when they fit in half the free memory",
    )
    adapter: str | None = _f(None, "start from this adapter folder and continue training it (e.g. SFT, then DPO)")


@dataclass
class LoraCfg:
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: list[str] | str = _f("all-linear", "modules to adapt: 'all-linear' or a list of names")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    modules_to_save: list[str] = _f([], "extra modules trained in full and saved with the adapter")


@dataclass
class DataCfg:
    train_file: str | None = _f(None, "training data: a file (jsonl, json, csv, parquet, txt), a folder, or a hub id")
    val_file: str | None = _f(None, "validation data in the same format (optional)")
    val_fraction: float = _f(0.0, "hold out this fraction of train_file for validation when no val_file")
    split: str = _f("train", "split to read when train_file/val_file is a hub dataset id")
    format: Literal[
        "auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference", "openai_preference", "kto"
    ] = _f("auto", "record format; auto-detected per record from its fields")
    columns: dict[str, str] = _f({}, "map our field names to yours, e.g. {prompt: question, completion: answer}")
    max_length: int = _f(1024, "maximum tokens per sample (and per packed row)")
    truncation: Literal["truncate", "keep_end", "drop"] = _f(
        "truncate", "too-long samples: cut the end, keep the end (the response), or drop; text is chunked"
    )
    loss_on: Literal["assistant", "completion", "all"] = _f(
        "assistant", "loss on every assistant turn, only the last one (completion), or on all tokens"
    )
    chat_template: str | None = _f(
        None, "template to use: chatml, llama-3, alpaca or a .jinja file (default: tokenizer's)"
    )
    packing: bool = _f(False, "pack samples into rows of max_length (no padding, no cross-attention)")
    group_by_length: bool | Literal["auto"] = _f(
        "auto",
        "when not packing, batch samples of similar length together; auto: unless that makes the supervised "
        "tokens per batch uneven (plain text)",
    )
    dedup: Literal["none", "exact", "normalized"] = _f(
        "exact", "remove duplicate records (normalized: case, punctuation and spacing ignored)"
    )
    leakage: Literal["drop", "warn"] = _f("drop", "validation records also in training: drop them or only warn")
    oversample_minority: bool = _f(False, "classification-style data: repeat minority labels up to the majority")
    cache: bool = _f(True, "cache tokenized data (keyed by data, tokenizer, template and settings)")


@dataclass
class TrainCfg:
    seed: int = _f(42, "seed for data order, LoRA init and dropout")
    micro_batch_size: int = _f(4, "samples per forward/backward")
    grad_accum: int = _f(1, "micro-batches per optimizer step (effective batch = micro_batch_size x this)")
    max_steps: int | None = _f(None, "optimizer steps; when unset, `epochs` decides")
    epochs: float = _f(1.0, "passes over the training data (when max_steps is unset)")
    lr: float = _f(2e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of the peak (cosine/linear)")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "lr schedule after warmup")
    warmup_steps: int | None = _f(None, "linear warmup steps (or use warmup_ratio)")
    warmup_ratio: float | None = _f(None, "warmup as a fraction of total steps (or use warmup_steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = _f(
        "adamw", "torch AdamW, or bitsandbytes 8-bit / paged AdamW"
    )
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward (non-reentrant)")
    chunked_loss: bool = _f(True, "LM head + cross-entropy a chunk of positions at a time (never all logits at once)")
    compile: bool | Literal["auto"] = _f(
        "auto", "torch.compile each decoder layer; auto: on the CPU for runs of 100+ steps (where it was measured)"
    )
    precision: Precision = _f("auto", "auto: bf16 where the GPU or CPU has it, else fp16+GradScaler (GPU) or fp32")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train")
    log_every: int = _f(1, "print a progress line every N steps when not on a terminal")
    eval_every: int = _f(0, "validation loss every N steps (0: only at the end)")
    save_every: int = _f(50, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints to keep")
    early_stopping_patience: int = _f(0, "stop after this many evaluations without improvement (0: off)")
    auto_fit: bool = _f(False, "let the planner pick micro-batch/accumulation/checkpointing/max_length to fit memory")
    memory_budget: str | None = _f(None, "memory for auto_fit, e.g. 12GiB (default: the GPU's total memory)")
    early_stopping_min_delta: float = _f(0.0, "an improvement must lower val loss by more than this")
    load_best_at_end: bool = _f(False, "the final adapter is the best evaluation's weights (saved when found)")
    report_to: list[Tracker] = _f([], "experiment trackers: tensorboard, mlflow, wandb (each an optional extra)")
    objective: Objective = _f("sft", "sft, or preference tuning: dpo, orpo, simpo, kto (settings in `preference`)")
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp", "with --nproc N: ddp (each process holds the model) or fsdp (weights sharded; QLoRA too)"
    )


@dataclass
class PreferenceCfg:
    beta: float | None = _f(
        None, "strength of the preference term; default: dpo/kto 0.1, orpo 0.1 (its lambda), simpo 2.0"
    )
    loss_type: Literal["sigmoid", "ipo"] = _f("sigmoid", "dpo: sigmoid (DPO) or ipo (squared, length-normalised)")
    label_smoothing: float = _f(0.0, "dpo (sigmoid) and simpo: assumed share of flipped labels (conservative DPO)")
    simpo_gamma: float = _f(1.0, "simpo: target reward margin")
    desirable_weight: float = _f(1.0, "kto: weight of desirable examples' losses")
    undesirable_weight: float = _f(1.0, "kto: weight of undesirable examples' losses")
    precompute_ref: bool = _f(False, "dpo/kto: reference log-probs in one pass before training (cached)")
    max_prompt_length: int | None = _f(
        None, "prompt tokens kept (its end) when a sample is too long; default: half of data.max_length"
    )


# which preference settings each objective reads; any other set to a non-default value is an error
PREFERENCE_KEYS = {
    "sft": set(),
    "dpo": {"beta", "loss_type", "label_smoothing", "precompute_ref", "max_prompt_length"},
    "orpo": {"beta", "max_prompt_length"},
    "simpo": {"beta", "label_smoothing", "simpo_gamma", "max_prompt_length"},
    "kto": {"beta", "desirable_weight", "undesirable_weight", "precompute_ref", "max_prompt_length"},
}


@dataclass
class EvalCfg:
    batch_size: int | None = _f(None, "batch size for validation loss and metrics (default: train.micro_batch_size)")
    max_samples: int | None = _f(None, "cap the validation set at this many samples")
    metric: Literal["none", "f1", "exact_match", "rouge_l", "accuracy", "macro_f1"] = _f(
        "none", "a task metric computed with each validation loss (on metric_samples records)"
    )
    metric_samples: int = _f(16, "validation records the task metric is computed on")
    max_new_tokens: int = _f(64, "generation length for f1/exact_match/rouge_l")
    labels: list[str] = _f([], "label set for accuracy/macro_f1 (default: inferred from the data)")
    early_stopping_on: Literal["loss", "metric"] = _f("loss", "what early stopping watches")


@dataclass
class RunCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    preference: PreferenceCfg = field(default_factory=PreferenceCfg)
    output_dir: str = _f("runs/default", "run directory: config, metrics, checkpoints, adapter")


SECTIONS: dict[str, type] = {
    "model": ModelCfg,
    "lora": LoraCfg,
    "data": DataCfg,
    "train": TrainCfg,
    "eval": EvalCfg,
    "preference": PreferenceCfg,
}

# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = {
    "output_dir",
    "train.compile",  # changes rounding in the last digits, not the computation
    "train.log_every",
    "train.report_to",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "eval.batch_size",
    "eval.max_samples",
    "eval.metric",
    "eval.metric_samples",
    "eval.max_new_tokens",
    "eval.labels",
    "eval.early_stopping_on",
}


# ----------------------------------------------------------------------------------------------------
# Building a config from data


# The names Hugging Face (TrainingArguments, PEFT, TRL) and Axolotl users type, and ours.
ALIASES = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.schedule",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_last",
    "load_best_model_at_end": "train.load_best_at_end",
    "optim": "train.optimizer",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "base_model": "model.source",
    "model_name_or_path": "model.source",
    "load_in_4bit": "model.quantization: nf4",
    "load_in_8bit": "model.quantization: int8",
}


def _alias(name: str) -> str:
    """'; did you mean `train.lr`? ...' when `name` (or a near miss of it) is another tool's name for a key."""
    bare = name.rsplit(".", 1)[-1]
    match = bare if bare in ALIASES else next(iter(difflib.get_close_matches(bare, list(ALIASES), 1, 0.8)), None)
    if match is None:
        return ""
    return f"; did you mean `{ALIASES[match]}`? (`{match}` is the Hugging Face / Axolotl name)"


def _closest(name: str, options: typing.Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean `{prefix}{match[0]}`?" if match else ""


def _coerce(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Check `value` against the type `hint`; return the (possibly converted) value."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # exact type first, so "all-linear" stays a string for `list[str] | str`; "a,b" becomes a list
        if type(value) in args and not (isinstance(value, str) and "," in value):
            return value
        errs: list[str] = []
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _coerce(key, value, arg, trial)
            if not trial:
                return out
            errs.extend(trial)
        problems.append(errs[0] if errs else f"`{key}`: invalid value {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            problems.append(f"`{key}`: {value!r} is not one of: {choices}{_closest(str(value), map(str, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            problems.append(f"`{key}`: expected a mapping of names to names, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str) and args and (args[0] is str or typing.get_origin(args[0]) is Literal):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"`{key}`: expected a list, got {value!r}")
            return value
        return [_coerce(f"{key}[{i}]", v, args[0], problems) for i, v in enumerate(value)] if args else value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            problems.append(f"`{key}`: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"`{key}`: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"`{key}`: expected a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"`{key}`: expected a string, got {value!r}")
        return value
    return value


def _build_section(cls: type, name: str, data: Any, problems: list[str], bad: set[str]) -> Any:
    """The section's dataclass; type problems go to `problems` (their keys to `bad`, left at defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"`{name}`: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{name}.{key}"
        if key not in fields:
            problems.append(f"unknown key `{full}`{_alias(str(key)) or _closest(str(key), fields, prefix=name + '.')}")
            continue
        found: list[str] = []
        value = _coerce(full, value, hints[key], found)
        if found:  # keep the default, so the range checks of the other keys still run
            problems.extend(found)
            bad.add(full)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any], source: str | None = None) -> RunCfg:
    """Build and validate a `RunCfg` from nested dicts; raises `ConfigError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(data).__name__}"], source)
    top = {**SECTIONS, "output_dir": str}
    sections = {}
    for key in data:
        if key not in top:
            alias = _alias(str(key))  # a flat HF-style name (learning_rate: ...) at the top level
            problems.append(
                f"unknown key `{key}`{alias}" if alias else f"unknown section `{key}`{_closest(str(key), top)}"
            )
    bad: set[str] = set()
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(cls, name, data.get(name), problems, bad)
    output_dir = _coerce("output_dir", data.get("output_dir", RunCfg.output_dir), str, problems)
    cfg = RunCfg(**sections, output_dir=output_dir if isinstance(output_dir, str) else RunCfg.output_dir)
    # range and cross-field checks run even after type errors (on defaults for the mistyped keys), and
    # say nothing more about a key already reported
    problems.extend(p for p in validate(cfg) if not any(f"`{k}`" in p for k in bad))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: RunCfg) -> list[str]:
    """Cross-field and range checks; returns every problem found."""
    p: list[str] = []
    t, d, lo = cfg.train, cfg.data, cfg.lora

    def positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            p.append(f"`{key}` must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    if not d.train_file:
        p.append("`data.train_file` is not set; give a JSONL file, e.g. data.train_file=train.jsonl")
    positive("lora.r", lo.r)
    positive("lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        p.append(f"`lora.dropout` must be in [0, 1), got {lo.dropout}")
    positive("data.max_length", d.max_length)
    if not 0 <= d.val_fraction < 1:
        p.append(f"`data.val_fraction` must be in [0, 1), got {d.val_fraction}")
    if d.val_file and d.val_fraction:
        p.append("can't use both `data.val_file` and `data.val_fraction`. Choose one.")
    for key in ("micro_batch_size", "grad_accum", "max_steps"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.epochs", t.epochs)
    positive("train.lr", t.lr)
    for key in ("max_grad_norm", "weight_decay", "warmup_steps", "log_every", "eval_every", "save_every"):
        positive(f"train.{key}", getattr(t, key), allow_zero=True)
    positive("train.keep_last", t.keep_last)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.max_samples", cfg.eval.max_samples)
    positive("eval.metric_samples", cfg.eval.metric_samples)
    if t.load_best_at_end and not (d.val_file or d.val_fraction):
        p.append("`train.load_best_at_end` needs validation data: set data.val_file or data.val_fraction")
    if cfg.eval.early_stopping_on == "metric" and cfg.eval.metric == "none":
        p.append("`eval.early_stopping_on: metric` needs `eval.metric` (e.g. f1 or accuracy)")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"`train.min_lr_ratio` must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps is not None and t.warmup_ratio is not None:
        p.append("can't use both `train.warmup_steps` and `train.warmup_ratio`. Choose one.")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        p.append(f"`train.warmup_ratio` must be in [0, 1), got {t.warmup_ratio}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        p.append(f"`train.betas` must be two numbers in [0, 1), got {t.betas}")
    p.extend(_validate_preference(cfg))
    for name in dict.fromkeys(t.report_to):
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            p.append(f"`train.report_to: {name}` needs the {module} package: pip install 'lora_tune[{extra}]'")
    return p


def _validate_preference(cfg: RunCfg) -> list[str]:
    """The `preference` section against `train.objective`: only the objective's own keys may be set."""
    p: list[str] = []
    pc, objective = cfg.preference, cfg.train.objective
    wanted = PREFERENCE_KEYS[objective]
    for f in dataclasses.fields(PreferenceCfg):
        if f.name not in wanted and getattr(pc, f.name) != f.default:
            users = [o for o, keys in PREFERENCE_KEYS.items() if f.name in keys]
            p.append(
                f"`preference.{f.name}` does not apply to train.objective={objective} (it is read by "
                f"{', '.join(users)}); remove it or change the objective"
            )
    if objective == "sft":
        return p
    if pc.beta is not None and pc.beta <= 0:
        p.append(f"`preference.beta` must be > 0, got {pc.beta}")
    if not 0 <= pc.label_smoothing < 0.5:
        p.append(f"`preference.label_smoothing` must be in [0, 0.5), got {pc.label_smoothing}")
    if pc.loss_type == "ipo" and pc.label_smoothing:
        p.append("`preference.label_smoothing` applies to the sigmoid loss only, not loss_type=ipo")
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(pc, key) <= 0:
            p.append(f"`preference.{key}` must be > 0, got {getattr(pc, key)}")
    if pc.max_prompt_length is not None and not 0 < pc.max_prompt_length < cfg.data.max_length:
        p.append(
            f"`preference.max_prompt_length` must be > 0 and below data.max_length ({cfg.data.max_length}) so "
            f"answers keep tokens, got {pc.max_prompt_length}"
        )
    if cfg.data.packing:
        p.append(f"`data.packing` does not apply to train.objective={objective} (pairs are padded); set it to false")
    return p


def parse_overrides(pairs: typing.Sequence[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-4", "lora.r=8"]` into nested dicts; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            problems.append(f"override {pair!r} is not of the form section.key=value (e.g. train.max_steps=10)")
            continue
        value = yaml.safe_load(raw) if raw else ""
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {pair!r} conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "the command line")
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunCfg:
    """Read a YAML config (or start from defaults when `path` is None) and apply dotted overrides.

    Relative data paths in the file are resolved against the file's folder, so a recipe runs from anywhere;
    relative paths in overrides against the current folder.
    """
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist; check the path"], None)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError([f"{where}: invalid YAML ({problem}); fix the syntax on that line"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"], None)
        data = _resolve_relative_paths(data, path.parent)
    # relative paths given on the command line mean the current folder, resolved now so a resume works
    # from anywhere (and compares equal to the run's saved config)
    data = _merge(data, _resolve_relative_paths(parse_overrides(overrides), Path.cwd()))
    return from_dict(data, source)


def _is_local_path(value: str, base: Path) -> bool:
    """Hub dataset ids (`org/name`) and template names stay as they are; anything else is a path."""
    if (base / value).exists():
        return True
    if value in ("chatml", "llama-3", "alpaca"):
        return False
    return not (value.count("/") == 1 and not Path(value).suffix)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("adapter"), str) and not Path(model["adapter"]).is_absolute():
        data = {**data, "model": {**model, "adapter": str((base / model["adapter"]).resolve())}}
    sec = data.get("data")
    if isinstance(sec, dict):
        sec = dict(sec)
        for key in ("train_file", "val_file", "chat_template"):
            v = sec.get(key)
            if isinstance(v, str) and not Path(v).is_absolute() and _is_local_path(v, base):
                sec[key] = str((base / v).resolve())
        data = {**data, "data": sec}
    return data


def to_dict(cfg: RunCfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_relevant(cfg: RunCfg) -> dict[str, Any]:
    """The flattened settings that must not change when a run is resumed."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in RESUME_SAFE_KEYS}


def config_hash(cfg: RunCfg) -> str:
    blob = json.dumps(resume_relevant(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: RunCfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every setting: the README's config reference is generated from this."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{name}.{f.name}", json.dumps(default), f.metadata.get("doc", "")))
    rows.append(("output_dir", json.dumps(RunCfg.output_dir), "run directory"))
    return rows
