"""Drift retraining never loops: one at a time, once per serving version, never twice on the same data."""

from __future__ import annotations

import dataclasses

from flywheel.core import pipelines
from flywheel.core.settings import REPO_ROOT
from flywheel.operations import monitoring

IRIS = pipelines.get(REPO_ROOT / "pipelines", "iris")
LOOPED = dataclasses.replace(IRIS, retrain=pipelines.Retrain(on_drift=True, with_feedback=True))
DRIFT = {"version": "3", "detected": True, "decided": True, "reason": "drift in petal_length"}


def test_drift_retrains_only_where_the_pipeline_asks():
    assert monitoring.should_retrain(IRIS, DRIFT, None, 1000.0) == (
        False,
        "retraining on drift is off (retrain.on_drift)",
    )
    assert monitoring.should_retrain(LOOPED, DRIFT, None, 1000.0) == (True, "drift in petal_length")
    calm = {**DRIFT, "detected": False, "reason": "no drift over 300 answers"}
    assert monitoring.should_retrain(LOOPED, calm, None, 1000.0) == (False, "no drift over 300 answers")


def test_one_retraining_at_a_time_and_none_after_one_that_did_not_help():
    running = monitoring.Retraining(at=1000.0, version="3", dataset="iris/feedback/a.csv")
    go, why = monitoring.should_retrain(LOOPED, DRIFT, running, 1100.0)
    assert not go and "has not decided yet" in why
    stuck = dataclasses.replace(running, outcome="not promoted v4: accuracy 0.8 < production's 0.9")
    go, why = monitoring.should_retrain(LOOPED, DRIFT, stuck, 9000.0)
    assert not go and "did not help" in why
    # Once something else serves (an upload made v5), drift on it may retrain again.
    assert monitoring.should_retrain(LOOPED, {**DRIFT, "version": "5"}, stuck, 9000.0)[0]
    # An undecided retraining blocks no longer than IN_FLIGHT_SECONDS.
    assert monitoring.should_retrain(
        LOOPED, {**DRIFT, "version": "5"}, running, 1000.0 + monitoring.IN_FLIGHT_SECONDS + 1
    )[0]


def test_the_state_survives_a_new_process(tmp_path, monkeypatch):
    class FakeSettings:  # only the state folder is read
        state = tmp_path

    r = monitoring.Retraining(at=1.0, version="3", dataset="iris/feedback/a.csv", dataset_version="v1")
    monitoring.save(FakeSettings, "iris", r)
    assert monitoring.load(FakeSettings, "iris") == r
    assert (tmp_path / "monitoring" / "iris.json").stat().st_mode & 0o777 == 0o600


def test_drift_retrains_at_most_once_per_cooldown():
    done = monitoring.Retraining(at=1000.0, version="3", dataset="iris/feedback/a.csv", outcome="promoted v4")
    go, why = monitoring.should_retrain(LOOPED, {**DRIFT, "version": "4"}, done, 1000.0 + 60)
    assert not go and "cooldown" in why
    assert monitoring.should_retrain(LOOPED, {**DRIFT, "version": "4"}, done, 1000.0 + 3601)[0]
