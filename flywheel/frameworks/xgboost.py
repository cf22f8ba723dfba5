"""XGBoost for tables: a native Booster, so a Bento calls inplace_predict directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.frameworks import TABLE, Framework, pinned

BOOSTER_FILE = "model.ubj"


def _objective(booster) -> str:
    return json.loads(booster.save_config())["learner"]["objective"]["name"]


def _indices(scores, objective: str):
    """Class indices from a booster's scores: softprob rows, a binary probability, or softmax indices."""
    if scores.ndim == 2:
        return scores.argmax(axis=1)
    if objective.startswith("binary:"):
        return (scores > 0.5).astype(int)
    return scores.astype(int)


# The parameters a pipeline may set, with their types and ranges (checked when its file is read).
PARAMS = {
    "max_depth": (int, 1, 32),
    "eta": (float, 1e-6, 1.0),
    "num_boost_round": (int, 1, 10_000),
    "subsample": (float, 1e-6, 1.0),
    "colsample_bytree": (float, 1e-6, 1.0),
    "min_child_weight": (float, 0.0, 1e6),
    "gamma": (float, 0.0, 1e6),
    "lambda": (float, 0.0, 1e6),
    "alpha": (float, 0.0, 1e6),
    "max_bin": (int, 2, 4096),
    "tree_method": ("hist", "approx", "exact"),
}


class XGBoost(Framework):
    name = "xgboost"
    inputs = TABLE
    params = PARAMS
    service = ("table_service.py", "TablePredictor")
    packages = ("bentoml", "xgboost-cpu", "numpy", "pydantic")
    # XGBoost imports scikit-learn whenever it can, for its sklearn wrapper (xgboost/compat.py), and with
    # it SciPy's statistics: about half of a replica's start (docs/measurements.md), for a Booster that
    # never calls them.
    unserved_modules = ("sklearn",)

    def booster_params(self, pipeline: Any, num_classes: int) -> tuple[dict, int]:
        params = {k: v for k, v in pipeline.params.items() if k != "num_boost_round"}
        params.update(seed=pipeline.seed, nthread=1)
        if pipeline.task == "classification":
            if num_classes == 2:
                params.setdefault("objective", "binary:logistic")
            else:
                params.setdefault("objective", "multi:softprob")
                params["num_class"] = num_classes
        else:
            params.setdefault("objective", "reg:squarederror")
        return params, int(pipeline.params.get("num_boost_round", 50))

    def fit(self, pipeline, x_train, y_train, num_classes):
        import xgboost as xgb

        params, rounds = self.booster_params(pipeline, num_classes)
        dtrain = xgb.DMatrix(x_train, label=y_train, feature_names=list(pipeline.features))
        return xgb.train(params, dtrain, num_boost_round=rounds)

    def predict(self, model, x):
        import numpy as np

        scores = model.inplace_predict(np.asarray(x, dtype=np.float32))
        objective = _objective(model)
        if objective.startswith(("multi:", "binary:")):
            return _indices(scores, objective)
        return scores

    def log_model(self, model, example):
        import mlflow
        import pandas as pd
        from mlflow.models import infer_signature

        frame = pd.DataFrame(example, columns=model.feature_names).astype("float32")
        return mlflow.xgboost.log_model(
            model,
            name="model",
            signature=infer_signature(frame, model.inplace_predict(frame.to_numpy())),
            input_example=frame,
            pip_requirements=pinned("xgboost-cpu", "numpy", "pandas"),
        )

    def load(self, model_uri):
        import mlflow.xgboost

        model = mlflow.xgboost.load_model(model_uri)
        return model.get_booster() if hasattr(model, "get_booster") else model

    def store(self, model_uri, contract, folder: Path, where: str) -> None:
        booster = self.load(model_uri)
        if booster.feature_names and list(booster.feature_names) != list(contract.features):
            raise ValueError(f"{where}: booster features {booster.feature_names} differ from tag {contract.features}")
        if contract.task == "classification":
            learner = json.loads(booster.save_config())["learner"]
            objective = learner["objective"]["name"]
            num_class = int(learner["learner_model_param"].get("num_class", "0"))
            expected = 2 if objective.startswith("binary:") else num_class
            if expected != len(contract.classes):
                raise ValueError(
                    f"{where}: objective {objective} predicts {expected} classes but the tag lists "
                    f"{list(contract.classes)}"
                )
        # Not bentoml.xgboost.save_model: that looks up the "xgboost" distribution's version and
        # fails when xgboost-cpu is what provides the package.
        booster.save_model(str(folder / BOOSTER_FILE))

    def serve(self, folder, contract):
        return ServedBooster(folder / BOOSTER_FILE, contract["task"], len(contract.get("features") or ()))


class ServedBooster:
    """The Booster in a Bento: one thread (one row costs ~0.1 ms; threads would only contend)."""

    def __init__(self, path: Path, task: str, width: int) -> None:
        import numpy as np
        import xgboost

        self.booster = xgboost.Booster(model_file=str(path))
        self.booster.set_param({"nthread": 1})
        self.objective = _objective(self.booster)
        self.classifies = task == "classification"
        self.booster.inplace_predict(np.zeros((1, width), dtype=np.float32))  # warm: the first request pays nothing

    def predict(self, x):
        scores = self.booster.inplace_predict(x)
        return _indices(scores, self.objective) if self.classifies else scores


FRAMEWORK = XGBoost()
