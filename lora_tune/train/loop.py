"""The training loop: one readable function, helpers outside it.

Per optimizer step: take `grad_accum` micro-batches, count their supervised tokens N, backpropagate
each micro-batch's summed token loss divided by N (so k micro-batches equal one k-times-larger batch,
whatever their padding or lengths), unscale, clip, step, schedule, zero. Checkpoints and evaluations
are plain calls every N steps.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from lora_tune import config as C
from lora_tune.atomic import atomic_write_text, replace_dir
from lora_tune.data.batching import BatchStream, Position
from lora_tune.data.splits import prepare as prepare_data
from lora_tune.data.splits import read_splits
from lora_tune.data.templates import resolve_chat_template
from lora_tune.data.tokenize import IGNORE, TokenizeStats
from lora_tune.errors import LoraTuneError
from lora_tune.models import attach_lora, count_parameters, load_model, prepare_for_training, resolve_source
from lora_tune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lora_tune.train.loss import evaluate_loss, real_tokens, supervised_loss_sum
from lora_tune.train.metrics import MetricsLog, plot_losses
from lora_tune.train.optim import build_optimizer, build_scheduler
from lora_tune.train.precision import Precision, choose_device, choose_precision
from lora_tune.train.progress import StepProgress, peak_memory_mb


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run_dir(cfg: C.RunCfg, resume: bool, overwrite: bool) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to clobber an existing run."""
    run_dir = Path(cfg.output_dir)
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if not resume:
        if ckpt is not None or (run_dir / "adapter").exists():
            raise LoraTuneError(
                f"{run_dir} already holds a run; continue it with --resume, start over with --overwrite, "
                "or set output_dir to a new folder"
            )
        return None
    if ckpt is None:
        return None
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = C.resume_relevant(C.load_config(saved_path))
        now = C.resume_relevant(cfg)
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if changed:
            lines = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise LoraTuneError(
                f"refusing to resume {run_dir}: these settings changed since it started: {lines}. "
                "Put them back, or start a new run in another output_dir"
            )
    return ckpt


def _describe_data(console: Console, name: str, stats: TokenizeStats, examples) -> None:
    tokens = sum(len(e.input_ids) for e in examples)
    sup = sum(e.n_supervised for e in examples)
    extra = []
    if stats.truncated:
        extra.append(f"{stats.truncated} truncated")
    if stats.chunked:
        extra.append(f"{stats.chunked} long text(s) split into chunks")
    if stats.dropped_too_long:
        extra.append(f"{stats.dropped_too_long} dropped as too long")
    if stats.dropped_no_supervised:
        extra.append(f"{stats.dropped_no_supervised} dropped with no supervised token left")
    more = f" ({', '.join(extra)})" if extra else ""
    console.print(f"{name}: {stats.kept} samples from {stats.records} records, {tokens} tokens, {sup} supervised{more}")
    if stats.dropped_where:
        console.print(
            f"  dropped: {', '.join(stats.dropped_where[:5])}{' ...' if len(stats.dropped_where) > 5 else ''}"
        )


def optimizer_step(
    model,
    stream: BatchStream,
    accum: int,
    precision: Precision,
    scaler,
    optimizer,
    params,
    max_grad_norm: float,
    split: int = 1,
    log=print,
    chunked_loss: bool = True,
) -> dict[str, float]:
    """One optimizer step over `accum` micro-batches, normalised by their total supervised tokens.

    Each micro-batch runs as `split` smaller pieces. Since the loss is a token sum divided by the step's
    token count, the pieces give the same gradients; on a CUDA out-of-memory error the step is redone
    with twice the pieces (the data position is untouched, nothing is lost) and `split` is returned.
    """
    micro = [stream.next() for _ in range(accum)]
    n_total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    while True:
        try:
            loss_total = _accumulate(model, micro, split, n_total, precision, scaler, chunked_loss)
            break
        except torch.OutOfMemoryError:
            rows = micro[0]["input_ids"].shape[0]
            optimizer.zero_grad(set_to_none=True)
            if precision.device.type == "cuda":
                torch.cuda.empty_cache()
            if split >= rows:
                raise
            split *= 2
            log(
                f"out of memory: running each micro-batch of {rows} as {split} pieces of "
                f"{math.ceil(rows / split)} (same effective batch and gradients), and continuing"
            )
    grad_norm = float("nan")
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": float(loss_total) / n_total,
        "tokens": n_total,
        "real_tokens": sum(real_tokens(b) for b in micro),
        "padded_tokens": sum(b["input_ids"].numel() for b in micro),  # what the model computed on
        "grad_norm": grad_norm,
        "split": split,
    }


def _accumulate(
    model, micro, split: int, n_total: int, precision: Precision, scaler, chunked_loss: bool
) -> torch.Tensor:
    loss_total = torch.zeros((), device=precision.device)
    for batch in micro:
        rows = batch["input_ids"].shape[0]
        size = math.ceil(rows / split)
        for lo in range(0, rows, size):
            piece = {k: v[lo : lo + size] for k, v in batch.items()}
            with precision.autocast():
                loss_sum, _ = supervised_loss_sum(model, piece, chunked_loss)
            scaler.scale(loss_sum / n_total).backward()
            loss_total += loss_sum.detach()
    return loss_total


def save_adapter(model, tok, out: Path, meta: dict) -> Path:
    """Write the final adapter folder atomically: weights, config, tokenizer (with its chat template)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "lora_tune.json").write_text(json.dumps(meta, indent=2))
    return replace_dir(tmp, out)


def train(cfg: C.RunCfg, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; writes the run directory and returns a summary."""
    console = console or Console(soft_wrap=True)
    t_start = time.perf_counter()
    if cfg.train.auto_fit:
        cfg = fit_to_memory(cfg, console)
    run_dir = Path(cfg.output_dir)
    ckpt = check_run_dir(cfg, resume, overwrite)
    tc = cfg.train

    # Data is read and validated before the model loads, so bad input fails in seconds.
    train_records, val_records = read_splits(cfg.data, tc.seed)
    device = choose_device(tc.device)
    weight_dtype = cfg.model.quantization if cfg.model.quantization in ("bf16", "fp16") else None
    precision = choose_precision(tc.precision, device, weight_dtype)
    console.print(f"device: {device}, precision: {precision.reason}")

    set_seed(tc.seed)
    model_path = resolve_source(cfg.model.source, log=console.print)
    model, tok = load_model(cfg.model, precision, model_path)
    template = resolve_chat_template(tok, cfg.data.chat_template)
    if template is not None:
        tok.chat_template = template  # saved with the adapter so generation uses the training template
    train_ex, val_ex, report = prepare_data(cfg.data, tok, template, tc.seed, train_records, val_records)
    _describe_data(console, "train", report.train, train_ex)
    if not train_ex:
        raise LoraTuneError("no training sample has a supervised token left; raise data.max_length")
    if val_ex:
        val_ex = val_ex[: cfg.eval.max_samples] if cfg.eval.max_samples else val_ex
        _describe_data(console, "validation", report.val, val_ex)
    for line in report.lines():
        console.print(line, highlight=False)

    prepare_for_training(model, tc.gradient_checkpointing)
    model = attach_lora(model, cfg.lora)
    model.train()  # explicitly, before the first validation pass (see models.evaluating)
    trainable, total = count_parameters(model)
    console.print(
        f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    strategy = "pack" if cfg.data.packing else "group_by_length" if cfg.data.group_by_length else "pad"
    stream = BatchStream(
        train_ex,
        tc.micro_batch_size,
        tc.seed,
        tok.pad_token_id,
        strategy=strategy,
        max_length=cfg.data.max_length,
    )
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(stream) / tc.grad_accum))
    scheduler = build_scheduler(optimizer, tc, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    # evaluating in batches no larger than training's keeps evaluation within the memory training needs
    eval_batch = cfg.eval.batch_size or tc.micro_batch_size
    val_stream = BatchStream(val_ex, eval_batch, tc.seed, tok.pad_token_id, shuffle=False)
    log = MetricsLog(run_dir / "metrics.jsonl")

    state = {
        "position": {"epoch": 0, "index": 0},
        "best_score": None,
        "bad_evals": 0,
        "tokens_seen": 0,
        "threads": torch.get_num_threads(),
        "config_hash": C.config_hash(cfg),
    }
    step, result = 0, TrainResult(run_dir, run_dir / "adapter", 0)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, scaler)
        step = result.resumed_from = state["step"]
        stream.position = Position(**state["position"])
        log.truncate_after(step)
        if state.get("threads") != torch.get_num_threads():
            console.print(
                f"[yellow]note: {torch.get_num_threads()} threads now, {state.get('threads')} before; "
                "losses may differ from an uninterrupted run in the last digits[/]"
            )
        console.print(f"resumed from {ckpt} (step {step})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", C.dump_yaml(cfg))
        if log.path.exists():
            log.path.unlink()

    def run_eval(at: int) -> tuple[float, float | None] | None:
        """Validation loss, and the task metric when configured; logged as one `split: val` record."""
        if not val_ex:
            return None
        loss, n = evaluate_loss(model, val_stream, precision.autocast)
        record = {"split": "val", "step": at, "loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
        value = task_metric(model, tok, precision, cfg.eval, report.val_records, eval_batch)
        if value is not None:
            record[cfg.eval.metric] = value
        log.write(record)
        result.val_losses.append((at, loss))
        return loss, value

    if step == 0 and val_ex:
        v0, m0 = run_eval(0)
        more = f", {cfg.eval.metric} {m0:.4f}" if m0 is not None else ""
        console.print(f"validation loss before training: {v0:.4f} (ppl {math.exp(min(v0, 50)):.2f}){more}")

    model.train()
    last_saved = step if ckpt is not None else -1
    t_window, tok_window = time.perf_counter(), 0
    split = 1  # pieces per micro-batch; doubled on an out-of-memory error
    with StepProgress(console, total_steps, step, tc.log_every) as bar:
        while step < total_steps:
            lr = scheduler.get_last_lr()[0]
            out = optimizer_step(
                model,
                stream,
                tc.grad_accum,
                precision,
                scaler,
                optimizer,
                params,
                tc.max_grad_norm,
                split,
                bar.note,
                tc.chunked_loss,
            )
            recovered = out["split"] != split  # this step hit an out-of-memory error and was redone smaller
            split = out["split"]
            scheduler.step()
            step += 1
            state["tokens_seen"] += out["tokens"]
            tok_window += out["real_tokens"]
            elapsed = time.perf_counter() - t_window
            log.write(
                {
                    "step": step,
                    "loss": out["loss"],
                    "lr": lr,
                    "tokens": out["tokens"],
                    "real_tokens": out["real_tokens"],
                    "padded_tokens": out["padded_tokens"],
                    "grad_norm": out["grad_norm"],
                    "epoch": stream.position.epoch,
                    "time": round(time.perf_counter() - t_start, 3),
                }
            )
            result.train_loss = out["loss"]
            bar.update(
                step,
                total_steps,
                f"loss {out['loss']:.4f}  lr {lr:.2e}  {tok_window / elapsed:,.0f} tok/s  "
                f"mem {peak_memory_mb(device):,.0f} MB",
            )
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                evaluated = run_eval(step)
                if evaluated is not None:
                    v, mv = evaluated
                    bar.note(
                        f"step {step}: validation loss {v:.4f}"
                        + (f", {cfg.eval.metric} {mv:.4f}" if mv is not None else "")
                    )
                    score = mv if cfg.eval.early_stopping_on == "metric" else -v
                    if _should_stop(state, score, tc):
                        bar.note(f"early stopping: no improvement in {tc.early_stopping_patience} evaluations")
                        result.stopped_early = True
            state["position"] = {"epoch": stream.position.epoch, "index": stream.position.index}
            if recovered:
                bar.note(f"step {step}: checkpoint after the out-of-memory recovery (micro-batches now in {split})")
            if (
                (tc.save_every and step % tc.save_every == 0)
                or step == total_steps
                or result.stopped_early
                or recovered
            ):
                save_checkpoint(run_dir, step, model, optimizer, scheduler, scaler, state, tc.keep_last)
                last_saved = step
            if result.stopped_early:
                break
    if last_saved != step:
        save_checkpoint(run_dir, step, model, optimizer, scheduler, scaler, state, tc.keep_last)
    if val_ex and not result.stopped_early:
        v, mv = run_eval(step)
        more = f", {cfg.eval.metric} {mv:.4f}" if mv is not None else ""
        console.print(f"validation loss after training: {v:.4f} (ppl {math.exp(min(v, 50)):.2f}){more}")

    result.steps = step
    meta = {
        "base_model": cfg.model.source,
        "quantization": cfg.model.quantization,
        "steps": step,
        "config": C.to_dict(cfg),
    }
    save_adapter(model, tok, result.adapter_dir, meta)
    plot_losses(log.read(), run_dir / "loss.png", title=f"{cfg.model.source} - {run_dir.name}")
    result.seconds = time.perf_counter() - t_start
    result.peak_memory_mb = peak_memory_mb(device)
    console.print(f"adapter saved to {result.adapter_dir}; metrics in {log.path}; plot in {run_dir / 'loss.png'}")
    return result


def task_metric(model, tok, precision: Precision, ecfg: C.EvalCfg, records, batch_size: int) -> float | None:
    """The configured task metric on the first `metric_samples` validation records (None when off)."""
    if ecfg.metric == "none" or not records:
        return None
    from lora_tune.evaluate.generate import Sampling
    from lora_tune.evaluate.run import EvalSettings, evaluate_model

    settings = EvalSettings(
        metrics=[ecfg.metric],
        labels=ecfg.labels or None,
        batch_size=batch_size,
        sampling=Sampling(max_new_tokens=ecfg.max_new_tokens),
    )
    out = evaluate_model(model, tok, precision, settings, records[: ecfg.metric_samples], None)
    model.train()
    return out["metrics"][ecfg.metric]


def fit_to_memory(cfg: C.RunCfg, console: Console) -> C.RunCfg:
    """Apply the planner's choice of settings for the memory budget (`train.auto_fit`)."""
    from lora_tune.bench.plan import ModelShape, auto_fit, load_model_config, parse_size

    device = choose_device(cfg.train.device)
    if cfg.train.memory_budget:
        budget = parse_size(cfg.train.memory_budget)
    elif device.type == "cuda":
        budget = float(torch.cuda.get_device_properties(device).total_memory)
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


def _should_stop(state: dict, score: float, tc: C.TrainCfg) -> bool:
    """Patience counter on a higher-is-better score (minus the loss, or the task metric)."""
    best = state.get("best_score")
    if best is None or score > best + tc.early_stopping_min_delta:
        state["best_score"], state["bad_evals"] = score, 0
        return False
    state["bad_evals"] += 1
    return bool(tc.early_stopping_patience) and state["bad_evals"] >= tc.early_stopping_patience
