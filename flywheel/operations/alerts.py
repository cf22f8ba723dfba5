"""Alerts: what goes wrong reaches someone, and is on record even when nobody listens.

Two sources, one path:
- Prometheus' alerting rules fire through Alertmanager, whose only receiver is the events bridge's
  `/alerts` endpoint (with the webhook token);
- Airflow's failure callback (a rejected dataset, a failed deploy) and the rollout of a rollback call
  `notify` from the task itself.
Every alert is written to the state folder (`alerts/`, one private file each) and, if
FLYWHEEL_ALERT_WEBHOOK is set in `.env`, POSTed there as `{"alerts": [...]}`. Nothing is lost while
the webhook is down: Alertmanager's alerts are answered 503 by the bridge, so Alertmanager retries;
Airflow's are tried a few times, then wait in `alerts/outbox/` with the error until the bridge
delivers them. `flywheel status` lists what fired and what waits.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from pathlib import Path

import httpx

from flywheel.core.settings import Settings, write_private

log = logging.getLogger(__name__)
RECENT = datetime.timedelta(hours=24)
SEND_TRIES = 3  # the webhook is tried this often (1 s, then 2 s apart) before an alert waits in the outbox


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


def _post(settings: Settings, alerts: list[dict]) -> str:
    """POST to the webhook: "" if it took them, else why not."""
    try:
        httpx.post(settings.alert_webhook, json={"alerts": alerts}, timeout=5).raise_for_status()
        return ""
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def forward(settings: Settings, alerts: list[dict], tries: int = SEND_TRIES) -> str:
    """POST the alerts to FLYWHEEL_ALERT_WEBHOOK, a few times with a backoff: "" once delivered (or with
    no webhook set), else the last error."""
    error = ""
    for attempt in range(tries if settings.alert_webhook else 0):
        if not (error := _post(settings, alerts)):
            return ""
        if attempt + 1 < tries:
            time.sleep(2**attempt)
    return error


def notify(settings: Settings, alerts: list[dict]) -> bool:
    """Record the alerts and forward them; what the webhook did not take waits in the outbox, with its
    error, for the events bridge to send again (`resend`). True if delivered now."""
    if not alerts:
        return False
    record(settings, alerts)
    if not settings.alert_webhook:
        return False
    if error := forward(settings, alerts):
        log.warning("alert webhook %s: %s; kept in the outbox", settings.alert_webhook.split("?")[0], error)
        keep(settings, alerts, error)
        return False
    return True


def keep(settings: Settings, alerts: list[dict], error: str) -> Path:
    """Alerts the webhook did not take, with the error, until `resend` delivers them (mode 600)."""
    target = outbox(settings)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256(json.dumps(alerts, sort_keys=True).encode()).hexdigest()[:10]
    path = target / f"{now()[:19].replace(':', '')}-{digest}.json"
    write_private(path, json.dumps({"error": error, "at": now(), "alerts": alerts}, indent=1))
    return path


def outbox(settings: Settings) -> Path:
    return folder(settings) / "outbox"


def waiting(settings: Settings) -> list[dict]:
    """What waits in the outbox, oldest first: {"error", "at", "alerts", "file"}."""
    found = []
    for path in sorted(outbox(settings).glob("*.json")):
        try:
            found.append({**json.loads(path.read_text()), "file": str(path)})
        except (OSError, ValueError):
            continue
    return found


def resend(settings: Settings) -> tuple[int, int]:
    """Try the outbox once, oldest first, stopping at the first failure: (sent, still waiting)."""
    pending = waiting(settings)
    sent = 0
    for entry in pending:
        if error := _post(settings, entry["alerts"]):
            entry["error"] = error
            write_private(Path(entry.pop("file")), json.dumps(entry, indent=1))
            break
        Path(entry["file"]).unlink(missing_ok=True)
        sent += 1
    return sent, len(pending) - sent


def task_failed(context) -> None:
    """Airflow's on_failure_callback: the task's last error, as an alert."""
    ti = context["ti"]
    dag_id, task_id = ti.dag_id, ti.task_id
    pipeline = dag_id.split("_", 1)[1] if "_" in dag_id else dag_id
    error = context.get("exception")
    kind = {
        "validate": "dataset rejected",
        "rollout": "deploy failed",
        "build": "deploy failed",
        "judge": "rollout rolled back",
    }.get(task_id, "task failed")
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
    """What fires now: Alertmanager's active alerts, and the platform's own of the last 24 hours (Airflow's
    failures, the bridge's broken pipelines) that no later one resolved."""
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
    own, resolved = [], set()
    for a in recent(settings):  # newest first
        if a["source"] == "prometheus":
            continue
        ident = (a["name"], a["labels"].get("pipeline"))
        if a["status"] == "resolved":
            resolved.add(ident)
        elif a["source"] == "airflow" or ident not in resolved:
            own.append(a)
    return active + own
