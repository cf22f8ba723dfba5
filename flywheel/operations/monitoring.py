"""Monitoring: what monitor_<p> does with the drift verdict of a window (inference/monitor.py).

It is recorded (the inference service exports it to Prometheus), alerted when drift is detected,
and, with `retrain.on_drift`, answered by a retraining. Retraining on drift never loops:

- one at a time: while the training it started has not decided, drift starts no other (one that
  has not decided within IN_FLIGHT_SECONDS is written off as lost, and says so);
- at most one per `retrain.cooldown_minutes`, whatever the last one did;
- once per version: a retraining that was not promoted alerts "drift, and retraining did not help"
  and starts no other until something else changes what serves (an upload, a person);
- never on the same data twice: without feedback it retrains the newest upload only if the serving
  version was not trained on it (tasks.py).

The state is one file per pipeline (`monitoring/<p>.json`), so a killed scheduler or worker loses
nothing: the next window reads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline
from flywheel.core.settings import Settings, write_private
from flywheel.operations import alerts

IN_FLIGHT_SECONDS = 3600.0  # a retraining not decided after this long no longer blocks another


@dataclass
class Retraining:
    """The last retraining drift started."""

    at: float
    version: str  # what served when drift asked for it
    dataset: str  # the upload it trains on (key), and its version id
    dataset_version: str = ""
    reason: str = ""
    outcome: str = ""  # "promoted v4", "not promoted v4: …", or "" while undecided
    alerted: bool = False


def _path(settings: Settings, pipeline: str) -> Path:
    return settings.state / "monitoring" / f"{pipeline}.json"


def load(settings: Settings, pipeline: str) -> Retraining | None:
    try:
        return Retraining(**json.loads(_path(settings, pipeline).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def save(settings: Settings, pipeline: str, retraining: Retraining) -> None:
    path = _path(settings, pipeline)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, json.dumps(asdict(retraining)))


def window(pipeline: Pipeline, now: float) -> tuple[float, float]:
    """The window a monitoring run judges: the last `window_minutes` up to now, less the collector's
    shipping delay (answers reach MinIO within its ship interval)."""
    until = now - 15.0
    return until - pipeline.monitor.window_minutes * 60, until


def drift_alert(result: dict) -> dict:
    figures = ", ".join(
        f"{f['feature']} ({f['test']} distance {f['distance']:.2f}, p={f['p_value']:.1e})"
        for f in result["features"]
        if f["drifted"]
    )
    summary = (
        f"{result['pipeline']} v{result['version']}: live answers drifted from its training data in "
        f"{figures} ({result['rows']} answers; report: {result.get('report', 'none')})"
    )
    labels = {
        "pipeline": result["pipeline"],
        "model_version": result["version"],
        "features": ",".join(result["drifted"]),
    }
    return alerts.alert("monitor", "Flywheel: drift", summary, labels)


def outcome(mlflow: MlflowAPI, pipeline: Pipeline, retraining: Retraining) -> str:
    """What the training of the retraining's dataset decided, or "" while it has not: runs on that
    upload started after the retraining asked for them (an earlier run on it is not an answer)."""
    found = mlflow.search_runs(pipeline.name, schema.tag_filter(schema.UPLOAD_KEY, retraining.dataset))
    for run in sorted(found, key=lambda r: r["info"].get("start_time") or 0):
        if (run["info"].get("start_time") or 0) / 1000 < retraining.at - 1:
            continue
        record = schema.RunRecord.from_tags(run["data"]["tags"])
        if retraining.dataset_version and record.upload and record.upload.version_id != retraining.dataset_version:
            continue
        if record.decision == schema.PROMOTED:
            return f"promoted v{record.model_version}"
        if record.decision == schema.NOT_PROMOTED:
            return f"not promoted v{record.model_version}: {record.reason}"
        if record.status:
            return f"{record.status}: {record.reason}"
    return ""


def follow_up(settings: Settings, pipeline: Pipeline) -> Retraining | None:
    """The last retraining, with its outcome looked up once decided; alerts once if it did not help."""
    retraining = load(settings, pipeline.name)
    if retraining is None or retraining.outcome:
        return retraining
    with MlflowAPI.connect(settings) as mlflow:
        retraining.outcome = outcome(mlflow, pipeline, retraining)
    if not retraining.outcome and time.time() - retraining.at > IN_FLIGHT_SECONDS:
        retraining.outcome = f"lost: no training on {retraining.dataset} decided within {IN_FLIGHT_SECONDS / 60:g} min"
    if retraining.outcome and not retraining.outcome.startswith("promoted") and not retraining.alerted:
        summary = (
            f"{pipeline.name}: drift on v{retraining.version}, and retraining on {retraining.dataset} did not help "
            f"({retraining.outcome}); no further retraining on drift until what serves changes"
        )
        alerts.notify(
            settings,
            [
                alerts.alert(
                    "monitor", "Flywheel: drift, and retraining did not help", summary, {"pipeline": pipeline.name}
                )
            ],
        )
        retraining.alerted = True
    if retraining.outcome:
        save(settings, pipeline.name, retraining)
    return retraining


def should_retrain(pipeline: Pipeline, result: dict, last: Retraining | None, now: float) -> tuple[bool, str]:
    """Whether a detected drift starts a retraining, and why (not)."""
    if not pipeline.retrain.on_drift:
        return False, "retraining on drift is off (retrain.on_drift)"
    if not result.get("detected"):
        return False, result.get("reason") or "no drift"
    if last is not None and not last.outcome and now - last.at < IN_FLIGHT_SECONDS:
        return False, f"the retraining on {last.dataset} has not decided yet"
    if last is not None and now - last.at < pipeline.retrain.cooldown_minutes * 60:
        return False, f"the last retraining on drift was {(now - last.at) / 60:.0f} min ago (retrain.cooldown_minutes)"
    if last is not None and last.version == result["version"] and not last.outcome.startswith("promoted"):
        return False, f"retraining did not help v{last.version} ({last.outcome}); waiting for what serves to change"
    return True, result["reason"]
