"""Run folders: nothing of the user's is deleted, two runs never share a folder, bad data touches nothing."""

from __future__ import annotations

import pytest
from rich.console import Console

from lora_tune.errors import LoraTuneError
from lora_tune.train.loop import train
from lora_tune.train.rundir import LOCK, run_lock

from conftest import tiny_config, write_jsonl


def _cfg(tiny_model_dir, chat_files, out, **extra):
    train_file, val_file = chat_files
    return tiny_config(tiny_model_dir, train_file, val_file, out, **{"train.max_steps": 2, **extra})


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_model_dir, chat_files, tmp_path):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(LoraTuneError, match="not a lora_tune run folder") as e:
        train(_cfg(tiny_model_dir, chat_files, mine), overwrite=True)
    assert str(mine.resolve()) in str(e.value)
    assert (mine / "notes.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_demo_into_the_current_folder_deletes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lora_tune.cli import main

    (tmp_path / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["demo", "--output-dir", "."])
    assert r.exit_code != 0 and "not a lora_tune run folder" in r.output
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_overwrite_of_a_run_empties_it_but_keeps_the_folder(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out))
    (out / "stale.txt").write_text("from the old run")
    inode = out.stat().st_ino
    res = train(_cfg(tiny_model_dir, chat_files, out), overwrite=True)
    assert res.steps == 2 and out.stat().st_ino == inode and not (out / "stale.txt").exists()
    assert not (out / LOCK).exists()  # released at the end


def test_bad_data_with_overwrite_leaves_the_run_intact(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, chat_files, out))
    before = sorted(p.name for p in out.rglob("*"))
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": "not a list"}'])
    with pytest.raises(LoraTuneError):
        train(_cfg(tiny_model_dir, chat_files, out, **{"data.train_file": str(bad)}), overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_user_config_is_never_overwritten(tiny_model_dir, chat_files, tmp_path):
    (tmp_path / "config.yaml").write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(LoraTuneError, match="config.yaml"):
        train(_cfg(tiny_model_dir, chat_files, tmp_path))
    assert (tmp_path / "config.yaml").read_text() == "train: {lr: 1.0e-4}\n"


def test_two_runs_never_share_a_folder(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    with run_lock(out), pytest.raises(LoraTuneError, match="in use by a lora-tune run"):
        train(_cfg(tiny_model_dir, chat_files, out))
    assert not (out / "config.yaml").exists()


def test_a_stale_lock_is_taken_over_with_a_note(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("pid=4194999 host=elsewhere\n")  # left by a process that was killed
    console = Console(record=True, width=200)
    assert train(_cfg(tiny_model_dir, chat_files, out), console=console).steps == 2
    assert "taking over the lock of a run that is no longer running (pid=4194999" in console.export_text()


def test_demo_steps_fit_the_budget():
    from lora_tune.demo import MIN_STEPS, demo_steps

    assert demo_steps(2.0, 60, budget_s=240) == 60  # fits: unchanged
    slow = demo_steps(5.0, 60, budget_s=240)  # a slow machine trains fewer steps, as many as fit
    assert MIN_STEPS < slow < 60 and slow * 5.0 < 240 < (slow + 1) * 5.0 * 2
    assert demo_steps(5.0, 60, budget_s=240) > demo_steps(6.0, 60, budget_s=240)
    assert demo_steps(60.0, 60, budget_s=240) == MIN_STEPS  # never fewer than makes the point
