"""Inference service: the Bentos' spool into the inference index and MinIO, feedback in, live scores out.

    POST /<pipeline>/feedback        labels for earlier answers, by request id (through Nginx, with
                                     the same API keys as /predict; flywheel/inference/feedback.py)
    GET  /v1/live/<pipeline>?since=  answers, labelled answers and the live score per version and role,
                                     and the shadow copies' disagreement (what the rollout judge reads)
    GET  /metrics                    flywheel_live_score{pipeline, model_version, role, metric}, and the
                                     collector's counters
    GET  /health

Runs in the ML environment (pyarrow writes the Parquet). Every error answer is JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.core import pipelines
from flywheel.core.settings import Settings
from flywheel.inference import collector, feedback
from flywheel.inference.store import Store

log = logging.getLogger("flywheel.inference")
INGEST_SECONDS = 1.0
SHIP_SECONDS = 10.0
PRUNE_SECONDS = 600.0
LIVE_WINDOW_SECONDS = 600.0  # flywheel_live_score: labelled answers of the last ten minutes


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = Settings.load()
    store = Store(settings.state / "inference" / "index.sqlite")
    app.state.settings, app.state.store, app.state.counters = settings, store, collector.Counters()
    registry = CollectorRegistry()
    registry.register(LiveMetrics(app))
    app.state.registry = registry
    task = asyncio.create_task(loops(app))
    yield
    task.cancel()
    await run_in_threadpool(collector.ingest, settings, store, app.state.counters)  # what is spooled now
    store.close()


app = FastAPI(title="flywheel inference", lifespan=lifespan)


async def loops(app: FastAPI) -> None:
    settings, store, counters = app.state.settings, app.state.store, app.state.counters
    shipped_at = pruned_at = time.monotonic()
    while True:
        try:
            await run_in_threadpool(collector.ingest, settings, store, counters)
            now = time.monotonic()
            if now - shipped_at >= SHIP_SECONDS:
                shipped_at = now
                await run_in_threadpool(collector.ship, settings, store, counters)
            if now - pruned_at >= PRUNE_SECONDS:
                pruned_at = now
                keep = settings.retention.inference_index_hours
                await run_in_threadpool(store.prune, keep, settings.retention.inference_index_rows)
        except Exception:  # MinIO away, a disk hiccup: the next round tries again, nothing is dropped
            counters.ship_errors += 1
            log.exception("inference collector round failed; retrying")
        await asyncio.sleep(INGEST_SECONDS)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(400, str(exc.errors()[0].get("msg", "bad request")))


@app.exception_handler(Exception)
async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error(500, f"internal error: {type(exc).__name__}")


def _pipeline(settings: Settings, name: str) -> pipelines.Pipeline | None:
    try:
        return pipelines.get(settings.pipelines_dir, name)
    except (pipelines.PipelineError, FileNotFoundError, KeyError):
        return None


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.post("/{pipeline}/feedback")
async def post_feedback(pipeline: str, request: Request):
    spec = _pipeline(request.app.state.settings, pipeline)
    if spec is None:
        return error(404, f"no pipeline {pipeline!r}")
    try:
        body = json.loads(await request.body())
    except ValueError:
        return error(400, "the body is not JSON")
    try:
        result = await run_in_threadpool(feedback.record, request.app.state.store, spec, body)
    except feedback.BadFeedback as exc:
        return error(400, str(exc))
    return result


@app.get("/v1/live/{pipeline}")
async def live(pipeline: str, request: Request, since: float = 0.0):
    spec = _pipeline(request.app.state.settings, pipeline)
    if spec is None:
        return error(404, f"no pipeline {pipeline!r}")
    await run_in_threadpool(
        collector.ingest, request.app.state.settings, request.app.state.store, request.app.state.counters
    )
    return await run_in_threadpool(request.app.state.store.live, pipeline, spec.metric, since)


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class LiveMetrics:
    """Computed at each scrape from the index: nothing to keep in step."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self):
        settings, store, counters = self.app.state.settings, self.app.state.store, self.app.state.counters
        score = GaugeMetricFamily(
            "flywheel_live_score",
            "Score of answers on their feedback labels over the last ten minutes (the pipeline's metric)",
            labels=["pipeline", "model_version", "role", "metric"],
        )
        labelled = GaugeMetricFamily(
            "flywheel_live_labelled",
            "Answers with a feedback label over the last ten minutes",
            labels=["pipeline", "model_version", "role"],
        )
        since = time.time() - LIVE_WINDOW_SECONDS
        for spec in pipelines.load_all(settings.pipelines_dir)[0]:
            figures = store.live(spec.name, spec.metric, since)
            for version, roles in figures["versions"].items():
                for role, f in roles.items():
                    if f["score"] is not None:
                        score.add_metric([spec.name, version, role, spec.metric], f["score"])
                    labelled.add_metric([spec.name, version, role], f["labelled"])
        yield score
        yield labelled
        spooled = CounterMetricFamily(
            "flywheel_inference_records", "Answers read from the Bentos' spool", labels=["pipeline"]
        )
        for p, n in counters.spooled.items():
            spooled.add_metric([p], n)
        yield spooled
        shipped = CounterMetricFamily(
            "flywheel_inference_shipped", "Answers written to MinIO as Parquet", labels=["pipeline"]
        )
        for p, n in counters.shipped.items():
            shipped.add_metric([p], n)
        yield shipped
        yield CounterMetricFamily(
            "flywheel_inference_unreadable", "Spool lines that could not be read", value=counters.unreadable
        )
        yield CounterMetricFamily(
            "flywheel_inference_ship_errors", "Collector rounds that failed", value=counters.ship_errors
        )
        backlog = GaugeMetricFamily(
            "flywheel_inference_unshipped", "Answers in the index not yet in MinIO", labels=["pipeline"]
        )
        for p, c in store.counts().items():
            backlog.add_metric([p], c["unshipped"])
        yield backlog
