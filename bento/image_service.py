"""BentoML service serving the one Keras image classifier named in the flywheel_model.json beside it."""

import gc
import os
import time
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from bentoml.validators import DType, Shape
from provenance import MODEL, JSONAnswer, answer  # beside this file in every build folder
from pydantic import AllowInfNan, Discriminator, Field, RootModel, Strict, Tag

HEIGHT, WIDTH = (int(s) for s in MODEL["image_shape"])
MAX_VALUE = float(MODEL["max_value"])
CLASSES: tuple[str, ...] = tuple(MODEL["classes"])
MAX_IMAGES = 256
# Adaptive batching gathers the images of concurrent requests into one forward pass. The pipeline's
# `serving.batching` decides (built into flywheel_model.json); FLYWHEEL_BATCHING=on/off overrides it
# at import, so a benchmark can compare the two on one bento.
_override = os.environ.get("FLYWHEEL_BATCHING", "").strip().lower()
BATCHING = (_override not in ("off", "0", "false", "no")) if _override else bool(MODEL.get("batching", False))
# A whole request fits one batch, so none is split. The latency bound only sheds load: BentoML
# answers 503 to a request that has waited this long in the queue.
MAX_BATCH_SIZE = MAX_IMAGES
MAX_LATENCY_MS = 1000


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
# The batched method's own input: already validated images, float32, any number of them.
Batch = Annotated[np.ndarray, Shape((-1, HEIGHT, WIDTH)), DType("float32")]


def _to_batch(inputs: list[Image]) -> np.ndarray:
    batch = np.empty((len(inputs), HEIGHT, WIDTH), dtype=np.float32)
    for i, image in enumerate(inputs):
        batch[i] = np.asarray(image.root, dtype=np.float32).reshape(HEIGHT, WIDTH)
    return batch


@bentoml.service(
    # The timeout middleware keeps a timer alive per request for the whole timeout; a short one
    # bounds the garbage that the full-GC stalls came from.
    traffic={"timeout": 5},
    # Blue/green servers behind Nginx least_conn balance better than workers inside one server.
    workers=1,
    # predict reaches the batch queue through BentoML's in-process client, which by default
    # replaces its session every 100 calls by closing it under the calls still in flight: with
    # 16 concurrent clients 256 of ~2,300 requests failed with 500 (ClientConnectionResetError). The
    # session connects to this very process, so there is nothing to gain from recycling it.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class ImagePredictor:
    bento_model = bentoml.models.BentoModel(MODEL["model_tag"])

    def __init__(self) -> None:
        # Here, not at module level: the build imports this module too, and TensorFlow's import
        # alone takes 10+ s.
        import tensorflow as tf

        # Two cores are shared by both colours and everything else: one thread per op, one op at
        # a time, and concurrency comes from batching instead.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        # flywheel.build stores the Keras file under this name (see KERAS_FILE there).
        self.model = keras.saving.load_model(self.bento_model.path_of("model.keras"), compile=False)
        # One traced graph for any batch size: a plain model call re-runs Python layer code each time.
        self.forward = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec((None, HEIGHT, WIDTH), tf.float32)],
        )
        # Trace and warm the graph so the first request does not pay for it.
        self._classify(np.zeros((1, HEIGHT, WIDTH), dtype=np.float32))
        # Everything loaded so far lives as long as the process: freezing it keeps it out of
        # every later full collection, whose pauses set the p99.
        gc.collect()
        gc.freeze()

    def _classify(self, images: np.ndarray) -> np.ndarray:
        return self.forward(images).numpy().argmax(axis=1).astype(np.int64)

    # Internal: predict hands its validated images here. With batching on, BentoML queues the
    # calls of concurrent requests and runs them as one batch (in its thread pool).
    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: Batch) -> np.ndarray:
        """Class indices for a batch of validated images (n, h, w)."""
        return self._classify(images)

    @bentoml.api
    async def predict(self, inputs: Inputs, ctx: bentoml.Context) -> JSONAnswer:
        started = time.perf_counter()
        batch = _to_batch(inputs)
        if BATCHING:
            # Through the service's own in-process client (set by BentoML at start-up): that call
            # reaches the batch queue, a direct method call would not. to_async, as classify is
            # sync and the sync client cannot run inside the event loop.
            indices = await self.to_async.classify(batch)
        else:
            indices = await anyio.to_thread.run_sync(self._classify, batch)
        predictions = [CLASSES[int(i)] for i in np.asarray(indices).reshape(-1)]
        return answer(
            ctx, predictions, started, time.perf_counter(), images=len(inputs), batching="on" if BATCHING else "off"
        )
