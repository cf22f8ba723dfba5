"""Prometheus' query API: instant vector queries, as plain dicts."""

from __future__ import annotations

import httpx

from flywheel.core.settings import Settings


def query(settings: Settings, promql: str, timeout: float = 5) -> list[dict]:
    """The result vector of an instant query ([{"metric": {...}, "value": [t, "v"]}, ...])."""
    r = httpx.get(f"{settings.prometheus_url}/api/v1/query", params={"query": promql}, timeout=timeout)
    r.raise_for_status()
    return r.json()["data"]["result"]


def value(series: dict) -> float | None:
    """A series' value, None where it is not a number (NaN: no samples in the window)."""
    v = float(series["value"][1])
    return None if v != v else v
