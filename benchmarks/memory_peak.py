"""What holds the peak memory of CPU training: tensor bytes by kind against the process's RSS, under
each allocator, each in a fresh process.

    python benchmarks/memory_peak.py [--quantization fp32] [--batch 8] [--length 256]

Per allocator (glibc, tcmalloc, mimalloc): RSS sampled every 10 ms from before the model loads through
a validation pass and two training steps (the peak reported), then a third step under torch's profiler
(whose records inflate RSS from there on, reported apart) and a second validation; the profiler's
memory timeline of the third step gives tensor bytes by category (parameters, optimizer state, inputs,
activations, temporaries such as the logits chunks, gradients, autograd detail). What RSS holds above
the tensors at its peak is allocator slack. Writes results/memory-<stamp>.json, memory_peak.png and a
section of RESULTS.md. Data: the benchmark's long chats, so every sample is full-length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.bench.worker import rss_mb

HERE = Path(__file__).parent
# column order of torch.profiler's memory timeline export (index 0 is unused)
CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail")
ALLOCATORS = ("system", "tcmalloc", "mimalloc")


class Sampler(threading.Thread):
    """RSS every `every` seconds, each sample labelled with the phase the main thread is in."""

    def __init__(self, every: float = 0.01):
        super().__init__(daemon=True)
        self.every, self.phase, self.samples, self.done = every, "load", [], False
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.done:
            self.samples.append((time.perf_counter() - self.t0, rss_mb(), self.phase))
            time.sleep(self.every)


def tensor_peak(prof) -> dict:
    """Tensor bytes by category at the moment their total peaks, from the profiler's memory timeline."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        times, sizes = json.loads(path.read_text())
    totals = [sum(s[1:]) for s in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    by_kind = dict(zip((*CATEGORIES, "unknown"), sizes[at][1:], strict=True))
    return {"total_mb": totals[at] / 2**20, **{k: v / 2**20 for k, v in by_kind.items()}}


def child(args: argparse.Namespace) -> None:
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from rich.console import Console

    from lora_tune.allocator import active
    from lora_tune.bench.data import write_bench_data
    from lora_tune.bench.memory import static_bytes
    from lora_tune.config import load_config
    from lora_tune.data.splits import read_splits
    from lora_tune.losses import evaluate_loss
    from lora_tune.train.setup import setup_run
    from lora_tune.train.step import optimizer_step

    base = rss_mb()
    sampler = Sampler()
    sampler.start()
    train_file, val_file = write_bench_data(Path(tempfile.mkdtemp()), shape="long")
    over = {
        "model.source": "builtin:smollm2-135m",
        "model.quantization": args.quantization,
        "train.precision": "fp32" if args.quantization == "fp32" else "auto",
        "data.train_file": train_file,
        "data.val_file": val_file,
        "data.max_length": args.length,
        "data.cache": False,
        "train.micro_batch_size": args.batch,
        "train.max_steps": 3,
        "train.save_every": 0,
        "train.compile": False,
        "lora.dropout": 0.0,
        "output_dir": tempfile.mkdtemp(),
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    run = setup_run(cfg, read_splits(cfg.data, 0), False, False, Console(quiet=True))
    parts = run.parts
    sampler.phase = "validation"
    evaluate_loss(parts.model, run.val_stream, parts.precision.autocast)
    sampler.phase = "steps"
    for _ in range(2):
        optimizer_step(parts, [run.stream.next()])
    sampler.phase = "profiled step"
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as p:
        optimizer_step(parts, [run.stream.next()])
    sampler.phase = "validation"
    evaluate_loss(parts.model, run.val_stream, parts.precision.autocast)
    sampler.done = True
    sampler.join()
    # the profiler's records of the profiled step stay alive to its end and after: the peak that counts
    # is the one before it (loading, a validation pass, two steps)
    before = sampler.samples[: next(i for i, s in enumerate(sampler.samples) if s[2] == "profiled step")]
    peak = max(before, key=lambda s: s[1])
    out = {
        "allocator": active(),
        "base_rss_mb": base,
        "peak_rss_mb": peak[1] - base,
        "peak_phase": peak[2],
        "peak_rss_profiled_mb": max(s[1] for s in sampler.samples) - base,
        "static_mb": static_bytes(parts.model, parts.optimizer) / 2**20,
        "tensors_at_peak": tensor_peak(p),
        "samples": [(round(t, 2), round(r - base, 1), ph) for t, r, ph in sampler.samples[::5]],
    }
    print("MEM " + json.dumps(out))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    for r in results:
        t, rss = [s[0] for s in r["samples"]], [s[1] for s in r["samples"]]
        ax.plot(t, rss, label=f"RSS, {r['allocator']} (peak before profiling {r['peak_rss_mb']:.0f} MB)")
    tensors = results[0]["tensors_at_peak"]["total_mb"]
    ax.axhline(tensors, color="black", ls="--", label=f"tensor peak of a step ({tensors:.0f} MB)")
    ax.set_xlabel("seconds since imports")
    ax.set_ylabel("MB above the import baseline")
    ax.set_title("SmolLM2-135M LoRA training on the CPU: RSS by allocator vs live tensors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantization", default="fp32", choices=["fp32", "bf16", "nf4"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from lora_tune.allocator import choose, preload_env
    from lora_tune.bench.compare import hardware, write_results_json

    results = []
    for name in ALLOCATORS:
        try:
            env = preload_env(os.environ, choose(name)) or dict(os.environ)
        except Exception as e:  # an allocator not installed here: say so and go on
            print(f"{name}: skipped ({e})")
            continue
        cmd = [sys.executable, __file__, "--child", f"--quantization={args.quantization}"]
        cmd += [f"--batch={args.batch}", f"--length={args.length}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEM ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[4:]))
        r = results[-1]
        print(
            f"{r['allocator']:9s} peak RSS {r['peak_rss_mb']:6.0f} MB ({r['peak_phase']}), tensors at the step's "
            f"peak {r['tensors_at_peak']['total_mb']:6.0f} MB",
            flush=True,
        )
    setting = f"{args.quantization}, {args.batch} x {args.length} full-length tokens, checkpointing, chunked loss"
    path = write_results_json(HERE, "memory", {"hardware": hardware(), "setting": setting, "runs": results})
    plot(results, HERE / "memory_peak.png")
    t = results[0]["tensors_at_peak"]
    kinds = [k for k in (*CATEGORIES, "unknown") if t[k] > 0.5]
    lines = [
        "",
        f"## What holds the CPU memory peak ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {path.name})",
        "",
        f"SmolLM2-135M LoRA r=16, {setting}; `benchmarks/memory_peak.py`. Tensor bytes by category at the "
        "peak of one training step (torch profiler memory timeline):",
        "",
        "| " + " | ".join(kinds) + " | all tensors |",
        "|" + "---|" * (len(kinds) + 1),
        "| " + " | ".join(f"{t[k]:.0f} MB" for k in kinds) + f" | {t['total_mb']:.0f} MB |",
        "",
        "| allocator | peak RSS above imports | reached in | RSS above the tensor peak (slack) "
        "| peak with the profiler's records alive |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        slack = r["peak_rss_mb"] - r["tensors_at_peak"]["total_mb"]
        lines.append(
            f"| {r['allocator']} | {r['peak_rss_mb']:.0f} MB | {r['peak_phase']} | {slack:.0f} MB "
            f"| {r['peak_rss_profiled_mb']:.0f} MB |"
        )
    lines += ["", "![memory over time](memory_peak.png)"]
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
