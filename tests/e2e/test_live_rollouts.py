"""End to end: a challenger that won offline is judged on live traffic, with feedback, before it takes over.

One pipeline (iris_canary, a canary with short bakes) through four versions on the real stack:
v1 serves; v2 is trained on a file whose versicolor and virginica labels are swapped (it wins the
offline gate on its own holdout, and loses live), so its canary is rolled back by the live-score
guardrail; v3 is honest, and goes through every step to 100 % while the scheduler is killed -9;
v4 is honest and slow (its replicas held to a few % of a core), and the p99 guardrail rolls it back.
The oracle is what this test sent and was answered (each request's id, the version and role in its
headers, the true species of its row), and what MLflow, Airflow, Nginx's answers and MinIO say.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from flywheel.clients import objectstore
from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.settings import INFERENCE_BUCKET, Settings
from flywheel.platform import deployments
from flywheel.serving import live
from tests.e2e.stack_ops import (
    DEADLINE,
    HOLDOUT,
    TRAINING,
    airflow,
    csv_bytes,
    descendants,
    extra_pipeline,
    kill_9,
    program_pid,
    put,
    wait_first_served,
    wait_until,
)

pytestmark = pytest.mark.e2e

PIPELINE = "iris_canary"
ROLLOUT = """
rollout:
  strategy: canary
  steps: [10, 50, 100]
  bake_seconds: 5
  min_requests: 20
  guardrails: {live_score_drop: 0.05, min_feedback: 20}
"""
SWAPPED = {"versicolor": "virginica", "virginica": "versicolor"}


class LiveTraffic:
    """Clients asking /<p>/predict back to back, each request with its own X-Request-Id, and honest
    feedback for every answer (the true species of its row), posted in batches as a labelling
    process would. Records every answer: its status, version and role."""

    def __init__(
        self, settings: Settings, pipeline: str, clients: int = 3, user_ids: bool = False, rows=None, pause: float = 0.0
    ) -> None:
        self.settings, self.pipeline, self.clients, self.user_ids = settings, pipeline, clients, user_ids
        # What each request asks: rows(i) -> a row of four features and its true species; HOLDOUT in turn by default.
        self.rows = rows or (lambda i: HOLDOUT[i % len(HOLDOUT)])
        self.pause = pause  # seconds between one client's requests
        self.answers: dict[str, dict] = {}
        self.failures: list[tuple[float, str]] = []  # (when, what)
        self.labelled: set[str] = set()
        self.feedback_errors: list[str] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._ask, args=(i,), daemon=True) for i in range(clients)]
        self.threads.append(threading.Thread(target=self._label, daemon=True))

    def __enter__(self) -> LiveTraffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=30)

    def _ask(self, worker: int) -> None:
        with Client(self.settings) as client:
            i = worker
            while not self.stopped.is_set():
                row = self.rows(i)
                i += self.clients
                if self.pause:
                    self.stopped.wait(self.pause)
                rid = f"t-{uuid.uuid4().hex}"
                headers = client.headers(rid)
                if self.user_ids:  # an A/B test's key: 200 users, each sticking to one arm
                    headers["X-User-Id"] = f"user-{i % 200}"
                try:
                    r = client.http.post(f"/{self.pipeline}/predict", json={"inputs": [row[:4]]}, headers=headers)
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append((time.time(), f"{rid}: {exc!r}"))
                    continue
                answer = {
                    "status": r.status_code,
                    "version": r.headers.get("x-model-version"),
                    "role": r.headers.get("x-model-role"),
                    "truth": row[4],
                    "at": time.time(),
                }
                with self.lock:
                    self.answers[rid] = answer
                    if r.status_code != 200:
                        self.failures.append((time.time(), f"{rid}: HTTP {r.status_code} {r.text[:200]}"))

    def _label(self) -> None:
        with Client(self.settings) as client:
            while not self.stopped.wait(1.0):
                with self.lock:
                    due = {
                        rid: [a["truth"]]
                        for rid, a in self.answers.items()
                        if a["status"] == 200 and rid not in self.labelled and time.time() - a["at"] > 2.5
                    }
                for start in range(0, len(due), 500):
                    batch = dict(list(due.items())[start : start + 500])
                    try:
                        r = client.feedback(self.pipeline, batch)
                    except httpx.HTTPError as exc:
                        self.feedback_errors.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        self.feedback_errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    for item in r.json()["items"]:
                        if item["matched"]:
                            self.labelled.add(item["request_id"])

    def by(self, since: float = 0.0) -> Counter:
        with self.lock:
            return Counter((a["version"], a["role"]) for a in self.answers.values() if a["at"] >= since)


def new_rollout_running(settings: Settings, production: str, pipeline: str = PIPELINE):
    """A condition: the rollout of a version other than `production` is running, its candidate recorded."""

    def running() -> live.State | None:
        state = live.load(settings, pipeline)
        if state and state.status == live.RUNNING and state.version != production:
            return state if deployments.candidate(settings, pipeline) else None  # written just after the state
        return None

    return running


def deploy_runs(api, pipeline: str = PIPELINE) -> set[str]:
    """The ids of the pipeline's deploy runs so far."""
    return {r["dag_run_id"] for r in api.dag_runs(f"deploy_{pipeline}")}


def finished(api, before: set[str], pipeline: str = PIPELINE) -> dict | None:
    """The newest deploy run not in `before` once it has ended, else None."""
    runs = [r for r in api.dag_runs(f"deploy_{pipeline}") if r["dag_run_id"] not in before]
    return next((r for r in runs if r["state"] in ("success", "failed")), None)


def version_tags(settings: Settings, version: str, pipeline: str = PIPELINE) -> dict:
    with MlflowAPI.connect(settings) as mlflow:
        return mlflow.model_version(pipeline, version)["tags"]


def alias(settings: Settings, name: str, pipeline: str = PIPELINE) -> str | None:
    with MlflowAPI.connect(settings) as mlflow:
        return mlflow.version_by_alias(pipeline, name)


@pytest.fixture(scope="module")
def canary(stack_settings):
    with extra_pipeline(stack_settings, PIPELINE, edit=lambda text: text + ROLLOUT) as name:
        put(stack_settings, f"{name}/v1.csv", csv_bytes(TRAINING))
        first = wait_first_served(stack_settings, name)
        yield first["model"]["version"]


def test_a_challenger_that_wins_offline_and_loses_live_is_rolled_back(stack_settings, canary, alert_inbox):
    production = canary
    with airflow(stack_settings) as api:
        before = deploy_runs(api)
        with LiveTraffic(stack_settings, PIPELINE) as traffic:
            wait_until(lambda: len(traffic.labelled) >= 50, 120, "feedback matched to answers")
            swapped = [[*row[:4], SWAPPED.get(row[4], row[4])] for row in TRAINING]
            put(stack_settings, f"{PIPELINE}/swapped.csv", csv_bytes(swapped))
            run = wait_until(lambda: finished(api, before), DEADLINE, "the canary decided")
            time.sleep(3)  # answers after the rollback
            after_rollback = time.time()
            time.sleep(3)
        assert run["state"] == "failed", run  # the judge failed the deploy run: the rollout was aborted
    candidate = str(int(production) + 1)
    answered = traffic.by()
    print(f"answers by (version, role): {dict(answered)}; labelled {len(traffic.labelled)}")
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.feedback_errors == [], traffic.feedback_errors[:5]
    # Roles are what Nginx said, and each version answered only in its own role.
    assert set(answered) <= {(production, "production"), (candidate, "candidate")}, answered
    from_candidate = answered[(candidate, "candidate")]
    assert 0 < from_candidate <= 0.2 * sum(answered.values()), answered  # the 10 % step, then back
    assert set(traffic.by(after_rollback)) == {(production, "production")}
    tags = version_tags(stack_settings, candidate)
    assert tags[schema.ROLLOUT].startswith("aborted: live accuracy"), tags
    assert tags[schema.DEPLOYMENT] == schema.DEPLOY_FAILED and "rolled back" in tags[schema.DEPLOYMENT_REASON]
    assert (alias(stack_settings, schema.PRODUCTION), alias(stack_settings, schema.CANDIDATE)) == (production, None)
    assert wait_until(
        lambda: [
            a
            for a in alert_inbox.received
            if a["name"] == "Flywheel: rollout rolled back"
            and a["labels"].get("pipeline") == PIPELINE
            and "live accuracy" in a["summary"]
        ],
        60,
        "the rollback's alert",
    )
    out = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "rollout", PIPELINE], capture_output=True, text=True, timeout=60
    ).stdout
    assert f"v{candidate} against production v{production}" in out and "aborted: live accuracy" in out, out
    # What was answered, and the labels, are in MinIO as Parquet for retraining (issue 19's dataset).
    client = objectstore.client(stack_settings)
    for kind in ("answers", "feedback"):
        wait_until(
            lambda kind=kind: list(client.list_objects(INFERENCE_BUCKET, f"{PIPELINE}/{kind}/", recursive=True)),
            60,
            f"{kind} in s3://{INFERENCE_BUCKET}",
        )


def test_a_good_challenger_goes_through_every_step_with_no_failed_request(stack_settings, canary):
    production = alias(stack_settings, schema.PRODUCTION)
    with airflow(stack_settings) as api:
        before = deploy_runs(api)
        with LiveTraffic(stack_settings, PIPELINE) as traffic:
            put(stack_settings, f"{PIPELINE}/honest.csv", csv_bytes(TRAINING[9:] + TRAINING[:9]))
            state = wait_until(
                lambda: (s := live.load(stack_settings, PIPELINE)) and s.status == live.RUNNING and s.step == 1 and s,
                DEADLINE,
                "the canary at its second step",
                interval=0.5,
            )
            killed = kill_9(stack_settings, "airflow-scheduler", timeout=120)
            wait_until(
                lambda: (s := live.load(stack_settings, PIPELINE)).status != live.RUNNING or s.step == 2,
                DEADLINE,
                "the canary at its last step",
                interval=0.5,
            )
            # Nginx killed mid-rollout: supervisord restarts it with the rollout's routes, and the
            # rollout goes on. Only requests sent while it was down may fail.
            nginx_down = time.time()
            nginx = kill_9(stack_settings, "nginx", f"{stack_settings.predict_url}/health", timeout=60)
            nginx_back = time.time() + 1.0
            run = wait_until(lambda: finished(api, before), DEADLINE, "the canary decided")
            time.sleep(3)
            after = time.time()
            time.sleep(3)
        outcome = (live.load(stack_settings, PIPELINE).history, version_tags(stack_settings, state.version))
        assert run["state"] == "success", (run, outcome)
        events = api.asset_events(f"deployment://{PIPELINE}/production")
    candidate = state.version
    answered = traffic.by()
    outage = [f for at, f in traffic.failures if nginx_down <= at <= nginx_back]
    print(
        f"answers by (version, role): {dict(answered)}; scheduler back in {killed['seconds']:.1f}s, "
        f"Nginx in {nginx['seconds']:.1f}s ({len(outage)} requests failed while it was down)"
    )
    assert [f for at, f in traffic.failures if not nginx_down <= at <= nginx_back] == [], traffic.failures[:5]
    assert killed["survivors"] == [] and nginx["survivors"] == []
    assert answered[(candidate, "candidate")] > 0 and answered[(production, "production")] > 0
    assert set(traffic.by(after)) == {(candidate, "production")}  # all traffic, and it is production now
    history = live.load(stack_settings, PIPELINE).history
    assert [h["weight"] for h in history if h.get("passed")] == [10, 50, 100]
    tags = version_tags(stack_settings, candidate)
    assert tags[schema.ROLLOUT].startswith("promoted: every step passed"), tags
    assert (alias(stack_settings, schema.PRODUCTION), alias(stack_settings, schema.PREVIOUS)) == (
        candidate,
        production,
    )
    assert alias(stack_settings, schema.CANDIDATE) is None
    assert str(events[0]["extra"]["version"]) == candidate, events[:1]
    assert events[0]["extra"]["colour"] == live.deployments.current(stack_settings, PIPELINE).colour


@contextlib.contextmanager
def cpu_quota(pids: set[int], percent: float):
    """The processes (every thread) held to `percent` of one core by a CPU cgroup of their own, as a model
    too heavy for its hardware would be; back in the root cgroup afterwards. cgroup v1's cpu controller
    where it is mounted (this machine), else v2's."""
    v1 = Path("/sys/fs/cgroup/cpu")
    root = v1 if (v1 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    group = root / f"flywheel-e2e-{os.getpid()}"
    group.mkdir()
    try:
        period = 100_000
        if root == v1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(period * percent / 100)))
        else:
            (group / "cpu.max").write_text(f"{int(period * percent / 100)} {period}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (root / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_a_slow_challenger_is_rolled_back_by_the_p99_guardrail(stack_settings, canary):
    """An honest challenger whose replicas get 3 % of a core once its canary starts: the same answers,
    slower than production's p99 by more than the guardrail's 100 ms. The canary rolls it back, and no
    client request fails (Nginx keeps waiting for the slow answers)."""
    production = alias(stack_settings, schema.PRODUCTION)
    with airflow(stack_settings) as api:
        before = deploy_runs(api)
        with LiveTraffic(stack_settings, PIPELINE) as traffic:
            put(stack_settings, f"{PIPELINE}/slow.csv", csv_bytes(TRAINING[13:] + TRAINING[:13]))
            state = wait_until(
                new_rollout_running(stack_settings, production), DEADLINE, "the canary running", interval=0.2
            )
            replicas = deployments.candidate(stack_settings, PIPELINE).deployment.programs
            pids = set()
            for name in replicas:
                pid = program_pid(stack_settings, name)
                pids |= {pid, *descendants(pid)}
            with cpu_quota(pids, percent=3):
                run = wait_until(lambda: finished(api, before), DEADLINE, "the canary decided")
            time.sleep(3)  # answers after the rollback
            after_rollback = time.time()
            time.sleep(3)
        assert run["state"] == "failed", run
    candidate = state.version
    answered = traffic.by()
    print(f"answers by (version, role): {dict(answered)}; {live.load(stack_settings, PIPELINE).reason}")
    assert traffic.failures == [], traffic.failures[:5]
    assert set(answered) <= {(production, "production"), (candidate, "candidate")}, answered
    assert 0 < answered[(candidate, "candidate")] <= 0.2 * sum(answered.values()), answered
    assert set(traffic.by(after_rollback)) == {(production, "production")}
    tags = version_tags(stack_settings, candidate)
    assert tags[schema.ROLLOUT].startswith("aborted: ") and "p99 " in tags[schema.ROLLOUT], tags
    assert tags[schema.DEPLOYMENT] == schema.DEPLOY_FAILED and "rolled back" in tags[schema.DEPLOYMENT_REASON]
    assert (alias(stack_settings, schema.PRODUCTION), alias(stack_settings, schema.CANDIDATE)) == (production, None)
