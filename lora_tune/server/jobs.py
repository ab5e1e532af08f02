"""OpenAI's fine-tuning service on our loop: files, jobs, events and checkpoints.

A job becomes a run folder (`<data-dir>/jobs/<id>/run`) trained by `lora-tune train` in a worker
process, one job at a time; the scheduler thread reads the run folder (`metrics.jsonl`, `checkpoints/`,
`adapter/`) into the job's events and checkpoints; nothing else is the truth. A server that is killed
and started again puts a job that was running back in the queue, and its worker resumes from the last
checkpoint (`--resume`, exact). The worker dies with the server (PR_SET_PDEATHSIG), so a killed server
never leaves a training process behind.

OpenAI's hyperparameters map onto the config as `config_for` (and the README's table) says; `lora_tune` (an extra body
field, a dict of `section.key: value`) or `metadata["lora_tune"]` (`"section.key=value ..."`) set any
other config key.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.atomic import atomic_write_text
from lora_tune.config import RunCfg, dump_yaml, load_config
from lora_tune.data.formats import parse_record
from lora_tune.data.pairs import parse_pref_record
from lora_tune.data.readers import read_records
from lora_tune.errors import LoraTuneError
from lora_tune.server.protocol import ApiError
from lora_tune.server.store import Store

MIN_EXAMPLES = 10  # OpenAI's rule for a training file
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.1}
BASE_LR = 2e-4  # our default train.lr: learning_rate_multiplier scales it
MAX_MICRO_BATCH = 8  # a larger batch_size is reached by gradient accumulation
TERMINAL = ("succeeded", "failed", "cancelled")


def _now() -> int:
    return int(time.time())


def check_file(path: Path, shown_as: str) -> tuple[str | None, int, list[str]]:
    """(kind, examples, problems) of an uploaded JSONL file: "chat" (supervised records), "preference"
    (pairs), or None when neither reads cleanly. Problems say `NAME:LINE: what is wrong`."""
    results = {}
    for kind, parse in (("chat", parse_record), ("preference", parse_pref_record)):
        try:
            records, problems = read_records(path, parse=parse)
        except LoraTuneError as e:
            return None, 0, [str(e).replace(str(path), shown_as)]
        results[kind] = (records, [p.replace(str(path), shown_as) for p in problems])
        if records and not problems:
            return kind, len(records), []
    # neither is clean: report the reading that got further
    kind = max(results, key=lambda k: len(results[k][0]) - len(results[k][1]))
    records, problems = results[kind]
    return None, len(records), problems or [f"{shown_as}: no examples in a supported format"]


def openai_rules(file: dict, purpose_kind: str) -> list[str]:
    """The checks OpenAI applies to a training file for a method, on top of reading every line."""
    name = file["filename"]
    if file["problems"]:
        return file["problems"]
    if file["kind"] != purpose_kind:
        want = (
            "chat examples ({'messages': [...]})"
            if purpose_kind == "chat"
            else "preference pairs (input, preferred_output, non_preferred_output)"
        )
        return [f"{name}: holds {file['kind']} examples; this method needs {want}"]
    if file["examples"] < MIN_EXAMPLES:
        return [f"{name}: has {file['examples']} examples; a training file needs at least {MIN_EXAMPLES}"]
    return []


@dataclass
class Base:
    """The model jobs train on: the server's base, in the quantization it is served with."""

    id: str
    source: str
    quantization: str


def _overrides(body: dict) -> list[str]:
    """Config overrides from the extra body field `lora_tune` or metadata["lora_tune"]."""
    out: list[str] = []
    extra = body.get("lora_tune")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ApiError(400, 'lora_tune must be an object of config keys, e.g. {"lora.r": 32}', param="lora_tune")
        out += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in extra.items()]
    meta = (body.get("metadata") or {}).get("lora_tune")
    if meta:
        out += str(meta).split()
    return out


class JobService:
    """Files and fine-tuning jobs under `data_dir`, trained one at a time by a worker process."""

    def __init__(self, data_dir: Path, base: Base, poll_s: float = 0.5, log=print):
        self.data_dir = data_dir
        self.base = base
        self.poll_s = poll_s
        self.log = log
        (data_dir / "files").mkdir(parents=True, exist_ok=True)
        (data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = Store(data_dir / "service.sqlite")
        self._worker: subprocess.Popen | None = None
        self._running: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # a job's start and its cancel or pause, never interleaved
        self._recover()

    # -- files ----------------------------------------------------------------------------------------
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r} is not supported here; use 'fine-tune'", param="purpose")
        fid = f"file-{uuid.uuid4().hex[:24]}"
        path = self.data_dir / "files" / f"{fid}.jsonl"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        kind, examples, problems = check_file(path, filename)
        row = {
            "id": fid,
            "filename": filename,
            "bytes": len(data),
            "created_at": _now(),
            "purpose": purpose,
            "path": str(path),
            "kind": kind,
            "examples": examples,
            "problems": problems,
        }
        self.store.insert("files", row)
        return row

    def file(self, fid: str) -> dict:
        row = self.store.get("files", fid)
        if row is None:
            raise ApiError(404, f"no such file: {fid}", param="file_id", code="file_not_found")
        return row

    def delete_file(self, fid: str) -> None:
        row = self.file(fid)
        Path(row["path"]).unlink(missing_ok=True)
        self.store.delete("files", fid)

    # -- jobs -----------------------------------------------------------------------------------------
    def create(self, body: dict) -> dict:
        """Validate a job request and queue it (files are checked at its validating_files step)."""
        for name in ("hyperparameters", "method", "metadata"):
            if body.get(name) is not None and not isinstance(body[name], dict):
                raise ApiError(400, f"{name} must be an object", param=name)
        mtype = (body.get("method") or {}).get("type", "supervised")
        if not isinstance((body.get("method") or {}).get(mtype, {}), dict):
            raise ApiError(400, f"method.{mtype} must be an object", param=f"method.{mtype}")
        model = body.get("model")
        if model not in (self.base.id, self.base.source):
            raise ApiError(
                400,
                f"model {model!r} can't be fine-tuned here; this server trains {self.base.id!r}",
                param="model",
                code="model_not_available",
            )
        for param in ("training_file", "validation_file"):
            if body.get(param) is not None and self.store.get("files", body[param]) is None:
                raise ApiError(
                    400,
                    f"{param} {body[param]!r} does not exist; upload it to /v1/files first",
                    param=param,
                    code="file_not_found",
                )
        if not body.get("training_file"):
            raise ApiError(400, "training_file is required", param="training_file")
        method = body.get("method") or {"type": "supervised"}
        mtype = method.get("type")
        if mtype not in ("supervised", "dpo"):
            raise ApiError(400, f"method.type {mtype!r} is not supported; use supervised or dpo", param="method.type")
        hp = {**(body.get("hyperparameters") or {}), **((method.get(mtype) or {}).get("hyperparameters") or {})}
        allowed = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if mtype == "dpo" else set())
        for key, value in hp.items():
            if key not in allowed:
                raise ApiError(
                    400, f"hyperparameter {key!r} is not one of {sorted(allowed)}", param=f"hyperparameters.{key}"
                )
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ApiError(
                    400, f"hyperparameters.{key} must be a positive number or 'auto'", param=f"hyperparameters.{key}"
                )
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
            raise ApiError(400, "suffix must be a string of at most 64 characters without ':'", param="suffix")
        seed = body.get("seed", 42)
        if not isinstance(seed, int):
            raise ApiError(400, "seed must be an integer", param="seed")
        jid = f"ftjob-{uuid.uuid4().hex[:24]}"
        overrides = _overrides(body)
        try:  # an override that the config refuses is the caller's error, now
            load_config(None, [f"model.source={self.base.source}", "data.train_file=x.jsonl", *overrides])
        except LoraTuneError as e:
            raise ApiError(400, f"lora_tune overrides: {e}", param="lora_tune") from None
        short = Path(self.base.id).name if "/" in self.base.id else self.base.id
        row = {
            "id": jid,
            "created_at": _now(),
            "status": "validating_files",
            "model": model,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "hyperparameters": hp,
            "method": {"type": mtype, **{k: v for k, v in method.items() if k != "type"}},
            "suffix": suffix,
            "seed": seed,
            "metadata": body.get("metadata"),
            "overrides": overrides,
            "model_name": f"ft:{short}:{suffix or 'lora-tune'}:{jid.removeprefix('ftjob-')[:8]}",
            "run_dir": str(self.data_dir / "jobs" / jid / "run"),
        }
        self.store.insert("jobs", row)
        self.store.event(jid, f"Validating training file: {row['training_file']}")
        return self.job(jid)

    def job(self, jid: str) -> dict:
        row = self.store.get("jobs", jid)
        if row is None:
            raise ApiError(404, f"no such fine-tuning job: {jid}", param="fine_tuning_job_id", code="job_not_found")
        return row

    def cancel(self, jid: str) -> dict:
        with self._lock:
            row = self.job(jid)
            if row["status"] in TERMINAL:
                raise ApiError(400, f"job {jid} is already {row['status']}", param="fine_tuning_job_id")
            self.store.update("jobs", jid, status="cancelled", finished_at=_now())
            self.store.event(jid, "Job cancelled by request")
            running = self._running == jid
        if running:
            self._stop_worker()
        return self.job(jid)

    def pause(self, jid: str) -> dict:
        with self._lock:
            row = self.job(jid)
            if row["status"] != "running":
                raise ApiError(
                    400, f"only a running job can be paused; {jid} is {row['status']}", param="fine_tuning_job_id"
                )
            self.store.update("jobs", jid, status="paused")
            self.store.event(jid, "Job paused; resume continues from the last checkpoint")
        self._stop_worker()
        return self.job(jid)

    def resume(self, jid: str) -> dict:
        row = self.job(jid)
        if row["status"] != "paused":
            raise ApiError(
                400, f"only a paused job can be resumed; {jid} is {row['status']}", param="fine_tuning_job_id"
            )
        self.store.update("jobs", jid, status="queued")
        self.store.event(jid, "Job resumed: queued to continue from its last checkpoint")
        return self.job(jid)

    def checkpoints(self, jid: str) -> list[dict]:
        """One entry per checkpoint in the run folder (newest first), metrics under OpenAI's names."""
        row = self.job(jid)
        run = Path(row["run_dir"])
        rows = _metrics(run)
        out = []
        for ckpt in sorted((run / "checkpoints").glob("step-*"), reverse=True):
            if not (ckpt / "adapter_model.safetensors").is_file():
                continue
            step = int(ckpt.name.removeprefix("step-"))
            out.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"ftckpt-{jid.removeprefix('ftjob-')[:8]}-{step}",
                    "created_at": int(ckpt.stat().st_mtime),
                    "fine_tuning_job_id": jid,
                    "step_number": step,
                    "fine_tuned_model_checkpoint": f"{row['model_name']}:ckpt-step-{step}",
                    "metrics": checkpoint_metrics(rows, step),
                }
            )
        return out

    def served_models(self) -> dict[str, Path]:
        """Fine-tuned models and their checkpoints, as model ids the server can serve."""
        found: dict[str, Path] = {}
        for row in self.store.all("jobs"):
            run = Path(row["run_dir"])
            if row["status"] == "succeeded" and (run / "adapter" / "adapter_config.json").is_file():
                found[row["model_name"]] = run / "adapter"
            for ckpt in (run / "checkpoints").glob("step-*"):
                if (ckpt / "adapter_config.json").is_file():
                    found[f"{row['model_name']}:ckpt-step-{int(ckpt.name.removeprefix('step-'))}"] = ckpt
        return found

    # -- the scheduler ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lora-tune-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._worker is not None and self._worker.poll() is None:
            self._stop_worker()

    def _recover(self) -> None:
        for row in self.store.all("jobs", "status = 'running'"):
            self.store.update("jobs", row["id"], status="queued", worker_pid=None)
            self.store.event(row["id"], "The server restarted; the job is queued to resume from its last checkpoint")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception as e:  # the service keeps going; the job at fault is failed by tick itself
                self.log(f"jobs: scheduler error: {type(e).__name__}: {e}")
            self._stopping.wait(self.poll_s)

    def tick(self) -> None:
        """One round: validate new jobs, follow the running one, start the next queued one."""
        for row in self.store.all("jobs", "status = 'validating_files'"):
            self._validate(row)
        if self._running is not None:
            self._follow(self._running)
        if self._running is None:
            queued = self.store.all("jobs", "status = 'queued'")
            if queued:
                self._launch(queued[0])

    def _validate(self, row: dict) -> None:
        kind = "preference" if row["method"]["type"] == "dpo" else "chat"
        for param in ("training_file", "validation_file"):
            if row[param] is None:
                continue
            file = self.store.get("files", row[param])
            problems = ["the file was deleted"] if file is None else openai_rules(file, kind)
            if param == "validation_file" and file is not None and not file["problems"] and file["kind"] == kind:
                problems = []  # the 10-example minimum is for training files
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
                return self._fail(row["id"], code, f"{problems[0]}{more}", param)
        self.store.update("jobs", row["id"], status="queued")
        self.store.event(row["id"], "Files validated, moving job to queued state")

    def config_for(self, row: dict) -> RunCfg:
        """The run's config: OpenAI's hyperparameters on our defaults, then the caller's overrides."""
        hp = {k: row["hyperparameters"].get(k, "auto") for k in AUTO}
        hp = {k: AUTO[k] if v == "auto" else v for k, v in hp.items()}
        train = self.store.get("files", row["training_file"])
        batch = max(1, int(hp["batch_size"]))
        micro = min(batch, MAX_MICRO_BATCH)
        steps = math.ceil(train["examples"] / batch) * float(hp["n_epochs"])
        every = max(1, math.ceil(steps / 3))  # about three checkpoints (OpenAI keeps the last three epochs')
        over = {
            "model.source": self.base.source,
            "model.quantization": self.base.quantization,
            "data.train_file": train["path"],
            "train.epochs": hp["n_epochs"],
            "train.micro_batch_size": micro,
            "train.grad_accum": math.ceil(batch / micro),
            "train.lr": BASE_LR * float(hp["learning_rate_multiplier"]),
            "train.seed": row["seed"],
            "train.save_every": every,
            "train.eval_every": every,
            "train.keep_last": 3,
            "output_dir": row["run_dir"],
        }
        if row["validation_file"]:
            over["data.val_file"] = self.store.get("files", row["validation_file"])["path"]
        if row["method"]["type"] == "dpo":
            over |= {"train.objective": "dpo", "preference.beta": hp["beta"]}
        return load_config(None, [f"{k}={v}" for k, v in over.items()] + list(row["overrides"]))

    def _launch(self, row: dict) -> None:
        with self._lock:
            row = self.job(row["id"])
            if row["status"] == "queued":  # not cancelled since it was picked
                self._start_worker(row)

    def _start_worker(self, row: dict) -> None:
        jid = row["id"]
        try:
            cfg = self.config_for(row)
        except Exception as e:  # a refused config, or a file deleted since validation
            return self._fail(jid, "invalid_config", str(e) or type(e).__name__, None)
        job_dir = Path(row["run_dir"]).parent
        job_dir.mkdir(parents=True, exist_ok=True)
        config = job_dir / "config.yaml"
        atomic_write_text(config, dump_yaml(cfg))
        resume = any((Path(row["run_dir"]) / "checkpoints").glob("step-*"))
        cmd = [sys.executable, "-m", "lora_tune.cli", "train", str(config), *(["--resume"] if resume else [])]
        if not resume and Path(row["run_dir"]).exists():
            cmd.append("--overwrite")  # a run folder from a start that saved no checkpoint yet
        log = open(job_dir / "train.log", "a")  # noqa: SIM115 - handed to the worker, closed when it ends
        self._worker = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        log.close()
        self._running = jid
        self.store.update("jobs", jid, status="running", worker_pid=self._worker.pid)
        self.store.event(
            jid, "Fine-tuning job resumed from its last checkpoint" if resume else "Fine-tuning job started"
        )

    def _follow(self, jid: str) -> None:
        row = self.store.get("jobs", jid)
        self._read_metrics(row)
        code = self._worker.poll() if self._worker else 1
        if code is None:
            return
        self._worker, self._running = None, None
        row = self.store.get("jobs", jid)
        if row["status"] != "running":  # cancelled or paused: the worker was stopped on purpose
            return
        if code == 0 and (Path(row["run_dir"]) / "adapter" / "adapter_config.json").is_file():
            self.store.update("jobs", jid, status="succeeded", finished_at=_now(), fine_tuned_model=row["model_name"])
            self.store.event(jid, f"New fine-tuned model created: {row['model_name']}")
            self.store.event(jid, "The job has successfully completed")
        else:
            self._fail(jid, "training_failed", _last_error(Path(row["run_dir"]).parent / "train.log"), None)

    def _read_metrics(self, row: dict) -> None:
        """New lines of metrics.jsonl become metrics events; trained_tokens sums the run's steps.

        A resumed run first cuts metrics.jsonl back to its checkpoint's step; the steps it then trains
        again are reported again (they were trained twice), and counted once in trained_tokens.
        """
        rows = _metrics(Path(row["run_dir"]))
        seen = min(row["metrics_read"], len(rows))
        for m in rows[seen:]:
            if m.get("split") == "val":
                data = {
                    "step": m["step"],
                    "valid_loss": m["loss"],
                    "valid_mean_token_accuracy": m.get("token_accuracy"),
                }
                self.store.event(
                    row["id"], f"Step {m['step']}: validation loss={m['loss']:.4f}", type_="metrics", data=data
                )
            elif "loss" in m and "step" in m:
                data = {
                    "step": m["step"],
                    "train_loss": m["loss"],
                    "train_mean_token_accuracy": m.get("token_accuracy"),
                }
                self.store.event(
                    row["id"], f"Step {m['step']}: training loss={m['loss']:.4f}", type_="metrics", data=data
                )
        if len(rows) != row["metrics_read"]:
            tokens = sum(int(m.get("real_tokens") or 0) for m in rows if m.get("split") != "val")
            self.store.update("jobs", row["id"], metrics_read=len(rows), trained_tokens=tokens)

    def _fail(self, jid: str, code: str, message: str, param: str | None) -> None:
        self.store.update(
            "jobs", jid, status="failed", finished_at=_now(), error={"code": code, "message": message, "param": param}
        )
        self.store.event(jid, f"The job failed: {message}", level="error")

    def _stop_worker(self) -> None:
        """SIGTERM (the worker stops at once; its checkpoints stay), SIGKILL if it lingers."""
        worker = self._worker
        if worker is None or worker.poll() is not None:
            return
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=15)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def checkpoint_metrics(rows: list[dict], step: int) -> dict[str, Any]:
    """OpenAI's checkpoint metrics at `step`: the training row of that step and the validation at it
    (our validation covers the whole validation file, so `full_valid_*` are the same figures)."""
    train = next((m for m in reversed(rows) if m.get("split") != "val" and m.get("step") == step and "loss" in m), {})
    val = next((m for m in reversed(rows) if m.get("split") == "val" and m.get("step") == step), {})
    return {
        "step": step,
        "train_loss": train.get("loss"),
        "train_mean_token_accuracy": train.get("token_accuracy"),
        "valid_loss": val.get("loss"),
        "valid_mean_token_accuracy": val.get("token_accuracy"),
        "full_valid_loss": val.get("loss"),
        "full_valid_mean_token_accuracy": val.get("token_accuracy"),
    }


def _last_error(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
    errors = [x for x in lines if x.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    return lines[-1] if lines else "the training process ended without a message"


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel sends SIGKILL when the server dies (Linux)."""
    # not Linux: the worker outlives a killed server; a restarted server takes over its run lock
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def job_json(row: dict) -> dict[str, Any]:
    """A job in OpenAI's shape; once its files are validated, "auto" hyperparameters show their values."""
    hp = {k: row["hyperparameters"].get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    if row["status"] != "validating_files":
        hp = {k: AUTO[k] if v == "auto" else v for k, v in hp.items()}
    method = {"type": row["method"]["type"], row["method"]["type"]: {"hyperparameters": hp}}
    if row["method"]["type"] == "dpo":
        beta = row["hyperparameters"].get("beta", "auto")
        method["dpo"]["hyperparameters"]["beta"] = (
            AUTO["beta"] if beta == "auto" and row["status"] != "validating_files" else beta
        )
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "created_at": row["created_at"],
        "model": row["model"],
        "status": row["status"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "error": row["error"],
        "hyperparameters": hp,
        "method": method,
        "organization_id": "org-local",
        "result_files": [],
        "seed": row["seed"],
        "suffix": row["suffix"],
        "metadata": row["metadata"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "integrations": [],
        "estimated_finish": None,
    }


def file_json(row: dict) -> dict[str, Any]:
    status = "error" if row["problems"] else "processed"
    details = "; ".join(row["problems"][:3]) if row["problems"] else None
    return {
        "object": "file",
        "id": row["id"],
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": status,
        "status_details": details,
    }


def event_json(row: dict) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": row["data"] or {},
    }
