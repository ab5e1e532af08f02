"""How fast the dashboard summarizes a folder of runs: `RunsFolder.summaries()` cold (first read) and warm
(unchanged folders from its cache), against a plain reader that parses every config.yaml and metrics.jsonl
in full, on run folders generated here; all in one process, one run.

    python benchmarks/dashboard_speed.py [--runs 300,1000] [--steps 100] [--rounds 3]

Writes benchmarks/results/dashboard-<stamp>.json and .md, and appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lora_tune.bench.compare import _git_sha, hardware, versions, write_results_json
from lora_tune.config import dump_yaml, load_config
from lora_tune.server.dashboard.runs import RunsFolder

HERE = Path(__file__).parent


def make_runs(root: Path, n: int, steps: int) -> None:
    """`n` finished-looking run folders: a resolved config, `steps` logged steps, a validation record."""
    base = load_config(None, ["data.train_file=train.jsonl", "data.val_file=val.jsonl"])
    text = dump_yaml(base)
    for i in range(n):
        run = root / f"run-{i:04d}"
        (run / "adapter").mkdir(parents=True)
        (run / "config.yaml").write_text(text.replace("lr: 0.0002", f"lr: {1e-4 * (i + 1):.4f}"))
        rows = [
            {"step": s, "loss": 3 / s + i * 1e-3, "lr": 1e-4, "tokens_per_s": 1000.0 + i, "real_tokens": 99}
            for s in range(1, steps + 1)
        ]
        rows.append({"split": "val", "step": steps, "loss": 0.05 + i * 1e-3})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def plain_summaries(root: Path) -> list[dict]:
    """The peer: every config parsed whole (PyYAML, C loader where built) and every metrics line decoded."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg = yaml.load((run / "config.yaml").read_text(), Loader=loader)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        vals = [r["loss"] for r in rows if r.get("split") == "val"]
        out.append({"name": run.name, "lr": cfg["train"]["lr"], "steps": len(rows), "best": min(vals, default=None)})
    return out


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="300,1000")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for n in (int(x) for x in args.runs.split(",")):
        with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
            root = Path(tmp)
            make_runs(root, n, args.steps)
            cold = timed(lambda root=root: RunsFolder(root).summaries(), args.rounds)  # a new cache each time
            folder = RunsFolder(root)
            assert len(folder.summaries()) == n
            warm = timed(folder.summaries, args.rounds)
            plain = timed(lambda root=root: plain_summaries(root), args.rounds)
            rows.append({"runs": n, "steps": args.steps, "cold_s": cold, "warm_s": warm, "plain_s": plain})
            print(f"{n:5d} runs: cold {cold:.3f} s, warm {warm:.3f} s, plain full parse {plain:.3f} s", flush=True)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "rounds": args.rounds,
        "rows": rows,
    }
    path = write_results_json(HERE, "dashboard", result)
    hw = result["hardware"]
    lines = [
        f"## Dashboard: summarizing a folder of runs ({result['date']}, {path.name})",
        "",
        f"`RunsFolder.summaries()` (what `/dashboard/api/runs` answers) on generated run folders of "
        f"{args.steps} logged steps each, median of {args.rounds} rounds, in one process; the peer parses every "
        f"config.yaml (PyYAML) and every metrics line in full. Hardware: {hw['cpu']} ({hw['cores']} threads; "
        f"CPU flags: {', '.join(hw['cpu_flags'])}).",
        "",
        "| runs | cold s | warm (cached) s | plain full parse s | cold vs plain | warm vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runs']} | {r['cold_s']:.3f} | {r['warm_s']:.4f} | {r['plain_s']:.3f} | "
            f"{r['plain_s'] / r['cold_s']:.1f}x faster | {r['plain_s'] / r['warm_s']:.0f}x faster |"
        )
    text = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(text)
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
