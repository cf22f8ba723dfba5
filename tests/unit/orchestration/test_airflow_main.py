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
