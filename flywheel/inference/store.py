"""The inference index: recent answers by request id, and the feedback joined to them (SQLite).

The collector inserts what the Bentos spooled (idempotent: a record shipped twice is one row), the
feedback endpoint matches labels to answers, and the live figures per version and role are
computed here. Rows also wait here, durably, until they are in a Parquet object in MinIO
(`shipped`). Retention: shipped rows past `keep_hours` go, and the oldest shipped rows go first
whenever a pipeline holds more than `max_rows`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from flywheel.core import scores
from flywheel.inference.records import Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    pipeline TEXT NOT NULL, request_id TEXT NOT NULL, role TEXT NOT NULL, version TEXT NOT NULL,
    t REAL NOT NULL, inputs TEXT NOT NULL, predictions TEXT NOT NULL, ms REAL NOT NULL,
    shipped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, request_id, role)
);
CREATE INDEX IF NOT EXISTS answers_by_time ON answers (pipeline, t);
CREATE INDEX IF NOT EXISTS answers_to_ship ON answers (shipped, pipeline);
CREATE TABLE IF NOT EXISTS feedback (
    pipeline TEXT NOT NULL, request_id TEXT NOT NULL, label TEXT NOT NULL, t REAL NOT NULL,
    shipped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, request_id)
);
CREATE INDEX IF NOT EXISTS feedback_to_ship ON feedback (shipped, pipeline);
CREATE TABLE IF NOT EXISTS drift (
    pipeline TEXT PRIMARY KEY, t REAL NOT NULL, result TEXT NOT NULL
);
"""


class Store:
    """One SQLite file, one connection, used from the service's threads under a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    # --- answers ------------------------------------------------------------------------------------

    def add_answers(self, records: Iterable[Record]) -> int:
        rows = [
            (r.pipeline, r.id, r.role, r.version, r.t, json.dumps(r.inputs), json.dumps(r.predictions), r.ms)
            for r in records
        ]
        with self.lock:
            before = self.db.total_changes
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO answers (pipeline, request_id, role, version, t, inputs, predictions, ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.db.execute("COMMIT")
            return self.db.total_changes - before

    def answers(self, pipeline: str, request_ids: list[str]) -> dict[str, dict]:
        """What was answered to clients (production or candidate, never a shadow copy), by request id."""
        found: dict[str, dict] = {}
        with self.lock:
            for chunk in range(0, len(request_ids), 500):
                ids = request_ids[chunk : chunk + 500]
                marks = ",".join("?" * len(ids))
                for rid, role, version, predictions, t in self.db.execute(
                    f"SELECT request_id, role, version, predictions, t FROM answers WHERE pipeline = ? "
                    f"AND role != 'shadow' AND request_id IN ({marks})",
                    (pipeline, *ids),
                ):
                    found[rid] = {"role": role, "version": version, "predictions": json.loads(predictions), "t": t}
        return found

    # --- feedback ---------------------------------------------------------------------------------------

    def add_feedback(self, pipeline: str, labels: dict[str, list]) -> int:
        """Labels by request id (one per prediction); a second label for the same answer replaces the first."""
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO feedback (pipeline, request_id, label, t) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (pipeline, request_id) DO UPDATE SET label = excluded.label, t = excluded.t, shipped = 0",
                [(pipeline, rid, json.dumps(label), now) for rid, label in labels.items()],
            )
            self.db.execute("COMMIT")
        return len(labels)

    def live(self, pipeline: str, metric: str, since: float) -> dict:
        """Per version and role since `since`: answers, labelled answers and the live score on them; and
        for shadow copies, how often the candidate's answer differed from production's on the same request."""
        out: dict[str, dict] = {}
        with self.lock:
            counts = self.db.execute(
                "SELECT version, role, COUNT(*) FROM answers WHERE pipeline = ? AND t >= ? GROUP BY version, role",
                (pipeline, since),
            ).fetchall()
            labelled = self.db.execute(
                "SELECT a.version, a.role, a.predictions, f.label FROM answers a JOIN feedback f "
                "ON f.pipeline = a.pipeline AND f.request_id = a.request_id "
                "WHERE a.pipeline = ? AND a.t >= ? AND a.role != 'shadow'",
                (pipeline, since),
            ).fetchall()
            pairs = self.db.execute(
                "SELECT p.predictions, s.predictions, s.version FROM answers s JOIN answers p "
                "ON p.pipeline = s.pipeline AND p.request_id = s.request_id AND p.role = 'production' "
                "WHERE s.pipeline = ? AND s.role = 'shadow' AND s.t >= ?",
                (pipeline, since),
            ).fetchall()
        for version, role, n in counts:
            out.setdefault(version, {})[role] = {"answers": n, "labelled": 0, "rows": 0, "score": None}
        joined: dict[tuple[str, str], tuple[list, list]] = {}
        for version, role, predictions, label in labelled:
            predicted, truth = json.loads(predictions), json.loads(label)
            if len(predicted) != len(truth):
                continue
            p, t = joined.setdefault((version, role), ([], []))
            p.extend(predicted)
            t.extend(truth)
            out[version][role]["labelled"] += 1
        for (version, role), (predicted, truth) in joined.items():
            losses = [row_loss(metric, p, t) for p, t in zip(predicted, truth)]
            mean = sum(losses) / len(losses) if losses else 0.0
            out[version][role].update(
                rows=len(truth),
                score=scores.score(metric, predicted, truth) if truth else None,
                loss_mean=mean,
                loss_var=sum((x - mean) ** 2 for x in losses) / (len(losses) - 1) if len(losses) > 1 else 0.0,
            )
        return {"versions": out, "shadow": shadow_figures(pairs, metric), "metric": metric, "since": since}

    def answered(self, pipeline: str, since: float) -> int:
        """Answers to clients (not shadow copies) since `since`: whether a monitoring window is worth reading."""
        with self.lock:
            (n,) = self.db.execute(
                "SELECT COUNT(*) FROM answers WHERE pipeline = ? AND t >= ? AND role != 'shadow'", (pipeline, since)
            ).fetchone()
        return int(n)

    # --- drift (the monitor's last verdict per pipeline: one row each) -------------------------------

    def set_drift(self, pipeline: str, result: dict) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO drift (pipeline, t, result) VALUES (?, ?, ?) ON CONFLICT (pipeline) "
                "DO UPDATE SET t = excluded.t, result = excluded.result",
                (pipeline, time.time(), json.dumps(result)),
            )

    def drift(self) -> dict[str, dict]:
        with self.lock:
            rows = self.db.execute("SELECT pipeline, t, result FROM drift").fetchall()
        return {p: {**json.loads(result), "recorded": t} for p, t, result in rows}

    # --- shipping and retention -------------------------------------------------------------------------

    def unshipped(self, table: str, limit: int) -> list[tuple]:
        query = {
            "answers": "SELECT rowid, pipeline, request_id, role, version, t, inputs, predictions, ms FROM answers "
            "WHERE shipped = 0 ORDER BY rowid LIMIT ?",
            "feedback": "SELECT f.rowid, f.pipeline, f.request_id, f.label, f.t, a.version, a.role, a.inputs, "
            "a.predictions FROM feedback f LEFT JOIN answers a ON a.pipeline = f.pipeline "
            "AND a.request_id = f.request_id AND a.role != 'shadow' WHERE f.shipped = 0 ORDER BY f.rowid LIMIT ?",
        }[table]
        with self.lock:
            return self.db.execute(query, (limit,)).fetchall()

    def mark_shipped(self, table: str, rowids: list[int]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany(f"UPDATE {table} SET shipped = 1 WHERE rowid = ?", [(r,) for r in rowids])
            self.db.execute("COMMIT")

    def prune(self, keep_hours: float, max_rows: int) -> int:
        """Shipped rows past their age, then the oldest shipped rows of a pipeline over its cap."""
        cutoff = time.time() - keep_hours * 3600
        with self.lock:
            before = self.db.total_changes
            self.db.execute("DELETE FROM answers WHERE shipped = 1 AND t < ?", (cutoff,))
            self.db.execute("DELETE FROM feedback WHERE shipped = 1 AND t < ?", (cutoff,))
            for (pipeline,) in self.db.execute("SELECT DISTINCT pipeline FROM answers").fetchall():
                self.db.execute(
                    "DELETE FROM answers WHERE rowid IN (SELECT rowid FROM answers WHERE pipeline = ? AND shipped = 1 "
                    "ORDER BY t DESC LIMIT -1 OFFSET ?)",
                    (pipeline, max_rows),
                )
            return self.db.total_changes - before

    def counts(self) -> dict[str, dict[str, int]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT pipeline, COUNT(*), SUM(shipped = 0) FROM answers GROUP BY pipeline"
            ).fetchall()
            fb = dict(self.db.execute("SELECT pipeline, COUNT(*) FROM feedback GROUP BY pipeline").fetchall())
        return {p: {"answers": n, "unshipped": int(u or 0), "feedback": fb.get(p, 0)} for p, n, u in rows}


def row_loss(metric: str, predicted, truth) -> float:
    """One row's loss, for the A/B test: 0/1 for accuracy, the squared error (absolute for mae) for the rest."""
    if metric == "accuracy":
        return float(str(predicted) != str(truth))
    error = float(predicted) - float(truth)
    return abs(error) if metric == "mae" else error * error


def shadow_figures(pairs: list[tuple], metric: str) -> dict:
    """How often a shadow copy's answer differed from production's on the same request: labels that
    differ (classification), or values more than 10 % apart (regression)."""
    rows = differing = 0
    versions = set()
    for production, shadow, version in pairs:
        p, s = json.loads(production), json.loads(shadow)
        versions.add(version)
        for a, b in zip(p, s):
            rows += 1
            if metric == "accuracy":
                differing += str(a) != str(b)
            else:
                differing += abs(float(a) - float(b)) > 0.1 * max(abs(float(a)), 1e-9)
    return {
        "requests": len(pairs),
        "rows": rows,
        "disagreement": differing / rows if rows else None,
        "versions": sorted(versions),
    }
