"""`lora-tune recipes run`: build the data, train, evaluate before and after, merge if asked, report."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from lora_tune.atomic import atomic_write_text
from lora_tune.config import RunCfg, load_config
from lora_tune.evaluate.generate import Sampling
from lora_tune.evaluate.run import EvalSettings, ModelSpec, print_report, run_eval, write_report
from lora_tune.recipes.builders import BUILDERS
from lora_tune.recipes.registry import Recipe

# A smoke run: the real pipeline (builder, config, training, evaluation, report) at toy size.
SMOKE_DATA = {"max_train": 16, "max_val": 4, "max_test": 4, "max_chars": 3000}
SMOKE_SETTINGS = (
    "model.source=builtin:tiny-random",
    "train.max_steps=3",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.warmup_steps=0",
    "train.warmup_ratio=null",
    "train.auto_fit=false",
    "data.max_length=256",
    "data.cache=false",
    "eval.metric_samples=2",
    "eval.max_new_tokens=8",
)
LOWER_IS_BETTER = {"perplexity", "loss", "text_perplexity", "text_loss"}


@dataclass
class RecipeResult:
    run_dir: Path
    report: dict[str, Any]


def build_data(recipe: Recipe, out: Path | None = None, smoke: bool = False, log=print) -> Path:
    """Run the recipe's builder into `out` (default: the recipe's data/ folder).

    Always rebuilt (a few seconds, and byte-identical when nothing changed), so data made by an older
    builder or other parameters is never used by mistake.
    """
    out = Path(out) if out else recipe.data_dir
    params = {**recipe.params, **(SMOKE_DATA if smoke else {})}
    built = BUILDERS[recipe.builder](out, params, log=log)
    log(f"built {recipe.name} data in {out}: " + ", ".join(f"{f} {n}" for f, n in built.files.items()))
    return out


def recipe_config(recipe: Recipe, data_dir: Path, output_dir: str, smoke: bool, overrides: tuple[str, ...]) -> RunCfg:
    """The recipe's config.yaml with its data pointed at `data_dir` (and toy settings for a smoke run)."""
    data = [f"data.train_file={data_dir / 'train.jsonl'}"]
    if (data_dir / "val.jsonl").is_file():
        data.append(f"data.val_file={data_dir / 'val.jsonl'}")
    return load_config(
        recipe.config_path, (*data, *(SMOKE_SETTINGS if smoke else ()), f"output_dir={output_dir}", *overrides)
    )


def eval_settings(recipe: Recipe, data_dir: Path, smoke: bool) -> EvalSettings:
    """The recipe's `eval` section as `lora-tune eval` settings, its files resolved in `data_dir`."""
    ev = dict(recipe.eval)
    max_new_tokens = ev.pop("max_new_tokens", 64)
    sampling = Sampling(max_new_tokens=8 if smoke else max_new_tokens)
    for key in ("data", "text"):
        if ev.get(key):
            ev[key] = str(data_dir / ev[key])
    if smoke:
        ev["max_samples"] = 4
    return EvalSettings(**ev, sampling=sampling)


def run_recipe(
    recipe: Recipe,
    overrides: tuple[str, ...] = (),
    smoke: bool = False,
    merge: bool = False,
    output_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> RecipeResult:
    """Train and evaluate one recipe end to end; writes report.md/.json (+ eval, loss.png) in the run dir."""
    console = console or Console(soft_wrap=True)
    t0 = time.perf_counter()
    output_dir = output_dir or f"runs/recipes/{recipe.name}{'-smoke' if smoke else ''}"
    console.rule(f"[bold]recipe {recipe.name}: {recipe.title}" + (" (smoke run)" if smoke else ""))
    with tempfile.TemporaryDirectory(prefix=f"{recipe.name}-smoke-data-") as tmp:
        # smoke data is a throw-away subset: never written over the recipe's real data/
        data_dir = build_data(recipe, Path(tmp) if smoke else None, smoke, log=console.print)
        return _run(recipe, data_dir, overrides, smoke, merge, output_dir, resume, overwrite, console, t0)


def _run(recipe, data_dir, overrides, smoke, merge, output_dir, resume, overwrite, console, t0) -> RecipeResult:
    from lora_tune.finetune import finetune

    cfg = recipe_config(recipe, data_dir, output_dir, smoke, overrides)
    result = finetune(cfg, resume=resume, overwrite=overwrite, console=console)
    console.rule(f"[bold]{recipe.name}: base vs tuned on held-out data")
    settings = eval_settings(recipe, data_dir, smoke)
    spec = ModelSpec(cfg.model.source, str(result.adapter_dir), cfg.model.quantization)
    report = run_eval(spec, settings, compare=True, device=cfg.train.device, console=console)
    write_report(report, result.run_dir / "eval.json")
    merged = None
    if merge:
        merged = _merge(cfg, result.adapter_dir, result.run_dir / "merged", console)
    summary = _summary(recipe, cfg, result, report, merged, smoke, time.perf_counter() - t0, data_dir, settings)
    atomic_write_text(result.run_dir / "report.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(result.run_dir / "report.md", report_markdown(summary))
    print_report(report, console)
    console.print(f"headline metric: {recipe.metric}", highlight=False)
    console.print(f"report: {result.run_dir / 'report.md'} (and report.json, eval.md, loss.png)")
    return RecipeResult(result.run_dir, summary)


def _merge(cfg: RunCfg, adapter_dir: Path, out: Path, console: Console) -> dict[str, Any]:
    from lora_tune.merge import merge_adapter

    # merge into the weights the adapter was trained against: for a QLoRA run, the de-quantized NF4 base
    base_weights = "dequantized" if cfg.model.quantization in ("nf4", "fp4") else "original"
    rep = merge_adapter(adapter_dir, out, base_weights=base_weights, log=console.print)
    return {
        "out_dir": rep.out_dir,
        "base_weights": rep.base_weights,
        "fidelity": [
            {"reference": f.reference, "mean_kl": f.mean_kl, "max_abs_logit_diff": f.max_abs_logit_diff}
            for f in rep.fidelity
        ],
        "warnings": rep.warnings,
    }


def _summary(recipe, cfg, result, report, merged, smoke, seconds, data_dir, settings) -> dict[str, Any]:
    from lora_tune.bench.compare import hardware, versions
    from lora_tune.config import to_dict

    base, tuned = report["results"]["base"]["metrics"], report["results"]["tuned"]["metrics"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    vals = result.val_losses
    return {
        "recipe": recipe.name,
        "title": recipe.title,
        "smoke": smoke,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "headline_metric": recipe.metric,
        "metrics": {k: {"base": base[k], "tuned": tuned.get(k), "delta": report["delta"].get(k)} for k in sorted(base)},
        "train": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "val_loss_first": vals[0][1] if vals else None,
            "val_loss_last": vals[-1][1] if vals else None,
            "peak_memory_mb": round(result.peak_memory_mb),
            "stopped_early": result.stopped_early,
        },
        "precision": report["precision"],
        "wall_seconds": round(seconds, 1),
        "data": manifest,
        "merged": merged,
        "config": to_dict(cfg),
        "eval_settings": {k: v for k, v in asdict(settings).items() if v is not None},
        "hardware": hardware(),
        "versions": versions(),
    }


def report_markdown(s: dict[str, Any]) -> str:
    t = s["train"]
    lines = [
        f"# Recipe {s['recipe']}: {s['title']}" + (" (smoke run: tiny random model)" if s["smoke"] else ""),
        "",
        f"{s['date']}; model `{s['config']['model']['source']}` ({s['config']['model']['quantization']}), "
        f"{s['precision']}; hardware: {s['hardware']['gpu'] or s['hardware']['cpu']}.",
        "",
        "| metric | base | tuned | change |",
        "|---|---|---|---|",
    ]
    for k, v in s["metrics"].items():
        mark = " (headline)" if k == s["headline_metric"] else ""
        better = (v["delta"] or 0) < 0 if k in LOWER_IS_BETTER else (v["delta"] or 0) > 0
        lines.append(
            f"| {k}{mark} | {v['base']:.4f} | {v['tuned']:.4f} | {v['delta']:+.4f} {'better' if better else ''} |"
        )
    val = (
        f"validation loss {t['val_loss_first']:.3f} -> {t['val_loss_last']:.3f}; "
        if t["val_loss_first"] is not None
        else ""
    )
    lines += [
        "",
        f"Training: {t['steps']} steps in {t['seconds']:.0f} s; {val}peak memory {t['peak_memory_mb']:,} MB "
        f"(CUDA max allocated on a GPU, process peak RSS on the CPU). Whole recipe: {s['wall_seconds']:.0f} s.",
        "",
        "Data: " + "; ".join(f"{f} {v['records']}" for f, v in s["data"]["files"].items()),
        "",
        "Sources: " + " | ".join(s["data"]["sources"]),
    ]
    if s["merged"]:
        m = s["merged"]
        fid = "; ".join(f"vs {f['reference']}: mean KL {f['mean_kl']:.2e}" for f in m["fidelity"])
        lines += ["", f"Merged ({m['base_weights']} base) into `{m['out_dir']}`. {fid}"]
    lines += ["", "![loss](loss.png)", "", "Per-example outputs and per-class tables: eval.md / eval.json."]
    return "\n".join(lines) + "\n"
