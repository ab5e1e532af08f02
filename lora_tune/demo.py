"""`lora-tune demo`: QLoRA on the embedded SmolLM2-135M-Instruct, with a before/after answer."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lora_tune.config import RunCfg, load_config
from lora_tune.evaluate.generate import Sampling, generate_reply
from lora_tune.evaluate.run import EvalSettings, ModelSpec, load_for_inference, print_report, run_eval, write_report
from lora_tune.finetune import finetune
from lora_tune.train.loop import TrainResult
from lora_tune.train.rundir import check_overwritable

DEMO_PROMPT = "How much does Nimbus Notes Pro cost?"
# the demo's training, so that the whole demo stays within 5 minutes on the slowest CPUs we get (AVX2
# only: 2.4-4 s a step, ~75 s for everything else)
TRAIN_BUDGET_S = 150.0
MIN_STEPS = 24  # at demo.yaml's lr 24 steps answer the price question right; at 20 they did not


# what a step costs in the run beyond the probe's bare step: validation every 10 steps, checkpoints and the
# first steps' warm-up (measured on the emulated AVX2 kind: 53 steps of 2.8 s took 200 s)
RUN_OVERHEAD = 1.35


def demo_steps(step_seconds: float, planned: int, budget_s: float = TRAIN_BUDGET_S) -> int:
    """Steps that fit the training budget at the measured step time (with the run's overhead): the
    planned ones when they fit, else as many as fit, but never fewer than MIN_STEPS."""
    fits = int(budget_s // max(step_seconds * RUN_OVERHEAD, 1e-9))
    return planned if fits >= planned else max(MIN_STEPS, fits)


def measure_step_seconds(cfg: RunCfg) -> float:
    """One optimizer step's mean wall time on this machine: a 4-step run of the demo config (no
    validation), timed over its last three steps (the first pays for warm-up; batch lengths vary)."""
    import dataclasses
    import shutil
    import tempfile

    from lora_tune.train.metrics import read_metrics

    tmp = tempfile.mkdtemp(prefix="lora-tune-probe-")
    try:
        probe = dataclasses.replace(
            cfg,
            output_dir=tmp,
            data=dataclasses.replace(cfg.data, val_file=None),
            train=dataclasses.replace(cfg.train, max_steps=4, eval_every=0, save_every=0),
        )
        finetune(probe, console=Console(quiet=True))
        times = [r["time"] for r in read_metrics(Path(tmp) / "metrics.jsonl") if "split" not in r]
        return (times[-1] - times[0]) / (len(times) - 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder


def fit_demo_to_this_machine(cfg: RunCfg, console: Console) -> RunCfg:
    """Measure a step, print the estimate, and train fewer steps where the machine is slow."""
    import dataclasses
    import math

    samples = sum(1 for line in Path(cfg.data.train_file).read_text().splitlines() if line.strip())
    planned = cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(samples / cfg.train.micro_batch_size))
    console.print("measuring this machine's training speed (4 steps) ...")
    per_step = measure_step_seconds(cfg)
    steps = demo_steps(per_step, planned)
    console.print(
        f"estimate: {steps} steps x {per_step:.1f} s (+ validation and checkpoints) = "
        f"{steps * per_step * RUN_OVERHEAD / 60:.1f} min of training"
        + (
            ""
            if steps == planned
            else f" (this machine is slow: {steps} steps instead of {planned}, to stay in a few minutes)"
        )
    )
    return cfg if steps == planned else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def demo_config(output_dir: str = "runs/demo", overrides: tuple[str, ...] = ()) -> RunCfg:
    """The demo's config: the YAML shipped in the package, with its data files resolved."""
    path = Path(str(resources.files("lora_tune") / "assets" / "demo.yaml"))
    return load_config(path, (f"output_dir={output_dir}", *overrides))


def _answer(cfg: RunCfg, adapter: Path | None, prompt: str) -> str:
    """The base model's (or base + adapter's, with the adapter's saved template) greedy answer."""
    spec = ModelSpec(cfg.model.source, str(adapter) if adapter else None, cfg.model.quantization)
    model, tok, _ = load_for_inference(spec, cfg.train.device)
    return generate_reply(model, tok, [{"role": "user", "content": prompt}], max_new_tokens=60)


def run_demo(
    output_dir: str = "runs/demo", overrides: tuple[str, ...] = (), console: Console | None = None
) -> tuple[TrainResult, str, str]:
    """Answer a prompt, fine-tune with QLoRA, answer again; returns (result, before, after)."""
    console = console or Console(soft_wrap=True)
    cfg = demo_config(output_dir, overrides)
    check_overwritable(Path(cfg.output_dir))  # the demo overwrites its folder: refuse a user's one now
    console.rule("[bold]lora-tune demo: QLoRA (NF4) on SmolLM2-135M-Instruct")
    before = _answer(cfg, None, DEMO_PROMPT)
    console.print(f"[bold]before tuning[/] - {DEMO_PROMPT}\n  {before}\n")
    cfg = fit_demo_to_this_machine(cfg, console)
    result = finetune(cfg, overwrite=True, console=console)
    after = _answer(cfg, result.adapter_dir, DEMO_PROMPT)
    table = Table(title=f"Prompt: {DEMO_PROMPT}", show_lines=True)
    table.add_column("model", style="bold")
    table.add_column("answer")
    table.add_row("base", before)
    table.add_row("base + LoRA", after)
    console.print(table)
    first, last = (result.val_losses[0][1], result.val_losses[-1][1]) if result.val_losses else (None, None)
    if first is not None:
        console.print(f"validation loss {first:.3f} -> {last:.3f} in {result.steps} steps, {result.seconds:.0f} s")
    console.rule("[bold]held-out questions: base vs tuned")
    settings = EvalSettings(
        data=cfg.data.val_file, metrics=["perplexity", "f1", "exact_match"], sampling=Sampling(max_new_tokens=64)
    )
    report = run_eval(ModelSpec.resolve(None, str(result.adapter_dir), None, None), settings, compare=True)
    write_report(report, result.run_dir / "eval.json")
    print_report(report, console)
    console.print(f"run directory: {result.run_dir} (adapter/, metrics.jsonl, loss.png, eval.md, checkpoints/)")
    return result, before, after
