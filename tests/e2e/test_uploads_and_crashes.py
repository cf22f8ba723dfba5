"""End to end: every upload trained or accounted for, and every crash survived, on the real stack.

The platform's promise is "the newest data ends up served". These tests keep it under a burst of
concurrent uploads, with the bridge down, after uploads no pipeline owns, and under `kill -9` of
every program, each bounded in time. Figures print for docs/measurements.md.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.clients import load as loadgen
from flywheel.operations.parked import DEAD_LETTERS
from flywheel.platform import deployments, stack, supervisor, topology
from tests.e2e.stack_ops import (
    DEADLINE,
    ROW,
    TRAINING,
    airflow,
    csv_bytes,
    kill_9,
    ledger,
    mlflow_runs,
    orphans,
    processes_of,
    put,
    served,
    wait_until,
)

pytestmark = pytest.mark.e2e


def iris_upload(i: int) -> bytes:
    """A valid iris table, different for each i (rows rotated), so every upload is a new version."""
    k = i % len(TRAINING)
    return csv_bytes(TRAINING[k:] + TRAINING[:k])


def wait_served(settings, upload: dict, pipeline: str = "iris") -> dict:
    """Until /predict answers from a model trained on exactly this upload."""
    return wait_until(
        lambda: (body := served(settings, pipeline)) and body["dataset"]["version_id"] == upload["version_id"] and body,
        DEADLINE,
        f"{upload['key']} (version {upload['version_id']}) served",
    )


def wait_accounted(settings, uploaded: list[dict], timeout: float = 300) -> dict[str, dict]:
    """Until every upload is in the ledger (a run still to come may have to account for the last ones)."""

    def complete():
        found = ledger(settings)
        return found if all(u["version_id"] in found for u in uploaded) else None

    return wait_until(complete, timeout, "every upload accounted for in MLflow", interval=5)


def test_a_burst_of_uploads_ends_with_the_newest_trained_and_served(stack_settings):
    n = 24
    with ThreadPoolExecutor(max_workers=12) as pool:
        uploaded = list(pool.map(lambda i: put(stack_settings, f"iris/burst/{i:02d}.csv", iris_upload(i)), range(n)))
    # One more, after all of them: the newest upload by what this test did, not by a listing.
    newest = put(stack_settings, "iris/burst/zz-after-the-burst.csv", iris_upload(n))
    uploaded.append(newest)
    burst_ended = time.monotonic()
    body = wait_served(stack_settings, newest)
    to_served = time.monotonic() - burst_ended
    found = wait_accounted(stack_settings, uploaded)
    with airflow(stack_settings) as api:
        event_versions = {e["extra"].get("version_id") for e in api.asset_events("s3://datasets/iris", limit=100)}
        runs = [r for r in api.dag_runs("train_iris") if r["state"] in ("success", "failed", "running", "queued")]
    lost = [u["key"] for u in uploaded if u["version_id"] not in event_versions]
    stranded = [u["key"] for u in uploaded if u["version_id"] not in found]
    roles = [found[u["version_id"]]["role"] for u in uploaded]
    print(
        f"\nburst of {n}: served {newest['key']} {to_served:.1f}s after the burst ended; lost {len(lost)}, "
        f"stranded {len(stranded)}; roles {dict((r, roles.count(r)) for r in set(roles))}; train runs {len(runs)}"
    )
    assert lost == [] and stranded == []
    assert found[newest["version_id"]]["role"] == "trained"
    assert set(roles) <= {"trained", "superseded"}
    assert body["model"]["version"]


def test_uploads_made_while_the_bridge_is_down_are_trained_once_it_is_back(stack_settings):
    sup = supervisor.rpc(stack_settings)
    sup.stopProcess("events-bridge")
    try:
        uploaded = [put(stack_settings, f"iris/bridge-down/{i}.csv", iris_upload(100 + i)) for i in range(3)]
        time.sleep(3)
    finally:
        sup.startProcess("events-bridge")
    wait_served(stack_settings, uploaded[-1])
    found = wait_accounted(stack_settings, uploaded)
    assert found[uploaded[-1]["version_id"]]["role"] == "trained"


def test_an_upload_no_pipeline_owns_is_dead_lettered_and_the_next_ones_train(stack_settings):
    before = DEAD_LETTERS.count(stack_settings)
    put(stack_settings, "stray.csv", iris_upload(0))  # the bucket's root: no pipeline folder
    put(stack_settings, "nopipeline/x.csv", iris_upload(1))
    good = put(stack_settings, "iris/after-dead-letters.csv", iris_upload(200))
    wait_served(stack_settings, good)
    letters = DEAD_LETTERS.read_all(stack_settings)
    assert len(letters) >= before + 2
    reasons = {letter["upload"]["key"]: letter["reason"] for letter in letters}
    assert "no pipeline owns the root of datasets/" in reasons["stray.csv"]
    assert "no pipeline owns datasets/nopipeline/" in reasons["nopipeline/x.csv"]
    for path in DEAD_LETTERS.folder(stack_settings).glob("*.json"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    metrics = httpx.get(f"{stack_settings.url(stack_settings.ports.bridge)}/metrics").text
    assert f"flywheel_bridge_dead_letters {float(len(letters))}" in metrics


def test_an_upload_whose_run_failed_for_good_is_retrained_by_the_reconciler(stack_settings):
    """MLflow down: the run fails before deciding anything, so its upload stays pending; once MLflow
    is back, the bridge's reconciler re-emits the upload's event and it trains."""
    sup = supervisor.rpc(stack_settings)
    with airflow(stack_settings) as api:
        before = {r["dag_run_id"] for r in api.dag_runs("train_iris")}
        sup.stopProcess("mlflow")
        try:
            upload = put(stack_settings, "iris/while-mlflow-was-down.csv", iris_upload(400))
            wait_until(
                lambda: [
                    r for r in api.dag_runs("train_iris") if r["dag_run_id"] not in before and r["state"] == "failed"
                ],
                DEADLINE,
                "the run without MLflow failed",
            )
        finally:
            sup.startProcess("mlflow")
    wait_served(stack_settings, upload)
    metrics = httpx.get(f"{stack_settings.url(stack_settings.ports.bridge)}/metrics").text
    assert 'flywheel_bridge_reconciled_total{pipeline="iris"}' in metrics
    assert ledger(stack_settings)[upload["version_id"]]["role"] == "trained"


# The scheduler runs the task; the step server forked the training process itself.
@pytest.mark.parametrize("program", ["airflow-scheduler", "step-server"])
def test_kill_9_mid_training_retries_the_run_and_leaves_no_orphans(stack_settings, program):
    upload = put(stack_settings, f"iris/{program}-kill.csv", iris_upload(300))
    with airflow(stack_settings) as api:

        def training():
            for run in api.dag_runs("train_iris", limit=3):
                states = {t["task_id"]: t["state"] for t in api.task_instances("train_iris", run["dag_run_id"])}
                if states.get("train") == "running":
                    return run
            return None

        run = wait_until(training, DEADLINE, "train_iris's train task running", interval=0.5)
        killed = kill_9(stack_settings, program)
        left = orphans(stack_settings)
        print(f"\n{program} back in {killed['seconds']:.1f}s; survivors {killed['survivors']}; orphans {left}")
        assert killed["survivors"] == [] and left == []
        assert killed["seconds"] < 15
        killed_at = time.monotonic()
        finished = wait_until(
            lambda: (
                (r := api.get(f"/dags/train_iris/dagRuns/{run['dag_run_id']}"))["state"] in ("success", "failed") and r
            ),
            DEADLINE,
            "the interrupted run finished",
        )
        tries = {t["task_id"]: t["try_number"] for t in api.task_instances("train_iris", run["dag_run_id"])}
    print(f"interrupted run {finished['state']} {time.monotonic() - killed_at:.0f}s after the kill; tries {tries}")
    assert finished["state"] == "success"
    wait_served(stack_settings, upload)
    assert mlflow_runs(stack_settings, "iris", "attributes.status = 'RUNNING'") == []


def test_kill_9_of_a_bento_replica_under_load_costs_no_request_and_leaves_no_orphans(stack_settings):
    """Repeated, alternating between the replicas, so that a rare loss shows (1 in 7,386 once did)."""
    live = deployments.current(stack_settings, "iris")
    assert len(live.ports) >= 2, "iris serves with replicas"
    url = f"{stack_settings.predict_url}/iris/predict"
    kills = 6
    load = loadgen.start(url, {"inputs": [ROW]}, connections=8, seconds=15 * kills)
    recovered = []
    try:
        for k in range(kills):
            time.sleep(4)
            i = k % len(live.ports)
            killed = kill_9(stack_settings, live.programs[i], health=f"{stack_settings.url(live.ports[i])}/readyz")
            assert killed["survivors"] == [], killed
            recovered.append(killed["seconds"])
        time.sleep(2)  # the last replica back, then load on both
    finally:
        stats = loadgen.stop(load)
    print(
        f"\n{kills} replica kills, back in {min(recovered):.1f}-{max(recovered):.1f}s; "
        f"{stats['failed']} of {stats['requests']} requests failed meanwhile ({stats})"
    )
    assert orphans(stack_settings) == []
    assert stats["failed"] == 0, stats
    assert served(stack_settings)["model"]["version"] == live.version


@pytest.mark.parametrize(
    "program",
    [
        "minio",
        "mlflow",
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "step-server",
        "events-bridge",
        "nginx",
        "nginx-exporter",
        "prometheus",
    ],
)
def test_every_program_is_back_within_15s_of_a_kill_9_and_leaves_nothing_behind(stack_settings, program):
    health = {svc.name: svc.health for svc in topology.services(stack_settings)}[program]
    killed = kill_9(stack_settings, program, health=health)
    print(f"\n{program}: back and healthy in {killed['seconds']:.1f}s; survivors {killed['survivors']}")
    assert killed["survivors"] == [], f"{program}'s children outlived it"
    assert orphans(stack_settings) == []
    assert killed["seconds"] < 15


def test_down_after_kill_9_of_supervisord_leaves_no_process_and_up_restores_the_stack(stack_settings):
    pid = int((stack_settings.state / "supervisord.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert processes_of(stack_settings.state), "the stack died with supervisord: nothing to sweep"
    stack.down(stack_settings)
    assert processes_of(stack_settings.state) == []
    stack.up(stack_settings, progress=print, timeout=300)
    assert wait_until(lambda: served(stack_settings), 120, "iris served again after up")
