"""Events bridge: MinIO bucket notifications in, Airflow asset events out, Alertmanager's alerts through,
and the control loops of flywheel/orchestration/bridge.py, every RECONCILE_SECONDS.

Answers: 401 without the webhook token; 503 for what MinIO or Alertmanager should send again in a
moment (Airflow unreachable; the alert webhook refusing); 200 for everything else, once it is
forwarded, held or dead-lettered (orchestration/bridge.py says which and why).
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.core.settings import AIRFLOW_BRIDGE, Settings
from flywheel.operations import alerts
from flywheel.orchestration.bridge import Bridge, Retry, log
from flywheel.platform import routes

RECONCILE_SECONDS = 10.0


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = Settings.load()
    bridge = Bridge(settings, AirflowAPI.connect(settings, AIRFLOW_BRIDGE))
    app.state.bridge = bridge
    task = asyncio.create_task(control_loops(bridge))
    yield
    task.cancel()
    bridge.airflow.close()


app = FastAPI(title="flywheel events bridge", lifespan=lifespan)


def _authorized(header: str | None, token: str) -> bool:
    # MinIO sends its auth_token as "Bearer <token>"; accept the bare token too.
    supplied = (header or "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())


async def _signed_body(request: Request, authorization: str | None) -> dict:
    """The JSON body of a call that carries the webhook token (MinIO's and Alertmanager's), or 401/400."""
    bridge: Bridge = request.app.state.bridge
    if not _authorized(authorization, bridge.settings.secrets["FLYWHEEL_WEBHOOK_TOKEN"]):
        raise HTTPException(status_code=401, detail="missing or wrong webhook token")
    try:
        return await request.json()
    except ValueError:
        raise HTTPException(status_code=400, detail="body is not JSON") from None


@app.post("/minio/events")
async def minio_events(request: Request, authorization: str | None = Header(default=None)) -> dict:
    bridge: Bridge = request.app.state.bridge
    body = await _signed_body(request, authorization)
    try:
        return await run_in_threadpool(bridge.receive, body)
    except Retry as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc


@app.post("/alerts")
async def alerts_in(request: Request, authorization: str | None = Header(default=None)) -> dict:
    """Alertmanager's webhook: forward each alert to FLYWHEEL_ALERT_WEBHOOK and record it (operations/alerts.py).

    If the webhook does not take them, 503: Alertmanager keeps them and sends them again.
    """
    bridge: Bridge = request.app.state.bridge
    found = alerts.from_alertmanager(await _signed_body(request, authorization))
    error = await run_in_threadpool(alerts.forward, bridge.settings, found, 1)
    names = ", ".join(f"{a['name']} {a['status']}" for a in found)
    if error:
        log.warning("alerts: %s not forwarded (Alertmanager retries): %s", names, error)
        raise HTTPException(status_code=503, detail=f"the alert webhook did not take them: {error}")
    await run_in_threadpool(alerts.record, bridge.settings, found)
    log.warning("alerts: %s (forwarded: %s)", names, bool(bridge.settings.alert_webhook))
    return {"received": len(found), "forwarded": bool(bridge.settings.alert_webhook)}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def control_loops(bridge: Bridge) -> None:
    """Each loop on its own: one that fails (a service away) waits for the next round, the others go on."""
    loops = {
        # A pipeline file added or removed is routed (or unrouted) by Nginx without a restart.
        "routes": lambda: routes.sync(bridge.settings) and log.info("routes changed: Nginx reloaded"),
        "held uploads": lambda: (released := bridge.release_held()) and log.warning("released %s", released),
        "pipelines": bridge.watch_pipelines,
        "reconciler": bridge.reconcile_once,
        # A live rollout whose judge is gone ends with production serving everything.
        "rollouts": bridge.watch_rollouts,
        # Airflow's alerts the webhook did not take.
        "alert outbox": lambda: bridge.settings.alert_webhook and alerts.resend(bridge.settings),
    }
    while True:
        await asyncio.sleep(RECONCILE_SECONDS)
        for name, loop in loops.items():
            try:
                await run_in_threadpool(loop)
            except Exception as exc:
                log.warning("%s: %s", name, exc)
