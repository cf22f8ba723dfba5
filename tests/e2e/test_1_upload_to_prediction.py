"""End to end on the real stack: an upload to MinIO ends as a served prediction, with no one in the loop."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from flywheel.airflow_api import AirflowAPI
from flywheel.data import minio_client

pytestmark = pytest.mark.e2e

PIPELINE = "iris"
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
DEADLINE = 600  # seconds for one upload to be served; CI is a cold 2-core machine


def iris_rows() -> list[list]:
    """Iris as shipped with scikit-learn, read from its package data (the platform env has no sklearn)."""
    import csv

    # The ML env writes the sample; here we read sklearn's own CSV from the ML venv's files.
    from flywheel.settings import Settings

    settings = Settings.load()
    path = next((settings.venv_ml / "lib").glob("python3*/site-packages/sklearn/datasets/data/iris.csv"))
    with path.open() as f:
        reader = csv.reader(f)
        _, _, *names = next(reader)
        return [[float(v) for v in row[:4]] + [names[int(row[4])]] for row in reader]


ROWS = iris_rows()
HOLDOUT = ROWS[::5]  # every fifth row never reaches training: the served model's accuracy is measured on it
TRAINING = [r for i, r in enumerate(ROWS) if i % 5]


def csv_bytes(rows: list[list], columns=(*COLUMNS, "species")) -> bytes:
    lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def put(settings, key: str, body: bytes) -> dict:
    result = minio_client(settings).put_object("datasets", key, io.BytesIO(body), len(body), content_type="text/csv")
    return {"key": key, "etag": result.etag, "version_id": result.version_id}


def predict(settings, body, path: str = "/predict", **kwargs) -> httpx.Response:
    return httpx.post(f"{settings.predict_url}{path}", timeout=30, **({"json": body} if body is not None else kwargs))


def wait_for_version(settings, not_version: str | None) -> dict:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            r = predict(settings, {"inputs": [HOLDOUT[0][:4]]})
            if r.status_code == 200 and r.json()["model"]["version"] != not_version:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"no new version served within {DEADLINE}s")


@pytest.fixture(scope="module")
def api(stack_settings):
    client = AirflowAPI.connect(stack_settings)
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploads():
    return []


def test_nothing_is_served_before_the_first_upload(stack_settings):
    r = predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]})
    assert r.status_code == 503
    assert "no model" in r.json()["error"]


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


def test_first_upload_is_trained_and_served(stack_settings, uploads):
    uploads.append(put(stack_settings, "iris/first.csv", csv_bytes(TRAINING)))
    body = wait_for_version(stack_settings, None)
    assert body["model"]["name"] == PIPELINE
    assert body["dataset"]["etag"] == uploads[0]["etag"]


def test_served_model_is_accurate_on_held_out_rows(stack_settings):
    r = predict(stack_settings, {"inputs": [row[:4] for row in HOLDOUT]})
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
    ("body", "raw"),
    [
        ({"inputs": [[5.1, 3.5, 1.4]]}, None),  # wrong number of features
        ({"inputs": [[5.1, "x", 1.4, 0.2]]}, None),  # not a number
        ({"inputs": []}, None),  # empty list
        ({"inputs": None}, None),
        ({"rows": [[5.1, 3.5, 1.4, 0.2]]}, None),  # wrong field
        (None, b"{not json"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(stack_settings, body, raw):
    r = predict(stack_settings, body, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()  # a JSON reason
    assert predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).status_code == 200  # still serving


def test_bad_upload_fails_validation_and_the_old_model_keeps_serving(stack_settings, api):
    served = predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).json()["model"]["version"]
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
    assert predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).json()["model"]["version"] == served


def test_a_new_upload_retrains_and_the_answer_names_the_new_version(stack_settings, uploads):
    old = predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).json()["model"]["version"]
    uploads.append(put(stack_settings, "iris/second.csv", csv_bytes(list(reversed(TRAINING)))))
    body = wait_for_version(stack_settings, old)
    assert int(body["model"]["version"]) > int(old)
    assert body["dataset"]["etag"] == uploads[-1]["etag"]


def settled_runs(api, dag_id: str, timeout: float = 180) -> list[dict]:
    """The DAG's runs once none is queued or running (the served answer can precede the run's end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api.dag_runs(dag_id)
        if all(r["state"] in ("success", "failed") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"{dag_id} still has unfinished runs after {timeout}s")


def test_airflow_records_the_lineage(stack_settings, api, uploads):
    deploy_runs = settled_runs(api, f"deploy_{PIPELINE}")
    assert {r["state"] for r in deploy_runs} == {"success"}
    assert len(deploy_runs) >= 2
    dataset_events = api.asset_events(f"s3://datasets/{PIPELINE}")
    keys = {e["extra"].get("key") for e in dataset_events}
    assert {u["key"] for u in uploads} <= keys
    for event in dataset_events:
        assert {"bucket", "key", "etag", "version_id", "size", "event_time"} <= set(event["extra"])
        assert event["created_dagruns"], f"event on {event['extra']['key']} triggered no run"
    production = api.asset_events(f"model://{PIPELINE}/production")
    assert len(production) >= 2
    assert {"model_name", "version", "run_id", "dataset"} <= set(production[0]["extra"])
    deployments = api.asset_events(f"deployment://{PIPELINE}/production")
    assert len(deployments) >= 2
    assert deployments[0]["extra"]["version"] == production[0]["extra"]["version"]
