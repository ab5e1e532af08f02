"""Side-by-side benchmark of lora_tune and TRL: each configuration in a fresh process, alternating tools,
median of `reps` runs; writes results JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.atomic import atomic_write_text
from lora_tune.bench.data import write_bench_data
from lora_tune.bench.worker import Spec

# name, settings shared by both tools; TRL runs at its defaults otherwise
MATRIX = [
    ("qlora-nf4", {"quantization": "nf4"}),
    ("qlora-nf4-packed", {"quantization": "nf4", "packing": True}),
    ("lora-bf16", {"quantization": "bf16"}),
    ("lora-bf16-no-ckpt", {"quantization": "bf16", "gradient_checkpointing": False}),
    ("qlora-nf4-mb8", {"quantization": "nf4", "micro_batch_size": 8}),
    ("qlora-nf4-len256", {"quantization": "nf4", "max_length": 256}),
]


def run_one(spec: Spec) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune.bench.worker", json.dumps(asdict(spec))], capture_output=True, text=True
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        return {**asdict(spec), "error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(line.removeprefix("BENCH "))


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def hardware() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown"
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu, "platform": platform.platform()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "trl", "lora_tune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_results_json(out_dir: Path, prefix: str, result: dict) -> Path:
    """`<out_dir>/results/<prefix>-<UTC stamp>.json`, written atomically; returns its path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = Path(out_dir) / "results" / f"{prefix}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return path


MEDIANS = ("tokens_per_s", "peak_mb", "val_loss", "step_s", "padding_share", "mfu")


def add_mfu(runs: list[dict], flops: dict) -> None:
    """Each run's MFU: its real tokens/s x model FLOPs per token / the measured matmul peak."""
    from lora_tune.bench.flops import flops_per_token, mfu
    from lora_tune.bench.plan import ModelShape

    shape = ModelShape(**flops["shape"])
    for r in runs:
        if "error" not in r:
            seq = flops.get("attention_seq_len_at", {}).get(str(r.get("max_length")), flops["attention_seq_len"])
            per_token = flops_per_token(shape, seq, r["gradient_checkpointing"], r["r"])
            r["mfu"] = mfu(r["tokens_per_s"], per_token, flops["peak_flops"])


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        row = {"name": name}
        for tool in ("ours", "trl"):
            ok = [r for r in runs if r["name"] == name and r["tool"] == tool and "error" not in r]
            if not ok:
                row[tool] = None
                continue
            row[tool] = {k: statistics.median(r[k] for r in ok) for k in MEDIANS if all(k in r for r in ok)}
            row[tool]["runs"] = len(ok)
        if row["ours"] and row["trl"]:
            row["speedup"] = row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
            row["memory_ratio"] = row["ours"]["peak_mb"] / row["trl"]["peak_mb"]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# lora_tune vs TRL SFTTrainer + PEFT ({result['date']}, git {result['git_sha']})",
        "",
        f"Hardware: {result['hardware']['cpu']} ({result['hardware']['cores']} threads), "
        f"GPU: {result['hardware']['gpu'] or 'none'}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"Model SmolLM2-135M-Instruct, {result['data']}; LoRA r=16 all-linear, micro-batch "
        f"{result['micro_batch_size']} and max_length {result['max_length']} unless the configuration's name "
        "says otherwise (-mb8: micro-batch 8, -len256: max_length 256), AdamW, constant lr; "
        f"{result['warmup_steps']} warm-up steps excluded, {result['steps']} timed steps; median of "
        f"{result['reps']} runs, each in a fresh process, tools alternating.",
        "",
        "| configuration | ours tokens/s | TRL tokens/s | speed-up | ours peak MB | TRL peak MB | memory ratio "
        "| ours val loss | TRL val loss | ours MFU | TRL MFU | ours padding | TRL padding |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(d: dict, k: str) -> str:
        return f"{100 * d[k]:.1f}%" if k in d else "-"

    for r in result["summary"]:
        o, t = r["ours"], r["trl"]
        if not (o and t):
            lines.append(
                f"| {r['name']} | {o and round(o['tokens_per_s'])} | {t and round(t['tokens_per_s'])} | "
                "failed | | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['name']} | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
            f"{o['peak_mb']:.0f} | {t['peak_mb']:.0f} | {r['memory_ratio']:.2f} | {o['val_loss']:.3f} | "
            f"{t['val_loss']:.3f} | {pct(o, 'mfu')} | {pct(t, 'mfu')} | {pct(o, 'padding_share')} | "
            f"{pct(t, 'padding_share')} |"
        )
    lines += [
        "",
        "Tokens/s counts real (non-padding) tokens. Peak MB is the process's peak RSS minus its RSS after "
        "importing torch/transformers/peft/trl. Validation loss is the mean over assistant tokens of the "
        "held-out chats after the run, computed by the same code for both. MFU: real tokens/s x model FLOPs "
        "per token (4N for LoRA on a frozen base, +2N recompute with checkpointing, plus attention at the "
        "data's token-weighted mean length; `lora_tune/bench/flops.py`) over the best bf16 matmul FLOP/s "
        "measured on this machine"
        + (f" ({result['flops']['peak_flops'] / 1e12:.2f} TFLOP/s)" if result.get("flops") else "")
        + ". Padding: share of the computed token positions that were padding.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["ours"] and r["trl"]]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, key, label in (
        (axes[0], "tokens_per_s", "real tokens / s (higher is better)"),
        (axes[1], "peak_mb", "peak memory, MB (lower is better)"),
    ):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["ours"][key] for r in rows], 0.4, label="lora_tune")
        ax.bar([i + 0.2 for i in x], [r["trl"][key] for r in rows], 0.4, label="TRL + PEFT")
        ax.set_xticks(list(x), names, rotation=15)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, {result['hardware']['gpu'] or 'CPU'}")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def flops_setup(
    train_file: Path, max_length: int, model: str = "builtin:smollm2-135m", other_lengths: tuple[int, ...] = ()
) -> dict:
    """What MFU needs: the model's shape, the data's token-weighted mean length (at `max_length`, and in
    `attention_seq_len_at` at each of `other_lengths`), and the matmul peak."""
    from dataclasses import asdict as as_dict

    import torch

    from lora_tune.bench.flops import matmul_peak
    from lora_tune.bench.plan import ModelShape, load_model_config
    from lora_tune.config import ModelCfg
    from lora_tune.data.readers import load_records
    from lora_tune.data.tokenize import encode_records
    from lora_tune.models import load_tokenizer, resolve_source

    path = resolve_source(model, log=lambda *_: None)
    tok = load_tokenizer(path, ModelCfg(source=model))
    records = load_records(train_file)

    def attended(length: int) -> float:  # the token-weighted mean length a token attends over
        lengths = [len(e.input_ids) for e in encode_records(tok, records, length)[0]]
        return sum(n * n for n in lengths) / sum(lengths)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "shape": as_dict(ModelShape.from_config(load_model_config(model))),
        "attention_seq_len": attended(max_length),
        "attention_seq_len_at": {str(n): attended(n) for n in set(other_lengths) - {max_length}},
        "peak_flops": matmul_peak(device),
        "peak_device": str(device),
    }


def compare(
    out_dir: Path,
    reps: int = 3,
    steps: int = 8,
    warmup: int = 2,
    micro_batch_size: int = 4,
    max_length: int = 512,
    matrix=MATRIX,
    log=print,
) -> dict:
    """Run the matrix; write `<out_dir>/results/<stamp>.json`, `RESULTS.md` and `results.png`."""
    out_dir = Path(out_dir)
    train_file, val_file = write_bench_data(out_dir / "data")
    lengths = tuple(settings["max_length"] for _, settings in matrix if "max_length" in settings)
    flops = flops_setup(train_file, max_length, other_lengths=lengths)
    log(f"matmul peak here: {flops['peak_flops'] / 1e12:.2f} TFLOP/s (bf16)")
    runs = []
    base = {"micro_batch_size": micro_batch_size, "max_length": max_length}
    for rep in range(reps):
        for name, settings in matrix:
            for tool in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                spec = Spec(
                    tool=tool,
                    name=name,
                    train_file=str(train_file),
                    val_file=str(val_file),
                    steps=steps,
                    warmup_steps=warmup,
                    **{**base, **settings},  # a configuration may set its own micro-batch or max length
                )
                r = run_one(spec)
                runs.append(r)
                msg = (
                    r.get("error", "").splitlines()[-1:]
                    if "error" in r
                    else [f"{r['tokens_per_s']:.0f} tok/s, {r['peak_mb']:.0f} MB, val {r['val_loss']:.3f}"]
                )
                log(f"[{rep + 1}/{reps}] {name:20s} {tool:5s} {msg[0] if msg else 'error'}")
    add_mfu(runs, flops)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "reps": reps,
        "steps": steps,
        "warmup_steps": warmup,
        "micro_batch_size": micro_batch_size,
        "max_length": max_length,
        "data": "200 chats of 1-6 turns (68-406 tokens)",
        "flops": flops,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_results_json(out_dir, "trl", result)
    results_md = out_dir / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    kept = old[old.find("\n## ") :] if "\n## " in old else ""  # sections appended by hand or by ablation.py
    atomic_write_text(results_md, markdown(result) + "\n![chart](results.png)\n" + kept)
    plot(result, out_dir / "results.png")
    return result
