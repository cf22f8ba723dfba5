"""Frameworks: each module offers fit, predict, log_model and load with the same signatures."""

from __future__ import annotations

import importlib
from types import ModuleType


def get(name: str) -> ModuleType:
    """The framework module, imported only when a step needs it (each is heavy)."""
    return importlib.import_module(f"flywheel.frameworks.{name}")
