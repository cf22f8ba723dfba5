"""Rollback: put `previous` back into production and let the deploy DAG roll it out, like any promotion."""

from __future__ import annotations

from flywheel.clients.airflow_rest import AirflowAPI
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import AIRFLOW_CLI, Settings


class RollbackImpossible(RuntimeError):
    pass


def rollback(settings: Settings, pipeline: Pipeline) -> dict:
    """The aliases swap (the rolled-back version becomes `previous`, so a second rollback undoes the
    first), and a production-model asset event records why, so the lineage shows the rollback.
    Returns the event's extra."""
    with MlflowAPI.connect(settings) as mlflow:
        current = mlflow.version_by_alias(pipeline.model_name, schema.PRODUCTION)
        previous = mlflow.version_by_alias(pipeline.model_name, schema.PREVIOUS)
        if previous is None:
            raise RollbackImpossible(f"{pipeline.name} has no `{schema.PREVIOUS}` version to roll back to")
        mlflow.set_alias(pipeline.model_name, schema.PRODUCTION, previous)
        if current is not None:
            mlflow.set_alias(pipeline.model_name, schema.PREVIOUS, current)
        mv = mlflow.model_version(pipeline.model_name, previous)
    record = schema.VersionRecord.from_mlflow(pipeline.name, previous, mv.get("run_id", ""), mv["tags"])
    extra = {
        "pipeline": pipeline.name,
        "model_name": pipeline.model_name,
        "version": previous,
        "run_id": record.run_id,
        "dataset": record.upload.to_dict() if record.upload else None,
        "reason": f"rollback from v{current}",
        "rollback_from": current,
    }
    with AirflowAPI.connect(settings, AIRFLOW_CLI) as airflow:
        asset_id = airflow.asset_id(pipeline.model_uri)
        if asset_id is None:
            raise RollbackImpossible(f"Airflow has no asset {pipeline.model_uri}")
        airflow.create_asset_event(asset_id, extra)
    return extra
