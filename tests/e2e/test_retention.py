"""End to end: a day of uploads in minutes ends within every retention policy, and lineage survives it.

The retention DAG runs by hand with its policies overridden to nothing: only what serves, what is
`production` or `previous`, and what their lineage needs is left.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from minio.error import S3Error

from flywheel.clients import objectstore
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.operations import alerts, lineage
from flywheel.operations.parked import DEAD_LETTERS
from tests.e2e.stack_ops import (
    DEADLINE,
    TRAINING,
    csv_bytes,
    extra_pipeline,
    finished_run,
    put,
    served,
    wait_until,
)

pytestmark = pytest.mark.e2e
DAY = 24 * 3600


def versions(settings, key: str) -> list:
    return [o for o in minio_client(settings, root=True).list_objects("datasets", prefix=key, include_version=True)]


def stored(settings, folder: str, name: str) -> set[str]:
    """Versions in BentoML's store, read from its folders."""
    path = settings.bentoml_home / folder / name
    return {p.name for p in path.iterdir() if p.is_dir()} if path.exists() else set()


def test_a_day_of_uploads_in_minutes_ends_within_every_policy(stack_settings):
    with AirflowAPI.connect(stack_settings) as api, extra_pipeline(stack_settings, "iris_ret") as p:
        trained = []
        for i in range(3):  # the same file, three times: three versions, each trained and served
            before = served(stack_settings, p)
            trained.append(put(stack_settings, f"{p}/daily.csv", csv_bytes(TRAINING[i * 7 :] + TRAINING[: i * 7])))
            wait_until(
                lambda before=before: (b := served(stack_settings, p)) and b != before and b, DEADLINE, f"{p} v{i + 1}"
            )
        for i in range(5):  # a scratch file no run trains on, overwritten, then deleted
            put(stack_settings, f"{p}/.scratch.csv", csv_bytes(TRAINING[: i + 1]))
        minio_client(stack_settings, root=True).remove_object("datasets", f"{p}/.scratch.csv")
        old_alert = alerts.record(stack_settings, [alerts.alert("airflow", "old", "a day old", {"pipeline": p})])[0]
        old_letter = DEAD_LETTERS.write(stack_settings, "old", {"key": f"{p}-old", "version_id": "x", "etag": "e"})
        for path in (old_alert, old_letter):
            os.utime(path, (time.time() - 2 * DAY, time.time() - 2 * DAY))
        bentos_before = stored(stack_settings, "bentos", f"flywheel-{p}")
        assert len(bentos_before) == 3, bentos_before

        runs = {r["dag_run_id"] for r in api.dag_runs("flywheel_retention")}
        conf = {
            "dataset_versions_hours": 0,
            "model_versions": 0,
            "airflow_hours": 0,
            "alerts_hours": 24,
            "dead_letters_hours": 24,
            "access_log_mb": 0,
        }
        api.trigger("flywheel_retention", conf)
        run = finished_run(api, "flywheel_retention", runs)
        assert run["state"] == "success", run

        # Upload versions: the current one, and the one `previous` was trained on; nothing of the scratch file.
        left = {o.version_id for o in versions(stack_settings, f"{p}/daily.csv")}
        assert left == {trained[2]["version_id"], trained[1]["version_id"]}, left
        assert versions(stack_settings, f"{p}/.scratch.csv") == []
        # The model store: production (serving) and previous only.
        assert stored(stack_settings, "bentos", f"flywheel-{p}") == {"v2", "v3"}
        assert stored(stack_settings, "models", p) == {"v2", "v3"}
        # Files: the old alert and dead letter gone, the access log rotated and written anew.
        assert not old_alert.exists() and not old_letter.exists()
        log = stack_settings.logs / "nginx-access.log"
        assert log.with_name("nginx-access.log.1").exists()
        served(stack_settings, p)
        wait_until(lambda: log.exists() and p in log.read_text(), 30, "Nginx writing a fresh access log")
        # Lineage of what serves is whole.
        links = {link["what"]: link for link in lineage.chain(stack_settings, p)["links"]}
        assert links["asset event"]["facts"].get("found", True) is not False, links["asset event"]
        assert links["training run"]["facts"]["state"] == "success"
        assert "unknown" not in str(links["upload"]["facts"]["uploaded_at"])
        reports = {
            r["store"]: r
            for r in (json.loads(f.read_text()) for f in (stack_settings.state / "retention").glob("*.json"))
        }
        assert set(reports) == {"datasets", "models", "airflow", "files"}
        # The policy applies to every pipeline (other modules' iris versions may go too); of this one, v1.
        assert [d for d in reports["models"]["deleted"] if d.startswith(f"{p} ")] == [f"{p} v1"]
        # The retention job's own MinIO identity deletes versions only: never the current upload.
        with pytest.raises(S3Error, match="AccessDenied"):
            objectstore.retention_client(stack_settings).remove_object("datasets", f"{p}/daily.csv")
        assert {o.version_id for o in versions(stack_settings, f"{p}/daily.csv")} == left
