"""Tasks: what each DAG task does, kept out of the DAG file so DAGs stay wiring only.

These run inside Airflow's environment; anything heavy runs in the ML one through the runner.
"""

from __future__ import annotations

import json
import logging

from flywheel import deploy, events, pipelines
from flywheel.runner import DatasetRejected, run_step
from flywheel.settings import Settings

log = logging.getLogger(__name__)


def _extras(triggering_asset_events) -> list[dict]:
    """The extra of every asset event that triggered this run, oldest first."""
    found = [e for asset_events in (triggering_asset_events or {}).values() for e in asset_events]
    return [dict(e.extra) for e in sorted(found, key=lambda e: e.timestamp)]


def plan(pipeline_name: str, triggering_asset_events) -> dict:
    """Pick the newest upload among the events this run consumed, and record them all."""
    consumed = [e for e in _extras(triggering_asset_events) if "key" in e]
    if not consumed:
        raise ValueError(f"train_{pipeline_name} needs a dataset event: upload a file under datasets/{pipeline_name}/")
    for e in consumed:
        log.info("consumed upload %s (etag %s, version %s)", e["key"], e.get("etag"), e.get("version_id"))
    dataset = events.newest(consumed)
    if len(consumed) > 1:
        log.info("%d uploads folded into this run: training on the newest, %s", len(consumed), dataset["key"])
    return {"dataset": dataset, "consumed": consumed}


def validate(pipeline_name: str, triggering_asset_events, airflow_run: str = "") -> dict:
    """Plan, then validate the chosen upload in the ML environment (the local runner)."""
    planned = plan(pipeline_name, triggering_asset_events)
    dataset, consumed = planned["dataset"], planned["consumed"]
    settings = Settings.load()
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
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc  # no retry: the upload itself is bad
    return {"dataset": dataset, "consumed": consumed, "rows": result["rows"]}


def train(pipeline_name: str, validated: dict, airflow_run: str) -> dict:
    settings = Settings.load()
    return run_step(
        settings,
        "train",
        "--pipeline",
        pipeline_name,
        "--dataset",
        json.dumps(validated["dataset"]),
        "--consumed",
        json.dumps(validated["consumed"]),
        "--airflow-run",
        airflow_run,
    )


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
    return run_step(settings, "build", "--pipeline", pipeline_name, "--version", str(production["version"]))


def rollout(pipeline_name: str, built: dict) -> dict:
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, pipeline_name)
    d = deploy.rollout(settings, pipeline, built["version"], built["bento_tag"], log=log.info)
    return {
        "pipeline": d.pipeline,
        "version": d.version,
        "bento_tag": d.bento_tag,
        "colour": d.colour,
        "url": f"{settings.predict_url}/{d.pipeline}/predict",
    }
