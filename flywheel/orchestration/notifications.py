"""Notifications: MinIO's bucket notifications (S3's event format) as the uploads they report (pure logic)."""

from __future__ import annotations

from urllib.parse import unquote_plus

from flywheel.core.upload import Upload, pipeline_of


def uploads(body: dict) -> list[Upload]:
    """Every object-created record of a notification, as an upload of the pipeline its folder names.

    Records of other event kinds and folder markers are dropped: they carry no dataset. A key
    outside any pipeline folder (at the bucket root) is kept with pipeline "": the bridge
    dead-letters it, so an upload to the wrong place is seen.
    """
    found = []
    for record in body.get("Records") or []:
        if not record.get("eventName", "").startswith("s3:ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        obj = s3.get("object") or {}
        key = unquote_plus(obj.get("key", ""))  # S3 notifications URL-encode keys
        if not key or key.endswith("/"):
            continue
        found.append(
            Upload(
                pipeline=pipeline_of(key),
                bucket=(s3.get("bucket") or {}).get("name", ""),
                key=key,
                etag=(obj.get("eTag") or "").strip('"'),
                version_id=obj.get("versionId") or "",
                size=int(obj.get("size", 0) or 0),
                event_time=record.get("eventTime", ""),
            )
        )
    return found
