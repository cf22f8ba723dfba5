"""BentoML service for table models: the one model version named in the flywheel_model.json beside it.

Rows come as lists of numbers or objects keyed by feature name; the framework plugin named in
flywheel_model.json (flywheel.frameworks) loads the stored model and predicts.
"""

import gc
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from provenance import MAX_INPUTS, MODEL, JSONAnswer, answer  # beside this file in every build folder
from pydantic import AfterValidator, AllowInfNan, Discriminator, Field, RootModel, Strict, Tag

from flywheel import frameworks

FEATURES: tuple[str, ...] = tuple(MODEL["features"])
CLASSES: tuple[str, ...] = tuple(MODEL.get("classes") or ())


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


Inputs = Annotated[list[Row], Field(min_length=1, max_length=MAX_INPUTS)]


@bentoml.service(
    # provenance.py cancels the timeout middleware's per-request timer, so the timeout no longer
    # decides how much garbage the collector walks.
    traffic={"timeout": 5},
    # Replicas behind Nginx least_conn, one per core, balance better than workers inside one server.
    workers=1,
    # Each request is logged once, by Nginx, and to the replica's request log (provenance.py), not
    # through BentoML's access log and supervisord's pipe.
    logging={"access": {"enabled": False}},
    # Nothing exports traces, yet OpenTelemetry's middleware made a span per request: excluding every
    # URL makes it return at once. One replica's requests/s: 929 -> 1,450 (bench/bento_tuning.py).
    tracing={"excluded_urls": ".*"},
)
class TablePredictor:
    bento_model = bentoml.models.BentoModel(MODEL["model_tag"])

    def __init__(self) -> None:
        self.model = frameworks.get(MODEL["framework"]).serve(Path(self.bento_model.path), MODEL)
        # Everything loaded so far lives as long as the process: freezing it keeps it out of
        # every later full collection, whose pauses (180-386 ms measured) set the p99.
        gc.collect()
        gc.freeze()

    @bentoml.api
    async def predict(self, inputs: Inputs, ctx: bentoml.Context) -> JSONAnswer:
        started = time.perf_counter()
        predicted = self.model.predict(np.asarray([row.root for row in inputs], dtype=np.float32))
        # Classifiers answer their class labels, regressors their values.
        predictions = [CLASSES[int(i)] for i in predicted] if CLASSES else np.asarray(predicted, float).tolist()
        return answer(ctx, predictions, started, time.perf_counter(), inputs=inputs, rows=len(inputs))
