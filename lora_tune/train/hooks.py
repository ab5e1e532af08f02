"""The loop's hooks: the metrics log, the progress bar, evaluation, early stopping and checkpointing.

A hook is a plain object with up to five methods, called by the loop in the order of the list that
`train()` builds (no registry, no flags that other hooks flip):
- `on_start(run)`: before the first step (after a resume, before the first new step);
- `on_log(run, record)`: for every record logged, a training step's or an evaluation's;
- `on_step_end(run, out)`: after each optimizer step, once its record is logged;
- `on_end(run)`: after the last step (in reverse list order);
- `on_fail(run)`: instead of `on_end` when the loop raises (in reverse order): close what `on_start` opened.
Records are the lines of `metrics.jsonl`. `run.log(record)` hands one to every hook; `run.stop(reason)`
ends the loop after the current step (early stopping is its only caller).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lora_tune.atomic import atomic_write_text
from lora_tune.data.batching import BatchStream
from lora_tune.progress import StepProgress
from lora_tune.runtime import evaluating, peak_memory_mb
from lora_tune.train.checkpoint import rng_bytes, save_checkpoint
from lora_tune.train.distributed import full_optimizer_state, trainable_state
from lora_tune.train.metrics import MetricsLog
from lora_tune.train.objectives import LossSum
from lora_tune.train.run import Run
from lora_tune.train.step import StepOut, in_pieces, pieces

Record = dict[str, Any]


class Hook:
    """Does nothing at every point; subclasses override what they need."""

    def on_start(self, run: Run) -> None:
        pass

    def on_log(self, run: Run, record: Record) -> None:
        pass

    def on_step_end(self, run: Run, out: StepOut) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass

    def on_fail(self, run: Run) -> None:
        pass


def is_val(record: Record) -> bool:
    return record.get("split") == "val"


class MetricsFile(Hook):
    """Appends every record to `metrics.jsonl`."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def on_log(self, run: Run, record: Record) -> None:
        self.log.write(record)


class RunStatus(Hook):
    """Keeps `status.json` in the run folder: running (with the total steps and pid), then finished,
    stopped early, failed (with the error) or interrupted, for whoever watches the folder (the dashboard).
    A run killed outright leaves "running" behind with a dead pid: that reads as interrupted."""

    def on_start(self, run: Run) -> None:
        self.write(run, "running")

    def on_end(self, run: Run) -> None:
        self.write(run, "stopped early" if run.stop_reason else "finished", reason=run.stop_reason)

    def on_fail(self, run: Run) -> None:
        failure = sys.exc_info()[1]
        if isinstance(failure, KeyboardInterrupt):
            self.write(run, "interrupted")
        else:
            self.write(run, "failed", error=f"{type(failure).__name__}: {failure}"[:2000] if failure else None)

    def write(self, run: Run, status: str, **extra: Any) -> None:
        record = {"status": status, "step": run.state.step, "total_steps": run.total_steps, "pid": os.getpid()}
        record |= {"time": time.time(), **{k: v for k, v in extra.items() if v is not None}}
        with contextlib.suppress(OSError):  # a full disk must not turn a finished run into a failed one
            atomic_write_text(run.run_dir / "status.json", json.dumps(record))


class Progress(Hook):
    """A live bar on a terminal (plain lines every `log_every` steps elsewhere) and evaluation lines."""

    def __init__(self, log_every: int, metric: str):
        self.log_every, self.metric = log_every, metric
        self.bar: StepProgress | None = None

    def on_start(self, run: Run) -> None:
        self.bar = StepProgress(run.console, run.total_steps, run.state.step, self.log_every).__enter__()
        self.t0, self.tokens = time.perf_counter(), 0

    def on_log(self, run: Run, record: Record) -> None:
        if is_val(record):
            run.note(self._val_line(run, record))
            return
        self.tokens += record["real_tokens"]
        info = f"loss {record['loss']:.4f}"
        if "token_accuracy" in record:
            info += f"  acc {record['token_accuracy']:.3f}"
        if "rewards/margins" in record:
            info += f"  margin {record['rewards/margins']:+.3f}"
        if "rewards/accuracies" in record:
            info += f"  reward acc {record['rewards/accuracies']:.2f}"
        rate = self.tokens / (time.perf_counter() - self.t0)
        info += f"  lr {record['lr']:.2e}  {rate:,.0f} tok/s  mem {record['memory_mb']:,.0f} MB"
        self.bar.update(record["step"], run.total_steps, info)

    def _val_line(self, run: Run, record: Record) -> str:
        more = f", {self.metric} {record[self.metric]:.4f}" if self.metric in record else ""
        if "rewards/accuracies" in record:
            more += f", reward accuracy {record['rewards/accuracies']:.3f}"
        if "rewards/margins" in record:
            more += f", margin {record['rewards/margins']:+.3f}"
        ppl = f" (ppl {record['ppl']:.2f})" if "ppl" in record else ""
        if record["step"] == 0:
            return f"validation loss before training: {record['loss']:.4f}{ppl}{more}"
        if record["step"] == run.total_steps:
            return f"validation loss after training: {record['loss']:.4f}{ppl}{more}"
        return f"step {record['step']}: validation loss {record['loss']:.4f}{more}"

    def on_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    on_fail = on_end


MetricFn = Callable[[torch.nn.Module], float]  # the model -> the task metric on validation records


class Evaluation(Hook):
    """Validation loss (and the objective's figures, and the task metric) before, during and after training.

    Before training only on a fresh start; every `every` steps; after the last step, before its
    checkpoint is written (so the checkpoint knows the result, and resuming a finished run evaluates
    nothing again). Each evaluation is logged as one `split: val` record.
    """

    def __init__(self, stream: BatchStream, every: int, task_metric: MetricFn | None = None, metric: str = ""):
        self.stream, self.every = stream, every
        self.task_metric, self.metric = task_metric, metric

    def on_start(self, run: Run) -> None:
        if run.state.step == 0:
            self.evaluate(run)

    def on_step_end(self, run: Run, out: StepOut) -> None:
        step = run.state.step
        if step == run.total_steps or (self.every and step % self.every == 0 and run.stop_reason is None):
            self.evaluate(run)

    def evaluate(self, run: Run) -> None:
        if not len(self.stream):
            return
        loss, units, figures = objective_totals(run, self.stream)
        objective = run.parts.objective
        record = {"split": "val", "step": run.state.step, "loss": loss}
        if objective.unit == "tokens":  # a perplexity only where the loss is a mean token cross-entropy
            record["ppl"] = math.exp(min(loss, 50))
        record |= {objective.unit: units, **objective.report(figures, units)}
        if self.task_metric is not None:
            record[self.metric] = self.task_metric(run.parts.model)
            run.parts.model.train()
        run.log(record)


@torch.no_grad()
def objective_totals(run: Run, batches) -> tuple[float, int, dict[str, float]]:
    """The objective's mean loss per unit, its units and its figure sums over `batches`, in eval mode.

    On an out-of-memory error a batch is redone in twice as many pieces (and so are the batches after it).
    """
    parts = run.parts
    total, units, figures, split = 0.0, 0, {}, 1

    def retrying(new_split: int) -> None:
        run.note(f"out of memory in evaluation: batches now run as {new_split} pieces")

    with evaluating(parts.model):
        for batch in batches:

            def losses(s: int, batch=batch) -> list:
                with parts.precision.autocast():
                    parts.objective.begin_step(parts.model, [batch])
                return [_piece_loss(parts, piece) for piece in pieces(batch, s)]

            outs, split = in_pieces(losses, split, batch["input_ids"].shape[0], retrying)
            for out in outs:
                total += float(out.loss)
                for k, v in out.figures.items():
                    figures[k] = figures.get(k, 0.0) + float(v)
            units += parts.objective.units(batch)
    return (total / units if units else float("nan")), units, figures


def _piece_loss(parts, piece) -> LossSum:
    with parts.precision.autocast():
        return LossSum(*parts.loss(piece, training=False))


class EarlyStopping(Hook):
    """Keeps the best evaluation score and a patience count in the state; stops after `patience` bad ones.

    The score is minus the validation loss, or the task metric (`on="metric"`); higher is better, and an
    improvement must beat the best by more than `min_delta`. The evaluation before training does not
    count; the one after it can be the best but stops nothing. With `patience` 0 the best score is still
    kept (for `train.load_best_at_end`), but training never stops early.
    """

    def __init__(self, patience: int, min_delta: float, on: str = "loss", metric: str = ""):
        self.patience, self.min_delta, self.on, self.metric = patience, min_delta, on, metric

    def on_log(self, run: Run, record: Record) -> None:
        if not is_val(record) or record["step"] == 0:
            return
        score = record[self.metric] if self.on == "metric" else -record["loss"]
        state = run.state
        if state.best_score is None or score > state.best_score + self.min_delta:
            state.best_score, state.best_step, state.bad_evals = score, record["step"], 0
            return
        state.bad_evals += 1
        if self.patience and state.bad_evals >= self.patience and record["step"] < run.total_steps:
            run.stop(f"early stopping: no improvement in {self.patience} evaluations")


class Checkpointing(Hook):
    """Saves a checkpoint every `every` steps, at the last step, when stopping early, right after a step
    that recovered from an out-of-memory error, and (with `at_best`) at each new best evaluation. Keeps the
    newest `keep_last`, and never prunes the best evaluation's checkpoint."""

    def __init__(self, every: int, keep_last: int, at_best: bool = False):
        self.every, self.keep_last, self.at_best = every, keep_last, at_best
        self.last_saved = -1

    def on_start(self, run: Run) -> None:
        self.last_saved = run.state.step if run.resumed_from is not None else -1

    def on_step_end(self, run: Run, out: StepOut) -> None:
        step = run.state.step
        if out.recovered:
            run.note(f"step {step}: checkpoint after the out-of-memory recovery (micro-batches now in {out.split})")
        due = self.every and step % self.every == 0
        best = self.at_best and run.state.best_step == step
        if due or best or step == run.total_steps or run.stop_reason is not None or out.recovered:
            self.save(run)

    def on_end(self, run: Run) -> None:
        if self.last_saved != run.state.step:
            self.save(run)

    def save(self, run: Run) -> None:
        """Every rank hands rank 0 its random states; rank 0 writes the checkpoint."""
        p = run.parts
        rngs = p.dist.gather_bytes(rng_bytes())
        weights = optimizer = None
        if p.sharded:  # gathered whole from the shards by all ranks, written by rank 0
            weights = trainable_state(p.model)
            optimizer = full_optimizer_state(p.wrapped, p.optimizer)
        self.last_saved = run.state.step
        if not p.dist.main:
            return
        args = (run.run_dir, run.state, p.model, p.optimizer, run.scheduler, p.scaler, self.keep_last)
        save_checkpoint(*args, protect=run.state.best_step, rngs=rngs, weights=weights, optimizer_state=optimizer)


class SyncRanks(Hook):
    """With several processes: after each step, rank 0's verdicts reach the others before anything acts on
    them. Rank 0 alone evaluates, so early stopping and the best evaluation are decided there; the other
    ranks take its stop reason and best score, and so checkpoint and stop at the same steps."""

    def on_step_end(self, run: Run, out: StepOut) -> None:
        if not run.parts.dist.enabled:
            return
        s = run.state
        verdict = (run.stop_reason, s.stopped, s.best_score, s.best_step, s.bad_evals)
        run.stop_reason, s.stopped, s.best_score, s.best_step, s.bad_evals = run.parts.dist.broadcast(verdict)


def train_record(run: Run, out: StepOut, lr: float, seconds: float) -> Record:
    """The metrics.jsonl line of one optimizer step."""
    return {
        "step": run.state.step,
        "loss": out.loss,
        **out.figures,
        "lr": lr,
        run.parts.objective.unit: out.units,
        "real_tokens": out.real_tokens,
        "padded_tokens": out.padded_tokens,
        "grad_norm": out.grad_norm,
        "epoch": run.stream.position.epoch,
        "time": round(time.perf_counter() - run.t_start, 3),
        "tokens_per_s": round(out.real_tokens / seconds, 1) if seconds > 0 else None,
        "memory_mb": round(peak_memory_mb(run.parts.precision.device), 1),
    }
