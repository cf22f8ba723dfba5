"""Validate (a step): check an upload against its pipeline's rules before any training.

`python -m flywheel.training.validate --args '{"pipeline": ..., "upload": {...}, "airflow_run": ...}'`.
A broken rule rejects the step (core/steps.py); both a rejection and a failure are recorded in
MLflow (records.py).
"""

from __future__ import annotations

import sys

from flywheel.core import pipelines, steps
from flywheel.core.settings import Settings
from flywheel.core.upload import Upload
from flywheel.training import datasets, records


def validate(pipeline: str, upload: dict, airflow_run: str = "") -> dict:
    """Check the upload against the pipeline's rules: its rows, or the rule it breaks."""
    settings = Settings.load()
    spec = pipelines.get(settings.pipelines_dir, pipeline)
    dataset = Upload.from_dict(upload)
    with records.outcome_recorded(spec, dataset, airflow_run, "validate"):
        loaded = datasets.load(settings, spec, dataset)
    return {"upload": dataset.to_dict(), "rows": len(loaded)}


if __name__ == "__main__":
    sys.exit(steps.main(validate))
