"""Train (a step): fit a challenger on the upload, score it and production on the same holdout, register, gate.

`python -m flywheel.training.train --args '{"pipeline": ..., "upload": {...}, "trigger": {...}, "airflow_run": ...}'`
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from flywheel import frameworks
from flywheel.clients.tracking import require_tracking
from flywheel.core import pipelines, profiles, schema, steps
from flywheel.core.errors import DatasetInvalid
from flywheel.core.pipelines import Pipeline
from flywheel.core.scores import score
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload
from flywheel.training import datasets, gate, records, registry
from flywheel.training.datasets import Dataset

SMOKE_ROWS = 200


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


def contract(pipeline: Pipeline, classes: list[str]) -> schema.Contract:
    """What the version takes and answers: its pipeline's features or image shape, and its classes."""
    return schema.Contract(
        framework=pipeline.framework,
        task=pipeline.task,
        metric=pipeline.metric,
        features=pipeline.features,
        image_shape=tuple(pipeline.image_shape),
        max_value=pipeline.max_value if pipeline.is_image else 0.0,
        classes=tuple(classes),
    )


def profile(pipeline: Pipeline, x: np.ndarray, predicted: np.ndarray) -> dict:
    """What the monitor compares live answers with (core/profiles.py): the training inputs (tables:
    the features; images: their summaries), and the model's predictions on the holdout."""
    if pipeline.is_image:
        return profiles.build(
            list(profiles.IMAGE_FEATURES), profiles.image_summary(x, pipeline.max_value), predicted, pipeline.task
        )
    return profiles.build(list(pipeline.features), x, predicted, pipeline.task)


class ProductionUnscorable(RuntimeError):
    """The production model could not be scored on the challenger's holdout: the gate cannot decide."""


def champion_score(client, pipeline: Pipeline, x: np.ndarray, truth: np.ndarray) -> tuple[str | None, float | None]:
    """Score the current production version on the challenger's holdout (None, None without one)."""
    version = registry.current_version(client, pipeline.model_name)
    if version is None:
        return None, None
    mv = client.get_model_version(pipeline.model_name, version)
    record = schema.VersionRecord.from_mlflow(pipeline.name, version, mv.run_id, dict(mv.tags))
    try:
        served = record.contract()
        fw = frameworks.get(served.framework)
        predicted = fw.predict(fw.load(f"models:/{pipeline.model_name}/{version}"), x)
        if pipeline.task == "classification":
            predicted = np.array([served.classes[int(i)] for i in predicted])
        return version, score(pipeline.metric, predicted, truth)
    except Exception as exc:  # no promotion on a comparison that did not happen
        raise ProductionUnscorable(
            f"production v{version} could not be scored on this holdout, so the gate cannot decide: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _log_dataset(upload: Upload, dataset: Dataset) -> None:
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
        resolve_dataset_source(upload.uri),
        name=upload.key,
        digest=upload.etag[:36] or None,
        schema=infer_signature(sample).inputs,
    )
    mlflow.log_input(ds, context="training", tags={"rows": str(len(dataset))})


def fail_abandoned(client, experiment_id: str, airflow_run: str) -> None:
    """Earlier attempts of this Airflow run that were killed mid-way end FAILED, not RUNNING forever."""
    if not airflow_run:
        return
    stale = client.search_runs(
        [experiment_id], f"{schema.tag_filter(schema.AIRFLOW_RUN, airflow_run)} and attributes.status = 'RUNNING'"
    )
    for run in stale:
        client.set_tag(run.info.run_id, schema.REASON, "killed before it finished; a later attempt took over")
        client.set_terminated(run.info.run_id, status="FAILED")


def run(
    settings: Settings,
    pipeline: Pipeline,
    upload: Upload,
    airflow_run: str = "",
    trigger: schema.Trigger | None = None,
) -> dict:
    import mlflow

    trigger = trigger or schema.Trigger()
    overrides = pipelines.check_params(pipeline.framework, trigger.overrides, f"{pipeline.name} overrides")
    if overrides:  # a hand-triggered run's parameters, over the pipeline file's
        pipeline = dataclasses.replace(pipeline, params={**pipeline.params, **overrides})
        trigger = dataclasses.replace(trigger, overrides=overrides)

    dataset = datasets.load(settings, pipeline, upload)
    holdout = None
    if pipeline.holdout_object:
        holdout = datasets.load(settings, pipeline, upload.part(pipeline.holdout_object))
    x_train, y_train, x_holdout, y_holdout = split(pipeline, dataset, holdout)
    classes: list[str] = []
    if pipeline.task == "classification":
        classes = class_labels(pipeline, dataset.y)
        index = {c: i for i, c in enumerate(classes)}
        y_train = np.array([index[str(v)] for v in y_train])
    fw = pipeline.plugin
    require_tracking()
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment(pipeline.name)
    fail_abandoned(client, experiment.experiment_id, airflow_run)
    record = schema.RunRecord(pipeline.name, upload, airflow_run, trigger)
    # The run ends FINISHED only once its version is registered, tagged and (if it won) promoted: a
    # kill at any point leaves it RUNNING, and the next attempt or run marks it FAILED.
    with mlflow.start_run(run_name=f"train-{pipeline.name}", tags=record.tags()) as active:
        mlflow.log_params(
            {
                **pipeline.params,
                "holdout": pipeline.holdout_object or pipeline.holdout_fraction,
                "seed": pipeline.seed,
                "rows": len(dataset),
            }
        )
        _log_dataset(upload, dataset)
        model = fw.fit(pipeline, x_train, y_train, len(classes))
        predicted = fw.predict(model, x_holdout)
        if classes:
            predicted = np.array([classes[int(i)] for i in predicted])
        challenger = score(pipeline.metric, predicted, y_holdout)
        champion_version, champion = champion_score(client, pipeline, x_holdout, y_holdout)
        decision = gate.decide(
            pipeline.metric,
            challenger,
            champion,
            higher_is_better=pipeline.higher_is_better,
            floor=pipeline.floor,
            margin=pipeline.margin,
        )
        reason = decision.reason
        verdict = schema.PROMOTED if decision.promote else schema.NOT_PROMOTED
        mlflow.log_metrics(
            {
                pipeline.metric: challenger,
                **({f"production_{pipeline.metric}": champion} if champion is not None else {}),
            }
        )
        info = fw.log_model(model, x_holdout[:3])
        # The deploy step replays these rows through the new server before it takes traffic.
        mlflow.log_dict(smoke_set(pipeline, x_holdout, y_holdout, predicted), schema.SMOKE_ARTIFACT)
        mlflow.log_dict(profile(pipeline, x_train, predicted), profiles.PROFILE_ARTIFACT)
        run_id = active.info.run_id
        evaluation = schema.Evaluation(challenger, champion_version or "", champion, verdict, reason)
        # Created with its tags in one call: no version ever exists without its provenance.
        registry.ensure_model(client, pipeline.model_name)
        version = client.create_model_version(
            pipeline.model_name,
            source=info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags=schema.version_tags(pipeline.name, upload, contract(pipeline, classes), evaluation),
        ).version
        version = str(version)
        previous = (
            registry.promote(client, pipeline.model_name, version, pipeline.rollout.live) if decision.promote else None
        )
        mlflow.set_tags(record.with_outcome(decision=verdict, reason=reason, model_version=version).tags())
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
        "upload": upload.to_dict(),
    }


def train(pipeline: str, upload: dict, trigger: dict | None = None, airflow_run: str = "") -> dict:
    """Train, gate and register a challenger on the upload; a rejection or a failure is on record."""
    settings = Settings.load()
    spec, dataset = pipelines.get(settings.pipelines_dir, pipeline), Upload.from_dict(upload)
    with records.outcome_recorded(spec, dataset, airflow_run, "train"):
        return run(settings, spec, dataset, airflow_run, schema.Trigger.from_dict(trigger))


if __name__ == "__main__":
    sys.exit(steps.main(train))
