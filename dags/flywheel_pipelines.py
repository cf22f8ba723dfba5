"""Flywheel's DAGs: three per pipeline declared in `pipelines/*.yaml`.

train_<pipeline> runs whenever MinIO reports a new object under `datasets/<pipeline>/` (the events
bridge turns the bucket notification into an event on the dataset asset), or by hand. It plans what
to train on, validates the upload, trains and gates a challenger in MLflow, and emits the
production-model asset only when the challenger is promoted; `account` records every upload the run
saw, whatever happened. deploy_<pipeline> runs on that event: it builds a Bento from exactly that
registered version and rolls it out behind Nginx, blue/green or live (the pipeline's `rollout:`):
`judge` then decides step by step on live traffic, deferred on the triggerer between looks, and
the deployment asset is emitted once the new version takes all traffic.

monitor_<p> runs every `monitor.every_minutes`: it compares the last window of what production
answered (the inference log, `s3://inference/<p>`) with the serving version's training profile, records
and alerts on drift, and with `retrain.on_drift` starts a retraining through the dataset asset (on a
dataset derived from feedback, with `retrain.with_feedback`). `retrain.schedule` adds a time schedule
to train_<p>'s asset schedule.

Asset view:  s3://datasets/<p>  ->  train_<p>  ->  model://<p>/production  ->  deploy_<p>  ->  deployment://<p>/production
             s3://inference/<p>  ->  monitor_<p>  ->  s3://datasets/<p>   (the loop, with retrain.on_drift)

The ML steps (validate, train, build) run where FLYWHEEL_RUNNER says (flywheel/orchestration/runner.py):
the same tasks, states and callbacks with any backend. Parsing stays cheap: only YAML is read here;
the work is in flywheel.orchestration.tasks, imported when a task runs.
"""

from __future__ import annotations

import datetime
import logging

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from flywheel.core import pipelines
from flywheel.core.settings import Settings
from flywheel.orchestration.judge import JudgeRollout

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def alert_on_failure(context) -> None:
    """A task that failed for good (a rejected dataset, a failed deploy) raises an alert."""
    from flywheel.operations import alerts

    alerts.task_failed(context)


# A rejected dataset fails at once (AirflowFailException); retries are for infrastructure hiccups.
DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": datetime.timedelta(seconds=5),
    "on_failure_callback": alert_on_failure,
}


def assets(p: pipelines.Pipeline) -> tuple[Asset, Asset, Asset]:
    return (
        Asset(uri=p.dataset_uri, name=f"{p.name}_dataset"),
        Asset(uri=p.model_uri, name=f"{p.name}_production_model"),
        Asset(uri=p.deployment_uri, name=f"{p.name}_deployment"),
    )


# Airflow's presets, as cron: CronTriggerTimetable takes expressions only.
PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
}


def train_schedule(p: pipelines.Pipeline, dataset: Asset):
    """Every upload, and, with `retrain.schedule`, the clock too (a scheduled run retrains the newest upload)."""
    if not p.retrain.schedule:
        return [dataset]
    cron = PRESETS.get(p.retrain.schedule, p.retrain.schedule)
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[dataset])


def train_dag(p: pipelines.Pipeline) -> DAG:
    dataset, production_model, _ = assets(p)
    with DAG(
        dag_id=f"train_{p.name}",
        schedule=train_schedule(p, dataset),
        start_date=START,
        catchup=False,
        default_args=DEFAULT_ARGS,
        # One at a time: `plan` trains on the newest upload in MinIO, so uploads arriving mid-run are
        # trained by the next run, and `account` records each one (flywheel/training/ledger.py).
        max_active_runs=1,
        tags=["flywheel", "train", p.name],
        doc_md=f"Retrain **{p.name}** ({p.framework}, {p.task}) on the newest upload to `{p.dataset_uri}/`, "
        "or by hand (Trigger, or `flywheel train`) with the parameters below.",
        # A hand-triggered run's choices; an upload-triggered run keeps the defaults.
        params={
            "dataset": Param(
                "", type="string", description=f"key or version id under datasets/{p.name}/; empty: the newest"
            ),
            "params": Param({}, type="object", description=f"{p.framework} parameters overriding the pipeline file's"),
            "note": Param("", type="string", maxLength=500, description="why this run, recorded on it"),
        },
    ) as dag:

        @task(task_id="plan")
        def plan_training(*, triggering_asset_events=None, run_id=None, dag_run=None, params=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.plan(p.name, run_id, triggering_asset_events, dag_run, params)

        @task
        def validate(planned: dict, *, run_id=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.validate(p.name, planned, run_id)

        @task
        def train(planned: dict, *, run_id=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.train(p.name, planned, run_id)

        @task(outlets=[production_model])
        def publish(trained: dict, *, outlet_events=None, run_id=None) -> dict:
            from airflow.sdk.exceptions import AirflowSkipException

            from flywheel.orchestration import tasks

            if not trained["promoted"]:
                # No production event: nothing downstream is redeployed.
                raise AirflowSkipException(f"v{trained['version']} not promoted: {trained['reason']}")
            extra = tasks.production_extra(trained, run_id)
            outlet_events[production_model].extra = extra
            return extra

        # Whatever happened after the plan, every upload this run saw is recorded in MLflow. A teardown:
        # it runs once the others are done, and their outcome, not its own, is the run's.
        @task(retries=4, inlets=[dataset])
        def account(*, ti=None, run_id=None, inlet_events=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.account(p.name, run_id, ti.xcom_pull(task_ids="plan"), inlet_events, dataset)

        planned = plan_training()
        trained = train(planned)
        validate(planned) >> trained
        publish(trained) >> account().as_teardown(setups=planned)
    return dag


def deploy_dag(p: pipelines.Pipeline) -> DAG:
    _, production_model, deployment = assets(p)
    with DAG(
        dag_id=f"deploy_{p.name}",
        schedule=[production_model],
        start_date=START,
        catchup=False,
        default_args=DEFAULT_ARGS,
        max_active_runs=1,
        tags=["flywheel", "deploy", p.name],
        doc_md=f"Build and roll out the production **{p.name}** model behind Nginx ({p.rollout.strategy}).",
    ) as dag:

        @task
        def build(*, triggering_asset_events=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.build(p.name, tasks.newest_production(triggering_asset_events))

        @task
        def rollout(built: dict) -> dict:
            from flywheel.orchestration import tasks

            return tasks.rollout(p.name, built)

        # A failed guardrail fails it at once (the candidate is already stopped): no retry.
        rollout(build()) >> JudgeRollout(task_id="judge", pipeline=p.name, outlets=[deployment])
    return dag


def monitor_dag(p: pipelines.Pipeline) -> DAG:
    dataset, _, _ = assets(p)
    inference_log = Asset(uri=p.inference_uri, name=f"{p.name}_inference_log")
    with DAG(
        dag_id=f"monitor_{p.name}",
        schedule=datetime.timedelta(minutes=p.monitor.every_minutes),
        start_date=START,
        catchup=False,
        default_args={**DEFAULT_ARGS, "retries": 1},
        max_active_runs=1,
        tags=["flywheel", "monitor", p.name],
        doc_md=f"Drift of what **{p.name}** answers against its serving version's training data, every "
        f"{p.monitor.every_minutes:g} min over the last {p.monitor.window_minutes:g} min"
        + ("; retrains on drift" + (" with feedback" if p.retrain.with_feedback else "") if p.retrain.on_drift else ""),
    ) as dag:

        @task(inlets=[inference_log])
        def check(*, run_id=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.monitor(p.name, run_id)

        checked = check()
        if p.retrain.on_drift:

            @task(retries=0)
            def retrain(result: dict, *, run_id=None) -> dict:
                from flywheel.orchestration import tasks

                return tasks.retrain(p.name, result, run_id)

            # The loop in the Asset view: monitor_<p> -> s3://datasets/<p>. A dataset derived from
            # feedback arrives as an upload instead (its own notification), and this skips.
            @task(outlets=[dataset], retries=2)
            def emit(retrained: dict, *, outlet_events=None) -> dict:
                from flywheel.orchestration import tasks

                return tasks.emit_retraining(retrained, outlet_events, dataset)

            emit(retrain(checked))
    return dag


_pipelines, _errors = pipelines.load_all(Settings.load().pipelines_dir)
for _error in _errors.values():  # a broken pipeline file is reported and skipped; the others still load
    logging.getLogger(__name__).error("skipping pipeline: %s", _error)
for _p in _pipelines:
    try:  # one pipeline's DAGs that cannot be made are reported; the others still load
        made = {f"train_{_p.name}": train_dag(_p), f"deploy_{_p.name}": deploy_dag(_p)}
        if _p.monitor.enabled:
            made[f"monitor_{_p.name}"] = monitor_dag(_p)
    except Exception:
        logging.getLogger(__name__).exception("skipping pipeline %s: its DAGs cannot be made", _p.name)
        continue
    globals().update(made)
