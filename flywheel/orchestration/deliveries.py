"""Which uploads the events bridge has already handled: MinIO tells it about each upload twice.

MinIO has two webhook targets for the bridge (platform/topology.py, docker-compose.yml):
- `FLYWHEEL_FAST` sends each notification as the upload lands, and drops it if the bridge does not
  take it;
- `FLYWHEEL` keeps each one in its queue dir on disk until the bridge answers 2xx. It replays that
  queue every 3 s (MinIO's `retryInterval`, a constant), so on its own it adds 0-3 s to every upload.

The first delivery that the bridge handles (forwarded, held, ignored or dead-lettered) is recorded
here; the other is answered without acting again. A delivery the bridge answers 503 (Airflow away)
is not recorded, so the queued copy is still handled when MinIO replays it. The record is a SQLite
file in the state folder, so a bridge restarted between the two deliveries still knows the first;
rows older than KEEP_SECONDS go.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flywheel.core.upload import Upload

KEEP_SECONDS = 24 * 3600.0  # the queued copy follows within seconds; a day covers a bridge down that long


def identity(upload: Upload) -> str:
    """One object version: by version id (the datasets bucket is versioned), else key and etag."""
    return f"{upload.bucket}/{upload.key}@{upload.version_id or upload.etag}"


class Deliveries:
    def __init__(self, path: Path, keep_seconds: float = KEEP_SECONDS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_seconds = keep_seconds
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS handled (upload TEXT PRIMARY KEY, at REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS handled_at ON handled (at)")
        self.lock = threading.Lock()  # the connection and the gates
        self.gates: dict[str, tuple[threading.Lock, int]] = {}  # upload -> (its lock, threads using it)

    def handled(self, upload_id: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM handled WHERE upload = ?", (upload_id,)).fetchone() is not None

    def _record(self, upload_id: str) -> None:
        now = time.time()
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO handled VALUES (?, ?)", (upload_id, now))
            self.db.execute("DELETE FROM handled WHERE at < ?", (now - self.keep_seconds,))

    @contextlib.contextmanager
    def first(self, upload: Upload) -> Iterator[bool]:
        """True for the delivery that should act on the upload; it is recorded as handled when the block
        ends without an exception. A second delivery arriving meanwhile waits for the first's outcome."""
        upload_id = identity(upload)
        with self.lock:
            gate, users = self.gates.get(upload_id, (threading.Lock(), 0))
            self.gates[upload_id] = (gate, users + 1)
        try:
            with gate:
                if self.handled(upload_id):
                    yield False
                    return
                yield True
                self._record(upload_id)
        finally:
            with self.lock:
                gate, users = self.gates[upload_id]
                if users == 1:
                    del self.gates[upload_id]
                else:
                    self.gates[upload_id] = (gate, users - 1)

    def count(self) -> int:
        with self.lock:
            return self.db.execute("SELECT count(*) FROM handled").fetchone()[0]
