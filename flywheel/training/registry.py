"""Registry: a pipeline's registered model and its production and previous aliases (MLflow's Python client)."""

from __future__ import annotations

from flywheel.core.schema import CANDIDATE, PREVIOUS, PRODUCTION


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


def promote(client, name: str, version: str, live: bool = False) -> str | None:
    """Point `production` at `version`; the version it replaces becomes `previous`. With a live rollout
    (the pipeline's rollout.strategy) and a production to judge it against, `version` becomes the
    `candidate` instead, and `production` moves only once it wins live (serving/live.py)."""
    old = current_version(client, name)
    if live and old is not None and old != version:
        client.set_registered_model_alias(name, CANDIDATE, version)
        return old
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, PRODUCTION, version)
    return old
