"""Events bridge: MinIO bucket notifications in, Airflow asset events out; and its control loops.

MinIO keeps every notification in its queue dir until this endpoint answers 2xx, and retries it,
one at a time, ahead of every later upload. So the answer depends on whether a retry can help:
- 503 for what passes: Airflow unreachable, a 5xx or 429, a pipeline's DAG not parsed yet (for
  at most PARSE_GRACE seconds per upload: a DAG that never parses must not block the queue);
- 200 for what a retry cannot fix, written first as a dead letter with the reason
  (flywheel/operations/deadletter.py): an upload outside any pipeline's folder, an Airflow 4xx.

Control loops run here too, every RECONCILE_SECONDS:
- routes (flywheel/platform/routes.py): a pipeline file added or removed is routed or unrouted by Nginx
  without a restart;
- the reconciler (flywheel/training/ledger.py): an upload no training run has accounted for, with no run
  queued or running, gets its asset event again, so the newest upload always ends up trained even
  when Airflow dropped the event's trigger or a run crashed;
- the alert outbox: alerts a task could not deliver to the webhook are sent again until it takes them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from starlette.concurrency import run_in_threadpool

from flywheel.clients.airflow_rest import AirflowAPI, AirflowRejected, AirflowUnavailable
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import pipelines
from flywheel.core.schema import parse_time
from flywheel.core.settings import AIRFLOW_BRIDGE, Settings
from flywheel.core.upload import Upload
from flywheel.operations import alerts, deadletter
from flywheel.orchestration import notifications
from flywheel.platform import routes
from flywheel.training import ledger

log = logging.getLogger("uvicorn.error")  # uvicorn's handler: lines reach the bridge's log

PARSE_GRACE = 600.0
RECONCILE_SECONDS = 10.0
SETTLE_SECONDS = 20.0  # an event this young may still start its run the ordinary way
BACKOFF = (60.0, 900.0)  # first and longest wait before re-emitting for a pipeline that made no progress

EVENTS = Counter("flywheel_bridge_events", "Uploads MinIO reported, by what the bridge did", ["outcome"])
RECONCILED = Counter("flywheel_bridge_reconciled", "Asset events re-emitted for unaccounted uploads", ["pipeline"])
DEAD_LETTERS = Gauge("flywheel_bridge_dead_letters", "Uploads in the dead-letter folder")


@dataclass
class Reconciling:
    """Per pipeline: when the reconciler last re-emitted, and for which watermark."""

    emitted_at: float = 0.0
    backoff: float = BACKOFF[0]
    for_event: int | None = None


@dataclass
class BridgeState:
    settings: Settings
    airflow: AirflowAPI
    asset_ids: dict[str, int] = field(default_factory=dict)
    unparsed_since: dict[str, float] = field(default_factory=dict)
    reconciling: dict[str, Reconciling] = field(default_factory=dict)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = Settings.load()
    state = BridgeState(settings, AirflowAPI.connect(settings, AIRFLOW_BRIDGE))
    app.state.bridge = state
    DEAD_LETTERS.set_function(lambda: deadletter.count(settings))
    task = asyncio.create_task(reconcile_forever(state))
    yield
    task.cancel()
    state.airflow.close()


app = FastAPI(title="flywheel events bridge", lifespan=lifespan)


def _authorized(header: str | None, token: str) -> bool:
    # MinIO sends its auth_token as "Bearer <token>"; accept the bare token too.
    supplied = (header or "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())


class NotParsedYet(AirflowUnavailable):
    pass


def _forward(state: BridgeState, event: Upload) -> dict:
    asset_id = state.asset_ids.get(event.asset_uri)
    if asset_id is None:
        asset_id = state.airflow.asset_id(event.asset_uri)
        if asset_id is None:
            raise NotParsedYet(f"Airflow has no asset {event.asset_uri} yet (is train_{event.pipeline} parsed?)")
        state.asset_ids[event.asset_uri] = asset_id
    try:
        created = state.airflow.create_asset_event(asset_id, event.to_dict())
    except AirflowRejected:
        state.asset_ids.pop(event.asset_uri, None)  # Airflow's database may have been reset: look it up again
        raise
    log.info("asset event %s on %s for %s (etag %s)", created.get("id"), event.asset_uri, event.key, event.etag)
    return {"asset_uri": event.asset_uri, "key": event.key, "asset_event_id": created.get("id")}


def _dead_letter(state: BridgeState, event: Upload, reason: str, record: dict) -> dict:
    path = deadletter.write(state.settings, reason, event.to_dict(), record)
    EVENTS.labels("dead_lettered").inc()
    log.warning("dead letter %s for %s: %s", path.name, event.key, reason)
    return {"key": event.key, "reason": reason, "dead_letter": path.name}


async def _signed_body(request: Request, authorization: str | None) -> dict:
    """The JSON body of a call that carries the webhook token (MinIO's and Alertmanager's), or 401/400."""
    state: BridgeState = request.app.state.bridge
    if not _authorized(authorization, state.settings.secrets["FLYWHEEL_WEBHOOK_TOKEN"]):
        raise HTTPException(status_code=401, detail="missing or wrong webhook token")
    try:
        return await request.json()
    except ValueError:
        raise HTTPException(status_code=400, detail="body is not JSON") from None


@app.post("/alerts")
async def alerts_in(request: Request, authorization: str | None = Header(default=None)) -> dict:
    """Alertmanager's webhook: forward each alert to FLYWHEEL_ALERT_WEBHOOK and record it (operations/alerts.py).

    If the webhook does not take them, 503: Alertmanager keeps them and sends them again.
    """
    state: BridgeState = request.app.state.bridge
    found = alerts.from_alertmanager(await _signed_body(request, authorization))
    error = await run_in_threadpool(alerts.forward, state.settings, found, 1)
    names = ", ".join(f"{a['name']} {a['status']}" for a in found)
    if error:
        log.warning("alerts: %s not forwarded (Alertmanager retries): %s", names, error)
        raise HTTPException(status_code=503, detail=f"the alert webhook did not take them: {error}")
    await run_in_threadpool(alerts.record, state.settings, found)
    log.warning("alerts: %s (forwarded: %s)", names, bool(state.settings.alert_webhook))
    return {"received": len(found), "forwarded": bool(state.settings.alert_webhook)}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@app.post("/minio/events")
async def minio_events(request: Request, authorization: str | None = Header(default=None)) -> dict:
    state: BridgeState = request.app.state.bridge
    body = await _signed_body(request, authorization)
    known = {p.name: p for p in pipelines.load_all(state.settings.pipelines_dir)[0]}
    forwarded, ignored, dead = [], [], []
    for event in notifications.uploads(body):
        pipeline = known.get(event.pipeline)
        if pipeline is None:
            folder = f"datasets/{event.pipeline}/" if event.pipeline else "the root of datasets/"
            dead.append(_dead_letter(state, event, f"no pipeline owns {folder} (pipelines/*.yaml)", body))
            continue
        if not pipeline.triggers(event.key):
            # e.g. one half of an IDX set: its run starts when the set's _SUCCESS marker lands
            ignored.append({"key": event.key, "reason": f"does not start a {pipeline.name} run"})
            EVENTS.labels("ignored").inc()
            continue
        try:
            forwarded.append(await run_in_threadpool(_forward, state, event))
            state.unparsed_since.pop(event.version_id or event.key, None)
            EVENTS.labels("forwarded").inc()
        except NotParsedYet as exc:
            first = state.unparsed_since.setdefault(event.version_id or event.key, time.monotonic())
            if time.monotonic() - first < PARSE_GRACE:
                EVENTS.labels("retry").inc()
                log.warning("keeping %s in MinIO's queue: %s", event.key, exc)
                raise HTTPException(status_code=503, detail=str(exc)) from exc
            dead.append(_dead_letter(state, event, f"{exc}, for {PARSE_GRACE:.0f} s", body))
        except AirflowRejected as exc:
            dead.append(_dead_letter(state, event, f"Airflow refused the asset event: {exc}", body))
        except AirflowUnavailable as exc:
            EVENTS.labels("retry").inc()
            log.warning("keeping %s in MinIO's queue: %s", event.key, exc)
            raise HTTPException(status_code=503, detail=str(exc)) from exc
    return {"forwarded": forwarded, "ignored": ignored, "dead_lettered": dead}


# --- the reconciler -----------------------------------------------------------------------------------


async def reconcile_forever(state: BridgeState) -> None:
    while True:
        await asyncio.sleep(RECONCILE_SECONDS)
        try:
            # A pipeline file added or removed is routed (or unrouted) by Nginx without a restart.
            if await run_in_threadpool(routes.sync, state.settings):
                log.info("routes changed: Nginx reloaded")
        except Exception as exc:
            log.warning("routes: %s", exc)
        try:
            await run_in_threadpool(reconcile_once, state)
        except Exception as exc:  # MLflow or Airflow away: the next round tries again
            log.warning("reconciler: %s", exc)
        if state.settings.alert_webhook:  # Airflow's alerts the webhook did not take
            sent, left = await run_in_threadpool(alerts.resend, state.settings)
            if sent or left:
                log.warning("alert outbox: %d sent, %d waiting", sent, left)


def reconcile_once(state: BridgeState, now: float | None = None) -> list[str]:
    """Re-emit the newest unaccounted upload of every pipeline nothing is training; returns their names."""
    now = time.monotonic() if now is None else now
    emitted = []
    with MlflowAPI.connect(state.settings) as mlflow:
        for pipeline in pipelines.load_all(state.settings.pipelines_dir)[0]:
            memory = state.reconciling.setdefault(pipeline.name, Reconciling())
            if state.airflow.dag_runs(f"train_{pipeline.name}", limit=1, states=("queued", "running")):
                continue
            event = ledger.pending(state.airflow, mlflow, pipeline)
            if event is None:
                state.reconciling[pipeline.name] = Reconciling()  # all accounted: forget the backoff
                continue
            if time.time() - parse_time(event["timestamp"]).timestamp() < SETTLE_SECONDS:
                continue
            if memory.emitted_at and now - memory.emitted_at < memory.backoff:
                continue
            if memory.emitted_at:  # emitted before and still pending: that run made no progress
                memory.backoff = min(memory.backoff * 2, BACKOFF[1])
            extra = {**(event.get("extra") or {}), "reconciled": True}
            created = state.airflow.create_asset_event(event["asset_id"], extra)
            memory.emitted_at, memory.for_event = now, created.get("id")
            RECONCILED.labels(pipeline.name).inc()
            log.warning(
                "reconciler: %s has an upload no run accounted for (%s, event %s): re-emitted as event %s",
                pipeline.name,
                extra.get("key"),
                event["id"],
                created.get("id"),
            )
            emitted.append(pipeline.name)
    return emitted
