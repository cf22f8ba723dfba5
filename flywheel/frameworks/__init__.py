"""Frameworks: each module offers fit, predict, log_model and load with the same signatures."""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType


def get(name: str) -> ModuleType:
    """The framework module, imported only when a step needs it (each is heavy)."""
    return importlib.import_module(f"flywheel.frameworks.{name}")


def pinned(*names: str) -> list[str]:
    """Requirements for a logged model, pinned to what is installed.

    Passing them spares MLflow its own inference, which re-imports the model in a subprocess
    (5 s for XGBoost, 10+ s for TensorFlow).
    """
    found = []
    for name in names:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(name)
    return found
