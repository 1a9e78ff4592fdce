"""The results store: one SQLite file (standard library) beside the images, keyed by (prompt, seed, method,
settings hash).

Tables:
  settings  hash -> the method's name, description, graph template and the run settings it shares (base_hash:
            the report pairs methods of the same base)
  jobs      one row per (prompt, seed, method, settings_hash): state pending | sent | done | failed, where it
            was sent (backend, remote prompt id), the image's path (relative to the store's folder), the
            attention metrics' JSON, the error of a failed job
  metrics   (job, name) -> value: the per-image numbers
  runs      every send of a job: backend, remote id, when, and how it ended (done, failed, interrupted, lost,
            released, resent); a job is done by exactly one of them
  meta      key -> value (the CLIP model the clip_* metrics were computed with)

A job is marked `sent` (with its remote prompt id) before it is sent, so a run that dies can tell on its next
start which jobs a server may still hold. Every write is one transaction; a lock serialises the threads.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    hash TEXT PRIMARY KEY, method TEXT NOT NULL, description TEXT, template TEXT NOT NULL,
    base TEXT NOT NULL, base_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL, settings_hash TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '', subjects TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending', backend TEXT, remote_id TEXT, sent_at REAL,
    image TEXT, attention TEXT, error TEXT, seconds REAL, finished_at REAL,
    UNIQUE (prompt, seed, method, settings_hash));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL REFERENCES jobs (id), name TEXT NOT NULL, value REAL, PRIMARY KEY (job_id, name));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs (id), backend TEXT NOT NULL,
    remote_id TEXT, sent_at REAL NOT NULL, ended_at REAL, outcome TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
STORE_FILE = "bench.sqlite"


@dataclass
class JobRow:
    id: int
    prompt: str
    seed: int
    method: str
    settings_hash: str
    category: str
    subjects: str
    state: str
    backend: str | None
    remote_id: str | None
    image: str | None
    error: str | None

    @property
    def label(self) -> str:
        return f"{self.prompt!r} seed {self.seed} {self.method}"


_JOB_COLUMNS = "id, prompt, seed, method, settings_hash, category, subjects, state, backend, remote_id, image, error"


class Store:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STORE_FILE
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements: list[tuple[str, tuple]]):
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    cursor.execute(sql, args)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            return cursor

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ settings and jobs

    def add_settings(self, method) -> None:
        self._write([("INSERT OR IGNORE INTO settings (hash, method, description, template, base, base_hash, "
                      "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (method.settings_hash, method.name, method.description,
                       json.dumps({"template": method.template, "slots": method.slots, "image": method.image_node,
                                   "metrics": method.metrics_node}, sort_keys=True),
                       json.dumps(method.base, sort_keys=True), method.base_hash, time.time()))])

    def add_jobs(self, rows: list[tuple[str, int, str, str, str, str]]) -> None:
        """rows: (prompt, seed, method, settings_hash, category, subjects); existing jobs are kept as they are."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO jobs (prompt, seed, method, settings_hash, category, "
                                 "subjects) VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def jobs(self, where: str = "1", args: tuple = ()) -> list[JobRow]:
        return [JobRow(*row) for row in self.query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY id",
                                                   args)]

    def job(self, job_id: int) -> JobRow:
        return self.jobs("id = ?", (job_id,))[0]

    def find(self, prompt: str, seed: int, method: str, settings_hash: str) -> JobRow | None:
        rows = self.jobs("prompt = ? AND seed = ? AND method = ? AND settings_hash = ?",
                         (prompt, seed, method, settings_hash))
        return rows[0] if rows else None

    # ------------------------------------------------------------ a job's life

    def mark_sent(self, job_id: int, backend: str, remote_id: str) -> None:
        now = time.time()
        self._write([("UPDATE jobs SET state = 'sent', backend = ?, remote_id = ?, sent_at = ?, error = NULL "
                      "WHERE id = ?", (backend, remote_id, now, job_id)),
                     ("INSERT INTO runs (job_id, backend, remote_id, sent_at) VALUES (?, ?, ?, ?)",
                      (job_id, backend, remote_id, now))])

    def _end_run(self, job_id: int, remote_id: str | None, outcome: str, message: str | None):
        return ("UPDATE runs SET ended_at = ?, outcome = ?, message = ? WHERE job_id = ? AND remote_id IS ? AND "
                "ended_at IS NULL", (time.time(), outcome, message, job_id, remote_id))

    def mark_done(self, job_id: int, remote_id: str | None, image: str, metrics: dict[str, float],
                  attention: dict | None, seconds: float | None) -> bool:
        """Records a finished job; False (and nothing changed) if the job was already done."""
        with self._lock:
            if self.query("SELECT state FROM jobs WHERE id = ?", (job_id,))[0][0] == "done":
                self._write([self._end_run(job_id, remote_id, "duplicate", "already done")])
                return False
            statements = [("UPDATE jobs SET state = 'done', image = ?, attention = ?, error = NULL, seconds = ?, "
                           "finished_at = ? WHERE id = ?",
                           (image, None if attention is None else json.dumps(attention), seconds, time.time(),
                            job_id)),
                          self._end_run(job_id, remote_id, "done", None)]
            statements += [("INSERT OR REPLACE INTO metrics (job_id, name, value) VALUES (?, ?, ?)",
                            (job_id, name, value)) for name, value in metrics.items()]
            self._write(statements)
            return True

    def mark_failed(self, job_id: int, remote_id: str | None, error: str) -> None:
        self._write([("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ? AND state != 'done'",
                      (error, time.time(), job_id)),
                     self._end_run(job_id, remote_id, "failed", error)])

    def mark_pending(self, job_id: int, remote_id: str | None, outcome: str, message: str | None = None) -> None:
        """The job goes back to be sent again (interrupted, lost with its server, released to another server)."""
        self._write([("UPDATE jobs SET state = 'pending', backend = NULL, remote_id = NULL WHERE id = ? AND "
                      "state = 'sent' AND remote_id IS ?", (job_id, remote_id)),
                     self._end_run(job_id, remote_id, outcome, message)])

    def set_metrics(self, job_id: int, metrics: dict[str, float]) -> None:
        self._write([("INSERT OR REPLACE INTO metrics (job_id, name, value) VALUES (?, ?, ?)", (job_id, n, v))
                     for n, v in metrics.items()])

    def delete_metrics(self, prefix: str) -> None:
        self._write([("DELETE FROM metrics WHERE name LIKE ?", (prefix + "%",))])

    def metrics(self, job_id: int) -> dict[str, float]:
        return dict(self.query("SELECT name, value FROM metrics WHERE job_id = ?", (job_id,)))

    def get_meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))])

    def counts(self, job_ids: list[int] | None = None) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state") if job_ids is None else [
            (state, count) for state, count in self.query(
                f"SELECT state, COUNT(*) FROM jobs WHERE id IN ({','.join(map(str, job_ids)) or 'NULL'}) "
                "GROUP BY state")]
        return dict(rows)
