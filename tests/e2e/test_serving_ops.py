"""End to end, serving done right: metrics in Prometheus, a failed rollout and a rollback, both under load
and both through the real deploy DAG.

Trains iris twice itself if it has no `previous` version to roll back to.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from flywheel.clients import load as loadgen
from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines, schema
from flywheel.operations import lineage, status
from flywheel.operations.rollback import rollback
from flywheel.platform import deployments, routes
from tests.e2e.stack_ops import TRAINING, csv_bytes, finished_run, put, wait_for_version

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


def test_each_replica_counts_only_its_own_requests(stack_settings):
    """A replica's /metrics are its own (platform/deployments.py, replica_home): 20 requests sent to
    one replica are counted there, and not by its sibling."""
    replicas = [stack_settings.url(port) for port in deployments.current(stack_settings, "iris").ports]
    assert len(replicas) >= 2, replicas

    def predicted(url: str) -> float:
        lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith("bentoml_service_request_total{") and 'endpoint="/predict"' in line
        )

    before = [predicted(url) for url in replicas[:2]]
    for _ in range(20):
        assert httpx.post(f"{replicas[0]}/predict", json=ROW, timeout=10).status_code == 200
    assert [predicted(url) - b for url, b in zip(replicas[:2], before)] == [20.0, 0.0]


def test_every_metric_dashboards_use_is_scraped(stack_settings):
    """The names compose mode's Grafana dashboard may use (tests/unit/test_compose.py) are all live."""
    from flywheel.operations.metrics import EXPORTED

    names = set(httpx.get(f"{stack_settings.prometheus_url}/api/v1/label/__name__/values").json()["data"])
    assert names >= EXPORTED, f"not scraped: {sorted(EXPORTED - names)}"


class Impostor(ThreadingHTTPServer):
    """A server on a port the next rollout will start a replica on: ready, but answering as another
    version. The replica cannot bind the port; the rollout's smoke test meets the impostor instead."""

    def __init__(self, port: int, version: str):
        class Handler(BaseHTTPRequestHandler):
            def _send(handler, body: dict) -> None:
                data = json.dumps(body).encode()
                handler.send_response(200)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

            def do_GET(handler):
                handler._send({"status": "ready"})

            def do_POST(handler):
                rows = json.loads(handler.rfile.read(int(handler.headers["content-length"])))["inputs"]
                handler._send({"predictions": ["setosa"] * len(rows), "model": {"version": version}})

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_failed_rollout_keeps_the_old_version_serving_and_mlflow_says_so(stack_settings, api):
    """Through the real deploy DAG, under load: a promoted version whose replicas do not answer as it
    never takes traffic, no request fails, and MLflow's aliases, `status` and `lineage` agree with /predict."""
    live = deployments.current(stack_settings, "iris")
    idle = "green" if live.colour == "blue" else "blue"
    pipeline = pipelines.get(stack_settings.pipelines_dir, "iris")
    impostors = [Impostor(port, live.version) for port in routes.replica_ports(stack_settings, "iris", idle, 2)]
    load = loadgen.start(f"{stack_settings.predict_url}/iris/predict", ROW, connections=4, seconds=150)
    try:
        trains = {r["dag_run_id"] for r in api.dag_runs("train_iris")}
        deploys = {r["dag_run_id"] for r in api.dag_runs("deploy_iris")}
        put(stack_settings, "iris/ops-failing-rollout.csv", csv_bytes(TRAINING[7:] + TRAINING[:7]))
        trained = finished_run(api, "train_iris", trains)
        assert trained["state"] == "success"
        with MlflowAPI.connect(stack_settings) as mlflow:
            [record] = [
                r["data"]["tags"]
                for r in mlflow.search_runs("iris", schema.tag_filter(schema.AIRFLOW_RUN, trained["dag_run_id"]))
                if r["data"]["tags"].get(schema.DECISION) == "promoted"
            ]
        promoted = record[schema.MODEL_VERSION]  # the same data ties production and is promoted
        run = finished_run(api, "deploy_iris", deploys)
    finally:
        for impostor in impostors:
            impostor.shutdown()
            impostor.server_close()
        stats = loadgen.stop(load)  # the load covered the whole deploy run
    assert run["state"] == "failed"
    assert stats["failed"] == 0, stats
    assert served(stack_settings).json()["model"]["version"] == live.version
    with MlflowAPI.connect(stack_settings) as mlflow:
        assert mlflow.version_by_alias("iris", schema.PRODUCTION) == live.version, "production names what serves"
        assert mlflow.version_by_alias("iris", schema.PREVIOUS) != live.version
        tags = mlflow.model_version("iris", promoted)["tags"]
        assert tags[schema.DEPLOYMENT] == "failed"
        assert f"answers as v{live.version}, expected v{promoted}" in tags[schema.DEPLOYMENT_REASON]
        assert mlflow.model_version("iris", live.version)["tags"][schema.DEPLOYMENT] == "serving"
        state = status.pipeline_status(stack_settings, pipeline, mlflow, api)
    assert state["production"] == state["serving"]["version"] == live.version
    links = {link["what"]: link for link in lineage.chain(stack_settings, "iris")["links"]}
    assert links["registered version"]["id"] == f"iris v{live.version}"
    assert links["deployment"]["facts"]["serving_now"] is True


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
    stats = loadgen.stop(load)  # the load covered the whole rollback's deploy run
    assert runs and runs[0]["state"] == "success"
    assert served(stack_settings).json()["model"]["version"] == extra["version"]
    assert stats["requests"] > 1000
    assert stats["failed"] == 0, f"failed requests during the blue/green switch: {stats}"
    with MlflowAPI.connect(stack_settings) as mlflow:  # the version that failed before now serves, and says so
        assert mlflow.model_version("iris", extra["version"])["tags"][schema.DEPLOYMENT] == "serving"
        assert mlflow.model_version("iris", live)["tags"][schema.DEPLOYMENT] == "retired"
