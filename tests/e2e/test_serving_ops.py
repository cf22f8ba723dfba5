"""End to end, serving done right: metrics in Prometheus, a failed rollout and a rollback, both under load.

Trains iris twice itself if it has no `previous` version to roll back to.
"""

from __future__ import annotations

import time

import httpx
import pytest

from flywheel.clients import load as loadgen
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines, schema
from flywheel.operations.rollback import rollback
from flywheel.platform import deployments
from flywheel.serving import rollout as deploy
from tests.e2e.stack_ops import TRAINING, csv_bytes, put, wait_for_version

pytestmark = pytest.mark.e2e

ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture(scope="module")
def api(stack_settings):
    client = AirflowAPI.connect(stack_settings)
    yield client
    client.close()


@pytest.fixture(scope="module", autouse=True)
def two_versions(stack_settings):
    """A production iris version and a previous one: uploaded here if the registry lacks them."""
    with MlflowAPI.connect(stack_settings) as mlflow:
        missing = 2 - sum(mlflow.version_by_alias("iris", a) is not None for a in ("production", "previous"))
    for i in range(missing):
        before = (
            served(stack_settings).json()["model"]["version"] if served(stack_settings).status_code == 200 else None
        )
        put(stack_settings, f"iris/ops-{i}.csv", csv_bytes(TRAINING[i:] + TRAINING[:i]))
        wait_for_version(stack_settings, before)


def served(settings) -> httpx.Response:
    return httpx.post(f"{settings.predict_url}/iris/predict", json=ROW, timeout=10)


def prometheus(settings, promql: str, timeout: float = 60) -> list[dict]:
    """Series for a query, waiting for scrapes (every 5 s) to bring them in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": promql})
        result = r.json()["data"]["result"]
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"Prometheus has no series for {promql}")


def test_answers_carry_provenance_and_the_clients_request_id_through_nginx_into_both_logs(stack_settings):
    request_id = f"e2e-trace-{time.time_ns()}"
    r = httpx.post(f"{stack_settings.predict_url}/iris/predict", json=ROW, headers={"X-Request-Id": request_id})
    assert r.status_code == 200
    body = r.json()
    assert r.headers["x-model-version"] == body["model"]["version"]
    assert r.headers["x-model-name"] == "iris"
    assert r.headers["x-dataset-version"] == body["dataset"]["etag"]
    assert r.headers["x-request-id"] == request_id  # the client's own id survived Nginx
    time.sleep(1.5)  # both logs are written once a second
    access = (stack_settings.logs / "nginx-access.log").read_text()
    assert f"request_id={request_id} " in access and f"model_version={body['model']['version']}" in access
    replica_logs = "".join(p.read_text() for p in stack_settings.logs.glob("bento-iris-*.requests.log"))
    assert f"request_id={request_id} model=iris:v{body['model']['version']}" in replica_logs
    anonymous = httpx.post(f"{stack_settings.predict_url}/iris/predict", json=ROW)
    assert len(anonymous.headers["x-request-id"]) == 32  # Nginx made one


def test_prometheus_scrapes_bento_metrics_labelled_by_version(stack_settings):
    version = served(stack_settings).json()["model"]["version"]
    series = prometheus(stack_settings, f'bentoml_service_request_total{{pipeline="iris", model_version="{version}"}}')
    assert any(s["metric"].get("endpoint") == "/predict" for s in series)
    prometheus(
        stack_settings, f'bentoml_service_request_duration_seconds_bucket{{pipeline="iris", model_version="{version}"}}'
    )
    assert prometheus(stack_settings, "nginx_connections_accepted")
    rules = httpx.get(f"{stack_settings.prometheus_url}/api/v1/rules").json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {"flywheel:request_rate:1m", "FlywheelHighErrorRate"}


def test_every_metric_dashboards_use_is_scraped(stack_settings):
    """The names compose mode's Grafana dashboard may use (tests/unit/test_compose.py) are all live."""
    from flywheel.operations.metrics import EXPORTED

    names = set(httpx.get(f"{stack_settings.prometheus_url}/api/v1/label/__name__/values").json()["data"])
    assert names >= EXPORTED, f"not scraped: {sorted(EXPORTED - names)}"


def test_a_rollout_that_fails_its_smoke_test_keeps_the_old_one_serving(stack_settings):
    """A Bento that answers wrongly (the live bento, rolled out as if it were `previous`) never takes traffic."""
    live = deployments.current(stack_settings, "iris")
    with MlflowAPI.connect(stack_settings) as mlflow:
        previous = mlflow.version_by_alias("iris", "previous")
        assert previous and previous != live.version
        pipeline = pipelines.get(stack_settings.pipelines_dir, "iris")
        load = loadgen.start(f"{stack_settings.predict_url}/iris/predict", ROW, connections=4, seconds=25)
        with pytest.raises(deploy.DeployFailed, match=f"answers as v{live.version}, expected v{previous}"):
            deploy.rollout(stack_settings, pipeline, previous, live.bento_tag, log=print)
        stats = loadgen.finish(load)
        assert stats["failed"] == 0, stats
        assert served(stack_settings).json()["model"]["version"] == live.version
        assert deployments.current(stack_settings, "iris") == live
        tags = mlflow.model_version("iris", previous)["tags"]
        assert tags[schema.DEPLOYMENT] == "failed"
        assert "smoke test" in tags[schema.DEPLOYMENT_REASON]
        assert mlflow.model_version("iris", live.version)["tags"][schema.DEPLOYMENT] == "serving"


def test_rollback_under_load_serves_previous_with_zero_failed_requests(stack_settings, api):
    live = served(stack_settings).json()["model"]["version"]
    before = {r["dag_run_id"] for r in api.dag_runs("deploy_iris")}
    load = loadgen.start(f"{stack_settings.predict_url}/iris/predict", ROW, connections=16, seconds=90)
    time.sleep(3)
    extra = rollback(stack_settings, pipelines.get(stack_settings.pipelines_dir, "iris"))
    assert extra["rollback_from"] == live
    deadline = time.monotonic() + 85
    while time.monotonic() < deadline:
        runs = [r for r in api.dag_runs("deploy_iris") if r["dag_run_id"] not in before]
        if runs and runs[0]["state"] in ("success", "failed"):
            break
        time.sleep(2)
    stats = loadgen.finish(load)
    assert runs and runs[0]["state"] == "success"
    assert served(stack_settings).json()["model"]["version"] == extra["version"]
    assert stats["requests"] > 1000
    assert stats["failed"] == 0, f"failed requests during the blue/green switch: {stats}"
    with MlflowAPI.connect(stack_settings) as mlflow:  # the version that failed before now serves, and says so
        assert mlflow.model_version("iris", extra["version"])["tags"][schema.DEPLOYMENT] == "serving"
        assert mlflow.model_version("iris", live)["tags"][schema.DEPLOYMENT] == "retired"
