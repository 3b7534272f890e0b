"""SQLite persistence of the registry (the coordinator's embedded default store).

One database file ``registry.sqlite3`` under the state directory, in WAL mode. Every ``put_*``
is one transaction, committed before it returns: a coordinator killed with SIGKILL at any point
reopens with every record whose call returned. ``synchronous=FULL`` (the default here) also
survives power loss; ``NORMAL`` survives process death only and is faster.

Records are plain JSON (``SnapshotReport.to_json``), never pickle. The store is safe to call
from several threads (one connection behind a lock).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Union

from recovery.model import SnapshotReport
from recovery.registry import Commit

__all__ = ["SqliteStore", "StoreError", "SCHEMA_VERSION", "DB_NAME"]

SCHEMA_VERSION = 1
DB_NAME = "registry.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    job TEXT NOT NULL, step INTEGER NOT NULL, rank INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job, step, rank));
CREATE TABLE IF NOT EXISTS commits (
    job TEXT NOT NULL, step INTEGER NOT NULL, manifest_key TEXT NOT NULL, PRIMARY KEY (job, step));
CREATE TABLE IF NOT EXISTS epochs (job TEXT PRIMARY KEY, generation INTEGER NOT NULL);
"""


class StoreError(RuntimeError):
    """The state directory holds a database this build cannot use."""


class SqliteStore:
    """``RegistryStore`` on SQLite under ``state_dir`` (created if missing)."""

    def __init__(self, state_dir: Union[str, Path], *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self.path = Path(state_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {row[0]}; this build reads {SCHEMA_VERSION} "
                             "(use a matching coordinator or a fresh --state-dir)")

    def _tx(self):
        return _Tx(self._db, self._lock)

    def load(self) -> tuple[list[SnapshotReport], list[tuple[str, Commit]], dict[str, int]]:
        with self._tx() as db:
            reports = [SnapshotReport.from_json(json.loads(b))
                       for (b,) in db.execute("SELECT body FROM reports ORDER BY job, step, rank")]
            commits = [(j, Commit(s, k)) for j, s, k in db.execute("SELECT job, step, manifest_key FROM commits ORDER BY job, step")]
            epochs = dict(db.execute("SELECT job, generation FROM epochs"))
        return reports, commits, epochs

    def put_report(self, report: SnapshotReport) -> None:
        body = json.dumps(report.to_json(), separators=(",", ":"))
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)", (report.job, report.step, report.rank, body))

    def put_commit(self, job: str, commit: Commit) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO commits VALUES (?, ?, ?)", (job, commit.step, commit.manifest_key))

    def forget_steps(self, job: str, steps: list[int]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM reports WHERE job = ? AND step = ?", [(job, s) for s in steps])

    def put_epoch(self, job: str, generation: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO epochs VALUES (?, ?) ON CONFLICT(job) DO UPDATE SET generation = "
                       "max(generation, excluded.generation)", (job, generation))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SqliteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tx:
    """``with``: hold the lock, BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, *_) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
