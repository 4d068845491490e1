"""The vote ledger: what makes a vote idempotent per (image, user), across requests, workers and restarts.

    ledger.record(image_id, voter, vote, event_id) -> (event_id, is_new)
    ledger.forget(image_id, voter, event_id)   # a recorded vote whose event could not be queued: undo it

A repeated identical vote returns the event id of the first one and is_new=False (nothing is emitted); a
changed vote (up, then down) is a new event. `SqliteLedger` is shared by all workers of a host through one
SQLite file (WAL mode, short transactions); `MemoryLedger` is for unit tests. Rows older than the feedback
token lifetime are pruned: a token that old is rejected before the ledger is asked.
"""

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

ANONYMOUS = "-"  # voter key of votes without a user id: one vote per image


class VoteLedger(Protocol):
    def record(self, image_id: str, voter: str, vote: str, event_id: str) -> tuple[str, bool]: ...

    def forget(self, image_id: str, voter: str, event_id: str) -> None:
        """Drop the row if it still holds `event_id`, so that the client's retry of that vote is new again."""


class MemoryLedger:
    def __init__(self):
        self._rows: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def record(self, image_id: str, voter: str, vote: str, event_id: str) -> tuple[str, bool]:
        with self._lock:
            previous = self._rows.get((image_id, voter))
            if previous is not None and previous[0] == vote:
                return previous[1], False
            self._rows[(image_id, voter)] = (vote, event_id)
            return event_id, True

    def forget(self, image_id: str, voter: str, event_id: str) -> None:
        with self._lock:
            if self._rows.get((image_id, voter), (None, None))[1] == event_id:
                del self._rows[(image_id, voter)]


class SqliteLedger:
    def __init__(self, path: Path, retention_s: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self._local = threading.local()  # one connection per thread: sqlite3 connections are not shared
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS votes (image_id TEXT NOT NULL, voter TEXT NOT NULL, "
                       "vote TEXT NOT NULL, event_id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (image_id, voter))")
            db.execute("CREATE INDEX IF NOT EXISTS votes_at ON votes (at)")
        self._last_prune = 0.0

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def record(self, image_id: str, voter: str, vote: str, event_id: str) -> tuple[str, bool]:
        db = self._connect()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")  # serializes writers across processes: check-then-write is atomic
        try:
            row = db.execute("SELECT vote, event_id FROM votes WHERE image_id = ? AND voter = ?",
                             (image_id, voter)).fetchone()
            if row is not None and row[0] == vote:
                db.execute("COMMIT")
                return row[1], False
            db.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?)", (image_id, voter, vote, event_id, now))
            if now - self._last_prune > 3600:
                self._last_prune = now
                db.execute("DELETE FROM votes WHERE at < ?", (now - self.retention_s,))
            db.execute("COMMIT")
            return event_id, True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def forget(self, image_id: str, voter: str, event_id: str) -> None:
        self._connect().execute("DELETE FROM votes WHERE image_id = ? AND voter = ? AND event_id = ?",
                                (image_id, voter, event_id))
