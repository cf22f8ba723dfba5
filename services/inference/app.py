"""Inference service: the Bentos' spool into the inference index and MinIO, feedback in, live scores out.

    POST /<pipeline>/feedback        labels for earlier answers, by request id (through Nginx, with
                                     the same API keys as /predict; flywheel/inference/feedback.py)
    GET  /v1/live/<pipeline>?since=  answers, labelled answers and the live score per version and role,
                                     and the shadow copies' disagreement (what the rollout judge reads)
    GET  /v1/answered/<pipeline>?since=  how many answers (not shadow copies) since then
    PUT  /v1/drift/<pipeline>        the drift monitor's verdict on its last window (monitor_<p>)
    GET  /v1/drift                   the last verdict of every pipeline
    GET  /metrics                    flywheel_live_score{pipeline, model_version, role, metric},
                                     flywheel_drift_score{pipeline, model_version, feature},
                                     flywheel_drift_detected{pipeline, model_version}, and the
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


@app.get("/v1/answered/{pipeline}")
async def answered(pipeline: str, request: Request, since: float = 0.0):
    await run_in_threadpool(
        collector.ingest, request.app.state.settings, request.app.state.store, request.app.state.counters
    )
    return {"pipeline": pipeline, "since": since, "answers": request.app.state.store.answered(pipeline, since)}


@app.put("/v1/drift/{pipeline}")
async def put_drift(pipeline: str, request: Request):
    if _pipeline(request.app.state.settings, pipeline) is None:
        return error(404, f"no pipeline {pipeline!r}")
    try:
        body = json.loads(await request.body())
    except ValueError:
        return error(400, "the body is not JSON")
    features = body.get("features", []) if isinstance(body, dict) else None
    if not isinstance(features, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("feature"), str)
        and isinstance(f.get("distance", 0.0), int | float)
        and not isinstance(f.get("distance", 0.0), bool)
        for f in features
    ):
        return error(400, "expected the monitor's result: an object whose features each have a name and a distance")
    await run_in_threadpool(request.app.state.store.set_drift, pipeline, body)
    return {"pipeline": pipeline, "recorded": True}


@app.get("/v1/drift")
async def get_drift(request: Request):
    return await run_in_threadpool(request.app.state.store.drift)


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
        yield from drift_metrics(store.drift())
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
        dropped = CounterMetricFamily(
            "flywheel_inference_dropped",
            "Answers a Bento did not spool (its spool full while this service was away, or its disk failing)",
            labels=["pipeline"],
        )
        for p, n in collector.dropped(settings).items():
            dropped.add_metric([p], n)
        yield dropped
        yield CounterMetricFamily(
            "flywheel_inference_ship_errors", "Collector rounds that failed", value=counters.ship_errors
        )
        backlog = GaugeMetricFamily(
            "flywheel_inference_unshipped", "Answers in the index not yet in MinIO", labels=["pipeline"]
        )
        for p, c in store.counts().items():
            backlog.add_metric([p], c["unshipped"])
        yield backlog


def drift_metrics(results: dict[str, dict]):
    """The monitor's last verdict per pipeline: only decided windows set the figures."""
    score = GaugeMetricFamily(
        "flywheel_drift_score",
        "Distance between live answers and the serving version's training profile, per feature "
        "(Kolmogorov-Smirnov D, or total variation for classes), over the last decided window",
        labels=["pipeline", "model_version", "feature"],
    )
    detected = GaugeMetricFamily(
        "flywheel_drift_detected",
        "1 when the last decided window drifted from the serving version's training profile",
        labels=["pipeline", "model_version"],
    )
    rows = GaugeMetricFamily(
        "flywheel_drift_window_rows", "Answers in the monitor's last window", labels=["pipeline", "model_version"]
    )
    checked = GaugeMetricFamily(
        "flywheel_drift_checked_timestamp", "When the monitor last looked (seconds)", labels=["pipeline"]
    )
    for pipeline, r in results.items():
        version = str(r.get("version") or "")
        checked.add_metric([pipeline], float(r.get("recorded") or 0.0))
        rows.add_metric([pipeline, version], float(r.get("rows") or 0))
        if not r.get("decided"):
            continue
        detected.add_metric([pipeline, version], 1.0 if r.get("detected") else 0.0)
        for f in r.get("features") or []:
            score.add_metric([pipeline, version, str(f.get("feature"))], float(f.get("distance") or 0.0))
    yield from (score, detected, rows, checked)
