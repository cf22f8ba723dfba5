"""Uploads: which upload a training run trains on, and the ledger that accounts for every upload.

Asset events trigger `train_<p>`, but they do not decide what it trains on. Airflow 3.3.2 creates no
run while one is queued or running, and the run it creates later consumes only the events up to the
first one that arrived meanwhile (apache/airflow#56050): the others trigger nothing. So:

- **plan** (a run's first task) lists MinIO and picks the newest object under the pipeline's prefix
  that passes its trigger rule (a plain upload, or an IDX set's `_SUCCESS` marker). Whatever events
  the run was handed, it trains on the newest data there is.
- **account** (its last task, whatever happened before) writes the ledger on the run's MLflow run:
  every upload whose asset event Airflow holds and no earlier run accounted for, as `trained`,
  `rejected` (failed validation), `already-trained` (an earlier run trained that very version) or
  `superseded` (a newer upload was trained instead). The last accounted event is the watermark
  (`flywheel.events_through`): the next run starts after it.
- An upload that landed after the plan looked at MinIO is left for the next run, which the events
  bridge's reconciler starts if Airflow does not (`pending`): a run whose infrastructure failed
  accounts for nothing, so its uploads are tried again.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass

from flywheel.airflow_api import AirflowAPI
from flywheel.mlflow_api import MlflowAPI
from flywheel.pipelines import Pipeline
from flywheel.settings import Settings

WATERMARK_TAG = "flywheel.events_through"
UPLOADS_TAG = "flywheel.uploads"
UPLOADS_ARTIFACT = "flywheel/uploads.json"
ROLES = ("trained", "rejected", "already-trained", "superseded")
# Events accounted per run at most: the ledger travels in one MLflow tag and one artifact. A longer
# backlog is accounted by the runs that follow (the reconciler starts them).
MAX_EVENTS = 500
# An upload whose event time is within this of the plan's listing may not have been listed.
CLOCK_MARGIN = datetime.timedelta(seconds=1)


def parse_time(value: str) -> datetime.datetime:
    """Airflow's and MinIO's ISO times (with `Z` or an offset) as aware datetimes."""
    parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, order=True)
class Watermark:
    """The last asset event a run accounted for: events are ordered by (timestamp, id)."""

    timestamp: str
    id: int

    def key(self) -> tuple[datetime.datetime, int]:
        return parse_time(self.timestamp), self.id

    def to_tag(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_tag(cls, value: str | None) -> Watermark | None:
        try:
            data = json.loads(value or "")
            return cls(str(data["timestamp"]), int(data["id"]))
        except (ValueError, KeyError, TypeError):
            return None


def _after(event: dict, mark: Watermark | None) -> bool:
    return mark is None or (parse_time(event["timestamp"]), event["id"]) > mark.key()


# --- plan: the newest upload --------------------------------------------------------------------------


def newest(settings: Settings, pipeline: Pipeline) -> dict | None:
    """The newest object under the pipeline's prefix that passes its trigger rule, as an event extra."""
    from flywheel.data import minio_client

    client = minio_client(settings)
    best = None
    for obj in client.list_objects(settings.datasets_bucket, prefix=pipeline.dataset_prefix, recursive=True):
        if obj.is_dir or not pipeline.triggers(obj.object_name):
            continue
        if best is None or (obj.last_modified, obj.object_name) > (best.last_modified, best.object_name):
            best = obj
    if best is None:
        return None
    stat = client.stat_object(settings.datasets_bucket, best.object_name)  # its current version's id
    return _upload(settings, pipeline, stat, event_time=best.last_modified)  # the listing's, to the millisecond


def _upload(settings: Settings, pipeline: Pipeline, obj, event_time) -> dict:
    """An upload as the plan step and the asset events describe it, from a MinIO object or its stat."""
    return {
        "pipeline": pipeline.name,
        "bucket": settings.datasets_bucket,
        "key": obj.object_name,
        "etag": (obj.etag or "").strip('"'),
        "version_id": obj.version_id or "",
        "size": obj.size,
        "event_time": event_time.isoformat(),
    }


def chosen(settings: Settings, pipeline: Pipeline, ref: str) -> dict:
    """The upload a person chose for a hand-triggered run: a key (its current version), a version id,
    or, empty, the newest. LookupError says why nothing matches."""
    from flywheel.data import minio_client

    if not ref:
        found = newest(settings, pipeline)
        if found is None:
            raise LookupError(f"nothing to train: no object under datasets/{pipeline.dataset_prefix} starts a run")
        return found
    client = minio_client(settings)
    key = ref if ref.startswith(pipeline.dataset_prefix) else f"{pipeline.dataset_prefix}{ref}"
    for obj in client.list_objects(
        settings.datasets_bucket, prefix=pipeline.dataset_prefix, recursive=True, include_version=True
    ):
        if obj.is_delete_marker or not (
            (obj.object_name == key and str(obj.is_latest).lower() == "true") or obj.version_id == ref
        ):
            continue
        if not pipeline.triggers(obj.object_name):
            raise LookupError(
                f"{obj.object_name} does not start a {pipeline.name} run (an IDX set trains from its _SUCCESS marker)"
            )
        return _upload(settings, pipeline, obj, event_time=obj.last_modified)
    raise LookupError(f"no upload under datasets/{pipeline.dataset_prefix} has the key or version id {ref!r}")


def same_upload(a: dict, b: dict) -> bool:
    if a.get("version_id") and b.get("version_id"):
        return a["version_id"] == b["version_id"]
    return (a.get("key"), a.get("etag", "").strip('"')) == (b.get("key"), b.get("etag", "").strip('"'))


# --- the ledger -------------------------------------------------------------------------------------------


def watermark(mlflow: MlflowAPI, pipeline: Pipeline) -> Watermark | None:
    """The newest watermark any run of the pipeline recorded (runs are serial: the latest ones hold it)."""
    runs = mlflow.search_runs(
        pipeline.name, f"tags.`{WATERMARK_TAG}` LIKE '%'", order_by=("attributes.start_time DESC",), max_results=20
    )
    marks = [m for run in runs if (m := Watermark.from_tag(run["data"]["tags"].get(WATERMARK_TAG)))]
    return max(marks, key=Watermark.key, default=None)


def events_after(
    airflow: AirflowAPI, pipeline: Pipeline, mark: Watermark | None, limit: int = MAX_EVENTS
) -> list[dict]:
    """The dataset asset's events after the watermark, oldest first (at most `limit`)."""
    asset_id = airflow.asset_id(pipeline.dataset_uri)
    if asset_id is None:
        return []
    params = {"asset_id": asset_id, "order_by": "timestamp", "limit": 100}
    if mark is not None:
        params["timestamp_gte"] = mark.timestamp
    found: list[dict] = []
    offset = 0
    while len(found) < limit:
        page = airflow.get("/assets/events", **params, offset=offset)["asset_events"]
        found += [e for e in page if _after(e, mark)]
        if len(page) < params["limit"]:
            break
        offset += len(page)
    return found[:limit]


@dataclass(frozen=True)
class Entry:
    """One upload in the ledger: its asset event, the object version, and what became of it."""

    event_id: int
    event_timestamp: str
    key: str
    etag: str
    version_id: str
    event_time: str
    role: str
    by: str  # what trained instead, or which MLflow run trained it


def account(
    events: list[dict], planned: dict | None, planned_at: datetime.datetime, outcome: str, by: str
) -> tuple[list[Entry], Watermark | None]:
    """The ledger entries for events (oldest first) and the new watermark (pure logic).

    `outcome` is what the run did with `planned`: trained, rejected or already-trained. Accounting
    stops at the first upload the plan may not have seen: it and everything after belong to the
    next run, which will train on it.
    """
    entries: list[Entry] = []
    last = None
    for event in events:
        extra = event.get("extra") or {}
        uploaded = extra.get("event_time")
        if uploaded and parse_time(uploaded) > planned_at - CLOCK_MARGIN:
            break
        if planned is not None and same_upload(extra, planned):
            role, why = outcome, by
        else:
            role, why = "superseded", planned["key"] if planned else "no dataset left under the prefix"
        entries.append(
            Entry(
                event_id=event["id"],
                event_timestamp=event["timestamp"],
                key=extra.get("key", ""),
                etag=extra.get("etag", ""),
                version_id=extra.get("version_id", ""),
                event_time=uploaded or "",
                role=role,
                by=why,
            )
        )
        last = Watermark(event["timestamp"], event["id"])
    return entries, last


def summary(entries: list[Entry]) -> str:
    """The ledger in one tag: the keys per role, shortened to fit MLflow's tag limit."""
    roles: dict[str, list[str]] = {}
    for entry in entries:
        roles.setdefault(entry.role, []).append(entry.key)
    text = json.dumps(roles)
    if len(text) > 4000:
        text = json.dumps({role: len(keys) for role, keys in roles.items()} | {"see": UPLOADS_ARTIFACT})
    return text


def record(mlflow: MlflowAPI, run: dict, entries: list[Entry], mark: Watermark | None) -> None:
    """Write the ledger on an MLflow run: a tag, the artifact, and the watermark that moves past it."""
    mlflow.log_json(run, UPLOADS_ARTIFACT, [asdict(e) for e in entries])
    tags = {UPLOADS_TAG: summary(entries)}
    if mark is not None:
        tags[WATERMARK_TAG] = mark.to_tag()
    mlflow.set_tags(run["info"]["run_id"], tags)


def pending(airflow: AirflowAPI, mlflow: MlflowAPI, pipeline: Pipeline) -> dict | None:
    """The newest asset event no run has accounted for, or None (for the reconciler)."""
    mark = watermark(mlflow, pipeline)
    asset_id = airflow.asset_id(pipeline.dataset_uri)
    if asset_id is None:
        return None
    latest = airflow.get("/assets/events", asset_id=asset_id, order_by="-timestamp", limit=1)["asset_events"]
    return latest[0] if latest and _after(latest[0], mark) else None
