"""Validate: check an uploaded dataset against its pipeline's declared schema before training."""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from typing import Any

from flywheel import data, pipelines
from flywheel.errors import DatasetInvalid
from flywheel.pipelines import Pipeline
from flywheel.runner import emit
from flywheel.settings import Settings

__all__ = ["Dataset", "DatasetInvalid", "check_table", "load_dataset", "main"]


@dataclass
class Dataset:
    """A validated upload: features `x` and labels `y`, as arrays (tables keep their frame too)."""

    x: Any
    y: Any
    table: Any = None

    def __len__(self) -> int:
        return len(self.y)


def _fail(where: str, problem: str, rule: str) -> DatasetInvalid:
    return DatasetInvalid(f"{where}: {problem} (rule: {rule})")


def read_table(raw: bytes, fmt: str, where: str):
    import pandas as pd

    if not raw.strip():
        raise _fail(where, "the object is empty", "readable format")
    try:
        if fmt == "csv":
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise _fail(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})", "encoding") from exc
            return pd.read_csv(io.StringIO(text))
        return pd.read_parquet(io.BytesIO(raw))
    except DatasetInvalid:
        raise
    except Exception as exc:  # any parser error is the upload's fault, reported as such
        raise _fail(where, f"cannot be read as {fmt.upper()}: {exc}", "readable format") from exc


def check_labels(pipeline: Pipeline, labels: list[str], where: str) -> None:
    """Label values (declared classes), at least two classes, and the class balance floor."""
    from collections import Counter

    counts = Counter(labels)
    if pipeline.classes:
        unknown = sorted(set(counts) - set(pipeline.classes))
        if unknown:
            raise _fail(
                where,
                f"label value(s) {unknown[:5]} not among the declared classes {list(pipeline.classes)}",
                "label values",
            )
    if len(counts) < 2:
        raise _fail(where, f"only {len(counts)} distinct label value(s); a classifier needs at least 2", "label values")
    rarest, n = min(counts.items(), key=lambda kv: kv[1])
    floor = pipeline.validation.min_class_fraction
    if n / len(labels) < floor:
        raise _fail(where, f"class {rarest!r} is {n / len(labels):.1%} of rows, below {floor:.1%}", "class balance")


def check_table(pipeline: Pipeline, table, where: str) -> None:
    """Raise DatasetInvalid on the first broken rule."""
    import numpy as np
    import pandas as pd

    rules = pipeline.validation
    missing = [c for c in (*pipeline.features, pipeline.target) if c not in table.columns]
    if missing:
        raise _fail(where, f"missing column(s) {', '.join(missing)}", "required columns")
    if len(table) < rules.min_rows:
        raise _fail(where, f"{len(table)} rows, need at least {rules.min_rows}", "minimum rows")
    columns = [*pipeline.features, pipeline.target]
    rates = table[columns].isna().mean()
    worst = rates.idxmax()
    if rates[worst] > rules.max_missing_rate:
        raise _fail(
            where,
            f"column {worst!r} is {rates[worst]:.1%} missing, above {rules.max_missing_rate:.1%}",
            "missing values",
        )
    for column in pipeline.features:
        if not pd.api.types.is_numeric_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column]):
            raise _fail(where, f"feature column {column!r} is {table[column].dtype}, not numeric", "column types")
        if np.isinf(table[column]).any():
            raise _fail(where, f"feature column {column!r} holds infinite values", "column types")
    target = table[pipeline.target].dropna()
    if pipeline.task == "regression":
        if not pd.api.types.is_numeric_dtype(target):
            raise _fail(where, f"target {pipeline.target!r} is {target.dtype}, not numeric", "column types")
    else:
        check_labels(pipeline, [str(v) for v in target], where)


def _fetch_checked(settings: Settings, pipeline: Pipeline, ref: data.DatasetRef) -> bytes:
    size = data.size_of(settings, ref)
    if size > pipeline.validation.max_bytes:
        raise _fail(ref.describe(), f"{size} bytes, above the limit of {pipeline.validation.max_bytes}", "maximum size")
    return data.fetch(settings, ref)


def load_dataset(settings: Settings, pipeline: Pipeline, ref: data.DatasetRef) -> Dataset:
    """The upload as arrays, or DatasetInvalid naming the object, its version and the rule."""
    where = ref.describe()
    if not pipeline.is_image:
        table = read_table(_fetch_checked(settings, pipeline, ref), pipeline.format, where)
        check_table(pipeline, table, where)
        x = table[list(pipeline.features)].to_numpy(dtype="float32")
        return Dataset(x=x, y=table[pipeline.target].to_numpy(), table=table)

    from flywheel import images

    if pipeline.format == "idx":
        part_refs = data.idx_parts(settings, ref)
        parts = {name: _fetch_checked(settings, pipeline, r) for name, r in part_refs.items()}
        where = f"{where} -> {', '.join(r.describe() for r in part_refs.values())}"
    else:
        parts = {"data": _fetch_checked(settings, pipeline, ref)}
    x, y = images.read_images(pipeline.format, parts, where)
    classes = [int(c) for c in pipeline.classes] if pipeline.classes else None
    images.check_images(
        x,
        y,
        shape=pipeline.image_shape,
        max_value=pipeline.max_value,
        classes=classes,
        min_rows=pipeline.validation.min_rows,
        min_class_fraction=pipeline.validation.min_class_fraction,
        where=where,
    )
    return Dataset(x=x.astype("float32"), y=y)


def record_rejection(pipeline: Pipeline, ref: data.DatasetRef, reason: str, airflow_run: str = "") -> None:
    """A rejected upload is visible in MLflow too: a FAILED run tagged with the reason."""
    import mlflow

    from flywheel.registry import require_tracking

    require_tracking()
    mlflow.set_experiment(pipeline.name)
    with mlflow.start_run(run_name=f"rejected-{pipeline.name}") as run:
        mlflow.set_tags(
            {
                "flywheel.pipeline": pipeline.name,
                "flywheel.status": "rejected",
                "flywheel.stage": "validate",
                "flywheel.reason": reason[:4900],
                "dataset.uri": ref.uri,
                "dataset.etag": ref.etag,
                "dataset.version_id": ref.version_id,
                "airflow.run_id": airflow_run,
            }
        )
    mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.validate", description=__doc__)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", required=True, help="the dataset event's extra, as JSON")
    parser.add_argument("--airflow-run", default="")
    args = parser.parse_args(argv)
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, args.pipeline)
    ref = data.DatasetRef.from_extra(json.loads(args.dataset))
    try:
        dataset = load_dataset(settings, pipeline, ref)
    except DatasetInvalid as exc:
        print(f"INVALID DATASET {exc}", file=sys.stderr, flush=True)
        record_rejection(pipeline, ref, str(exc), args.airflow_run)
        return 2
    emit({"dataset": ref.as_dict(), "rows": len(dataset), "valid": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
