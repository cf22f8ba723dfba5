"""TensorFlow: a small Keras 3 CNN for grey (h, w) images: fit, predict, log to MLflow, load back."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from flywheel.frameworks import pinned

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


def _params(pipeline: Any) -> dict[str, Any]:
    given = dict(pipeline.params or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        # A misspelt "epoch" would otherwise train with the default and nobody would know.
        raise ValueError(
            f"pipeline {getattr(pipeline, 'name', '?')}: unknown tensorflow params {unknown}; "
            f"expected {sorted(DEFAULTS)}"
        )
    params = {**DEFAULTS, **given}
    return {
        "epochs": int(params["epochs"]),
        "batch_size": int(params["batch_size"]),
        "learning_rate": float(params["learning_rate"]),
        "filters": int(params["filters"]),
    }


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


def fit(pipeline: Any, x_train: np.ndarray, y_train: np.ndarray, num_classes: int):
    """A CNN fitted on images x_train (n, h, w) and class indices y_train (n,), seeded by the pipeline."""
    import keras
    import tensorflow as tf

    params = _params(pipeline)
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


def probabilities(model: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities (n, classes) for images x (n, h, w)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    chunks = [model(x[i : i + PREDICT_CHUNK], training=False).numpy() for i in range(0, len(x), PREDICT_CHUNK)]
    return np.concatenate(chunks)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Class indices (n,) for images x (n, h, w)."""
    return probabilities(model, x).argmax(axis=1).astype(np.int64)


def log_model(model: Any, example: np.ndarray):
    """Log the model to the active MLflow run (a `.keras` file, tensorflow flavor); train.py registers it."""
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    example = np.asarray(example, dtype=np.float32)
    # The tensorflow flavor, not MLflow's Keras 3 one: mlflow.keras.log_model with an
    # input_example writes it before creating the model folder and fails (FileNotFoundError,
    # mlflow/mlflow#16183, still so in 3.17.2). tf.keras is Keras 3 here, so the file is the same.
    # MLflow checks the example through the logged model, and Keras draws a progress bar for that
    # on stdout, where steps print their JSON result: send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=infer_signature(example, probabilities(model, example)),
            input_example=example,
            pip_requirements=pinned(*REQUIREMENTS),
        )


def load(model_uri: str):
    """The Keras model behind an MLflow URI such as models:/digits@production."""
    import mlflow.tensorflow

    return mlflow.tensorflow.load_model(model_uri)
