"""An inference record: one answered request, as a Bento spools it and the collector ships it.

A spool line is a JSON object with these keys (bento/provenance.py writes them):

    t           seconds since the epoch when the answer was made
    id          the request id (the client's X-Request-Id, or one the Bento made)
    pipeline    the pipeline, version   the model version that answered
    role        production | candidate | shadow (what Nginx told the Bento: X-Flywheel-Role)
    inputs      the rows (tables) or a per-image summary (images), as the model saw them
    predictions one per input row or image
    ms          time spent answering

Each replica writes `<spool>/<pipeline>/<replica>.jsonl`; the collector renames a file before
reading it (`.<stamp>.ship`), so a Bento's next flush starts a new one and nothing is read twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.settings import Settings

ROLES = ("production", "candidate", "shadow")
SHIPPING = ".ship"


@dataclass(frozen=True)
class Record:
    t: float
    id: str
    pipeline: str
    version: str
    role: str
    inputs: list
    predictions: list
    ms: float

    @classmethod
    def from_line(cls, line: str) -> Record | None:
        """A spool line, or None for one a killed Bento left half-written."""
        try:
            d = json.loads(line)
            return cls(
                float(d["t"]),
                str(d["id"]),
                str(d["pipeline"]),
                str(d["version"]),
                str(d.get("role") or "production"),
                list(d.get("inputs") or []),
                list(d["predictions"]),
                float(d.get("ms") or 0.0),
            )
        except (ValueError, KeyError, TypeError):
            return None


def spool_dir(settings: Settings) -> Path:
    return settings.inference_spool


def claim(folder: Path, settled_seconds: float = 1.0) -> list[Path]:
    """Spool files to ship: each live file is renamed first (its Bento's next flush starts a new one),
    then read once no write can still be in flight (a flush opens, appends and closes at once)."""
    now_ms = int(time.time() * 1000)
    claimed = []
    for path in sorted(folder.rglob("*.jsonl")):
        try:
            path.rename(path.with_name(f"{path.name}.{now_ms}{SHIPPING}"))
        except FileNotFoundError:
            continue
    for path in sorted(folder.rglob(f"*{SHIPPING}")):
        try:
            stamp_ms = int(path.name.removesuffix(SHIPPING).rsplit(".", 1)[-1])
        except ValueError:
            stamp_ms = 0
        if now_ms - stamp_ms >= settled_seconds * 1000:
            claimed.append(path)
    return claimed


def read(path: Path) -> tuple[list[Record], int]:
    """The records of a claimed spool file, and how many of its lines could not be read."""
    records, bad = [], 0
    with path.open(errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            record = Record.from_line(line)
            if record is None:
                bad += 1
            else:
                records.append(record)
    return records, bad


def parquet_table(records: list[Record]):
    """The records as an Arrow table: inputs and predictions as JSON text (their shape is the
    pipeline's), the rest typed. pyarrow is the ML environment's."""
    import pyarrow as pa

    return pa.table(
        {
            "time": pa.array([r.t for r in records], pa.float64()),
            "request_id": pa.array([r.id for r in records], pa.string()),
            "pipeline": pa.array([r.pipeline for r in records], pa.string()),
            "model_version": pa.array([r.version for r in records], pa.string()),
            "role": pa.array([r.role for r in records], pa.string()),
            "inputs": pa.array([json.dumps(r.inputs) for r in records], pa.string()),
            "predictions": pa.array([json.dumps(r.predictions) for r in records], pa.string()),
            "latency_ms": pa.array([r.ms for r in records], pa.float64()),
        }
    )
