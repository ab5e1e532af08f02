"""One benchmark measurement in a fresh process: `python -m lora_tune.bench.worker '<json spec>'`.

Prints one JSON line. The same model, data, LoRA settings, batch, max length, optimizer and step count
are given to lora_tune (`tool: ours`) or to TRL's SFTTrainer + PEFT (`tool: trl`). Warm-up steps are
excluded from the timing; memory is the process's peak RSS minus its RSS after imports (CPU), or
`max_memory_allocated` (CUDA). Validation loss after training is computed the same way for both: mean
loss over the assistant tokens of the held-out chats.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from lora_tune.allocator import active as active_allocator
from lora_tune.runtime import peak_memory_mb


@dataclass
class Spec:
    tool: str  # ours | trl
    name: str
    train_file: str
    val_file: str
    model: str = "builtin:smollm2-135m"
    quantization: str = "nf4"  # nf4 | bf16 | fp32
    gradient_checkpointing: bool = True
    packing: bool = False
    micro_batch_size: int = 4
    max_length: int = 512
    warmup_steps: int = 2
    steps: int = 8
    lr: float = 2e-4
    r: int = 16
    seed: int = 0
    extra: dict = field(default_factory=dict)
    # the quality benchmark trains as users do; the speed benchmark keeps the constant-lr defaults
    schedule: str = "constant"
    lr_warmup_ratio: float = 0.0
    dropout: float = 0.0
    adapter_dir: str | None = None  # save the trained adapter here
    allocator: str = "auto"  # ours runs under what `lora-tune train` preloads (lora_tune.allocator)
    cpu_kind: str = "native"  # native | avx2: torch's CPU kernels limited to AVX2 (see compare.CPU_KINDS)
    data: str = "chats"  # the bench data's shape (bench.data.SHAPES), for the record
    compile: bool | str = "auto"  # ours' train.compile (TRL runs at its default, uncompiled)


def measured_peak_mb(base_rss: float) -> float:
    """CUDA: max allocated; CPU: peak RSS above the RSS after imports."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return peak_memory_mb(device) - (base_rss if device.type == "cpu" else 0.0)


def trl_run_args(spec) -> dict:
    """The TrainingArguments every TRL benchmark run shares: checkpointing and precision as the spec says,
    the CPU when there is no GPU, no saving, no reporting, a log line per step, no loader workers."""
    import torch

    return {
        "gradient_checkpointing": spec.gradient_checkpointing,
        "bf16": spec.quantization != "fp32",
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": spec.seed,
        "dataloader_num_workers": 0,
    }


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _val_loss(model, tok, val_file: str, max_length: int, autocast) -> float:
    from lora_tune.data.batching import BatchStream
    from lora_tune.data.readers import load_records
    from lora_tune.data.tokenize import encode_records
    from lora_tune.losses import evaluate_loss

    examples, _ = encode_records(tok, load_records(val_file), max_length)
    return evaluate_loss(model, BatchStream(examples, 8, 0, tok.pad_token_id, shuffle=False), autocast).loss


def run_ours(spec: Spec, base_rss: float) -> dict:
    from rich.console import Console

    from lora_tune.config import load_config
    from lora_tune.finetune import finetune
    from lora_tune.train.metrics import read_metrics

    out = tempfile.mkdtemp(prefix="bench-ours-")
    overrides = {
        "model.source": spec.model,
        "model.quantization": spec.quantization,
        # fp32 means fp32 compute for both tools (TRL runs with bf16=False), not our bf16 autocast
        "train.precision": "fp32" if spec.quantization == "fp32" else None,
        "data.train_file": spec.train_file,
        "data.val_file": spec.val_file or None,
        "data.max_length": spec.max_length,
        "data.packing": spec.packing,
        "data.cache": False,
        "train.micro_batch_size": spec.micro_batch_size,
        "train.max_steps": spec.warmup_steps + spec.steps,
        "train.lr": spec.lr,
        "train.warmup_ratio": spec.lr_warmup_ratio,
        "train.schedule": spec.schedule,
        "train.seed": spec.seed,
        "train.gradient_checkpointing": spec.gradient_checkpointing,
        "train.compile": spec.compile,
        "train.save_every": 0,
        "lora.r": spec.r,
        "lora.alpha": 2 * spec.r,
        "lora.dropout": spec.dropout,
        "output_dir": out,
        **spec.extra,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items() if v is not None])
    finetune(cfg, console=Console(quiet=True))
    rows = [r for r in read_metrics(f"{out}/metrics.jsonl") if r.get("split", "train") == "train"]
    timed = rows[spec.warmup_steps :]
    seconds = timed[-1]["time"] - rows[spec.warmup_steps - 1]["time"]
    vals = [r["loss"] for r in read_metrics(f"{out}/metrics.jsonl") if r.get("split") == "val"]
    if spec.adapter_dir:
        shutil.copytree(f"{out}/adapter", spec.adapter_dir, dirs_exist_ok=True)
    return {
        "seconds": seconds,
        "real_tokens": sum(r["real_tokens"] for r in timed),
        "padded_tokens": sum(r["padded_tokens"] for r in timed),
        "supervised_tokens": sum(r["tokens"] for r in timed),
        "steps": len(timed),
        "warmup_s": rows[spec.warmup_steps - 1]["time"]
        - rows[0]["time"]
        + rows[0]["real_tokens"] / rows[0]["tokens_per_s"],
        "val_loss": vals[-1] if vals else None,
        "train_losses": [r["loss"] for r in rows],
        "peak_mb": measured_peak_mb(base_rss),
    }


def trl_data(path: str) -> str:
    """The file as TRL trains on it with loss on the answer only: a chat of one user and one assistant
    turn becomes a conversational prompt/completion record (TRL's completion-only loss); other
    records are kept as they are."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def single_turn(r: dict) -> bool:
        roles = [m["role"] for m in r.get("messages", [])]
        return bool(roles) and roles[-1] == "assistant" and roles.count("assistant") == 1

    if not all(single_turn(r) for r in rows):
        return path
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as out:
        for r in rows:
            out.write(json.dumps({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}) + "\n")
    return out.name


def run_trl(spec: Spec, base_rss: float) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_tune.models import fix_tokenizer, resolve_source

    path = resolve_source(spec.model, log=lambda *_: None)
    quant = None
    if spec.quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    dtype = torch.float32 if spec.quantization == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant)
    tok = AutoTokenizer.from_pretrained(path)
    fix_tokenizer(tok)
    data = load_dataset("json", data_files={"train": trl_data(spec.train_file)}, split="train")
    warmup = {"warmup_steps": 0}
    if spec.lr_warmup_ratio:  # transformers 5 takes a fraction in warmup_steps; 4.x in warmup_ratio
        warmup = (
            {"warmup_steps": spec.lr_warmup_ratio}
            if "warmup_ratio" not in SFTConfig.__dataclass_fields__
            else {"warmup_ratio": spec.lr_warmup_ratio}
        )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.warmup_steps + spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type=spec.schedule,
        **warmup,
        optim="adamw_torch",
        max_length=spec.max_length,
        packing=spec.packing,
        **trl_run_args(spec),
        **spec.extra,
    )
    lora = LoraConfig(
        r=spec.r, lora_alpha=2 * spec.r, lora_dropout=spec.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    counts: list[int] = []
    padded: list[int] = []
    supervised: list[int] = []
    inner = trainer.data_collator

    def counting_collator(features):
        batch = inner(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int((batch["input_ids"] != -1).sum()))
        padded.append(batch["input_ids"].numel())
        supervised.append(int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0)
        return batch

    trainer.data_collator = counting_collator
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    if spec.adapter_dir:
        trainer.save_model(spec.adapter_dir)
    w = spec.warmup_steps
    seconds = stamps[-1] - stamps[w - 1]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    val = _val_loss(trainer.model, tok, spec.val_file, spec.max_length, autocast) if spec.val_file else None
    return {
        "seconds": seconds,
        "real_tokens": sum(counts[w : w + spec.steps]),
        "padded_tokens": sum(padded[w : w + spec.steps]),
        "supervised_tokens": sum(supervised[w : w + spec.steps]),
        "steps": len(stamps) - w,
        "val_loss": val,
        "train_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "peak_mb": measured_peak_mb(base_rss),
    }


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    # the same imports for both tools before the memory baseline is taken
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
    result = run_ours(spec, base) if spec.tool == "ours" else run_trl(spec, base)
    result["tokens_per_s"] = result["real_tokens"] / result["seconds"]
    result["supervised_tokens_per_s"] = result["supervised_tokens"] / result["seconds"]
    result["step_s"] = result["seconds"] / result["steps"]
    result["padding_share"] = 1 - result["real_tokens"] / result["padded_tokens"]
    result["threads"] = torch.get_num_threads()
    result["kernels"] = torch.backends.cpu.get_cpu_capability()
    result["allocator_active"] = active_allocator()
    print("BENCH " + json.dumps({**asdict(spec), **result}))


if __name__ == "__main__":
    main()
