"""Quality at equal steps: lora_tune and TRL SFTTrainer + PEFT trained on the same tasks with the same
protocol over several seeds, both adapters scored by one function on held-out data.

    lora-tune bench --quality [--seeds 3] [--tasks newsgroups,analogy] [--ablate]

Each training run is a fresh process (`python -m lora_tune.bench.quality '<json>'`) that trains, saves
the adapter, frees the model, and scores the adapter with `score()`: `lora_tune.evaluate.run_eval`
(greedy generation, macro-F1 or exact match; strided perplexity for text), the same code for both tools.
`--ablate` adds lora_tune runs with one of our defaults changed at a time, to find where a gap comes from.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.atomic import atomic_write_text
from lora_tune.bench.quality_data import TASKS, Task, build_tasks
from lora_tune.bench.worker import Spec

MODEL = "builtin:smollm2-135m"
# The protocol both tools train with (the one of the independent check in issue 14).
PROTOCOL = {
    "quantization": "bf16",
    "micro_batch_size": 8,
    "max_length": 256,
    "lr": 2e-4,
    "schedule": "cosine",
    "lr_warmup_ratio": 0.05,
    "r": 16,
    "dropout": 0.05,
    "gradient_checkpointing": True,
}
# lora_tune with one default changed: each isolates one candidate cause of a gap to TRL
ABLATIONS = {
    "ours, no length grouping": {"data.group_by_length": False},
    "ours, fp32": {"model.quantization": "fp32", "train.precision": "fp32"},
    "ours, unchunked loss": {"train.chunked_loss": False},
}
SECTION = "## Quality at equal steps"


def task_by_name(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(t.name for t in TASKS)}")


def score(task: Task, data_root: Path, adapter: str | None, model: str = MODEL) -> dict:
    """The task metric of `adapter` (or of the base model when None) on the task's held-out file."""
    from rich.console import Console

    from lora_tune.evaluate.generate import Sampling
    from lora_tune.evaluate.run import EvalSettings, ModelSpec, run_eval

    _, test = task.files(data_root)
    if task.kind == "text":
        settings = EvalSettings(text=str(test), metrics=[], window=256, stride=128)
    else:
        metrics = ["macro_f1", "accuracy"] if task.kind == "classification" else ["exact_match"]
        settings = EvalSettings(
            data=str(test),
            metrics=metrics,
            labels=list(task.labels) or None,
            label_mode="generate",
            sampling=Sampling(max_new_tokens=task.max_new_tokens),
        )
    report = run_eval(ModelSpec(model, adapter, "bf16"), settings, console=Console(quiet=True))
    result = next(iter(report["results"].values()))
    out = {"metrics": result["metrics"], "precision": report["precision"]}
    if "classes" in result["details"]:
        out["classes"] = result["details"]["classes"]
        out["unparseable"] = result["details"].get("unparseable_generations", 0)
    return out


def spec_for(
    task: Task, tool: str, seed: int, data_root: Path, adapter_dir: str, extra: dict, model: str = MODEL, steps=None
) -> Spec:
    train, _ = task.files(data_root)
    return Spec(
        tool=tool,
        name=task.name,
        train_file=str(train),
        val_file="",
        model=model,
        steps=(steps or task.steps) - 1,
        warmup_steps=1,  # the first step is left out of the timing only; it trains like any other
        seed=seed,
        adapter_dir=adapter_dir,
        extra=extra,
        **PROTOCOL,
    )


def _worker(payload: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune.bench.quality", json.dumps(payload)], capture_output=True, text=True
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("QUALITY ")), None)
    if proc.returncode != 0 or line is None:
        return {**payload, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line.removeprefix("QUALITY "))


def headline(task: Task, metrics: dict) -> float:
    return metrics[task.metric]


def summarize(runs: list[dict]) -> list[dict]:
    """Mean, sample standard deviation, min and max of each (task, variant)'s headline metric."""
    rows = []
    for task_name in dict.fromkeys(r["task"] for r in runs):
        task = task_by_name(task_name)
        for variant in dict.fromkeys(r["variant"] for r in runs if r["task"] == task_name):
            ok = [r for r in runs if r["task"] == task_name and r["variant"] == variant and "error" not in r]
            if not ok:
                rows.append({"task": task_name, "variant": variant, "runs": 0})
                continue
            vals = [headline(task, r["score"]["metrics"]) for r in ok]
            tail = [statistics.fmean(r["train_losses"][-10:]) for r in ok if r.get("train_losses")]
            rows.append(
                {
                    "task": task_name,
                    "variant": variant,
                    "metric": task.metric,
                    "runs": len(ok),
                    "values": vals,
                    "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "min": min(vals),
                    "max": max(vals),
                    "train_loss_last10": statistics.fmean(tail) if tail else None,
                    "seconds": statistics.fmean(r["seconds"] for r in ok),
                }
            )
    return rows


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lower_better = {"text_perplexity"}
    lines = [
        f"{SECTION} ({result['date']}, git {result['git_sha']})",
        "",
        f"Hardware: {hw['cpu']} ({hw['cores']} threads, CPU flags: {result['cpu_bf16']}), GPU: {hw['gpu'] or 'none'}. "
        f"SmolLM2-135M-Instruct, LoRA r=16 alpha 32 dropout 0.05 all-linear, batch 8, max_length 256, AdamW, "
        "lr 2e-4 cosine, 5% warmup, clipping 1.0, gradient checkpointing, bf16 base weights, loss on the answer "
        f"only; the same number of optimizer steps for both tools; seeds {result['seeds']}. Each adapter is scored "
        "by `lora_tune/bench/quality.py::score` on held-out data (greedy answers; strided perplexity, window 256, "
        "stride 128, for text). Data: `lora_tune/bench/quality_data.py` (real corpora from gensim 4.3.3's wheel).",
        "",
        "| task | metric | steps | base | lora_tune (mean ± sd) | TRL (mean ± sd) | ours − TRL | per seed: ours / TRL "
        "| last-10-step train loss: ours / TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["task"], r["variant"]): r for r in result["summary"]}
    for task_name in dict.fromkeys(r["task"] for r in result["summary"]):
        task = task_by_name(task_name)
        o, t = by.get((task_name, "ours")), by.get((task_name, "trl"))
        base = result["base"].get(task_name, {}).get("score", {}).get("metrics", {}).get(task.metric)
        if not (o and t and o["runs"] and t["runs"]):
            lines.append(f"| {task_name} | {task.metric} | {result['steps'][task_name]} | | failed | failed | | | |")
            continue
        arrow = "lower is better" if task.metric in lower_better else "higher is better"
        lines.append(
            f"| {task_name} | {task.metric} ({arrow}) | {result['steps'][task_name]} | {_num(base)} | "
            f"{o['mean']:.3f} ± {o['std']:.3f} | "
            f"{t['mean']:.3f} ± {t['std']:.3f} | {o['mean'] - t['mean']:+.3f} | "
            + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(o["values"], t["values"], strict=False))
            + f" | {_num(o['train_loss_last10'])} / {_num(t['train_loss_last10'])} |"
        )
    ablations = [r for r in result["summary"] if r["variant"] not in ("ours", "trl") and r["runs"]]
    if ablations:
        lines += [
            "",
            "One lora_tune default changed at a time (same seeds):",
            "",
            "| task | variant | mean ± sd | vs lora_tune default | vs TRL | per seed |",
            "|---|---|---|---|---|---|",
        ]
        for r in ablations:
            o, t = by.get((r["task"], "ours")), by.get((r["task"], "trl"))
            lines.append(
                f"| {r['task']} | {r['variant']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                f"{r['mean'] - o['mean']:+.3f} | {r['mean'] - t['mean']:+.3f} | "
                + ", ".join(f"{v:.3f}" for v in r["values"])
                + " |"
            )
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def update_results(results_md: Path, section: str) -> None:
    """Put `section` in RESULTS.md in place of an older quality section, keeping every other section."""
    old = results_md.read_text() if results_md.exists() else ""
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + section + (old[end:] if end >= 0 else "")
    atomic_write_text(results_md, new)


def run_quality(
    out_dir: Path,
    tasks: list[str] | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    ablate: list[str] | None = None,
    ablation_tasks: tuple[str, ...] = ("newsgroups",),
    model: str = MODEL,
    steps: int | None = None,
    log=print,
) -> dict:
    """Train and score every (task, tool, seed), tools alternating; write results JSON and RESULTS.md."""
    from lora_tune.bench.compare import _git_sha, hardware, versions, write_results_json
    from lora_tune.runtime import cpu_bf16_flag

    out_dir = Path(out_dir)
    data_root = out_dir / "data" / "quality"
    build_tasks(data_root, out_dir / "data" / "cache")
    chosen = [task_by_name(n) for n in (tasks or [t.name for t in TASKS])]
    partial = out_dir / "results" / "quality-partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    # an interrupted benchmark goes on where it stopped: finished runs are kept, failed ones rerun
    key = {"protocol": PROTOCOL, "model": model, "steps": {t.name: steps or t.steps for t in TASKS}}
    done = json.loads(partial.read_text()) if partial.exists() else {}
    if done.get("key") != key:  # measured under another protocol: not comparable
        done = {"base": {}, "runs": []}
    base = {k: v for k, v in done["base"].items() if "error" not in v}
    runs = [r for r in done["runs"] if "error" not in r]
    if runs or base:
        log(f"going on from {partial}: {len(runs)} runs done")
    finished = {(r["task"], r["variant"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        for task in chosen:
            if task.name not in base:
                base[task.name] = _worker({"task": task.name, "data_root": str(data_root), "base": model})
                log(f"{task.name:10s} base   {_fmt(task, base[task.name])}")
            variants = [("ours", "ours", {}), ("trl", "trl", {})]
            if task.name in ablation_tasks:
                variants += [(name, "ours", ABLATIONS[name]) for name in ablate or []]
            for seed in seeds:
                order = variants if seed % 2 == 0 else [variants[1], variants[0], *variants[2:]]
                for variant, tool, extra in order:
                    if (task.name, variant, seed) in finished:
                        continue
                    adapter = f"{tmp}/{task.name}-{variant}-{seed}".replace(" ", "_").replace(",", "")
                    spec = spec_for(task, tool, seed, data_root, adapter, extra, model, steps)
                    r = _worker({"task": task.name, "data_root": str(data_root), "spec": asdict(spec)})
                    r.update(task=task.name, variant=variant, seed=seed)
                    runs.append(r)
                    log(f"{task.name:10s} {variant:26s} seed {seed}: {_fmt(task, r)}")
                    # so far, so that an interrupted benchmark keeps what it measured
                    atomic_write_text(partial, json.dumps({"key": key, "base": base, "runs": runs}, indent=1))
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "cpu_bf16": "avx512_bf16/amx_bf16" if cpu_bf16_flag() else "no bf16 instructions",
        "versions": versions(),
        "protocol": PROTOCOL,
        "seeds": list(seeds),
        "steps": {t.name: steps or t.steps for t in chosen},
        "tasks": {t.name: asdict(t) for t in chosen},
        "base": base,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_results_json(out_dir, "quality", result)
    partial.unlink(missing_ok=True)
    update_results(out_dir / "RESULTS.md", markdown(result))
    return result


def _fmt(task: Task, r: dict) -> str:
    if "error" in r:
        return "error: " + (r["error"].strip().splitlines() or ["?"])[-1]
    return f"{task.metric} {headline(task, r['score']['metrics']):.3f}"


def main() -> None:
    payload = json.loads(sys.argv[1])
    task = task_by_name(payload["task"])
    data_root = Path(payload["data_root"])
    if payload.get("base"):
        print("QUALITY " + json.dumps({"score": score(task, data_root, None, payload["base"])}))
        return
    import gc

    import torch

    from lora_tune.bench.worker import rss_mb, run_ours, run_trl

    spec = Spec(**payload["spec"])
    torch.manual_seed(spec.seed)
    trained = (run_ours if spec.tool == "ours" else run_trl)(spec, rss_mb())
    gc.collect()
    result = {**asdict(spec), **trained, "score": score(task, data_root, spec.adapter_dir, spec.model)}
    print("QUALITY " + json.dumps(result))


if __name__ == "__main__":
    main()
