"""Frameworks: the model families Flywheel trains and serves, as plugins.

The bottom layer: a pipeline file names a framework, so the configuration imports this package; it
imports no other part of Flywheel.

Each module here holds one `FRAMEWORK`, an instance of a `Framework` subclass that owns everything
that differs between model families: the parameters a pipeline may set (checked when the file is
read), the kind of input (table or image), how it fits, predicts and logs to MLflow, how a
registered version is copied into the BentoML model store, which Bento service serves it and how
that service calls the model. Adding a framework is adding one module (and its tests): `get` and
`names` find it. Heavy libraries are imported inside the methods, so the registry costs nothing to
load where they are absent (Airflow's environment, the DAG processor).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

TABLE, IMAGE = "table", "image"
FORMATS = {TABLE: ("csv", "parquet"), IMAGE: ("npz", "idx")}
# The largest legal request: Bentos refuse more, Nginx's body limit is sized from it.
MAX_ROWS = 1000
MAX_IMAGES = 256
# A number as JSON may take this many characters ("-1.2345678901234567e-308"), plus ", ".
NUMBER_CHARS = 26


class Framework:
    """A model family: what a pipeline may ask of it, and how its models are trained, stored and served."""

    name: ClassVar[str]
    inputs: ClassVar[str]  # TABLE or IMAGE
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")
    # Parameters a pipeline file (or a hand-triggered run) may set: (type, lowest, highest), or a
    # tuple of allowed values. A misspelt or out-of-range one fails before any training starts.
    params: ClassVar[dict[str, tuple]] = {}
    # The Bento service serving this framework's models (a file in bento/) and the class in it.
    service: ClassVar[tuple[str, str]]
    # What a served copy imports; listed in the bentofile for a later `bentoml containerize`.
    packages: ClassVar[tuple[str, ...]] = ()
    # Modules the ML environment has and a served copy never uses, kept out of each replica
    # (serving/replica.py) where a library would import them only because they are there.
    unserved_modules: ClassVar[tuple[str, ...]] = ()

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS[self.inputs]

    @property
    def max_inputs(self) -> int:
        return MAX_IMAGES if self.inputs == IMAGE else MAX_ROWS

    def largest_request(self, contract: Any) -> int:
        """Bytes of the largest request a Bento of this framework accepts, numbers written at full length.

        `contract` has `features` (tables) or `image_shape` (images): a pipeline, or a model's contract.
        """
        if self.inputs == IMAGE:
            height, width = contract.image_shape
            return MAX_IMAGES * (height * (width * NUMBER_CHARS + 4) + 4) + 64
        as_list = len(contract.features) * NUMBER_CHARS + 4
        as_object = sum(len(name) + 4 + NUMBER_CHARS for name in contract.features) + 4
        return MAX_ROWS * max(as_list, as_object) + 64

    # --- training (the ML environment) ------------------------------------------------------------

    def fit(self, pipeline: Any, x_train, y_train, num_classes: int) -> Any:
        """A model fitted on x_train, y_train (class indices for classifiers), seeded by the pipeline."""
        raise NotImplementedError

    def predict(self, model: Any, x):
        """Class indices (classifiers) or values (regressors), one per row or image of x."""
        raise NotImplementedError

    def log_model(self, model: Any, example):
        """Log the model to the active MLflow run; returns MLflow's ModelInfo (train.py registers it)."""
        raise NotImplementedError

    def load(self, model_uri: str) -> Any:
        """The model behind an MLflow URI (models:/<name>/<version>), for `predict`."""
        raise NotImplementedError

    # --- building and serving ---------------------------------------------------------------------

    def store(self, model_uri: str, contract: Any, folder: Path, where: str) -> None:
        """Write the registered model into a BentoML model's folder.

        Raises ValueError naming `where` if the model disagrees with its contract (the version's tags).
        """
        raise NotImplementedError

    def serve(self, folder: Path, contract: dict) -> Any:
        """In the Bento: the stored model, ready to answer. Its `predict(x)` takes a float32 array of
        rows or images and returns class indices or values."""
        raise NotImplementedError


def pinned(*names: str) -> list[str]:
    """Requirements pinned to what is installed (a logged model's, a bentofile's).

    Passing them spares MLflow its own inference, which re-imports the model in a subprocess
    (5 s for XGBoost, 10+ s for TensorFlow).
    """
    found = []
    for name in names:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(name)
    return found


def names() -> tuple[str, ...]:
    """Every framework module in this package."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(name: str) -> Framework:
    if name not in names():
        raise KeyError(f"unknown framework {name!r}; expected one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").FRAMEWORK
