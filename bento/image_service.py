"""BentoML service for image classifiers: the one model version named in the flywheel_model.json beside it.

Images come as rows of pixels or flat lists; the framework plugin named in flywheel_model.json
(flywheel.frameworks) loads the stored model and classifies a batch.
"""

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from provenance import MAX_INPUTS, MODEL, SPOOL, JSONAnswer, answer  # beside this file in every build folder
from pydantic import AllowInfNan, Discriminator, Field, RootModel, Strict, Tag

from flywheel import frameworks
from flywheel.core.profiles import image_summary

HEIGHT, WIDTH = (int(s) for s in MODEL["image_shape"])
MAX_VALUE = float(MODEL["max_value"])
CLASSES: tuple[str, ...] = tuple(MODEL["classes"])
MAX_IMAGES = MAX_INPUTS
# Batching: the images of requests that arrive while the model is busy run as one forward pass.
# The pipeline's `serving.batching` decides (built into flywheel_model.json); FLYWHEEL_BATCHING=on/off
# overrides it at import, so a benchmark can compare the two on one bento.
_override = os.environ.get("FLYWHEEL_BATCHING", "").strip().lower()
BATCHING = (_override not in ("off", "0", "false", "no")) if _override else bool(MODEL.get("batching", False))
# At most this many images per forward pass (a whole legal request always fits).
MAX_BATCH_SIZE = max(MAX_IMAGES, 256)


# Strict: "5" and true are not numbers. JSON ints pass (strict floats accept ints).
Pixel = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0, le=MAX_VALUE)]


def _image_kind(image: Any) -> str | None:
    if not isinstance(image, list):
        return None
    return "rows" if image and isinstance(image[0], list) else "flat"


# A discriminated union, so a bad image gets the one reason that applies to its form, and failing
# here makes BentoML answer 400, not 500. In a RootModel because BentoML re-processes API
# parameter annotations, and a Discriminator directly on the parameter fails that second pass.
class Image(
    RootModel[
        Annotated[
            Annotated[
                list[Annotated[list[Pixel], Field(min_length=WIDTH, max_length=WIDTH)]],
                Field(min_length=HEIGHT, max_length=HEIGHT),
                Tag("rows"),
            ]
            | Annotated[list[Pixel], Field(min_length=HEIGHT * WIDTH, max_length=HEIGHT * WIDTH), Tag("flat")],
            Discriminator(
                _image_kind,
                custom_error_type="image_type",
                custom_error_message=(
                    f"each image must be {HEIGHT} rows of {WIDTH} numbers in [0, {MAX_VALUE:g}], "
                    f"or a flat list of {HEIGHT * WIDTH}"
                ),
            ),
        ]
    ]
):
    pass


Inputs = Annotated[list[Image], Field(min_length=1, max_length=MAX_IMAGES)]


def _to_batch(inputs: list[Image]) -> np.ndarray:
    batch = np.empty((len(inputs), HEIGHT, WIDTH), dtype=np.float32)
    for i, image in enumerate(inputs):
        batch[i] = np.asarray(image.root, dtype=np.float32).reshape(HEIGHT, WIDTH)
    return batch


class Batcher:
    """Opportunistic batching: no timer, no waiting. A request whose images arrive while a forward
    pass runs joins the next pass with every other request that arrived meanwhile.

    At one connection a pass holds one request and costs nothing extra; under load the passes
    grow by themselves. One forward of 32 28x28 images took 1.9 ms here, 32 forwards of one 16 ms.
    BentoML's own adaptive batching was measured first and dropped: it hands each request to the
    batch queue through its in-process HTTP client, and served 0.25-0.94x the requests/s of no
    batching (bench/serving.py).
    """

    def __init__(self, classify, max_batch: int) -> None:
        self.classify = classify
        self.max_batch = max_batch
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self.busy = False

    async def __call__(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """The class indices of these images, and how many images their forward pass held."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((images, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting:
                taken, size = [], 0
                while self.waiting and (not taken or size + len(self.waiting[0][0]) <= self.max_batch):
                    taken.append(self.waiting.pop(0))
                    size += len(taken[-1][0])
                try:
                    indices = await anyio.to_thread.run_sync(self.classify, np.concatenate([i for i, _ in taken]))
                except Exception as exc:  # every request of the pass gets the error
                    for _, future in taken:
                        future.done() or future.set_exception(exc)
                    continue
                start = 0
                for images, future in taken:
                    future.done() or future.set_result((indices[start : start + len(images)], size))
                    start += len(images)
        finally:
            self.busy = False


@bentoml.service(
    # provenance.py cancels the timeout middleware's per-request timer (see table_service.py).
    traffic={"timeout": 5},
    # Replicas behind Nginx least_conn, one per core, balance better than workers inside one server.
    workers=1,
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ".*"},  # no traces are exported: see table_service.py
)
class ImagePredictor:
    bento_model = bentoml.models.BentoModel(MODEL["model_tag"])

    def __init__(self) -> None:
        # Loaded here, not at import: the build imports this module too, and TensorFlow's import
        # alone takes 10+ s. The plugin traces and warms the model.
        self.model = frameworks.get(MODEL["framework"]).serve(Path(self.bento_model.path), MODEL)
        self.batcher = Batcher(self.model.predict, MAX_BATCH_SIZE)
        # Everything loaded so far lives as long as the process: freezing it keeps it out of
        # every later full collection, whose pauses set the p99.
        gc.collect()
        gc.freeze()

    @bentoml.api
    async def predict(self, inputs: Inputs, ctx: bentoml.Context) -> JSONAnswer:
        started = time.perf_counter()
        batch = _to_batch(inputs)
        if BATCHING:
            indices, in_pass = await self.batcher(batch)
        else:
            indices, in_pass = await anyio.to_thread.run_sync(self.model.predict, batch), len(batch)
        predictions = [CLASSES[int(i)] for i in np.asarray(indices).reshape(-1)]
        # The request log says how many images shared this request's forward pass.
        # The inference log keeps three numbers per image (core/profiles.py), not its pixels: what the
        # drift monitor compares with the training images' profile.
        summary = image_summary(batch, MAX_VALUE).round(4).tolist() if SPOOL.path is not None else None
        return answer(
            ctx, predictions, started, time.perf_counter(), inputs=summary, images=len(inputs), forward_pass=in_pass
        )
