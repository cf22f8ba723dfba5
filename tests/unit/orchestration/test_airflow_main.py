"""The wrapper every Airflow process starts through: Airflow's CLI, after the apache/airflow#71379 fix."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import flywheel.orchestration.airflow_main
from airflow.api_fastapi.core_api.datamodels import assets as core
from airflow.api_fastapi.execution_api.datamodels import asset_event as execution
from airflow.sdk.api.datamodels import _generated as sdk
from airflow.sdk.execution_time import comms

queued = dict(run_id="r", dag_id="d", logical_date=None, start_date=None, end_date=None, state="queued",
              data_interval_start=None, data_interval_end=None, partition_key=None)
asset = dict(name="a", uri="s3://datasets/a", group="asset", extra={})
event = dict(id=1, timestamp="2026-12-01T00:00:00Z", extra={}, asset=asset, created_dagruns=[queued])
core.AssetEventCollectionResponse.model_validate({"total_entries": 1, "asset_events": [dict(
    event, asset_id=1, uri="s3://datasets/a", source_map_index=-1, created_dagruns=[dict(queued, triggering=True)])]})
execution.AssetEventsResponse.model_validate({"asset_events": [event]})
fetched = sdk.AssetEventsResponse.model_validate({"asset_events": [event]})
sent = comms.AssetEventsResult.from_asset_events_response(fetched)
received = comms.AssetEventsResult.model_validate_json(sent.model_dump_json())
assert received.asset_events[0].created_dagruns[0].start_date is None
print("ok")
"""


def test_asset_events_of_a_queued_run_validate_in_the_api_and_the_task_sdk():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_without_the_wrapper_airflow_rejects_them():
    """The day this fails, Airflow carries the fix: delete orchestration/airflow_main.py."""
    check = CHECK.replace("import flywheel.orchestration.airflow_main\n", "")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "start_date" in done.stderr, done.stdout


def test_the_wrapper_runs_airflow_commands():
    done = subprocess.run(
        [sys.executable, "-m", "flywheel.orchestration.airflow_main", "version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().startswith("3."), done.stderr[-2000:]


# --- the scheduler's fix: apache/airflow#72716 ------------------------------------------------------------


def test_a_resumed_deferral_is_not_failed_by_the_report_of_its_defer_exit():
    """The executor's buffer holds the SUCCESS a judge's worker sent when it deferred; the task
    instance has meanwhile been resumed (same try, running, next_method set): the report is dropped,
    and the others stay."""
    from types import SimpleNamespace

    from airflow.models.taskinstancekey import TaskInstanceKey

    from flywheel.orchestration import airflow_main

    def key(task: str) -> TaskInstanceKey:
        return TaskInstanceKey("deploy_iris", task, "r", try_number=1, map_index=-1)

    tis = {
        "judge": SimpleNamespace(try_number=1, state="running", next_method="execute"),  # resumed
        "build": SimpleNamespace(try_number=1, state="running", next_method=None),  # killed outside Airflow
        "rollout": SimpleNamespace(try_number=2, state="running", next_method="execute"),  # a later try
    }
    executor = SimpleNamespace(event_buffer={key(t): ("success", None) for t in tis})
    executor.event_buffer[key("failed")] = ("failed", None)

    class Session:
        def scalar(self, query):
            task = next(c.right.value for c in query.whereclause.clauses if c.left.name == "task_id")
            return tis.get(task)

    log = SimpleNamespace(info=lambda *a: None)
    assert airflow_main.drop_stale_defer_exits(executor, Session(), log) == [key("judge")]
    assert set(executor.event_buffer) == {key("build"), key("rollout"), key("failed")}


def test_the_scheduler_runs_with_the_fix_and_airflow_still_needs_it():
    """The day this fails, Airflow guards resumed RUNNING deferrals itself: delete the scheduler's fix."""
    import inspect

    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    from flywheel.orchestration import airflow_main

    source = " ".join(inspect.getsource(SchedulerJobRunner.process_executor_events).split())
    assert "ti.state == TaskInstanceState.SCHEDULED and state == TaskInstanceState.SUCCESS" in source
    original = SchedulerJobRunner.process_executor_events
    try:
        airflow_main.apply_scheduler()
        assert SchedulerJobRunner.process_executor_events.__wrapped__ is original.__func__
    finally:
        SchedulerJobRunner.process_executor_events = classmethod(original.__func__)


# --- the scheduler's preload for the tasks it forks -----------------------------------------------------

PRELOAD = """
import sys
from flywheel.orchestration import airflow_main
failed = airflow_main.preload_for_tasks()
print(failed)
print(all(m in sys.modules for m in ("flywheel.orchestration.tasks", "airflow.sdk.definitions.decorators")))
"""


def test_the_scheduler_preloads_what_tasks_import_and_a_broken_dag_file_does_not_stop_it(tmp_path):
    import os
    import shutil
    from pathlib import Path

    dags = tmp_path / "dags"
    shutil.copytree(Path(__file__).resolve().parents[3] / "dags", dags)
    (dags / "broken.py").write_text("raise RuntimeError('a DAG file with a bug')\n")
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().split("\n")[-2:] == [str([str(dags / "broken.py")]), "True"], done.stdout
