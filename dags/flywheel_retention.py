"""flywheel_retention: every hour, each store the platform writes is kept within its policy.

One task per store (flywheel/operations/retention.py says what each keeps and why): dataset versions,
Bentos and model copies, Airflow's metadata and logs, alerts, dead letters and the access log. The
policies are `Settings.retention` (FLYWHEEL_RETENTION_* in .env); a hand-triggered run may override
them with its params. Each task writes a report that `flywheel status` shows.
"""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, Param, task

STORES = ("datasets", "models", "airflow", "files")
OVERRIDES = {
    "dataset_versions_hours": "hours a replaced upload version is kept",
    "model_versions": "Bentos and model copies kept per pipeline, beyond those that serve or may",
    "airflow_hours": "hours Airflow's run metadata and task logs are kept",
    "alerts_hours": "hours a recorded alert is kept",
    "dead_letters_hours": "hours a dead letter is kept",
    "access_log_mb": "size past which Nginx's access log is rotated",
}


def alert_on_failure(context) -> None:
    from flywheel.operations import alerts

    alerts.task_failed(context)


with DAG(
    dag_id="flywheel_retention",
    schedule="@hourly",
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=1), "on_failure_callback": alert_on_failure},
    tags=["flywheel", "retention"],
    doc_md=__doc__,
    params={name: Param(None, type=["null", "number"], description=why) for name, why in OVERRIDES.items()},
) as dag:
    for store in STORES:

        @task(task_id=store)
        def enforce(store: str = store, *, params=None) -> dict:
            from flywheel.orchestration import tasks

            return tasks.retention_task(store, params)

        enforce()
