"""Atomic checkpoints with everything needed for an exact resume.

A checkpoint folder is written under a temporary name and renamed into place, so a crash at any moment
leaves either the previous checkpoint or the new one, never half of one. Nothing is unpickled on load:
tensors come from safetensors or `torch.load(weights_only=True)`, the rest from JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_tune.atomic import replace_dir, sha256_of
from lora_tune.errors import LoraTuneError
from lora_tune.train.state import TrainState

PREFIX = "step-"


def rng_state(cuda=torch.cuda) -> dict[str, Any]:
    """Every random generator's state: Python's, NumPy's, torch's CPU one and each GPU's.

    `cuda` is torch.cuda; tests hand in a stand-in with the same three functions over CPU generators.
    """
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": cuda.get_rng_state_all() if cuda.is_available() else [],
    }


def rng_bytes() -> bytes:
    """`rng_state()` as the bytes of a `torch.save` file (what a checkpoint's rng.pt holds)."""
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    return buffer.getvalue()


def set_rng_state(state: dict[str, Any], cuda=torch.cuda, note=print) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    if saved and cuda.is_available():
        now = len(cuda.get_rng_state_all())
        if now != len(saved):
            kept = min(now, len(saved))
            note(f"note: {len(saved)} GPU random states saved, {now} GPU(s) now; restoring the first {kept}")
        cuda.set_rng_state_all(saved[:now] + cuda.get_rng_state_all()[len(saved) :])


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: `checkpoints/step-NNNNNN` (zero-padded, so names sort)."""
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def state_digest(saved: dict) -> str:
    """SHA-256 of a state.json's content without its own digest (key order does not matter)."""
    body = {k: v for k, v in saved.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def damage(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be trusted (a missing, truncated or changed file), or None.

    Each file's SHA-256 is in its state.json; checkpoints from before that was recorded are trusted.
    """
    try:
        saved = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    if ("sha256" in saved or "self_sha256" in saved) and state_digest(saved) != saved.get("self_sha256"):
        return "state.json does not match its SHA-256 (changed)"
    for name, digest in saved.get("sha256", {}).items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_of(path / name) != digest:
            return f"{name} does not match its SHA-256 (truncated or changed)"
    return None


def latest_good_checkpoint(run_dir: Path, note: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint. Damaged ones are reported and set aside as `.step-N.damaged`
    (kept for a look, never deleted), so the next save of that step and pruning skip them."""
    for path in reversed(list_checkpoints(run_dir)):
        why = damage(path)
        if why is None:
            return path
        aside = path.with_name(f".{path.name}.damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        note(f"checkpoint {path} is damaged: {why}; set aside as {aside.name}, using the one before it")
    return None


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    keep_last: int,
    protect: int | None = None,
    rngs: list[bytes] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `checkpoints/step-N/` (N = `state.step`) atomically, then delete all but the newest `keep_last`
    (and the checkpoint of step `protect`, the best evaluation's).

    `rngs` are the random states of every training process in rank order, as `rng_bytes` made them
    (default: this process's); rank 0's go to `rng.pt`, rank r's to `rng-rank{r}.pt`. `weights` and
    `optimizer_state` are given whole when the model is sharded (FSDP); by default they are read from
    `model` and `optimizer`.

    A failed write (disk full, no permission) removes the half-written folder, leaves every earlier
    checkpoint as it was, and raises an error that says so.
    """
    rngs = rngs or [rng_bytes()]
    final = checkpoint_dir(run_dir, state.step)
    root = final.parent
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        model.save_pretrained(tmp, state_dict=weights)  # adapter_model.safetensors + adapter_config.json
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        for rank, rng in enumerate(rngs):
            (tmp / rng_file(rank)).write_bytes(rng)
        digests = {f.name: sha256_of(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        saved = {**state.to_dict(), "sha256": digests}
        (tmp / "state.json").write_text(json.dumps({**saved, "self_sha256": state_digest(saved)}, indent=2))
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # re-saving a step (the final save right after a periodic one) replaces it
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise LoraTuneError(
            f"could not write checkpoint {final}: {e.strerror or e}; {kept}. Free disk space or fix the "
            "folder's permissions, then continue with --resume"
        ) from e
    keep = set(list_checkpoints(run_dir)[-keep_last:])
    for old in list_checkpoints(run_dir):
        if old not in keep and int(old.name.removeprefix(PREFIX)) != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> TrainState:
    """The `TrainState` saved in checkpoint folder `path` (no tensors are read)."""
    return TrainState.from_dict(json.loads((Path(path) / "state.json").read_text()))


def load_adapter_weights(path: Path, model) -> None:
    """Put the adapter weights saved in checkpoint folder `path` into `model`."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {path} has weights this model lacks: {unexpected[:3]}")


def rng_file(rank: int) -> str:
    """The file of rank `rank`'s random states in a checkpoint (`rng.pt`: rank 0, and a single process)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def load_checkpoint(
    path: Path, model, optimizer, scheduler, scaler, rank: int = 0, note=print, load_optimizer=None
) -> TrainState:
    """Restore adapter weights, optimizer, scheduler, scaler and this rank's RNG; return the saved state.

    Every rank restores the same weights and optimizer state (rank 0 saved them; DDP keeps them equal).
    With `load_optimizer` (FSDP: it shards the whole state it is given) the weights are not loaded here:
    they went into the model before it was sharded.
    """
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if load_optimizer is None:
        load_adapter_weights(path, model)
        optimizer.load_state_dict(optimizer_state)
    else:
        load_optimizer(optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    # every rank's file is there: a run resumes only on the number of processes it was saved from
    set_rng_state(torch.load(path / rng_file(rank), weights_only=True), note=note)
    return read_state(path)
