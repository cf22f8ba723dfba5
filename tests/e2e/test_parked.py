"""End to end: uploads the bridge cannot hand to Airflow now are kept, never lost, never blocking the queue.

A pipeline file that does not load holds its uploads (and says so in `flywheel status` and an alert)
until it loads again, then the newest one trains. A dead letter (an upload no pipeline owns) waits
for a person: `flywheel deadletter list|replay|drop`, and the dead-letter alert resolves when none is left.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.operations.parked import DEAD_LETTERS, HELD
from flywheel.serving import rollout
from tests.e2e.stack_ops import DEADLINE, TRAINING, csv_bytes, put, served, wait_until

pytestmark = pytest.mark.e2e


def flywheel(*args: str) -> subprocess.CompletedProcess:
    """The CLI, as a person runs it, against this session's stack (its settings are in the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def asset_event_for(settings, pipeline: str, version_id: str) -> bool:
    with AirflowAPI.connect(settings) as api:
        return any(
            (e.get("extra") or {}).get("version_id") == version_id
            for e in api.asset_events(f"s3://datasets/{pipeline}")
        )


def broken_alerts(inbox, pipeline: str, status: str) -> list[dict]:
    return [
        a
        for a in inbox.received
        if a["name"] == "Flywheel: pipeline broken" and a["labels"]["pipeline"] == pipeline and a["status"] == status
    ]


def test_an_upload_to_a_broken_pipeline_is_held_and_trains_once_the_file_loads(stack_settings, alert_inbox):
    path = stack_settings.pipelines_dir / "mended.yaml"
    good = (stack_settings.pipelines_dir / "iris.yaml").read_text().replace("name: iris", "name: mended")
    path.write_text(good.replace("task: classification", "task: clustering"))  # a mistake in the file
    try:
        held = put(stack_settings, "mended/first.csv", csv_bytes(TRAINING))
        wait_until(
            lambda: [h for h in HELD.read_all(stack_settings) if h["upload"]["version_id"] == held["version_id"]],
            60,
            "the upload held",
        )
        # MinIO's queue is not blocked behind it: an iris upload right after reaches Airflow at once.
        behind = put(stack_settings, "iris/behind-a-broken-pipeline.csv", csv_bytes(TRAINING[3:] + TRAINING[:3]))
        wait_until(
            lambda: asset_event_for(stack_settings, "iris", behind["version_id"]), 30, "the iris upload forwarded"
        )
        out = flywheel("status").stdout
        assert "mended: BROKEN" in out and "1 upload(s) held" in out and "clustering" in out, out
        wait_until(
            lambda: [
                a
                for a in alert_inbox.received
                if a["name"] == "Flywheel: pipeline broken"
                and a["labels"]["pipeline"] == "mended"
                and a["status"] == "firing"
            ],
            60,
            "the broken pipeline's alert",
        )
        path.write_text(good)  # mended
        body = wait_until(lambda: served(stack_settings, "mended"), DEADLINE, "the held upload trained and served")
        assert body["dataset"]["version_id"] == held["version_id"]
        assert not [h for h in HELD.read_all(stack_settings) if h["upload"]["version_id"] == held["version_id"]]
        wait_until(
            lambda: [
                a
                for a in alert_inbox.received
                if a["name"] == "Flywheel: pipeline broken"
                and a["labels"]["pipeline"] == "mended"
                and a["status"] == "resolved"
            ],
            60,
            "the alert resolved",
        )
    finally:
        path.unlink(missing_ok=True)
        rollout.retire(stack_settings, "mended")


def dead_letter_alert_active(settings) -> bool:
    alerts = httpx.get(f"{settings.url(settings.ports.alertmanager)}/api/v2/alerts", params={"active": "true"}).json()
    return any(a["labels"].get("alertname") == "FlywheelDeadLetters" for a in alerts)


def test_dead_letters_are_listed_replayed_once_the_cause_is_fixed_and_dropped(stack_settings):
    ghost = put(stack_settings, "ghost/x.csv", csv_bytes(TRAINING))  # no pipeline owns datasets/ghost/
    stray = put(stack_settings, "stray-at-the-root.csv", csv_bytes(TRAINING))

    def letter_of(upload):
        return next(
            (d for d in DEAD_LETTERS.read_all(stack_settings) if d["upload"]["version_id"] == upload["version_id"]),
            None,
        )

    letter = wait_until(lambda: letter_of(ghost), 60, "the ghost upload dead-lettered")
    wait_until(lambda: letter_of(stray), 60, "the stray upload dead-lettered")
    listed = flywheel("deadletter", "list")
    assert letter["id"] in listed.stdout and "ghost/x.csv" in listed.stdout
    refused = flywheel("deadletter", "replay", letter["id"])
    assert refused.returncode == 1 and "no pipeline named 'ghost'" in refused.stdout, refused.stdout
    assert letter_of(ghost), "kept while its cause is not fixed"

    path = stack_settings.pipelines_dir / "ghost.yaml"
    path.write_text((stack_settings.pipelines_dir / "iris.yaml").read_text().replace("name: iris", "name: ghost"))
    try:
        wait_until(lambda: (r := flywheel("deadletter", "replay", letter["id"])).returncode == 0 and r, 180, "replayed")
        body = wait_until(lambda: served(stack_settings, "ghost"), DEADLINE, "the replayed upload served")
        assert body["dataset"]["version_id"] == ghost["version_id"]
        assert letter_of(ghost) is None
    finally:
        path.unlink(missing_ok=True)
        rollout.retire(stack_settings, "ghost")

    wait_until(lambda: dead_letter_alert_active(stack_settings), 120, "the dead-letter alert firing")
    dropped = flywheel("deadletter", "drop", "--all")
    assert dropped.returncode == 0 and DEAD_LETTERS.count(stack_settings) == 0, dropped.stdout
    wait_until(lambda: not dead_letter_alert_active(stack_settings), 180, "the dead-letter alert resolved")
    metrics = httpx.get(f"{stack_settings.url(stack_settings.ports.bridge)}/metrics").text
    assert "flywheel_bridge_dead_letters 0.0" in metrics, json.dumps(metrics[-500:])
