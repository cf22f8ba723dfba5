"""End to end on the real stack: an upload to MinIO ends as a served prediction, with no one in the loop."""

from __future__ import annotations

import time

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.operations import timings
from tests.e2e.stack_ops import (
    DEADLINE,
    HOLDOUT,
    IRIS_COLUMNS,
    TRAINING,
    csv_bytes,
    put,
    served,
    wait_for_version,
    wait_until,
)

pytestmark = pytest.mark.e2e

PIPELINE = "iris"
COLUMNS = IRIS_COLUMNS


def predict(settings, body, path: str = "/predict", **kwargs) -> httpx.Response:
    return httpx.post(f"{settings.predict_url}{path}", timeout=30, **({"json": body} if body is not None else kwargs))


def current_version(settings) -> str | None:
    body = served(settings, PIPELINE, HOLDOUT[0][:4])
    return body["model"]["version"] if body else None


@pytest.fixture(scope="module")
def api(stack_settings):
    client = AirflowAPI.connect(stack_settings)
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploads():
    return []


def test_a_pipeline_nothing_was_uploaded_to_answers_503_with_a_reason(stack_settings):
    r = predict(stack_settings, {"inputs": [[0.0] * 10]}, path="/diabetes/predict")  # no e2e test uploads diabetes
    assert r.status_code == 503
    assert "no model of diabetes is serving yet" in r.json()["error"]


def test_bridge_refuses_calls_without_the_token(stack_settings):
    url = f"{stack_settings.url(stack_settings.ports.bridge)}/minio/events"
    fake = {
        "Records": [
            {
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": "datasets"}, "object": {"key": "iris/forged.csv"}},
            }
        ]
    }
    assert httpx.post(url, json=fake).status_code == 401
    assert httpx.post(url, json=fake, headers={"Authorization": "Bearer wrong"}).status_code == 401


def bridge_events(settings, outcome: str) -> float:
    """The bridge's count of MinIO's deliveries with this outcome, from its /metrics."""
    metrics = httpx.get(f"{settings.url(settings.ports.bridge)}/metrics", timeout=10).text
    line = f'flywheel_bridge_events_total{{outcome="{outcome}"}} '
    return next((float(x.removeprefix(line)) for x in metrics.splitlines() if x.startswith(line)), 0.0)


def test_an_upload_is_trained_and_served(stack_settings, uploads):
    before = current_version(stack_settings)
    duplicates = bridge_events(stack_settings, "duplicate")
    uploads.append(put(stack_settings, "iris/first.csv", csv_bytes(TRAINING)))
    body = wait_for_version(stack_settings, before)
    assert body["model"]["name"] == PIPELINE
    assert body["dataset"]["etag"] == uploads[0]["etag"]
    # MinIO told the bridge twice (its target that sends at once, and its queue dir's replay): the
    # bridge acted on one and answered the other as a duplicate.
    wait_until(lambda: bridge_events(stack_settings, "duplicate") > duplicates, 30, "MinIO's second delivery")


def test_a_notification_told_again_is_answered_and_not_acted_on(stack_settings, api, uploads):
    """MinIO's notification for the upload, sent again with the webhook token: the bridge says it has
    handled it, and Airflow still has one asset event for it."""
    upload = uploads[0]
    record = {
        "eventName": "s3:ObjectCreated:Put",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "s3": {
            "bucket": {"name": "datasets"},
            "object": {"key": upload["key"], "eTag": upload["etag"], "versionId": upload["version_id"], "size": 1},
        },
    }
    r = httpx.post(
        f"{stack_settings.url(stack_settings.ports.bridge)}/minio/events",
        json={"EventName": "s3:ObjectCreated:Put", "Key": f"datasets/{upload['key']}", "Records": [record]},
        headers={"Authorization": f"Bearer {stack_settings.secrets['FLYWHEEL_WEBHOOK_TOKEN']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] == [{"key": upload["key"], "reason": "already handled"}], r.json()
    events = api.asset_events(f"s3://datasets/{PIPELINE}")
    assert [e["extra"]["version_id"] for e in events].count(upload["version_id"]) == 1, events


def test_served_model_is_accurate_on_held_out_rows(stack_settings):
    r = predict(stack_settings, {"inputs": [row[:4] for row in HOLDOUT]}, path=f"/{PIPELINE}/predict")
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    accuracy = sum(p == row[4] for p, row in zip(predictions, HOLDOUT)) / len(HOLDOUT)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f} on {len(HOLDOUT)} held-out rows"


def test_rows_keyed_by_column_name_and_per_pipeline_route(stack_settings):
    row = dict(zip(COLUMNS, HOLDOUT[0][:4]))
    r = predict(stack_settings, {"inputs": [row]}, path=f"/{PIPELINE}/predict")
    assert r.status_code == 200
    assert r.json()["predictions"] == [HOLDOUT[0][4]]
    assert r.headers["x-model-version"] == r.json()["model"]["version"]


@pytest.mark.parametrize(
    ("body", "raw", "reason"),
    [
        ({"inputs": [[5.1, 3.5, 1.4]]}, None, "at least 4"),  # wrong number of features
        ({"inputs": [[5.1, "x", 1.4, 0.2]]}, None, "valid number"),  # not a number
        ({"inputs": []}, None, "at least 1"),  # empty list
        ({"inputs": None}, None, "valid array"),
        ({"rows": [[5.1, 3.5, 1.4, 0.2]]}, None, "inputs"),  # wrong field
        (None, b"{not json", "Invalid JSON"),
    ],
)
def test_bad_requests_get_a_400_with_a_reason(stack_settings, body, raw, reason):
    r = predict(stack_settings, body, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert reason in str(r.json()), r.text
    assert current_version(stack_settings)  # still serving


def test_bad_upload_fails_validation_and_the_old_model_keeps_serving(stack_settings, api):
    served_before = current_version(stack_settings)
    before = {r["dag_run_id"] for r in api.dag_runs(f"train_{PIPELINE}")}
    put(stack_settings, "iris/no-target.csv", csv_bytes([r[:4] for r in TRAINING], columns=COLUMNS))
    deadline = time.monotonic() + DEADLINE
    run = None
    while time.monotonic() < deadline:
        new = [r for r in api.dag_runs(f"train_{PIPELINE}") if r["dag_run_id"] not in before]
        if new and new[0]["state"] in ("failed", "success"):
            run = new[0]
            break
        time.sleep(2)
    assert run is not None and run["state"] == "failed"
    states = {t["task_id"]: t["state"] for t in api.task_instances(f"train_{PIPELINE}", run["dag_run_id"])}
    assert states["validate"] == "failed"
    assert states["train"] in ("upstream_failed", None)
    assert current_version(stack_settings) == served_before


def test_a_new_upload_retrains_and_the_answer_names_the_new_version(stack_settings, uploads):
    old = current_version(stack_settings)
    started = time.time()
    uploads.append(put(stack_settings, "iris/second.csv", csv_bytes(list(reversed(TRAINING)))))
    body = wait_for_version(stack_settings, old)
    seen = time.time() - started
    assert int(body["model"]["version"]) > int(old)
    assert body["dataset"]["etag"] == uploads[-1]["etag"]
    # The waterfall (`flywheel lineage --timings`), from the services' own records: Nginx was switched
    # before this test, which started before its upload, saw the new version answer. (Its last hop, the
    # rollout's own first answer, races this test's polling, so may end a fraction of a second after.)
    waterfall = timings.waterfall(stack_settings, PIPELINE, body["model"]["version"])
    print(timings.render(waterfall))
    assert waterfall["complete"] and waterfall["upload"] == "iris/second.csv"
    names = [hop["name"] for hop in waterfall["hops"]]
    for hop in ("upload -> asset event (MinIO, bridge)", "plan", "validate", "train", "build"):
        assert hop in names, names
    assert {"replica 0 ready", "replica 1 smoke replay", "Nginx switched", "first answer through Nginx"} <= set(names)
    assert all(hop["seconds"] >= 0 and hop["start"] >= 0 for hop in waterfall["hops"]), waterfall["hops"]
    switched = next(hop for hop in waterfall["hops"] if hop["name"] == "Nginx switched")
    assert 0 < switched["end"] <= seen, (switched, seen)
    assert waterfall["total_seconds"] >= switched["end"], waterfall


def test_airflow_records_the_lineage(stack_settings, api, uploads):
    """Each of this module's served uploads, followed through Airflow's own records: its dataset event
    started a run, whose production event started a deploy run that succeeded and emitted the
    deployment event of that version (other tests fail deploys on purpose: only these are looked at)."""
    dataset_events = api.asset_events(f"s3://datasets/{PIPELINE}")
    production = api.asset_events(f"model://{PIPELINE}/production")
    assert len(uploads) == 2
    for upload in uploads:
        (event,) = [e for e in dataset_events if e["extra"].get("version_id") == upload["version_id"]]
        assert {"bucket", "key", "etag", "version_id", "size", "event_time"} <= set(event["extra"])
        assert event["created_dagruns"], f"event on {upload['key']} triggered no run"
        (promoted,) = [e for e in production if e["extra"]["dataset"].get("version_id") == upload["version_id"]]
        assert {"model_name", "version", "run_id", "dataset"} <= set(promoted["extra"])
        runs = [r for r in promoted["created_dagruns"] if r["dag_id"] == f"deploy_{PIPELINE}"]
        assert runs, f"v{promoted['extra']['version']} started no deploy run"
        states = wait_until(
            lambda runs=runs: (
                (found := {api.get(f"/dags/deploy_{PIPELINE}/dagRuns/{r['run_id']}")["state"] for r in runs})
                <= {"success", "failed"}
                and found
            ),
            120,
            "the deploy runs finished",
        )
        assert states == {"success"}, states
        deployed = {str(e["extra"].get("version")) for e in api.asset_events(f"deployment://{PIPELINE}/production")}
        assert str(promoted["extra"]["version"]) in deployed
