"""The fine-tuning service's state in SQLite (stdlib): uploaded files, jobs and their events.

One connection, shared by the HTTP thread and the job scheduler under a lock; WAL journaling and a
commit per change, so a killed server loses nothing it had answered for.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, purpose TEXT NOT NULL, path TEXT NOT NULL,
    kind TEXT, examples INTEGER NOT NULL, problems TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    hyperparameters TEXT NOT NULL, method TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL,
    metadata TEXT, overrides TEXT NOT NULL, model_name TEXT NOT NULL, fine_tuned_model TEXT,
    error TEXT, finished_at INTEGER, trained_tokens INTEGER, run_dir TEXT NOT NULL, worker_pid INTEGER,
    metrics_read INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_of_job ON events (job_id, seq);
"""
JSON_COLUMNS = {"hyperparameters", "method", "metadata", "overrides", "error", "problems", "data"}


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            {k: (json.loads(r[k]) if k in JSON_COLUMNS and r[k] is not None else r[k]) for k in r.keys()}  # noqa: SIM118 - a Row iterates values
            for r in rows
        ]

    def _write(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def insert(self, table: str, row: dict[str, Any]) -> None:
        cols = list(row)
        values = tuple(json.dumps(row[c]) if c in JSON_COLUMNS and row[c] is not None else row[c] for c in cols)
        self._write(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)

    def update(self, table: str, id_: str, **changes: Any) -> None:
        cols = list(changes)
        values = tuple(
            json.dumps(changes[c]) if c in JSON_COLUMNS and changes[c] is not None else changes[c] for c in cols
        )
        self._write(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?", (*values, id_))

    def get(self, table: str, id_: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT * FROM {table} WHERE id = ?", (id_,))
        return rows[0] if rows else None

    def page(self, table: str, after: str | None, limit: int, where: str = "", args: tuple = ()) -> tuple[list, bool]:
        """Newest first, starting after the row with id `after`; returns (rows, has_more)."""
        cond = [where] if where else []
        if after:
            cond.append(f"seq < (SELECT seq FROM {table} WHERE id = ?)")
            args = (*args, after)
        sql = f"SELECT * FROM {table} {'WHERE ' + ' AND '.join(cond) if cond else ''} ORDER BY seq DESC LIMIT ?"
        rows = self._rows(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def all(self, table: str, where: str = "", args: tuple = ()) -> list[dict[str, Any]]:
        return self._rows(f"SELECT * FROM {table} {'WHERE ' + where if where else ''} ORDER BY seq", args)

    def delete(self, table: str, id_: str) -> None:
        self._write(f"DELETE FROM {table} WHERE id = ?", (id_,))

    def event(self, job_id: str, message: str, level: str = "info", type_: str = "message", data=None) -> None:
        import uuid

        row = {
            "id": f"ftevent-{uuid.uuid4().hex[:24]}",
            "job_id": job_id,
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": type_,
            "data": data,
        }
        self.insert("events", row)
