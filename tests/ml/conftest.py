"""The ML tests never reach a developer's MLflow server, nor write ./mlruns: every test that does not
set up its own tracking store gets a temporary one."""

import pytest


@pytest.fixture(autouse=True)
def private_tracking_store(tmp_path, monkeypatch):
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:///"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
