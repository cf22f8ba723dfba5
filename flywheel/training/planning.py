"""Planning: which upload a training run trains on, decided by listing MinIO, not by the events it got.

Asset events trigger `train_<p>`, but they do not decide what it trains on. Airflow 3.3.2 creates no
run while one is queued or running, and the run it creates later consumes only the events up to the
first one that arrived meanwhile (apache/airflow#56050): the others trigger nothing. So the plan
lists MinIO and picks the newest object under the pipeline's prefix that passes its trigger rule
(a plain upload, or an IDX set's `_SUCCESS` marker): whatever events the run was handed, it trains
on the newest data there is. A person may choose another upload instead (a hand-triggered run).

Deleting an upload starts nothing (only created objects are reported). A run whose triggering
uploads were all deleted before it listed MinIO trains nothing: the newest remaining upload is
older than what the user sent, and retraining on it would be a surprise.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from flywheel.clients import objectstore
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload


@dataclass(frozen=True)
class Plan:
    """What a run trains on and why; handed from `plan` to the other tasks (XCom)."""

    upload: Upload | None
    planned_at: str  # when MinIO was listed: uploads after it are the next run's
    trigger: schema.Trigger
    skip: str = ""  # why nothing trains, if nothing does
    trained_by: str = ""  # the MLflow run that already decided on this upload...
    decided: str = ""  # ...and what it decided: "trained" (and gated) or "rejected"

    def to_dict(self) -> dict:
        return {
            "upload": self.upload.to_dict() if self.upload else None,
            "planned_at": self.planned_at,
            "trigger": self.trigger.to_dict(),
            "skip": self.skip,
            "trained_by": self.trained_by,
            "decided": self.decided,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(
            Upload.from_dict(data["upload"]) if data.get("upload") else None,
            data["planned_at"],
            schema.Trigger.from_dict(data.get("trigger")),
            data.get("skip", ""),
            data.get("trained_by", ""),
            data.get("decided", ""),
        )


def _upload(pipeline: Pipeline, bucket: str, obj, event_time: datetime.datetime) -> Upload:
    """An upload from a MinIO listing entry or stat."""
    return Upload(
        pipeline.name,
        bucket,
        obj.object_name,
        (obj.etag or "").strip('"'),
        obj.version_id or "",
        obj.size or 0,
        event_time.isoformat(),
    )


def newest(settings: Settings, pipeline: Pipeline) -> Upload | None:
    """The newest object under the pipeline's prefix that passes its trigger rule."""
    client = objectstore.client(settings)
    best = None
    for obj in client.list_objects(settings.datasets_bucket, prefix=pipeline.dataset_prefix, recursive=True):
        if obj.is_dir or not pipeline.triggers(obj.object_name):
            continue
        if best is None or (obj.last_modified, obj.object_name) > (best.last_modified, best.object_name):
            best = obj
    if best is None:
        return None
    stat = client.stat_object(settings.datasets_bucket, best.object_name)  # its current version's id
    return _upload(pipeline, settings.datasets_bucket, stat, best.last_modified)  # the listing's time, to the ms


def chosen(settings: Settings, pipeline: Pipeline, ref: str) -> Upload:
    """The upload a person chose for a hand-triggered run: a key (its current version), a version id,
    or, empty, the newest. LookupError says why nothing matches."""
    if not ref:
        found = newest(settings, pipeline)
        if found is None:
            raise LookupError(f"nothing to train: no object under datasets/{pipeline.dataset_prefix} starts a run")
        return found
    client = objectstore.client(settings)
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
        return _upload(pipeline, settings.datasets_bucket, obj, obj.last_modified)
    raise LookupError(f"no upload under datasets/{pipeline.dataset_prefix} has the key or version id {ref!r}")


def decided(mlflow: MlflowAPI, pipeline: Pipeline, upload: Upload) -> tuple[str, str]:
    """The MLflow run that already trained (and gated) or rejected exactly this object version, and
    which of the two it did; ("", "") if none did."""
    if not upload.version_id:
        return "", ""
    for run in mlflow.search_runs(pipeline.name, schema.tag_filter(schema.UPLOAD_VERSION_ID, upload.version_id)):
        record = schema.RunRecord.from_tags(run["data"]["tags"])
        if record.status == schema.REJECTED:
            return run["info"]["run_id"], "rejected"
        if run["info"]["status"] == "FINISHED" and record.decided:
            return run["info"]["run_id"], "trained"
    return "", ""


def fail_killed_runs(mlflow: MlflowAPI, pipeline: Pipeline, found_by: str) -> list[str]:
    """Runs are serial per pipeline: a platform run still RUNNING when a new one plans was killed mid-way."""
    failed = []
    for run in mlflow.search_runs(pipeline.name, "attributes.status = 'RUNNING'"):
        if schema.RunRecord.from_tags(run["data"]["tags"]).airflow_run:
            run_id = run["info"]["run_id"]
            mlflow.set_tags(run_id, {schema.REASON: f"killed before it finished (found by {found_by})"})
            mlflow.end_run(run_id, "FAILED")
            failed.append(run_id)
    return failed


def _older_than_its_triggers(upload: Upload, triggered_by: list[Upload]) -> bool:
    """Whether every upload that started the run is newer than `upload` and none of them is it: they
    were deleted (or replaced by a delete marker) before the run listed MinIO."""
    times = [schema.parse_time(u.event_time) for u in triggered_by if u.event_time]
    if not times or not upload.event_time or any(upload.same_as(u) for u in triggered_by):
        return False
    return schema.parse_time(upload.event_time) < max(times) - datetime.timedelta(seconds=1)


def plan(
    settings: Settings,
    pipeline: Pipeline,
    trigger: schema.Trigger,
    airflow_run: str,
    triggered_by: list[Upload] | None = None,
) -> tuple[Plan, list[str]]:
    """The plan of a run (and the MLflow runs it found killed). LookupError: a person's choice names nothing.

    An upload-triggered run is skipped when that very upload was already trained or rejected: a
    burst's later events then cost a plan and an account, not a retraining. A scheduled run
    (`retrain.schedule`) and one drift started train the newest upload whatever trained it before.
    `triggered_by` are the uploads of the asset events that started it.
    """
    planned_at = datetime.datetime.now(datetime.UTC).isoformat()
    upload = chosen(settings, pipeline, trigger.dataset) if trigger.manual else newest(settings, pipeline)
    skip, trained_by, outcome = "", "", ""
    with MlflowAPI.connect(settings) as mlflow:
        killed = fail_killed_runs(mlflow, pipeline, airflow_run)
        if upload is None:
            skip = f"nothing to train: no object under datasets/{pipeline.dataset_prefix} starts a run"
        elif trigger.kind == "upload" and _older_than_its_triggers(upload, triggered_by or []):
            skip = (
                f"the upload(s) that started this run are gone (deleted); the newest remaining one, {upload.key}, "
                "is older and is not retrained by surprise (`flywheel train` trains it by hand)"
            )
            upload = None
        elif not trigger.retrains:  # a person's, a scheduled or a drift run trains even data trained before
            trained_by, outcome = decided(mlflow, pipeline, upload)
            if trained_by:
                skip = f"the newest upload, {upload.key}, was already {outcome} by MLflow run {trained_by}"
    return Plan(upload, planned_at, trigger, skip, trained_by, outcome), killed
