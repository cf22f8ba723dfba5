"""MLflow's Python client (the ML environment), pointed at the platform's tracking server or refused."""

from __future__ import annotations

import os


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


def client():
    """An MlflowClient of the platform's tracking server."""
    import mlflow

    require_tracking()
    return mlflow.MlflowClient()
