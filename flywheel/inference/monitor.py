"""Monitor (a step): the last window of the inference log against the serving version's training profile.

`python -m flywheel.inference.monitor --args '{"pipeline": "iris", "until": 1764590000.0}'`

Reads the window from the inference log in MinIO (`s3://inference/<p>/answers/…`, the Parquet the
collector ships; at least once, so rows are deduplicated by request id), the profile from the
production version's run (core/profiles.py), compares them (drift.py), and records a monitoring run
in MLflow (experiment `<p>.monitoring`): the figures per feature as metrics, and an HTML report with
both distributions of every feature. The Airflow task exports, alerts and retrains from the payload.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time

from flywheel.clients import objectstore
from flywheel.clients.tracking import client as tracking_client
from flywheel.core import pipelines, profiles, schema, steps
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import INFERENCE_BUCKET, Settings
from flywheel.inference import drift

REPORT_ARTIFACT = "drift/report.html"
CALM_RECORD_SECONDS = 3600.0  # a calm window is recorded in MLflow at most this often
MAX_ANSWERS = 5000  # answers a window reads at most (a uniform sample beyond): the tests need no more
RESULT_ARTIFACT = "drift/result.json"


def experiment(pipeline: str) -> str:
    return f"{pipeline}.monitoring"


def _hours(since: float, until: float) -> list[str]:
    """The `date=…/hour=…/` partitions a window touches."""
    hours, t = [], since - since % 3600
    while t <= until:
        stamp = time.gmtime(t)
        hours.append(f"date={time.strftime('%Y-%m-%d', stamp)}/hour={time.strftime('%H', stamp)}/")
        t += 3600
    return hours


def window(settings: Settings, pipeline: Pipeline, since: float, until: float, version: str) -> dict[str, list]:
    """What `version` answered clients in [since, until): one column per feature, and the predictions.
    Only that version's answers: a candidate's, or the one before a switch, are other models. At most
    MAX_ANSWERS of them, a uniform sample: a busy hour costs the monitor no more than a quiet one."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    client = objectstore.client(settings)
    names = list(profiles.IMAGE_FEATURES) if pipeline.is_image else list(pipeline.features)
    columns: dict[str, list] = {name: [] for name in [*names, profiles.PREDICTION]}
    wanted = ["time", "request_id", "model_version", "role", "inputs", "predictions"]
    parts = []
    for hour in _hours(since, until):
        for obj in client.list_objects(INFERENCE_BUCKET, prefix=f"{pipeline.name}/answers/{hour}", recursive=True):
            response = client.get_object(INFERENCE_BUCKET, obj.object_name)
            try:
                table = pq.read_table(io.BytesIO(response.read()), columns=wanted)
            finally:
                response.close()
                response.release_conn()
            keep = pc.and_(
                pc.and_(pc.greater_equal(table["time"], since), pc.less(table["time"], until)),
                pc.and_(pc.not_equal(table["role"], "shadow"), pc.equal(table["model_version"], version)),
            )
            parts.append(table.filter(keep).select(["request_id", "inputs", "predictions"]))
    if not parts:
        return columns
    table = pa.concat_tables(parts)
    seen: set[str] = set()
    rows = [i for i, rid in enumerate(table["request_id"].to_pylist()) if not (rid in seen or seen.add(rid))]
    if len(rows) > MAX_ANSWERS:  # shipped at least once: duplicates are gone, now a uniform sample
        rows = sorted(np.random.default_rng(0).choice(rows, MAX_ANSWERS, replace=False).tolist())
    picked = table.take(pa.array(rows, pa.int64()))
    for raw_inputs, raw_predictions in zip(picked["inputs"].to_pylist(), picked["predictions"].to_pylist()):
        inputs, predictions = json.loads(raw_inputs or "null"), json.loads(raw_predictions or "null")
        if not isinstance(inputs, list) or not isinstance(predictions, list) or len(inputs) != len(predictions):
            continue  # an image answer logged before summaries were, say
        for values, predicted in zip(inputs, predictions):
            if not isinstance(values, list) or len(values) != len(names):
                continue
            for name, value in zip(names, values):
                columns[name].append(value)
            columns[profiles.PREDICTION].append(predicted)
    return columns


def serving_version(client, pipeline: Pipeline):
    """The production version (its number and run id), or None before the first promotion."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(pipeline.model_name, schema.PRODUCTION)
    except MlflowException:
        return None
    return mv


def profile_of(client, run_id: str) -> dict | None:
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{profiles.PROFILE_ARTIFACT}")
    except Exception:  # a version trained before profiles were kept
        return None


def check(settings: Settings, pipeline: Pipeline, since: float, until: float, airflow_run: str = "") -> dict:
    import mlflow

    client = tracking_client()
    base = {"pipeline": pipeline.name, "since": since, "until": until, "airflow_run": airflow_run}
    mv = serving_version(client, pipeline)
    if mv is None:
        return {**base, "version": "", "rows": 0, "decided": False, "detected": False, "reason": "nothing serves yet"}
    profile = profile_of(client, mv.run_id)
    if profile is None:
        reason = f"v{mv.version} has no training profile (trained before drift monitoring): its successor will"
        return {**base, "version": str(mv.version), "rows": 0, "decided": False, "detected": False, "reason": reason}
    columns = window(settings, pipeline, since, until, str(mv.version))
    result = drift.compare(profile, columns, pipeline.monitor)
    payload = {**base, "version": str(mv.version), **result.to_dict()}
    if not result.decided:
        return payload
    experiment_id = mlflow.set_experiment(experiment(pipeline.name)).experiment_id
    if not result.detected and recently_recorded(client, experiment_id):
        return {**payload, "mlflow_run": "", "report": "(a calm window: recorded at most once an hour)"}
    tags = {
        schema.PIPELINE: pipeline.name,
        schema.MODEL_VERSION: str(mv.version),
        schema.AIRFLOW_RUN: airflow_run,
        "drift.detected": str(result.detected).lower(),
        "drift.features": ",".join(result.drifted),
        "drift.window": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}/"
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}",
        schema.REASON: result.reason,
    }
    with mlflow.start_run(run_name=f"monitor-{pipeline.name}-v{mv.version}", tags=tags) as run:
        mlflow.log_metrics({"rows": result.rows, **{metric_name(f.feature): f.distance for f in result.features}})
        title = f"{pipeline.name} v{mv.version}: live answers against the training profile"
        mlflow.log_text(drift.report(title, profile, columns, result), REPORT_ARTIFACT)
        mlflow.log_dict(payload, RESULT_ARTIFACT)
    prune(client, run.info.experiment_id, settings.retention.monitoring_runs)
    return {**payload, "mlflow_run": run.info.run_id, "report": f"runs:/{run.info.run_id}/{REPORT_ARTIFACT}"}


def metric_name(feature: str) -> str:
    """`drift_<feature>`, in the characters MLflow takes in a metric's name."""
    return "drift_" + re.sub(r"[^\w.\- /:]", "_", feature)


def recently_recorded(client, experiment_id: str) -> bool:
    """Whether a monitoring run was recorded within CALM_RECORD_SECONDS: a calm window then adds
    none (its verdict still reaches Prometheus and `flywheel status`); a drifted one always does."""
    last = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return bool(last) and time.time() - last[0].info.start_time / 1000 < CALM_RECORD_SECONDS


def prune(client, experiment_id: str, keep: int) -> int:
    """Monitoring runs past the newest `keep` are deleted (MLflow's deleted stage; `mlflow gc` purges)."""
    old = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=keep + 100)[keep:]
    for run in old:
        client.delete_run(run.info.run_id)
    return len(old)


def monitor(pipeline: str, since: float, until: float, airflow_run: str = "") -> dict:
    """Compare the window [since, until) of what the pipeline answered with its serving version's profile."""
    settings = Settings.load()
    return check(settings, pipelines.get(settings.pipelines_dir, pipeline), float(since), float(until), airflow_run)


if __name__ == "__main__":
    sys.exit(steps.main(monitor))
