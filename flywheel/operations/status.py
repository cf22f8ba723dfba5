"""Overview: per pipeline, is the newest data served, and if not, why (what `flywheel status` prints)."""

from __future__ import annotations

import datetime

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import Settings
from flywheel.operations import alerts
from flywheel.operations.parked import DEAD_LETTERS, HELD
from flywheel.platform import deployments
from flywheel.training import planning


def _when(millis: int | None) -> str:
    return datetime.datetime.fromtimestamp(millis / 1000, datetime.UTC).isoformat()[:19] if millis else ""


def pipeline_status(settings: Settings, pipeline: Pipeline, mlflow: MlflowAPI, airflow: AirflowAPI) -> dict:
    p = pipeline.name
    newest = planning.newest(settings, pipeline)
    runs = mlflow.search_runs(
        p, schema.has_tag(schema.AIRFLOW_RUN), order_by=("attributes.start_time DESC",), max_results=20
    )
    decided = [(r, rec) for r in runs if (rec := schema.RunRecord.from_tags(r["data"]["tags"])).outcome]
    last = decided[0] if decided else None
    production = mlflow.version_by_alias(p, schema.PRODUCTION)
    previous = mlflow.version_by_alias(p, schema.PREVIOUS)
    live = deployments.current(settings, p)
    served_version_id = ""
    if live is not None:
        served = schema.upload_from_tags(mlflow.model_version(p, live.version)["tags"], p)
        served_version_id = served.version_id if served else ""
    active = airflow.dag_runs(f"train_{p}", limit=1, states=("queued", "running"))
    letters = [d for d in DEAD_LETTERS.read_all(settings) if d["upload"].get("pipeline") == p]
    held = [h for h in HELD.read_all(settings) if h["upload"].get("pipeline") == p]
    firing = [a for a in alerts.firing(settings) if a["labels"].get("pipeline") == p]

    def about(run: dict, record: schema.RunRecord) -> dict:
        return {
            "mlflow_run": run["info"]["run_id"],
            "airflow_run": record.airflow_run,
            "started": _when(run["info"].get("start_time")),
            "status": run["info"]["status"],
            "decision": record.outcome,
            "reason": record.reason,
            "version": record.model_version,
            "dataset": record.upload.key if record.upload else "",
            "dataset_version": record.upload.version_id if record.upload else "",
            "trigger": record.trigger.kind if record.trigger else "upload",
        }

    last_run = about(*last) if last else None
    on_newest = next(
        (about(r, rec) for r, rec in decided if newest and rec.upload and rec.upload.version_id == newest.version_id),
        None,
    )
    if newest is None:
        verdict = f"no upload yet: put a dataset under datasets/{pipeline.dataset_prefix}"
    elif served_version_id and served_version_id == newest.version_id:
        verdict = f"the newest upload ({newest.key}) is served by v{live.version}"
    elif on_newest and on_newest["decision"] == schema.REJECTED and not on_newest["version"]:
        verdict = f"the newest upload ({newest.key}) was rejected: {on_newest['reason']}"
    elif on_newest and on_newest["decision"] == schema.FAILED and not active:
        verdict = f"the newest upload ({newest.key}) failed to train (retrain by hand): {on_newest['reason']}"
    elif on_newest and on_newest["decision"] == schema.NOT_PROMOTED:
        verdict = (
            f"the newest upload ({newest.key}) trained v{on_newest['version']}, not promoted: {on_newest['reason']}"
        )
    elif active:
        verdict = f"the newest upload ({newest.key}) is being trained: {active[0]['dag_run_id']} {active[0]['state']}"
    elif on_newest and on_newest["decision"] == schema.PROMOTED:
        verdict = f"the newest upload ({newest.key}) made v{on_newest['version']}, deploying (see deploy_{p})"
    else:
        verdict = f"the newest upload ({newest.key}) waits for training (the bridge re-emits it within a minute)"
    return {
        "pipeline": p,
        "verdict": verdict,
        "last_upload": newest.to_dict() if newest else None,
        "last_run": last_run,
        "production": production,
        "previous": previous,
        "serving": None
        if live is None
        else {"version": live.version, "colour": live.colour, "replicas": list(live.ports)},
        "alerts": [f"{a['name']}: {a['summary']}" for a in firing],
        "dead_letters": [f"{d['upload'].get('key')}: {d['reason']}" for d in letters],
        "held": [f"{h['upload'].get('key')}: {h['reason']}" for h in held],
    }


def render(status: dict) -> str:
    lines = [f"{status['pipeline']}: {status['verdict']}"]
    upload = status["last_upload"]
    if upload:
        lines.append(f"  last upload   {upload['key']} (version {upload['version_id']}, {upload['event_time'][:19]})")
    run = status["last_run"]
    if run:
        version = f" v{run['version']}" if run["version"] else ""
        lines.append(
            f"  last training {run['airflow_run']} ({run['trigger']}, {run['started']}): {run['decision']}{version}"
        )
        if run["reason"]:
            lines.append(f"                {run['reason'][:300]}")
    lines.append(f"  versions      production v{status['production'] or '-'}, previous v{status['previous'] or '-'}")
    serving = status["serving"]
    lines.append(
        f"  serving       v{serving['version']} ({serving['colour']}, {len(serving['replicas'])} replicas)"
        if serving
        else "  serving       nothing"
    )
    for title, items in (
        ("alerts", status["alerts"]),
        ("dead letters", status["dead_letters"]),
        ("held uploads", status.get("held", [])),
    ):
        lines.append(f"  {title:<13} {len(items) or 'none'}")
        lines += [f"                {item[:300]}" for item in items[-5:]]
    return "\n".join(lines)
