"""BentoML service serving the one XGBoost model named in the flywheel_model.json beside it."""

import gc
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
import numpy as np
from pydantic import AfterValidator, AllowInfNan, Discriminator, Field, RootModel, Strict, Tag, ValidationError

# Written by flywheel.build into the build folder, so each built bento is immutable: it serves
# exactly this model tag, never "latest" (a bento built for v2 once served v3 that way).
MODEL = json.loads(Path(__file__).with_name("flywheel_model.json").read_text())
FEATURES: tuple[str, ...] = tuple(MODEL["features"])
CLASSES: tuple[str, ...] = tuple(MODEL.get("classes") or ())
MAX_ROWS = 1000

# A declared media type: without it BentoML rebuilds the output's JSON schema on every response
# to find one (12% of a one-row request's CPU, measured with py-spy).
JSONAnswer = Annotated[dict, ContentType("application/json")]

logger = logging.getLogger("bentoml.flywheel")

# Strict: "5.1" and true are not numbers. JSON ints still pass, as strict floats accept ints.
Value = Annotated[float, Strict(), AllowInfNan(False)]


def _ordered(row: dict[str, float]) -> list[float]:
    missing = [name for name in FEATURES if name not in row]
    extra = sorted(set(row) - set(FEATURES))
    if missing or extra:
        problems = ([f"missing columns {missing}"] if missing else []) + (
            [f"unexpected columns {extra}"] if extra else []
        )
        raise ValueError(f"{'; '.join(problems)}; expected exactly {list(FEATURES)}")
    return [row[name] for name in FEATURES]


def _row_kind(row: Any) -> str | None:
    if isinstance(row, list):
        return "list"
    if isinstance(row, dict):
        return "object"
    return None


# A discriminated union, so a bad row gets the one reason that applies to its shape rather than
# pydantic's errors for every branch; failing here makes BentoML answer 400 instead of 500.
# It lives in a RootModel because BentoML re-processes the annotations of API parameters, and a
# Discriminator placed directly on the parameter's type fails that second pass.
class Row(
    RootModel[
        Annotated[
            Annotated[list[Value], Field(min_length=len(FEATURES), max_length=len(FEATURES)), Tag("list")]
            | Annotated[dict[str, Value], AfterValidator(_ordered), Tag("object")],
            Discriminator(
                _row_kind,
                custom_error_type="row_type",
                custom_error_message=(
                    f"each row must be a list of {len(FEATURES)} numbers or an object keyed by {list(FEATURES)}"
                ),
            ),
        ]
    ]
):
    pass


Inputs = Annotated[list[Row], Field(min_length=1, max_length=MAX_ROWS)]


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

# Echoed into a response header and the log, so only a plain token is accepted.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@bentoml.service(
    # The timeout middleware keeps a timer alive per request for the whole timeout; a short one
    # bounds the garbage that the full-GC stalls came from.
    traffic={"timeout": 5},
    # Blue/green servers behind Nginx least_conn balance better than workers inside one server.
    workers=1,
)
class Predictor:
    bento_model = bentoml.models.BentoModel(MODEL["model_tag"])

    def __init__(self) -> None:
        import xgboost  # here, not at module level: the build imports this module too

        # flywheel.build stores the native booster file (see BOOSTER_FILE there).
        self.booster = xgboost.Booster(model_file=self.bento_model.path_of("model.ubj"))
        # One row costs ~0.1 ms; OpenMP threads would only contend with the other colour's server.
        self.booster.set_param({"nthread": 1})
        config = json.loads(self.booster.save_config())
        self.objective: str = config["learner"]["objective"]["name"]
        self.task: str = MODEL["task"]
        self.headers = {
            "X-Model-Name": MODEL["pipeline"],
            "X-Model-Version": str(MODEL["version"]),
            "X-Dataset-Version": MODEL["dataset"].get("etag") or "",
        }
        self.meta = {
            "model": {"pipeline": MODEL["pipeline"], "name": MODEL["pipeline"], "version": str(MODEL["version"])},
            "dataset": {key: MODEL["dataset"].get(key) for key in ("uri", "key", "etag", "version_id")},
        }
        # Warm the predictor so the first request does not pay for it.
        self.booster.inplace_predict(np.zeros((1, len(FEATURES)), dtype=np.float32))
        # Everything loaded so far lives as long as the process: freezing it keeps it out of
        # every later full collection, whose pauses (180-386 ms measured) set the p99.
        gc.collect()
        gc.freeze()

    def _labels(self, scores: np.ndarray) -> list:
        if self.task != "classification":
            return scores.astype(float).tolist()
        if scores.ndim == 2:
            indices = scores.argmax(axis=1)
        elif self.objective.startswith("binary:"):
            indices = (scores > 0.5).astype(int)
        else:  # multi:softmax predicts the class index itself
            indices = scores.astype(int)
        return [CLASSES[i] for i in indices]

    @bentoml.api
    async def predict(self, inputs: Inputs, ctx: bentoml.Context) -> JSONAnswer:
        started = time.perf_counter()
        incoming = ctx.request.headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scores = self.booster.inplace_predict(np.asarray([row.root for row in inputs], dtype=np.float32))
        predictions = self._labels(scores)
        ctx.response.headers.update(self.headers)
        ctx.response.headers["X-Request-Id"] = request_id
        logger.info(
            "predict request_id=%s model=%s rows=%d ms=%.2f",
            request_id,
            MODEL["model_tag"],
            len(inputs),
            (time.perf_counter() - started) * 1000,
        )
        return {"predictions": predictions, **self.meta}
