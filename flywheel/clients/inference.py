"""The inference service's API (services/inference/app.py): live figures per version and role, drift verdicts."""

from __future__ import annotations

import httpx

from flywheel.core.settings import Settings


def live(settings: Settings, pipeline: str, since: float, timeout: float = 10.0) -> dict:
    """Answers, labelled answers and live score per version and role since `since` (epoch seconds),
    and the shadow copies' disagreement with production on the same requests."""
    r = httpx.get(f"{settings.inference_url}/v1/live/{pipeline}", params={"since": since}, timeout=timeout)
    r.raise_for_status()
    return r.json()


def answered(settings: Settings, pipeline: str, since: float, timeout: float = 10.0) -> int:
    """How many answers (not shadow copies) the pipeline gave since `since`."""
    r = httpx.get(f"{settings.inference_url}/v1/answered/{pipeline}", params={"since": since}, timeout=timeout)
    r.raise_for_status()
    return int(r.json()["answers"])


def record_drift(settings: Settings, pipeline: str, result: dict, timeout: float = 10.0) -> None:
    """The monitor's verdict, for Prometheus (flywheel_drift_*) and `flywheel status`."""
    r = httpx.put(f"{settings.inference_url}/v1/drift/{pipeline}", json=result, timeout=timeout)
    r.raise_for_status()


def drift(settings: Settings, timeout: float = 5.0) -> dict[str, dict]:
    """The monitor's last verdict per pipeline."""
    r = httpx.get(f"{settings.inference_url}/v1/drift", timeout=timeout)
    r.raise_for_status()
    return r.json()
