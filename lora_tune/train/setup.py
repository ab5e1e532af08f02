"""Building a `Run`: check the run folder, read the data, load the model, attach LoRA, restore a checkpoint.

Data is read and validated before the model loads, so bad input fails in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

from lora_tune import allocator
from lora_tune import config as C
from lora_tune.atomic import atomic_write_text, replace_dir
from lora_tune.data.batching import BatchStream, choose_batching, collate
from lora_tune.data.pairs import PairStats, collate_prefs
from lora_tune.data.splits import prepare as prepare_data
from lora_tune.data.splits import prepare_prefs
from lora_tune.data.templates import resolve_chat_template
from lora_tune.data.tokenize import TokenizeStats
from lora_tune.errors import LoraTuneError
from lora_tune.models import (
    adapter_meta,
    attach_lora,
    count_parameters,
    load_adapter,
    load_model,
    load_tokenizer,
    prepare_for_training,
    resolve_source,
)
from lora_tune.runtime import choose_device, choose_precision
from lora_tune.train import reference
from lora_tune.train.checkpoint import (
    latest_checkpoint,
    latest_good_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    read_state,
)
from lora_tune.train.compile import choose_compile, compile_layers
from lora_tune.train.distributed import Dist, load_full_optimizer_state, wrap_ddp, wrap_fsdp
from lora_tune.train.metrics import MetricsLog
from lora_tune.train.objectives import build_objective
from lora_tune.train.optim import build_optimizer, build_scheduler
from lora_tune.train.run import Run
from lora_tune.train.rundir import check_fresh_dir, clear_run_dir
from lora_tune.train.state import TrainState
from lora_tune.train.step import LossOf, StepParts


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run_dir(cfg: C.RunCfg, resume: bool, overwrite: bool, note=print) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to clobber an existing run or a user's folder.

    Call it holding the folder's lock (`rundir.run_lock`) and after the data has been read and validated:
    `overwrite` empties the folder, and only a lora_tune run's.
    """
    run_dir = Path(cfg.output_dir)
    if overwrite and not resume:
        clear_run_dir(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if not resume:
        check_fresh_dir(run_dir)
        if ckpt is not None or (run_dir / "adapter").exists():
            raise LoraTuneError(
                f"{run_dir} already holds a run; continue it with --resume, start over with --overwrite, "
                "or set output_dir to a new folder"
            )
        return None
    ckpt = latest_good_checkpoint(run_dir, note)
    if ckpt is None:
        if latest_checkpoint(run_dir) is None and any((run_dir / "checkpoints").glob(".*.damaged")):
            raise LoraTuneError(
                f"every checkpoint in {run_dir / 'checkpoints'} is damaged; start over with --overwrite"
            )
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


def describe_data(console: Console, name: str, stats: TokenizeStats, examples) -> None:
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
    _print_dropped(console, stats.dropped_where)


def _print_dropped(console: Console, where: list[str]) -> None:
    if where:
        console.print(f"  dropped: {', '.join(where[:5])}{' ...' if len(where) > 5 else ''}")


def setup_run(
    cfg: C.RunCfg,
    records: tuple[list, list],
    resume: bool,
    overwrite: bool,
    console: Console,
    dist: Dist | None = None,
) -> Run:
    """Everything the loop needs, restored from the latest checkpoint when resuming one.

    `records` are the (train, validation) records `data.splits.read_splits` read and validated. `dist`
    (from `distributed.start`) places this process among several; rank 0 alone checks and clears the run
    folder, the others learn its verdict.
    """
    tc = cfg.train
    dist = dist or Dist(device=choose_device(tc.device))
    ckpt = _checked_on_main(dist, lambda: check_run_dir(cfg, resume, overwrite, console.print))
    saved = read_state(ckpt) if ckpt is not None else None
    train_records, val_records = records
    device = dist.device
    check_distributed(cfg, dist, saved)
    weight_dtype = cfg.model.quantization if cfg.model.quantization in ("bf16", "fp16") else None
    precision = choose_precision(tc.precision, device, weight_dtype, saved.precision if saved else None)
    ranks = f" (rank {dist.rank} of {dist.world})" if dist.enabled else ""
    console.print(f"device: {device}{ranks}, precision: {precision.reason}")
    if device.type == "cpu":
        console.print(f"allocator: {allocator.describe()}", highlight=False)

    set_seed(tc.seed)
    source_path = resolve_source(cfg.model.source, log=console.print)
    sharded = dist.enabled and tc.distributed == "fsdp"
    model, tok = load_model(
        cfg.model, precision, source_path, quant_storage=precision.dtype if sharded else None, log=console.print
    )
    if cfg.model.adapter and (Path(cfg.model.adapter) / "tokenizer_config.json").is_file():
        tok = load_tokenizer(cfg.model.adapter, cfg.model)  # with the chat template the adapter was trained on
    template = resolve_chat_template(tok, cfg.data.chat_template)
    if template is not None:
        tok.chat_template = template  # saved with the adapter so generation uses the training template
    objective = build_objective(cfg)
    preference = objective.name != "sft"
    if preference:
        max_prompt = cfg.preference.max_prompt_length  # None: half of data.max_length (pairs.prompt_budget)
        train_ex, val_ex, report = prepare_prefs(cfg.data, tok, template, max_prompt, train_records, val_records)
    else:
        train_ex, val_ex, report = prepare_data(cfg.data, tok, template, tc.seed, train_records, val_records)
    describe = describe_pairs if preference else describe_data
    describe(console, "train", report.train, train_ex)
    if not train_ex:
        raise LoraTuneError("no training sample has a supervised token left; raise data.max_length")
    all_val = val_ex  # the reference log-probs cover them all: eval.max_samples may change on resume
    if val_ex:
        val_ex = val_ex[: cfg.eval.max_samples] if cfg.eval.max_samples else val_ex
        describe(console, "validation", report.val, val_ex)
    for line in report.lines():
        console.print(line, highlight=False)

    model = _adapt(model, cfg, console)
    if getattr(objective, "needs_reference", False):
        _reference(cfg, model, tok, precision, source_path, train_ex, all_val, ckpt is not None, console)
    wrapped = None
    if dist.enabled:
        if sharded and ckpt is not None:
            load_adapter_weights(ckpt, model)  # whole, before FSDP shards it (the optimizer state follows later)
        root = LossOf(model, objective)
        wrapped = wrap_fsdp(root, model, dist, precision.dtype) if sharded else wrap_ddp(root, dist)
        if dist.rank:  # dropout masks differ between ranks (rank 0 draws what a single process would)
            torch.manual_seed(tc.seed + 1_000_003 * dist.rank)
        how = "FSDP (weights sharded)" if sharded else "DDP"
        total = tc.micro_batch_size * dist.world
        console.print(f"distributed: {how} over {dist.world} processes, {total} rows per micro-batch in all")
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    optimizer = build_optimizer(params, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    parts = StepParts(model, objective, optimizer, scaler, params, precision, tc.max_grad_norm, dist, wrapped, sharded)
    collate_fn = collate_prefs if preference else collate
    rows = tc.micro_batch_size * dist.world  # a micro-batch of all ranks together
    batching = choose_batching(train_ex, rows, tc.seed, cfg.data.packing, cfg.data.group_by_length, not preference)
    console.print(f"batching: {batching.reason}", highlight=False)
    stream = BatchStream(
        train_ex,
        rows,
        tc.seed,
        tok.pad_token_id,
        strategy=batching.strategy,
        max_length=cfg.data.max_length,
        collate_fn=collate_fn,
        shard=(dist.rank, dist.world),
    )
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(stream) / tc.grad_accum))
    # evaluating in batches no larger than training's keeps evaluation within the memory training needs
    val_stream = BatchStream(
        val_ex,
        cfg.eval.batch_size or tc.micro_batch_size,
        tc.seed,
        tok.pad_token_id,
        shuffle=False,
        collate_fn=collate_fn,
    )
    scheduler = build_scheduler(optimizer, tc, total_steps)
    compiling = choose_compile(False if sharded else tc.compile, device, total_steps)
    if compiling.on:
        compile_layers(model)
    console.print(f"compile: {compiling.reason}", highlight=False)
    run = Run(cfg, console, parts, scheduler, stream, val_stream, tok, report.val_records, TrainState(), total_steps)
    _start_or_restore(run, ckpt)
    return run


def _checked_on_main(dist: Dist, check: Callable[[], Path | None]) -> Path | None:
    """`check()` (the run folder's check, which may clear or set aside folders) on rank 0 only; every
    rank gets its answer, or raises its error, so no rank waits for one that has given up."""
    if not dist.enabled:
        return check()
    answer: tuple[str | None, str | None] = (None, None)
    if dist.main:
        try:
            found = check()
            answer = (str(found) if found is not None else None, None)
        except LoraTuneError as e:
            answer = (None, str(e))
    path, error = dist.broadcast(answer)
    if error is not None:
        raise LoraTuneError(error)
    return Path(path) if path is not None else None


def check_distributed(cfg: C.RunCfg, dist: Dist, saved: TrainState | None) -> None:
    """Refuse what does not work across processes yet, and a resume whose global batch would change."""
    if saved is not None and saved.world != dist.world:
        raise LoraTuneError(
            f"this run was trained on {saved.world} process(es), now {dist.world}: a micro-batch would hold "
            f"{cfg.train.micro_batch_size * dist.world} rows instead of {cfg.train.micro_batch_size * saved.world}, "
            f"and the data position would mean other samples. Resume with --nproc {saved.world}"
        )
    if not dist.enabled:
        return
    if cfg.preference.precompute_ref or (cfg.model.adapter and cfg.train.objective in ("dpo", "kto")):
        raise LoraTuneError(
            "a precomputed reference (preference.precompute_ref, or dpo/kto from model.adapter) is not supported "
            "with more than one process yet; train on one process, or set preference.precompute_ref=false"
        )
    if cfg.train.auto_fit:
        raise LoraTuneError("train.auto_fit plans one process; with --nproc set micro_batch_size and grad_accum")
    if cfg.train.distributed == "fsdp":
        check_fsdp(cfg)


def check_fsdp(cfg: C.RunCfg) -> None:
    """What sharded training does not do (yet), each with the way out; all problems at once."""
    tc, problems = cfg.train, []
    if cfg.eval.metric != "none":
        problems.append("eval.metric generates text, which needs the whole model on one process: set eval.metric=none")
    if tc.load_best_at_end:
        problems.append("train.load_best_at_end reloads weights into sharded layers: set it to false")
    if tc.objective == "kto":
        problems.append("kto's KL estimate runs outside the sharded forward: use ddp for kto")
    if cfg.model.quantization == "int8":
        problems.append("8-bit weights cannot be sharded: use nf4 (FSDP-QLoRA) or a 16-bit base")
    if tc.optimizer != "adamw":
        problems.append(f"train.optimizer={tc.optimizer} keeps its own state layout: use adamw (FSDP shards it)")
    if tc.precision == "fp16":
        problems.append("fp16's GradScaler does not see sharded gradients here: use train.precision=bf16")
    if tc.compile is True:
        problems.append("train.compile with FSDP is not supported here: set train.compile=false")
    if problems:
        raise LoraTuneError("train.distributed=fsdp: " + "; ".join(problems))


def _adapt(model, cfg: C.RunCfg, console: Console):
    """Freeze the base, attach LoRA (or the adapter training starts from), and say how many parameters train."""
    prepare_for_training(model, cfg.train.gradient_checkpointing)
    if cfg.model.adapter:
        meta = adapter_meta(cfg.model.adapter)
        base = meta.get("base_model")
        if base and base != cfg.model.source:
            note = f"note: {cfg.model.adapter} was trained on {base}, this run loads {cfg.model.source}"
            console.print(f"[yellow]{note}[/]")
        model = load_adapter(model, cfg.model.adapter, trainable=True)
        r = model.peft_config["default"].r
        what = f"continuing the adapter {cfg.model.adapter} (LoRA r={r}; its own lora settings apply)"
    else:
        model = attach_lora(model, cfg.lora)
        what = f"LoRA r={cfg.lora.r}"
    model.train()  # explicitly, before the first validation pass (see runtime.evaluating)
    trainable, total = count_parameters(model)
    console.print(f"{what}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def describe_pairs(console: Console, name: str, stats: PairStats, examples) -> None:
    kind = "pairs" if examples and examples[0].label is None else "examples"
    extra = []
    if stats.truncated_prompts or stats.truncated_answers:
        extra.append(f"{stats.truncated_prompts} prompts and {stats.truncated_answers} answers truncated")
    if stats.dropped_identical:
        extra.append(f"{stats.dropped_identical} dropped as identical after truncation")
    if stats.dropped_no_supervised:
        extra.append(f"{stats.dropped_no_supervised} dropped with no answer token left")
    more = f" ({', '.join(extra)})" if extra else ""
    scored = sum(e.n_supervised for e in examples)
    console.print(f"{name}: {stats.kept} {kind} from {stats.records} records, {scored} answer tokens scored{more}")
    _print_dropped(console, stats.dropped_where)


def _reference(cfg: C.RunCfg, model, tok, precision, source_path, train_ex, val_ex, resuming: bool, console) -> None:
    """Reference log-probs: precomputed when asked, and always when training starts from an adapter (the
    reference is then that adapter's model, the model at step 0); otherwise each step computes them with
    the adapter disabled."""
    if not (cfg.preference.precompute_ref or cfg.model.adapter):
        console.print("reference: the base model (adapter disabled), computed each step", highlight=False)
        return
    ident = reference.model_identity(source_path, cfg.model.quantization, precision, cfg.model.adapter)
    splits = {"train": train_ex, "val": val_ex}
    key = reference.fingerprint(splits, ident)
    batch = cfg.eval.batch_size or cfg.train.micro_batch_size
    base = not cfg.model.adapter

    def compute(examples):
        return reference.compute(model, examples, batch, tok.pad_token_id, precision, base=base)

    reference.attach(splits, Path(cfg.output_dir), key, compute, cfg.data.cache, resuming, console.print)


def _start_or_restore(run: Run, ckpt: Path | None) -> None:
    """A fresh run writes its config and an empty log; a resumed one loads its checkpoint and trims its log.

    Every rank restores the checkpoint; only rank 0 writes.
    """
    log = MetricsLog(run.metrics_path)
    main = run.parts.dist.main
    if ckpt is None:
        run.state = TrainState(
            precision=run.parts.precision.name,
            threads=torch.get_num_threads(),
            config_hash=C.config_hash(run.cfg),
            world=run.parts.dist.world,
        )
        if main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.run_dir / "config.yaml", C.dump_yaml(run.cfg))
            if log.path.exists():
                log.path.unlink()
        return
    p = run.parts
    sharded_optimizer = (lambda state: load_full_optimizer_state(p.wrapped, p.optimizer, state)) if p.sharded else None
    args = (ckpt, p.model, p.optimizer, run.scheduler, p.scaler, p.dist.rank, run.note, sharded_optimizer)
    run.state = load_checkpoint(*args)
    run.state.world = p.dist.world
    run.resumed_from = run.state.step
    run.stop_reason = run.state.stopped  # an early-stopped run stays stopped
    run.stream.position = dataclasses.replace(run.state.position)  # a copy: the stream advances its own
    if main:
        log.truncate_after(run.state.step)
    if run.state.threads != torch.get_num_threads():
        run.note(
            f"[yellow]note: {torch.get_num_threads()} threads now, {run.state.threads} before; "
            "losses may differ from an uninterrupted run in the last digits[/]"
        )
    _reset_best_if_its_unit_changed(run)
    run.note(f"resumed from {ckpt} (step {run.state.step})")


def _reset_best_if_its_unit_changed(run: Run) -> None:
    """The best score is in the unit of `eval.early_stopping_on` (and `eval.metric`); when either changed
    since the run started, the old best means nothing: start the count afresh, and say so."""
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text()) or {}
    old = {k: (saved.get("eval") or {}).get(k) for k in ("metric", "early_stopping_on")}
    now = {"metric": run.cfg.eval.metric, "early_stopping_on": run.cfg.eval.early_stopping_on}
    watched = old["early_stopping_on"] != now["early_stopping_on"] or (
        now["early_stopping_on"] == "metric" and old["metric"] != now["metric"]
    )
    if watched and run.state.best_score is not None:
        run.state.best_score, run.state.best_step, run.state.bad_evals = None, None, 0
        run.note(
            f"note: early stopping now watches {now['early_stopping_on']} ({now['metric']}), not "
            f"{old['early_stopping_on']} ({old['metric']}); the best score and patience count start afresh"
        )


def save_adapter(model, tok, out: Path, meta: dict, weights: dict | None = None) -> Path:
    """Write the final adapter folder atomically: weights, config, tokenizer (with its chat template).

    `weights`: the trainable weights whole, when the model is sharded (`distributed.trainable_state`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp, state_dict=weights)
    tok.save_pretrained(tmp)
    (tmp / "lora_tune.json").write_text(json.dumps(meta, indent=2))
    return replace_dir(tmp, out)
