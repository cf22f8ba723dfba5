"""Lineage: from an upload to the answer it produced, each link read from the service that owns it.

upload (MinIO) -> asset event (Airflow) -> training run (Airflow) -> MLflow run (metrics, gate)
-> registered version (aliases) -> Bento -> deployment (Nginx, what serves now). An upload drift
derived from feedback names its sources (the upload it extends, the feedback window), and its event
the monitor_<p> run that emitted it.

Starting points: a pipeline (its production version), a registered version, or an answer's
X-Request-Id, found in Nginx's access log (which records the request id, the pipeline and the model
version of every answer).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from flywheel.clients import objectstore
from flywheel.clients.airflow_rest import AirflowAPI, AirflowRejected
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload
from flywheel.platform import deployments


class LineageError(LookupError):
    """The starting point names nothing the platform knows."""


@dataclass
class Link:
    what: str
    id: str
    url: str
    facts: dict = field(default_factory=dict)


def _upload(settings: Settings, upload: Upload | None) -> Link:
    upload = upload or Upload("", settings.datasets_bucket, "")
    facts = {"key": upload.key, "etag": upload.etag, "version_id": upload.version_id}
    try:
        stat = objectstore.client(settings).stat_object(upload.bucket, upload.key, version_id=upload.version_id or None)
        facts["uploaded_at"] = stat.last_modified.isoformat()
        facts["size"] = stat.size
        # A dataset drift derived from feedback (inference/derive.py) says what it was made of.
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        for name in ("derived-from", "feedback-since", "feedback-until", "feedback-rows", "reason", "monitor-run"):
            if value := meta.get(f"x-amz-meta-flywheel-{name}"):
                facts[name.replace("-", "_")] = unquote(value)
    except Exception as exc:  # deleted since, or MinIO away: the link still says what it was
        facts["uploaded_at"] = f"unknown ({type(exc).__name__})"
    url = f"{settings.url(settings.ports.minio_console)}/browser/{upload.bucket}/{quote(upload.key, safe='')}"
    return Link("upload", upload.uri, url, facts)


def _asset_event(settings: Settings, airflow: AirflowAPI, pipeline: str, version_id: str, uploaded_at: str) -> Link:
    uri = f"s3://{settings.datasets_bucket}/{pipeline}"
    asset_id = airflow.asset_id(uri)
    query = {"asset_id": asset_id, "order_by": "timestamp", "limit": 100}
    try:  # the upload's event follows its upload within seconds (or later, if the bridge was away)
        query["timestamp_gte"] = (
            datetime.datetime.fromisoformat(uploaded_at) - datetime.timedelta(minutes=1)
        ).isoformat()
    except ValueError:
        query["order_by"] = "-timestamp"
    events = airflow.get("/assets/events", **query)["asset_events"]
    mine = [e for e in events if (e.get("extra") or {}).get("version_id") == version_id]
    if not mine:
        return Link("asset event", "", f"{settings.airflow_url}/assets/{asset_id}", {"uri": uri, "found": False})
    first = min(mine, key=lambda e: e["timestamp"])  # the upload's own event (a reconciled one may follow)
    runs = [r.get("run_id") for e in mine for r in e.get("created_dagruns") or []]
    sources = sorted({e.get("source_dag_id") or "the events bridge (MinIO's notification)" for e in mine})
    facts = {
        "uri": uri,
        "timestamp": first["timestamp"],
        "events": len(mine),
        "from": sources,
        "created_runs": runs,
    }
    return Link("asset event", str(first["id"]), f"{settings.airflow_url}/assets/{asset_id}", facts)


def _airflow_run(settings: Settings, airflow: AirflowAPI, pipeline: str, run_id: str) -> Link:
    dag_id = f"train_{pipeline}"
    url = f"{settings.airflow_url}/dags/{dag_id}/runs/{quote(run_id, safe='')}"
    try:
        run = airflow.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
        facts = {
            "dag_id": dag_id,
            "state": run["state"],
            "run_type": run.get("run_type"),
            "start": run.get("start_date"),
            "end": run.get("end_date"),
        }
    except AirflowRejected:
        facts = {"dag_id": dag_id, "state": "unknown to Airflow"}
    return Link("training run", run_id, url, facts)


def _mlflow_run(settings: Settings, mlflow: MlflowAPI, run_id: str) -> tuple[Link, schema.RunRecord]:
    run = mlflow.run(run_id)
    record = schema.RunRecord.from_tags(run["data"]["tags"])
    trigger = record.trigger or schema.Trigger()
    facts = {
        "status": run["info"]["status"],
        "metrics": run["data"]["metrics"],
        "decision": record.decision,
        "reason": record.reason,
        "trigger": trigger.kind,
        "triggered_by": trigger.by,
        "note": trigger.note,
        "overrides": trigger.overrides or "",
    }
    url = f"{settings.mlflow_url}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}"
    return Link("MLflow run", run_id, url, facts), record


def chain(settings: Settings, pipeline: str, version: str | None = None) -> dict:
    """Every link of a registered version's lineage (the production one by default)."""
    with MlflowAPI.connect(settings) as mlflow, AirflowAPI.connect(settings) as airflow:
        version = version or mlflow.version_by_alias(pipeline, schema.PRODUCTION)
        if not version:
            raise LineageError(f"{pipeline} has no production version yet")
        try:
            mv = mlflow.model_version(pipeline, str(version))
        except RuntimeError as exc:
            raise LineageError(f"{pipeline} has no registered version {version}") from exc
        record = schema.VersionRecord.from_mlflow(pipeline, str(version), mv["run_id"], mv["tags"])
        aliases = [
            a for a in (schema.PRODUCTION, schema.PREVIOUS) if mlflow.version_by_alias(pipeline, a) == str(version)
        ]
        run_link, run_record = _mlflow_run(settings, mlflow, record.run_id)
        upload = _upload(settings, record.upload)
        links = [
            upload,
            _asset_event(
                settings,
                airflow,
                pipeline,
                record.upload.version_id if record.upload else "",
                str(upload.facts.get("uploaded_at")),
            ),
            _airflow_run(settings, airflow, pipeline, run_record.airflow_run),
            run_link,
            Link(
                "registered version",
                f"{pipeline} v{version}",
                f"{settings.mlflow_url}/#/models/{pipeline}/versions/{version}",
                {
                    "aliases": aliases,
                    "decision": record.decision,
                    "deployment": record.deployment or "never deployed",
                    "deployment_reason": record.deployment_reason,
                    **({"live_rollout": record.rollout} if record.rollout else {}),
                    **({"ab_test": record.tags[schema.AB_TEST]} if schema.AB_TEST in record.tags else {}),
                },
            ),
        ]
    bento = f"flywheel-{pipeline}:v{version}"
    built = (settings.bentoml_home / "bentos" / f"flywheel-{pipeline}" / f"v{version}").is_dir()
    links.append(
        Link(
            "Bento",
            bento,
            str(settings.bentoml_home / "bentos" / f"flywheel-{pipeline}" / f"v{version}"),
            {"built": built},
        )
    )
    live = deployments.current(settings, pipeline)
    serving = live is not None and live.version == str(version)
    facts = {"serving_now": serving}
    if serving:
        facts.update(
            colour=live.colour,
            replicas=list(live.ports),
            deployed_at=datetime.datetime.fromtimestamp(live.deployed_at, datetime.UTC).isoformat(),
        )
    elif live is not None:
        facts["serving_instead"] = f"v{live.version}"
    links.append(Link("deployment", f"{pipeline} v{version}", f"{settings.predict_url}/{pipeline}/predict", facts))
    return {"pipeline": pipeline, "version": str(version), "links": [asdict(link) for link in links]}


_ACCESS = re.compile(r"request_id=(\S+) pipeline=(\S*) model_version=(\S*)")


def find_request(settings: Settings, request_id: str) -> dict:
    """The pipeline and model version that answered a request, from Nginx's access log."""
    logs = sorted(settings.logs.glob("nginx-access.log*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        for line in reversed(Path(log).read_text(errors="replace").splitlines()):
            match = _ACCESS.search(line)
            if match and match.group(1) == request_id:
                pipeline, version = match.group(2), match.group(3)
                if not version or version == "-":
                    raise LineageError(f"request {request_id} got no model's answer: {line[:200]}")
                return {"request_id": request_id, "pipeline": pipeline, "version": version, "access_log": line}
    raise LineageError(f"no request {request_id} in Nginx's access log ({settings.logs / 'nginx-access.log'})")


def render(lineage: dict) -> str:
    lines = [f"{lineage['pipeline']} v{lineage['version']}"]
    if "request" in lineage:
        lines[0] = f"request {lineage['request']['request_id']} -> " + lines[0]
    for link in lineage["links"]:
        lines.append(f"  {link['what']:<19} {link['id']}")
        lines.append(f"  {'':<19} {link['url']}")
        for key, value in link["facts"].items():
            if value not in ("", None, [], {}):
                lines.append(f"  {'':<21}{key}: {value}")
    return "\n".join(lines)
