"""Airflow's command line with upstream fixes applied first: every Airflow process starts here.

Airflow 3.3.2 answers 500 on any list of asset events that holds an event whose Dag run is still
queued: a queued run has no start date, and three response models declare it required
(apache/airflow#71360, fixed by #71379 after 3.3.2). Flywheel's train DAGs run one at a time, so an
upload that lands while its pipeline trains creates a run that waits queued for minutes, and for
those minutes `GET /api/v2/assets/events` (the reconciler, `flywheel lineage`) and the Task SDK's
`inlet_events` (the uploads ledger in `tasks.account`) fail for that asset.

The fix is the upstream one: `start_date` may be null. It has to land before Airflow builds
anything from these models (Cadwyn's versioned copies, FastAPI's response adapters, the Task SDK's
message decoders), hence a wrapper around `airflow` rather than a plugin, which loads too late.
Delete this part when the Airflow pin moves past the release that carries #71379.

The scheduler gets a second fix (apache/airflow#72716, open; PR #72767). A deferrable task's worker
exits when it defers, and the executor reports SUCCESS for that try. If the trigger fires and the
resumed attempt is already RUNNING when the scheduler reads that report (its loop was busy), the
scheduler takes it for a task killed outside Airflow and fails the running attempt. Flywheel's
`judge` defers for 2-10 s between looks, so a busy scheduler failed it mid-rollout: the retry found
the rollout decided and failed the run while the first attempt was still settling it. The fix drops
such a stale report before the scheduler reads it: a SUCCESS for the same try of a task instance
that is QUEUED or RUNNING with `next_method` set, which only a resumed deferral has.

Three changes make the scheduler quicker to act, not fixes: on SQLite (embedded mode) it wakes when
another process commits, instead of at its next idle tick (flywheel/orchestration/sqlite_scheduler.py);
its workers' task supervisors hear a task's exit at once (flywheel/orchestration/task_exit.py); and it
imports what each task would import for itself before the LocalExecutor forks them (`preload_for_tasks`).

    python -m flywheel.orchestration.airflow_main scheduler --skip-serve-logs
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from pydantic import AwareDatetime, BaseModel
from pydantic.fields import FieldInfo


def _allow_null_start_date(model: type[BaseModel], annotation: object, dependents: tuple[type[BaseModel], ...]) -> None:
    field = model.model_fields["start_date"]
    if not field.is_required():
        return  # already fixed upstream: nothing to do
    model.model_fields["start_date"] = FieldInfo.merge_field_infos(field, annotation=annotation | None, default=None)
    model.__annotations__["start_date"] = annotation | None
    for m in (model, *dependents):
        m.model_rebuild(force=True)


def apply() -> None:
    """Let a Dag run referenced by an asset event have no start date, in the three models that say so."""
    from airflow.api_fastapi.core_api.datamodels import assets as core
    from airflow.api_fastapi.execution_api.datamodels import asset_event as execution
    from airflow.sdk.api.datamodels import _generated as sdk
    from airflow.sdk.execution_time import comms  # imported with airflow itself: its subclasses need a rebuild too

    _allow_null_start_date(
        core.DagRunAssetReference, datetime, (core.AssetEventResponse, core.AssetEventCollectionResponse)
    )
    _allow_null_start_date(
        execution.DagRunAssetReference, datetime, (execution.AssetEventResponse, execution.AssetEventsResponse)
    )
    _allow_null_start_date(
        sdk.DagRunAssetReference,
        AwareDatetime,
        (sdk.AssetEventResponse, sdk.AssetEventsResponse, comms.AssetEventResult, comms.AssetEventsResult),
    )


apply()  # at import: also in processes that re-import this module as __mp_main__ (uvicorn's workers)


def stale_defer_exit(ti, try_number: int, state: str) -> bool:
    """Whether an executor's report about this task instance is the SUCCESS its worker sent when it
    deferred, read after the resumed attempt was queued or started."""
    return (
        state == "success"
        and ti is not None
        and ti.try_number == try_number
        and ti.state in ("queued", "running")
        and ti.next_method is not None
    )


def drop_stale_defer_exits(executor, session, log) -> list:
    """Remove stale defer-exit reports from the executor's buffer; returns their keys."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancekey import TaskInstanceKey
    from sqlalchemy import select

    dropped = []
    for key, (state, _) in list(executor.event_buffer.items()):
        if not isinstance(key, TaskInstanceKey) or state != "success":
            continue
        ti = session.scalar(
            select(TaskInstance).where(
                TaskInstance.dag_id == key.dag_id,
                TaskInstance.task_id == key.task_id,
                TaskInstance.run_id == key.run_id,
                TaskInstance.map_index == key.map_index,
            )
        )
        if stale_defer_exit(ti, key.try_number, state):
            log.info("ignoring the defer-exit success of %s: its resumed attempt is %s", key, ti.state)
            del executor.event_buffer[key]
            dropped.append(key)
    return dropped


def apply_scheduler() -> None:
    """The scheduler reads the executor's reports only after stale defer-exit ones are dropped."""
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    original = SchedulerJobRunner.process_executor_events.__func__

    def process_executor_events(cls, executor, job_id, scheduler_dag_bag, session):
        drop_stale_defer_exits(executor, session, cls.logger())
        return original(cls, executor, job_id, scheduler_dag_bag, session)

    process_executor_events.__wrapped__ = original
    SchedulerJobRunner.process_executor_events = classmethod(process_executor_events)


def preload_for_tasks() -> list[str]:
    """Import here what every task process would import for itself: Flywheel's task code, and what a
    first parse of each DAG file imports (the task decorator, the framework plugins). The LocalExecutor
    forks its workers from the scheduler and each task from a worker, so a task starts with them
    loaded: 0.2 s of task code and 0.15 s of the first parse, before every task. Returns what failed
    (a broken DAG file fails its tasks as it would have; nothing here stops the scheduler)."""
    import logging
    import runpy

    from airflow.configuration import conf

    import flywheel.orchestration.tasks  # noqa: F401

    failed = []
    for path in sorted(Path(conf.get("core", "dags_folder")).glob("*.py")):
        try:
            runpy.run_path(str(path), run_name=f"preload_{path.stem}")
        except Exception:
            logging.getLogger(__name__).warning("preloading for tasks: %s failed", path, exc_info=True)
            failed.append(str(path))
    return failed


if __name__ == "__main__":
    from airflow.__main__ import main

    if sys.argv[1:2] == ["scheduler"]:
        from flywheel.orchestration import sqlite_scheduler, task_exit

        apply_scheduler()
        if sqlite_scheduler.quick_scheduler():  # `[flywheel] quick_scheduler = False`: as Airflow ships it
            sqlite_scheduler.apply()  # embedded mode: a change is acted on at once (its docstring)
            task_exit.apply()  # a worker is free as soon as its task process has exited
            preload_for_tasks()
    sys.argv[0] = "airflow"
    sys.exit(main())
