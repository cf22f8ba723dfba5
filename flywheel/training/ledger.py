"""The uploads ledger: every upload Airflow received is accounted for by exactly one training run.

A run's last task, `account`, writes on its MLflow run every upload whose asset event no earlier
run accounted for, as `trained`, `rejected` (it broke a rule), `failed` (every attempt of a step
failed on it) or `superseded` (a newer upload was trained instead, or it was deleted first), with
the MLflow run that did it: an upload an earlier run trained, accounted for by
a later one (it landed just as that earlier run listed MinIO), names that earlier run. The last event it
accounted for is the watermark: the next run starts after it. An upload that landed after the plan
listed MinIO is left for the next run, which the events bridge's reconciler starts if Airflow does
not (`pending`): a run whose infrastructure failed accounts for nothing, so its uploads are tried
again. Record formats are core/schema.py's; this module is the accounting.
"""

from __future__ import annotations

import datetime

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.schema import Entry, Watermark, parse_time
from flywheel.core.upload import Upload

# Events accounted per run at most: the ledger travels in one MLflow tag and one artifact. A longer
# backlog is accounted by the runs that follow (the reconciler starts them).
MAX_EVENTS = 500
# An upload whose event time is within this of the plan's listing may not have been listed.
CLOCK_MARGIN = datetime.timedelta(seconds=1)


def after(event: dict, mark: Watermark | None) -> bool:
    """Whether an asset event ({id, timestamp, extra}) comes after the watermark."""
    return mark is None or (parse_time(event["timestamp"]), event["id"]) > mark.key()


def watermark(mlflow: MlflowAPI, pipeline: Pipeline) -> Watermark | None:
    """The newest watermark any run of the pipeline recorded (runs are serial: the latest ones hold it)."""
    runs = mlflow.search_runs(
        pipeline.name, schema.has_tag(schema.WATERMARK), order_by=("attributes.start_time DESC",), max_results=20
    )
    marks = [m for run in runs if (m := schema.watermark_of(run["data"]["tags"]))]
    return max(marks, key=Watermark.key, default=None)


def account(
    events: list[dict], planned: Upload | None, planned_at: datetime.datetime, outcome: str, by: str
) -> tuple[list[Entry], Watermark | None]:
    """The ledger entries for events (oldest first) and the new watermark (pure logic).

    `outcome` is what became of `planned` (trained, rejected or failed) and `by` the run that did it, or
    `planned` is None and `by` says why nothing was trained. Accounting
    stops at the first upload the plan may not have seen: it and everything after belong to the
    next run, which will train on it.
    """
    entries: list[Entry] = []
    last = None
    for event in events:
        extra = event.get("extra") or {}
        uploaded = extra.get("event_time")
        upload = Upload.from_dict({"pipeline": "", "bucket": "", "key": "", **extra})
        planned_one = planned is not None and upload.same_as(planned)
        # The plan's own upload was listed, however close its event is to the listing.
        if not planned_one and uploaded and parse_time(uploaded) > planned_at - CLOCK_MARGIN:
            break
        if planned_one:
            role, why = outcome, by
        else:
            role, why = "superseded", planned.key if planned else by
        entries.append(
            Entry(
                event_id=event["id"],
                event_timestamp=event["timestamp"],
                key=upload.key,
                etag=upload.etag,
                version_id=upload.version_id,
                event_time=uploaded or "",
                role=role,
                by=why,
            )
        )
        last = Watermark(event["timestamp"], event["id"])
    return entries, last


def record(mlflow: MlflowAPI, run: dict, entries: list[Entry], mark: Watermark | None) -> None:
    """Write the ledger on an MLflow run: the artifact, a tag, and the watermark that moves past it."""
    mlflow.log_json(run, schema.LEDGER_ARTIFACT, schema.ledger_document(entries))
    mlflow.set_tags(run["info"]["run_id"], schema.ledger_tags(entries, mark))


def pending(airflow: AirflowAPI, mlflow: MlflowAPI, pipeline: Pipeline) -> dict | None:
    """The newest asset event no run has accounted for, or None (for the reconciler)."""
    mark = watermark(mlflow, pipeline)
    asset_id = airflow.asset_id(pipeline.dataset_uri)
    if asset_id is None:
        return None
    latest = airflow.get("/assets/events", asset_id=asset_id, order_by="-timestamp", limit=1)["asset_events"]
    return latest[0] if latest and after(latest[0], mark) else None
