"""End to end, serving at scale: the largest legal requests through Nginx, JSON errors, live routes.

Each pipeline this file needs is trained from its sample here if nothing serves it yet.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from flywheel.clients.api import Client
from flywheel.platform import deployments, routes, supervisor
from flywheel.training import samples
from tests.e2e.stack_ops import DEADLINE, served, wait_until

pytestmark = pytest.mark.e2e
# The longest way to write a number in JSON, so the bodies are as big as legal requests get.
LONG = -1.2345678901234567e-300
MNIST_IMAGE = [[254.99999999999997] * 28 for _ in range(28)]
MAX_ROWS, MAX_IMAGES = 1000, 256  # the largest legal requests, as the README states them


def ensure_serving(settings, pipeline: str, row) -> dict:
    if served(settings, pipeline, row) is None:
        suffix = {"iris": ".csv", "mnist": ""}[pipeline]
        sample = samples.make(settings, pipeline, settings.state / "samples" / f"{pipeline}{suffix}")
        with Client(settings) as client:
            client.upload(sample, pipeline)
    return wait_until(lambda: served(settings, pipeline, row), DEADLINE, f"{pipeline} served")


def post(settings, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{settings.predict_url}{path}", content=content, timeout=60, headers={"content-type": "application/json"}
    )


def test_the_largest_legal_table_request_is_answered_through_nginx(stack_settings):
    ensure_serving(stack_settings, "iris", [5.1, 3.5, 1.4, 0.2])
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    body = json.dumps({"inputs": [dict.fromkeys(columns, LONG)] * MAX_ROWS}).encode()
    assert len(body) > 64 * 1024, "bigger than Nginx's default buffers"
    r = post(stack_settings, "/iris/predict", body)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["predictions"]) == MAX_ROWS


def test_the_largest_legal_image_request_is_answered_through_nginx(stack_settings):
    body = ensure_serving(stack_settings, "mnist", MNIST_IMAGE)
    assert body["model"]["name"] == "mnist"
    payload = json.dumps({"inputs": [MNIST_IMAGE] * MAX_IMAGES}).encode()
    assert len(payload) > 1_000_000
    r = post(stack_settings, "/mnist/predict", payload)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["predictions"]) == MAX_IMAGES
    one_more = post(stack_settings, "/mnist/predict", json.dumps({"inputs": [MNIST_IMAGE] * 257}).encode())
    assert one_more.status_code == 400 and "at most 256" in one_more.text


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("POST", "/nosuch/predict", 404, "no pipeline named nosuch"),
        ("GET", "/iris/predict", 405, "method not allowed"),
        ("GET", "/somewhere", 404, "not found"),
    ],
)
def test_every_answer_nginx_makes_itself_is_json(stack_settings, method, path, status, says):
    r = httpx.request(method, f"{stack_settings.predict_url}{path}", content=b"{}")
    assert r.status_code == status
    assert says in r.json()["error"]


def test_a_body_over_the_limit_gets_a_json_413(stack_settings):
    limit = int(
        (stack_settings.state / "nginx" / "routes.conf").read_text().split("client_max_body_size ")[1].split(";")[0]
    )
    r = post(stack_settings, "/iris/predict", b"[" + b" " * limit + b"]")
    assert r.status_code == 413
    assert str(limit) in r.json()["error"]


def test_a_new_pipeline_is_routed_live_and_moves_no_other(stack_settings):
    ensure_serving(stack_settings, "iris", [5.1, 3.5, 1.4, 0.2])
    iris = deployments.current(stack_settings, "iris")
    ports_before = routes.assigned(stack_settings)
    nginx = supervisor.rpc(stack_settings).getProcessInfo("nginx")["pid"]
    apple = stack_settings.pipelines_dir / "apple.yaml"  # sorts before every other pipeline
    shutil.copy(stack_settings.pipelines_dir / "iris.yaml", apple)
    apple.write_text(apple.read_text().replace("name: iris", "name: apple"))
    try:
        waiting = wait_until(
            lambda: (r := post(stack_settings, "/apple/predict", b"{}")).status_code == 503 and r, 60, "apple routed"
        )
        assert "no model of apple is serving yet" in waiting.json()["error"]
    finally:
        apple.unlink()
    wait_until(lambda: post(stack_settings, "/apple/predict", b"{}").status_code == 404, 60, "apple unrouted")
    assert supervisor.rpc(stack_settings).getProcessInfo("nginx")["pid"] == nginx, "Nginx was restarted"
    assert deployments.current(stack_settings, "iris").ports == iris.ports
    assert {k: v for k, v in routes.assigned(stack_settings).items() if k != "apple"} == ports_before
    time.sleep(1)
    assert served(stack_settings)["model"]["version"] == iris.version
