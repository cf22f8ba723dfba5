"""Dead letters: uploads the events bridge could never hand to Airflow, kept with the reason.

A notification that no retry can deliver (a prefix no pipeline owns, an Airflow 4xx) is acknowledged
to MinIO, or it would be retried forever, one event at a time, ahead of every later upload. It is
written here instead, one JSON file per upload in the state folder, so nothing is silently dropped:
`flywheel status` counts them and the bridge exports the count as a metric.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from flywheel.core.settings import Settings, write_private


def folder(settings: Settings) -> Path:
    return settings.state / "deadletter"


def write(settings: Settings, reason: str, upload: dict, record: dict | None = None) -> Path:
    """Keep one dead letter; the same upload and reason written twice is one file."""
    target = folder(settings)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = json.dumps([upload.get("key"), upload.get("version_id"), upload.get("etag"), reason])
    received = datetime.datetime.now(datetime.UTC)
    path = target / f"{received:%Y%m%dT%H%M%S}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.json"
    if any(target.glob(f"*-{path.name.split('-', 1)[1]}")):
        return path
    letter = {"received_at": received.isoformat(), "reason": reason, "upload": upload, "record": record}
    write_private(path, json.dumps(letter, indent=1))
    return path


def read_all(settings: Settings) -> list[dict]:
    """Every dead letter, oldest first."""
    letters = []
    for path in sorted(folder(settings).glob("*.json")):
        try:
            letters.append({**json.loads(path.read_text()), "file": str(path)})
        except (OSError, ValueError):
            continue
    return letters


def count(settings: Settings) -> int:
    return sum(1 for _ in folder(settings).glob("*.json"))
