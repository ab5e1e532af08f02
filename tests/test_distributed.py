"""Training on several processes (torchrun, DDP over gloo on the CPU), against one process.

Each multi-process test starts `lora-tune train --nproc 2` (torchrun with two ranks of one thread each)
on the tiny model: per-step losses equal a single process whose micro-batch holds both ranks' rows, a
SIGKILLed rank stops the job and `--resume` continues it to the uninterrupted run's numbers, and only
rank 0 writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_preference import pair

from lora_tune.data.batching import BatchStream
from lora_tune.data.tokenize import Example
from lora_tune.errors import LoraTuneError
from lora_tune.train.distributed import Dist, from_env, torchrun_command

from conftest import chat, cli_process, tiny_config, tiny_overrides, train_in_process, write_jsonl

ENV = {"LORA_TUNE_ALLOCATOR": "system"}
# 21 samples in global micro-batches of 4: the last batch of an epoch has 1 row, so rank 1's share of it
# is empty (a dummy row of weight 0)
COMMON = {"train.grad_accum": 2, "train.max_steps": 8, "train.eval_every": 3, "train.compile": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp-data")
    pairs = [(f"what is {i} plus {i}?", f"the answer is {2 * i}.") for i in range(24)]
    train = write_jsonl(root / "train.jsonl", [chat(q, a, "answer the question") for q, a in pairs[:21]])
    val = write_jsonl(root / "val.jsonl", [chat(q, a, "answer the question") for q, a in pairs[21:]])
    return train, val


def _train(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    if "--nproc" not in args:  # one process: in this one (saves a start-up; the numbers are the same)
        train_in_process(args)
        return subprocess.CompletedProcess(args, 0, "", "")
    proc = cli_process(args, **ENV)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _args(model_dir, data, out: Path, nproc: int, *flags: str, **extra) -> list[str]:
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(model_dir, *data, out, **(COMMON | extra))
    return ["train", str(config), *overrides, *flags, *(["--nproc", str(nproc)] if nproc > 1 else [])]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# QLoRA with the 4-bit layers kept (as on a GPU): the FSDP run shards 4-bit weights packed in the compute
# dtype (fp32 here), the DDP run keeps them whole
QLORA = {"model.quantization": "nf4", "model.cpu_dequantize": False}
RUNS = {  # name: (processes, micro-batch, extra settings)
    "one": (1, 4, {}),
    "ddp": (2, 2, {"train.gradient_checkpointing": True}),
    "fsdp": (2, 2, {"train.distributed": "fsdp", "train.gradient_checkpointing": True}),
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The same QLoRA training as one process with micro-batch 4, and as two ranks of micro-batch 2 (DDP, FSDP)."""
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for name, (nproc, micro, extra) in RUNS.items():
        run = root / name
        settings = {"train.micro_batch_size": micro, "lora.dropout": 0} | QLORA | extra
        done = _train(_args(tiny_model_dir, data, run, nproc, **settings))
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = (run, done)
    return out


def _same_training(one: Path, other: Path) -> None:
    a, b = _records(one), _records(other)
    assert [(r.get("split"), r["step"]) for r in a] == [(r.get("split"), r["step"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
        assert y["tokens"] == x["tokens"]  # the supervised-token count is all ranks' sum
        if "grad_norm" in x:
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
            assert y["real_tokens"] == x["real_tokens"]
    from safetensors.torch import load_file

    wa = load_file(one / "adapter" / "adapter_model.safetensors")
    wb = load_file(other / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)  # Adam amplifies float noise


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_both_ranks_rows(runs, how):
    one, two = runs["one"][0], runs[how][0]
    _same_training(one, two)
    train = [r for r in _records(one) if r.get("split") != "val"]
    assert len(train) == 8
    # the step whose batch had one row for two ranks (21 = 5 x 4 + 1) still counted every token once
    assert any(r["tokens"] < 80 for r in train)
    assert json.loads((two / "adapter" / "lora_tune.json").read_text())["processes"] == 2
    assert ("FSDP (weights sharded)" in runs[how][1].stdout) == (how == "fsdp")  # FSDP-QLoRA: 4-bit sharded
    assert "allocator: glibc malloc (LORA_TUNE_ALLOCATOR=system)" in runs[how][1].stdout  # ENV's choice, said


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_only_rank_zero_writes_and_prints(runs, how):
    two, done = runs[how]
    assert sorted(p.name for p in two.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "loss.png",
        "metrics.jsonl",
        "status.json",
    ]
    steps = [r["step"] for r in _records(two) if r.get("split") != "val"]
    assert steps == list(range(1, 9))  # one record per step: a second writer would double them
    assert done.stdout.count("step 1/8") == 1 and done.stdout.count("adapter saved to") == 1
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" not in done.stdout
    ckpt = sorted((two / "checkpoints").iterdir())[-1]
    assert {"rng.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}  # each rank's random states
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world"] == 2 and "rng-rank1.pt" in state["sha256"]


@pytest.mark.slow
def test_a_run_of_two_ranks_resumes_only_on_two(runs, tiny_model_dir, data):
    two, _ = runs["ddp"]
    # resuming a finished run on one process must refuse before any training: the position means
    # another micro-batch with 2 rows
    from lora_tune.config import load_config
    from lora_tune.train.loop import train

    args = _args(
        tiny_model_dir, data, two, 1, **{"train.micro_batch_size": 2, "lora.dropout": 0, **QLORA, **RUNS["ddp"][2]}
    )
    with pytest.raises(LoraTuneError, match=r"trained on 2 process\(es\), now 1.*--nproc 2"):
        train(load_config(args[1], args[2:]), resume=True, console=Console(quiet=True))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e for e in env if e.startswith(b"RANK=")]
    return int(found[0][5:]) if found else None


KILLED = {"train.micro_batch_size": 2, "train.max_steps": 24, "train.save_every": 3}  # lora.dropout 0.1


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory) -> Path:
    """Two DDP ranks with dropout, start to end (FSDP draws the same masks: one reference for both)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _train(_args(tiny_model_dir, data, out, 2, **KILLED))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_continues_it_exactly(tiny_model_dir, data, tmp_path, uninterrupted):
    """SIGKILL rank 1 after a checkpoint: torchrun ends rank 0 too; --resume on two ranks then gives
    the uninterrupted run's losses (lora.dropout 0.1: each rank's random state is restored). One chain,
    FSDP's, against the DDP reference: its resume also shards again the optimizer state saved whole, and
    equal losses mean DDP's (the same ranks, unsharded) would be equal too."""
    more = KILLED | {"train.distributed": "fsdp"}
    cut = tmp_path / "cut"
    proc = cli_process(_args(tiny_model_dir, data, cut, 2, **more), **ENV)
    deadline = time.monotonic() + 180
    while not (cut / "checkpoints" / "step-000006").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the job stops as a whole...
    assert not (cut / "adapter").exists()  # ...before the end
    steps = [r["step"] for r in _records(cut) if r.get("split") != "val"]
    assert 6 <= max(steps) < 24

    done = _train(_args(tiny_model_dir, data, cut, 2, "--resume", **more))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    got = [(r.get("split"), r["step"], r["loss"]) for r in _records(cut)]
    want = [(r.get("split"), r["step"], r["loss"]) for r in _records(uninterrupted)]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want, strict=True):  # FSDP reduces in another order than DDP
        assert g[2] == pytest.approx(w[2], rel=1e-5, abs=1e-7), (g, w)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_ranks(runs, tiny_model_dir, data, tmp_path):
    """`accelerate launch --multi_gpu` starts the same entry point as torchrun (it sets the same variables)."""
    out = tmp_path / "acc"
    args = _args(tiny_model_dir, data, out, 1, **{"train.micro_batch_size": 2, "lora.dropout": 0, **QLORA})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_tune.cli"]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP over 2 processes" in done.stdout
    got, want = _records(out), _records(runs["ddp"][0])
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)


@pytest.mark.slow
def test_dpo_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    """The preference path (reference through the disabled adapter inside DDP's forward) splits too."""
    files = (write_jsonl(tmp_path / "p.jsonl", [pair(i) for i in range(10)]), None)
    more = {"train.objective": "dpo", "train.max_steps": 4, "train.eval_every": 0, "lora.dropout": 0}
    losses = {}
    for nproc, micro in ((1, 4), (2, 2)):
        out = tmp_path / f"dpo{nproc}"
        done = _train(_args(tiny_model_dir, files, out, nproc, **(more | {"train.micro_batch_size": micro})))
        assert done.returncode == 0, done.stderr[-3000:]
        losses[nproc] = [(r["loss"], r["rewards/margins"]) for r in _records(out) if r.get("split") != "val"]
    assert len(losses[1]) == 4
    for (l1, m1), (l2, m2) in zip(losses[1], losses[2], strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5) and m2 == pytest.approx(m1, rel=1e-4, abs=1e-6)
    assert losses[1][-1][0] < losses[1][0][0]  # it trained


# ----------------------------------------------------------------------------------------------------
# In process


def _examples(n: int) -> list[Example]:
    return [Example([1, 2 + i % 5, 3 + i], [-100, 2 + i % 5, 3 + i]) for i in range(n)]


def test_ranks_share_every_global_micro_batch_row_once():
    examples = _examples(10)
    one = BatchStream(examples, 4, seed=3, pad_id=0)
    ranks = [BatchStream(examples, 4, seed=3, pad_id=0, shard=(r, 2)) for r in range(2)]
    for _ in range(len(one) * 2):  # two epochs: 4 + 4 + 2 rows each
        whole = one.next()["input_ids"].tolist()
        parts = [s.next() for s in ranks]
        rows = [row for p in parts if "dummy" not in p for row in p["input_ids"].tolist()]
        assert sorted(rows) == sorted(whole)
        assert all(s.position == one.position for s in ranks)


def test_an_empty_share_is_one_dummy_row():
    stream = BatchStream(_examples(5), 4, seed=0, pad_id=0, shard=(1, 2))
    stream.position.index = 1  # the last batch: one row, which is rank 0's
    batch = stream.next()
    assert batch["dummy"].tolist() == [True] and batch["input_ids"].shape[0] == 1


def test_rank_environment_and_launch_command():
    assert from_env({}) == Dist()
    d = from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (d.rank, d.world, d.local_rank, d.main, d.enabled) == (1, 2, 1, False, True)
    with pytest.raises(LoraTuneError, match="torchrun"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(LoraTuneError, match="integers"):
        from_env({"WORLD_SIZE": "two"})
    cmd = torchrun_command(3, ["train", "c.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=3" in cmd
    assert cmd[-4:] == ["-m", "lora_tune.cli", "train", "c.yaml"]
    alone = Dist()  # one process: the collectives are identities
    assert alone.sum([1.5, 2]) == [1.5, 2] and alone.max(3) == 3 and alone.broadcast("x") == "x"
    assert alone.gather_bytes(b"ab") == [b"ab"]


def test_unsupported_settings_are_refused_before_training(tiny_model_dir, data, tmp_path):
    """Checked in setup before the data or the model loads (here in process: no ranks need to start)."""
    from lora_tune.config import load_config
    from lora_tune.train.setup import check_distributed

    two = from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    cfg = tiny_config(
        tiny_model_dir, *data, tmp_path / "r", **{"train.objective": "dpo", "preference.precompute_ref": True}
    )
    with pytest.raises(LoraTuneError, match="not supported with more than one process"):
        check_distributed(cfg, two, None)
    check_distributed(cfg, Dist(), None)  # one process: fine
    fsdp = load_config(None, ["data.train_file=x", "train.distributed=fsdp", "train.optimizer=adamw_8bit"])
    with pytest.raises(LoraTuneError, match="train.optimizer=adamw_8bit keeps its own state layout"):
        check_distributed(fsdp, two, None)
