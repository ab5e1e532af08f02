"""metrics.jsonl (one JSON object per optimizer step or evaluation) and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tune.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSONL log; flushed on every line so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (logged after the checkpoint a run resumes from)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def plot_losses(metrics: list[dict[str, Any]], out: Path, title: str = "", unit: str = "tokens") -> Path | None:
    """Train loss per step (and validation loss when logged) as a PNG; for preference objectives a second
    panel shows the reward accuracy and margin of training steps and evaluations."""
    train = [(r["step"], r["loss"]) for r in metrics if r.get("split", "train") == "train"]
    val = [(r["step"], r["loss"]) for r in metrics if r.get("split") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = any("rewards/margins" in r for r in metrics)
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)" if unit == "tokens" else f"loss (mean per {unit[:-1]})")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        _plot_rewards(axes[0, 1], metrics)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_rewards(ax, metrics: list[dict[str, Any]]) -> None:
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in metrics if r.get("split", "train") == split and "rewards/margins" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["rewards/margins"] for r in rows], style, lw=1.2, label=f"{split} reward margin")
        if "rewards/accuracies" in rows[0]:
            ax.plot(steps, [r["rewards/accuracies"] for r in rows], style, lw=1.2, label=f"{split} reward accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_title("rewards (beta x log policy/reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
