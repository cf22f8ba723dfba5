"""Tasks: what each DAG task does, kept out of the DAG file so the DAGs stay wiring only.

These run in Airflow's environment, the same way whichever runner backend is configured: the ML
steps (validate, train, build) go through the runner, and each task decides from the StepResult
(a rejection fails the task at once, with no retry; a failure is retried).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import httpx
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from flywheel.clients import inference
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines, schema
from flywheel.core.schema import parse_time
from flywheel.core.settings import Settings
from flywheel.core.steps import REJECTED, StepSpec
from flywheel.core.upload import Upload
from flywheel.operations import alerts, monitoring, retention
from flywheel.orchestration import runner
from flywheel.platform import deployments
from flywheel.serving import live
from flywheel.serving import rollout as serving
from flywheel.training import ledger, planning

log = logging.getLogger(__name__)

VALIDATE = "flywheel.training.validate"
MONITOR = "flywheel.inference.monitor"
DERIVE = "flywheel.inference.derive"
TRAIN = "flywheel.training.train"
BUILD = "flywheel.serving.build"
PRUNE = "flywheel.serving.prune"


class StepFailed(RuntimeError):
    """A step failed in a way a retry may fix; the message is the step's own reason."""


def step(settings: Settings, module: str, background: bool = False, **args) -> dict:
    """Run a step where the runner says; its payload, or AirflowFailException (rejected), or StepFailed."""
    result = runner.run(settings, StepSpec(module, args, background))
    if result.status == REJECTED:
        raise AirflowFailException(result.reason)  # no retry: the input itself is bad
    if not result.ok:
        raise StepFailed(result.reason)
    return result.payload


def trigger(pipeline: pipelines.Pipeline, dag_run, params) -> schema.Trigger:
    """Who started the run and with what: an upload, or a person (Airflow's Trigger form, `flywheel train`).

    A hand-triggered run's parameters are checked against the framework here, so a bad one fails
    the run at once, with the reason, before any training.
    """
    run_type = getattr(getattr(dag_run, "run_type", ""), "value", getattr(dag_run, "run_type", ""))
    if run_type == "scheduled":
        return schema.Trigger(kind="schedule", by="schedule", note=pipeline.retrain.schedule)
    if run_type != "manual":
        return schema.Trigger()
    params = dict(params or {})
    try:
        overrides = pipelines.check_params(pipeline.framework, params.get("params") or {}, f"train_{pipeline.name}")
    except pipelines.PipelineError as exc:
        raise AirflowFailException(str(exc)) from exc
    return schema.Trigger(
        kind="manual",
        by=getattr(dag_run, "triggering_user_name", None) or "unknown",
        note=str(params.get("note") or ""),
        overrides=overrides,
        dataset=str(params.get("dataset") or "").strip(),
    )


def plan(pipeline_name: str, airflow_run: str, triggering_asset_events=None, dag_run=None, params=None) -> dict:
    """Pick what this run trains on (training/planning.py): the newest upload, or a person's choice."""
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    started_by = trigger(pipeline, dag_run, params)
    asked = [e.extra for events in (triggering_asset_events or {}).values() for e in events if e.extra.get("retrain")]
    if asked and not started_by.manual:  # monitor_<p> asked for it (drift): it retrains even trained data
        started_by = schema.Trigger(kind="drift", by=f"monitor_{pipeline.name}", note=str(asked[-1].get("reason", "")))
    for events in (triggering_asset_events or {}).values():
        for e in events:
            log.info("triggered by the upload of %s (etag %s)", e.extra.get("key"), e.extra.get("etag"))
    if started_by.manual:
        log.info("triggered by %s: %s", started_by.by, started_by.to_dict())
    triggered_by = [
        Upload.from_dict({"pipeline": pipeline.name, "bucket": "", "key": "", **e.extra})
        for events in (triggering_asset_events or {}).values()
        for e in events
        if e.extra.get("key")
    ]
    try:
        planned, killed = planning.plan(settings, pipeline, started_by, airflow_run, triggered_by)
    except LookupError as exc:
        raise AirflowFailException(str(exc)) from exc
    for run_id in killed:
        log.info("MLflow run %s was left RUNNING by a killed process: marked FAILED", run_id)
    if planned.upload is not None:
        log.info("newest upload: %s", planned.upload.describe())
    if planned.skip:
        log.info("no training: %s", planned.skip)
    return planned.to_dict()


def validate(pipeline_name: str, planned: dict, airflow_run: str) -> dict:
    plan_ = planning.Plan.from_dict(planned)
    if plan_.skip:
        raise AirflowSkipException(plan_.skip)
    return step(
        Settings.load(), VALIDATE, pipeline=pipeline_name, upload=plan_.upload.to_dict(), airflow_run=airflow_run
    )


def train(pipeline_name: str, planned: dict, airflow_run: str) -> dict:
    plan_ = planning.Plan.from_dict(planned)
    return step(
        Settings.load(),
        TRAIN,
        pipeline=pipeline_name,
        upload=plan_.upload.to_dict(),
        trigger=plan_.trigger.to_dict(),
        airflow_run=airflow_run,
    )


def production_extra(trained: dict, airflow_run: str) -> dict:
    """What the production-model asset event carries: the lineage from upload to version."""
    return {
        "pipeline": trained["pipeline"],
        "model_name": trained["model_name"],
        "version": trained["version"],
        "run_id": trained["run_id"],
        "dataset": trained["upload"],  # the upload that trained it (core/upload.py)
        "metrics": trained["metrics"],
        "reason": trained["reason"],
        "airflow_run": airflow_run,
    }


def _asset_events(events) -> list[dict]:
    """Asset events as the ledger reads them: {id, timestamp (ISO), extra}, oldest first."""
    found = [{"id": e.id, "timestamp": e.timestamp.isoformat(), "extra": dict(e.extra or {})} for e in events]
    return sorted(found, key=lambda e: (parse_time(e["timestamp"]), e["id"]))


def account(pipeline_name: str, airflow_run: str, planned: dict | None, inlet_events, dataset_asset) -> dict:
    """Write the uploads ledger on this run's MLflow run (training/ledger.py), whatever happened.

    Attempts killed mid-way end FAILED. A run that failed before deciding anything accounts for
    nothing: its uploads stay pending, and the reconciler starts another run for them. The dataset
    asset's events come from Airflow itself (the Task SDK's inlet events).
    """
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    with MlflowAPI.connect(settings) as mlflow:
        runs = mlflow.search_runs(pipeline.name, schema.tag_filter(schema.AIRFLOW_RUN, airflow_run))
        for run in runs:
            if run["info"]["status"] == "RUNNING":
                mlflow.set_tags(run["info"]["run_id"], {schema.REASON: "killed before it finished"})
                mlflow.end_run(run["info"]["run_id"], "FAILED")
        records = [(run, schema.RunRecord.from_tags(run["data"]["tags"])) for run in runs]
        trained = next((r for r, rec in records if r["info"]["status"] == "FINISHED" and rec.decision), None)
        rejected = next((r for r, rec in records if rec.status == schema.REJECTED), None)
        failed = next((r for r, rec in records if rec.status == schema.FAILED), None)
        if planned is None:
            return _nothing(f"{airflow_run} has no plan: its uploads stay pending")
        plan_ = planning.Plan.from_dict(planned)
        if plan_.trigger.manual:
            return _nothing("a hand-triggered run: uploads are accounted for by the runs they trigger")
        if plan_.trigger.kind == "schedule":
            return _nothing("a scheduled run: uploads are accounted for by the runs they trigger")
        if plan_.skip and plan_.decided:
            outcome, by, target = plan_.decided, plan_.trained_by, None  # what that earlier run did
        elif plan_.skip:
            outcome, by, target = "", f"nothing trained: {plan_.skip}", None
        elif trained is not None:
            outcome, by, target = "trained", trained["info"]["run_id"], trained
        elif rejected is not None:
            outcome, by, target = "rejected", rejected["info"]["run_id"], rejected
        elif failed is not None:  # every attempt failed (the last one recorded why): not retried for ever
            outcome, by, target = "failed", failed["info"]["run_id"], failed
        else:
            return _nothing(f"{airflow_run} failed before a decision: its uploads stay pending")
        mark = ledger.watermark(mlflow, pipeline)
        accessor = inlet_events[dataset_asset].ascending(True).limit(ledger.MAX_EVENTS + 50)
        if mark is not None:
            accessor = accessor.after(parse_time(mark.timestamp))
        events = [e for e in _asset_events(accessor) if ledger.after(e, mark)][: ledger.MAX_EVENTS]
        planned_upload = plan_.upload if outcome else None
        entries, new_mark = ledger.account(events, planned_upload, parse_time(plan_.planned_at), outcome, by)
        if not entries:
            return _nothing("no upload waits to be accounted for")
        if target is None:
            record = schema.RunRecord(
                pipeline.name, airflow_run=airflow_run, decision=schema.SKIPPED, reason=plan_.skip
            )
            target = mlflow.create_run(pipeline.name, f"account-{pipeline.name}", record.tags())
            mlflow.end_run(target["info"]["run_id"], "FINISHED")
        ledger.record(mlflow, target, entries, new_mark)
    for entry in entries:
        log.info("upload %s (version %s): %s (%s)", entry.key, entry.version_id, entry.role, entry.by)
    counts = {role: sum(e.role == role for e in entries) for role in schema.LEDGER_ROLES}
    return {"mlflow_run": target["info"]["run_id"], "accounted": len(entries), **counts}


def _nothing(reason: str) -> dict:
    log.info("nothing accounted: %s", reason)
    return {"accounted": 0, "reason": reason}


def newest_production(triggering_asset_events) -> dict:
    """The latest word on what production is (a promotion's or a rollback's production-model event)."""
    found = [e for events in (triggering_asset_events or {}).values() for e in events if "version" in (e.extra or {})]
    if not found:
        raise ValueError("deploy needs a production-model event (it runs after a promotion or a rollback)")
    return dict(max(found, key=lambda e: e.timestamp).extra)


def build(pipeline_name: str, production: dict) -> dict:
    built = step(Settings.load(), BUILD, pipeline=pipeline_name, version=str(production["version"]))
    # The rollout says so when what it rolls out is a rollback.
    return {**built, "rollback_from": production.get("rollback_from") or ""}


def rollout(pipeline_name: str, built: dict) -> dict:
    """Blue/green: the new version serves when this returns. A live strategy with a production to
    judge it against: the candidate's replicas are proven and get their first share of traffic;
    `judge` decides the rest."""
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    serving_now = deployments.current(settings, pipeline_name)
    if (
        pipeline.rollout.live
        and not built.get("rollback_from")
        and serving_now is not None
        and serving_now.version != str(built["version"])
    ):
        candidate = serving.start_candidate(settings, pipeline, built["version"], built["bento_tag"], log=log.info)
        state = live.begin(settings, pipeline, candidate, log=log.info)
        return {"pipeline": pipeline_name, "version": candidate.version, "judging": True, "rollout": state.summary}
    d = serving.rollout(settings, pipeline, built["version"], built["bento_tag"], log=log.info)
    if built.get("rollback_from"):
        summary = f"{pipeline_name} rolled back from v{built['rollback_from']} to v{d.version}: now serving"
        labels = {"pipeline": pipeline_name, "severity": "info", "version": d.version}
        alerts.notify(settings, [alerts.alert("airflow", "Flywheel: rollback", summary, labels, status="resolved")])
    return live.deployment_extra(settings, pipeline_name) or {}


def judge(pipeline_name: str, rolled: dict | None) -> dict:
    """One look at a live rollout (serving/live.py): {status: running, wait} or promoted/aborted, with
    what serves afterwards. A blue/green rollout has nothing to judge."""
    if not rolled or not rolled.get("judging"):
        return {"status": live.PROMOTED, "wait": 0, "reason": "blue/green", "deployment": rolled or {}}
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    verdict = live.judge(settings, pipeline, log=log.info)
    return dataclasses.asdict(verdict)


def monitor(pipeline_name: str, airflow_run: str) -> dict:
    """Judge the last window of answers against the serving version's training profile
    (inference/monitor.py), record the verdict (Prometheus, `flywheel status`), alert on drift.

    A window with too few answers costs one count from the inference service, not a step."""
    import time

    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    monitoring.follow_up(settings, pipeline)
    since, until = monitoring.window(pipeline, time.time())
    answers = inference.answered(settings, pipeline_name, since)
    if answers < pipeline.monitor.min_rows:
        reason = f"{answers} answers in the window, fewer than the {pipeline.monitor.min_rows} it needs"
        current = deployments.current(settings, pipeline_name)
        result = {
            "pipeline": pipeline_name,
            "version": current.version if current else "",
            "since": since,
            "until": until,
            "rows": answers,
            "decided": False,
            "detected": False,
            "reason": reason,
            "features": [],
        }
    else:
        result = step(
            settings,
            MONITOR,
            background=True,
            pipeline=pipeline_name,
            since=since,
            until=until,
            airflow_run=airflow_run,
        )
    log.info("v%s: %s", result.get("version"), result["reason"])
    if result.get("detected"):  # first: the alert is the point, the export can wait for the next window
        alerts.notify(settings, [monitoring.drift_alert(result)])
    try:
        inference.record_drift(settings, pipeline_name, result)
    except httpx.HTTPError as exc:
        log.warning("the verdict did not reach the inference service (%s): the next window's will", exc)
    return result


def retrain(pipeline_name: str, result: dict, airflow_run: str) -> dict:
    """Drift detected: retrain on what production saw, or on the newest upload. Never in a loop
    (operations/monitoring.py).

    With `retrain.with_feedback`, a dataset derived from the labelled answers is written as a new
    upload, and MinIO's notification starts train_<p> as for any upload ({"emit": False}). Without,
    `emit` asks train_<p> to retrain the newest upload through the dataset asset ({"emit": True}),
    unless the serving version was trained on it already (retraining it would change nothing)."""
    import time

    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    last = monitoring.load(settings, pipeline_name)
    go, why = monitoring.should_retrain(pipeline, result, last, time.time())
    if not go:
        raise AirflowSkipException(why)
    if pipeline.retrain.with_feedback:
        derived = step(settings, DERIVE, pipeline=pipeline_name, reason=result["reason"], monitor_run=airflow_run)
        if not derived["written"]:
            raise AirflowSkipException(derived["reason"])
        upload = Upload(pipeline_name, settings.datasets_bucket, derived["key"], derived["etag"], derived["version_id"])
        log.info(
            "derived %s: %s rows of %s plus %s labelled rows",
            derived["key"],
            derived["base_rows"],
            derived["base"]["key"],
            derived["feedback_rows"],
        )
    else:
        upload = planning.newest(settings, pipeline)
        if upload is None:
            raise AirflowSkipException("nothing to retrain on")
        with MlflowAPI.connect(settings) as mlflow:
            tags = mlflow.model_version(pipeline.model_name, result["version"])["tags"]
        served = schema.upload_from_tags(tags, pipeline_name)
        if served is not None and served.same_as(upload):
            raise AirflowSkipException(
                f"v{result['version']} was trained on the newest upload, {upload.key}: retraining on it would "
                "change nothing (upload new data, or set retrain.with_feedback)"
            )
        log.info("retraining on %s for drift on v%s", upload.key, result["version"])
    monitoring.save(
        settings,
        pipeline_name,
        monitoring.Retraining(time.time(), result["version"], upload.key, upload.version_id, result["reason"]),
    )
    return {
        "emit": not pipeline.retrain.with_feedback,
        "upload": upload.to_dict(),
        "reason": result["reason"],
    }


def emit_retraining(retrained: dict, outlet_events, dataset_asset) -> dict:
    """The dataset asset's event that starts train_<p> for drift (the newest upload, retrained)."""
    if not retrained.get("emit"):
        raise AirflowSkipException(
            f"{retrained['upload']['key']} was written as an upload: MinIO's notification starts the training"
        )
    outlet_events[dataset_asset].extra = {
        **retrained["upload"],
        "retrain": "drift",
        "reason": retrained["reason"][:500],
    }
    return retrained


def retention_task(store: str, params: dict | None) -> dict:
    """Keep one store within its policy (operations/retention.py); a hand-triggered run's params override it."""
    settings = Settings.load()
    overrides = {k: v for k, v in (params or {}).items() if v is not None}
    policy = dataclasses.replace(settings.retention, **overrides)
    log.info("%s: %s", store, retention.policies(policy)[store])
    if store == "datasets":
        return retention.datasets(settings, policy)
    if store == "models":
        pruned = step(settings, PRUNE, plan=retention.model_store_plan(settings, policy))
        return retention.models_report(settings, policy, pruned)
    if store == "airflow":
        return retention.airflow(settings, policy, dict(os.environ))
    return retention.files(settings, policy)
