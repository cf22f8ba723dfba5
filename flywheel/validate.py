"""Validate: check an uploaded dataset against its pipeline's declared schema before training."""

from __future__ import annotations

import argparse
import json
import sys

from flywheel import data, pipelines
from flywheel.pipelines import Pipeline
from flywheel.settings import Settings

MIN_ROWS = 10


class DatasetInvalid(ValueError):
    """The upload breaks a rule; the message names the object, its version and the rule."""


def check_table(pipeline: Pipeline, table, where: str) -> None:
    """Raise DatasetInvalid on the first broken rule."""
    import pandas as pd

    missing = [c for c in (*pipeline.features, pipeline.target) if c not in table.columns]
    if missing:
        raise DatasetInvalid(f"{where}: missing column(s) {', '.join(missing)} (rule: required columns)")
    if len(table) < MIN_ROWS:
        raise DatasetInvalid(f"{where}: {len(table)} rows, need at least {MIN_ROWS} (rule: minimum rows)")
    for column in pipeline.features:
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise DatasetInvalid(f"{where}: feature column {column!r} is not numeric (rule: feature types)")
    nulls = table[[*pipeline.features, pipeline.target]].isna().sum()
    if nulls.any():
        column = nulls.idxmax()
        raise DatasetInvalid(f"{where}: column {column!r} has {int(nulls.max())} missing value(s) (rule: no missing values)")
    if pipeline.task == "classification" and table[pipeline.target].nunique() < 2:
        raise DatasetInvalid(f"{where}: target {pipeline.target!r} has fewer than 2 classes (rule: label values)")


def load_valid_table(settings: Settings, pipeline: Pipeline, ref: data.DatasetRef):
    """The dataset as a table, or DatasetInvalid naming the object and the problem."""
    where = ref.describe()
    raw = data.fetch(settings, ref)
    try:
        table = data.read_table(raw, pipeline.format)
    except Exception as exc:  # any parser error is the upload's fault, reported as such
        raise DatasetInvalid(f"{where}: cannot be read as {pipeline.format.upper()}: {exc}") from exc
    check_table(pipeline, table, where)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.validate", description=__doc__)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", required=True, help="the dataset event's extra, as JSON")
    args = parser.parse_args(argv)
    settings = Settings.load()
    pipeline = pipelines.get(settings.pipelines_dir, args.pipeline)
    ref = data.DatasetRef.from_extra(json.loads(args.dataset))
    try:
        table = load_valid_table(settings, pipeline, ref)
    except DatasetInvalid as exc:
        print(f"INVALID DATASET {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"dataset": ref.as_dict(), "rows": len(table), "valid": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
