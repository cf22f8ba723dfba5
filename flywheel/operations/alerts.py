"""Alerts: what goes wrong reaches someone, and is on record even when nobody listens.

Two sources, one path:
- Prometheus' alerting rules fire through Alertmanager, whose only receiver is the events bridge's
  `/alerts` endpoint (with the webhook token);
- Airflow's failure callback (a rejected dataset, a failed deploy) and the rollout of a rollback call
  `notify` from the task itself.
Every alert is written to the state folder (`alerts/`, one private file each) and, if
FLYWHEEL_ALERT_WEBHOOK is set in `.env`, POSTed there as `{"alerts": [...]}`. `flywheel status`
lists what fired.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

import httpx

from flywheel.core.settings import Settings, write_private

log = logging.getLogger(__name__)
RECENT = datetime.timedelta(hours=24)


def folder(settings: Settings) -> Path:
    return settings.state / "alerts"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def alert(source: str, name: str, summary: str, labels: dict[str, str], status: str = "firing", **extra) -> dict:
    """One alert as Flywheel records and forwards it (Alertmanager's fields, flattened)."""
    return {
        "source": source,
        "name": name,
        "status": status,
        "summary": summary[:2000],
        "labels": labels,
        "at": now(),
        **extra,
    }


def from_alertmanager(body: dict) -> list[dict]:
    """Alertmanager's webhook payload (version 4) as Flywheel alerts."""
    found = []
    for a in body.get("alerts") or []:
        labels = dict(a.get("labels") or {})
        annotations = a.get("annotations") or {}
        found.append(
            alert(
                "prometheus",
                labels.get("alertname", "?"),
                annotations.get("summary") or annotations.get("description") or "",
                labels,
                a.get("status", "firing"),
                starts_at=a.get("startsAt", ""),
            )
        )
    return found


def record(settings: Settings, alerts: list[dict]) -> list[Path]:
    """Write each alert to the state folder (mode 600)."""
    target = folder(settings)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for a in alerts:
        digest = hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()[:10]
        path = target / f"{a['at'][:19].replace(':', '')}-{a['source']}-{digest}.json"
        write_private(path, json.dumps(a, indent=1))
        paths.append(path)
    return paths


def notify(settings: Settings, alerts: list[dict]) -> bool:
    """Record the alerts, and POST them to FLYWHEEL_ALERT_WEBHOOK if one is set. True if delivered."""
    if not alerts:
        return False
    record(settings, alerts)
    if not settings.alert_webhook:
        return False
    try:
        r = httpx.post(settings.alert_webhook, json={"alerts": alerts}, timeout=5)
        r.raise_for_status()
        return True
    except httpx.HTTPError as exc:  # recorded all the same; the webhook's owner sees the gap
        log.warning("alert webhook %s: %s", settings.alert_webhook.split("?")[0], exc)
        return False


def task_failed(context) -> None:
    """Airflow's on_failure_callback: the task's last error, as an alert."""
    ti = context["ti"]
    dag_id, task_id = ti.dag_id, ti.task_id
    pipeline = dag_id.split("_", 1)[1] if "_" in dag_id else dag_id
    error = context.get("exception")
    kind = {"validate": "dataset rejected", "rollout": "deploy failed", "build": "deploy failed"}.get(
        task_id, "task failed"
    )
    labels = {"pipeline": pipeline, "dag_id": dag_id, "task_id": task_id, "run_id": ti.run_id, "severity": "ticket"}
    notify(Settings.load(), [alert("airflow", f"Flywheel: {kind}", f"{dag_id}.{task_id}: {error}", labels)])


def recent(settings: Settings, since: datetime.timedelta = RECENT) -> list[dict]:
    """Alerts recorded in the last `since`, newest first."""
    cutoff = (datetime.datetime.now(datetime.UTC) - since).isoformat()
    found = []
    for path in sorted(folder(settings).glob("*.json"), reverse=True):
        try:
            a = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if a.get("at", "") >= cutoff:
            found.append(a)
    return found


def firing(settings: Settings) -> list[dict]:
    """What fires now: Alertmanager's active alerts, and Airflow failures of the last 24 hours."""
    active = []
    try:
        r = httpx.get(
            f"{settings.url(settings.ports.alertmanager)}/api/v2/alerts", params={"active": "true"}, timeout=3
        )
        for a in r.json() if r.status_code == 200 else []:
            labels = a.get("labels") or {}
            summary = (a.get("annotations") or {}).get("summary", "")
            active.append(alert("prometheus", labels.get("alertname", "?"), summary, labels))
    except (httpx.HTTPError, ValueError):
        pass
    return active + [a for a in recent(settings) if a["source"] == "airflow" and a["status"] == "firing"]
