"""Registry: the production and previous aliases of a registered model in MLflow."""

from __future__ import annotations

import os

PRODUCTION = "production"
PREVIOUS = "previous"  # the rollback target


def require_tracking() -> str:
    """Point the MLflow client at the tracking server MLFLOW_TRACKING_URI names, or refuse.

    Without one, MLflow quietly writes ./mlruns and ./mlflow.db wherever the process runs (a
    benchmark once left 80 files in the repository that way).
    """
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: flywheel logs to the platform's MLflow server only")
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_model(client, name: str) -> None:
    """The registered model, created on first use (a concurrent creation is as good)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)


def current_version(client, name: str, alias: str = PRODUCTION) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def promote(client, name: str, version: str) -> str | None:
    """Point `production` at `version`; the version it replaces becomes `previous`."""
    old = current_version(client, name)
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, PRODUCTION, version)
    return old
