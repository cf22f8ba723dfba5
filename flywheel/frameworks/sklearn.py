"""scikit-learn for tables: histogram gradient boosting, the library's own fast tree ensemble.

The plugin shape shown on a second table framework: this file and its tests are all it took.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from flywheel.frameworks import TABLE, Framework, pinned

MODEL_FILE = "model.pkl"
# The estimators' own names and ranges (sklearn.ensemble.HistGradientBoosting*).
PARAMS = {
    "max_iter": (int, 1, 10_000),
    "learning_rate": (float, 1e-6, 10.0),
    "max_depth": (int, 1, 64),
    "max_leaf_nodes": (int, 2, 4096),
    "min_samples_leaf": (int, 1, 1_000_000),
    "l2_regularization": (float, 0.0, 1e6),
    "max_bins": (int, 2, 255),
}


class Sklearn(Framework):
    name = "sklearn"
    inputs = TABLE
    params = PARAMS
    service = ("table_service.py", "TablePredictor")
    packages = ("bentoml", "scikit-learn", "numpy", "pydantic")

    def estimator(self, pipeline: Any):
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        kind = HistGradientBoostingClassifier if pipeline.task == "classification" else HistGradientBoostingRegressor
        # No early stopping: it would hold out rows of its own, and the gate scores on the pipeline's holdout.
        return kind(**pipeline.params, random_state=pipeline.seed, early_stopping=False)

    def fit(self, pipeline, x_train, y_train, num_classes):
        return self.estimator(pipeline).fit(x_train, y_train)

    def predict(self, model, x):
        import numpy as np

        predicted = model.predict(np.asarray(x, dtype=np.float32))
        return predicted.astype(np.int64) if hasattr(model, "classes_") else predicted

    def log_model(self, model, example):
        import mlflow.sklearn
        import numpy as np
        from mlflow.models import infer_signature

        example = np.asarray(example, dtype=np.float32)
        return mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example)),
            input_example=example,
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE,
            pip_requirements=pinned("scikit-learn", "numpy"),
        )

    def load(self, model_uri):
        import mlflow.sklearn

        return mlflow.sklearn.load_model(model_uri)

    def store(self, model_uri, contract, folder: Path, where: str) -> None:
        model = self.load(model_uri)
        width = getattr(model, "n_features_in_", len(contract.features))
        if width != len(contract.features):
            raise ValueError(f"{where}: the model takes {width} features but the tag lists {list(contract.features)}")
        if contract.task == "classification" and len(model.classes_) != len(contract.classes):
            raise ValueError(
                f"{where}: the model predicts {len(model.classes_)} classes but the tag lists {list(contract.classes)}"
            )
        with open(folder / MODEL_FILE, "wb") as f:
            pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)

    def serve(self, folder, contract):
        return ServedEstimator(folder / MODEL_FILE, len(contract.get("features") or ()))


class ServedEstimator:
    """The estimator in a Bento (a pickle the build wrote from the registered model: trusted)."""

    def __init__(self, path: Path, width: int) -> None:
        import numpy as np

        with open(path, "rb") as f:
            self.model = pickle.load(f)
        self.classifies = hasattr(self.model, "classes_")
        self.predict(np.zeros((1, width), dtype=np.float32))  # warm

    def predict(self, x):
        predicted = self.model.predict(x)
        return predicted.astype(int) if self.classifies else predicted


FRAMEWORK = Sklearn()
