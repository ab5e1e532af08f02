"""Experiment tracking (`train.report_to`): TensorBoard, MLflow and Weights & Biases, as loop hooks.

Each tracker gets the records of `metrics.jsonl` under our names (`train/loss`, `val/loss`, ...) and,
alongside, OpenAI fine-tuning's names where they mean the same thing (`train_loss`, `valid_loss`,
`full_valid_loss`, `train_mean_token_accuracy`, `valid_mean_token_accuracy`).

Resume continues the same tracker run with no step twice and none missing. `metrics.jsonl` is the truth:
on resume each tracker says up to which step it holds records (read from its own store), the records it
lacks up to the checkpoint are replayed from `metrics.jsonl`, and the steps the resumed run redoes are
sent only where the tracker lacks them. (A resume is exact, so a redone step has the values it had.)
Tracker run ids are kept in `<output_dir>/trackers.json`.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from lora_tune import config as C
from lora_tune.atomic import atomic_write_text
from lora_tune.train.hooks import Hook, Record, is_val
from lora_tune.train.metrics import read_metrics
from lora_tune.train.run import Run

# our name of a train record's field -> tracker metric names
TRAIN_NAMES = {
    "loss": ("train/loss", "train_loss"),
    "token_accuracy": ("train/token_accuracy", "train_mean_token_accuracy"),
    "lr": ("train/lr",),
    "grad_norm": ("train/grad_norm",),
    "tokens_per_s": ("train/tokens_per_s",),
    "memory_mb": ("train/memory_mb",),
}
VAL_NAMES = {
    "loss": ("val/loss", "valid_loss"),
    "token_accuracy": ("val/token_accuracy", "valid_mean_token_accuracy"),
    "ppl": ("val/ppl",),
}
FULL_VAL_NAMES = {"loss": "full_valid_loss", "token_accuracy": "full_valid_mean_token_accuracy"}
# the preference objectives' figures, under TRL's names as its trackers show them (train/..., eval/...)
PREFERENCE_FIGURES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "nll_loss",
    "log_odds_ratio",
)
TRAIN_NAMES |= {k: (f"train/{k}",) for k in PREFERENCE_FIGURES}
VAL_NAMES |= {k: (f"val/{k}", f"eval/{k}") for k in PREFERENCE_FIGURES}
# the metric whose last step says how far a tracker's store goes, per split
MARKERS = {"train": "train/loss", "val": "val/loss"}


def tracker_metrics(record: Record, full_validation: bool, metric: str = "none") -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics (None values left out)."""
    if is_val(record):
        names = {**VAL_NAMES, **({metric: (f"val/{metric}",)} if metric != "none" else {})}
        if full_validation:  # the whole validation set was scored: it is also OpenAI's full_valid_*
            names = {k: (*v, FULL_VAL_NAMES[k]) if k in FULL_VAL_NAMES else v for k, v in names.items()}
    else:
        names = TRAIN_NAMES
    return {n: float(record[k]) for k, ns in names.items() if record.get(k) is not None for n in ns}


def split_of(record: Record) -> str:
    return "val" if is_val(record) else "train"


class Tracker(Protocol):
    """One tracking backend."""

    name: str

    def open(self, run: Run, resuming: bool) -> None: ...

    def logged_steps(self) -> dict[str, int]: ...  # split -> last step the store holds (-1: none)

    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TrackerHook(Hook):
    """Feeds one tracker the run's records, exactly once per step (see the module docstring)."""

    def __init__(self, tracker: Tracker, full_validation: bool, metric: str):
        self.tracker, self.full_validation, self.metric = tracker, full_validation, metric
        self.have: dict[str, int] = {}
        self.opened = False

    def on_start(self, run: Run) -> None:
        resuming = run.resumed_from is not None
        self.tracker.open(run, resuming)
        self.opened = True
        if resuming:
            self.have = self.tracker.logged_steps()
            for record in read_metrics(run.metrics_path):  # trimmed to the checkpoint
                self.on_log(run, record)
            self.have = {s: max(v, run.state.step) for s, v in self.have.items()}

    def on_log(self, run: Run, record: Record) -> None:
        if record["step"] > self.have.get(split_of(record), -1):
            self.tracker.write(record["step"], tracker_metrics(record, self.full_validation, self.metric))

    def on_end(self, run: Run) -> None:
        self.tracker.close()
        self.opened = False

    def on_fail(self, run: Run) -> None:
        if self.opened:
            self.tracker.close(failed=True)
            self.opened = False


def tracker_hooks(cfg: C.RunCfg, full_validation: bool) -> list[Hook]:
    """The hooks for `cfg.train.report_to`, in the order given."""
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    return [TrackerHook(kinds[name](), full_validation, cfg.eval.metric) for name in cfg.train.report_to]


def _ids_path(run: Run) -> Path:
    return run.run_dir / "trackers.json"


def _saved_ids(run: Run) -> dict[str, Any]:
    path = _ids_path(run)
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_id(run: Run, name: str, value: dict[str, Any]) -> None:
    atomic_write_text(_ids_path(run), json.dumps({**_saved_ids(run), name: value}, indent=2))


# ----------------------------------------------------------------------------------------------------
# TensorBoard: event files under <output_dir>/tensorboard/


class TensorBoard:
    """TensorBoard event files in `<output_dir>/tensorboard/`.

    A fresh start marks every older event in the folder as purged (TensorBoard's own restart marker,
    step 0); a resume from step S marks the events after S, so a redone step is never shown twice.
    """

    name = "tensorboard"

    def open(self, run: Run, resuming: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run.run_dir / "tensorboard"
        self.upto = run.state.step if resuming else -1
        self.writer = SummaryWriter(str(self.dir), purge_step=self.upto + 1, flush_secs=10)
        if not resuming:
            self.writer.add_text("config", "```yaml\n" + C.dump_yaml(run.cfg) + "\n```", 0)

    def logged_steps(self) -> dict[str, int]:
        history = read_tensorboard(self.dir)
        return {s: min(max((st for st, _ in history.get(m, [])), default=-1), self.upto) for s, m in MARKERS.items()}

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars in a TensorBoard folder as {tag: [(step, value), ...]}, read by TensorBoard's own reader
    (which drops the events a restart marker purged)."""
    if not Path(folder).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------------------------------
# MLflow: MLFLOW_TRACKING_URI, else a SQLite store in <output_dir>/mlruns/


class MLflow:
    """An MLflow run: parameters = the flat resolved config, metrics = the records.

    Logs to `MLFLOW_TRACKING_URI` when set, else to `sqlite:///<output_dir>/mlruns/mlflow.db` (view it
    with `mlflow ui --backend-store-uri` and that URI). Experiment: `MLFLOW_EXPERIMENT_NAME` or lora_tune.
    """

    name = "mlflow"

    def open(self, run: Run, resuming: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        saved = _saved_ids(run).get(self.name) if resuming else None
        uri = saved["tracking_uri"] if saved else mlflow_uri(run.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(self._experiment(run), run_name=run.run_dir.name).info.run_id
        flat = C.flatten(C.to_dict(run.cfg))
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        _save_id(run, self.name, {"run_id": self.run_id, "tracking_uri": uri})

    def _experiment(self, run: Run) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lora_tune")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        local = not os.environ.get("MLFLOW_TRACKING_URI")  # our store in the run folder, not a server
        artifacts = (run.run_dir / "mlruns" / "artifacts").resolve().as_uri() if local else None
        return self.client.create_experiment(name, artifact_location=artifacts)

    def logged_steps(self) -> dict[str, int]:
        history = {s: self.client.get_metric_history(self.run_id, m) for s, m in MARKERS.items()}
        return {s: max((m.step for m in ms), default=-1) for s, ms in history.items()}

    def write(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def mlflow_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the run folder (created here)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = (run_dir / "mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


# ----------------------------------------------------------------------------------------------------
# Weights & Biases: offline files under <output_dir>/wandb/ unless logged in


class WandB:
    """A W&B run, offline unless the user has logged in (`WANDB_MODE` decides when set).

    Project: `WANDB_PROJECT` or lora_tune. Offline runs are files under `<output_dir>/wandb/`; upload
    them later with `wandb sync <output_dir>/wandb/offline-run-*`. A resume writes a new offline file
    for the same run id, holding only the steps the earlier files lack.
    """

    name = "wandb"

    def open(self, run: Run, resuming: bool) -> None:
        import wandb

        saved = _saved_ids(run).get(self.name) if resuming else None
        self.id = saved["id"] if saved else secrets.token_hex(4)
        self.mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.wandb_dir = run.run_dir / "wandb"
        self.earlier = read_wandb_offline(self.wandb_dir, self.id) if resuming and self.mode == "offline" else {}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lora_tune"),
            dir=str(run.run_dir),
            id=self.id,
            name=run.run_dir.name,
            resume="allow",
            mode=self.mode,
            config=C.to_dict(run.cfg),
            settings=wandb.Settings(console="off", quiet=True),
        )
        _save_id(run, self.name, {"id": self.id})

    def logged_steps(self) -> dict[str, int]:
        if self.mode != "offline":  # W&B's server knows the run's last step and refuses earlier ones
            last = max(int(getattr(self.run, "starting_step", 0) or 0) - 1, -1)
            return dict.fromkeys(MARKERS, last)
        return {s: max((st for st, _ in self.earlier.get(m, [])), default=-1) for s, m in MARKERS.items()}

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def wandb_logged_in() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file for W&B's host (read locally, no network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def read_wandb_offline(wandb_dir: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The history of offline run `run_id` under `wandb_dir`, as {metric: [(step, value), ...]}, oldest file
    first, read with W&B's own reader of its run files (`wandb leet inspect --json`)."""
    history: dict[str, list[tuple[int, float]]] = {}
    beside = Path(sys.executable).parent / "wandb"  # this environment's wandb before any other on PATH
    exe = str(beside) if beside.is_file() else shutil.which("wandb") or "wandb"
    for f in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        out = subprocess.run([exe, "leet", "inspect", "--json", str(f)], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            rec = json.loads(line) if line.startswith("{") else {}
            if rec.get("type") != "history":
                continue
            item = rec["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    history.setdefault(key, []).append((int(item["_step"]), float(value)))
    return history
