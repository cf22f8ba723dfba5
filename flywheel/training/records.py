"""Records: what became of an upload a step could not train, written to MLflow where the ledger finds it.

A rejection (the upload breaks a rule, in validation or in training) and a failure (the step broke
on it) are each a FAILED MLflow run tagged with the upload, the stage and the reason. The run's
`account` task reads them: an upload that was rejected, or that every attempt failed on, is
accounted for as such and never re-emitted by the reconciler.
"""

from __future__ import annotations

import contextlib
import logging

from flywheel.clients.tracking import require_tracking
from flywheel.core import schema
from flywheel.core.errors import DatasetInvalid
from flywheel.core.pipelines import Pipeline
from flywheel.core.upload import Upload

log = logging.getLogger(__name__)


def record(pipeline: Pipeline, upload: Upload, airflow_run: str, status: str, stage: str, reason: str) -> None:
    import mlflow

    require_tracking()
    mlflow.set_experiment(pipeline.name)
    tags = schema.RunRecord(pipeline.name, upload, airflow_run, status=status, stage=stage, reason=reason).tags()
    with mlflow.start_run(run_name=f"{status}-{pipeline.name}", tags=tags) as run:
        pass
    mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")


@contextlib.contextmanager
def outcome_recorded(pipeline: Pipeline, upload: Upload, airflow_run: str, stage: str):
    """Whatever stops the step is on record: DatasetInvalid as a rejection, anything else as a failure.

    Recording a failure is best effort: with MLflow down nothing can be recorded, and the upload
    stays pending for the reconciler, as it should.
    """
    try:
        yield
    except DatasetInvalid as exc:
        record(pipeline, upload, airflow_run, schema.REJECTED, stage, str(exc))
        raise
    except Exception as exc:
        try:
            record(pipeline, upload, airflow_run, schema.FAILED, stage, f"{type(exc).__name__}: {exc}")
        except Exception as unrecorded:  # MLflow away: the reconciler retries this upload later
            log.warning("could not record the failure in MLflow: %s", unrecorded)
        raise
