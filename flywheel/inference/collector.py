"""Collector: the Bentos' spool into the index (every second), and the index into MinIO as Parquet.

At least once, never lost past a flush: a spool file is deleted only after its lines are in the
index (SQLite, on disk), and an index row is marked shipped only after the Parquet object holding
it is in MinIO. A crash between the two ships a row twice (same request id: readers deduplicate).
Objects: `s3://inference/<pipeline>/answers/date=YYYY-MM-DD/hour=HH/<first>-<n>.parquet`, and
`…/feedback/…` for labels joined to their answers (inputs, prediction, version): the labelled rows
a retraining can use.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from flywheel.clients import objectstore
from flywheel.core.settings import INFERENCE_BUCKET, Settings
from flywheel.inference import records
from flywheel.inference.store import Store

log = logging.getLogger("flywheel.inference")

BUCKET = INFERENCE_BUCKET
SHIP_ROWS = 50_000  # rows per Parquet object at most


@dataclass
class Counters:
    """What the service exports as flywheel_inference_* counters."""

    spooled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unreadable: int = 0
    shipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ship_errors: int = 0


# The service ingests from its loop and on demand (the live figures): one at a time, or two would
# claim the same file and one would find it deleted under it.
_INGESTING = threading.Lock()


def ingest(settings: Settings, store: Store, counters: Counters) -> int:
    """Claimed spool files into the index; each file deleted once its records are committed."""
    with _INGESTING:
        return _ingest(settings, store, counters)


def _ingest(settings: Settings, store: Store, counters: Counters) -> int:
    added = 0
    for path in records.claim(records.spool_dir(settings)):
        try:
            found, bad = records.read(path)
        except FileNotFoundError:  # taken by another process's ingest: its rows are in
            continue
        added += store.add_answers(found)
        for r in found:
            counters.spooled[r.pipeline] += 1
        counters.unreadable += bad
        path.unlink(missing_ok=True)
    return added


def dropped(settings: Settings) -> dict[str, int]:
    """Answers each pipeline's replicas could not spool, as they count them (`<replica>.dropped`)."""
    found: dict[str, int] = defaultdict(int)
    for path in records.spool_dir(settings).glob("*/*.dropped"):
        try:
            found[path.parent.name] += int(path.read_text() or 0)
        except (OSError, ValueError):
            continue
    return dict(found)


def _key(pipeline: str, kind: str, first: float, n: int) -> str:
    stamp = time.gmtime(first)
    return (
        f"{pipeline}/{kind}/date={time.strftime('%Y-%m-%d', stamp)}/hour={time.strftime('%H', stamp)}/"
        f"{time.strftime('%Y%m%dT%H%M%S', stamp)}-{n}-{uuid.uuid4().hex[:8]}.parquet"
    )


def _put_parquet(client, key: str, table) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    size = buffer.tell()
    buffer.seek(0)
    client.put_object(BUCKET, key, buffer, size, content_type="application/vnd.apache.parquet")


def ship(settings: Settings, store: Store, counters: Counters) -> dict[str, int]:
    """Unshipped answers and feedback into Parquet objects, one per pipeline and hour."""
    import pyarrow as pa

    client = objectstore.client(settings)
    shipped: dict[str, int] = defaultdict(int)
    rows = store.unshipped("answers", SHIP_ROWS)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for row in rows:
        pipeline, t = row[1], row[5]
        groups[(pipeline, time.strftime("%Y%m%d%H", time.gmtime(t)))].append(row)
    for (pipeline, _), group in groups.items():
        table = records.parquet_table(
            [
                records.Record(t, rid, p, v, role, json.loads(i), json.loads(pr), ms)
                for _, p, rid, role, v, t, i, pr, ms in group
            ]
        )
        _put_parquet(client, _key(pipeline, "answers", group[0][5], len(group)), table)
        store.mark_shipped("answers", [g[0] for g in group])
        shipped[pipeline] += len(group)
        counters.shipped[pipeline] += len(group)
    labelled = store.unshipped("feedback", SHIP_ROWS)
    by_pipeline: dict[str, list] = defaultdict(list)
    for row in labelled:
        by_pipeline[row[1]].append(row)
    for pipeline, group in by_pipeline.items():
        table = pa.table(
            {
                "request_id": pa.array([g[2] for g in group], pa.string()),
                "label": pa.array([g[3] for g in group], pa.string()),
                "feedback_time": pa.array([g[4] for g in group], pa.float64()),
                "model_version": pa.array([g[5] for g in group], pa.string()),
                "role": pa.array([g[6] for g in group], pa.string()),
                "inputs": pa.array([g[7] for g in group], pa.string()),
                "predictions": pa.array([g[8] for g in group], pa.string()),
            }
        )
        _put_parquet(client, _key(pipeline, "feedback", group[0][4], len(group)), table)
        store.mark_shipped("feedback", [g[0] for g in group])
    return dict(shipped)
