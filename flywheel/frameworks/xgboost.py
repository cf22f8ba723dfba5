"""XGBoost for tables: a native Booster, so serving can call inplace_predict directly."""

from __future__ import annotations

import numpy as np

from flywheel.frameworks import pinned


def _params(pipeline, num_classes: int) -> tuple[dict, int]:
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


def fit(pipeline, x_train: np.ndarray, y_train: np.ndarray, num_classes: int):
    import xgboost as xgb

    params, rounds = _params(pipeline, num_classes)
    dtrain = xgb.DMatrix(x_train, label=y_train, feature_names=list(pipeline.features))
    return xgb.train(params, dtrain, num_boost_round=rounds)


def predict(model, x: np.ndarray) -> np.ndarray:
    """Class indices for classifiers, values for regressors."""
    raw = model.inplace_predict(np.asarray(x, dtype=np.float32))
    if raw.ndim == 2:
        return raw.argmax(axis=1)
    if _objective(model).startswith("binary:"):
        return (raw > 0.5).astype(int)
    return raw


def _objective(model) -> str:
    import json

    return json.loads(model.save_config())["learner"]["objective"]["name"]


def log_model(model, example: np.ndarray):
    """Log the model to the active MLflow run (train.py registers it, tags and all, in one call)."""
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


def load(model_uri: str):
    import mlflow

    model = mlflow.xgboost.load_model(model_uri)
    return model.get_booster() if hasattr(model, "get_booster") else model
