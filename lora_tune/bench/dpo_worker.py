"""One DPO benchmark measurement in a fresh process: `python -m lora_tune.bench.dpo_worker '<json spec>'`.

Prints one JSON line on stdout (everything else the libraries print goes to stderr). The same model,
preference pairs (TRL's conversational format: `prompt` messages, one-message `chosen` and `rejected`),
LoRA settings, beta, batch, lengths, optimizer and step count are given to lora_tune (`tool: ours`,
`train.objective: dpo`) or to TRL's DPOTrainer + PEFT (`tool: trl`). Both use the adapter-disabled base
as the reference model, the sigmoid loss, AdamW at a constant lr and gradient clipping at 1.0.

Measured as in `lora_tune.bench.worker`: warm-up steps are left out of the timing (each step's time is
the gap between the ends of consecutive optimizer steps); pairs/s and tokens/s count real (non-padding)
tokens of the prompt+chosen and prompt+rejected rows; memory is the peak RSS above the RSS after imports
(CPU) or `max_memory_allocated` (CUDA), read before the held-out evaluation. Held-out preference
accuracy is computed the same way for both tools, by our evaluation (`heldout_accuracy`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_tune.allocator import active as active_allocator
from lora_tune.bench.compare import hardware, versions
from lora_tune.bench.worker import measured_peak_mb, rss_mb, trl_run_args
from lora_tune.data.pairs import prompt_budget

# metrics.jsonl / TRL log keys that are bookkeeping, not the objective's own figures
_BOOKKEEPING = {"step", "lr", "learning_rate", "time", "epoch", "memory_mb", "grad_norm", "split", "tokens_per_s"}
_BOOKKEEPING |= {"tokens", "pairs", "real_tokens", "padded_tokens", "num_tokens"}


@dataclass
class DPOSpec:
    tool: str  # ours | trl
    train_file: str
    test_file: str = ""  # held-out pairs for preference accuracy ("" skips it)
    name: str = "dpo"  # the benchmark's label for this configuration
    model: str = "builtin:smollm2-135m"
    quantization: str = "fp32"  # fp32 | bf16 | nf4 (bf16 compute for bf16/nf4)
    micro_batch_size: int = 4  # pairs per forward/backward
    grad_accum: int = 1
    max_length: int = 512  # tokens of prompt + answer
    max_prompt_length: int | None = None  # prompt tokens kept (its end) when a pair is too long; None: max_length // 2
    beta: float = 0.1
    lr: float = 5e-5
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    steps: int = 8  # timed optimizer steps
    warmup_steps: int = 2  # untimed optimizer steps before them (at least 1)
    seed: int = 0
    precompute_ref: bool = False  # reference log-probs in one pass before training
    gradient_checkpointing: bool = True
    compile: bool | str = "auto"  # ours' train.compile (TRL runs uncompiled, its default)
    cpu_kind: str = "native"  # compare.CPU_KINDS, set by the parent through compare.worker_env
    allocator: str = "auto"  # ours runs under what `lora-tune train` preloads (set by compare.worker_env)
    adapter_dir: str | None = None  # keep the trained adapter here (else it goes with the run's temporary folder)
    extra: dict = field(default_factory=dict)  # ours: dotted config keys; trl: DPOConfig arguments


def prompt_limit(spec: DPOSpec) -> int:
    """The prompt length both tools keep: ours' default (half of max_length) unless the spec sets one."""
    return prompt_budget(spec.max_length, spec.max_prompt_length)


def cut_prompt(example: dict, limit: int, max_length: int) -> dict:
    """A tokenized TRL pair whose prompt + longer answer exceeds `max_length` keeps the prompt's last
    `limit` tokens (ours' `preference.max_prompt_length`); the answers are then cut by TRL's collator."""
    prompt = example["prompt_ids"]
    longest = max(len(example["chosen_ids"]), len(example["rejected_ids"]))
    if len(prompt) + longest > max_length and len(prompt) > limit:
        prompt = prompt[-limit:]
    return {"prompt_ids": prompt}


def per_step(values: list[float], group: int) -> list[float]:
    """Micro-batch counts summed into optimizer steps of `group` micro-batches (a trailing partial group dropped)."""
    return [sum(values[i : i + group]) for i in range(0, len(values) - group + 1, group)]


def timed_figures(ends: list[float], pairs: list[float], real: list[float], padded: list[float], warmup: int) -> dict:
    """Speed over the steps after `warmup`: `ends[i]` is when optimizer step i ended, the other lists are
    per optimizer step. A step's time is the gap since the previous step ended."""
    step_seconds = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]
    timed = slice(warmup, warmup + len(step_seconds))
    seconds = sum(step_seconds)
    n_pairs, n_real, n_padded = sum(pairs[timed]), sum(real[timed]), sum(padded[timed])
    return {
        "steps": len(step_seconds),
        "step_seconds": step_seconds,
        "seconds": seconds,
        "step_s": seconds / len(step_seconds),
        "pairs": n_pairs,
        "real_tokens": n_real,
        "padded_tokens": n_padded,
        "pairs_per_s": n_pairs / seconds,
        "tokens_per_s": n_real / seconds,
        "padding_share": 1 - n_real / n_padded if n_padded else 0.0,
    }


def heldout_accuracy(model: str, adapter_dir: str, quantization: str, test_file: str, max_length: int) -> float:
    """Share of held-out pairs whose chosen answer gets the higher summed log-prob under base + adapter,
    by lora_tune's evaluation: the one place both tools' adapters are scored."""
    from rich.console import Console

    from lora_tune.evaluate.run import EvalSettings, ModelSpec, run_eval

    report = run_eval(
        ModelSpec(model, adapter=str(adapter_dir), quantization=quantization),
        EvalSettings(data=test_file, metrics=["preference_accuracy"], max_length=max_length),
        console=Console(quiet=True),
    )
    return report["results"]["tuned"]["metrics"]["preference_accuracy"]


def ours_config(spec: DPOSpec, output_dir: str) -> dict:
    """The config (for `lora_tune.config.from_dict`) that runs the spec with our DPO."""
    cfg: dict = {
        "model": {"source": spec.model, "quantization": spec.quantization},
        "lora": {"r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout, "target_modules": "all-linear"},
        "data": {"train_file": spec.train_file, "max_length": spec.max_length, "dedup": "none", "cache": False},
        "train": {
            "objective": "dpo",
            "micro_batch_size": spec.micro_batch_size,
            "grad_accum": spec.grad_accum,
            "max_steps": spec.warmup_steps + spec.steps,
            "lr": spec.lr,
            "schedule": "constant",
            "warmup_steps": 0,
            "save_every": 0,
            "eval_every": 0,
            "seed": spec.seed,
            # fp32 means fp32 compute for both tools (TRL runs with bf16=False), not our bf16 autocast
            "precision": "fp32" if spec.quantization == "fp32" else "auto",
            "compile": spec.compile,
            "gradient_checkpointing": spec.gradient_checkpointing,
        },
        "preference": {
            "beta": spec.beta,
            "max_prompt_length": prompt_limit(spec),
            "precompute_ref": spec.precompute_ref,
        },
        "output_dir": output_dir,
    }
    for key, value in spec.extra.items():  # "section.key": value
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


def run_ours(spec: DPOSpec, base_rss: float, work: Path) -> dict:
    from rich.console import Console

    from lora_tune.config import from_dict
    from lora_tune.train.loop import train
    from lora_tune.train.metrics import read_metrics

    result = train(from_dict(ours_config(spec, str(work / "run"))), console=Console(quiet=True))
    peak = measured_peak_mb(base_rss)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r.get("split", "train") == "train"]
    # pairs per step: the record's own count where the loop logs one, else the batch shape (fixed-size batches)
    pairs = [r.get("pairs", spec.micro_batch_size * spec.grad_accum) for r in rows]
    figures = timed_figures(
        [r["time"] for r in rows],
        pairs,
        [r["real_tokens"] for r in rows],
        [r["padded_tokens"] for r in rows],
        spec.warmup_steps,
    )
    first = rows[0]
    first_s = first["real_tokens"] / first["tokens_per_s"] if first.get("tokens_per_s") else 0.0
    adapter = str(result.adapter_dir)
    if spec.adapter_dir:
        adapter = shutil.copytree(adapter, spec.adapter_dir, dirs_exist_ok=True)
    return {
        **figures,
        "pairs_logged": all("pairs" in r for r in rows),
        "setup_s": first["time"] - first_s,  # before the first step: loading, tokenizing, reference precompute
        "final_loss": rows[-1]["loss"],
        "train_losses": [r["loss"] for r in rows],
        "final_train": {k: v for k, v in rows[-1].items() if k not in _BOOKKEEPING},
        "peak_mb": peak,
        "adapter_dir": adapter,
    }


def run_trl(spec: DPOSpec, base_rss: float, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lora_tune.config import ModelCfg
    from lora_tune.models import load_model
    from lora_tune.runtime import Precision

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    compute = torch.float32 if spec.quantization == "fp32" else torch.bfloat16
    precision = Precision(torch.device("cuda" if cuda else "cpu"), compute, "benchmark")
    # the same weights, dtype, NF4 settings and tokenizer (pad token distinct from EOS) as ours loads
    model, tok = load_model(ModelCfg(source=spec.model, quantization=spec.quantization), precision)
    with open(spec.train_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # in memory: a dataset loaded from a file would let TRL reuse reference log-probs cached by an earlier run
    data = Dataset.from_list(rows)
    limit = prompt_limit(spec)

    class BenchDPOTrainer(DPOTrainer):
        """TRL 1.16 has no max_prompt_length (it cuts prompt + answer to max_length, keeping the start):
        the tokenized prompts are cut as ours cuts them, before the reference log-probs are precomputed."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset.map(cut_prompt, fn_kwargs={"limit": limit, "max_length": args.max_length})

    args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        max_steps=spec.warmup_steps + spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        beta=spec.beta,
        loss_type=["sigmoid"],
        max_length=spec.max_length,
        truncation_mode="keep_start",
        padding_free=False,
        precompute_ref_log_probs=spec.precompute_ref,
        eval_strategy="no",
        **trl_run_args(spec),
        **spec.extra,
    )
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = BenchDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    kept = len(trainer.train_dataset)

    # counted per micro-batch as the training loader builds it (set after __init__, so the reference
    # precompute's batches are not counted)
    pairs: list[int] = []
    real: list[int] = []
    padded: list[int] = []
    inner = trainer.data_collator

    def counting_collator(features):
        batch = inner(features)
        pairs.append(len(features))
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    ends: list[float] = []
    began: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            began.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    peak = measured_peak_mb(base_rss)
    adapter = spec.adapter_dir or str(work / "adapter")
    trainer.save_model(adapter)  # the adapter and the tokenizer
    ga = spec.grad_accum
    figures = timed_figures(ends, per_step(pairs, ga), per_step(real, ga), per_step(padded, ga), spec.warmup_steps)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        **figures,
        "setup_s": began[0] - t0,  # before training: loading, tokenizing, reference precompute
        "trl_dropped_pairs": len(rows) - kept,  # prompts alone of max_length or more: TRL drops them
        "final_loss": logs[-1]["loss"],
        "train_losses": [h["loss"] for h in logs],
        "final_train": {k: v for k, v in logs[-1].items() if k not in _BOOKKEEPING},
        "peak_mb": peak,
        "adapter_dir": adapter,
    }


def measure(spec: DPOSpec) -> dict:
    """Train and score one spec in this process; returns the output record."""
    if spec.warmup_steps < 1 or spec.steps < 1:
        raise ValueError("warmup_steps and steps must be >= 1: a step's time is the gap since the previous step ended")
    # the same imports for both tools before the memory baseline is taken
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    try:
        import trl  # noqa: F401
    except ImportError:
        if spec.tool == "trl":
            raise
    torch.manual_seed(spec.seed)
    base = rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as work:  # run folder, TRL output, adapter
        result = (run_ours if spec.tool == "ours" else run_trl)(spec, base, Path(work))
        adapter = result.pop("adapter_dir")  # the record names spec.adapter_dir: the one that outlives the run
        accuracy = None
        if spec.test_file:
            accuracy = heldout_accuracy(spec.model, adapter, spec.quantization, spec.test_file, spec.max_length)
    return {
        **asdict(spec),
        **result,
        "max_prompt_length_used": prompt_limit(spec),
        "preference_accuracy": accuracy,
        "threads": torch.get_num_threads(),
        "allocator_active": active_allocator(),
        "hardware": hardware(),
        "versions": versions(),
    }


def main() -> None:
    spec = DPOSpec(**json.loads(sys.argv[1]))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON line only
        record = measure(spec)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
