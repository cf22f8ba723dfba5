"""TensorFlow: a small Keras 3 CNN for grey (h, w) images: fit, predict, log to MLflow, store, serve."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from flywheel.frameworks import IMAGE, Framework, pinned

DEFAULTS = {"epochs": 10, "batch_size": 32, "learning_rate": 0.003, "filters": 16}
# Conv blocks halve the image; stop before the side falls under this, so 8x8 digits get two
# blocks (8 -> 4 -> 2) and 28x28 MNIST three (28 -> 14 -> 7 -> 3).
MIN_SIDE, MAX_BLOCKS = 4, 3
STEPS_PER_EXECUTION = 16
# Rows per forward pass in predict(): bounds the activations (a full 28x28 MNIST holdout at once
# needs gigabytes), and calling the model directly skips model.predict's per-call tf.data set-up.
PREDICT_CHUNK = 1024
# What a served copy needs; listed so MLflow does not re-import the model in a subprocess to
# infer them (seconds per logged model, TensorFlow's import alone is 10+ s here).
REQUIREMENTS = ("keras", "tensorflow-cpu", "numpy")
KERAS_FILE = "model.keras"  # both MLflow flavors that hold a Keras 3 model keep it under data/


def build_model(image_shape: tuple[int, int], max_value: float, num_classes: int, filters: int):
    """Input (h, w) of raw values -> scaled to [0, 1] -> conv/pool blocks -> softmax over classes."""
    import keras
    from keras import layers

    h, w = (int(s) for s in image_shape)
    inputs = keras.Input(shape=(h, w), name="image")
    # Scaling lives in the model, so a served copy takes the uploaded value range as is.
    x = layers.Rescaling(1.0 / float(max_value))(inputs)
    x = layers.Reshape((h, w, 1))(x)
    side, blocks = min(h, w), 0
    while side >= MIN_SIDE and blocks < MAX_BLOCKS:
        x = layers.Conv2D(filters * 2**blocks, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        side, blocks = side // 2, blocks + 1
    x = layers.Flatten()(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="flywheel_cnn")


def _epoch_logger():
    """Per-epoch train loss/accuracy into the active MLflow run: two cheap calls, not autolog."""
    import keras

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            import mlflow

            if logs and mlflow.active_run() is not None:
                # "train_" keeps them apart from the holdout metric the training step logs.
                mlflow.log_metrics({f"train_{k}": float(v) for k, v in logs.items()}, step=epoch)

    return EpochMetrics()


def probabilities(model: Any, x):
    """Class probabilities (n, classes) for images x (n, h, w)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    chunks = [model(x[i : i + PREDICT_CHUNK], training=False).numpy() for i in range(0, len(x), PREDICT_CHUNK)]
    return np.concatenate(chunks)


def keras_io(path: Path) -> tuple[list | None, int | None]:
    """Input shape (batch first) and output units from a .keras file's config, without Keras.

    A .keras file is a zip whose config.json describes the layers; reading it spares the build
    TensorFlow's import (10+ s here). (None, None) when the layout is not the expected one.
    """

    def listed(refs: list) -> list:  # Keras writes one input as ["name", 0, 0], several as [[...], ...]
        return [refs] if refs and isinstance(refs[0], str) else refs

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        inner = config["config"]
        layers = {layer["name"]: layer for layer in inner["layers"]}
        (first,) = [layers[name] for name, *_ in listed(inner["input_layers"])]
        (last,) = [layers[name] for name, *_ in listed(inner["output_layers"])]
        return list(first["config"]["batch_shape"]), int(last["config"]["units"])
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile):
        return None, None


# The parameters a pipeline may set, with their types and ranges (checked when its file is read).
PARAMS = {
    "epochs": (int, 1, 1000),
    "batch_size": (int, 1, 4096),
    "learning_rate": (float, 1e-7, 1.0),
    "filters": (int, 1, 256),
}


class TensorFlow(Framework):
    name = "tensorflow"
    inputs = IMAGE
    tasks = ("classification",)
    params = PARAMS
    service = ("image_service.py", "ImagePredictor")
    packages = ("bentoml", "tensorflow-cpu", "keras", "numpy", "pydantic")

    def settings(self, pipeline: Any) -> dict[str, Any]:
        given = dict(pipeline.params or {})
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            # A misspelt "epoch" would otherwise train with the default and nobody would know.
            raise ValueError(
                f"pipeline {getattr(pipeline, 'name', '?')}: unknown tensorflow params {unknown}; "
                f"expected {sorted(DEFAULTS)}"
            )
        return {name: type(default)(given.get(name, default)) for name, default in DEFAULTS.items()}

    def fit(self, pipeline, x_train, y_train, num_classes):
        import keras
        import numpy as np
        import tensorflow as tf

        params = self.settings(pipeline)
        # Same upload, same seed -> same weights, same metrics: the gate compares like with like.
        keras.utils.set_random_seed(int(pipeline.seed))
        tf.config.experimental.enable_op_determinism()
        model = build_model(pipeline.image_shape, pipeline.max_value, num_classes, params["filters"])
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=params["learning_rate"]),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            # Measured on 8x8 digits (2 shared cores): XLA ("auto"/True) adds 4-5 s of compiling to
            # the first epoch and gains nothing after; 16 steps per call halve the per-step overhead
            # that dominates a network this small (0.39 -> 0.24 s an epoch), with identical weights.
            jit_compile=False,
            steps_per_execution=STEPS_PER_EXECUTION,
        )
        model.fit(
            np.asarray(x_train, dtype=np.float32),
            np.asarray(y_train, dtype=np.int64),
            epochs=params["epochs"],
            batch_size=params["batch_size"],
            shuffle=True,
            verbose=0,
            callbacks=[_epoch_logger()],
        )
        return model

    def predict(self, model, x):
        import numpy as np

        return probabilities(model, x).argmax(axis=1).astype(np.int64)

    def log_model(self, model, example):
        import mlflow.tensorflow
        import numpy as np
        from mlflow.models import infer_signature

        example = np.asarray(example, dtype=np.float32)
        # The tensorflow flavor, not MLflow's Keras 3 one: mlflow.keras.log_model with an
        # input_example writes it before creating the model folder and fails (FileNotFoundError,
        # mlflow/mlflow#16183, still so in 3.17.2). tf.keras is Keras 3 here, so the file is the same.
        # MLflow checks the example through the logged model, and Keras draws a progress bar for that
        # on stdout: keep stdout for the step's own words.
        with contextlib.redirect_stdout(sys.stderr):
            return mlflow.tensorflow.log_model(
                model,
                name="model",
                signature=infer_signature(example, probabilities(model, example)),
                input_example=example,
                pip_requirements=pinned(*REQUIREMENTS),
            )

    def load(self, model_uri):
        import mlflow.tensorflow

        return mlflow.tensorflow.load_model(model_uri)

    def store(self, model_uri, contract, folder: Path, where: str) -> None:
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="flywheel-build-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
            keras_file = local / "data" / KERAS_FILE
            if not keras_file.is_file():
                raise ValueError(f"{where} has no data/{KERAS_FILE}: not a Keras 3 model as this framework logs it")
            input_shape, units = keras_io(keras_file)
            if input_shape is not None and list(input_shape[1:]) != list(contract.image_shape):
                raise ValueError(
                    f"{where}: the model takes images of shape {input_shape[1:]} but the tag says "
                    f"{list(contract.image_shape)}"
                )
            if units is not None and units != len(contract.classes):
                raise ValueError(
                    f"{where}: the model predicts {units} classes but the tag lists {list(contract.classes)}"
                )
            # The very file MLflow holds: no TensorFlow import (10+ s here) to load and re-save it.
            shutil.copyfile(keras_file, folder / KERAS_FILE)

    def serve(self, folder, contract):
        return ServedCNN(folder / KERAS_FILE, tuple(contract["image_shape"]))


class ServedCNN:
    """The CNN in a Bento: one traced graph for any batch size, one thread per op.

    Two cores are shared by both colours and everything else: concurrency comes from batching
    requests (bento/image_service.py), not from TensorFlow's thread pools.
    """

    def __init__(self, path: Path, image_shape: tuple[int, int]) -> None:
        import keras
        import numpy as np
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.model = keras.saving.load_model(str(path), compile=False)
        height, width = image_shape
        # A plain model call re-runs Python layer code each time; a traced graph does not.
        self.forward = tf.function(
            lambda x: self.model(x, training=False), input_signature=[tf.TensorSpec((None, height, width), tf.float32)]
        )
        self.predict(np.zeros((1, height, width), dtype=np.float32))  # trace and warm it now

    def predict(self, x):
        import numpy as np

        return self.forward(x).numpy().argmax(axis=1).astype(np.int64)


FRAMEWORK = TensorFlow()
