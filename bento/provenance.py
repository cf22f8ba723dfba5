"""What every Flywheel Bento shares: the model it was built for, provenance in each answer, quiet 400s,
a request log and an inference spool off the hot path, a fix for BentoML's timeout timers, and
answers written whole.

flywheel.build copies this file beside the service into each build folder, so a built bento stays
self-contained and immutable.
"""

import asyncio
import json
import logging
import os
import re
import time
import uuid
import zlib
from pathlib import Path
from typing import Annotated

from bentoml._internal.server.http import traffic
from bentoml.validators import ContentType
from pydantic import ValidationError
from uvicorn.protocols.http import httptools_impl

# Written by flywheel.build into the build folder: each bento serves exactly this model tag, never
# "latest" (a bento built for v2 once served v3 that way).
MODEL = json.loads(Path(__file__).with_name("flywheel_model.json").read_text())

# A declared media type: without it BentoML rebuilds the output's JSON schema on every response
# to find one (12% of a one-row request's CPU, measured with py-spy).
JSONAnswer = Annotated[dict, ContentType("application/json")]

# Echoed into a response header and the log, so only a plain token is accepted.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

HEADERS = {
    "X-Model-Name": MODEL["pipeline"],
    "X-Model-Version": str(MODEL["version"]),
    "X-Dataset-Version": MODEL["dataset"].get("etag") or "",
}
META = {
    "model": {"pipeline": MODEL["pipeline"], "name": MODEL["pipeline"], "version": str(MODEL["version"])},
    "dataset": {key: MODEL["dataset"].get(key) for key in ("uri", "key", "etag", "version_id")},
}


# The largest legal request (flywheel.routes sizes Nginx's body limit from the same numbers).
MAX_INPUTS = int(MODEL.get("max_inputs") or (256 if MODEL.get("framework") == "tensorflow" else 1000))


class _Batched:
    """Lines for one file, kept in memory and handed to `write` every FLUSH_SECONDS on the event loop:
    a request costs a list append (the time, then what `add` was given). No path: nothing is kept."""

    FLUSH_SECONDS = 1.0

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.pending: list[tuple] = []
        self.scheduled = False

    def add(self, *fields) -> None:
        if self.path is None:
            return
        self.pending.append((time.time(), *fields))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        lines, self.pending = self.pending, []
        if lines and self.path is not None:
            self.write(lines)

    def write(self, lines: list[tuple]) -> None:
        raise NotImplementedError


class RequestLog(_Batched):
    """One line per request in the file FLYWHEEL_REQUEST_LOG names, written once a second.

    Not through logging: a line formatted and relayed through supervisord's pipe per request cost
    about a quarter of a millisecond. Here a request costs a list append; the flush formats the
    lines, off the request's path. Without FLYWHEEL_REQUEST_LOG nothing is kept.
    """

    MAX_BYTES = 50 * 1024 * 1024

    def write(self, lines: list[tuple]) -> None:
        if self.path.exists() and self.path.stat().st_size > self.MAX_BYTES:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        with self.path.open("a") as f:
            f.writelines(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(at))} predict request_id={rid} "
                f"model={MODEL['model_tag']} {fields} ms={ms:.2f}\n"
                for at, rid, fields, ms in lines
            )


REQUEST_LOG = RequestLog(os.environ.get("FLYWHEEL_REQUEST_LOG"))


class InferenceSpool(_Batched):
    """One JSON line per answer (request id, version, role, inputs, predictions, latency) appended to
    the file FLYWHEEL_INFERENCE_SPOOL names; the inference service ships it
    (flywheel/inference/records.py has the format). Bounded: past MAX_BYTES unshipped (the inference
    service away), answers are counted in `dropped`, not spooled; the count is kept beside the spool
    (`<replica>.dropped`, across restarts), and the inference service exports it."""

    # A flush formats every answer since the last one on the event loop: at 2,300 answers/s a
    # one-second batch stalled it for ~10 ms (p99 15.7 -> 27.1 ms, bench/live_overhead.py).
    FLUSH_SECONDS = 0.2
    MAX_BYTES = 200 * 1024 * 1024

    def __init__(self, path: str | None, sample: float = 1.0) -> None:
        super().__init__(path)
        self.counted = self.path.with_suffix(".dropped") if self.path is not None else None
        try:
            self.dropped = int(self.counted.read_text()) if self.counted is not None else 0
        except (OSError, ValueError):
            self.dropped = 0
            if self.counted is not None:  # from the start: an alert on its increase sees the first drop
                self.drop(0)
        # `inference_log.sample`: a request id's CRC decides, so every copy of a request (a shadow's
        # mirror, a retry) is logged or not alike.
        self.threshold = int(min(max(sample, 0.0), 1.0) * 0xFFFFFFFF)

    def add(self, request_id: str, *fields) -> None:
        if self.threshold < 0xFFFFFFFF and zlib.crc32(request_id.encode()) > self.threshold:
            return
        super().add(request_id, *fields)

    def write(self, lines: list[tuple]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > self.MAX_BYTES:
                self.drop(len(lines))
                return
            pipeline, version = MODEL["pipeline"], str(MODEL["version"])
            with self.path.open("a") as f:
                f.write(
                    "".join(
                        json.dumps(
                            {
                                "t": at,
                                "id": rid,
                                "pipeline": pipeline,
                                "version": version,
                                "role": role,
                                "inputs": _plain(inputs),
                                "predictions": predictions,
                                "ms": round(ms, 3),
                            }
                        )
                        + "\n"
                        for at, rid, role, inputs, predictions, ms in lines
                    )
                )
        except OSError:
            self.drop(len(lines))

    def drop(self, n: int) -> None:
        self.dropped += n
        try:
            tmp = self.counted.with_suffix(".tmp")
            tmp.write_text(str(self.dropped))
            tmp.replace(self.counted)
        except OSError:  # the disk itself failing: the count in memory is all there is
            pass


def _plain(inputs) -> list:
    """Table rows as plain lists (pydantic RootModels until now); anything else as given."""
    if inputs is None:
        return []
    return [getattr(row, "root", row) for row in inputs]


SPOOL = InferenceSpool(
    os.environ.get("FLYWHEEL_INFERENCE_SPOOL"), float(os.environ.get("FLYWHEEL_INFERENCE_SAMPLE") or 1.0)
)
# Which arm of a rollout a request went to, as Nginx says (flywheel/platform/routes.py); production
# when nothing says otherwise.
ROLES = frozenset({"production", "candidate", "shadow"})


def answer(ctx, predictions: list, started: float, now: float, inputs=None, **log_fields) -> dict:
    """The response body, with provenance in it and in the headers; one request-log line and one
    spooled record (the inputs are what feedback joins labels to)."""
    incoming = ctx.request.headers.get("x-request-id", "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    role = ctx.request.headers.get("x-flywheel-role", "")
    role = role if role in ROLES else "production"
    ctx.response.headers.update(HEADERS)
    ctx.response.headers["X-Request-Id"] = request_id
    ctx.response.headers["X-Model-Role"] = role
    ms = (now - started) * 1000
    REQUEST_LOG.add(request_id, " ".join(f"{k}={v}" for k, v in log_fields.items()), ms)
    SPOOL.add(request_id, role, inputs, predictions, ms)
    return {"predictions": predictions, **META}


async def _timeout_middleware(self, scope, receive, send) -> None:
    """BentoML 1.4's TimeoutMiddleware, with its timer cancelled once the answer starts.

    The original never cancels the `call_later` it schedules per request, so each request's timer
    (and the context it holds) lives for the whole timeout: 187-236k objects in the oldest GC
    generation at 5 s, full collections of 22-158 ms, the p99 stalls. It also makes a request
    whose handler raised before answering wait out the whole timeout. Same 504 on a real timeout.
    """
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send))
    fut.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))  # ended without answering
    try:
        try:
            await waiter
        finally:
            timer.cancel()
    except TimeoutError:
        if fut.cancel():
            message = {"error": f"Not able to process the request in {self.timeout} seconds"}
            await traffic.JSONResponse(message, status_code=504)(scope, receive, send)
        return
    await fut


if os.environ.get("FLYWHEEL_TIMER_FIX", "on") != "off":  # "off" only for bench/bento_tuning.py
    traffic.TimeoutMiddleware.__call__ = _timeout_middleware


class _HeldWrites:
    """A transport stand-in that keeps what is written (the head of a response) instead of sending it."""

    def __init__(self) -> None:
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.held.append(data)


class _WithHead:
    """The real transport, whose next write sends the held head and the body in one write."""

    def __init__(self, transport, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        self.transport.write(self.head + data)

    def __getattr__(self, name):
        return getattr(self.transport, name)


async def _send_head_with_body(self, message) -> None:
    """uvicorn's httptools cycle writes a response's head and its body in two writes, so a server killed
    between them leaves Nginx a head without a body: it has already answered the client's headers and
    cannot pass the request to another replica, and the client's connection is cut. Held back and
    written with the first part of the body, a response either reaches Nginx whole (headers at least
    with their body's start) or not at all, which Nginx retries on the next replica."""
    if message["type"] == "http.response.start" and not self.response_started:
        real, self.transport = self.transport, _HeldWrites()
        try:
            await _uvicorn_send(self, message)
        finally:
            self._flywheel_head, self.transport = b"".join(self.transport.held), real
        return
    head = getattr(self, "_flywheel_head", b"")
    if head and message["type"] == "http.response.body":
        self._flywheel_head, real = b"", self.transport
        self.transport = _WithHead(real, head)
        try:
            await _uvicorn_send(self, message)
        finally:
            self.transport = real
        return
    await _uvicorn_send(self, message)


_uvicorn_send = httptools_impl.RequestResponseCycle.send
if os.environ.get("FLYWHEEL_HEAD_WITH_BODY", "on") != "off":
    httptools_impl.RequestResponseCycle.send = _send_head_with_body


class _BadInputAsInfo(logging.Filter):
    """BentoML logs every rejected request body at ERROR with a traceback; make it one INFO line.

    A client sending bad rows would otherwise flood the log and burn CPU formatting tracebacks;
    the access log still records each one with its 400.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            where = " ".join(map(str, record.args)) if isinstance(record.args, tuple) else ""
            record.msg, record.args = "rejected input %s: %s", (where, _first_error(exc))
            record.exc_info = record.exc_text = None
        return True


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']} ({exc.error_count()} error(s))"


logging.getLogger("bentoml._internal.server.http_app").addFilter(_BadInputAsInfo())
