"""Measurements behind the quality benchmark's candidate causes of a gap to TRL (issue 14), one each:

- which tokens each tool supervises on the same record (ours vs TRL's prompt/completion tokenization);
- the loss: our chunked LM head + cross-entropy against the unchunked path and against transformers'
  own `loss` (what TRL trains on), value and LoRA gradients, in fp32 and under bf16 autocast;
- the lr schedule: ours against transformers' cosine-with-warmup at the step counts used;
- length grouping: what the batches of the first N steps hold, grouped and in random order.

    pip install -e '.[bench]'
    python benchmarks/quality_causes.py

Writes benchmarks/results/quality-causes-<stamp>.json and prints a markdown summary.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_tune.bench.compare import write_results_json
from lora_tune.bench.quality_data import TASKS, build_tasks
from lora_tune.config import ModelCfg
from lora_tune.data.batching import BatchStream
from lora_tune.data.readers import load_records
from lora_tune.data.tokenize import encode_record, encode_records, fit_length
from lora_tune.losses import IGNORE, supervised_loss_sum
from lora_tune.models import load_tokenizer, resolve_source
from lora_tune.train.optim import lr_factor

HERE = Path(__file__).parent
DATA = HERE / "data" / "quality"


def trl_supervised(sample: dict) -> list[int]:
    """The positions TRL trains on in one of its tokenized samples (all of them for plain text)."""
    if "completion_mask" in sample:
        return [j for j, m in enumerate(sample["completion_mask"]) if m]
    labelled = [j for j, lab in enumerate(sample.get("labels", [])) if lab != -100]
    return labelled or list(range(len(sample["input_ids"])))


def supervised_tokens() -> dict:
    """Per task: records both tools keep, identical input ids, identical supervised positions, and the
    supervised text of the first record as each tool has it."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lora_tune.bench.worker import trl_data
    from lora_tune.models import fix_tokenizer

    path = resolve_source("builtin:smollm2-135m", log=lambda *_: None)
    out = {}
    for task in TASKS:
        train, _ = task.files(DATA)
        tok = AutoTokenizer.from_pretrained(path)
        fix_tokenizer(tok)
        data = load_dataset("json", data_files={"train": trl_data(str(train))}, split="train")
        args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=256, use_cpu=True, report_to="none")
        lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
        trl = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(path),
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
        ).train_dataset
        ours_tok = load_tokenizer(path, ModelCfg())
        ours, _ = encode_records(ours_tok, load_records(train), 256)
        same_ids = same_sup = 0
        for t, e in zip(trl, ours, strict=False):
            e_sup = [j for j, lab in enumerate(e.labels) if lab != IGNORE]
            same_ids += list(t["input_ids"]) == e.input_ids
            same_sup += trl_supervised(t) == e_sup
        first_t, first_e = trl[0], ours[0]
        t_sup = trl_supervised(first_t)
        out[task.name] = {
            "records": [len(trl), len(ours)],
            "same_input_ids": same_ids,
            "same_supervised_positions": same_sup,
            "first_supervised": {
                "trl": tok.decode([first_t["input_ids"][j] for j in t_sup][:16]),
                "ours": ours_tok.decode([v for v in first_e.labels if v != IGNORE][:16]),
            },
        }
    return out


def loss_paths() -> dict:
    """Loss sums and LoRA gradients of one newsgroups batch by three paths, fp32 and bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_source("builtin:smollm2-135m", log=lambda *_: None)
    tok = load_tokenizer(path, ModelCfg())
    train, _ = TASKS[0].files(DATA)
    examples, _ = encode_records(tok, load_records(train)[:8], 256)
    batch = BatchStream(examples, 8, 0, tok.pad_token_id, shuffle=False).next()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():  # a trained-looking adapter: B away from its zero init
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(kind: str, dtype) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            if kind == "transformers":  # the model's own loss: a mean over the shifted supervised labels
                labels = batch["labels"]
                n = int((labels[:, 1:] != IGNORE).sum())
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
                loss = out.loss * n
            else:
                loss, n = supervised_loss_sum(model, batch, chunked=kind == "chunked")
        (loss / n).backward()
        return float(loss) / n, torch.cat([p.grad.flatten() for p in params]).clone()

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref_loss, ref_grad = run("transformers", torch.float32)  # fp32 transformers: the reference
        for kind in ("chunked", "unchunked", "transformers"):
            loss, grad = run(kind, dtype)
            out[f"{kind} {name}"] = {
                "loss": loss,
                "loss_diff_vs_fp32_transformers": loss - ref_loss,
                "grad_rel_error": float((grad - ref_grad).norm() / ref_grad.norm()),
                "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0)),
            }
    return out


def schedules() -> dict:
    """lr multipliers, step by step: ours (round(ratio x steps) warmup from 1/(w+1)) against transformers'
    cosine with warmup (ceil(ratio x steps), from 0)."""
    from transformers import get_cosine_schedule_with_warmup

    out = {}
    for steps in sorted({t.steps for t in TASKS} | {45}):
        ours_w = int(round(0.05 * steps))
        hf_w = math.ceil(0.05 * steps)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = get_cosine_schedule_with_warmup(opt, hf_w, steps)
        hf = []
        for _ in range(steps):
            hf.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [lr_factor(s, steps, ours_w, "cosine") for s in range(steps)]
        out[str(steps)] = {
            "warmup": {"ours": ours_w, "transformers": hf_w},
            "first_lrs": {"ours": ours[:4], "transformers": hf[:4]},
            "sum_of_lr": {"ours": sum(ours), "transformers": sum(hf)},
            "max_abs_diff": max(abs(a - b) for a, b in zip(ours, hf, strict=True)),
        }
    return out


def grouping(steps: int = 30, batch: int = 8) -> dict:
    """Newsgroups: the batches of the first `steps` steps, grouped by length and in random order."""
    path = resolve_source("builtin:smollm2-135m", log=lambda *_: None)
    tok = load_tokenizer(path, ModelCfg())
    train, _ = TASKS[0].files(DATA)
    pairs = [(fit_length(encode_record(tok, r), 256, "truncate"), r.response()) for r in load_records(train)]
    pairs = [(e, lab) for e, lab in pairs if e.n_supervised]  # as training keeps them
    examples, labels = [e for e, _ in pairs], [lab for _, lab in pairs]
    lengths = [len(e.input_ids) for e in examples]
    out = {
        "data_mean_length": statistics.fmean(lengths),
        "data_share_atheism": sum(lab == "atheism" for lab in labels) / len(labels),
    }
    for strategy in ("group_by_length", "pad"):
        per_seed = []
        for seed in (0, 1, 2):
            stream = BatchStream(examples, batch, seed, tok.pad_token_id, strategy=strategy)
            plan = [b for epoch in range(4) for b in stream.plan(epoch)][:steps]
            idx = [[row[0] for row in b] for b in plan]
            majority = [
                max(sum(labels[i] == "atheism" for i in b), sum(labels[i] == "space" for i in b)) / len(b) for b in idx
            ]
            spread = [statistics.pstdev([lengths[i] for i in b]) for b in idx]
            seen = [i for b in idx for i in b]
            per_seed.append(
                {
                    "majority_label_share": statistics.fmean(majority),
                    "within_batch_length_sd": statistics.fmean(spread),
                    "mean_length_seen": statistics.fmean(lengths[i] for i in seen),
                    "padding_share": 1
                    - sum(lengths[i] for i in seen) / sum(len(b) * max(lengths[i] for i in b) for b in idx),
                    "distinct_examples_seen": len(set(seen)),
                }
            )
        out[strategy] = {k: statistics.fmean(s[k] for s in per_seed) for k in per_seed[0]}
    return out


def token_weights(batch: int = 8) -> dict:
    """Per task: how much the supervised-token count of a batch varies from step to step. The loss of a
    step is a mean over its supervised tokens, so a token in a batch of N weighs 1/N: the more N varies,
    the more unequal the tokens' weights (cv of N; ratio of the heaviest to the lightest step)."""
    path = resolve_source("builtin:smollm2-135m", log=lambda *_: None)
    tok = load_tokenizer(path, ModelCfg())
    out = {}
    for task in TASKS:
        train, _ = task.files(DATA)
        examples, _ = encode_records(tok, load_records(train), 256)
        out[task.name] = {}
        for strategy in ("group_by_length", "pad"):
            counts = []
            for seed in (0, 1, 2):
                plan = BatchStream(examples, batch, seed, tok.pad_token_id, strategy=strategy).plan(0)[: task.steps]
                counts += [sum(examples[row[0]].n_supervised for row in b) for b in plan]
            out[task.name][strategy] = {
                "supervised_per_step_mean": statistics.fmean(counts),
                "supervised_per_step_cv": statistics.pstdev(counts) / statistics.fmean(counts),
                "heaviest_over_lightest_token": max(counts) / min(counts),
            }
    return out


def main() -> None:
    build_tasks(DATA, HERE / "data" / "cache")
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "supervised_tokens": supervised_tokens(),
        "loss_paths": loss_paths(),
        "schedules": schedules(),
        "grouping": grouping(),
        "token_weights": token_weights(),
    }
    write_results_json(HERE, "quality-causes", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
