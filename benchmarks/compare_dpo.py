"""Benchmark lora_tune's DPO against TRL's DPOTrainer + PEFT, side by side: the same model, preference
pairs, beta, batch, lengths and step count; each measurement in a fresh process, the systems alternating.

    pip install -e '.[bench]'                  # adds trl
    lora-tune recipes build preference-docs    # the pinned pairs (default --train/--test)
    python benchmarks/compare_dpo.py [--reps 3] [--steps 8] [--precompute both]

Reports held-out preference accuracy after equal steps (scored by lora_tune's evaluation for both),
pairs/s, tokens/s and peak memory, with ours/TRL ratios (medians and the worst pairing). Writes
benchmarks/results/dpo-<stamp>.json and a markdown table beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.atomic import atomic_write_text
from lora_tune.bench.compare import (
    CPU_KIND_NAMES,
    CPU_KINDS,
    _git_sha,
    hardware,
    summarize,
    versions,
    worker_env,
    write_results_json,
)
from lora_tune.bench.dpo_worker import DPOSpec, prompt_limit

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "recipes" / "preference-docs" / "data"
BUILD = "lora-tune recipes build preference-docs"
TRL = "TRL"


def measure(spec: DPOSpec) -> dict:
    """One `lora_tune.bench.dpo_worker` run in a fresh process, in compare.worker_env's environment
    (the CPU kind's kernels; ours under the allocator `lora-tune train` preloads)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune.bench.dpo_worker", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        env=worker_env(spec),
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {**asdict(spec), "error": (proc.stderr or proc.stdout)[-1500:]}


def systems(precompute: str, trl_precompute: bool) -> list[tuple[str, str, bool]]:
    """(label, tool, precompute_ref) of each system measured: ours once or twice, then TRL."""
    ours = {"false": [False], "true": [True], "both": [False, True]}[precompute]
    return [*((f"ours precompute_ref={str(p).lower()}", "ours", p) for p in ours), (TRL, "trl", trl_precompute)]


def run_all(base: DPOSpec, reps: int, kinds: list[str], plan: list[tuple[str, str, bool]], log=print) -> list[dict]:
    """`reps` rounds per CPU kind; each round runs every system once, the order reversed every other round."""
    runs = []
    for kind in kinds:
        for rep in range(reps):
            for name, tool, pre in plan if rep % 2 == 0 else plan[::-1]:
                r = measure(replace(base, tool=tool, name=name, precompute_ref=pre, cpu_kind=kind))
                runs.append(r)
                if "error" in r:
                    msg = (r["error"].strip().splitlines() or ["error"])[-1]
                else:
                    acc = r.get("preference_accuracy")
                    msg = (
                        f"{r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:.0f} tok/s, {r['peak_mb']:.0f} MB, "
                        f"held-out acc {'-' if acc is None else f'{acc:.3f}'}"
                    )
                log(f"[{kind} {rep + 1}/{reps}] {name:28s} {msg}")
    return runs


def _median(values: list) -> float | None:
    return statistics.median(values) if values and all(v is not None for v in values) else None


def summarize_dpo(runs: list[dict]) -> list[dict]:
    """One row per (CPU kind, our variant) against TRL: compare.summarize's tokens/s and memory medians,
    ratios and worst pairings, plus the same for pairs/s and each side's held-out accuracy and final loss."""
    rows = []
    for variant in dict.fromkeys(r["name"] for r in runs if r["tool"] == "ours"):
        group = [{**r, "name": variant} for r in runs if r["name"] == variant or r["tool"] == "trl"]
        for row in summarize(group):
            for tool in ("ours", "trl"):
                ok = [
                    r
                    for r in group
                    if r["tool"] == tool and r.get("cpu_kind", "native") == row["cpu_kind"] and "error" not in r
                ]
                if row[tool] is not None:
                    row[tool]["pairs_per_s"] = statistics.median(r["pairs_per_s"] for r in ok)
                    row[tool]["pairs_per_s_all"] = [r["pairs_per_s"] for r in ok]
                    row[tool]["accuracy_all"] = [r.get("preference_accuracy") for r in ok]
                    row[tool]["preference_accuracy"] = _median(row[tool]["accuracy_all"])
                    row[tool]["final_loss"] = _median([r.get("final_loss") for r in ok])
            o, t = row["ours"], row["trl"]
            if o and t:
                row["pairs_speedup"] = o["pairs_per_s"] / t["pairs_per_s"]
                row["worst_pairs_speedup"] = min(o["pairs_per_s_all"]) / max(t["pairs_per_s_all"])
            rows.append(row)
    return rows


def _each(values: list, fmt: str) -> str:
    return ", ".join("-" if v is None else format(v, fmt) for v in values) or "-"


def markdown(result: dict) -> str:
    hw, s = result["hardware"], result["settings"]
    lines = [
        f"# lora_tune DPO vs TRL DPOTrainer + PEFT ({result['date']}, git {result['git_sha']})",
        "",
        f"Hardware: {hw['cpu']} ({hw['cores']} threads; CPU flags: {', '.join(hw.get('cpu_flags', [])) or '?'}), "
        f"GPU: {hw['gpu'] or 'none'}. Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"{s['model']} ({s['quantization']}), LoRA r={s['r']} alpha={s['alpha']} all-linear, DPO (sigmoid) "
        f"beta={s['beta']}, reference = the adapter-disabled base; {s['micro_batch_size']} pairs x "
        f"{s['grad_accum']} accumulation per step, max_length {s['max_length']}, prompts cut to their last "
        f"{s['max_prompt_length_used']} tokens when a pair is too long; AdamW lr {s['lr']} constant, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}. {s['warmup_steps']} warm-up "
        f"steps excluded, {s['steps']} timed steps; {result['reps']} runs of each system per CPU kind, each in a "
        f"fresh process, systems alternating. Pairs: {result['data']['train']} ({result['data']['train_pairs']} "
        f"train), {result['data']['test']} ({result['data']['test_pairs']} held out). TRL runs with "
        f"precompute_ref_log_probs={str(result['trl_precompute']).lower()}; ours under allocator "
        f"{result.get('allocator', '?')}, train.compile {s['compile']}.",
        "",
    ]
    for kind in dict.fromkeys(r["cpu_kind"] for r in result["summary"]):
        lines += [
            f"### {kind}: {CPU_KIND_NAMES.get(kind, kind)}",
            "",
            "| lora_tune | ours pairs/s | TRL pairs/s | pairs/s ours/TRL (median) | worst pairing | ours tokens/s "
            "| TRL tokens/s | tokens/s ours/TRL | worst pairing | ours peak MB (each run) | TRL peak MB (each run) "
            "| memory ours/TRL (median) | our highest / TRL's lowest | ours held-out acc (each run) "
            "| TRL held-out acc (each run) | ours final loss | TRL final loss |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in result["summary"] if r["cpu_kind"] == kind):
            o, t = r["ours"], r["trl"]
            if not (o and t):
                lines.append(f"| {r['name']} | {'ok' if o else 'failed'} | {'ok' if t else 'failed'} |" + " |" * 14)
                continue
            lines.append(
                f"| {r['name']} | {o['pairs_per_s']:.2f} | {t['pairs_per_s']:.2f} | {r['pairs_speedup']:.2f}x | "
                f"{r['worst_pairs_speedup']:.2f}x | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['worst_speedup']:.2f}x | {_each(o['peaks_mb'], '.0f')} | "
                f"{_each(t['peaks_mb'], '.0f')} | {r['median_memory_ratio']:.2f} | {r['memory_ratio']:.2f} | "
                f"{_each(o['accuracy_all'], '.3f')} | {_each(t['accuracy_all'], '.3f')} | "
                f"{_each([o['final_loss']], '.4f')} | {_each([t['final_loss']], '.4f')} |"
            )
        lines.append("")
    lines += [
        "Pairs/s: preference pairs trained per second over the timed steps. Tokens/s: real (non-padding) tokens "
        "of the prompt+chosen and prompt+rejected rows per second; TRL's answers also hold the chat template's "
        "newline after the end-of-turn token (one more token per row than ours), so pairs/s is the like-for-like "
        "speed. Peak MB: the process's peak RSS above its RSS after importing torch/transformers/peft/trl/datasets "
        "(CPU), or max allocated (CUDA), before the held-out evaluation. The worst pairing sets our slowest run "
        "against TRL's fastest and our highest peak against TRL's lowest. Held-out accuracy: the share of held-out "
        "pairs whose chosen answer has the higher summed log-probability under base + adapter, computed by "
        "lora_tune's evaluation for both adapters ('-': not available). Final loss: each tool's own DPO loss on its "
        "last training step (median over runs).",
    ]
    return "\n".join(lines) + "\n"


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=DATA / "train.jsonl", help="training pairs (TRL conversational)")
    p.add_argument("--test", type=Path, default=DATA / "test.jsonl", help="held-out pairs")
    p.add_argument("--reps", type=int, default=2, help="runs of each system per CPU kind")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument(
        "--warmup", dest="warmup_steps", type=int, default=2, help="untimed optimizer steps before them (>= 1)"
    )
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quantization", default="fp32", choices=["fp32", "bf16", "nf4"])
    p.add_argument("--micro-batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compile", default="auto", dest="compile_", help="ours' train.compile: auto, true or false")
    p.add_argument(
        "--precompute",
        default="false",
        choices=["false", "true", "both"],
        help="ours' preference.precompute_ref; both: run ours each way, each against the same TRL runs",
    )
    p.add_argument(
        "--trl-precompute",
        default=None,
        choices=["false", "true"],
        help="TRL's precompute_ref_log_probs (default: as --precompute; false with both)",
    )
    p.add_argument("--kinds", default="native", help=f"CPU kinds, comma-separated: {', '.join(CPU_KINDS)}")
    p.add_argument("--out-dir", type=Path, default=HERE, help="results go to OUT_DIR/results/")
    args = p.parse_args(argv)
    missing = [f for f in (args.train, args.test) if not f.is_file()]
    if missing:
        print(f"{missing[0]} not found: build the pinned pairs with `{BUILD}`, or pass --train/--test", file=sys.stderr)
        raise SystemExit(2)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in CPU_KINDS]:
        p.error(f"unknown CPU kind(s) {unknown}; choose from {', '.join(CPU_KINDS)}")
    trl_pre = (args.trl_precompute or ("false" if args.precompute == "both" else args.precompute)) == "true"
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(DPOSpec)}}
    base = DPOSpec(
        tool="ours",
        train_file=str(args.train.resolve()),
        test_file=str(args.test.resolve()),
        gradient_checkpointing=not args.no_gradient_checkpointing,
        compile={"true": True, "false": False}.get(args.compile_.lower(), args.compile_),
        **given,
    )
    runs = run_all(base, args.reps, kinds, systems(args.precompute, trl_pre))
    ours = next((r for r in runs if r["tool"] == "ours" and "error" not in r), {})
    settings = {k: v for k, v in asdict(base).items() if k not in ("tool", "name", "precompute_ref", "cpu_kind")}
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "reps": args.reps,
        "settings": {**settings, "max_prompt_length_used": prompt_limit(base)},
        "data": {
            "train": str(args.train),
            "test": str(args.test),
            "train_pairs": _count(args.train),
            "test_pairs": _count(args.test),
        },
        "precompute": args.precompute,
        "trl_precompute": trl_pre,
        "allocator": ours.get("allocator_active", "?"),
        "runs": runs,
        "summary": summarize_dpo(runs),
    }
    path = write_results_json(args.out_dir, "dpo", result)
    table = markdown(result)
    atomic_write_text(path.with_suffix(".md"), table)
    print(table)
    print(f"results: {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
