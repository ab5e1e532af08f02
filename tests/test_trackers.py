"""Experiment tracking: each tracker's store, read back with its own reader, equals metrics.jsonl, also after
SIGKILLs and resumes (no step twice, none missing: `check_tracker_stores`, run by test_faults' chain)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tune.errors import ConfigError
from lora_tune.train.metrics import read_metrics
from lora_tune.train.trackers import read_tensorboard, read_wandb_offline, tracker_metrics, wandb_logged_in

from conftest import tiny_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


# the trackers offline, each with its store in the run folder
TRACKER_ENV = {"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": ""}


def _split(rows, split):
    return [r for r in rows if r.get("split", "train") == split]


def check_tracker_stores(out: Path, ids_before: dict, params: dict[str, str]) -> None:
    """Each tracker's store, read back with its own reader, equals metrics.jsonl: every step once, none
    missing, across the SIGKILLs and resumes of test_faults' chain (which runs with all three trackers)."""
    from mlflow.tracking import MlflowClient

    assert json.loads((out / "trackers.json").read_text()) == ids_before  # the same tracker runs continue
    rows = read_metrics(out / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in _split(rows, "train")]
    acc = [(r["step"], r["token_accuracy"]) for r in _split(rows, "train")]
    val = [(r["step"], r["loss"]) for r in _split(rows, "val")]
    assert [s for s, _ in train] == list(range(1, len(train) + 1))

    # TensorBoard stores float32; its reader drops the events a restart purged
    tb = read_tensorboard(out / "tensorboard")
    assert tb["train/loss"] == [(s, float(np.float32(v))) for s, v in train]
    assert tb["train_loss"] == tb["train/loss"]
    assert tb["val/loss"] == [(s, float(np.float32(v))) for s, v in val]
    assert tb["full_valid_loss"] == tb["val/loss"]  # eval.max_samples unset: the whole validation set
    assert tb["train_mean_token_accuracy"] == [(s, float(np.float32(v))) for s, v in acc]

    ml = ids_before["mlflow"]
    assert ml["tracking_uri"] == f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=ml["tracking_uri"])

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(ml["run_id"], key))

    assert history("train_loss") == train and history("train/loss") == train
    assert history("valid_loss") == val and history("train_mean_token_accuracy") == acc
    run = client.get_run(ml["run_id"])
    assert {k: run.data.params[k] for k in params} == params
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    wb_id = ids_before["wandb"]["id"]
    assert len(list((out / "wandb").glob(f"offline-run-*-{wb_id}"))) >= 2  # one per start of the process
    wb = read_wandb_offline(out / "wandb", wb_id)
    assert sorted(wb["train/loss"]) == train and sorted(wb["train_loss"]) == train
    assert sorted(wb["val/loss"]) == val and sorted(wb["valid_mean_token_accuracy"]) == sorted(
        (r["step"], r["token_accuracy"]) for r in _split(rows, "val")
    )


def mlflow_steps(out: Path) -> list[int]:
    """The training steps the run's MLflow store holds so far."""
    from mlflow.tracking import MlflowClient

    ml = json.loads((out / "trackers.json").read_text())["mlflow"]
    return [
        m.step for m in MlflowClient(tracking_uri=ml["tracking_uri"]).get_metric_history(ml["run_id"], "train_loss")
    ]


def test_fresh_start_hides_older_tensorboard_events(tiny_model_dir, chat_files, tmp_path):
    """A run that died before its first checkpoint starts afresh in the same folder: TensorBoard then shows
    only the new run's steps, not the dead one's."""
    from lora_tune.train.loop import train

    train_file, val_file = chat_files
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, train_file, val_file, out, **{"train.report_to": "tensorboard"}))
    for folder in (out / "checkpoints", out / "adapter"):  # as if it had died before saving anything
        shutil.rmtree(folder)
    train(
        tiny_config(
            tiny_model_dir, train_file, val_file, out, **{"train.report_to": "tensorboard", "train.max_steps": 3}
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert len(_split(rows, "train")) == 3
    tb = read_tensorboard(out / "tensorboard")
    assert tb["train/loss"] == [(r["step"], float(np.float32(r["loss"]))) for r in _split(rows, "train")]
    assert [s for s, _ in tb["val/loss"]] == [0, 3]


def test_report_to_problems_are_config_errors(monkeypatch):
    from lora_tune import config as C

    with pytest.raises(ConfigError, match="report_to"):
        C.load_config(None, ["data.train_file=x", "train.report_to=comet"])
    monkeypatch.setitem(C.TRACKER_PACKAGES, "mlflow", ("no_such_module_for_this_test", "mlflow"))
    with pytest.raises(ConfigError) as e:
        C.load_config(None, ["data.train_file=x", "train.report_to=tensorboard,mlflow", "lora.r=0"])
    msg = str(e.value)
    assert "pip install 'lora_tune[mlflow]'" in msg and "lora.r" in msg and "tensorboard" not in msg.split("lora.r")[0]


def test_openai_names_beside_ours():
    train = {"step": 3, "loss": 1.5, "token_accuracy": 0.25, "lr": 1e-4, "grad_norm": None, "tokens": 10}
    got = tracker_metrics(train, full_validation=True)
    assert got == {
        "train/loss": 1.5,
        "train_loss": 1.5,
        "train/token_accuracy": 0.25,
        "train_mean_token_accuracy": 0.25,
        "train/lr": 1e-4,
    }
    val = {"split": "val", "step": 4, "loss": 2.0, "ppl": 7.39, "token_accuracy": 0.5, "f1": 0.3}
    partial = tracker_metrics(val, full_validation=False, metric="f1")
    assert partial["valid_loss"] == 2.0 and partial["val/f1"] == 0.3 and "full_valid_loss" not in partial
    assert tracker_metrics(val, full_validation=True)["full_valid_mean_token_accuracy"] == 0.5


def test_wandb_is_offline_unless_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_logged_in()


def test_saved_ids_file_is_in_the_run_folder(tiny_model_dir, chat_files, tmp_path):
    from lora_tune.train.loop import train

    train_file, val_file = chat_files
    cfg = tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "r", **{"train.report_to": "mlflow"})
    train(cfg)
    ids = json.loads((tmp_path / "r" / "trackers.json").read_text())
    assert set(ids) == {"mlflow"} and Path(ids["mlflow"]["tracking_uri"].removeprefix("sqlite:///")).is_file()


def test_a_failed_run_closes_its_trackers_and_resumes_them(tiny_model_dir, chat_files, tmp_path):
    from mlflow.tracking import MlflowClient

    from lora_tune.finetune import finetune
    from lora_tune.train.hooks import Hook

    class Boom(Hook):
        failed = False

        def on_step_end(self, run, out):
            if run.state.step == 3:
                raise RuntimeError("boom")

        def on_fail(self, run):
            Boom.failed = True

    train_file, val_file = chat_files
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, train_file, val_file, out, **{"train.report_to": "mlflow", "train.save_every": 2})
    with pytest.raises(RuntimeError, match="boom"):
        finetune(cfg, hooks=[Boom()])
    assert Boom.failed
    ml = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ml["tracking_uri"])
    assert client.get_run(ml["run_id"]).info.status == "FAILED"
    finetune(cfg, resume=True)
    assert client.get_run(ml["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(ml["run_id"], "train_loss")]
    assert sorted(steps) == list(range(1, 7))  # step 3 was logged before the failure and is not sent twice


def test_preference_figures_reach_trackers_under_trls_names():
    train = {"step": 2, "loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.75, "pairs": 8}
    assert tracker_metrics(train, full_validation=True) == {
        "train/loss": 0.6,
        "train_loss": 0.6,
        "train/rewards/margins": 0.2,
        "train/rewards/accuracies": 0.75,
    }
    val = {"split": "val", "step": 2, "loss": 0.5, "rewards/chosen": -0.1, "logps/rejected": -40.0}
    got = tracker_metrics(val, full_validation=True)
    assert got["eval/rewards/chosen"] == got["val/rewards/chosen"] == -0.1 and got["eval/logps/rejected"] == -40.0
