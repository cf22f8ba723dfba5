"""End to end: every upload ends with an outcome on record, and none loops.

An upload is trained, rejected (it breaks a rule, in validation or in training), failed (every
attempt of a step broke on it) or superseded (a newer one was trained, or it was deleted first).
Whatever the outcome, the ledger says so and the reconciler never re-emits it. The gate never
promotes on a comparison that did not happen. Each test runs on a pipeline of its own, so what it
breaks breaks nothing else.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.core import schema
from tests.e2e.stack_ops import (
    DEADLINE,
    TRAINING,
    csv_bytes,
    extra_pipeline,
    finished_run,
    ledger,
    mlflow_runs,
    put,
    served,
    task_states,
    wait_until,
)

pytestmark = pytest.mark.e2e
# Longer than the reconciler's settling time and a round of its loop: had it wanted to re-emit, it would have.
RECONCILER_WINDOW = 45


@pytest.fixture(scope="module")
def api(stack_settings):
    with AirflowAPI.connect(stack_settings) as client:
        yield client


def reconciled(settings, pipeline: str) -> float:
    """How many times the bridge's reconciler re-emitted an upload of the pipeline (its own metric)."""
    for line in httpx.get(f"{settings.url(settings.ports.bridge)}/metrics").text.splitlines():
        if line.startswith(f'flywheel_bridge_reconciled_total{{pipeline="{pipeline}"}}'):
            return float(line.split()[-1])
    return 0.0


def run_ids(api, pipeline: str) -> set[str]:
    return {r["dag_run_id"] for r in api.dag_runs(f"train_{pipeline}")}


def assert_not_re_emitted(settings, api, pipeline: str) -> None:
    runs = run_ids(api, pipeline)
    time.sleep(RECONCILER_WINDOW)
    assert reconciled(settings, pipeline) == 0, "the reconciler re-emitted an upload that has an outcome"
    assert run_ids(api, pipeline) == runs, "a run was started for an upload that has an outcome"


def serve_first(settings, api, pipeline: str) -> dict:
    before = run_ids(api, pipeline)
    put(settings, f"{pipeline}/first.csv", csv_bytes(TRAINING))
    assert finished_run(api, f"train_{pipeline}", before)["state"] == "success"
    return wait_until(lambda: served(settings, pipeline), DEADLINE, f"{pipeline} served")


def test_an_upload_rejected_inside_training_is_accounted_and_never_re_emitted(stack_settings, api):
    """The pipeline's fixed holdout is empty: the upload passes validation, and training rejects it."""
    holdout = "iris_hold/fixed/holdout.csv"

    def fixed_holdout(text: str) -> str:
        return text.replace("holdout:\n  fraction: 0.25\n", f"holdout:\n  object: {holdout}\n")

    with extra_pipeline(stack_settings, "iris_hold", edit=fixed_holdout) as p:
        put(stack_settings, holdout, b"sepal_length,sepal_width,petal_length,petal_width,species\n")
        before = run_ids(api, p)
        upload = put(stack_settings, f"{p}/good.csv", csv_bytes(TRAINING))
        run = finished_run(api, f"train_{p}", before)
        states = task_states(api, f"train_{p}", run["dag_run_id"])
        assert run["state"] == "failed"
        assert states["validate"] == ("success", 1)
        assert states["train"] == ("failed", 1), "a rejection is not retried"
        [record] = mlflow_runs(
            stack_settings,
            p,
            f"{schema.tag_filter(schema.AIRFLOW_RUN, run['dag_run_id'])} and tags.`{schema.STATUS}` = 'rejected'",
        )
        tags = record["data"]["tags"]
        assert (
            tags[schema.STAGE] == "train" and holdout in tags[schema.REASON] and "minimum rows" in tags[schema.REASON]
        )
        entry = wait_until(lambda: ledger(stack_settings, p).get(upload["version_id"]), 120, "the upload accounted")
        assert (entry["role"], entry["by"]) == ("rejected", record["info"]["run_id"])
        assert_not_re_emitted(stack_settings, api, p)


def test_a_production_model_that_cannot_be_scored_fails_the_run_and_is_never_promoted(stack_settings, api, alert_inbox):
    with extra_pipeline(stack_settings, "iris_gate") as p:
        first = serve_first(stack_settings, api, p)
        production = first["model"]["version"]
        with MlflowAPI.connect(stack_settings) as mlflow:
            source = mlflow.model_version(p, production)["source"]  # models:/<logged model id> in MLflow 3
        model_id = source.rstrip("/").rsplit("/", 1)[-1]
        store = minio_client(stack_settings, root=True)
        doomed = [
            o.object_name for o in store.list_objects("mlflow", recursive=True) if f"/{model_id}/" in o.object_name
        ]
        assert doomed, f"no artifact of model {model_id} in MinIO"
        for key in doomed:  # production's model files are gone: it cannot be loaded, so it cannot be scored
            store.remove_object("mlflow", key)
        before = run_ids(api, p)
        upload = put(stack_settings, f"{p}/second.csv", csv_bytes(list(reversed(TRAINING))))
        run = finished_run(api, f"train_{p}", before)
        assert run["state"] == "failed"
        assert task_states(api, f"train_{p}", run["dag_run_id"])["train"] == ("failed", 3), "retried, then failed"
        with MlflowAPI.connect(stack_settings) as mlflow:
            assert mlflow.version_by_alias(p, schema.PRODUCTION) == production
            failed = mlflow.search_runs(
                p, f"{schema.tag_filter(schema.AIRFLOW_RUN, run['dag_run_id'])} and tags.`{schema.STATUS}` = 'failed'"
            )
        assert failed and all("could not be scored" in r["data"]["tags"][schema.REASON] for r in failed)
        assert served(stack_settings, p)["model"]["version"] == production
        entry = wait_until(lambda: ledger(stack_settings, p).get(upload["version_id"]), 120, "the upload accounted")
        assert entry["role"] == "failed"
        alert = wait_until(
            lambda: [a for a in alert_inbox.received if a["labels"].get("dag_id") == f"train_{p}"],
            60,
            "the failure's alert at the webhook",
        )[0]
        assert "could not be scored" in alert["summary"]
        assert_not_re_emitted(stack_settings, api, p)


def test_deleting_the_newest_upload_does_not_retrain_an_older_one(stack_settings, api):
    with extra_pipeline(stack_settings, "iris_del") as p:
        first = serve_first(stack_settings, api, p)
        api.request("PATCH", f"/dags/train_{p}", json={"is_paused": True}).raise_for_status()
        try:
            deleted = put(stack_settings, f"{p}/deleted-soon.csv", csv_bytes(TRAINING[::-1]))
            wait_until(
                lambda: any(
                    (e.get("extra") or {}).get("version_id") == deleted["version_id"]
                    for e in api.asset_events(f"s3://datasets/{p}")
                ),
                60,
                "its asset event in Airflow",
            )
            minio_client(stack_settings, root=True).remove_object("datasets", deleted["key"])
            before = run_ids(api, p)
        finally:
            api.request("PATCH", f"/dags/train_{p}", json={"is_paused": False}).raise_for_status()
        run = finished_run(api, f"train_{p}", before)
        plan = api.get(f"/dags/train_{p}/dagRuns/{run['dag_run_id']}/taskInstances/plan/xcomEntries/return_value")
        plan = plan["value"] if isinstance(plan["value"], dict) else json.loads(plan["value"])
        assert "deleted" in plan["skip"] and f"{p}/first.csv" in plan["skip"], plan
        assert served(stack_settings, p)["model"]["version"] == first["model"]["version"]
        entry = wait_until(lambda: ledger(stack_settings, p).get(deleted["version_id"]), 120, "the upload accounted")
        assert entry["role"] == "superseded" and "deleted" in entry["by"]
