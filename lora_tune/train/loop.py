"""The training loop, and `train()`, which builds a run, hands it the hooks and runs the loop.

Per optimizer step: take `grad_accum` micro-batches, let the objective turn each into a loss sum,
normalise by the step's units, backpropagate, clip, step, schedule; then log the step's record and let
the hooks act (evaluation, early stopping, checkpointing). Everything else lives in `setup`, `step`,
`hooks`, `objectives` and `trackers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from lora_tune import config as C
from lora_tune.data.batching import BatchStream
from lora_tune.data.pairs import check_kind
from lora_tune.data.splits import read_splits
from lora_tune.errors import LoraTuneError
from lora_tune.runtime import Precision, peak_memory_mb
from lora_tune.train import distributed
from lora_tune.train.checkpoint import checkpoint_dir, load_adapter_weights
from lora_tune.train.distributed import Dist, trainable_state
from lora_tune.train.hooks import (
    Checkpointing,
    EarlyStopping,
    Evaluation,
    Hook,
    MetricsFile,
    Progress,
    RunStatus,
    SyncRanks,
    train_record,
)
from lora_tune.train.metrics import MetricsLog, plot_losses
from lora_tune.train.run import Run
from lora_tune.train.rundir import run_lock
from lora_tune.train.setup import save_adapter, setup_run
from lora_tune.train.state import TrainState
from lora_tune.train.step import StepOut, optimizer_step
from lora_tune.train.trackers import tracker_hooks

# (model, tokenizer, precision, validation records) -> the task metric; see lora_tune.finetune
TaskMetric = Callable[[Any, Any, Precision, list], float]
FitMemory = Callable[[C.RunCfg, Console], C.RunCfg]  # train.auto_fit: the planner's choice of settings


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0  # CUDA: max allocated; CPU: the process's peak RSS


def fit(run: Run) -> None:
    """The loop. Hooks start in list order and end in reverse order, so the first to open closes last."""
    try:
        for hook in run.hooks:
            hook.on_start(run)
        while run.state.step < run.total_steps and run.stop_reason is None:
            micro = [run.stream.next() for _ in range(run.cfg.train.grad_accum)]
            lr, t0 = run.scheduler.get_last_lr()[0], time.perf_counter()
            out = optimizer_step(run.parts, micro, run.state.split, run.note)
            run.scheduler.step()
            advance(run.state, out, run.stream)
            run.log(train_record(run, out, lr, time.perf_counter() - t0))
            for hook in run.hooks:
                hook.on_step_end(run, out)
        for hook in reversed(run.hooks):
            hook.on_end(run)
    except BaseException:  # an error or Ctrl-C: let hooks close what they opened, then re-raise
        for hook in reversed(run.hooks):
            hook.on_fail(run)
        raise


def advance(state: TrainState, out: StepOut, stream: BatchStream) -> None:
    """Count a finished optimizer step in the state."""
    state.step += 1
    state.tokens_seen += out.units
    state.split = out.split
    state.position = replace(stream.position)


def train(
    cfg: C.RunCfg,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    *,
    task_metric: TaskMetric | None = None,
    fit_memory: FitMemory | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; writes the run directory and returns a summary.

    `task_metric` computes `eval.metric` and `fit_memory` applies `train.auto_fit`; both come from the
    layers above training (`lora_tune.finetune.finetune` passes them). `hooks` run after ours.
    """
    dist, _ = distributed.start(cfg.train.device)
    try:
        return _train(cfg, resume, overwrite, console, task_metric, fit_memory, hooks, dist)
    finally:
        distributed.stop(dist)


def _train(cfg, resume, overwrite, console, task_metric, fit_memory, hooks, dist: Dist) -> TrainResult:
    """`train` in a process that has joined the others (if any): rank 0 alone writes and prints."""
    console = console or Console(soft_wrap=True)
    if not dist.main:
        console = Console(quiet=True)
    t_start = time.perf_counter()
    if cfg.train.auto_fit:
        if fit_memory is None:
            raise LoraTuneError("train.auto_fit needs the planner: call lora_tune.finetune.finetune (the CLI does)")
        cfg = fit_memory(cfg, console)
    if cfg.eval.metric != "none" and task_metric is None:
        raise LoraTuneError(f"eval.metric={cfg.eval.metric} needs a task metric: call lora_tune.finetune.finetune")
    objective = cfg.train.objective
    records = read_splits(cfg.data, cfg.train.seed, preference=objective != "sft")  # bad data fails here
    if objective != "sft":
        for split in records:
            check_kind(split, paired=objective != "kto", objective=objective)
    with run_lock(Path(cfg.output_dir), console.print) if dist.main else nullcontext():
        run = setup_run(cfg, records, resume, overwrite, console, dist)
        run.t_start = t_start
        run.hooks = [*default_hooks(run, task_metric), *hooks] if dist.main else other_ranks_hooks(run)
        fit(run)
        adapter_dir = run.run_dir / "adapter"
        weights = trainable_state(run.parts.model) if run.parts.sharded else None  # all ranks gather
        if dist.main:
            if cfg.train.load_best_at_end:
                restore_best(run)
            meta = {"base_model": cfg.model.source, "quantization": cfg.model.quantization, "steps": run.state.step}
            meta |= {"objective": objective, "started_from": cfg.model.adapter, "processes": dist.world}
            meta["weights_of_step"] = run.state.best_step if cfg.train.load_best_at_end else run.state.step
            meta["config"] = C.to_dict(cfg)
            save_adapter(run.parts.model, run.tok, adapter_dir, meta, weights)
        dist.barrier()  # the others return once the adapter is written
        return summarise(run, adapter_dir)


def default_hooks(run: Run, task_metric: TaskMetric | None) -> list[Hook]:
    """Rank 0's, in the order they run (see `fit`): status file, log, trackers, progress, evaluation, early
    stopping, the other ranks' sync, checkpoints. The other ranks run only the last two (and no hooks of the caller)."""
    tc, ec = run.cfg.train, run.cfg.eval
    metric_fn = None
    if task_metric is not None and ec.metric != "none" and run.val_records:
        metric_fn = lambda model: task_metric(model, run.tok, run.parts.precision, run.val_records)  # noqa: E731
    return [
        RunStatus(),
        MetricsFile(MetricsLog(run.metrics_path)),
        *tracker_hooks(run.cfg, full_validation=ec.max_samples is None),
        Progress(tc.log_every, ec.metric),
        Evaluation(run.val_stream, tc.eval_every, metric_fn, ec.metric),
        early_stopping(run),
        SyncRanks(),
        checkpointing(run),
    ]


def other_ranks_hooks(run: Run) -> list[Hook]:
    """The hooks of ranks other than 0: none that writes. With sharded weights every evaluation's forward
    needs all ranks, so they evaluate too (and reach rank 0's verdicts themselves)."""
    if not run.parts.sharded:
        return [SyncRanks(), checkpointing(run)]
    return [Evaluation(run.val_stream, run.cfg.train.eval_every), early_stopping(run), SyncRanks(), checkpointing(run)]


def early_stopping(run: Run) -> EarlyStopping:
    tc, ec = run.cfg.train, run.cfg.eval
    return EarlyStopping(tc.early_stopping_patience, tc.early_stopping_min_delta, ec.early_stopping_on, ec.metric)


def checkpointing(run: Run) -> Checkpointing:
    tc = run.cfg.train
    return Checkpointing(tc.save_every, tc.keep_last, at_best=tc.load_best_at_end)


def restore_best(run: Run) -> None:
    """`train.load_best_at_end`: put the best evaluation's weights (from its checkpoint) into the model."""
    best, state = run.state.best_step, run.state
    if best is None or best == state.step:
        return
    path = checkpoint_dir(run.run_dir, best)
    if not path.is_dir():
        run.note(f"[yellow]train.load_best_at_end: the checkpoint of step {best} is gone; keeping the last weights[/]")
        state.best_step = state.step
        return
    load_adapter_weights(path, run.parts.model)
    what = run.cfg.eval.metric if run.cfg.eval.early_stopping_on == "metric" else "validation loss"
    score = state.best_score if run.cfg.eval.early_stopping_on == "metric" else -state.best_score
    run.note(f"final adapter: the weights of step {best}, the best evaluation ({what} {score:.4f})")


def summarise(run: Run, adapter_dir: Path) -> TrainResult:
    """The run's TrainResult (from metrics.jsonl, so evaluations from before a resume count too), and the plot."""
    records = MetricsLog(run.metrics_path).read()
    train_losses = [r["loss"] for r in records if r.get("split", "train") == "train"]
    if run.parts.dist.main:  # the other ranks read what rank 0 wrote
        title = f"{run.cfg.model.source} - {run.run_dir.name}"
        plot = plot_losses(records, run.run_dir / "loss.png", title=title, unit=run.parts.objective.unit)
        run.note(f"adapter saved to {adapter_dir}; metrics in {run.metrics_path}; plot in {plot}")
    return TrainResult(
        run_dir=run.run_dir,
        adapter_dir=adapter_dir,
        steps=run.state.step,
        train_loss=train_losses[-1] if train_losses else None,
        val_losses=[(r["step"], r["loss"]) for r in records if r.get("split") == "val"],
        stopped_early=run.stop_reason is not None,
        resumed_from=run.resumed_from,
        seconds=time.perf_counter() - run.t_start,
        peak_memory_mb=peak_memory_mb(run.parts.precision.device),
    )
