"""Events bridge: MinIO bucket notifications in, Airflow asset events out.

MinIO keeps every notification in its queue dir until this endpoint answers 2xx, so the
bridge answers non-2xx whenever the event could not be handed to Airflow: nothing is lost
while Airflow is down or has not parsed the pipeline's DAG yet.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from flywheel import events, pipelines
from flywheel.airflow_api import AirflowAPI, AirflowUnavailable
from flywheel.settings import Settings

log = logging.getLogger("flywheel.bridge")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = Settings.load()
    app.state.settings = settings
    app.state.airflow = AirflowAPI(settings.airflow_url, "admin", settings.secrets["AIRFLOW_ADMIN_PASSWORD"])
    app.state.asset_ids = {}
    yield
    app.state.airflow.close()


app = FastAPI(title="flywheel events bridge", lifespan=lifespan)


def _authorized(header: str | None, token: str) -> bool:
    # MinIO sends its auth_token as "Bearer <token>"; accept the bare token too.
    supplied = (header or "").removeprefix("Bearer ").strip()
    return bool(token) and hmac.compare_digest(supplied.encode(), token.encode())


def _forward(request_state, event: events.DatasetEvent) -> dict:
    airflow: AirflowAPI = request_state.airflow
    asset_id = request_state.asset_ids.get(event.asset_uri)
    if asset_id is None:
        asset_id = airflow.asset_id(event.asset_uri)
        if asset_id is None:
            raise AirflowUnavailable(f"Airflow has no asset {event.asset_uri} yet (DAG not parsed?)")
        request_state.asset_ids[event.asset_uri] = asset_id
    created = airflow.create_asset_event(asset_id, event.extra())
    log.info("asset event %s on %s for %s (etag %s)", created.get("id"), event.asset_uri, event.key, event.etag)
    return {"asset_uri": event.asset_uri, "key": event.key, "asset_event_id": created.get("id")}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/minio/events")
async def minio_events(request: Request, authorization: str | None = Header(default=None)) -> dict:
    state = request.app.state
    if not _authorized(authorization, state.settings.secrets["FLYWHEEL_WEBHOOK_TOKEN"]):
        raise HTTPException(status_code=401, detail="missing or wrong webhook token")
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(status_code=400, detail="body is not JSON") from None
    known = {p.name: p for p in pipelines.load_all(state.settings.pipelines_dir)[0]}
    forwarded, ignored = [], []
    for event in events.from_notification(body):
        pipeline = known.get(event.pipeline)
        if pipeline is None:
            ignored.append({"key": event.key, "reason": f"no pipeline named {event.pipeline!r}"})
            continue
        if not pipeline.triggers(event.key):
            # e.g. one half of an IDX set: its run starts when the set's _SUCCESS marker lands
            ignored.append({"key": event.key, "reason": f"does not start a {pipeline.name} run"})
            continue
        try:
            forwarded.append(await run_in_threadpool(_forward, state, event))
        except AirflowUnavailable as exc:
            log.warning("keeping %s in MinIO's queue: %s", event.key, exc)
            raise HTTPException(status_code=503, detail=str(exc)) from exc
    return {"forwarded": forwarded, "ignored": ignored}
