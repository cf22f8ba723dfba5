"""The inference service's read API (services/inference/app.py): live figures per version and role."""

from __future__ import annotations

import httpx

from flywheel.core.settings import Settings


def live(settings: Settings, pipeline: str, since: float, timeout: float = 10.0) -> dict:
    """Answers, labelled answers and live score per version and role since `since` (epoch seconds),
    and the shadow copies' disagreement with production on the same requests."""
    r = httpx.get(f"{settings.inference_url}/v1/live/{pipeline}", params={"since": since}, timeout=timeout)
    r.raise_for_status()
    return r.json()
