"""OpenAI's fine-tuning API on `lora-tune serve`, driven by the official `openai` client (tiny model)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import openai
import pytest
from serve_helpers import ServerProcess

from lora_tune.server.jobs import Base, JobService
from lora_tune.server.protocol import ApiError

from conftest import chat, write_jsonl

KEY = "jobs-key"
TERMINAL = ("succeeded", "failed", "cancelled")


def rows(n: int, start: int = 0) -> list[dict]:
    return [chat(f"what is {i} plus {i}?", f"the answer is {2 * i}.") for i in range(start, start + n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("job-files")
    bad = [json.dumps(r) for r in rows(12)] + ['{"messages": [{"role": "user", "content": "no answer"}]}', "not json"]
    pairs = [
        {"input": {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"}]},
         "preferred_output": [{"role": "assistant", "content": f"the answer is {2 * i}."}],
         "non_preferred_output": [{"role": "assistant", "content": f"the answer is {2 * i + 1}."}]}
        for i in range(12)
    ]  # fmt: skip
    return {
        "train": write_jsonl(d / "train.jsonl", rows(20)),
        "val": write_jsonl(d / "val.jsonl", rows(4, 20)),
        "bad": write_jsonl(d / "bad.jsonl", bad),
        "pairs": write_jsonl(d / "pairs.jsonl", pairs),
    }


def start(model_dir: Path, data_dir: Path) -> ServerProcess:
    args = ["--model", str(model_dir), "--quantization", "fp32", "--device", "cpu", "--data-dir", str(data_dir)]
    # glibc's malloc in the workers: no re-exec under another allocator, a second off each job's start
    return ServerProcess([*args, "--api-key", KEY], env={"LORA_TUNE_ALLOCATOR": "system"})


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start(tiny_model_dir, tmp_path_factory.mktemp("service"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def wait(client, job_id: str, until=TERMINAL, timeout: float = 180.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


FAST = {"data.max_length": 64, "lora.r": 4, "lora.alpha": 8, "train.lr": 5e-3, "train.compile": False}


@pytest.mark.slow
def test_upload_train_watch_and_chat_with_the_fine_tuned_model(client, files, tiny_model_dir):
    train = client.files.create(file=files["train"].open("rb"), purpose="fine-tune")
    val = client.files.create(file=files["val"].open("rb"), purpose="fine-tune")
    assert (
        train.status == "processed" and train.filename == "train.jsonl" and train.bytes == files["train"].stat().st_size
    )
    assert client.files.content(train.id).read() == files["train"].read_bytes()
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, validation_file=val.id, suffix="adder", seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 4}, extra_body={"lora_tune": FAST},
    )  # fmt: skip
    assert job.status == "validating_files" and job.fine_tuned_model is None
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{tiny_model_dir.name}:adder:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.learning_rate_multiplier == 1.0
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Validating training file")
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(steps) == list(range(1, 11))  # 20 examples / 4 x 2 epochs, one event per step
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    later = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert page.has_more and [e.id for e in later.data] == [e.id for e in events[3:6]]
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [10, 8, 4]
    last = ckpts[0].metrics
    assert last.train_loss > 0 and last.valid_loss > 0 and last.full_valid_loss == last.valid_loss
    metrics = [e.data for e in events if e.type == "metrics" and e.data["step"] == 10 and "train_loss" in e.data]
    assert last.train_loss == pytest.approx(metrics[0]["train_loss"])
    served = {m.id for m in client.models.list()}
    assert done.fine_tuned_model in served and ckpts[1].fine_tuned_model_checkpoint in served
    for model in (done.fine_tuned_model, ckpts[1].fine_tuned_model_checkpoint):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "what is 3 plus 3?"}],
                                               max_tokens=8, temperature=0)  # fmt: skip
        assert reply.choices[0].message.content is not None
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]


@pytest.mark.slow
def test_a_malformed_file_fails_the_job_naming_the_line(client, files, tiny_model_dir):
    bad = client.files.create(file=files["bad"].open("rb"), purpose="fine-tune")
    assert bad.status == "error" and "bad.jsonl:13" in bad.status_details
    job = wait(client, client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert job.error.message.startswith("bad.jsonl:13: ") and "1 more" in job.error.message
    few = client.files.create(file=("few.jsonl", json.dumps(rows(1)[0]).encode() + b"\n"), purpose="fine-tune")
    job = wait(client, client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=few.id).id)
    assert job.status == "failed" and "at least 10" in job.error.message


@pytest.mark.slow
def test_a_dpo_job_trains_through_the_preference_objective(client, files, tiny_model_dir):
    pairs = client.files.create(file=files["pairs"].open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=pairs.id, extra_body={"lora_tune": FAST},
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )  # fmt: skip
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.2
    first = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
             if e.type == "metrics" and e.data.get("step") == 1 and "train_loss" in e.data]  # fmt: skip
    assert first[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # DPO's loss before any update


@pytest.mark.slow
def test_cancel_stops_the_worker_and_keeps_its_checkpoints(client, files, tiny_model_dir):
    train = client.files.create(file=files["train"].open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id,
                                         hyperparameters={"n_epochs": 200},
                                         extra_body={"lora_tune": {**FAST, "train.save_every": 5}})  # fmt: skip
    wait(client, job.id, until=("running",))
    end = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data and time.monotonic() < end:
        time.sleep(0.3)
    second = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id,
                                            extra_body={"lora_tune": FAST})  # fmt: skip
    assert wait(client, second.id, until=("queued", "running")).status == "queued"
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"  # one job trains at a time
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert not workers_of(job.id)  # stopped at once (the answer came after the worker ended)
    assert wait(client, second.id, until=("running", *TERMINAL)).status == "running"  # the next one starts
    client.fine_tuning.jobs.cancel(second.id)
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data  # what it saved is kept
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_bad_job_requests_and_auth(client, server, files, tiny_model_dir):
    train = client.files.create(file=files["train"].open("rb"), purpose="fine-tune")
    model = str(tiny_model_dir)
    for kwargs, param in [
        ({"model": "gpt-4o-mini", "training_file": train.id}, "model"),
        ({"model": model, "training_file": "file-nope"}, "training_file"),
        ({"model": model, "training_file": train.id, "hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
        ({"model": model, "training_file": train.id, "method": {"type": "reinforcement"}}, "method.type"),
        ({"model": model, "training_file": train.id, "method": "dpo"}, "method"),
        ({"model": model, "training_file": train.id, "suffix": "a:b"}, "suffix"),
        ({"model": model, "training_file": train.id, "extra_body": {"lora_tune": {"lora.r": "many"}}}, "lora_tune"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**kwargs)
        assert err.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=files["train"].open("rb"), purpose="assistants")
    client.files.delete(train.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(train.id)
    anon = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    for call in (anon.files.list, anon.fine_tuning.jobs.list):
        with pytest.raises(openai.AuthenticationError):
            call()


def workers_of(job_id: str) -> list[int]:
    """Pids of live processes training this job (their command line names its config file)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if job_id in cmd and "train" in cmd and state != "Z":
                found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_killed_server_resumes_the_running_job_after_restart(tiny_model_dir, files, tmp_path):
    data = tmp_path / "service"
    first = start(tiny_model_dir, data)
    c = openai.OpenAI(base_url=first.url, api_key=KEY, max_retries=0, timeout=60)
    train = c.files.create(file=files["train"].open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, hyperparameters={"n_epochs": 8},
                                    extra_body={"lora_tune": {**FAST, "train.save_every": 5}})  # fmt: skip
    end = time.monotonic() + 120
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data and time.monotonic() < end:
        time.sleep(0.2)
    status = c.fine_tuning.jobs.retrieve(job.id).status
    assert status == "running", status
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    end = time.monotonic() + 10
    while workers_of(job.id) and time.monotonic() < end:
        time.sleep(0.1)
    assert not workers_of(job.id)  # the worker died with the server
    second = start(tiny_model_dir, data)
    try:
        c = openai.OpenAI(base_url=second.url, api_key=KEY, max_retries=0, timeout=60)
        done = wait(c, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert (
            any("restarted" in m for m in messages) and "Fine-tuning job resumed from its last checkpoint" in messages
        )
        log = (data / "jobs" / job.id / "train.log").read_text()
        assert "resumed from" in log, log[-2000:]
        ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
        assert ckpts[0].step_number == 40  # 20 examples / 4 x 8 epochs, all trained
        reply = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)  # fmt: skip
        assert reply.usage.completion_tokens >= 1
    finally:
        print(f"exit codes {first.proc.returncode} {second.proc.poll()}")
        second.stop()
        print("first server:\n" + "".join(first.log[-40:]) + "\nsecond server:\n" + "".join(second.log[-60:]))


def test_hyperparameters_and_overrides_map_onto_the_config(tmp_path, files):
    svc = JobService(tmp_path / "svc", Base("tiny", "/models/tiny", "nf4"))
    train = svc.add_file("train.jsonl", files["train"].read_bytes(), "fine-tune")
    job = svc.create({"model": "tiny", "training_file": train["id"], "seed": 3, "metadata": {"lora_tune": "lora.r=32"},
                      "hyperparameters": {"batch_size": 16, "learning_rate_multiplier": 2, "n_epochs": "auto"},
                      "lora_tune": {"train.warmup_steps": 5}})  # fmt: skip
    cfg = svc.config_for(job)
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.epochs, t.seed, t.lr) == (8, 2, 3, 3, pytest.approx(4e-4))
    assert cfg.model.source == "/models/tiny" and cfg.model.quantization == "nf4"  # trained as it is served
    assert cfg.lora.r == 32 and t.warmup_steps == 5 and cfg.output_dir == job["run_dir"]
    dpo = svc.create({"model": "tiny", "training_file": train["id"], "method": {"type": "dpo"}})
    cfg = svc.config_for(dpo)
    assert cfg.train.objective == "dpo" and cfg.preference.beta == 0.1 and cfg.train.epochs == 3
    with pytest.raises(ApiError, match="lora_tune overrides"):
        svc.create({"model": "tiny", "training_file": train["id"], "lora_tune": {"train.nonsense": 1}})


@pytest.mark.slow
def test_pause_then_resume_continues_from_the_last_checkpoint(client, files, tiny_model_dir):
    train = client.files.create(file=files["train"].open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id,
                                         hyperparameters={"n_epochs": 8},
                                         extra_body={"lora_tune": {**FAST, "train.save_every": 5}})  # fmt: skip
    end = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data and time.monotonic() < end:
        time.sleep(0.2)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" and not workers_of(job.id)
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 40
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Fine-tuning job resumed from its last checkpoint" in messages
