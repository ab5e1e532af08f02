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

DEMO_PROMPT = "How much does Nimbus Notes Pro cost?"


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
    console.rule("[bold]lora-tune demo: QLoRA (NF4) on SmolLM2-135M-Instruct")
    before = _answer(cfg, None, DEMO_PROMPT)
    console.print(f"[bold]before tuning[/] - {DEMO_PROMPT}\n  {before}\n")
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
