"""Metrics: the scores the gate and the deploy smoke test compare, in plain Python.

Plain Python so Airflow's environment (no numpy) replays a holdout with the very function
training scored it with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Where training logs the holdout rows the deploy step replays through a new Bento.
SMOKE_ARTIFACT = "smoke/holdout.json"


def score(metric: str, predicted: Iterable, truth: Iterable) -> float:
    predicted, truth = list(predicted), list(truth)
    if metric == "accuracy":  # labels compared as text: a served "3" is the class 3
        return sum(str(p) == str(t) for p, t in zip(predicted, truth)) / len(truth)
    errors = [float(p) - float(t) for p, t in zip(predicted, truth)]
    if metric == "rmse":
        return math.sqrt(sum(e * e for e in errors) / len(errors))
    if metric == "mae":
        return sum(abs(e) for e in errors) / len(errors)
    if metric == "r2":
        mean = sum(float(t) for t in truth) / len(truth)
        return 1 - sum(e * e for e in errors) / sum((float(t) - mean) ** 2 for t in truth)
    raise ValueError(f"unknown metric {metric!r}")
