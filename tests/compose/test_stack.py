"""Compose mode end to end: an upload to MinIO is trained, built, switched and served, all in containers.

The stack is docker-compose.yml itself (conftest.py); the test talks to it only through the ports it
publishes on 127.0.0.1 and through `docker compose exec`. Tests run in order and build on each other:
one upload served, Prometheus and Airflow checked, a second upload served through a blue/green
switch, then the `celery` profile's worker trains a third.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.objectstore import client as minio_client
from flywheel.core.settings import REPO_ROOT, Settings
from tests.compose.conftest import Compose, figure

PIPELINE = "iris"
ROW = [5.1, 3.5, 1.4, 0.2]
DEADLINE = 900  # seconds from an upload to its version served: a cold 2-core machine
STATE = "/var/lib/flywheel"


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory) -> bytes:
    """The iris CSV the docs upload (`python -m flywheel.training.samples iris`), written by the ML venv."""
    path = tmp_path_factory.mktemp("iris") / "iris.csv"
    python = REPO_ROOT / ".venv" / "ml" / "bin" / "python"
    subprocess.run([str(python), "-m", "flywheel.training.samples", "iris", str(path)], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def airflow(settings):
    with AirflowAPI.connect(settings) as api:
        yield api


def upload(settings: Settings, key: str, body: bytes) -> dict:
    """Through MinIO's published port, as any S3 client would."""
    import io

    # As a person uploads: MinIO's root user (the platform's own identity may only read datasets).
    result = minio_client(settings, root=True).put_object(
        "datasets", key, io.BytesIO(body), len(body), content_type="text/csv"
    )
    return {"key": key, "etag": result.etag, "version_id": result.version_id, "at": time.monotonic()}


def predict(settings: Settings, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{settings.predict_url}{path}", json={"inputs": [ROW]}, timeout=30)


def wait_served(settings: Settings, newer_than: int, uploaded: dict) -> dict:
    """The answer through the compose Nginx once it names a version above `newer_than`."""
    deadline = time.monotonic() + DEADLINE
    last = ""
    while time.monotonic() < deadline:
        try:
            r = predict(settings)
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code == 200 and int(r.json()["model"]["version"]) > newer_than:
                body = r.json()
                body["seconds"] = time.monotonic() - uploaded["at"]
                return body
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"no version above {newer_than} served within {DEADLINE}s after {uploaded['key']}: {last}")


def deployment(compose: Compose) -> dict:
    """What serves the pipeline, as the deploy step recorded it on the state volume."""
    return json.loads(compose.exec("serving", "cat", f"{STATE}/deployments/{PIPELINE}.json"))


def bento_programs(compose: Compose) -> dict[str, str]:
    """supervisord's Bento programs in `serving`: name -> state."""
    out = compose.exec("serving", "supervisorctl", "-c", "/tmp/supervisord.conf", "status", check=False)
    rows = [line.split() for line in out.splitlines() if line.startswith("bento-")]
    return {row[0]: row[1] for row in rows}


def task_hostname(airflow: AirflowAPI, dag_id: str, run_id: str, task_id: str) -> str:
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(dag_id, run_id)}
    assert tis[task_id]["state"] == "success", tis[task_id]
    return tis[task_id]["hostname"]


def newest_run(airflow: AirflowAPI, dag_id: str, timeout: float = 300) -> dict:
    """The DAG's newest run, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = airflow.dag_runs(dag_id, limit=1)
        if runs and runs[0]["state"] in ("success", "failed"):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"{dag_id}: no finished run within {timeout}s")


# --- the stack ----------------------------------------------------------------------------------------


def test_every_service_is_healthy_and_grafana_is_left_out(compose):
    rows = [json.loads(line) for line in compose("ps", "--all", "--format", "json").stdout.splitlines() if line]
    states = {row["Service"]: (row["State"], row.get("Health", ""), row.get("ExitCode", 0)) for row in rows}
    for service, (state, health, code) in states.items():
        if service in ("minio-init", "flywheel-init", "mlflow-init"):
            assert (state, code) == ("exited", 0), f"{service}: {state}, exit code {code}"
        else:
            assert (state, health) == ("running", "healthy"), f"{service}: {state} {health}"
    assert "grafana" not in states
    print(
        "grafana: not started. It is in the `grafana` profile because its image cannot be pulled here, and "
        "no stand-in replaces it (tests/compose/standins.py); `docker compose --profile grafana up` starts it."
    )


def test_nothing_is_served_before_the_first_upload(settings):
    r = predict(settings)
    assert r.status_code == 503, r.text


def test_prometheus_sends_to_alertmanager_and_mlflow_wants_a_login(settings):
    r = httpx.get(f"{settings.prometheus_url}/api/v1/alertmanagers", timeout=10)
    active = [a["url"] for a in r.json()["data"]["activeAlertmanagers"]]
    assert any("alertmanager:9093" in url for url in active), active
    r = httpx.get(f"{settings.mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10)
    assert r.status_code == 401, r.status_code


# --- upload -> served ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first(settings, iris_csv) -> dict:
    uploaded = upload(settings, f"{PIPELINE}/first.csv", iris_csv)
    served = wait_served(settings, 0, uploaded)
    figure("first upload -> served (s)", served["seconds"])
    return {**uploaded, "served": served}


def test_an_upload_is_trained_and_served_through_nginx(first):
    body = first["served"]
    assert body["model"]["name"] == PIPELINE
    assert body["dataset"]["etag"] == first["etag"]
    assert body["predictions"] == ["setosa"]


def test_prometheus_scrapes_the_bento_with_its_labels(settings, first):
    version = str(first["served"]["model"]["version"])
    query = f'up{{job="bento", pipeline="{PIPELINE}", model_version="{version}"}}'
    deadline = time.monotonic() + 90
    result = []
    while time.monotonic() < deadline:
        r = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": query}, timeout=10)
        result = r.json()["data"]["result"]
        if result and all(sample["value"][1] == "1" for sample in result):
            break
        time.sleep(3)
    assert result, f"Prometheus has no {query}"
    assert all(sample["value"][1] == "1" for sample in result), result
    # The Bento's own metrics carry the same labels: requests by model version.
    predict(settings)
    query = f'bentoml_service_request_total{{pipeline="{PIPELINE}", model_version="{version}", endpoint="/predict"}}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": query}, timeout=10).json()
        if found["data"]["result"]:
            break
        time.sleep(3)
    assert found["data"]["result"], f"Prometheus has no {query}"


def test_airflow_shows_the_asset_chain(airflow, first):
    """s3://datasets/iris -> train_iris -> model://iris/production -> deploy_iris -> deployment://iris/production"""
    version = str(first["served"]["model"]["version"])
    run = newest_run(airflow, f"deploy_{PIPELINE}")
    assert run["state"] == "success", run
    (dataset,) = [e for e in airflow.asset_events(f"s3://datasets/{PIPELINE}") if e["extra"]["key"] == first["key"]]
    assert f"train_{PIPELINE}" in {r["dag_id"] for r in dataset["created_dagruns"]}
    (model,) = [e for e in airflow.asset_events(f"model://{PIPELINE}/production") if e["extra"]["version"] == version]
    assert model["source_dag_id"] == f"train_{PIPELINE}"
    assert model["extra"]["dataset"]["etag"] == first["etag"]
    assert f"deploy_{PIPELINE}" in {r["dag_id"] for r in model["created_dagruns"]}
    deployments = airflow.asset_events(f"deployment://{PIPELINE}/production")
    (deployed,) = [e for e in deployments if str(e["extra"]["version"]) == version]
    assert deployed["source_dag_id"] == f"deploy_{PIPELINE}"


# --- a new version, through the compose deploy path -----------------------------------------------------


@pytest.fixture(scope="module")
def second(compose, settings, airflow, iris_csv, first) -> dict:
    before = deployment(compose)
    # The same rows under a new key: a new object version, so a new run trains the same model, which
    # ties production on the same holdout, and a tie promotes (pipelines/iris.yaml: margin 0).
    uploaded = upload(settings, f"{PIPELINE}/second.csv", iris_csv)
    served = wait_served(settings, int(first["served"]["model"]["version"]), uploaded)
    figure("second upload -> served, blue/green (s)", served["seconds"])
    # Nginx answers from the new colour before the rollout ends: it then drains and stops the old one.
    run = newest_run(airflow, f"deploy_{PIPELINE}")
    return {**uploaded, "served": served, "before": before, "deploy_run": run}


def test_a_second_upload_is_built_and_switched_blue_green(compose, second):
    version = str(second["served"]["model"]["version"])
    before, after = second["before"], deployment(compose)
    assert after["version"] == version
    assert after["bento_tag"] == f"flywheel-{PIPELINE}:v{version}"
    assert after["colour"] != before["colour"], "the idle colour serves the new version"
    # The Bento was built into the store on the state volume, where `serving` starts it from.
    bentos = compose.exec("serving", "bentoml", "list", "-o", "json")
    assert {before["bento_tag"], after["bento_tag"]} <= {b["tag"] for b in json.loads(bentos)}
    # supervisord in `serving` runs the new colour's replicas only: the old ones were stopped.
    programs = bento_programs(compose)
    new_group, old_group = f"bento-{PIPELINE}-{after['colour']}", f"bento-{PIPELINE}-{before['colour']}"
    assert programs and all(name.startswith(f"{new_group}:") for name in programs), programs
    assert all(state == "RUNNING" for state in programs.values()), programs
    assert not any(name.startswith(old_group) for name in programs)


def test_the_deploy_ran_in_the_scheduler_under_the_local_executor(compose, airflow, second):
    run = second["deploy_run"]
    assert run["state"] == "success", run
    scheduler = compose.container("airflow-scheduler")["Config"]["Hostname"]
    assert task_hostname(airflow, f"deploy_{PIPELINE}", run["dag_run_id"], "rollout") == scheduler


# --- scale-out: the celery profile ---------------------------------------------------------------------


def test_a_celery_worker_trains_with_the_celery_profile(compose, settings, airflow, iris_csv, second):
    compose.profiles = ["celery"]
    compose.environment["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"
    figure("up --wait, celery profile (s)", compose.up())
    worker = compose.container("airflow-worker")["Config"]["Hostname"]
    scheduler = compose.container("airflow-scheduler")
    assert "AIRFLOW__CORE__EXECUTOR=CeleryExecutor" in scheduler["Config"]["Env"]

    uploaded = upload(settings, f"{PIPELINE}/third.csv", iris_csv)
    served = wait_served(settings, int(second["served"]["model"]["version"]), uploaded)
    figure("third upload -> served, Celery worker (s)", served["seconds"])
    train = newest_run(airflow, f"train_{PIPELINE}")
    assert train["state"] == "success", train
    assert task_hostname(airflow, f"train_{PIPELINE}", train["dag_run_id"], "train") == worker
    assert worker != scheduler["Config"]["Hostname"]
    deploy = newest_run(airflow, f"deploy_{PIPELINE}")
    assert task_hostname(airflow, f"deploy_{PIPELINE}", deploy["dag_run_id"], "rollout") == worker
