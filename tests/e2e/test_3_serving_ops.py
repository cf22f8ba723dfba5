"""End to end, serving done right (runs last): metrics in Prometheus, rollback under load, a failed rollout."""

from __future__ import annotations

import time

import httpx
import pytest

from flywheel import deploy, loadgen, pipelines
from flywheel.airflow_api import AirflowAPI
from flywheel.mlflow_api import MlflowAPI

pytestmark = pytest.mark.e2e

ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture(scope="module")
def api(stack_settings):
    client = AirflowAPI.connect(stack_settings)
    yield client
    client.close()


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


def test_answers_carry_provenance_headers(stack_settings):
    r = httpx.post(f"{stack_settings.predict_url}/iris/predict", json=ROW, headers={"X-Request-Id": "e2e-trace-1"})
    assert r.status_code == 200
    body = r.json()
    assert r.headers["x-model-version"] == body["model"]["version"]
    assert r.headers["x-model-name"] == "iris"
    assert r.headers["x-dataset-version"] == body["dataset"]["etag"]
    assert r.headers["x-request-id"]


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
    from flywheel.serving_metrics import EXPORTED

    names = set(httpx.get(f"{stack_settings.prometheus_url}/api/v1/label/__name__/values").json()["data"])
    assert names >= EXPORTED, f"not scraped: {sorted(EXPORTED - names)}"


def test_a_rollout_that_fails_its_smoke_test_keeps_the_old_one_serving(stack_settings):
    """A Bento that answers wrongly (it serves another version than it claims) never takes traffic."""
    live = deploy.current(stack_settings, "iris")
    mlflow = MlflowAPI(stack_settings.mlflow_url)
    previous = mlflow.version_by_alias("iris", "previous")
    assert previous and previous != live.version
    pipeline = pipelines.get(stack_settings.pipelines_dir, "iris")
    load = loadgen.start(f"{stack_settings.predict_url}/iris/predict", ROW, connections=4, seconds=25)
    with pytest.raises(deploy.DeployFailed, match="smoke test"):
        deploy.rollout(stack_settings, pipeline, live.version, f"flywheel-iris:v{previous}", log=print)
    stats = loadgen.finish(load)
    assert stats["failed"] == 0, stats
    assert served(stack_settings).json()["model"]["version"] == live.version
    assert deploy.current(stack_settings, "iris") == live
    assert mlflow.model_version("iris", live.version)["tags"]["flywheel.deployment"] == "failed"
    mlflow.set_version_tag("iris", live.version, "flywheel.deployment", "serving")  # leave the record honest
    mlflow.close()


def test_rollback_under_load_serves_previous_with_zero_failed_requests(stack_settings, api):
    live = served(stack_settings).json()["model"]["version"]
    before = {r["dag_run_id"] for r in api.dag_runs("deploy_iris")}
    load = loadgen.start(f"{stack_settings.predict_url}/iris/predict", ROW, connections=16, seconds=90)
    time.sleep(3)
    extra = deploy.rollback(stack_settings, pipelines.get(stack_settings.pipelines_dir, "iris"))
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
