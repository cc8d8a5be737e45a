"""The history of generations: one SQLite file next to the outputs, so it survives restarts.

A job is written when it is accepted and again when it ends; a job found still
queued or running at start-up was cut short by a stop of the server, and is
marked failed with that reason (no job silently disappears).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS generations_created ON generations (created);
"""
JSON_COLUMNS = ("settings", "outputs", "warnings")


class History:
    """Thread-safe access to the ``generations`` table (one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute(
                "UPDATE generations SET status = 'failed', error = 'the server stopped before the job finished' "
                "WHERE status IN ('queued', 'running')"
            )

    def save(self, record: dict) -> None:
        row = {k: json.dumps(record[k]) if k in JSON_COLUMNS else record[k] for k in
               ("id", "created", "finished", "status", "settings", "outputs", "error", "warnings")}
        row["prompt"] = record["settings"]["prompt"]
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO generations (id, created, finished, status, prompt, settings, outputs, "
                "error, warnings) VALUES (:id, :created, :finished, :status, :prompt, :settings, :outputs, "
                ":error, :warnings)", row,
            )

    @staticmethod
    def _record(row: sqlite3.Row) -> dict:
        record = dict(row)
        del record["prompt"]  # it is in the settings
        for k in JSON_COLUMNS:
            record[k] = json.loads(record[k])
        return record

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM generations WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def search(self, text: str = "", limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """Newest first; ``text`` matches anywhere in the prompt (case-insensitive). Returns (page, total)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = "WHERE prompt LIKE ? ESCAPE '\\'"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM generations {where}", (pattern,)).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM generations {where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
                (pattern, limit, offset),
            ).fetchall()
        return [self._record(r) for r in rows], total

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM generations WHERE id = ?", (job_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
