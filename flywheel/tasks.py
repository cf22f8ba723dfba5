"""Tasks: what each DAG task does, kept out of the DAG file so DAGs stay wiring only.

These run inside Airflow's environment; anything heavy runs in the ML one through the runner.
"""

from __future__ import annotations

import json
import logging

from flywheel import deploy, pipelines, uploads
from flywheel.airflow_api import AirflowAPI
from flywheel.mlflow_api import MlflowAPI
from flywheel.runner import DatasetRejected, run_step
from flywheel.settings import Settings

log = logging.getLogger(__name__)


def _extras(triggering_asset_events) -> list[dict]:
    """The extra of every asset event that triggered this run, oldest first."""
    found = [e for asset_events in (triggering_asset_events or {}).values() for e in asset_events]
    return [dict(e.extra) for e in sorted(found, key=lambda e: e.timestamp)]


def _clients(settings: Settings) -> tuple[MlflowAPI, AirflowAPI]:
    return MlflowAPI.connect(settings), AirflowAPI.connect(settings)


def _trigger(pipeline: pipelines.Pipeline, dag_run, params) -> dict:
    """Who started the run and with what: an upload, or a person (Airflow's Trigger form, `flywheel train`).

    A hand-triggered run's parameters are checked against the framework here, so a bad one fails
    the run at once, with the reason, before any training.
    """
    from airflow.sdk.exceptions import AirflowFailException

    run_type = getattr(getattr(dag_run, "run_type", ""), "value", getattr(dag_run, "run_type", ""))
    if run_type != "manual":
        return {"kind": "upload", "by": "", "note": "", "overrides": {}, "dataset": ""}
    params = dict(params or {})
    try:
        overrides = pipelines.check_params(pipeline.framework, params.get("params") or {}, f"train_{pipeline.name}")
    except pipelines.PipelineError as exc:
        raise AirflowFailException(str(exc)) from exc
    by = getattr(dag_run, "triggering_user_name", None) or "unknown"
    return {
        "kind": "manual",
        "by": by,
        "note": str(params.get("note") or ""),
        "overrides": overrides,
        "dataset": str(params.get("dataset") or "").strip(),
    }


def plan(pipeline_name: str, airflow_run: str, triggering_asset_events=None, dag_run=None, params=None) -> dict:
    """Pick what this run trains on: the newest upload in MinIO, whatever events triggered it, or
    the upload a person chose.

    An upload-triggered run is skipped (`skip` names why) when that very upload was already trained
    or rejected: a burst's later events then cost a plan and an account, not a retraining.
    """
    from airflow.sdk.exceptions import AirflowFailException

    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    planned_at = uploads.now()
    trigger = _trigger(pipeline, dag_run, params)
    for e in _extras(triggering_asset_events):
        log.info(
            "triggered by the upload of %s (etag %s, version %s)", e.get("key"), e.get("etag"), e.get("version_id")
        )
    if trigger["kind"] == "manual":
        log.info("triggered by %s: %s", trigger["by"], {k: v for k, v in trigger.items() if k != "kind"})
        try:
            dataset = uploads.chosen(settings, pipeline, trigger["dataset"])
        except LookupError as exc:
            raise AirflowFailException(str(exc)) from exc
    else:
        dataset = uploads.newest(settings, pipeline)
    planned = {
        "dataset": dataset,
        "planned_at": planned_at.isoformat(),
        "skip": "",
        "trained_by": "",
        "trigger": trigger,
    }
    mlflow = MlflowAPI.connect(settings)
    try:
        for run in mlflow.search_runs(pipeline.name, "attributes.status = 'RUNNING'"):
            # Runs are serial per pipeline: a platform run still RUNNING now was killed mid-way.
            if run["data"]["tags"].get("airflow.run_id"):
                run_id = run["info"]["run_id"]
                mlflow.set_tags(run_id, {"flywheel.reason": f"killed before it finished (found by {airflow_run})"})
                mlflow.end_run(run_id, "FAILED")
                log.info("MLflow run %s was left RUNNING by a killed process: marked FAILED", run_id)
        if dataset is None:
            planned["skip"] = f"nothing to train: no object under datasets/{pipeline.dataset_prefix} starts a run"
        elif trigger["kind"] == "manual":
            pass  # a person asked for this training: it runs even on data trained before
        elif earlier := _decided(mlflow, pipeline, dataset):
            planned["trained_by"] = earlier["info"]["run_id"]
            planned["skip"] = (
                f"the newest upload, {dataset['key']}, was already decided on by MLflow run {planned['trained_by']}"
            )
    finally:
        mlflow.close()
    if dataset is not None:
        log.info("newest upload: %s (etag %s, version %s)", dataset["key"], dataset["etag"], dataset["version_id"])
    if planned["skip"]:
        log.info("no training: %s", planned["skip"])
    return planned


def _decided(mlflow: MlflowAPI, pipeline: pipelines.Pipeline, dataset: dict) -> dict | None:
    """An earlier run that trained (and gated) or rejected exactly this object version."""
    if not dataset.get("version_id"):
        return None
    for run in mlflow.search_runs(pipeline.name, f"tags.`dataset.version_id` = '{dataset['version_id']}'"):
        tags = run["data"]["tags"]
        if (run["info"]["status"] == "FINISHED" and tags.get("flywheel.decision")) or tags.get(
            "flywheel.status"
        ) == "rejected":
            return run
    return None


def validate(pipeline_name: str, planned: dict, airflow_run: str = "") -> dict:
    """Validate the planned upload in the ML environment (the local runner)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    if planned["skip"]:
        raise AirflowSkipException(planned["skip"])
    settings = Settings.load()
    dataset = planned["dataset"]
    try:
        result = run_step(
            settings,
            "validate",
            "--pipeline",
            pipeline_name,
            "--dataset",
            json.dumps(dataset),
            "--airflow-run",
            airflow_run,
        )
    except DatasetRejected as exc:
        raise AirflowFailException(str(exc)) from exc  # no retry: the upload itself is bad
    return {"dataset": dataset, "rows": result["rows"]}


def train(pipeline_name: str, validated: dict, planned: dict, airflow_run: str) -> dict:
    settings = Settings.load()
    return run_step(
        settings,
        "train",
        "--pipeline",
        pipeline_name,
        "--dataset",
        json.dumps(validated["dataset"]),
        "--trigger",
        json.dumps(planned["trigger"]),
        "--airflow-run",
        airflow_run,
    )


def account(pipeline_name: str, airflow_run: str, planned: dict | None) -> dict:
    """Write the uploads ledger on this run's MLflow run (flywheel/uploads.py), whatever happened.

    Attempts killed mid-way end FAILED. A run that failed before deciding anything accounts for
    nothing: its uploads stay pending, and the reconciler starts another run for them.
    """
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    mlflow, airflow = _clients(settings)
    try:
        runs = mlflow.search_runs(pipeline.name, f"tags.`airflow.run_id` = '{airflow_run}'")
        for run in runs:
            if run["info"]["status"] == "RUNNING":
                mlflow.set_tags(run["info"]["run_id"], {"flywheel.reason": "killed before it finished"})
                mlflow.end_run(run["info"]["run_id"], "FAILED")
        trained = next(
            (r for r in runs if r["info"]["status"] == "FINISHED" and r["data"]["tags"].get("flywheel.decision")), None
        )
        rejected = next((r for r in runs if r["data"]["tags"].get("flywheel.status") == "rejected"), None)
        if planned is None:
            return _nothing(f"{airflow_run} has no plan: its uploads stay pending")
        if planned.get("trigger", {}).get("kind") == "manual":
            return _nothing("a hand-triggered run: uploads are accounted for by the runs they trigger")
        if planned["skip"]:
            outcome, by, target = "already-trained", planned["trained_by"], None
        elif trained is not None:
            outcome, by, target = "trained", trained["info"]["run_id"], trained
        elif rejected is not None:
            outcome, by, target = "rejected", rejected["info"]["run_id"], rejected
        else:
            return _nothing(f"{airflow_run} failed before a decision: its uploads stay pending")
        events = uploads.events_after(airflow, pipeline, uploads.watermark(mlflow, pipeline))
        entries, mark = uploads.account(
            events, planned["dataset"], uploads.parse_time(planned["planned_at"]), outcome, by
        )
        if not entries:
            return _nothing("no upload waits to be accounted for")
        if target is None:
            target = mlflow.create_run(
                pipeline.name,
                f"account-{pipeline.name}",
                {
                    "airflow.run_id": airflow_run,
                    "flywheel.pipeline": pipeline.name,
                    "flywheel.decision": "skipped",
                    "flywheel.reason": planned["skip"],
                },
            )
            mlflow.end_run(target["info"]["run_id"], "FINISHED")
        uploads.record(mlflow, target, entries, mark)
    finally:
        mlflow.close()
        airflow.close()
    for entry in entries:
        log.info("upload %s (version %s): %s (%s)", entry.key, entry.version_id, entry.role, entry.by)
    counts = {role: sum(e.role == role for e in entries) for role in uploads.ROLES}
    return {"mlflow_run": target["info"]["run_id"], "accounted": len(entries), **counts}


def _nothing(reason: str) -> dict:
    log.info("nothing accounted: %s", reason)
    return {"accounted": 0, "reason": reason}


def production_extra(trained: dict, airflow_run: str) -> dict:
    """What the production-model asset event carries: the lineage from upload to version."""
    return {
        "pipeline": trained["pipeline"],
        "model_name": trained["model_name"],
        "version": trained["version"],
        "run_id": trained["run_id"],
        "dataset": trained["dataset"],
        "metrics": trained["metrics"],
        "reason": trained["reason"],
        "airflow_run": airflow_run,
    }


def newest_production(triggering_asset_events) -> dict:
    extras = [e for e in _extras(triggering_asset_events) if "version" in e]
    if not extras:
        raise ValueError("deploy needs a production-model event (it runs after a promotion or a rollback)")
    return extras[-1]  # the latest word on what production is, promotion or rollback


def build(pipeline_name: str, production: dict) -> dict:
    settings = Settings.load()
    built = run_step(settings, "build", "--pipeline", pipeline_name, "--version", str(production["version"]))
    # The rollout says so when what it rolls out is a rollback.
    return {**built, "rollback_from": production.get("rollback_from") or ""}


def rollout(pipeline_name: str, built: dict) -> dict:
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    d = deploy.rollout(settings, pipeline, built["version"], built["bento_tag"], log=log.info)
    if built.get("rollback_from"):
        from flywheel import alerts

        summary = f"{pipeline_name} rolled back from v{built['rollback_from']} to v{d.version}: now serving"
        labels = {"pipeline": pipeline_name, "severity": "info", "version": d.version}
        alerts.notify(settings, [alerts.alert("airflow", "Flywheel: rollback", summary, labels, status="resolved")])
    return {
        "pipeline": d.pipeline,
        "version": d.version,
        "bento_tag": d.bento_tag,
        "colour": d.colour,
        "url": f"{settings.predict_url}/{d.pipeline}/predict",
    }
