"""`finetune()`: training with everything the layers above the loop add to it.

`train/` imports neither `evaluate/` nor `bench/`; this module joins them: the in-training task metric
(`eval.metric`) comes from `evaluate`, and `train.auto_fit` from the planner in `bench`. The CLI, the
demo, recipes, sweeps and (later) the server call this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.console import Console

from lora_tune.config import EvalCfg, RunCfg
from lora_tune.runtime import Precision, choose_device
from lora_tune.train.hooks import Hook
from lora_tune.train.loop import TrainResult, train


def finetune(
    cfg: RunCfg,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Fine-tune as `cfg` says (see `lora_tune.train.loop.train`), with the task metric and auto-fit."""

    def metric(model, tok, precision: Precision, records: list) -> float:
        return task_metric(model, tok, precision, cfg.eval, records, cfg.eval.batch_size or cfg.train.micro_batch_size)

    return train(
        cfg,
        resume,
        overwrite,
        console,
        task_metric=metric if cfg.eval.metric != "none" else None,
        fit_memory=fit_to_memory,
        hooks=hooks,
    )


def task_metric(model, tok, precision: Precision, ecfg: EvalCfg, records, batch_size: int) -> float:
    """The configured task metric on the first `metric_samples` validation records."""
    from lora_tune.evaluate.generate import Sampling
    from lora_tune.evaluate.run import EvalSettings, evaluate_model

    settings = EvalSettings(
        metrics=[ecfg.metric],
        labels=ecfg.labels or None,
        batch_size=batch_size,
        sampling=Sampling(max_new_tokens=ecfg.max_new_tokens),
    )
    out = evaluate_model(model, tok, precision, settings, records[: ecfg.metric_samples], None)
    return out["metrics"][ecfg.metric]


def fit_to_memory(cfg: RunCfg, console: Console) -> RunCfg:
    """Apply the planner's choice of settings for the memory budget (`train.auto_fit`)."""
    from lora_tune.bench.plan import ModelShape, auto_fit, load_model_config, parse_size

    device = choose_device(cfg.train.device)
    if cfg.train.memory_budget:
        budget = parse_size(cfg.train.memory_budget)
    elif device.type == "cuda":
        budget = float(torch.cuda.mem_get_info(device)[0])  # what is free now, not the card's total
        console.print(f"train.auto_fit: budgeting the {budget / 2**30:.2f} GiB free on {device}")
    else:
        console.print("train.auto_fit: no train.memory_budget and no GPU; keeping the settings as they are")
        return cfg
    shape = ModelShape.from_config(load_model_config(cfg.model.source))
    fitted, plan = auto_fit(shape, cfg, budget, device.type)
    console.print(
        f"auto_fit: planned peak {plan.total / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB; "
        + ("; ".join(plan.notes) or "the configured settings fit")
    )
    return fitted
