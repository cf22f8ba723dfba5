"""End to end, training done right: the gate, rejections, a CNN. Trains iris itself if nothing serves it."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.core import schema
from flywheel.training import samples
from tests.e2e.stack_ops import (
    DEADLINE,
    HOLDOUT,
    IRIS_COLUMNS,
    TRAINING,
    csv_bytes,
    finished_run,
    mlflow_runs,
    put,
    served,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(stack_settings):
    client = AirflowAPI.connect(stack_settings)
    yield client
    client.close()


def predict(settings, body, path: str = "/iris/predict") -> httpx.Response:
    return httpx.post(f"{settings.predict_url}{path}", json=body, timeout=30)


@pytest.fixture(scope="module", autouse=True)
def iris_serving(stack_settings):
    """A production iris model to gate against: trained here if nothing serves yet."""
    if served(stack_settings) is None:
        put(stack_settings, "iris/gate-baseline.csv", csv_bytes(TRAINING))
    return wait_until(lambda: served(stack_settings), DEADLINE, "iris served")


def test_a_worse_upload_is_rejected_and_the_old_version_keeps_serving(stack_settings, api):
    serving = predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).json()["model"]["version"]
    before = {r["dag_run_id"] for r in api.dag_runs("train_iris")}
    deploys_before = {r["dag_run_id"] for r in api.dag_runs("deploy_iris")}
    labels = [row[4] for row in TRAINING]
    shuffled = [[*row[:4], labels[i * 7 % len(labels)]] for i, row in enumerate(TRAINING)]
    put(stack_settings, "iris/shuffled-labels.csv", csv_bytes(shuffled))
    run = finished_run(api, "train_iris", before)
    states = {t["task_id"]: t["state"] for t in api.task_instances("train_iris", run["dag_run_id"])}
    assert states == {
        "plan": "success",
        "validate": "success",
        "train": "success",
        "publish": "skipped",
        "account": "success",
    }
    # The rejected challenger is registered and tagged, never served, and nothing was redeployed.
    [rejected] = mlflow_runs(stack_settings, "iris", schema.tag_filter(schema.AIRFLOW_RUN, run["dag_run_id"]))
    assert rejected["data"]["tags"][schema.DECISION] == "rejected"
    reason = rejected["data"]["tags"][schema.REASON]
    assert "does not beat" in reason or "fails the floor" in reason
    time.sleep(5)
    assert {r["dag_run_id"] for r in api.dag_runs("deploy_iris")} == deploys_before
    assert predict(stack_settings, {"inputs": [HOLDOUT[0][:4]]}).json()["model"]["version"] == serving


def test_a_malformed_upload_fails_validation_and_is_recorded_as_rejected_in_mlflow(stack_settings, api):
    before = {r["dag_run_id"] for r in api.dag_runs("train_iris")}
    put(stack_settings, "iris/gate-no-target.csv", csv_bytes([r[:4] for r in TRAINING], columns=IRIS_COLUMNS))
    run = finished_run(api, "train_iris", before)
    assert run["state"] == "failed"
    [rejected] = mlflow_runs(stack_settings, "iris", schema.tag_filter(schema.AIRFLOW_RUN, run["dag_run_id"]))
    tags = rejected["data"]["tags"]
    assert tags[schema.STATUS] == "rejected"
    assert "iris/gate-no-target.csv" in tags[schema.REASON] and "required columns" in tags[schema.REASON]
    assert rejected["info"]["status"] == "FAILED"


def test_digits_trains_a_cnn_and_serves_it(stack_settings, api):
    x, y = digits_rows(20)
    sample = samples.make(stack_settings, "digits", stack_settings.state / "samples" / "digits.npz")
    put(stack_settings, "digits/digits.npz", sample.read_bytes())
    body = wait_until(
        lambda: (r := predict(stack_settings, {"inputs": x}, path="/digits/predict")).status_code == 200 and r.json(),
        DEADLINE,
        "digits served",
        interval=3,
    )
    assert body["model"]["name"] == "digits"
    correct = sum(str(p) == str(t) for p, t in zip(body["predictions"], y))
    assert correct >= 16, body["predictions"]
    bad = predict(stack_settings, {"inputs": [[[0.0] * 7] * 8]}, path="/digits/predict")
    assert bad.status_code == 400 and "at least 8" in bad.text


def digits_rows(n: int) -> tuple[list, list]:
    """The first n of sklearn's 8x8 digits, from its shipped CSV (the sample writes them in this order)."""
    import csv
    import gzip

    from flywheel.core.settings import Settings

    path = next((Settings.load().venv_ml / "lib").glob("python3*/site-packages/sklearn/datasets/data/digits.csv.gz"))
    rows = list(csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))[:n]
    images = [[[float(v) for v in row[r * 8 : (r + 1) * 8]] for r in range(8)] for row in rows]
    return images, [int(float(row[64])) for row in rows]
