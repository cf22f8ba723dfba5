"""End to end, serving at scale: the largest legal requests through Nginx, JSON errors, live routes.

Each pipeline this file needs is trained from its sample here if nothing serves it yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

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
    for path in ("/iris/predict", "/predict"):  # iris is the default pipeline
        r = post(stack_settings, path, body)
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
        ("GET", "/predict", 405, "method not allowed"),
    ],
)
def test_every_answer_nginx_makes_itself_is_json(stack_settings, method, path, status, says):
    r = httpx.request(method, f"{stack_settings.predict_url}{path}", content=b"{}")
    assert r.status_code == status
    assert says in r.json()["error"]


def test_a_body_over_its_pipelines_limit_gets_a_json_413(stack_settings):
    """A 4-feature route takes no megabyte, though the MNIST route beside it takes six (test above)."""
    body = b"[" + b" " * 1_000_000 + b"]"
    r = post(stack_settings, "/iris/predict", body)
    assert r.status_code == 413
    assert "/iris/predict takes at most" in r.json()["error"]
    limit = int(r.json()["error"].split("at most ")[1].split(" ")[0])
    assert 1000 * 4 * 20 < limit < 1_000_000, "sized from iris's largest legal request"


def test_a_uri_too_long_gets_a_json_414(stack_settings):
    r = httpx.post(f"{stack_settings.predict_url}/iris/predict?{'x' * 20_000}", content=b"{}")
    assert r.status_code == 414
    assert "too long" in r.json()["error"]


def test_a_hung_replica_is_passed_over_and_a_hung_pipeline_answers_a_json_504(stack_settings):
    """SIGSTOP freezes a replica's server: Nginx waits for it no longer than a Bento's own timeout
    allows, sends the request to the other replica, and answers 504 itself only when none answers."""
    ensure_serving(stack_settings, "iris", [5.1, 3.5, 1.4, 0.2])
    live = deployments.current(stack_settings, "iris")
    workers = [replica_processes(stack_settings, name) for name in live.programs]
    body = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()
    try:
        signal_all(workers[0], signal.SIGSTOP)
        timings = []
        for _ in range(4):  # least_conn tries the frozen one at least once
            started = time.monotonic()
            r = post(stack_settings, "/iris/predict", body)
            timings.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
        assert max(timings) < 10, timings
        signal_all(workers[1], signal.SIGSTOP)
        started = time.monotonic()
        r = post(stack_settings, "/iris/predict", body)
        waited = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert "answered within" in r.json()["error"]
        assert waited < 20, waited
        print(f"\none replica frozen: answered in at most {max(timings):.1f}s; both frozen: 504 after {waited:.1f}s")
    finally:
        for pids in workers:
            signal_all(pids, signal.SIGCONT)
    wait_until(lambda: served(stack_settings, "iris", [5.1, 3.5, 1.4, 0.2]), 60, "iris answering again")


def replica_processes(settings, program: str) -> list[int]:
    """A replica's server and everything it started, from /proc."""
    root = supervisor.rpc(settings).getProcessInfo(program)["pid"]
    pids, frontier = {root}, {root}
    while frontier:
        children = set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    stat = (proc / "stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2 :].split()[1]) in frontier:
                    children.add(int(proc.name))
        frontier = children - pids
        pids |= children
    return sorted(pids)


def signal_all(pids: list[int], sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


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
