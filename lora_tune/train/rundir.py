"""The run folder: what counts as one, the lock that keeps a second process out, and safe clearing.

A user's folder is never deleted. `--overwrite` empties a folder only when it holds a lora_tune run
(`config.yaml` beside `metrics.jsonl` or `checkpoints/`), and keeps the folder itself.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_tune.errors import LoraTuneError

LOCK = ".lock"


def is_run_dir(path: Path) -> bool:
    """A lora_tune run folder: its config.yaml, and metrics.jsonl or checkpoints/."""
    path = Path(path)
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir())


@contextmanager
def run_lock(run_dir: Path, note: Callable[[str], None] = print) -> Iterator[None]:
    """Hold `<run_dir>/.lock` while training, so two processes never train into one folder.

    The lock is an flock (the system drops it when its process dies, even on SIGKILL), and the file
    names the holder's pid. A lock file left by a dead process is taken over with a note.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise LoraTuneError(
            f"{run_dir} is in use by a lora-tune run ({holder}); wait for it to finish, or use another output_dir"
        ) from None
    old = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if old:  # a holder removes the file when it ends; one that died left it (its flock went with it)
        note(f"note: taking over the lock of a run that is no longer running ({old})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def check_overwritable(run_dir: Path) -> list[Path]:
    """What `--overwrite` would delete in `run_dir`; refuses, naming it, a folder that is not a lora_tune run
    (it may hold the user's own files)."""
    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
    if entries and not is_run_dir(run_dir):
        raise LoraTuneError(
            f"refusing to overwrite {run_dir.resolve()}: it is not a lora_tune run folder (no config.yaml with "
            "metrics.jsonl or checkpoints/), so its files may be yours. Set output_dir to a new or empty folder"
        )
    return entries


def clear_run_dir(run_dir: Path) -> None:
    """Empty a lora_tune run folder for `--overwrite` (keeping the folder and the lock we hold)."""
    for p in check_overwritable(run_dir):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_fresh_dir(run_dir: Path) -> None:
    """A new run may start in a missing or empty folder, or one that only holds an unfinished run's files;
    never over a user's own `config.yaml`."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file() and not is_run_dir(run_dir):
        raise LoraTuneError(
            f"{run_dir.resolve()} holds a config.yaml that is not a lora_tune run's; starting there would "
            "overwrite it. Set output_dir to a new folder"
        )
