"""Derive (a step): a training set from what production saw, as a new upload under `datasets/<p>/feedback/`.

`python -m flywheel.inference.derive --args '{"pipeline": "iris", "reason": "drift in petal_length"}'`

The serving version's own upload (what it learned from) plus every labelled answer since that upload
(the feedback Parquet in `s3://inference/<p>/feedback/…`: the answer's inputs, the label a client
sent), deduplicated by request id (the newest label wins), in the pipeline's format. The object
carries its provenance as metadata (the base upload, the feedback window, the rows, why), and MinIO
reports it like any upload: validation, training, the offline gate and the live rollout take it
from there, with nothing skipped. Tables only (an image's log keeps a summary, not its pixels).
"""

from __future__ import annotations

import datetime
import io
import json
import sys
import time
from urllib.parse import quote

from flywheel.clients import objectstore
from flywheel.clients.tracking import client as tracking_client
from flywheel.core import pipelines, schema, steps
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import INFERENCE_BUCKET, Settings
from flywheel.inference.monitor import serving_version

FOLDER = "feedback/"  # under the pipeline's dataset prefix: the ML identity may write only there


def labelled(settings: Settings, pipeline: Pipeline, since: float) -> tuple[list[list], list, int]:
    """Feature rows and labels of the answers labelled after `since`, one per request id (the newest label)."""
    import pyarrow.parquet as pq

    client = objectstore.client(settings)
    newest: dict[str, dict] = {}
    # An object sits in the hour of its first row: one an hour earlier may hold later rows.
    first_hour = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(since - 3600))
    for obj in client.list_objects(INFERENCE_BUCKET, prefix=f"{pipeline.name}/feedback/", recursive=True):
        partition = "/".join(obj.object_name.split("/")[2:4])
        if partition < first_hour:
            continue
        response = client.get_object(INFERENCE_BUCKET, obj.object_name)
        try:
            rows = pq.read_table(io.BytesIO(response.read())).to_pylist()
        finally:
            response.close()
            response.release_conn()
        for row in rows:
            if row["feedback_time"] < since or not row.get("inputs"):
                continue  # older, or its answer had left the index before the label came
            kept = newest.get(row["request_id"])
            if kept is None or row["feedback_time"] > kept["feedback_time"]:
                newest[row["request_id"]] = row
    x, y = [], []
    for row in newest.values():
        inputs, labels = json.loads(row["inputs"]), json.loads(row["label"])
        for values, label in zip(inputs, labels):
            if isinstance(values, list) and len(values) == len(pipeline.features):
                x.append(values)
                y.append(label)
    return x, y, len(newest)


def base_time(settings: Settings, base) -> float:
    """Where the base's labels end: a derived set's own feedback window, else when it was uploaded."""
    stat = objectstore.client(settings).stat_object(base.bucket, base.key, version_id=base.version_id or None)
    meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
    until = meta.get("x-amz-meta-flywheel-feedback-until")
    if until:
        return datetime.datetime.fromisoformat(until).timestamp()
    return stat.last_modified.timestamp()


def derive(pipeline: str, reason: str = "", monitor_run: str = "") -> dict:
    """The serving version's upload plus the labelled answers since it, written as a new upload."""
    import pandas as pd

    settings = Settings.load()
    spec = pipelines.get(settings.pipelines_dir, pipeline)
    if spec.is_image:
        raise ValueError(f"{pipeline}: feedback retraining is for tables (the log keeps image summaries)")
    client = tracking_client()
    mv = serving_version(client, spec)
    if mv is None:
        return {"written": False, "reason": "nothing serves yet: no upload to extend"}
    base = schema.VersionRecord.from_mlflow(spec.name, mv.version, mv.run_id, dict(mv.tags)).upload
    if base is None:
        return {"written": False, "reason": f"v{mv.version} names no upload"}
    since = base_time(settings, base)
    until = time.time()
    x, y, requests = labelled(settings, spec, since)
    if not y:
        return {"written": False, "reason": f"no labelled answers since {base.key} (v{mv.version}'s upload)"}
    raw = objectstore.fetch(settings, base)
    frame = pd.read_csv(io.BytesIO(raw)) if spec.format == "csv" else pd.read_parquet(io.BytesIO(raw))
    columns = [*spec.features, spec.target]
    extra = pd.DataFrame(x, columns=list(spec.features))
    extra[spec.target] = y
    try:  # labels as the upload has them (a Parquet column holds one type)
        extra[spec.target] = extra[spec.target].astype(frame[spec.target].dtype)
    except (TypeError, ValueError):
        extra[spec.target] = extra[spec.target].astype(str)
        frame[spec.target] = frame[spec.target].astype(str)
    derived = pd.concat([frame[columns], extra[columns]], ignore_index=True)
    buffer = io.BytesIO()
    if spec.format == "csv":
        derived.to_csv(buffer, index=False)
    else:
        derived.to_parquet(buffer, index=False)
    stamp = datetime.datetime.fromtimestamp(until, datetime.UTC)
    key = f"{spec.dataset_prefix}{FOLDER}{stamp.strftime('%Y%m%dT%H%M%S')}.{spec.format}"
    metadata = {  # S3 metadata is ASCII: keys and reasons are percent-encoded
        "flywheel-derived-from": quote(f"{base.key}@{base.version_id}" if base.version_id else base.key),
        "flywheel-feedback-since": datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat(),
        "flywheel-feedback-until": stamp.isoformat(),
        "flywheel-feedback-rows": str(len(y)),
        "flywheel-reason": quote(reason[:500], safe=" ,()=.:-_/"),
        "flywheel-monitor-run": quote(monitor_run),
    }
    size = buffer.tell()
    buffer.seek(0)
    written = objectstore.client(settings).put_object(settings.datasets_bucket, key, buffer, size, metadata=metadata)
    return {
        "written": True,
        "key": key,
        "version_id": written.version_id or "",
        "etag": (written.etag or "").strip('"'),
        "base": base.to_dict(),
        "base_rows": len(frame),
        "feedback_rows": len(y),
        "feedback_requests": requests,
        "since": since,
        "until": until,
    }


if __name__ == "__main__":
    sys.exit(steps.main(derive))
