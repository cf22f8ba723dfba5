"""End to end, the operator's day: retrain by hand, lineage in one command, alerts, status.

Trains iris itself if nothing serves it. Alerts arrive at the webhook receiver the session runs
(conftest.py's alert_inbox, set as FLYWHEEL_ALERT_WEBHOOK before the stack started).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from flywheel.clients import load as loadgen
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.core import pipelines, schema
from flywheel.operations import alerts, lineage, status
from tests.e2e.stack_ops import (
    DEADLINE,
    IRIS_COLUMNS,
    ROW,
    TRAINING,
    csv_bytes,
    mlflow_runs,
    put,
    served,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def iris_serving(stack_settings):
    if served(stack_settings) is None:
        put(stack_settings, "iris/ops-baseline.csv", csv_bytes(TRAINING))
    return wait_until(lambda: served(stack_settings), DEADLINE, "iris served")


@pytest.fixture(scope="module")
def api(stack_settings):
    with AirflowAPI.connect(stack_settings) as client:
        yield client


def finished(api, dag_id: str, run_id: str, timeout: float = DEADLINE) -> dict:
    return wait_until(
        lambda: (r := api.get(f"/dags/{dag_id}/dagRuns/{run_id}"))["state"] in ("success", "failed") and r,
        timeout,
        f"{dag_id} {run_id} finished",
    )


def test_a_hand_triggered_run_trains_with_its_overrides_and_records_who_and_why(stack_settings, api):
    run = api.trigger("train_iris", {"dataset": "", "params": {"max_depth": 2, "eta": 0.5}, "note": "shallower trees"})
    assert finished(api, "train_iris", run["dag_run_id"])["state"] == "success"
    [mlflow_run] = [
        r
        for r in mlflow_runs(stack_settings, "iris", schema.tag_filter(schema.AIRFLOW_RUN, run["dag_run_id"]))
        if r["data"]["tags"].get(schema.DECISION)
    ]
    tags = mlflow_run["data"]["tags"]
    assert tags[schema.TRIGGER] == "manual" and tags[schema.TRIGGERED_BY]
    assert tags[schema.NOTE] == "shallower trees"
    with MlflowAPI.connect(stack_settings) as mlflow:
        logged = mlflow._call("GET", "/runs/get", params={"run_id": mlflow_run["info"]["run_id"]})["run"]["data"][
            "params"
        ]
    assert {("max_depth", "2"), ("eta", "0.5")} <= {(p["key"], p["value"]) for p in logged}
    assert "production" in tags[schema.REASON] or "floor" in tags[schema.REASON]  # the same gate


def test_a_hand_triggered_run_on_a_chosen_older_upload(stack_settings, api):
    older = put(stack_settings, "iris/ops-older.csv", csv_bytes(TRAINING[3:] + TRAINING[:3]))
    put(stack_settings, "iris/ops-newer.csv", csv_bytes(TRAINING[5:] + TRAINING[:5]))
    wait_until(
        lambda: (b := served(stack_settings)) and b["dataset"]["key"] == "iris/ops-newer.csv",
        DEADLINE,
        "the newer upload served",
    )
    run = api.trigger("train_iris", {"dataset": older["version_id"], "params": {}, "note": "reproduce older data"})
    assert finished(api, "train_iris", run["dag_run_id"])["state"] == "success"
    runs = mlflow_runs(stack_settings, "iris", schema.tag_filter(schema.AIRFLOW_RUN, run["dag_run_id"]))
    assert {r["data"]["tags"][schema.UPLOAD_VERSION_ID] for r in runs} == {older["version_id"]}


def test_a_bad_parameter_fails_the_run_at_once_with_the_reason(stack_settings, api, alert_inbox):
    started = time.monotonic()
    run = api.trigger("train_iris", {"dataset": "", "params": {"max_depht": 2}, "note": ""})
    assert finished(api, "train_iris", run["dag_run_id"], timeout=120)["state"] == "failed"
    states = {t["task_id"]: (t["state"], t["try_number"]) for t in api.task_instances("train_iris", run["dag_run_id"])}
    assert states["plan"] == ("failed", 1), states  # no retry: a bad parameter stays bad
    assert states["train"][0] in ("upstream_failed", None)
    alert = wait_until(
        lambda: [a for a in alert_inbox.received if a["labels"].get("run_id") == run["dag_run_id"]], 60, "the alert"
    )[0]
    assert "unknown xgboost parameter 'max_depht'" in alert["summary"]
    print(f"\na bad parameter failed its run {time.monotonic() - started:.1f}s after the trigger")
    with pytest.raises(Exception, match="400"):
        api.trigger("train_iris", {"dataset": "", "params": [1], "note": ""})  # not an object: refused by Airflow


def test_lineage_walks_from_the_answer_back_to_the_upload(stack_settings):
    # The hand-triggered runs above may have promoted a version still on its way out: ask once
    # production serves, or the answer's version is retired before its lineage is read.
    with MlflowAPI.connect(stack_settings) as mlflow:
        wait_until(
            lambda: (
                (b := served(stack_settings))
                and str(b["model"]["version"]) == str(mlflow.version_by_alias("iris", "production"))
            ),
            DEADLINE,
            "production served",
        )
    request_id = f"lineage-{time.time_ns()}"
    answer = httpx.post(
        f"{stack_settings.predict_url}/iris/predict", json={"inputs": [ROW]}, headers={"X-Request-Id": request_id}
    ).json()
    time.sleep(1.5)  # Nginx writes its access log once a second
    found = lineage.find_request(stack_settings, request_id)
    assert (found["pipeline"], found["version"]) == ("iris", answer["model"]["version"])
    chain = {link["what"]: link for link in lineage.chain(stack_settings, "iris", found["version"])["links"]}
    upload = chain["upload"]["facts"]
    assert upload["key"] == answer["dataset"]["key"] and upload["version_id"] == answer["dataset"]["version_id"]
    stat = minio_client(stack_settings).stat_object("datasets", upload["key"], version_id=upload["version_id"])
    assert upload["uploaded_at"] == stat.last_modified.isoformat()
    with AirflowAPI.connect(stack_settings) as api:
        events = api.asset_events("s3://datasets/iris")
        assert chain["asset event"]["id"] in {str(e["id"]) for e in events}
        run = api.get(f"/dags/train_iris/dagRuns/{chain['training run']['id']}")
        assert run["state"] == chain["training run"]["facts"]["state"] == "success"
    with MlflowAPI.connect(stack_settings) as mlflow:
        mv = mlflow.model_version("iris", found["version"])
        assert mv["run_id"] == chain["MLflow run"]["id"]
        assert ("production" in chain["registered version"]["facts"]["aliases"]) == (
            mlflow.version_by_alias("iris", "production") == found["version"]
        )
    assert chain["Bento"]["facts"]["built"] and chain["Bento"]["id"] == f"flywheel-iris:v{found['version']}"
    assert chain["deployment"]["facts"]["serving_now"] is True
    for link in chain.values():
        assert link["url"].startswith(("http://", "/")), link


def test_a_rejected_upload_alerts_the_webhook_and_status_says_why(stack_settings, alert_inbox):
    started = time.monotonic()
    bad = put(stack_settings, "iris/ops-no-target.csv", csv_bytes([r[:4] for r in TRAINING], columns=IRIS_COLUMNS))
    alert = wait_until(
        lambda: [
            a
            for a in alert_inbox.received
            if a["name"] == "Flywheel: dataset rejected" and "iris/ops-no-target.csv" in a["summary"]
        ],
        DEADLINE,
        "the rejection's alert at the webhook",
    )[0]
    print(f"\na rejected upload's alert reached the webhook {time.monotonic() - started:.1f}s after the upload")
    assert alert["labels"]["pipeline"] == "iris" and "required columns" in alert["summary"]
    assert [a for a in alerts.recent(stack_settings) if a["summary"] == alert["summary"]], "kept in the state folder"
    pipeline = pipelines.get(stack_settings.pipelines_dir, "iris")
    with MlflowAPI.connect(stack_settings) as mlflow, AirflowAPI.connect(stack_settings) as api:
        state = wait_until(
            lambda: (
                (s := status.pipeline_status(stack_settings, pipeline, mlflow, api))["verdict"].startswith(
                    "the newest upload (iris/ops-no-target.csv) was rejected"
                )
                and s
            ),
            120,
            "status explains the rejection",
        )
    assert "required columns" in state["verdict"]
    assert state["last_upload"]["version_id"] == bad["version_id"]
    assert state["serving"]["version"] == served(stack_settings)["model"]["version"]  # the old model serves on
    print("\n" + status.render(state))


def test_an_error_ratio_over_5_percent_fires_an_alert_at_the_webhook(stack_settings, alert_inbox):
    url = f"{stack_settings.predict_url}/iris/predict"
    started = time.monotonic()
    load = loadgen.start(url, {"inputs": []}, connections=2, seconds=180)  # every request a 400
    try:
        fired = wait_until(
            lambda: [
                a for a in alert_inbox.received if a["name"] == "FlywheelHighErrorRate" and a["status"] == "firing"
            ],
            240,
            "FlywheelHighErrorRate at the webhook",
            interval=5,
        )[0]
    finally:
        load.kill()
        load.communicate()
    # The rule's `for: 1m`, Prometheus' 15 s evaluation, Alertmanager's group_wait.
    print(f"\nFlywheelHighErrorRate reached the webhook {time.monotonic() - started:.1f}s after the errors began")
    assert fired["labels"]["pipeline"] == "iris" and "5%" in fired["summary"]
    assert [a for a in alerts.firing(stack_settings) if a["name"] == "FlywheelHighErrorRate"]


def test_alerts_wait_while_the_webhook_is_down_and_arrive_when_it_is_back(stack_settings, alert_inbox):
    """Both paths: Airflow's (a rejected upload's task failure) waits in the outbox; Alertmanager's (an
    alert posted to Alertmanager itself) is answered 503 by the bridge, so Alertmanager keeps it."""
    marker = f"e2e-outbox-{int(time.time())}"
    alert_inbox.down = True
    try:
        put(stack_settings, f"iris/{marker}.csv", csv_bytes([r[:4] for r in TRAINING], columns=IRIS_COLUMNS))
        am = stack_settings.url(stack_settings.ports.alertmanager)
        synthetic = [{"labels": {"alertname": "FlywheelE2E", "pipeline": "iris", "marker": marker}}]
        httpx.post(f"{am}/api/v2/alerts", json=synthetic).raise_for_status()
        waiting = wait_until(
            lambda: [w for w in alerts.waiting(stack_settings) if marker in json.dumps(w["alerts"])],
            DEADLINE,
            "the task failure's alert waiting in the outbox",
        )
        assert "503" in waiting[0]["error"]
        wait_until(lambda: alert_inbox.refused >= 2, 120, "Alertmanager's alert refused at least once")
        assert not [a for a in alert_inbox.received if marker in json.dumps(a)]
    finally:
        alert_inbox.down = False
    arrived = wait_until(
        lambda: (
            (mine := [a for a in alert_inbox.received if marker in json.dumps(a)])
            and {a["source"] for a in mine} >= {"airflow", "prometheus"}
            and mine
        ),
        180,
        "both alerts at the webhook once it is back",
    )
    assert any(a["name"] == "FlywheelE2E" for a in arrived)
    assert not [w for w in alerts.waiting(stack_settings) if marker in json.dumps(w["alerts"])], "outbox emptied"
