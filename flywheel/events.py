"""Events: turn a MinIO bucket notification into dataset asset events (pure logic)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from urllib.parse import unquote_plus


@dataclass(frozen=True)
class DatasetEvent:
    """One uploaded object version, as carried in the extra of an `s3://datasets/<pipeline>` event."""

    pipeline: str
    bucket: str
    key: str
    etag: str
    version_id: str
    size: int
    event_time: str
    event_name: str

    @property
    def asset_uri(self) -> str:
        return f"s3://{self.bucket}/{self.pipeline}"

    def extra(self) -> dict:
        return asdict(self)


def pipeline_of(key: str) -> str | None:
    """`iris/2026/x.csv` belongs to pipeline `iris`; a key at the bucket root belongs to none."""
    head, sep, rest = key.partition("/")
    return head if sep and head and rest else None


def from_notification(body: dict) -> list[DatasetEvent]:
    """Every object-created record of a MinIO (S3-style) notification, mapped to its pipeline.

    Records for other event kinds and folder markers are dropped: they carry no dataset. A key
    outside any pipeline folder (at the bucket root) is kept with pipeline "": the bridge
    dead-letters it, so an upload to the wrong place is seen.
    """
    events = []
    for record in body.get("Records") or []:
        name = record.get("eventName", "")
        if not name.startswith("s3:ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        obj = s3.get("object") or {}
        key = unquote_plus(obj.get("key", ""))  # S3 notifications URL-encode keys
        if not key or key.endswith("/"):
            continue
        pipeline = pipeline_of(key) or ""
        events.append(
            DatasetEvent(
                pipeline=pipeline,
                bucket=(s3.get("bucket") or {}).get("name", ""),
                key=key,
                etag=obj.get("eTag", ""),
                version_id=obj.get("versionId", "") or "",
                size=int(obj.get("size", 0) or 0),
                event_time=record.get("eventTime", ""),
                event_name=name,
            )
        )
    return events
