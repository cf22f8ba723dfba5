"""Parked uploads: what the events bridge could not hand to Airflow, kept with the reason, one private file each.

MinIO retries a notification, one at a time, ahead of every later upload, until the bridge answers
2xx: an event that cannot go to Airflow now must be acknowledged and kept, or it blocks the queue.

- **Dead letters** (`deadletter/`): what no retry can deliver (a folder no pipeline owns, an Airflow
  4xx). They stay until a person replays or drops them (`flywheel deadletter`); `flywheel status`
  counts them, the bridge exports the count, and an alert fires while any is there.
- **Held** (`held/`): uploads of a pipeline whose file does not load, or whose DAG Airflow has not
  parsed yet. The bridge hands them to Airflow by itself as soon as it can, so the newest one trains.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.settings import Settings, write_private


@dataclass(frozen=True)
class Parked:
    name: str  # the state folder's subfolder
    by_reason: bool  # one file per upload and reason (dead letters), or per upload (held)

    def folder(self, settings: Settings) -> Path:
        return settings.state / self.name

    def write(self, settings: Settings, reason: str, upload: dict, record: dict | None = None) -> Path:
        """Keep an upload; the same one written twice (MinIO may deliver twice) is one file."""
        target = self.folder(settings)
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = [upload.get("key"), upload.get("version_id"), upload.get("etag")] + ([reason] if self.by_reason else [])
        digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]
        existing = next(target.glob(f"*-{digest}.json"), None)
        if existing is not None:
            return existing
        received = datetime.datetime.now(datetime.UTC)
        path = target / f"{received:%Y%m%dT%H%M%S}-{digest}.json"
        entry = {"received_at": received.isoformat(), "reason": reason, "upload": upload, "record": record}
        write_private(path, json.dumps(entry, indent=1))
        return path

    def read_all(self, settings: Settings) -> list[dict]:
        """Every one kept, oldest first, with its `id` (the file's name) and `file`."""
        found = []
        for path in sorted(self.folder(settings).glob("*.json")):
            try:
                found.append({**json.loads(path.read_text()), "id": path.stem, "file": str(path)})
            except (OSError, ValueError):
                continue
        return found

    def remove(self, settings: Settings, entry_id: str) -> bool:
        path = self.folder(settings) / f"{entry_id}.json"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def count(self, settings: Settings) -> int:
        return sum(1 for _ in self.folder(settings).glob("*.json"))


DEAD_LETTERS = Parked("deadletter", by_reason=True)
HELD = Parked("held", by_reason=False)
