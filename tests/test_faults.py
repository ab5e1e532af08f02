"""Fault injection: SIGKILL at several steps of a run that uses everything at once (trackers included);
bad data through the CLI."""

from __future__ import annotations

import json
import signal
import time

import pytest
from test_trackers import TRACKER_ENV, check_tracker_stores, mlflow_steps

from lora_tune.train.metrics import read_metrics

from conftest import cli_process, tiny_overrides, train_in_process

# QLoRA (4-bit layers kept, as on a GPU) + packing + 8-bit optimizer + accumulation + early stopping + dropout
EVERYTHING = {
    "model.quantization": "nf4",
    "model.cpu_dequantize": False,
    "data.packing": True,
    "train.optimizer": "adamw_8bit",
    "train.grad_accum": 2,
    "train.micro_batch_size": 2,
    "train.max_steps": 16,
    "train.eval_every": 2,
    "train.early_stopping_patience": 3,
    "train.save_every": 3,
    "lora.dropout": 0.1,
}
TRACKERS = {"train.report_to": "tensorboard,mlflow,wandb"}  # resume-safe: the reference runs without them


def _losses(out):
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return [(r["step"], r.get("split", "train"), r["loss"]) for r in rows]


def _run_until(args, out, kill_after: int | None):
    """Run `lora-tune ARGS`; with `kill_after`, SIGKILL it once that many training steps are logged.
    Returns the process's (stdout, stderr)."""
    proc = cli_process(args, **TRACKER_ENV, LORA_TUNE_ALLOCATOR="mimalloc")
    if kill_after is None:
        stdout, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return stdout, err
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for _, split, _ in _losses(out) if split == "train") >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before step {kill_after}: {proc.stderr.read()}"
    return "", ""


@pytest.mark.slow
def test_sigkill_at_several_steps_resumes_to_the_uninterrupted_run(tiny_model_dir, chat_files, tmp_path):
    """The one SIGKILL chain of the SFT loop: killed twice between checkpoints and resumed, a run that uses
    everything at once gives every train and validation loss of the uninterrupted run exactly, and its
    three trackers hold every step once (test_trackers.check_tracker_stores)."""
    train_file, val_file = chat_files
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")

    def args(out, *more, **extra):
        over = tiny_overrides(tiny_model_dir, train_file, val_file, out, **EVERYTHING, **extra)
        return ["train", str(empty), *over, *more]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train_in_process(args(ref))
    _run_until(args(cut, **TRACKERS), cut, kill_after=5)  # the checkpoint is at step 3: 4-5 are redone
    ids_before = json.loads((cut / "trackers.json").read_text())
    assert max(mlflow_steps(cut)) > 3  # the store holds steps past the checkpoint: they must not come twice
    _run_until(args(cut, "--resume", **TRACKERS), cut, kill_after=8)
    stdout, stderr = _run_until(args(cut, "--resume", **TRACKERS), cut, None)
    assert "resumed from" in stdout
    # `lora-tune train` re-executed itself under the allocator it names, and that process ran in full
    assert "allocator: mimalloc (LORA_TUNE_ALLOCATOR=system keeps glibc malloc)" in stdout
    # stderr is no terminal here (as in CI or a log file): the libraries' progress bars stay off
    assert "Loading weights" not in stderr and "it/s]" not in stderr
    assert _losses(cut) == _losses(ref)  # every train and validation loss, exactly
    state = json.loads(sorted((cut / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["step"] == _losses(ref)[-1][0]
    check_tracker_stores(cut, ids_before, {"train.max_steps": "16", "model.source": str(tiny_model_dir)})


BAD_LINES = [
    "{not json",
    '{"messages": "not a list"}',
    '{"messages": [{"role": "user", "content": "hi"}]}',
    '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    '{"prompt": 3, "completion": "x"}',
    '{"prompt": "q", "completion": ""}',
    '{"text": ""}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}',
    "[1, 2, 3]",
]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "inspect"])
def test_a_malformed_corpus_gets_one_line_per_problem(tiny_model_dir, chat_files, tmp_path, command):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("\n".join([good, *BAD_LINES]).encode() + b"\n\xff\xfe not UTF-8\n")  # the last: bad bytes
    if command == "train":
        empty = tmp_path / "empty.yaml"
        empty.write_text("{}\n")
        over = tiny_overrides(tiny_model_dir, bad, None, tmp_path / "run")
        proc = cli_process(["train", str(empty), *over])
    else:
        proc = cli_process(["data", "inspect", str(bad), "--model", str(tiny_model_dir)])
    out, err = proc.communicate(timeout=120)
    text = out + err
    assert "Traceback" not in text
    for lineno in range(2, len(BAD_LINES) + 3):  # every bad line is named, by file and line
        assert f"{bad}:{lineno}:" in text, (lineno, text)
    if command == "train":
        assert proc.returncode != 0 and not (tmp_path / "run").exists()  # nothing written for bad data
