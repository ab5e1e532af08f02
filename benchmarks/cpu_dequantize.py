"""QLoRA on the CPU: NF4 kept in 4 bits (bitsandbytes de-quantizes each weight per use) against NF4
de-quantized once (`model.cpu_dequantize`) against 16-bit/32-bit weights, in training and generation, on
each CPU kind; every measurement in a fresh process, all of them in one run.

    python benchmarks/cpu_dequantize.py [--kinds native,avx2] [--steps 4] [--new-tokens 48]

Writes benchmarks/results/cpu-dequantize-<stamp>.json and .md, and appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.bench.compare import (
    CPU_KIND_NAMES,
    CPU_KINDS,
    _git_sha,
    hardware,
    run_one,
    versions,
    write_results_json,
)
from lora_tune.bench.data import write_bench_data
from lora_tune.bench.worker import Spec

HERE = Path(__file__).parent
# (row, quantization, model.cpu_dequantize); precision is auto (bf16 autocast where the CPU computes it
# fast, else fp32) except for the fp32 row
ROWS = [
    ("nf4, kept in 4 bits (before)", "nf4", False),
    ("nf4, de-quantized once (after)", "nf4", True),
    ("fp32 weights", "fp32", False),
]
PROMPT = "How much does Nimbus Notes Pro cost, and what does the free plan include?"


def generation_worker(quantization: str, dequantize: bool, new_tokens: int) -> dict:
    """Greedy tokens/s of SmolLM2 on this process's CPU kind (run in a fresh process)."""
    import torch

    from lora_tune.evaluate.generate import generate_reply
    from lora_tune.evaluate.run import ModelSpec, load_for_inference

    torch.manual_seed(0)
    model, tok, precision = load_for_inference(ModelSpec("builtin:smollm2-135m", None, quantization, dequantize), "cpu")
    msgs = [{"role": "user", "content": PROMPT}]
    generate_reply(model, tok, msgs, max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    text = generate_reply(model, tok, msgs, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - t0
    produced = len(tok(text, add_special_tokens=False)["input_ids"])
    return {"tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds, "precision": precision.name}


def run_generation(kind: str, quantization: str, dequantize: bool, new_tokens: int) -> dict:
    import os

    arg = json.dumps({"quantization": quantization, "dequantize": dequantize, "new_tokens": new_tokens})
    env = {**os.environ, **CPU_KINDS[kind]}
    proc = subprocess.run(
        [sys.executable, __file__, "--generation-worker", arg], capture_output=True, text=True, env=env
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("GEN ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(line.removeprefix("GEN "))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="native,avx2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--generation-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generation_worker:
        w = json.loads(args.generation_worker)
        print("GEN " + json.dumps(generation_worker(w["quantization"], w["dequantize"], w["new_tokens"])))
        return
    train_file, val_file = write_bench_data(HERE / "data", shape="chats")
    rows = []
    for kind in args.kinds.split(","):
        for name, quant, dequantize in ROWS:
            spec = Spec(
                tool="ours",
                name=name,
                train_file=str(train_file),
                val_file=str(val_file),
                quantization=quant,
                micro_batch_size=args.micro_batch,
                max_length=args.max_length,
                steps=args.steps,
                cpu_kind=kind,
                compile=False,  # the 4-bit layers' cost, not compile's
                extra={"model.cpu_dequantize": dequantize},
            )
            train = run_one(spec)
            gen = run_generation(kind, quant, dequantize, args.new_tokens)
            rows.append({"cpu_kind": kind, "row": name, "train": train, "generate": gen})
            print(
                f"{kind:6s} {name:32s} train {train.get('tokens_per_s', 0):6.0f} tok/s "
                f"peak {train.get('peak_mb', 0):6.0f} MB  generate {gen.get('tokens_per_s', 0):5.1f} tok/s"
                + (
                    f"  ERROR {train.get('error', '')[-200:]} {gen.get('error', '')[-200:]}"
                    if "error" in train or "error" in gen
                    else ""
                ),
                flush=True,
            )
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "settings": vars(args) | {"generation_worker": None},
        "rows": rows,
    }
    path = write_results_json(HERE, "cpu-dequantize", result)
    text = markdown(result, path.name)
    path.with_suffix(".md").write_text(text)
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n" + text)
    print(text)


def markdown(result: dict, name: str) -> str:
    hw, s = result["hardware"], result["settings"]
    lines = [
        f"## QLoRA on the CPU: 4-bit kept vs de-quantized once vs fp32 ({result['date']}, {name})",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, micro-batch {s['micro_batch']} x "
        f"{s['max_length']} tokens, gradient checkpointing, {s['steps']} timed steps after 2 warm-up steps, "
        f"not compiled; generation: {s['new_tokens']} greedy tokens after a warm-up. Each figure from a "
        f"fresh process. Hardware: {hw['cpu']} ({hw['cores']} threads; CPU flags: {', '.join(hw['cpu_flags'])}).",
        "",
        "| CPU kind | weights | precision (train / generate) | train tokens/s | vs 4-bit kept | peak MB | val loss "
        "| generate tokens/s | vs 4-bit kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["cpu_kind"] == r["cpu_kind"])
        t, g, bt, bg = r["train"], r["generate"], base["train"], base["generate"]
        if "error" in t or "error" in g:
            lines.append(f"| {r['cpu_kind']} | {r['row']} | failed | | | | | | |")
            continue
        trained = "fp32" if t["quantization"] == "fp32" else g["precision"]  # the worker trains fp32 as fp32
        lines.append(
            f"| {CPU_KIND_NAMES[r['cpu_kind']]} | {r['row']} | {trained} / {g['precision']} | "
            f"{t['tokens_per_s']:.0f} | {t['tokens_per_s'] / bt['tokens_per_s']:.2f}x | {t['peak_mb']:.0f} | "
            f"{t['val_loss']:.4f} | {g['tokens_per_s']:.1f} | {g['tokens_per_s'] / bg['tokens_per_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
