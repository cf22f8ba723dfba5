"""Train: fit a challenger on the uploaded dataset, track it in MLflow, register it, gate it."""

from __future__ import annotations

import argparse
import json
import sys

from flywheel import data, pipelines, registry
from flywheel.pipelines import Pipeline
from flywheel.settings import Settings
from flywheel.validate import DatasetInvalid, load_valid_table


def _split(pipeline: Pipeline, table):
    from sklearn.model_selection import train_test_split

    stratify = table[pipeline.target] if pipeline.task == "classification" else None
    return train_test_split(
        table, test_size=pipeline.holdout_fraction, random_state=pipeline.seed, stratify=stratify
    )


def fit_xgboost(pipeline: Pipeline, train, holdout):
    """Return (booster, classes, metrics) for the pipeline's task."""
    import numpy as np
    import xgboost as xgb

    params = {k: v for k, v in pipeline.params.items() if k != "num_boost_round"}
    params.update(seed=pipeline.seed, nthread=1)
    rounds = int(pipeline.params.get("num_boost_round", 50))
    features = list(pipeline.features)
    classes: list[str] = []
    y_train, y_holdout = train[pipeline.target], holdout[pipeline.target]
    if pipeline.task == "classification":
        classes = sorted(str(c) for c in y_train.astype(str).unique())
        index = {c: i for i, c in enumerate(classes)}
        y_train = y_train.astype(str).map(index)
        y_holdout = y_holdout.astype(str).map(index).fillna(-1)
        if len(classes) == 2:
            params.setdefault("objective", "binary:logistic")
        else:
            params.setdefault("objective", "multi:softprob")
            params["num_class"] = len(classes)
    else:
        params.setdefault("objective", "reg:squarederror")
    dtrain = xgb.DMatrix(train[features].astype("float32"), label=y_train, feature_names=features)
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    raw = booster.inplace_predict(holdout[features].to_numpy(dtype="float32"))
    if pipeline.task == "classification":
        predicted = raw.argmax(axis=1) if raw.ndim == 2 else (raw > 0.5).astype(int)
        metrics = {"accuracy": float((predicted == y_holdout.to_numpy()).mean())}
    else:
        errors = raw - y_holdout.to_numpy()
        metrics = {"rmse": float(np.sqrt((errors**2).mean())), "mae": float(np.abs(errors).mean())}
    return booster, classes, metrics


def run(settings: Settings, pipeline: Pipeline, ref: data.DatasetRef, consumed: list[dict], airflow_run: str = "") -> dict:
    import mlflow
    from mlflow.models import infer_signature

    table = load_valid_table(settings, pipeline, ref)
    train, holdout = _split(pipeline, table)
    booster, classes, metrics = fit_xgboost(pipeline, train, holdout)
    score = metrics[pipeline.metric]

    client = mlflow.MlflowClient()
    mlflow.set_experiment(pipeline.name)
    with mlflow.start_run(run_name=f"train-{pipeline.name}") as active:
        mlflow.log_params({**pipeline.params, "holdout_fraction": pipeline.holdout_fraction, "seed": pipeline.seed})
        mlflow.log_metrics(metrics)
        dataset = mlflow.data.from_pandas(table, source=ref.uri, targets=pipeline.target, name=ref.key, digest=ref.etag[:36] or None)
        mlflow.log_input(dataset, context="training")
        mlflow.set_tags(
            {
                "flywheel.pipeline": pipeline.name,
                "dataset.uri": ref.uri,
                "dataset.etag": ref.etag,
                "dataset.version_id": ref.version_id,
                "airflow.run_id": airflow_run,
                # every upload a folded DAG run consumed, so none is silently skipped
                "flywheel.consumed_events": json.dumps([{"key": e["key"], "etag": e.get("etag", "")} for e in consumed]),
            }
        )
        example = holdout[list(pipeline.features)].head(3).astype("float32")
        info = mlflow.xgboost.log_model(
            booster,
            name="model",
            signature=infer_signature(example, booster.inplace_predict(example.to_numpy())),
            input_example=example,
            registered_model_name=pipeline.model_name,
        )
        run_id = active.info.run_id
    version = str(info.registered_model_version)
    tags = {
        "flywheel.pipeline": pipeline.name,
        "flywheel.task": pipeline.task,
        "flywheel.features": json.dumps(list(pipeline.features)),
        "dataset.uri": ref.uri,
        "dataset.key": ref.key,
        "dataset.etag": ref.etag,
        "dataset.version_id": ref.version_id,
        f"flywheel.metric.{pipeline.metric}": str(score),
    }
    if classes:
        tags["flywheel.classes"] = json.dumps(classes)
    promoted = score >= pipeline.floor
    reason = (
        f"{pipeline.metric} {score:.4f} clears the floor {pipeline.floor}"
        if promoted
        else f"{pipeline.metric} {score:.4f} is below the floor {pipeline.floor}"
    )
    tags.update({"flywheel.decision": "promoted" if promoted else "rejected", "flywheel.reason": reason})
    for key, value in tags.items():
        client.set_model_version_tag(pipeline.model_name, version, key, value)
    previous = registry.promote(client, pipeline.model_name, version) if promoted else None
    return {
        "pipeline": pipeline.name,
        "model_name": pipeline.model_name,
        "version": version,
        "run_id": run_id,
        "promoted": promoted,
        "reason": reason,
        "previous_version": previous,
        "metrics": metrics,
        "dataset": ref.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.train", description=__doc__)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", required=True, help="the dataset event's extra, as JSON")
    parser.add_argument("--consumed", default="[]", help="every dataset event the DAG run consumed, as JSON")
    parser.add_argument("--airflow-run", default="")
    args = parser.parse_args(argv)
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, args.pipeline)
    try:
        result = run(settings, pipeline, data.DatasetRef.from_extra(json.loads(args.dataset)), json.loads(args.consumed), args.airflow_run)
    except DatasetInvalid as exc:
        print(f"INVALID DATASET {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
