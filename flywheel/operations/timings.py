"""The waterfall: where the time from an upload to its version answering went, hop by hop.

Every figure is a service's own record, never a clock of ours: MinIO's object time, Airflow's asset
events, runs and task instances (queued, started, ended), and the rollout's record of when each replica
was ready, proven, switched in and first answered through Nginx (platform/deployments.py). What
`flywheel lineage <p> --timings` prints and bench/upload_to_serving.py takes medians of.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass

from flywheel.clients import objectstore
from flywheel.clients.airflow_rest import AirflowAPI, AirflowRejected
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.settings import Settings
from flywheel.operations.lineage import LineageError
from flywheel.platform import deployments

TRAIN_TASKS = ("plan", "validate", "train", "publish")
DEPLOY_TASKS = ("build", "rollout")
ROLLOUT = "rollout"  # detailed by the deployment's own record (platform/deployments.py)


@dataclass(frozen=True)
class Hop:
    name: str
    start: float  # seconds since the upload
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _t(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _first_event(airflow: AirflowAPI, uri: str, match, after: float) -> dict | None:
    asset_id = airflow.asset_id(uri)
    if asset_id is None:
        return None
    since = datetime.datetime.fromtimestamp(after - 60, datetime.UTC).isoformat()
    events = airflow.get("/assets/events", asset_id=asset_id, order_by="timestamp", limit=100, timestamp_gte=since)
    found = [e for e in events["asset_events"] if match(e.get("extra") or {})]
    return min(found, key=lambda e: e["timestamp"]) if found else None


def _run_hops(
    airflow: AirflowAPI, dag_id: str, run_id: str, tasks: tuple[str, ...], t0: float, since: float, detailed=()
):
    """The run's queue, and each task's queue and run, as Airflow recorded them; of a task in `detailed`
    only its wait (the rollout's own record details the rest, and it drains on after the first answer)."""
    hops = []
    try:
        run = airflow.get(f"/dags/{dag_id}/dagRuns/{run_id}")
    except AirflowRejected:
        return hops, since
    queued, started = _t(run.get("queued_at")), _t(run.get("start_date"))
    if queued and started:
        if queued > since:
            hops.append(Hop(f"{dag_id} run created", since - t0, queued - t0))
        hops.append(Hop(f"{dag_id} run queued", max(since, queued) - t0, started - t0))
        since = started
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(dag_id, run_id)}
    for task in tasks:
        ti = tis.get(task)
        if not ti:
            continue
        start, end = _t(ti.get("start_date")), _t(ti.get("end_date"))
        if start is None or (end is None and task not in detailed):
            continue
        if start > since:
            hops.append(Hop(f"{task} waits (queued, a worker starts)", since - t0, start - t0))
        if task in detailed:
            return hops, start
        hops.append(Hop(task, start - t0, end - t0))
        since = end
    return hops, since


def waterfall(settings: Settings, pipeline: str, version: str | None = None) -> dict:
    """The hops from the upload of a version's dataset to the version's first answer through Nginx."""
    with MlflowAPI.connect(settings) as mlflow, AirflowAPI.connect(settings) as airflow:
        version = version or mlflow.version_by_alias(pipeline, schema.PRODUCTION)
        if not version:
            raise LineageError(f"{pipeline} has no production version yet")
        mv = mlflow.model_version(pipeline, str(version))
        record = schema.VersionRecord.from_mlflow(pipeline, str(version), mv["run_id"], mv["tags"])
        run_record = schema.RunRecord.from_tags(mlflow.run(record.run_id)["data"]["tags"])
        upload = record.upload
        if upload is None:
            raise LineageError(f"{pipeline} v{version} names no upload")
        if upload.event_time:  # from MinIO's listing, to the millisecond
            t0 = schema.parse_time(upload.event_time).timestamp()
        else:  # an HTTP Last-Modified: to the second, up to 1 s early (the asset event refines it below)
            try:
                stat = objectstore.client(settings).stat_object(
                    upload.bucket, upload.key, version_id=upload.version_id or None
                )
            except Exception as exc:  # deleted since (retention), MinIO away
                why = f"{upload.describe()} cannot be read ({type(exc).__name__}): no upload time"
                raise LineageError(why) from exc
            t0 = stat.last_modified.timestamp()
        hops: list[Hop] = []
        event = _first_event(
            airflow,
            f"s3://{settings.datasets_bucket}/{pipeline}",
            lambda x: x.get("version_id") == upload.version_id,
            t0,
        )
        if event and (event.get("extra") or {}).get("event_time"):
            # MinIO's own time of the upload, in its notification, to the millisecond: the version's
            # tags carry none, and Last-Modified, to the second, made every hop look up to 1 s longer.
            t0 = schema.parse_time(event["extra"]["event_time"]).timestamp()
        at = t0  # where the last hop ended
        if event:
            at = _t(event["timestamp"])
            hops.append(Hop("upload -> asset event (MinIO, bridge)", 0.0, at - t0))
        train_hops, at = _run_hops(airflow, f"train_{pipeline}", run_record.airflow_run, TRAIN_TASKS, t0, at)
        hops += train_hops
        produced = _first_event(
            airflow, f"model://{pipeline}/production", lambda x: str(x.get("version")) == str(version), t0
        )
        if produced:
            created = [r.get("run_id") for r in produced.get("created_dagruns") or []]
            produced_at = _t(produced["timestamp"])
            if created:
                deploy_hops, at = _run_hops(
                    airflow, f"deploy_{pipeline}", created[0], DEPLOY_TASKS, t0, produced_at, detailed=(ROLLOUT,)
                )
                hops += deploy_hops
    served = deployments.current(settings, pipeline)
    candidate = deployments.candidate(settings, pipeline)
    deployment = next(
        (d for d in (served, candidate.deployment if candidate else None) if d and d.version == str(version)), None
    )
    if deployment and deployment.timings:
        t = deployment.timings
        steps = [("replicas start", "started")]
        steps += [(f"replica {i} ready", f"ready_{i}") for i in range(len(deployment.ports))]
        steps += [(f"replica {i} smoke replay", f"smoked_{i}") for i in range(len(deployment.ports))]
        steps = sorted(((name, t[key]) for name, key in steps if key in t), key=lambda s: s[1])
        previous = t.get("started")
        if previous and previous > at:  # the rollout task, from its start to its replicas' start
            hops.append(Hop("rollout starts the replicas", at - t0, previous - t0))
        for name, when in steps[1:]:
            hops.append(Hop(name, previous - t0, when - t0))
            previous = when
        for name, key in (
            ("first share of live traffic", "live"),
            ("Nginx switched", "switched"),
            ("first answer through Nginx", "served"),
        ):
            if key in t and previous:
                hops.append(Hop(name, previous - t0, t[key] - t0))
                previous = t[key]
    complete = bool(deployment and "served" in deployment.timings)
    # To the first answer; later hops (the rollout task drains and stops the old colour) are after it.
    total = deployment.timings["served"] - t0 if complete else max((h.end for h in hops), default=0.0)
    return {
        "pipeline": pipeline,
        "version": str(version),
        "upload": upload.key,
        "uploaded_at": datetime.datetime.fromtimestamp(t0, datetime.UTC).isoformat(),
        "total_seconds": total,
        "complete": complete,
        "hops": [{**asdict(h), "seconds": h.seconds} for h in hops],
    }


def render(w: dict, width: int = 40) -> str:
    total = max(w["total_seconds"], 1e-9)
    lines = [f"{w['pipeline']} v{w['version']}: {w['upload']} uploaded {w['uploaded_at'][:23]}"]
    lines.append(f"  {'hop':<40} {'start':>7} {'took':>7}")
    for h in w["hops"]:
        left = int(h["start"] / total * width)
        bar = " " * left + "█" * max(1, int(h["seconds"] / total * width))
        lines.append(f"  {h['name']:<40} {h['start']:>6.1f}s {h['seconds']:>6.1f}s  {bar}")
    ended = "first answer" if w["complete"] else "last recorded hop (what serves no longer records this version)"
    lines.append(f"  {'upload -> ' + ended:<40} {'':>7} {w['total_seconds']:>6.1f}s")
    return "\n".join(lines)
