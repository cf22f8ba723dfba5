"""What every Flywheel Bento shares: the model it was built for, provenance in each answer, quiet 400s.

flywheel.build copies this file beside the service into each build folder, so a built bento stays
self-contained and immutable.
"""

import json
import logging
import re
import uuid
from pathlib import Path
from typing import Annotated

from bentoml.validators import ContentType
from pydantic import ValidationError

# Written by flywheel.build into the build folder: each bento serves exactly this model tag, never
# "latest" (a bento built for v2 once served v3 that way).
MODEL = json.loads(Path(__file__).with_name("flywheel_model.json").read_text())

# A declared media type: without it BentoML rebuilds the output's JSON schema on every response
# to find one (12% of a one-row request's CPU, measured with py-spy).
JSONAnswer = Annotated[dict, ContentType("application/json")]

logger = logging.getLogger("bentoml.flywheel")

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


def answer(ctx, predictions: list, started: float, now: float, **log_fields) -> dict:
    """The response body, with provenance in it and in the headers; one log line per request."""
    incoming = ctx.request.headers.get("x-request-id", "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    ctx.response.headers.update(HEADERS)
    ctx.response.headers["X-Request-Id"] = request_id
    fields = " ".join(f"{k}={v}" for k, v in log_fields.items())
    logger.info(
        "predict request_id=%s model=%s %s ms=%.2f", request_id, MODEL["model_tag"], fields, (now - started) * 1000
    )
    return {"predictions": predictions, **META}


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
