"""Train: fit a challenger on the upload, score it and production on the same holdout, register, gate."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from flywheel import data, frameworks, gate, pipelines, registry
from flywheel.errors import DatasetInvalid
from flywheel.metrics import SMOKE_ARTIFACT, score
from flywheel.pipelines import Pipeline
from flywheel.runner import emit
from flywheel.settings import Settings
from flywheel.validate import Dataset, load_dataset


def holdout_mask(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows are holdout, decided by a seeded hash of each row's content, not its position.

    The same row lands on the same side in every upload, so re-uploading overlapping data never
    scores production on rows it was trained on, and the same upload always splits the same way.
    """
    import pandas as pd

    frame = pd.DataFrame(np.asarray(x).reshape(len(x), -1))
    frame["label"] = np.asarray(y)
    hashes = pd.util.hash_pandas_object(frame, index=False, hash_key=f"{seed:016d}"[-16:]).to_numpy()
    return (hashes % 10_000) < int(fraction * 10_000)


def split(pipeline: Pipeline, dataset: Dataset, holdout: Dataset | None):
    """(x_train, y_train, x_holdout, y_holdout): the fixed holdout object if declared, else a seeded split."""
    if holdout is not None:
        return dataset.x, dataset.y, holdout.x, holdout.y
    mask = holdout_mask(dataset.x, dataset.y, pipeline.holdout_fraction, pipeline.seed)
    if mask.all() or not mask.any():
        raise DatasetInvalid(
            f"{len(mask)} rows leave no {'training' if mask.all() else 'holdout'} rows (rule: minimum rows)"
        )
    return dataset.x[~mask], dataset.y[~mask], dataset.x[mask], dataset.y[mask]


SMOKE_ROWS = 200


def smoke_set(pipeline: Pipeline, x: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Holdout rows, their truth, and the score the trained model got on exactly these rows."""
    n = min(len(truth), SMOKE_ROWS)
    return {
        "metric": pipeline.metric,
        "recorded": score(pipeline.metric, predicted[:n], truth[:n]),
        "inputs": np.asarray(x[:n]).tolist(),
        "truth": np.asarray(truth[:n]).tolist(),
    }


def class_labels(pipeline: Pipeline, y: np.ndarray) -> list[str]:
    return list(pipeline.classes) or sorted({str(v) for v in y})


def champion_score(
    client, pipeline: Pipeline, x: np.ndarray, truth: np.ndarray
) -> tuple[str | None, float | None, str]:
    """Score the current production version on the challenger's holdout."""
    version = registry.current_version(client, pipeline.model_name)
    if version is None:
        return None, None, ""
    tags = client.get_model_version(pipeline.model_name, version).tags
    try:
        fw = frameworks.get(tags.get("flywheel.framework", "xgboost"))
        predicted = fw.predict(fw.load(f"models:/{pipeline.model_name}/{version}"), x)
        if pipeline.task == "classification":
            classes = json.loads(tags["flywheel.classes"])
            predicted = np.array([classes[int(i)] for i in predicted])
        return version, score(pipeline.metric, predicted, truth), ""
    except Exception as exc:  # a production model that no longer fits the data is no obstacle
        return version, None, f"production v{version} could not be scored on this holdout: {exc}"


def _log_dataset(pipeline: Pipeline, ref: data.DatasetRef, dataset: Dataset) -> None:
    """The upload as an MLflow dataset input: its URI, its etag as digest, and its schema.

    A MetaDataset with a schema inferred from a sample: MLflow's PandasDataset infers the schema
    by visiting every cell in Python (about 25 s for 1M x 30), and the validate step has already
    checked every column.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.models import infer_signature

    sample = dataset.table.head(1000) if dataset.table is not None else np.asarray(dataset.x[:1000])
    ds = MetaDataset(
        resolve_dataset_source(ref.uri),
        name=ref.key,
        digest=ref.etag[:36] or None,
        schema=infer_signature(sample).inputs,
    )
    mlflow.log_input(ds, context="training", tags={"rows": str(len(dataset))})


def version_tags(pipeline: Pipeline, ref: data.DatasetRef, classes: list[str], evaluation: dict) -> dict[str, str]:
    """What a registered version carries from birth: provenance, the model's contract, the gate's verdict."""
    tags = {
        "flywheel.pipeline": pipeline.name,
        "flywheel.framework": pipeline.framework,
        "flywheel.task": pipeline.task,
        "dataset.uri": ref.uri,
        "dataset.key": ref.key,
        "dataset.etag": ref.etag,
        "dataset.version_id": ref.version_id,
        "flywheel.metric": pipeline.metric,
        **evaluation,
    }
    if pipeline.is_image:
        tags["flywheel.image_shape"] = json.dumps(list(pipeline.image_shape))
        tags["flywheel.max_value"] = json.dumps(pipeline.max_value)
    else:
        tags["flywheel.features"] = json.dumps(list(pipeline.features))
    if classes:
        tags["flywheel.classes"] = json.dumps(classes)
    return tags


def fail_abandoned(client, experiment_id: str, airflow_run: str) -> None:
    """Earlier attempts of this Airflow run that were killed mid-way end FAILED, not RUNNING forever."""
    if not airflow_run:
        return
    stale = client.search_runs(
        [experiment_id], f"tags.`airflow.run_id` = '{airflow_run}' and attributes.status = 'RUNNING'"
    )
    for run in stale:
        client.set_tag(run.info.run_id, "flywheel.reason", "killed before it finished; a later attempt took over")
        client.set_terminated(run.info.run_id, status="FAILED")


def run(
    settings: Settings, pipeline: Pipeline, ref: data.DatasetRef, airflow_run: str = "", trigger: dict | None = None
) -> dict:
    import dataclasses

    import mlflow

    trigger = trigger or {}
    overrides = pipelines.check_params(pipeline.framework, trigger.get("overrides") or {}, f"{pipeline.name} overrides")
    if overrides:  # a hand-triggered run's parameters, over the pipeline file's
        pipeline = dataclasses.replace(pipeline, params={**pipeline.params, **overrides})

    dataset = load_dataset(settings, pipeline, ref)
    holdout = None
    if pipeline.holdout_object:
        holdout = load_dataset(settings, pipeline, data.DatasetRef(ref.bucket, pipeline.holdout_object))
    x_train, y_train, x_holdout, y_holdout = split(pipeline, dataset, holdout)
    classes: list[str] = []
    if pipeline.task == "classification":
        classes = class_labels(pipeline, dataset.y)
        index = {c: i for i, c in enumerate(classes)}
        y_train = np.array([index[str(v)] for v in y_train])
    fw = frameworks.get(pipeline.framework)
    registry.require_tracking()
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment(pipeline.name)
    fail_abandoned(client, experiment.experiment_id, airflow_run)
    provenance = {
        "flywheel.pipeline": pipeline.name,
        "dataset.uri": ref.uri,
        "dataset.key": ref.key,
        "dataset.etag": ref.etag,
        "dataset.version_id": ref.version_id,
        "airflow.run_id": airflow_run,
        "flywheel.trigger": trigger.get("kind") or "upload",
        "flywheel.triggered_by": trigger.get("by") or "",
        "flywheel.note": (trigger.get("note") or "")[:4900],
        "flywheel.overrides": json.dumps(overrides),
    }
    # The run ends FINISHED only once its version is registered, tagged and (if it won) promoted: a
    # kill at any point leaves it RUNNING, and the next attempt or run marks it FAILED.
    with mlflow.start_run(run_name=f"train-{pipeline.name}", tags=provenance) as active:
        mlflow.log_params(
            {
                **pipeline.params,
                "holdout": pipeline.holdout_object or pipeline.holdout_fraction,
                "seed": pipeline.seed,
                "rows": len(dataset),
            }
        )
        _log_dataset(pipeline, ref, dataset)
        model = fw.fit(pipeline, x_train, y_train, len(classes))
        predicted = fw.predict(model, x_holdout)
        if classes:
            predicted = np.array([classes[int(i)] for i in predicted])
        challenger = score(pipeline.metric, predicted, y_holdout)
        champion_version, champion, note = champion_score(client, pipeline, x_holdout, y_holdout)
        decision = gate.decide(
            pipeline.metric,
            challenger,
            champion,
            higher_is_better=pipeline.higher_is_better,
            floor=pipeline.floor,
            margin=pipeline.margin,
        )
        reason = f"{decision.reason}; {note}" if note else decision.reason
        verdict = "promoted" if decision.promote else "rejected"
        mlflow.log_metrics(
            {
                pipeline.metric: challenger,
                **({f"production_{pipeline.metric}": champion} if champion is not None else {}),
            }
        )
        info = fw.log_model(model, x_holdout[:3])
        # The deploy step replays these rows through the new server before it takes traffic.
        mlflow.log_dict(smoke_set(pipeline, x_holdout, y_holdout, predicted), SMOKE_ARTIFACT)
        run_id = active.info.run_id
        evaluation = {
            "flywheel.challenger_score": str(challenger),
            "flywheel.production_version": champion_version or "",
            "flywheel.production_score": "" if champion is None else str(champion),
            "flywheel.decision": verdict,
            "flywheel.reason": reason,
        }
        # Created with its tags in one call: no version ever exists without its provenance.
        registry.ensure_model(client, pipeline.model_name)
        version = client.create_model_version(
            pipeline.model_name,
            source=info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags=version_tags(pipeline, ref, classes, evaluation),
        ).version
        version = str(version)
        previous = registry.promote(client, pipeline.model_name, version) if decision.promote else None
        mlflow.set_tags({"flywheel.decision": verdict, "flywheel.reason": reason, "flywheel.model_version": version})
    print(f"{verdict.upper()} {pipeline.name} v{version}: {reason}", file=sys.stderr, flush=True)
    return {
        "pipeline": pipeline.name,
        "model_name": pipeline.model_name,
        "version": version,
        "run_id": run_id,
        "promoted": decision.promote,
        "reason": reason,
        "previous_version": previous,
        "metrics": {pipeline.metric: challenger, f"production_{pipeline.metric}": champion},
        "dataset": ref.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.train", description=__doc__)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", required=True, help="the dataset event's extra, as JSON")
    parser.add_argument("--trigger", default="{}", help="who started the run and with what (the plan's), as JSON")
    parser.add_argument("--airflow-run", default="")
    args = parser.parse_args(argv)
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, args.pipeline)
    ref = data.DatasetRef.from_extra(json.loads(args.dataset))
    try:
        result = run(settings, pipeline, ref, args.airflow_run, json.loads(args.trigger))
    except DatasetInvalid as exc:
        print(f"INVALID DATASET {exc}", file=sys.stderr)
        return 2
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
